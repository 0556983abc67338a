//! User text in error messages, and text files read with clear errors:
//! every parser's message stays one line, short, whatever a file holds.
use anyhow::{anyhow, Result};
use serde_json::Value;
use std::path::Path;

/// A JSON value for an error message: its type and a short rendering.
pub fn describe(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("bool {b}"),
        Value::Number(n) if n.is_f64() => format!("float {n}"),
        Value::Number(n) => format!("integer {n}"),
        Value::String(s) => format!("string {}", shorten(s)),
        Value::Array(a) => format!("an array of {} items", a.len()),
        Value::Object(o) => format!("an object of {} keys", o.len()),
    }
}

/// A JSON value as JSON text for an error message, cut after 60 characters.
pub fn json_short(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 60 {
        format!("{}...", s.chars().take(60).collect::<String>())
    } else {
        s
    }
}

/// A user string for an error message: quoted, escaped (one line), and cut
/// after 60 characters.
pub fn shorten(s: &str) -> String {
    const KEEP: usize = 60;
    let mut out: String = s.chars().take(KEEP).collect();
    let cut = out.len() < s.len();
    out = format!("{out:?}");
    if cut {
        out.insert_str(out.len() - 1, "...");
    }
    out
}

/// A (third-party) error message fit for one line: whitespace runs made
/// single spaces, and a long one cut in the middle, keeping its end (where
/// serde_json says "at line L column C").
pub fn clip(msg: &str) -> String {
    const HEAD: usize = 160;
    const TAIL: usize = 80;
    let words: Vec<&str> = msg.split_whitespace().collect();
    let one: String = words.join(" ");
    let chars: Vec<char> = one.chars().collect();
    if chars.len() <= HEAD + TAIL + 5 {
        return one;
    }
    let head: String = chars[..HEAD].iter().collect();
    let tail: String = chars[chars.len() - TAIL..].iter().collect();
    format!("{head} ... {tail}")
}

/// A text file, with a clear error for unreadable or non-UTF-8 content (the
/// byte offset of the first bad byte). A leading UTF-8 byte-order mark is
/// dropped.
pub fn read_text(path: &Path) -> Result<String> {
    let bytes =
        std::fs::read(path).map_err(|e| anyhow!("{}: cannot read ({e})", path.display()))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        anyhow!(
            "{}: not UTF-8 text (invalid byte at byte {})",
            path.display(),
            e.utf8_error().valid_up_to()
        )
    })?;
    Ok(match text.strip_prefix('\u{feff}') {
        Some(rest) => rest.to_string(),
        None => text,
    })
}

/// A user-given key or value for an error message: control characters
/// escaped (one line) and cut after 60 characters.
pub fn one_line(s: &str) -> String {
    const KEEP: usize = 60;
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i == KEEP {
            out.push_str("...");
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}
