//! `m.stream(prompt, opts)`: one completion printed as it is generated, the
//! tokens the router sends soft coloured (ANSI), returned as a Rollout.
//! Ctrl-C ends the completion and keeps what was written.
use super::bind_rollout::make_rollout;
use super::help;
use super::opts::Opts;
use super::types::*;
use crate::policy::{TokenRecord, SOFT};
use anyhow::{bail, Result};
use rhai::{Array, Dynamic, Engine, Map};
use std::io::{IsTerminal, Write};

/// Soft tokens: black on orange (256-colour background 215).
pub const SOFT_ON: &str = "\x1b[30;48;5;215m";
pub const OFF: &str = "\x1b[0m";

pub fn register(engine: &mut Engine) {
    engine.register_fn("stream", |m: &mut Backbone, p: Dynamic| {
        rt(stream(m, p, Map::new()))
    });
    engine.register_fn("stream", |m: &mut Backbone, p: Dynamic, o: Map| {
        rt(stream(m, p, o))
    });
}

/// Colour when stdout is a terminal and NO_COLOR is unset, or when asked.
fn use_color(o: &mut Map) -> Result<bool> {
    match o.remove("color") {
        Some(v) => v
            .as_bool()
            .map_err(|t| anyhow::anyhow!("stream: option `color` must be a bool, got {t}")),
        None => Ok(std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none()),
    }
}

fn stream(m: &Backbone, prompt: Dynamic, mut o: Map) -> Result<RolloutHandle> {
    let color = use_color(&mut o)?;
    match o.get("group").map(|g| g.as_int()) {
        None => {
            o.insert("group".into(), Dynamic::from_int(1));
        }
        Some(Ok(1)) => {}
        Some(_) => bail!("stream: writes one completion (group must be 1)"),
    }
    let o = Opts::check("stream", help::ROLLOUT_GROUP, o)?;
    if !prompt.is_string() && !prompt.is_map() {
        bail!(
            "stream: the prompt must be a string or a #{{prompt, answer}} row, got {}",
            prompt.type_name()
        );
    }
    let legend = if color {
        format!("[{SOFT_ON}soft{OFF} tokens on orange, hard ones plain; Ctrl-C stops]")
    } else {
        "[soft tokens in [[...]]; Ctrl-C stops]".to_string()
    };
    println!("{legend}");
    let mut shown = Shown::default();
    let mut print = |recs: &[Vec<TokenRecord>]| shown.print(m, &recs[0], color);
    let ro = make_rollout(m, Array::from([prompt]), &o, &mut print, true)?;
    println!();
    if crate::ctl::is_interrupted() {
        crate::ctl::clear();
        println!("(stopped: {} tokens kept)", ro.0.ro.records[0].len());
    }
    Ok(ro)
}

/// What has been printed of the completion so far.
#[derive(Default)]
struct Shown {
    tokens: usize,
    ids: Vec<i64>,
    text: String,
}

impl Shown {
    /// Prints the completion's new tokens. The text is decoded as a whole
    /// and only its new end printed, so characters split over byte-level
    /// tokens come out whole.
    fn print(&mut self, m: &Backbone, recs: &[TokenRecord], color: bool) -> Result<()> {
        let st = m.0.borrow();
        let tok = &st.policy.model.tok;
        let mut out = std::io::stdout().lock();
        for r in &recs[self.tokens..] {
            if !r.has_token() {
                write!(out, "·")?;
                continue;
            }
            self.ids.push(r.token);
            let text = tok.decode(&self.ids, true)?;
            let new = text
                .strip_prefix(self.text.as_str())
                .unwrap_or("")
                .to_string();
            self.text = text;
            match (r.mode == SOFT, color) {
                (true, true) => write!(out, "{SOFT_ON}{new}{OFF}")?,
                (true, false) => write!(out, "[[{new}]]")?,
                (false, _) => write!(out, "{new}")?,
            }
        }
        self.tokens = recs.len();
        out.flush()?;
        Ok(())
    }
}
