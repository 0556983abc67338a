//! Rule-based rewards that score one completion against a reference answer,
//! and their registry.
//!
//! | name           | 1.0 iff                                                        |
//! |----------------|----------------------------------------------------------------|
//! | `gsm8k`        | exactly one `####`, and the number after it equals the reference |
//! | `math`         | the last `\boxed{...}` equals the reference after normalisation |
//! | `format_gsm8k` | exactly one `####`, followed by a number                        |
//! | `format_math`  | a non-empty `\boxed{...}` (or `\boxed 5`, `\fbox{...}`) exists  |
//!
//! Every reward returns 0.0 or 1.0. The inputs are model-written text, so
//! nothing here panics, whatever the input (unbalanced braces, huge numbers,
//! unicode): malformed text simply scores 0.

use super::math_answer::math_equiv;
pub use super::math_answer::{last_boxed, normalize_math};
use anyhow::Result;

/// One reward: `(completion, reference) -> reward`.
pub type RewardFn = fn(&str, &str) -> f64;

/// The reward registry: `(name, function)`. Names are unique (tested).
pub const REWARDS: &[(&str, RewardFn)] = &[
    ("gsm8k", gsm8k),
    ("math", math),
    ("format_gsm8k", format_gsm8k),
    ("format_math", format_math),
];

/// Registered reward names, in table order.
pub fn names() -> Vec<&'static str> {
    super::registry::names(REWARDS)
}

/// Looks a reward up by name. Unknown names produce an error that names the
/// culprit and lists the valid names.
pub fn lookup(name: &str) -> Result<RewardFn> {
    super::registry::lookup(REWARDS, name, "reward")
}

/// The final answer a reward would read in `text`, normalised so that equal
/// answers compare equal (for majority voting): the number after `####`
/// (`gsm8k`, `format_gsm8k`), or the last `\boxed{}` normalised (`math`,
/// `format_math`). None when the text has none.
pub fn extract_answer(text: &str, reward: &str) -> Result<Option<String>> {
    Ok(match reward {
        "gsm8k" | "format_gsm8k" => parse_gsm8k_answer(text).map(|v| format!("{v}")),
        "math" | "format_math" => last_boxed(text).map(|b| normalize_math(&b)),
        other => anyhow::bail!(
            "extract_answer: no answer format for reward {other:?} (valid: gsm8k, math)"
        ),
    })
}

fn score(ok: bool) -> f64 {
    if ok {
        1.0
    } else {
        0.0
    }
}

/// Equal up to a relative 1e-6, so "2.50" matches "2.5" and float noise in
/// `\frac{1}{3}` vs `1/3` does not matter.
pub(crate) fn close(a: f64, b: f64) -> bool {
    a == b || (a - b).abs() <= 1e-6 * a.abs().max(b.abs())
}

// ---------------------------------------------------------------- GSM8K

const GSM8K_MARKER: &str = "####";

/// GSM8K reward: 1.0 iff `completion` holds exactly one `####` and the number
/// right after it equals `reference` numerically. The reference is a bare
/// number ("72", "1,234", "-3.5") or a full GSM8K solution ending in `#### 72`.
pub fn gsm8k(completion: &str, reference: &str) -> f64 {
    let reference = if reference.contains(GSM8K_MARKER) {
        parse_gsm8k_answer(reference)
    } else {
        scan_number(reference.trim_start()).map(|(v, _)| v)
    };
    score(matches!(
        (parse_gsm8k_answer(completion), reference),
        (Some(a), Some(b)) if close(a, b)
    ))
}

/// Format-only GSM8K reward: 1.0 iff exactly one `####` followed by a number.
pub fn format_gsm8k(completion: &str, _reference: &str) -> f64 {
    score(parse_gsm8k_answer(completion).is_some())
}

/// The final answer of a GSM8K-style text: the number right after its only
/// `####` (leading whitespace, `$` and a sign allowed; `1,000` is 1000; a
/// trailing period is ignored). None with zero or several markers, or when no
/// number follows the marker.
pub fn parse_gsm8k_answer(text: &str) -> Option<f64> {
    let mut parts = text.split(GSM8K_MARKER);
    let (_, after, extra) = (parts.next(), parts.next()?, parts.next());
    if extra.is_some() {
        return None;
    }
    scan_number(after.trim_start()).map(|(v, _)| v)
}

