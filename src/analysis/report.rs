//! A run's report: one HTML page with its configuration, summary tables,
//! every chart (SVGs inlined, so the page stands alone; PNGs linked), and
//! highlighted completions.
use super::frame::column_strings;
use super::html::{escape, STYLE};
use anyhow::{bail, Context, Result};
use polars::prelude::DataFrame;
use serde_json::Value;
use std::fmt::Write;
use std::path::Path;

/// Rows a table shows at most (the rest is counted).
pub const TABLE_ROWS: usize = 50;

pub struct Report<'a> {
    pub title: &'a str,
    pub config: Option<&'a Value>,
    pub tables: &'a [(String, DataFrame)],
    /// Chart files, embedded in order.
    pub charts: &'a [String],
    /// Highlighted completions (html::blocks_html).
    pub text: Option<String>,
}

/// The page, for writing to `path` (PNG charts are linked relative to it).
pub fn report_html(r: &Report, path: &Path) -> Result<String> {
    let mut h = format!(
        "<!doctype html><meta charset=\"utf-8\"><title>{t}</title>\n<style>\
         body{{font-family:sans-serif;max-width:72em;margin:2em auto;padding:0 1em}}\
         table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:2px 8px;text-align:right}}\
         th{{background:#f0f0f0}}figure{{margin:1.5em 0}}figure svg,figure img{{max-width:100%;height:auto}}{STYLE}</style>\n\
         <h1>{t}</h1>\n",
        t = escape(r.title)
    );
    if let Some(cfg) = r.config {
        write!(
            h,
            "<h2>Configuration</h2>\n<pre>{}</pre>\n",
            escape(&serde_json::to_string_pretty(&brief(cfg))?)
        )?;
    }
    for (caption, df) in r.tables {
        write!(h, "<h2>{}</h2>\n{}", escape(caption), table_html(df)?)?;
    }
    if !r.charts.is_empty() {
        h.push_str("<h2>Charts</h2>\n");
    }
    for c in r.charts {
        h.push_str(&figure(c, path)?);
    }
    if let Some(t) = &r.text {
        write!(h, "<h2>Completions</h2>\n{}{t}", super::html::LEGEND)?;
    }
    Ok(h)
}

/// Arrays longer than 8 (an inline data set, say) shown as their length.
fn brief(v: &Value) -> Value {
    match v {
        Value::Array(a) if a.len() > 8 => Value::from(format!("[{} items]", a.len())),
        Value::Array(a) => Value::Array(a.iter().map(brief).collect()),
        Value::Object(m) => Value::Object(m.iter().map(|(k, v)| (k.clone(), brief(v))).collect()),
        other => other.clone(),
    }
}

/// An SVG inlined (its XML declaration dropped), a PNG linked relative to the page.
fn figure(chart: &str, page: &Path) -> Result<String> {
    let p = Path::new(chart);
    let ext = p.extension().and_then(|e| e.to_str()).unwrap_or("");
    let body = match ext.to_ascii_lowercase().as_str() {
        "svg" => {
            let svg = std::fs::read_to_string(p)
                .with_context(|| format!("report: cannot read chart {chart}"))?;
            match svg.find("<svg") {
                Some(i) => svg[i..].to_string(),
                None => bail!("report: {chart} is not an SVG file"),
            }
        }
        "png" => {
            if !p.is_file() {
                bail!("report: chart {chart} does not exist");
            }
            let src = relative(p, page.parent().unwrap_or(Path::new(".")));
            format!("<img src=\"{}\" alt=\"{}\">", escape(&src), escape(chart))
        }
        _ => bail!("report: chart {chart} is neither .svg nor .png"),
    };
    Ok(format!("<figure>{body}</figure>\n"))
}

/// `p` relative to `dir` when it lies under it, else as given.
fn relative(p: &Path, dir: &Path) -> String {
    let abs = |q: &Path| std::fs::canonicalize(q).unwrap_or_else(|_| q.to_path_buf());
    match abs(p).strip_prefix(abs(dir)) {
        Ok(rel) => rel.display().to_string(),
        Err(_) => p.display().to_string(),
    }
}

/// A frame as an HTML table: every column, the first `TABLE_ROWS` rows,
/// numbers to 4 significant digits.
pub fn table_html(df: &DataFrame) -> Result<String> {
    let names: Vec<String> = df
        .get_column_names()
        .iter()
        .map(|c| c.to_string())
        .collect();
    let mut h = String::from("<table><tr>");
    for n in &names {
        write!(h, "<th>{}</th>", escape(n))?;
    }
    h.push_str("</tr>\n");
    let shown = df.height().min(TABLE_ROWS);
    let cols: Vec<Vec<String>> = names
        .iter()
        .map(|n| cells(df, n, shown))
        .collect::<Result<_>>()?;
    for i in 0..shown {
        h.push_str("<tr>");
        for c in &cols {
            write!(h, "<td>{}</td>", escape(&c[i]))?;
        }
        h.push_str("</tr>\n");
    }
    h.push_str("</table>\n");
    if df.height() > shown {
        writeln!(h, "<p>{} of {} rows shown.</p>", shown, df.height())?;
    }
    Ok(h)
}

/// A column's first `n` cells as text.
fn cells(df: &DataFrame, name: &str, n: usize) -> Result<Vec<String>> {
    let head = df.head(Some(n));
    let col = head.column(name)?;
    if col.dtype().is_float() {
        let v = super::frame::column_f64(&head, name)?;
        return Ok(v
            .into_iter()
            .map(|x| x.map_or(String::new(), fmt_num))
            .collect());
    }
    Ok(column_strings(&head, name)?
        .into_iter()
        .map(Option::unwrap_or_default)
        .collect())
}

/// 4 significant digits, without exponent for ordinary sizes.
pub fn fmt_num(x: f64) -> String {
    if x == 0.0 || !x.is_finite() {
        return format!("{x}");
    }
    let mag = x.abs().log10().floor() as i32;
    if !(-4..6).contains(&mag) {
        return format!("{x:.3e}");
    }
    let decimals = (3 - mag).max(0) as usize;
    format!("{x:.decimals$}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use polars::prelude::*;

    #[test]
    fn numbers_keep_four_significant_digits() {
        assert_eq!(fmt_num(0.123456), "0.1235");
        assert_eq!(fmt_num(12.3456), "12.35");
        assert_eq!(fmt_num(12345.6), "12346");
        assert_eq!(fmt_num(1.5e-7), "1.500e-7");
        assert_eq!(fmt_num(0.0), "0");
    }

    #[test]
    fn tables_escape_and_count() {
        let df = df!("token" => ["<b>", " x"], "rate" => [0.5, 0.25]).unwrap();
        let h = table_html(&df).unwrap();
        assert!(h.contains("<td>&lt;b&gt;</td><td>0.5000</td>"), "{h}");
        let long = df!("i" => (0..60).collect::<Vec<i64>>()).unwrap();
        assert!(table_html(&long).unwrap().contains("50 of 60 rows shown"));
    }
}
