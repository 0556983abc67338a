//! Histograms and bar charts (the Chart types of `plot` for counts and
//! per-label values).
use super::plot::{bars_size, cartesian, padded_span, plot_err, render, Chart, PANEL_SIZE};
use anyhow::{bail, Context, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::path::Path;

/// A histogram of `values` in `bins` equal bins over `range` (default: the
/// values' min..max). Non-finite values and values outside the range are not
/// counted; the top edge belongs to the last bin.
pub fn histogram(
    path: &Path,
    title: &str,
    x_label: &str,
    values: &[f64],
    bins: usize,
    range: Option<(f64, f64)>,
) -> Result<()> {
    let hist = Histogram::new(title, x_label, values, bins, range)?;
    render(path, &hist)
}

/// Several histograms over one set of bins (the range spans every group's
/// values unless given), overlaid; each bar is its group's fraction of
/// values, so groups of different sizes compare.
pub fn histograms(
    path: &Path,
    title: &str,
    x_label: &str,
    groups: &[(String, Vec<f64>)],
    bins: usize,
    range: Option<(f64, f64)>,
) -> Result<()> {
    if groups.is_empty() {
        bail!("histogram {title:?}: no groups given");
    }
    let all: Vec<f64> = groups.iter().flat_map(|g| g.1.iter().copied()).collect();
    let range = match range {
        Some(r) => r,
        None => {
            let finite: Vec<f64> = all.into_iter().filter(|v| v.is_finite()).collect();
            if finite.is_empty() {
                bail!("histogram {title:?}: no finite values to count");
            }
            value_range(&finite)
        }
    };
    let mut hist = Histogram::new(title, x_label, &[range.0], bins, Some(range))?;
    hist.series = groups
        .iter()
        .map(|(name, v)| {
            let h = Histogram::new(title, x_label, v, bins, Some(range))
                .with_context(|| format!("group {name:?}"))?;
            Ok((name.clone(), h.counts))
        })
        .collect::<Result<_>>()?;
    render(path, &hist)
}

/// Horizontal bars, the first label on top (e.g. soft ratio by token).
pub fn bars(path: &Path, title: &str, labels: &[String], values: &[f64]) -> Result<()> {
    bars_noted(path, title, "value", labels, values, &[])
}

/// `bars` with an x-axis label and, when `notes` is not empty, a note at the
/// end of each bar (e.g. its count). Labels longer than `LABEL_CHARS` are cut.
pub fn bars_noted(
    path: &Path,
    title: &str,
    x_label: &str,
    labels: &[String],
    values: &[f64],
    notes: &[String],
) -> Result<()> {
    if labels.len() != values.len() {
        bail!("bars: {} labels for {} values", labels.len(), values.len());
    }
    if !notes.is_empty() && notes.len() != values.len() {
        bail!("bars: {} notes for {} values", notes.len(), values.len());
    }
    if values.is_empty() {
        bail!("bars: nothing to draw (no values)");
    }
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        bail!("bars: value {i} ({:?}) is not finite", labels[i]);
    }
    let labels: Vec<String> = labels.iter().map(|l| cut(l, LABEL_CHARS)).collect();
    render(
        path,
        &Bars {
            title,
            x_label,
            labels: &labels,
            values,
            notes,
        },
    )
}

/// Bar labels keep this many characters (the rest becomes "…").
pub const LABEL_CHARS: usize = 32;

fn cut(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        return s.to_string();
    }
    s.chars().take(n - 1).chain(['…']).collect()
}

/// A token's text as a label: quoted, whitespace and control characters
/// escaped, so ` the`, `the` and `\n` stay apart.
pub fn token_label(text: &str) -> String {
    let mut out = String::from("\"");
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Bin counts over [lo, hi).
pub(crate) struct Histogram<'a> {
    title: &'a str,
    x_label: &'a str,
    lo: f64,
    hi: f64,
    pub(crate) counts: Vec<u64>,
    /// Overlaid groups (`histograms`): drawn instead of `counts`, as fractions.
    series: Vec<(String, Vec<u64>)>,
}

impl<'a> Histogram<'a> {
    pub(crate) fn new(
        title: &'a str,
        x_label: &'a str,
        values: &[f64],
        bins: usize,
        range: Option<(f64, f64)>,
    ) -> Result<Self> {
        if bins == 0 {
            bail!("histogram {title:?}: bins must be >= 1");
        }
        let finite: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
        if finite.is_empty() {
            bail!("histogram {title:?}: no finite values to count");
        }
        let (lo, hi) = match range {
            Some((lo, hi)) if lo.is_finite() && hi.is_finite() && lo < hi => (lo, hi),
            Some((lo, hi)) => bail!("histogram {title:?}: range ({lo}, {hi}) is not lo < hi"),
            None => value_range(&finite),
        };
        let mut counts = vec![0u64; bins];
        let width = (hi - lo) / bins as f64;
        for v in finite.into_iter().filter(|v| (lo..=hi).contains(v)) {
            counts[(((v - lo) / width) as usize).min(bins - 1)] += 1;
        }
        Ok(Histogram {
            title,
            x_label,
            lo,
            hi,
            counts,
            series: Vec::new(),
        })
    }
}