/// Scans a number at the start of `s` and returns it with the bytes it spans.
/// Accepted: an optional sign and `$` in either order ("-$3", "$-3"), digits
/// with thousands commas, an optional decimal part (".5" too). A comma is a
/// thousands separator only when exactly three digits follow it, so
/// "1,000" is 1000 but "3,4" is 3. Commas are dropped before parsing.
fn scan_number(s: &str) -> Option<(f64, usize)> {
    let b = s.as_bytes();
    let digit_at = |i: usize| b.get(i).is_some_and(u8::is_ascii_digit);
    let (mut i, mut neg, mut signed, mut dollar) = (0, false, false, false);
    loop {
        let rest = &s[i..];
        if !signed && (rest.starts_with('-') || rest.starts_with('+')) {
            (neg, signed, i) = (rest.starts_with('-'), true, i + 1);
        } else if !signed && rest.starts_with('\u{2212}') {
            // U+2212 MINUS SIGN, which models sometimes emit.
            (neg, signed, i) = (true, true, i + '\u{2212}'.len_utf8());
        } else if !dollar && rest.starts_with('$') {
            (dollar, i) = (true, i + 1);
        } else {
            break;
        }
    }
    let mut digits = String::new();
    let start = i;
    while digit_at(i) {
        i += 1;
    }
    digits.push_str(&s[start..i]);
    while i > start
        && b.get(i) == Some(&b',')
        && (1..=3).all(|k| digit_at(i + k))
        && !digit_at(i + 4)
    {
        digits.push_str(&s[i + 1..i + 4]);
        i += 4;
    }
    if b.get(i) == Some(&b'.') && digit_at(i + 1) {
        let frac = i;
        i += 1;
        while digit_at(i) {
            i += 1;
        }
        digits.push_str(&s[frac..i]);
    }
    if digits.is_empty() {
        return None;
    }
    let v: f64 = digits.parse().ok()?;
    let v = if neg { -v } else { v };
    // 400 nines parse to infinity: refuse rather than compare infinities.
    v.is_finite().then_some((v, i))
}

/// `s` read as one number and nothing else.
pub(crate) fn whole_number(s: &str) -> Option<f64> {
    scan_number(s).and_then(|(v, n)| (n == s.len()).then_some(v))
}

// ----------------------------------------------------------------- MATH

/// MATH reward: 1.0 iff the last `\boxed{...}` of `completion` equals the
/// reference after [`normalize_math`], as strings or as numbers. A reference
/// that itself contains `\boxed{...}` is compared by its boxed part.
pub fn math(completion: &str, reference: &str) -> f64 {
    let Some(answer) = last_boxed(completion) else {
        return 0.0;
    };
    let reference = last_boxed(reference).unwrap_or_else(|| reference.to_string());
    score(math_equiv(&answer, &reference))
}

