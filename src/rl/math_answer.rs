//! MATH answers: the argument of the last `\boxed{}` and the normalisation
//! under which two answers are equal (Hendrycks et al.'s `strip_string`).
//! Model-written text: nothing here panics, malformed input gives None.
use super::reward::{close, whole_number};

/// Commands whose argument is the final answer.
const BOX_COMMANDS: [&str; 2] = ["\\boxed", "\\fbox"];

/// The argument of the last `\boxed` or `\fbox` in `text`: a brace-matched
/// group (`\boxed{\frac{1}{2}}` gives `\frac{1}{2}`) or, after whitespace, a
/// single token (`\boxed 5` gives `5`). The last command decides: if its
/// group never closes (a truncated completion), or it is empty, the result is
/// None even when an earlier box is well formed.
pub fn last_boxed(text: &str) -> Option<String> {
    let end = BOX_COMMANDS
        .iter()
        .filter_map(|cmd| text.rfind(cmd).map(|i| i + cmd.len()))
        .max()?;
    let rest = &text[end..];
    let trimmed = rest.trim_start();
    let inner = if let Some(body) = trimmed.strip_prefix('{') {
        group_body(body)?.0
    } else if trimmed.len() < rest.len() {
        trimmed
            .split(|c: char| c.is_whitespace() || c == '$')
            .next()?
    } else {
        return None;
    };
    let inner = inner.trim();
    (!inner.is_empty()).then(|| inner.to_string())
}

/// Splits `s`, which follows an opening `{`, into the group's body and the
/// text after its closing `}`. Escaped braces `\{` `\}` do not count. None if
/// the group never closes.
fn group_body(s: &str) -> Option<(&str, &str)> {
    let (mut depth, mut escaped) = (1usize, false);
    for (i, c) in s.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some((&s[..i], &s[i + 1..]));
                }
            }
            _ => {}
        }
    }
    None
}

pub(crate) fn math_equiv(answer: &str, reference: &str) -> bool {
    let (a, b) = (normalize_math(answer), normalize_math(reference));
    if a.is_empty() || b.is_empty() {
        return false;
    }
    a == b || matches!((math_number(&a), math_number(&b)), (Some(x), Some(y)) if close(x, y))
}

/// Canonical form of a MATH answer, after Hendrycks et al.'s `strip_string`
/// (<https://github.com/hendrycks/math>, `modeling/math_equivalence.py`):
/// drops whitespace, `\left`/`\right`, thin spaces, `$`, degrees, percent,
/// trailing periods, a trailing unit `\text{...}` and a leading `x =`; unwraps
/// remaining `\text{...}`; writes `dfrac`/`tfrac` as `frac`, `\frac12` as
/// `\frac{1}{2}`, `\sqrt2` as `\sqrt{2}`, `.5` as `0.5` and `3/4` as
/// `\frac{3}{4}`.
pub fn normalize_math(s: &str) -> String {
    let mut s = s.replace("\\\\", "\\");
    // Thin spaces and `\ ` go before whitespace, or `\ x` would become `\x`.
    for junk in ["\\!", "\\,", "\\;", "\\:", "\\ "] {
        s = s.replace(junk, "");
    }
    s.retain(|c| !c.is_whitespace());
    s = s.replace("tfrac", "frac").replace("dfrac", "frac");
    // `\$` and `\%` before `$` and `%`, or a lone `\` would be left behind.
    for junk in [
        "\\left",
        "\\right",
        "^{\\circ}",
        "^\\circ",
        "\\$",
        "$",
        "\\%",
        "%",
    ] {
        s = s.replace(junk, "");
    }
    let s = drop_unit(s.trim_end_matches('.'));
    let s = unwrap_text(s);
    let s = drop_assignment(s.trim_end_matches('.'));
    let s = brace_args(s, "\\frac", 2);
    let s = brace_args(&s, "\\sqrt", 1);
    slash_to_frac(&leading_zeros(&s))
}

/// `\text{...}`-like commands, with their opening brace.
const TEXT_COMMANDS: [&str; 3] = ["\\text{", "\\textrm{", "\\mbox{"];

/// Drops a trailing unit, `5\text{cm}` or `3\mbox{m}^2`: a last text group
/// after a non-text answer. `\text{(A)}` alone, or `\text{A},\text{B}`, stay.
fn drop_unit(s: &str) -> &str {
    let Some((pos, cmd)) = TEXT_COMMANDS
        .iter()
        .filter_map(|cmd| s.rfind(cmd).map(|i| (i, cmd)))
        .max()
    else {
        return s;
    };
    let (prefix, after) = (&s[..pos], &s[pos + cmd.len()..]);
    let is_unit =
        group_body(after).is_some_and(|(_, rest)| ["", "^2", "^3", "^{2}", "^{3}"].contains(&rest));
    let prefix_is_text = TEXT_COMMANDS.iter().any(|c| prefix.contains(c));
    if is_unit && !prefix.is_empty() && !prefix_is_text {
        prefix
    } else {
        s
    }
}

