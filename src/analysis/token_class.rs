//! Token classes, for asking which kinds of token the router sends soft:
//! digits, operators, words, punctuation, whitespace, and "other" (special
//! tokens such as `<|im_end|>`, mixed pieces like `3x`, a Coconut thought).
use anyhow::{anyhow, Result};
use polars::prelude::*;

/// Every class, in the order charts list them.
pub const CLASSES: [&str; 6] = [
    "digits",
    "operators",
    "words",
    "punctuation",
    "whitespace",
    "other",
];

const OPERATORS: &str = "+-*/=<>^%×÷−·";

/// The class of a token's text. Surrounding whitespace does not count (` 12`
/// is digits); a number may carry a decimal point or separator (`3.5`, `1,000`).
pub fn token_class(text: &str) -> &'static str {
    let t = text.trim();
    if text.is_empty() {
        return "other";
    }
    if t.is_empty() {
        return "whitespace";
    }
    if t.starts_with("<|") && t.ends_with("|>") {
        return "other";
    }
    let all = |f: fn(char) -> bool| t.chars().all(f);
    if t.chars().any(|c| c.is_ascii_digit()) && all(|c| c.is_ascii_digit() || c == '.' || c == ',')
    {
        return "digits";
    }
    if all(|c| OPERATORS.contains(c)) {
        return "operators";
    }
    if all(|c| c.is_alphabetic() || c == '\'' || c == '-') && t.chars().any(char::is_alphabetic) {
        return "words";
    }
    if all(|c| c.is_ascii_punctuation() || "“”‘’…–—".contains(c)) {
        return "punctuation";
    }
    "other"
}

/// `df` with a `token_class` column computed from its `token` column (kept
/// as it is when the frame has one already, as routing frames do).
pub fn with_token_class(df: &DataFrame) -> Result<DataFrame> {
    if df.column("token_class").is_ok() {
        return Ok(df.clone());
    }
    let tokens = df
        .column("token")
        .map_err(|_| anyhow!("token_class: the frame has no `token` column"))?
        .str()
        .map_err(|e| anyhow!("token_class: column `token`: {e}"))?
        .clone();
    let classes: Vec<Option<&str>> = tokens.iter().map(|t| t.map(token_class)).collect();
    let mut out = df.clone();
    out.with_column(Column::new("token_class".into(), classes))
        .map_err(|e| anyhow!("token_class: {e}"))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_of_typical_tokens() {
        let cases = [
            (" 12", "digits"),
            ("3.5", "digits"),
            ("1,000", "digits"),
            (" +", "operators"),
            ("=", "operators"),
            (" apples", "words"),
            ("don't", "words"),
            (".", "punctuation"),
            (" ####", "punctuation"),
            ("\n", "whitespace"),
            ("  ", "whitespace"),
            ("<|im_end|>", "other"),
            ("3x", "other"),
            ("", "other"),
        ];
        for (text, want) in cases {
            assert_eq!(token_class(text), want, "{text:?}");
            assert!(CLASSES.contains(&want));
        }
    }

    #[test]
    fn column_added_from_tokens() {
        let df = df!("token" => [" 7", " cats", "?"]).unwrap();
        let out = with_token_class(&df).unwrap();
        let c: Vec<_> = out
            .column("token_class")
            .unwrap()
            .str()
            .unwrap()
            .iter()
            .map(|s| s.unwrap().to_string())
            .collect();
        assert_eq!(c, ["digits", "words", "punctuation"]);
        let err = with_token_class(&df!("x" => [1]).unwrap()).unwrap_err();
        assert!(err.to_string().contains("no `token` column"), "{err}");
    }
}
