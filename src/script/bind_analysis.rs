//! The analysis of runs in scripts (scripts/analyze_run.rhai and `tarpo
//! analyze` are built from these): several runs in one frame, charts drawn
//! from any frame (`plot_lines`, `plot_bars`, frame histograms), completions
//! as pictures and pages, and the HTML report.
use super::bind_run::{load_run, FrameHandle};
use super::help;
use super::opts::Opts;
use super::types::*;
use crate::analysis::blocks::{self, PromptText};
use crate::analysis::plot_bars::{bars_noted, histograms, token_label};
use crate::analysis::plot_text::{soft_text_image, TextBlock};
use crate::analysis::report::{report_html, Report};
use crate::analysis::{frame, html, plot, token_class};
use anyhow::{anyhow, bail, Context, Result};
use polars::prelude::DataFrame;
use rhai::{Array, Engine, Map};
use serde_json::Value;
use std::path::Path;
use std::rc::Rc;

pub fn register(engine: &mut Engine) {
    engine.register_fn("load_runs", |d: &str| rt(load_runs(&[d.to_string()])));
    engine.register_fn("load_runs", |a: Array| {
        rt(strings(&a, "load_runs").and_then(|d| load_runs(&d)))
    });
    engine.register_fn("plot_lines", |f: FrameHandle, p: &str, o: Map| {
        rt(plot_lines(&f.0, p, o))
    });
    engine.register_fn("plot_bars", |f: FrameHandle, p: &str, o: Map| {
        rt(plot_bars(&f.0, p, o))
    });
    engine.register_fn("plot_histogram", |f: FrameHandle, p: &str, o: Map| {
        rt(frame_histogram(&f.0, p, o))
    });
    engine.register_fn("plot_text", |ro: RolloutHandle, p: &str| {
        rt(text_of_rollout(&ro, None, p, Map::new()))
    });
    engine.register_fn("plot_text", |ro: RolloutHandle, p: &str, o: Map| {
        rt(text_of_rollout(&ro, None, p, o))
    });
    engine.register_fn("plot_text", |f: FrameHandle, p: &str| {
        rt(text_of_frame(&f.0, p, Map::new(), false))
    });
    engine.register_fn("plot_text", |f: FrameHandle, p: &str, o: Map| {
        rt(text_of_frame(&f.0, p, o, false))
    });
    engine.register_fn("write_html", |f: FrameHandle, p: &str| {
        rt(text_of_frame(&f.0, p, Map::new(), true))
    });
    engine.register_fn("write_html", |f: FrameHandle, p: &str, o: Map| {
        rt(text_of_frame(&f.0, p, o, true))
    });
    engine.register_fn("write_html", |ro: RolloutHandle, p: &str| {
        rt(text_of_rollout(&ro, None, p, Map::new()))
    });
    engine.register_fn("write_html", |ro: RolloutHandle, rw: Array, p: &str| {
        rt(text_of_rollout(&ro, Some(rw), p, Map::new()))
    });
    engine.register_fn("with_token_class", |f: &mut FrameHandle| {
        rt(token_class::with_token_class(&f.0).map(|d| FrameHandle(Rc::new(d))))
    });
    engine.register_fn("write_report", |p: &str, o: Map| rt(write_report(p, o)));
    engine.register_fn("list_dir", |d: &str| rt(list_dir(d)));
    engine.register_fn("file_exists", |p: &str| Path::new(p).exists());
    engine.register_fn("read_json", |p: &str| rt(read_json(p)));
    // load_runs' frame where the run charts take runs: one line per `run`.
    engine.register_fn("plot_soft_ratio", |f: FrameHandle, p: &str| {
        rt(by_run(&f.0).and_then(|r| plot::soft_ratio_over_steps(Path::new(p), &r)))
    });
    engine.register_fn("plot_metric", |f: FrameHandle, col: &str, p: &str| {
        rt(by_run(&f.0).and_then(|r| plot::metric_over_steps(Path::new(p), &r, col)))
    });
}

fn by_run(df: &DataFrame) -> Result<Vec<(String, DataFrame)>> {
    let has_run = df.get_column_names().iter().any(|c| c.as_str() == "run");
    groups(df, has_run.then_some("run"), "run")
}

/// The names in a directory, sorted.
fn list_dir(dir: &str) -> Result<Array> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .with_context(|| format!("list_dir: {dir}: cannot read the directory"))?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().to_string()))
        .collect();
    names.sort();
    Ok(names.into_iter().map(Into::into).collect())
}

/// A JSON file as Rhai values (objects become maps).
fn read_json(path: &str) -> Result<rhai::Dynamic> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("read_json: {path}: cannot read"))?;
    let v: Value =
        serde_json::from_str(&text).with_context(|| format!("read_json: {path}: not JSON"))?;
    Ok(from_json(&v))
}

