//! `tarpo repl`: a rustyline front end over a script `Session`. Variables,
//! functions, imports and loaded models persist between lines; history is
//! saved across sessions; Tab completes primitives, methods and variables;
//! input continues over several lines while brackets are open; Ctrl-C stops
//! running code (the session and its state stay), Ctrl-D exits.
use crate::script::Session;
use rustyline::completion::{Completer, Pair};
use rustyline::error::ReadlineError;
use rustyline::history::DefaultHistory;
use rustyline::validate::{ValidationContext, ValidationResult, Validator};
use rustyline::{Context, Editor, Helper, Highlighter, Hinter};
use std::cell::RefCell;
use std::collections::HashMap;
use std::path::PathBuf;
use std::rc::Rc;

#[derive(Helper, Hinter, Highlighter)]
struct LineHelper {
    words: Rc<RefCell<Vec<String>>>,
    /// Per workbench-typed variable, its methods (completion after `var.`).
    methods: Rc<RefCell<HashMap<String, Vec<String>>>>,
}

impl Completer for LineHelper {
    type Candidate = Pair;

    fn complete(
        &self,
        line: &str,
        pos: usize,
        _ctx: &Context<'_>,
    ) -> rustyline::Result<(usize, Vec<Pair>)> {
        let start = line[..pos]
            .rfind(|c: char| !(c.is_alphanumeric() || c == '_'))
            .map_or(0, |i| i + 1);
        let prefix = &line[start..pos];
        // After `var.`, the methods of var's type when it is known.
        let receiver = line[..start].strip_suffix('.').map(|before| {
            let from = before
                .rfind(|c: char| !(c.is_alphanumeric() || c == '_'))
                .map_or(0, |i| i + 1);
            &before[from..]
        });
        let methods = self.methods.borrow();
        let typed = receiver.and_then(|r| methods.get(r));
        if prefix.is_empty() && typed.is_none() {
            return Ok((pos, Vec::new()));
        }
        let words = self.words.borrow();
        let found = typed
            .unwrap_or(&words)
            .iter()
            .filter(|w| w.starts_with(prefix))
            .map(|w| Pair {
                display: w.clone(),
                replacement: w.clone(),
            })
            .collect();
        Ok((start, found))
    }
}

impl Validator for LineHelper {
    fn validate(&self, ctx: &mut ValidationContext) -> rustyline::Result<ValidationResult> {
        Ok(if open_brackets(ctx.input()) > 0 {
            ValidationResult::Incomplete
        } else {
            ValidationResult::Valid(None)
        })
    }
}

/// Brackets still open at the end of `code` (strings and comments skipped).
pub fn open_brackets(code: &str) -> i64 {
    let (mut depth, mut chars) = (0i64, code.chars().peekable());
    while let Some(c) = chars.next() {
        match c {
            '"' | '`' | '\'' => {
                while let Some(d) = chars.next() {
                    if d == '\\' {
                        chars.next();
                    } else if d == c {
                        break;
                    }
                }
            }
            '/' if chars.peek() == Some(&'/') => {
                for d in chars.by_ref() {
                    if d == '\n' {
                        break;
                    }
                }
            }
            '{' | '(' | '[' => depth += 1,
            '}' | ')' | ']' => depth -= 1,
            _ => {}
        }
    }
    depth
}

fn history_path() -> PathBuf {
    if let Some(p) = std::env::var_os("TARPO_HISTORY") {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
    home.join(".tarpo_history")
}

const BANNER: &str = "tarpo repl: Rhai over the workbench. help() lists the primitives, \
:vars the variables, :load FILE runs a script here; Ctrl-C stops running code, Ctrl-D exits.";

/// Runs the REPL until Ctrl-D; `preload` is code run first (e.g. loading `--model`).
pub fn run(mut session: Session, preload: Option<String>) -> anyhow::Result<()> {
    let words = Rc::new(RefCell::new(session.completion_words()));
    let methods = Rc::new(RefCell::new(HashMap::new()));
    let mut rl: Editor<LineHelper, DefaultHistory> = Editor::new()?;
    // After the editor: rustyline claims SIGINT when it sets up the terminal.
    crate::ctl::install_interrupt_handler()?;
    rl.set_helper(Some(LineHelper {
        words: words.clone(),
        methods: methods.clone(),
    }));
    let history = history_path();
    let _ = rl.load_history(&history);
    println!("{BANNER}");
    if let Some(code) = preload {
        println!("{code}");
        let r = session.eval(&code, "<repl>");
        report(&session, r);
    }
    loop {
        *words.borrow_mut() = session.completion_words();
        // Names only: a variable may hold a large array or map.
        *methods.borrow_mut() = session
            .variable_names()
            .into_iter()
            .filter_map(|name| Some((name.clone(), session.methods_of(&name)?)))
            .collect();
        match rl.readline("tarpo> ") {
            Ok(line) => {
                if line.trim().is_empty() {
                    continue;
                }
                let _ = rl.add_history_entry(line.as_str());
                let _ = rl.save_history(&history);
                if !command(&mut session, line.trim()) {
                    let r = session.eval(&line, "<repl>");
                    report(&session, r);
                }
            }
            Err(ReadlineError::Interrupted) => println!("(Ctrl-C: input cleared; Ctrl-D exits)"),
            Err(ReadlineError::Eof) => break,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// `:load FILE`, `:vars`, `:help`: returns false for ordinary code.
fn command(session: &mut Session, line: &str) -> bool {
    let Some(cmd) = line.strip_prefix(':') else {
        return false;
    };
    let (name, arg) = cmd.split_once(' ').unwrap_or((cmd, ""));
    match name {
        "load" if !arg.trim().is_empty() => {
            let r = session.run_file(std::path::Path::new(arg.trim()));
            report(session, r);
        }
        "vars" => {
            for (n, t, v) in session.variables() {
                if v.is_empty() {
                    println!("{n}: {t}");
                } else {
                    println!("{n}: {t} = {v}");
                }
            }
        }
        "help" => print!("{}", crate::script::help::overview()),
        _ => println!("commands: :load FILE, :vars, :help (and Rhai code)"),
    }
    true
}

fn report(session: &Session, r: Result<rhai::Dynamic, String>) {
    match r {
        Ok(v) if v.is_unit() => {}
        Ok(v) => println!("{}", session.show(&v)),
        Err(e) => eprintln!("error: {e}"),
    }
}
