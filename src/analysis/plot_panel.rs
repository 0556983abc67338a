//! Line panels: finite series on shared axes, long noisy ones as faint
//! points under their running mean, a legend only for several series, and
//! integer ticks for integer x values; several panels side by side.
use super::plot::{cartesian, padded_span, plot_err, Chart, Line, PANEL_SIZE};
use anyhow::{bail, Result};
use plotters::coord::Shift;
use plotters::prelude::*;

/// One line chart: finite points only, at least one of them.
pub(crate) struct Panel {
    title: String,
    x_label: String,
    y_label: String,
    series: Vec<Line>,
}

impl Panel {
    pub(crate) fn new(
        title: &str,
        x_label: &str,
        y_label: &str,
        mut series: Vec<Line>,
    ) -> Result<Panel> {
        if series.is_empty() {
            bail!("chart {title:?}: no series given");
        }
        for (_, points) in &mut series {
            points.retain(|(x, y)| x.is_finite() && y.is_finite());
        }
        if series.iter().all(|(_, p)| p.is_empty()) {
            bail!("chart {title:?}: every series is empty (or has no finite points)");
        }
        Ok(Panel {
            title: title.into(),
            x_label: x_label.into(),
            y_label: y_label.into(),
            series,
        })
    }

    fn draw<DB: DrawingBackend>(&self, area: &DrawingArea<DB, Shift>) -> Result<()> {
        let points = || self.series.iter().flat_map(|(_, p)| p.iter());
        let (x0, x1) = padded_span(points().map(|p| p.0));
        let (y0, y1) = padded_span(points().map(|p| p.1));
        // Steps, positions and k are integers: no tick at 2.5 labelled "2.5".
        let integral = points().all(|p| p.0.fract() == 0.0);
        let x_tick = |v: &f64| match integral {
            true if v.fract().abs() > 1e-9 => String::new(),
            true => format!("{v:.0}"),
            false => format!("{v}"),
        };
        let mut chart = cartesian(area, &self.title, x0..x1, y0..y1, 65)?;
        chart
            .configure_mesh()
            .x_desc(self.x_label.as_str())
            .y_desc(self.y_label.as_str())
            .x_label_formatter(&x_tick)
            .draw()
            .map_err(plot_err)?;
        for (k, (name, points)) in self.series.iter().enumerate() {
            let color = Palette99::pick(k).to_rgba();
            let line = match smoothed(points) {
                // Noisy per-step values: faint raw points under their running mean.
                Some(mean) => {
                    let dots = points
                        .iter()
                        .map(|&p| Circle::new(p, 2, color.mix(0.3).filled()));
                    chart.draw_series(dots).map_err(plot_err)?;
                    mean
                }
                None => points.clone(),
            };
            // A lone point has no segment to show: mark the points then.
            let marks = if points.len() < 2 { 4 } else { 0 };
            let drawn = chart
                .draw_series(LineSeries::new(line, color.stroke_width(2)).point_size(marks))
                .map_err(plot_err)?;
            if self.series.len() > 1 {
                drawn.label(name.as_str()).legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
            }
        }
        if self.series.len() > 1 {
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperLeft)
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()
                .map_err(plot_err)?;
        }
        Ok(())
    }
}

/// Points this many or more get a running mean drawn over them.
pub const SMOOTH_FROM: usize = 30;

/// The centred running mean of a long series (window about a twentieth of
/// its points, odd, at least 3), or None for a short one, drawn as it is.
pub fn smoothed(points: &[(f64, f64)]) -> Option<Vec<(f64, f64)>> {
    let n = points.len();
    if n < SMOOTH_FROM {
        return None;
    }
    let half = (n / 40).max(1);
    let mut sums = vec![0.0; n + 1];
    for (i, p) in points.iter().enumerate() {
        sums[i + 1] = sums[i] + p.1;
    }
    Some(
        (0..n)
            .map(|i| {
                let (lo, hi) = (i.saturating_sub(half), (i + half + 1).min(n));
                (points[i].0, (sums[hi] - sums[lo]) / (hi - lo) as f64)
            })
            .collect(),
    )
}

/// Line panels side by side.
pub(crate) struct Panels(pub(crate) Vec<Panel>);

impl Chart for Panels {
    fn size(&self) -> (u32, u32) {
        (PANEL_SIZE.0 * self.0.len() as u32, PANEL_SIZE.1)
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()> {
        let areas = root.split_evenly((1, self.0.len()));
        for (panel, area) in self.0.iter().zip(&areas) {
            panel.draw(area)?;
        }
        Ok(())
    }
}