fn strings(a: &Array, what: &str) -> Result<Vec<String>> {
    a.iter()
        .enumerate()
        .map(|(i, v)| {
            v.clone()
                .into_string()
                .map_err(|t| anyhow!("{what}: element {i} is a {t}, not a directory string"))
        })
        .collect()
}

/// Every run's metrics rows with `run` (its directory as given) first.
fn load_runs(dirs: &[String]) -> Result<FrameHandle> {
    if dirs.is_empty() {
        bail!("load_runs: no run directories given");
    }
    let mut rows = Vec::new();
    for d in dirs {
        let run = load_run(d)?;
        let name = d.trim_end_matches('/');
        for r in &run.0.borrow().rows {
            let mut row = serde_json::Map::new();
            row.insert("run".into(), Value::from(name));
            row.extend(
                r.iter()
                    .filter(|(k, _)| *k != "run")
                    .map(|(k, v)| (k.clone(), v.clone())),
            );
            rows.push(row);
        }
    }
    if rows.is_empty() {
        bail!("load_runs: {} logged no metrics", dirs.join(", "));
    }
    Ok(FrameHandle(Rc::new(frame::frame_from_rows(&rows)?)))
}

/// `df` split by the values of column `by` (in order of first appearance),
/// or the whole frame under `name` without one.
fn groups(df: &DataFrame, by: Option<&str>, name: &str) -> Result<Vec<(String, DataFrame)>> {
    let Some(by) = by else {
        return Ok(vec![(name.to_string(), df.clone())]);
    };
    let keys = frame::column_strings(df, by)?;
    let mut names: Vec<String> = Vec::new();
    for k in keys.iter().flatten() {
        if !names.contains(k) {
            names.push(k.clone());
        }
    }
    names
        .into_iter()
        .map(|n| {
            let mask: polars::prelude::BooleanChunked = keys
                .iter()
                .map(|k| Some(k.as_deref() == Some(n.as_str())))
                .collect();
            let part = df.filter(&mask).map_err(|e| anyhow!("{by}: {e}"))?;
            Ok((n, part))
        })
        .collect()
}

fn plot_lines(df: &DataFrame, path: &str, o: Map) -> Result<()> {
    let o = Opts::check("plot_lines", help::PLOT_LINES, o)?;
    let (x, y) = (o.str("x")?, o.str("y")?);
    let by = o.opt_str("by")?;
    let mut series = Vec::new();
    for (name, part) in groups(df, by.as_deref(), &y)? {
        let (xs, ys) = (frame::column_f64(&part, &x)?, frame::column_f64(&part, &y)?);
        let pts = xs
            .into_iter()
            .zip(ys)
            .filter_map(|(a, b)| Some((a?, b?)))
            .collect();
        series.push((name, pts));
    }
    let title = o.opt_str("title")?.unwrap_or_else(|| y.clone());
    let x_label = o.opt_str("x_label")?.unwrap_or_else(|| x.clone());
    let y_label = o.opt_str("y_label")?.unwrap_or_else(|| y.clone());
    plot::lines(Path::new(path), &title, &x_label, &y_label, &series)
        .with_context(|| format!("plot_lines {path}"))
}

fn plot_bars(df: &DataFrame, path: &str, o: Map) -> Result<()> {
    let o = Opts::check("plot_bars", help::PLOT_BARS, o)?;
    let value = o.str("value")?;
    let labels = frame::column_strings(df, &o.str("label")?)?;
    let as_token = o.bool("tokens")?;
    let labels: Vec<String> = labels
        .into_iter()
        .map(|l| {
            let l = l.unwrap_or_default();
            if as_token {
                token_label(&l)
            } else {
                l
            }
        })
        .collect();
    let values = frame::column_f64(df, &value)?;
    let values: Vec<f64> = values.into_iter().map(|v| v.unwrap_or(f64::NAN)).collect();
    let notes = match o.opt_str("note")? {
        Some(c) => frame::column_strings(df, &c)?
            .into_iter()
            .map(|n| n.map(|n| format!("{c} {n}")).unwrap_or_default())
            .collect(),
        None => Vec::new(),
    };
    let title = o.opt_str("title")?.unwrap_or_else(|| value.clone());
    let x_label = o.opt_str("x_label")?.unwrap_or_else(|| value.clone());
    bars_noted(Path::new(path), &title, &x_label, &labels, &values, &notes)
        .with_context(|| format!("plot_bars {path}"))
}

