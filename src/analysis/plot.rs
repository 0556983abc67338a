//! Charts with Plotters: line charts (one or several panels), histograms and
//! bar charts, drawn to `.png` or `.svg` as the file extension says. A chart
//! is drawn to a temporary file beside the target and renamed into place, so
//! a failed chart never leaves a half-drawn file under the real name.
//!
//! Sizes in pixels: a line panel is `PANEL_SIZE` (panels sit side by side),
//! a histogram `PANEL_SIZE`, a bar chart `bars_size(number of bars)`.
use super::font;
use super::frame::{column_f64, column_strings, temp_sibling};
pub use super::plot_bars::{bars, histogram};
pub use super::plot_panel::{smoothed, SMOOTH_FROM};
use super::plot_panel::{Panel, Panels};
use anyhow::{anyhow, bail, Context, Result};
use plotters::coord::ranged1d::AsRangedCoord;
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;
use polars::prelude::DataFrame;
use std::collections::BTreeMap;
use std::path::Path;

/// A named series of (x, y) points.
pub type Line = (String, Vec<(f64, f64)>);

/// Per bucket of positions: (soft rows, rows).
type BucketCounts = BTreeMap<u64, (u64, u64)>;

/// Width and height of one line panel, and of a histogram.
pub const PANEL_SIZE: (u32, u32) = (900, 600);

/// A bar chart's size: a fixed width, and a height that fits `n` bars.
pub fn bars_size(n: usize) -> (u32, u32) {
    (900, 120 + 28 * n.max(1) as u32)
}

/// Several series (name, (x, y) points) overlaid, with a legend. Non-finite
/// points are skipped.
pub fn lines(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Line],
) -> Result<()> {
    let panel = Panel::new(title, x_label, y_label, series.to_vec())?;
    render(path, &Panels(vec![panel]))
}

/// Soft ratio vs step and reward vs step, side by side, one line per run.
/// Each frame is a per-step metric frame with columns `step`, `soft_ratio`
/// and `reward` (rows with a null are skipped).
pub fn soft_ratio_over_steps(path: &Path, runs: &[(String, DataFrame)]) -> Result<()> {
    if runs.is_empty() {
        bail!("soft_ratio_over_steps: no runs given");
    }
    let mut soft = Vec::with_capacity(runs.len());
    let mut reward = Vec::with_capacity(runs.len());
    for (name, df) in runs {
        let xy = |y: &str| {
            xy_points(df, "step", y).with_context(|| format!("soft_ratio_over_steps: run {name:?}"))
        };
        soft.push((name.clone(), xy("soft_ratio")?));
        reward.push((name.clone(), xy("reward")?));
    }
    let panels = vec![
        Panel::new("soft ratio", "step", "soft ratio", soft)?,
        Panel::new("reward", "step", "reward", reward)?,
    ];
    render(path, &Panels(panels))
}

/// One metric column over steps, one line per run (per-step metric frames).
pub fn metric_over_steps(path: &Path, runs: &[(String, DataFrame)], column: &str) -> Result<()> {
    let mut series = Vec::with_capacity(runs.len());
    for (name, df) in runs {
        let pts = xy_points(df, "step", column).with_context(|| format!("run {name:?}"))?;
        series.push((name.clone(), pts));
    }
    lines(path, column, "step", column, &series)
}

/// (x, y) pairs of two frame columns, rows with a null in either dropped.
fn xy_points(df: &DataFrame, x: &str, y: &str) -> Result<Vec<(f64, f64)>> {
    let (xs, ys) = (column_f64(df, x)?, column_f64(df, y)?);
    Ok(xs
        .into_iter()
        .zip(ys)
        .filter_map(|(x, y)| Some((x?, y?)))
        .collect())
}

/// Mean soft fraction (rows with mode "soft" / all rows) per bucket of
/// `bucket` positions, from a routing frame (columns `position`, `mode`).
/// With a `run` column, one line per run.
pub fn soft_by_position(path: &Path, frame: &DataFrame, bucket: usize) -> Result<()> {
    if bucket == 0 {
        bail!("soft_by_position: bucket must be >= 1 position");
    }
    let series = soft_fraction_series(frame, bucket).context("soft_by_position")?;
    let x_label = format!("position (start of a bucket of {bucket})");
    let panel = Panel::new(
        "soft fraction by position",
        &x_label,
        "soft fraction",
        series,
    )?;
    render(path, &Panels(vec![panel]))
}

