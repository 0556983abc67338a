//! Frames from loosely typed rows (per-step metric maps, evaluation rows):
//! one column per key, its type inferred from every row.
use anyhow::{anyhow, bail, Result};
use polars::prelude::*;
use serde_json::{Map, Value};

/// The value types a loosely typed row may hold in a column.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Kind {
    Bool,
    Int,
    Float,
    Str,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Bool => "a bool",
            Kind::Int | Kind::Float => "a number",
            Kind::Str => "a string",
        }
    }

    /// Null -> None; arrays and objects have no column type.
    fn of(v: &Value) -> Result<Option<Kind>, &'static str> {
        Ok(Some(match v {
            Value::Null => return Ok(None),
            Value::Bool(_) => Kind::Bool,
            Value::Number(n) if n.is_i64() => Kind::Int,
            Value::Number(_) => Kind::Float,
            Value::String(_) => Kind::Str,
            Value::Array(_) => return Err("an array"),
            Value::Object(_) => return Err("an object"),
        }))
    }
}

/// A frame from loosely typed rows (e.g. per-step metric maps). Columns come
/// in order of first appearance; within one row, in the map's order, which is
/// alphabetical unless serde_json's `preserve_order` feature is on. A column
/// of JSON integers only (fitting i64) is i64; numbers that mix integers and
/// floats are f64; strings are str, bools are bool. A key missing from a row,
/// or null, is a null; a column of nulls only is f64. A column mixing kinds
/// (say a number and a string) is an error naming it and both rows.
pub fn frame_from_rows(rows: &[Map<String, Value>]) -> Result<DataFrame> {
    let mut names: Vec<&str> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for row in rows {
        for key in row.keys() {
            if seen.insert(key.as_str()) {
                names.push(key);
            }
        }
    }
    let columns = names
        .iter()
        .map(|name| Ok(build_column(rows, name, column_kind(rows, name)?)))
        .collect::<Result<Vec<_>>>()?;
    DataFrame::new(rows.len(), columns).map_err(|e| anyhow!("frame from rows: {e}"))
}

/// The kind of column `name` over all rows; integers and floats merge to Float.
fn column_kind(rows: &[Map<String, Value>], name: &str) -> Result<Kind> {
    let mut first: Option<(Kind, usize)> = None;
    for (i, row) in rows.iter().enumerate() {
        let Some(v) = row.get(name) else { continue };
        let kind = match Kind::of(v) {
            Ok(Some(k)) => k,
            Ok(None) => continue,
            Err(what) => bail!(
                "column {name:?}, row {i}: {what} (a column holds numbers, strings, bools or nulls)"
            ),
        };
        first = Some(match first {
            None => (kind, i),
            Some((k, at)) if k == kind => (k, at),
            Some((Kind::Int | Kind::Float, at)) if matches!(kind, Kind::Int | Kind::Float) => {
                (Kind::Float, at)
            }
            Some((k, at)) => bail!(
                "column {name:?} mixes types: {} at row {at}, {} at row {i}",
                k.name(),
                kind.name()
            ),
        });
    }
    Ok(first.map_or(Kind::Float, |(k, _)| k))
}

fn build_column(rows: &[Map<String, Value>], name: &str, kind: Kind) -> Column {
    let key = name;
    let name = name.into();
    match kind {
        Kind::Bool => {
            let v: Vec<Option<bool>> = rows.iter().map(|r| r.get(key)?.as_bool()).collect();
            Column::new(name, v)
        }
        Kind::Int => {
            let v: Vec<Option<i64>> = rows.iter().map(|r| r.get(key)?.as_i64()).collect();
            Column::new(name, v)
        }
        Kind::Float => {
            let v: Vec<Option<f64>> = rows.iter().map(|r| r.get(key)?.as_f64()).collect();
            Column::new(name, v)
        }
        Kind::Str => {
            let v: Vec<Option<&str>> = rows.iter().map(|r| r.get(key)?.as_str()).collect();
            Column::new(name, v)
        }
    }
}