/// min..max of non-empty finite values; a single value v gets v-0.5..v+0.5.
fn value_range(values: &[f64]) -> (f64, f64) {
    let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if lo < hi {
        (lo, hi)
    } else {
        (lo - 0.5, hi + 0.5)
    }
}

impl Chart for Histogram<'_> {
    fn size(&self) -> (u32, u32) {
        PANEL_SIZE
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()> {
        if !self.series.is_empty() {
            return self.draw_groups(root);
        }
        // An integer axis, so counts get integer ticks; 5% headroom above the top bar.
        let most = self.counts.iter().copied().max().unwrap_or(0).max(1);
        let top = most + most.div_ceil(20);
        let mut chart = cartesian(root, self.title, self.lo..self.hi, 0..top, 65)?;
        chart
            .configure_mesh()
            .x_desc(self.x_label)
            .y_desc("count")
            .draw()
            .map_err(plot_err)?;
        let width = (self.hi - self.lo) / self.counts.len() as f64;
        let fill = Palette99::pick(0).mix(0.7).filled();
        let rects = self.counts.iter().enumerate().map(|(b, &c)| {
            let x0 = self.lo + b as f64 * width;
            Rectangle::new([(x0, 0), (x0 + width, c)], fill)
        });
        chart.draw_series(rects).map_err(plot_err)?;
        Ok(())
    }
}

impl Histogram<'_> {
    /// Each group's bars as fractions of its values, translucent, with a legend.
    fn draw_groups<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()> {
        let fractions: Vec<(String, Vec<f64>)> = self
            .series
            .iter()
            .map(|(name, c)| {
                let total = c.iter().sum::<u64>().max(1) as f64;
                (name.clone(), c.iter().map(|&n| n as f64 / total).collect())
            })
            .collect();
        let most = fractions
            .iter()
            .flat_map(|f| f.1.iter().copied())
            .fold(0.0, f64::max);
        let top = if most > 0.0 { most * 1.05 } else { 1.0 };
        let mut chart = cartesian(root, self.title, self.lo..self.hi, 0.0..top, 65)?;
        chart
            .configure_mesh()
            .x_desc(self.x_label)
            .y_desc("fraction of values")
            .draw()
            .map_err(plot_err)?;
        let width = (self.hi - self.lo) / self.counts.len() as f64;
        for (k, (name, f)) in fractions.iter().enumerate() {
            let color = Palette99::pick(k).to_rgba();
            let rects = f.iter().enumerate().map(|(b, &v)| {
                let x0 = self.lo + b as f64 * width;
                Rectangle::new([(x0, 0.0), (x0 + width, v)], color.mix(0.45).filled())
            });
            chart
                .draw_series(rects)
                .map_err(plot_err)?
                .label(name.as_str())
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 6), (x + 16, y + 6)], color.filled())
                });
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(plot_err)?;
        Ok(())
    }
}

struct Bars<'a> {
    title: &'a str,
    x_label: &'a str,
    labels: &'a [String],
    values: &'a [f64],
    notes: &'a [String],
}

impl Chart for Bars<'_> {
    fn size(&self) -> (u32, u32) {
        bars_size(self.values.len())
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()> {
        let n = self.values.len();
        // Bars grow from 0, so the axis always shows 0.
        let (x0, mut x1) = padded_span(self.values.iter().copied().chain([0.0]));
        if !self.notes.is_empty() {
            x1 += (x1 - x0) * 0.15; // room for the notes
        }
        let widest = self
            .labels
            .iter()
            .map(|l| l.chars().count())
            .max()
            .unwrap_or(0);
        let label_width = (widest as u32 * 9 + 20).clamp(40, 320);
        // An integer range includes its end: rows 0..=n-1 are n segments.
        let rows = (0..n - 1).into_segmented();
        let mut chart = cartesian(root, self.title, x0..x1, rows, label_width)?;
        // Row r (0 at the bottom) shows bar n - 1 - r, so bar 0 is on top.
        let label = |v: &SegmentValue<usize>| match v {
            SegmentValue::CenterOf(r) if *r < n => self.labels[n - 1 - r].clone(),
            _ => String::new(),
        };
        chart
            .configure_mesh()
            .y_labels(n)
            .y_label_formatter(&label)
            .x_desc(self.x_label)
            .disable_y_mesh()
            .draw()
            .map_err(plot_err)?;
        let fill = Palette99::pick(0).mix(0.8).filled();
        let rects = self.values.iter().enumerate().map(|(i, &v)| {
            let r = n - 1 - i;
            let mut bar = Rectangle::new(
                [
                    (0.0, SegmentValue::Exact(r)),
                    (v, SegmentValue::Exact(r + 1)),
                ],
                fill,
            );
            bar.set_margin(4, 4, 0, 0);
            bar
        });
        chart.draw_series(rects).map_err(plot_err)?;
        let style = ("sans-serif", 14).into_font().color(&BLACK);
        let notes = self.notes.iter().enumerate().map(|(i, note)| {
            let at = (self.values[i].max(0.0), SegmentValue::CenterOf(n - 1 - i));
            let anchor = Pos::new(HPos::Left, VPos::Center);
            Text::new(format!(" {note}"), at, style.clone().pos(anchor))
        });
        chart.draw_series(notes).map_err(plot_err)?;
        Ok(())
    }
}