/// Per run (in order of first appearance), (bucket start, soft fraction).
fn soft_fraction_series(frame: &DataFrame, bucket: usize) -> Result<Vec<Line>> {
    let positions = column_f64(frame, "position")?;
    let modes = column_strings(frame, "mode")?;
    let has_run = frame.get_column_names().iter().any(|c| c.as_str() == "run");
    let runs = if has_run {
        column_strings(frame, "run")?
    } else {
        vec![None; frame.height()]
    };
    // run -> bucket -> (soft rows, rows)
    let mut counts: Vec<(String, BucketCounts)> = Vec::new();
    for (i, ((pos, mode), run)) in positions.iter().zip(&modes).zip(&runs).enumerate() {
        let (Some(pos), Some(mode)) = (pos, mode) else {
            continue;
        };
        let soft = match mode.as_str() {
            "soft" => 1,
            "hard" => 0,
            other => bail!("row {i}: mode {other:?} is neither \"hard\" nor \"soft\""),
        };
        if !(pos.is_finite() && *pos >= 0.0) {
            bail!("row {i}: position {pos} is not a position");
        }
        let name = run
            .as_deref()
            .unwrap_or(if has_run { "(null)" } else { "all" });
        let k = match counts.iter().position(|(r, _)| r == name) {
            Some(k) => k,
            None => {
                counts.push((name.to_string(), BTreeMap::new()));
                counts.len() - 1
            }
        };
        let cell = counts[k].1.entry(*pos as u64 / bucket as u64).or_default();
        *cell = (cell.0 + soft, cell.1 + 1);
    }
    Ok(counts
        .into_iter()
        .map(|(run, buckets)| {
            let points = buckets
                .into_iter()
                .map(|(b, (s, n))| ((b * bucket as u64) as f64, s as f64 / n as f64))
                .collect();
            (run, points)
        })
        .collect())
}

/// A chart that can draw itself on any Plotters backend.
pub(crate) trait Chart {
    fn size(&self) -> (u32, u32);
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()>;
}

#[derive(Clone, Copy)]
enum Format {
    Png,
    Svg,
}

impl Format {
    fn of(path: &Path) -> Result<Format> {
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        match ext.to_ascii_lowercase().as_str() {
            "png" => Ok(Format::Png),
            "svg" => Ok(Format::Svg),
            _ => bail!(
                "{}: unknown chart format {ext:?} (the file name must end in .png or .svg)",
                path.display()
            ),
        }
    }
}

/// Draws `chart` into `path` (format from the extension), parent directories
/// created, through a temporary file renamed into place.
pub(crate) fn render(path: &Path, chart: &impl Chart) -> Result<()> {
    let format = Format::of(path)?;
    font::ensure_registered()?;
    let tmp = temp_sibling(path)?;
    // The backends write `tmp` when dropped, inside draw_on: before the rename.
    let drawn = match format {
        Format::Png => draw_on(BitMapBackend::new(&tmp, chart.size()), chart),
        Format::Svg => draw_on(SVGBackend::new(&tmp, chart.size()), chart),
    };
    let done = drawn.and_then(|()| Ok(std::fs::rename(&tmp, path)?));
    if done.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    done.with_context(|| format!("{}: cannot draw the chart", path.display()))
}

fn draw_on<DB: DrawingBackend>(backend: DB, chart: &impl Chart) -> Result<()> {
    let root = backend.into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    chart.draw(&root)?;
    root.present().map_err(plot_err)?;
    Ok(())
}

/// Plotters' errors borrow the backend's error type; keep their message.
pub(crate) fn plot_err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("plotters: {e}")
}

/// A chart area with a title, an f64 x axis over `x` and the y axis `y`,
/// `y_labels` pixels wide for the y labels.
pub(crate) fn cartesian<'a, DB: DrawingBackend, Y: AsRangedCoord>(
    area: &'a DrawingArea<DB, Shift>,
    title: &str,
    x: std::ops::Range<f64>,
    y: Y,
    y_labels: u32,
) -> Result<ChartContext<'a, DB, Cartesian2d<RangedCoordf64, Y::CoordDescType>>> {
    ChartBuilder::on(area)
        .caption(title, ("sans-serif", 24))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(y_labels)
        .build_cartesian_2d(x, y)
        .map_err(plot_err)
}