/// Replaces each outermost well-formed `\text{X}` by X.
fn unwrap_text(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some((pos, cmd)) = TEXT_COMMANDS
        .iter()
        .filter_map(|cmd| rest.find(cmd).map(|i| (i, cmd)))
        .min()
    {
        let Some((body, tail)) = group_body(&rest[pos + cmd.len()..]) else {
            break;
        };
        out.push_str(&rest[..pos]);
        out.push_str(body);
        rest = tail;
    }
    out.push_str(rest);
    out
}

/// `x=5` -> `5`: a single `=` after a one- or two-character variable name.
fn drop_assignment(s: &str) -> &str {
    match s.split_once('=') {
        Some((lhs, rhs))
            if !rhs.contains('=')
                && (1..=2).contains(&lhs.len())
                && lhs.starts_with(|c: char| c.is_ascii_alphabetic())
                && lhs.chars().all(|c| c.is_ascii_alphanumeric()) =>
        {
            rhs
        }
        _ => s,
    }
}

/// Braces the bare arguments of every `cmd` (`\frac12` -> `\frac{1}{2}`,
/// `\frac\pi2` -> `\frac{\pi}{2}`), nested ones included. Works by recording
/// insertions rather than recursing, so deep nesting cannot overflow the stack.
fn brace_args(s: &str, cmd: &str, nargs: usize) -> String {
    let mut wraps: Vec<(usize, usize)> = Vec::new(); // byte ranges to brace
    for (pos, _) in s.match_indices(cmd) {
        let mut at = pos + cmd.len();
        for _ in 0..nargs {
            match arg_len(&s[at..]) {
                Some((len, true)) => at += len,
                Some((len, false)) => {
                    wraps.push((at, at + len));
                    at += len;
                }
                None => break,
            }
        }
    }
    wraps.sort_unstable();
    let mut out = String::with_capacity(s.len() + 2 * wraps.len());
    let mut done = 0;
    for (a, b) in wraps {
        if a < done {
            continue; // overlaps a wrap already made (malformed input)
        }
        out.push_str(&s[done..a]);
        out.push('{');
        out.push_str(&s[a..b]);
        out.push('}');
        done = b;
    }
    out.push_str(&s[done..]);
    out
}

/// Byte length of the LaTeX argument at the start of `s`, and whether it is
/// braced: a `{...}` group, a `\command`, or one character. None where no
/// plain argument starts (end of text, `[` of `\sqrt[3]`, unbalanced group).
fn arg_len(s: &str) -> Option<(usize, bool)> {
    let c = s.chars().next()?;
    match c {
        '{' => group_body(&s[1..]).map(|(body, _)| (body.len() + 2, true)),
        '\\' => {
            let name = s[1..]
                .find(|c: char| !c.is_ascii_alphabetic())
                .unwrap_or(s.len() - 1);
            (name > 0).then_some((name + 1, false))
        }
        '[' | '}' | '^' | '_' => None,
        _ => Some((c.len_utf8(), false)),
    }
}

/// `.5` -> `0.5` wherever a decimal point starts a number.
fn leading_zeros(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    let mut prev: Option<char> = None;
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        let starts_number = c == '.' && chars.peek().is_some_and(char::is_ascii_digit);
        if starts_number && !prev.is_some_and(|p| p.is_ascii_digit()) {
            out.push('0');
        }
        out.push(c);
        prev = Some(c);
    }
    out
}

/// A whole answer `a/b` of integers becomes `\frac{a}{b}`, as in the dataset.
fn slash_to_frac(s: &str) -> String {
    let is_int = |t: &str| {
        let t = t.strip_prefix('-').unwrap_or(t);
        !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit())
    };
    match s.split_once('/') {
        Some((a, b)) if is_int(a) && is_int(b) => format!("\\frac{{{a}}}{{{b}}}"),
        _ => s.to_string(),
    }
}

/// A normalised answer read as a number: a decimal, `\frac{a}{b}` or `a/b`
/// with decimal parts, optionally negated. None for anything else or a
/// non-finite value (`\frac{1}{0}`).
fn math_number(s: &str) -> Option<f64> {
    if let Some(v) = whole_number(s) {
        return Some(v);
    }
    let (neg, body) = match s.strip_prefix('-') {
        Some(body) => (true, body),
        None => (false, s),
    };
    let (num, den) = match body.strip_prefix("\\frac{") {
        Some(args) => {
            let (num, rest) = group_body(args)?;
            (num, rest.strip_prefix('{')?.strip_suffix('}')?)
        }
        None => body.split_once('/')?,
    };
    let v = whole_number(num)? / whole_number(den)?;
    let v = if neg { -v } else { v };
    v.is_finite().then_some(v)
}
