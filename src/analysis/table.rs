//! A frame as a plain-text table for the REPL and `print`: aligned columns
//! under their names and types, long cells cut, the first and last rows of a
//! long frame, and its size. It does not depend on the terminal's width
//! (a pseudo-terminal may report none), so it reads the same everywhere.
use super::frame::{column_f64, column_strings};
use super::report::fmt_num;
use anyhow::Result;
use polars::prelude::DataFrame;

/// Rows shown at each end of a frame longer than twice this.
pub const END_ROWS: usize = 5;
/// Characters a cell keeps (the rest becomes "…").
pub const CELL_CHARS: usize = 24;
/// Columns shown at most (the first ones and the last, "…" between).
pub const MAX_COLUMNS: usize = 10;

fn cut(s: &str) -> String {
    let one_line = s.replace('\n', "\\n");
    if one_line.chars().count() <= CELL_CHARS {
        return one_line;
    }
    one_line.chars().take(CELL_CHARS - 1).chain(['…']).collect()
}

/// The rows shown: all, or the first and last `END_ROWS` (None marks the gap).
fn shown_rows(n: usize) -> Vec<Option<usize>> {
    if n <= 2 * END_ROWS {
        return (0..n).map(Some).collect();
    }
    (0..END_ROWS)
        .map(Some)
        .chain([None])
        .chain((n - END_ROWS..n).map(Some))
        .collect()
}

/// One column's header, type and shown cells.
fn column_cells(df: &DataFrame, name: &str, rows: &[Option<usize>]) -> Result<Vec<String>> {
    let dtype = df.column(name)?.dtype().clone();
    let values: Vec<String> = if dtype.is_float() {
        column_f64(df, name)?
            .into_iter()
            .map(|v| v.map_or("null".into(), fmt_num))
            .collect()
    } else {
        column_strings(df, name)?
            .into_iter()
            .map(|v| v.map_or("null".into(), |s| cut(&s)))
            .collect()
    };
    let mut cells = vec![cut(name), dtype.to_string()];
    cells.extend(
        rows.iter()
            .map(|r| r.map_or("…".into(), |i| values[i].clone())),
    );
    Ok(cells)
}

/// The table, ending with "N rows × M columns".
pub fn show(df: &DataFrame) -> Result<String> {
    let names: Vec<String> = df
        .get_column_names()
        .iter()
        .map(|c| c.to_string())
        .collect();
    let rows = shown_rows(df.height());
    let picked: Vec<Option<&String>> = if names.len() > MAX_COLUMNS {
        let head = &names[..MAX_COLUMNS - 1];
        head.iter().map(Some).chain([None, names.last()]).collect()
    } else {
        names.iter().map(Some).collect()
    };
    let cols: Vec<Vec<String>> = picked
        .iter()
        .map(|c| match c {
            Some(name) => column_cells(df, name, &rows),
            None => Ok(vec!["…".to_string(); rows.len() + 2]),
        })
        .collect::<Result<_>>()?;
    let widths: Vec<usize> = cols
        .iter()
        .map(|c| c.iter().map(|s| s.chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for line in 0..rows.len() + 2 {
        let cells: Vec<String> = cols
            .iter()
            .zip(&widths)
            .map(|(c, &w)| format!("{:<w$}", c[line]))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
        if line == 1 {
            let rule: Vec<String> = widths.iter().map(|&w| "─".repeat(w)).collect();
            out.push_str(&rule.join("  "));
            out.push('\n');
        }
    }
    let plural = |n: usize, what: &str| format!("{n} {what}{}", if n == 1 { "" } else { "s" });
    out.push_str(&format!(
        "{} × {}",
        plural(df.height(), "row"),
        plural(df.width(), "column")
    ));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use polars::prelude::*;

    #[test]
    fn short_frames_show_every_row_aligned() {
        let df = df!("run" => ["a", "bb"], "reward" => [0.5, 0.25]).unwrap();
        let t = show(&df).unwrap();
        let want =
            "run  reward\nstr  f64\n───  ──────\na    0.5000\nbb   0.2500\n2 rows × 2 columns";
        assert_eq!(t, want);
    }

    #[test]
    fn long_frames_keep_both_ends_and_cut_cells() {
        let long = "x".repeat(40);
        let df =
            df!("i" => (0..100).collect::<Vec<i64>>(), "s" => vec![long.as_str(); 100]).unwrap();
        let t = show(&df).unwrap();
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3 + 2 * END_ROWS + 1 + 1, "{t}");
        assert!(lines[3].starts_with("0 "), "{t}");
        assert!(lines[3 + END_ROWS].starts_with('…'), "{t}");
        assert!(lines[lines.len() - 2].starts_with("99"), "{t}");
        assert!(
            t.contains(&format!("{}…", "x".repeat(CELL_CHARS - 1))),
            "{t}"
        );
        assert!(t.ends_with("100 rows × 2 columns"));
    }

    #[test]
    fn wide_frames_elide_middle_columns() {
        let cols: Vec<Column> = (0..14)
            .map(|k| Column::new(format!("c{k}").into(), [k as i64]))
            .collect();
        let df = DataFrame::new(1, cols).unwrap();
        let t = show(&df).unwrap();
        let header = t.lines().next().unwrap();
        assert_eq!(
            header,
            "c0   c1   c2   c3   c4   c5   c6   c7   c8   …  c13"
        );
        assert!(t.ends_with("1 row × 14 columns"));
    }
}