fn frame_histogram(df: &DataFrame, path: &str, o: Map) -> Result<()> {
    let o = Opts::check("plot_histogram", help::PLOT_FRAME_HISTOGRAM, o)?;
    let column = o.str("column")?;
    let by = o.opt_str("by")?;
    let parts = groups(df, by.as_deref(), &column)?
        .into_iter()
        .map(|(n, part)| {
            let v = frame::column_f64(&part, &column)?;
            Ok((n, v.into_iter().flatten().collect()))
        })
        .collect::<Result<Vec<(String, Vec<f64>)>>>()?;
    let range = match (o.opt_float("lo")?, o.opt_float("hi")?) {
        (Some(lo), Some(hi)) => Some((lo, hi)),
        (None, None) => None,
        _ => bail!("plot_histogram: give both `lo` and `hi`, or neither"),
    };
    let title = o.opt_str("title")?.unwrap_or_else(|| column.clone());
    let x_label = o.opt_str("x_label")?.unwrap_or_else(|| column.clone());
    histograms(
        Path::new(path),
        &title,
        &x_label,
        &parts,
        o.positive("bins")?,
        range,
    )
    .with_context(|| format!("plot_histogram {path}"))
}

fn blocks_of_rollout(ro: &RolloutHandle, rw: Option<Array>) -> Result<Vec<TextBlock>> {
    let rw = rw.map(|a| floats(&a, "rewards")).transpose()?;
    let d = &ro.0;
    let st = d.backbone.0.borrow();
    let prompts: Vec<PromptText> = d
        .items
        .iter()
        .map(|p| PromptText {
            prompt: &p.prompt,
            answer: &p.answer,
        })
        .collect();
    blocks::from_rollout(
        &d.ro,
        &st.policy.model.tok,
        d.group,
        &prompts,
        rw.as_deref(),
    )
}

/// A page (.html) or a picture (.png, .svg) of a rollout's completions.
fn text_of_rollout(ro: &RolloutHandle, rw: Option<Array>, path: &str, o: Map) -> Result<()> {
    let o = Opts::check("plot_text", help::PLOT_TEXT, o)?;
    let mut b = blocks_of_rollout(ro, rw)?;
    // A page holds every completion; a picture the first `max`.
    if !path.to_ascii_lowercase().ends_with(".html") {
        b.truncate(o.positive("max")?);
    }
    draw_blocks(&b, path, &o.str("title")?)
}

fn draw_blocks(b: &[TextBlock], path: &str, title: &str) -> Result<()> {
    if path.to_ascii_lowercase().ends_with(".html") {
        let page = html::soft_text(b)?;
        return html::write(Path::new(path), &page);
    }
    soft_text_image(Path::new(path), title, b)
}

fn samples_of(o: &Opts, func: &str) -> Result<Option<Rc<DataFrame>>> {
    match o.raw("samples") {
        None => Ok(None),
        Some(v) => match v.try_cast::<FrameHandle>() {
            Some(f) => Ok(Some(f.0)),
            None => bail!("{func}: option `samples` must be a Frame (run.samples())"),
        },
    }
}

/// The first completions of a routing frame as a page or a picture.
fn text_of_frame(df: &DataFrame, path: &str, o: Map, html_only: bool) -> Result<()> {
    let func = if html_only { "write_html" } else { "plot_text" };
    let o = Opts::check(func, help::PLOT_TEXT, o)?;
    if html_only && !path.to_ascii_lowercase().ends_with(".html") {
        bail!("write_html: {path} must end in .html (plot_text draws .png and .svg)");
    }
    let samples = samples_of(&o, func)?;
    let b = blocks::from_frames(df, samples.as_deref(), o.positive("max")?)?;
    if b.is_empty() {
        bail!("{func}: the frame holds no completions");
    }
    draw_blocks(&b, path, &o.str("title")?)
}

fn write_report(path: &str, o: Map) -> Result<()> {
    let o = Opts::check("write_report", help::WRITE_REPORT, o)?;
    let config = o.raw("config").map(|c| to_json(&c, "config")).transpose()?;
    let mut tables = Vec::new();
    for (caption, t) in o.map("tables").unwrap_or_default() {
        let f = t
            .try_cast::<FrameHandle>()
            .ok_or_else(|| anyhow!("write_report: tables.{caption} must be a Frame"))?;
        tables.push((caption.to_string(), (*f.0).clone()));
    }
    let charts = match o.raw("charts") {
        Some(c) => strings(&c.cast::<Array>(), "write_report: charts")?,
        None => Vec::new(),
    };
    let text = match o.raw("text") {
        None => None,
        Some(t) => {
            let f = t
                .try_cast::<FrameHandle>()
                .ok_or_else(|| anyhow!("write_report: `text` must be a tokens Frame"))?;
            let b = blocks::from_frames(
                &f.0,
                samples_of(&o, "write_report")?.as_deref(),
                o.positive("max")?,
            )?;
            Some(html::blocks_html(&b)?)
        }
    };
    let report = Report {
        title: &o.str("title")?,
        config: config.as_ref(),
        tables: &tables,
        charts: &charts,
        text,
    };
    let page = report_html(&report, Path::new(path))?;
    html::write(Path::new(path), &page)
}