/// Format-only MATH reward: 1.0 iff a boxed answer can be extracted.
pub fn format_math(completion: &str, _reference: &str) -> f64 {
    score(last_boxed(completion).is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gsm8k_scores_the_number_after_the_only_marker() {
        assert_eq!(gsm8k("She has 3 + 15 = 18.\n#### 18", "18"), 1.0);
        assert_eq!(gsm8k("#### 17", "18"), 0.0);
        assert_eq!(gsm8k("#### 18\n#### 18", "18"), 0.0, "two markers");
        assert_eq!(gsm8k("The answer is 18.", "18"), 0.0, "no marker");
        assert_eq!(gsm8k("#### no idea", "5"), 0.0);
        assert_eq!(gsm8k("####", "5"), 0.0);
        assert_eq!(gsm8k("#### .", "0"), 0.0);
        // A full GSM8K solution as the reference.
        assert_eq!(gsm8k("#### 72", "48 + 24 = 72\n#### 72"), 1.0);
    }

    #[test]
    fn gsm8k_number_forms() {
        assert_eq!(gsm8k("#### 1,000", "1000"), 1.0);
        assert_eq!(gsm8k("#### 1000", "1,000"), 1.0);
        assert_eq!(
            gsm8k("#### 1,000", "1"),
            0.0,
            "commas are stripped before parsing"
        );
        assert_eq!(gsm8k("#### $72.", "72"), 1.0);
        assert_eq!(gsm8k("####72", "72"), 1.0);
        assert_eq!(gsm8k("#### -3.5", "-3.5"), 1.0);
        assert_eq!(gsm8k("#### -3", "3"), 0.0);
        assert_eq!(gsm8k("#### 2.50", "2.5"), 1.0);
        assert_eq!(gsm8k("#### 0.25", ".25"), 1.0);
        assert_eq!(gsm8k("#### 3.14", "3.15"), 0.0);
        assert_eq!(gsm8k("#### 1,234", "1,234"), 1.0);
    }

    #[test]
    fn parse_gsm8k_answer_values() {
        assert_eq!(
            parse_gsm8k_answer("#### 1,234,567.5 apples"),
            Some(1_234_567.5)
        );
        assert_eq!(
            parse_gsm8k_answer("#### 12,34"),
            Some(12.0),
            "not a thousands group"
        );
        assert_eq!(parse_gsm8k_answer("#### -$5"), Some(-5.0));
        assert_eq!(parse_gsm8k_answer("#### $-5"), Some(-5.0));
        assert_eq!(parse_gsm8k_answer("####\n  +7"), Some(7.0));
        assert_eq!(parse_gsm8k_answer("#### \u{2212}7"), Some(-7.0));
        assert_eq!(parse_gsm8k_answer("#### x = 7"), None);
        assert_eq!(parse_gsm8k_answer("7"), None);
        assert_eq!(
            parse_gsm8k_answer(&format!("#### {}", "9".repeat(400))),
            None
        );
    }

    #[test]
    fn last_boxed_extraction() {
        let boxed = |s: &str| last_boxed(s);
        assert_eq!(
            boxed("so \\boxed{\\frac{1}{2}}.").as_deref(),
            Some("\\frac{1}{2}")
        );
        assert_eq!(boxed("\\boxed{3} wait, \\boxed{4}").as_deref(), Some("4"));
        assert_eq!(boxed("$\\boxed 5$").as_deref(), Some("5"));
        assert_eq!(boxed("\\fbox{7}").as_deref(), Some("7"));
        assert_eq!(boxed("\\boxed{\\{1,2\\}}").as_deref(), Some("\\{1,2\\}"));
        assert_eq!(boxed("\\boxed{}"), None);
        assert_eq!(boxed("\\boxed{\\frac{1}{2}"), None);
        assert_eq!(
            boxed("\\boxed{5} and then \\boxed{"),
            None,
            "last box decides"
        );
        assert_eq!(boxed("no box"), None);
    }

    #[test]
    fn normalize_math_forms() {
        let cases = [
            ("\\left( 3, \\frac12 \\right)", "(3,\\frac{1}{2})"),
            ("\\dfrac{1}{2}", "\\frac{1}{2}"),
            ("\\tfrac\\pi2", "\\frac{\\pi}{2}"),
            ("\\frac{\\frac12}{3}", "\\frac{\\frac{1}{2}}{3}"),
            ("2\\sqrt2", "2\\sqrt{2}"),
            ("\\sqrt[3]{2}", "\\sqrt[3]{2}"),
            ("90^\\circ", "90"),
            ("90^{\\circ}", "90"),
            ("50\\%", "50"),
            ("\\$10.50", "10.50"),
            ("$x = 5$.", "5"),
            (".5", "0.5"),
            ("(-.5, 1)", "(-0.5,1)"),
            ("3/4", "\\frac{3}{4}"),
            ("10,\\!000", "10,000"),
            ("5\\text{ cm}", "5"),
            ("3 \\mbox{ m}^2", "3"),
            ("\\text{(B)}", "(B)"),
            ("\\text{A}, \\text{B}", "A,B"),
            ("y = 2x + 3", "2x+3"),
        ];
        for (input, want) in cases {
            assert_eq!(normalize_math(input), want, "input {input:?}");
        }
    }

    #[test]
    fn math_reward() {
        assert_eq!(math("so \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"), 1.0);
        assert_eq!(math("\\boxed{3} no wait \\boxed{4}", "4"), 1.0);
        assert_eq!(math("\\boxed{3} no wait \\boxed{4}", "3"), 0.0);
        assert_eq!(math("\\boxed{\\dfrac{1}{2}}", "\\frac12"), 1.0);
        assert_eq!(math("\\boxed{0.5}", "\\frac{1}{2}"), 1.0);
        assert_eq!(math("\\boxed{.5}", "1/2"), 1.0);
        assert_eq!(math("\\boxed{-\\frac{3}{4}}", "-0.75"), 1.0);
        assert_eq!(math("\\boxed{5\\text{ cm}}", "5"), 1.0);
        assert_eq!(math("\\boxed{\\text{(B)}}", "(B)"), 1.0);
        assert_eq!(math("\\boxed{x = 5}", "5"), 1.0);
        assert_eq!(math("\\boxed{10,\\!000}", "10000"), 1.0);
        assert_eq!(
            math("\\boxed{\\sqrt2}", "The answer is $\\boxed{\\sqrt{2}}$."),
            1.0
        );
        assert_eq!(math("\\boxed{0.333}", "\\frac{1}{3}"), 0.0);
        assert_eq!(math("\\boxed{1,2}", "12"), 0.0);
        assert_eq!(
            math("\\boxed{\\frac{1}{2}", "\\frac{1}{2}"),
            0.0,
            "unbalanced"
        );
        assert_eq!(math("1/2", "1/2"), 0.0, "no box");
        assert_eq!(math("\\boxed{5}", ""), 0.0);
    }

    #[test]
    fn format_rewards() {
        assert_eq!(format_gsm8k("#### 42", ""), 1.0);
        assert_eq!(format_gsm8k("#### 42 #### 43", ""), 0.0);
        assert_eq!(format_gsm8k("#### forty-two", ""), 0.0);
        assert_eq!(format_gsm8k("42", ""), 0.0);
        assert_eq!(format_math("\\boxed{anything}", ""), 1.0);
        assert_eq!(format_math("\\boxed 7", ""), 1.0);
        assert_eq!(format_math("\\boxed{", ""), 0.0);
        assert_eq!(format_math("\\boxed{ }", ""), 0.0);
        assert_eq!(format_math("#### 42", ""), 0.0);
    }

    #[test]
    fn nothing_panics_on_malformed_text() {
        let deep = format!(
            "\\boxed{{{}1{}}}",
            "\\frac{".repeat(2000),
            "}{2}".repeat(2000)
        );
        let nasty = [
            "",
            "\\",
            "{",
            "}",
            "#",
            "####",
            "#### -",
            "#### $",
            "#### ,000",
            "\\boxed",
            "\\boxed{{{{",
            "\\boxed{}}}}",
            "\\frac",
            "\\frac{",
            "\\sqrt[",
            "\\text{",
            "x=",
            "=",
            "/",
            "-",
            "\\boxed{1/0}",
            "\\boxed{\\frac{1}{0}}",
            "é\\boxed{ü}ß",
            "\\boxed 🙂",
            "#### 🙂",
            "\\boxed{\\text{\\text{a}}}",
            "\\frac\\",
            "\\sqrt\\",
            "\\boxed{\\}",
        ];
        let huge = format!("#### {} \\boxed{{{}}}", "9".repeat(400), "9".repeat(400));
        for text in nasty.iter().copied().chain([deep.as_str(), huge.as_str()]) {
            for (name, reward) in REWARDS {
                for (c, r) in [(text, text), (text, "1"), ("1", text)] {
                    let v = reward(c, r);
                    assert!(v == 0.0 || v == 1.0, "{name}({c:?}, {r:?}) = {v}");
                }
            }
            let _ = normalize_math(text);
        }
        assert_eq!(math(&deep, "1"), 0.0);
    }

    #[test]
    fn registry() {
        assert_eq!(names(), ["gsm8k", "math", "format_gsm8k", "format_math"]);
        for name in names() {
            assert!(lookup(name).is_ok(), "{name}");
        }
        let via_table = lookup("gsm8k").map(|f| f("#### 1,000", "1000"));
        assert_eq!(via_table.ok(), Some(1.0));
        let err = lookup("gsm8").err().map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some("unknown reward \"gsm8\" (valid: gsm8k, math, format_gsm8k, format_math)")
        );
    }

    #[test]
    fn registry_names_are_unique() {
        let mut seen = names();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), REWARDS.len());
    }
}
