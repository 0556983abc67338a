//! The lookup shared by every extension point (advantage estimators, KL
//! estimators, rewards): a const table of (name, function), one signature per
//! table, so adding an entry is one function plus one line.

/// Names of a table, in table order.
pub fn names<T>(table: &[(&'static str, T)]) -> Vec<&'static str> {
    table.iter().map(|(name, _)| *name).collect()
}

/// The entry called `name`; unknown names get an error naming the culprit and
/// listing the valid names, e.g. `unknown reward "gsm8" (valid: gsm8k, math)`.
pub fn lookup<T: Copy>(table: &[(&'static str, T)], name: &str, what: &str) -> anyhow::Result<T> {
    match table.iter().find(|(n, _)| *n == name) {
        Some((_, f)) => Ok(*f),
        None => anyhow::bail!(
            "unknown {what} {name:?} (valid: {})",
            names(table).join(", ")
        ),
    }
}