/// min..max of finite values, widened by 5% (or by 0.5 when flat) so no
/// point sits on the frame. Empty input gives 0..1.
pub(crate) fn padded_span(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if lo > hi {
        return (0.0, 1.0);
    }
    let pad = if hi > lo { (hi - lo) * 0.05 } else { 0.5 };
    (lo - pad, hi + pad)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analysis::frame::frame_from_rows;
    use crate::analysis::frame::tests::scratch;
    use crate::analysis::plot_bars::Histogram;
    use serde_json::{Map, Value};

    /// Width and height from a PNG's IHDR chunk, after checking the signature.
    fn png_size(path: &Path) -> (u32, u32) {
        let bytes = std::fs::read(path).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{}", path.display());
        let be = |r: std::ops::Range<usize>| u32::from_be_bytes(bytes[r].try_into().unwrap());
        (be(16..20), be(20..24))
    }

    fn frame(json: &str) -> DataFrame {
        let rows: Vec<Map<String, Value>> = serde_json::from_str(json).unwrap();
        frame_from_rows(&rows).unwrap()
    }

    fn two_series() -> Vec<Line> {
        vec![
            ("a".into(), vec![(0.0, 1.0), (1.0, f64::NAN), (2.0, 3.0)]),
            ("b".into(), vec![(0.0, 2.0), (2.0, 0.5)]),
        ]
    }

    #[test]
    fn lines_png_and_svg() {
        let dir = scratch("lines");
        let png = dir.join("deep/dir/lines.png");
        lines(&png, "loss", "step", "loss", &two_series()).unwrap();
        assert_eq!(png_size(&png), PANEL_SIZE);
        let svg = dir.join("lines.svg");
        lines(&svg, "loss", "step", "loss", &two_series()).unwrap();
        let text = std::fs::read_to_string(&svg).unwrap();
        assert!(
            text.starts_with("<svg") && text.contains("loss"),
            "{text:.200}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn charts_refuse_bad_input() {
        let dir = scratch("bad");
        let err = lines(&dir.join("x.jpg"), "t", "x", "y", &two_series()).unwrap_err();
        assert!(format!("{err:#}").contains("\"jpg\""), "{err:#}");
        assert!(!dir.exists(), "a refused chart creates nothing");
        let err = lines(&dir.join("x.png"), "t", "x", "y", &[]).unwrap_err();
        assert!(format!("{err:#}").contains("no series"), "{err:#}");
        let nan = vec![("a".to_string(), vec![(0.0, f64::NAN)])];
        let err = lines(&dir.join("x.png"), "t", "x", "y", &nan).unwrap_err();
        assert!(
            format!("{err:#}").contains("every series is empty"),
            "{err:#}"
        );
        let err = histogram(&dir.join("h.png"), "h", "x", &[0.5], 0, None).unwrap_err();
        assert!(format!("{err:#}").contains("bins must be >= 1"), "{err:#}");
        let labels = vec!["a".to_string()];
        let err = bars(&dir.join("b.png"), "b", &labels, &[1.0, 2.0]).unwrap_err();
        assert!(
            format!("{err:#}").contains("1 labels for 2 values"),
            "{err:#}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn soft_ratio_over_steps_draws_two_panels() {
        let dir = scratch("soft_ratio");
        let a = frame(
            r#"[{"step": 0, "soft_ratio": 0.1, "reward": 0.0},
                          {"step": 1, "soft_ratio": 0.3, "reward": 0.5}]"#,
        );
        let b = frame(
            r#"[{"step": 0, "soft_ratio": 0.2, "reward": 0.1},
                          {"step": 1, "soft_ratio": null, "reward": 0.2}]"#,
        );
        let path = dir.join("soft.png");
        soft_ratio_over_steps(&path, &[("a".into(), a.clone()), ("b".into(), b)]).unwrap();
        assert_eq!(png_size(&path), (2 * PANEL_SIZE.0, PANEL_SIZE.1));
        let no_reward = frame(r#"[{"step": 0, "soft_ratio": 0.2}]"#);
        let runs = [("a".into(), a), ("base".into(), no_reward)];
        let err = soft_ratio_over_steps(&path, &runs).unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("run \"base\"") && msg.contains("no column \"reward\""),
            "{msg}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn histogram_and_bars_sizes() {
        let dir = scratch("hist");
        let values: Vec<f64> = (0..100).map(|i| i as f64 / 100.0).collect();
        let path = dir.join("p_soft.png");
        histogram(
            &path,
            "router p_soft",
            "p_soft",
            &values,
            20,
            Some((0.0, 1.0)),
        )
        .unwrap();
        assert_eq!(png_size(&path), PANEL_SIZE);
        let hist = Histogram::new(
            "h",
            "x",
            &[0.0, 0.1, 0.5, 1.0, 2.0, f64::NAN],
            2,
            Some((0.0, 1.0)),
        )
        .unwrap();
        assert_eq!(
            hist.counts,
            [2, 2],
            "2.0 is outside the range, NaN not counted"
        );
        let labels: Vec<String> = [" the", " so", "\\n"].map(String::from).to_vec();
        let path = dir.join("bars.png");
        bars(&path, "soft ratio by token", &labels, &[0.9, 0.5, -0.1]).unwrap();
        assert_eq!(png_size(&path), bars_size(3));
        // Degenerate inputs still draw: one bar, one value, one flat point.
        bars(&path, "one", &labels[..1], &[0.0]).unwrap();
        assert_eq!(png_size(&path), bars_size(1));
        histogram(&path, "one", "x", &[3.0], 4, None).unwrap();
        lines(&path, "flat", "x", "y", &[("p".into(), vec![(1.0, 1.0)])]).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn soft_by_position_buckets() {
        let df = frame(
            r#"[{"run": "a", "position": 0, "mode": "soft"},
                {"run": "a", "position": 1, "mode": "hard"},
                {"run": "a", "position": 2, "mode": "soft"},
                {"run": "a", "position": 3, "mode": "soft"},
                {"run": "b", "position": 0, "mode": "hard"}]"#,
        );
        let series = soft_fraction_series(&df, 2).unwrap();
        let want = vec![
            ("a".to_string(), vec![(0.0, 0.5), (2.0, 1.0)]),
            ("b".to_string(), vec![(0.0, 0.0)]),
        ];
        assert_eq!(series, want);
        let dir = scratch("position");
        let path = dir.join("position.png");
        soft_by_position(&path, &df, 2).unwrap();
        assert_eq!(png_size(&path), PANEL_SIZE);
        let no_mode = frame(r#"[{"position": 0}]"#);
        let err = soft_by_position(&path, &no_mode, 2).unwrap_err();
        assert!(format!("{err:#}").contains("no column \"mode\""), "{err:#}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Sample charts for the eye: `cargo test --release --lib gallery -- --ignored`
    /// writes them to $TMPDIR/tarpo-gallery.
    #[test]
    #[ignore]
    fn gallery() {
        let dir = std::env::temp_dir().join("tarpo-gallery");
        let curve = |k: f64| -> Vec<(f64, f64)> {
            (0..50)
                .map(|s| (s as f64, (1.0 - (-(s as f64) / (10.0 * k)).exp()) * 0.6))
                .collect()
        };
        let run = |k: f64| {
            let rows: Vec<Map<String, Value>> = curve(k)
                .into_iter()
                .map(|(s, y)| {
                    let v = serde_json::json!({"step": s as i64, "soft_ratio": y, "reward": 0.2 + y * 0.5});
                    v.as_object().unwrap().clone()
                })
                .collect();
            frame_from_rows(&rows).unwrap()
        };
        let series = vec![
            ("tarpo".to_string(), curve(1.0)),
            ("soft thinking".to_string(), curve(2.0)),
        ];
        lines(
            &dir.join("lines.png"),
            "soft ratio",
            "step",
            "soft ratio",
            &series,
        )
        .unwrap();
        lines(
            &dir.join("lines.svg"),
            "soft ratio",
            "step",
            "soft ratio",
            &series,
        )
        .unwrap();
        let runs = [
            ("tarpo".to_string(), run(1.0)),
            ("grpo".to_string(), run(3.0)),
        ];
        soft_ratio_over_steps(&dir.join("soft_ratio.png"), &runs).unwrap();
        let values: Vec<f64> = (0..1000)
            .map(|i| ((i * 7919) % 1000) as f64 / 1000.0)
            .map(|u: f64| u * u)
            .collect();
        histogram(
            &dir.join("p_soft.png"),
            "router p_soft",
            "p_soft",
            &values,
            25,
            Some((0.0, 1.0)),
        )
        .unwrap();
        let labels: Vec<String> = ["\" the\"", "\" so\"", "\"\\n\"", "\" therefore\""]
            .map(String::from)
            .to_vec();
        bars(
            &dir.join("bars.png"),
            "soft ratio by token",
            &labels,
            &[0.9, 0.5, 0.3, 0.1],
        )
        .unwrap();
        let rows: Vec<Map<String, Value>> = (0..200)
            .map(|i| {
                let mode = if (i * 37) % 100 < i / 2 {
                    "soft"
                } else {
                    "hard"
                };
                serde_json::json!({"run": "a", "position": i, "mode": mode})
                    .as_object()
                    .unwrap()
                    .clone()
            })
            .collect();
        soft_by_position(
            &dir.join("position.png"),
            &frame_from_rows(&rows).unwrap(),
            16,
        )
        .unwrap();
    }
}
