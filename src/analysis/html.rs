//! Completions as an HTML page with the soft tokens highlighted (the chart
//! "text with soft tokens highlighted"): soft tokens on orange, hard ones
//! tinted blue by the router's p_soft, and each token's p_soft, log-prob and
//! entropy in its tooltip.
use crate::model::Tokenizer;
use crate::policy::router::SOFT;
use crate::policy::Rollout;
use anyhow::{bail, Result};
use std::fmt::Write;
use std::io::Write as _;
use std::path::Path;

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The page: one block per completion (prompt id, sample, reward when given).
pub fn soft_text(
    ro: &Rollout,
    tok: &Tokenizer,
    group: usize,
    rewards: Option<&[f64]>,
) -> Result<String> {
    if group == 0 {
        bail!("soft_text: group must be >= 1");
    }
    if let Some(r) = rewards {
        if r.len() != ro.records.len() {
            bail!(
                "soft_text: {} rewards for {} completions",
                r.len(),
                ro.records.len()
            );
        }
    }
    let mut h = String::from(
        "<!doctype html><meta charset=\"utf-8\"><title>soft tokens</title>\n<style>\
         body{font-family:sans-serif;max-width:60em;margin:2em auto}\
         pre{white-space:pre-wrap;font-family:monospace;line-height:1.6}\
         .soft{background:#ffb347}.thought{color:#999}</style>\n\
         <p>Soft tokens (fed back as a top-k mixture) on orange; hard tokens tinted blue by the \
         router's p_soft. Hover a token for p_soft, log p and entropy.</p>\n",
    );
    for (i, recs) in ro.records.iter().enumerate() {
        let reward = rewards.map_or(String::new(), |r| format!(", reward {:.3}", r[i]));
        let soft = recs.iter().filter(|r| r.mode == SOFT).count();
        write!(
            h,
            "<h3>prompt {} sample {}{reward}, {soft}/{} soft</h3>\n<pre>",
            i / group,
            i % group,
            recs.len()
        )?;
        for r in recs {
            if !r.has_token() {
                h.push_str(
                    "<span class=\"thought\" title=\"continuous thought (no token)\">·</span>",
                );
                continue;
            }
            let text = escape(&tok.decode(&[r.token], false)?);
            let tip = format!(
                "p_soft {:.3} · log p {:.3} · entropy {:.3}",
                r.p_soft, r.logp, r.entropy
            );
            if r.mode == SOFT {
                write!(h, "<span class=\"soft\" title=\"{tip}\">{text}</span>")?;
            } else {
                let a = (r.p_soft.clamp(0.0, 1.0) * 0.6) as f64;
                write!(h, "<span style=\"background:rgba(70,130,180,{a:.3})\" title=\"{tip}\">{text}</span>")?;
            }
        }
        h.push_str("</pre>\n");
    }
    Ok(h)
}

/// Writes the page atomically (parent directories created).
pub fn write(path: &Path, html: &str) -> Result<()> {
    super::frame::write_atomic(path, |f| Ok(f.write_all(html.as_bytes())?))
}
