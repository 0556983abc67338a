//! Frames and charts in scripts: `routing_frame`, `to_frame`,
//! `read_parquet`, the Frame type's methods, `write_html` and the `plot_*`
//! primitives over runs and frames.
use super::bind_run::{metrics_frame, routing_df, FrameHandle, RunHandle};
use super::help;
use super::opts::Opts;
use super::types::*;
use crate::analysis::{frame, plot, table};
use anyhow::{bail, Result};
use polars::prelude::DataFrame;
use rhai::{Array, Dynamic, Engine, EvalAltResult, Map};
use serde_json::Value;
use std::path::Path;
use std::rc::Rc;

type Res<T> = Result<T, Box<EvalAltResult>>;

pub fn register(engine: &mut Engine) {
    engine.register_fn("routing_frame", |ro: RolloutHandle| {
        rt(routing(&ro, None, None))
    });
    engine.register_fn(
        "routing_frame",
        |ro: RolloutHandle, rw: Array, adv: Array| rt(routing(&ro, Some(rw), Some(adv))),
    );
    engine.register_fn("read_parquet", |p: &str| {
        rt(frame::read_parquet(Path::new(p)).map(|f| FrameHandle(Rc::new(f))))
    });
    register_frame(engine);

    engine.register_fn("plot_soft_ratio", |r: RunHandle, p: &str| {
        rt(plot_soft_ratio(vec![r], p))
    });
    engine.register_fn("plot_soft_ratio", |runs: Array, p: &str| -> Res<()> {
        rt(runs_of(runs, "plot_soft_ratio").and_then(|v| plot_soft_ratio(v, p)))
    });
    engine.register_fn("to_frame", |rows: Array| rt(to_frame(&rows)));
    engine.register_fn("plot_pass_at_k", |results: Map, p: &str| {
        rt(plot_pass_at_k(&results, p))
    });
    engine.register_fn("plot_metric", |r: RunHandle, col: &str, p: &str| {
        rt(plot_metric(vec![r], col, p))
    });
    engine.register_fn(
        "plot_metric",
        |runs: Array, col: &str, p: &str| -> Res<()> {
            rt(runs_of(runs, "plot_metric").and_then(|v| plot_metric(v, col, p)))
        },
    );
    engine.register_fn("plot_histogram", |v: Array, p: &str| {
        rt(histogram(&v, p, Map::new()))
    });
    engine.register_fn("plot_histogram", |v: Array, p: &str, o: Map| {
        rt(histogram(&v, p, o))
    });
    engine.register_fn("plot_soft_by_position", |f: FrameHandle, p: &str| {
        rt(by_position(&f, p, Map::new()))
    });
    engine.register_fn(
        "plot_soft_by_position",
        |f: FrameHandle, p: &str, o: Map| rt(by_position(&f, p, o)),
    );
}

fn register_frame(engine: &mut Engine) {
    engine.register_fn("sql", |f: &mut FrameHandle, q: &str| {
        rt(frame::sql(&f.0, q).map(|d| FrameHandle(Rc::new(d))))
    });
    engine.register_fn("head", |f: &mut FrameHandle, n: i64| {
        FrameHandle(Rc::new(f.0.head(Some(n.max(0) as usize))))
    });
    engine.register_fn("column", |f: &mut FrameHandle, name: &str| -> Res<Array> {
        let df = &f.0;
        let is_text = df
            .column(name)
            .map(|c| c.dtype() == &polars::prelude::DataType::String)
            .unwrap_or(false);
        if is_text {
            let v = rt(frame::column_strings(df, name))?;
            return Ok(v
                .into_iter()
                .map(|s| s.map_or(Dynamic::UNIT, Into::into))
                .collect());
        }
        let v = rt(frame::column_f64(df, name))?;
        Ok(v.into_iter()
            .map(|x| x.map_or(Dynamic::UNIT, Dynamic::from_float))
            .collect())
    });
    engine.register_get("columns", |f: &mut FrameHandle| -> Array {
        f.0.get_column_names()
            .iter()
            .map(|c| c.to_string().into())
            .collect()
    });
    engine.register_get("height", |f: &mut FrameHandle| f.0.height() as i64);
    engine.register_get("width", |f: &mut FrameHandle| f.0.width() as i64);
    engine.register_fn("write_parquet", |f: &mut FrameHandle, p: &str| {
        rt(frame::write_parquet(&mut (*f.0).clone(), Path::new(p)))
    });
    engine.register_fn("write_csv", |f: &mut FrameHandle, p: &str| {
        rt(frame::write_csv(&mut (*f.0).clone(), Path::new(p)))
    });
    engine.register_fn("to_string", |f: &mut FrameHandle| rt(table::show(&f.0)));
    engine.register_fn("to_debug", |f: &mut FrameHandle| rt(table::show(&f.0)));
}

fn routing(ro: &RolloutHandle, rw: Option<Array>, adv: Option<Array>) -> Result<FrameHandle> {
    Ok(FrameHandle(Rc::new(routing_df(ro, rw, adv, "", 0)?)))
}

fn plot_soft_ratio(runs: Vec<RunHandle>, path: &str) -> Result<()> {
    plot::soft_ratio_over_steps(Path::new(path), &metric_frames(&runs)?)
}

/// The Run handles of an array (`what` names the primitive in errors).
fn runs_of(runs: Array, what: &str) -> Result<Vec<RunHandle>> {
    runs.into_iter()
        .enumerate()
        .map(|(i, r)| {
            let t = r.type_name();
            r.try_cast::<RunHandle>()
                .ok_or_else(|| anyhow::anyhow!("{what}: runs[{i}] is a {t}, not a Run"))
        })
        .collect()
}

/// One metric over steps, a line per run (e.g. completion_length, kl_token).
fn plot_metric(runs: Vec<RunHandle>, column: &str, path: &str) -> Result<()> {
    plot::metric_over_steps(Path::new(path), &metric_frames(&runs)?, column)
}

/// Each run's per-step metrics, named by its directory.
fn metric_frames(runs: &[RunHandle]) -> Result<Vec<(String, DataFrame)>> {
    runs.iter()
        .map(|r| {
            let name = r.0.borrow().dir.display().to_string();
            Ok((name, (*metrics_frame(r)?.0).clone()))
        })
        .collect()
}

fn histogram(values: &Array, path: &str, o: Map) -> Result<()> {
    let o = Opts::check("plot_histogram", help::PLOT, o)?;
    let v = floats(values, "values")?;
    let title = o.opt_str("title")?.unwrap_or_else(|| "histogram".into());
    plot::histogram(
        Path::new(path),
        &title,
        "value",
        &v,
        o.usize("bins")?.max(1),
        None,
    )
}

fn by_position(f: &FrameHandle, path: &str, o: Map) -> Result<()> {
    let o = Opts::check("plot_soft_by_position", help::PLOT, o)?;
    plot::soft_by_position(Path::new(path), &f.0, o.usize("bucket")?.max(1))
}

/// An array of maps as a Frame (one row per map; columns by key).
fn to_frame(rows: &Array) -> Result<FrameHandle> {
    let rows: Vec<serde_json::Map<String, Value>> = rows
        .iter()
        .enumerate()
        .map(|(i, r)| match to_json(r, &format!("rows[{i}]"))? {
            Value::Object(m) => Ok(m),
            _ => bail!("to_frame: rows[{i}] must be a map, got {}", r.type_name()),
        })
        .collect::<Result<_>>()?;
    Ok(FrameHandle(Rc::new(frame::frame_from_rows(&rows)?)))
}

/// Pass@k against k for one evaluation result (a map with `pass_at`) or for
/// several (a map from name to result), one line each.
fn plot_pass_at_k(results: &Map, path: &str) -> Result<()> {
    let one = results.contains_key("pass_at");
    let named: Vec<(String, Map)> = if one {
        vec![("pass@k".into(), results.clone())]
    } else {
        results
            .iter()
            .map(|(k, v)| match v.clone().try_cast::<Map>() {
                Some(m) if m.contains_key("pass_at") => Ok((k.to_string(), m)),
                _ => bail!("plot_pass_at_k: results.{k} is not an evaluation result (a map with `pass_at`)"),
            })
            .collect::<Result<_>>()?
    };
    let mut series = Vec::new();
    for (name, m) in named {
        let at = m
            .get("pass_at")
            .and_then(|v| v.clone().try_cast::<Map>())
            .ok_or_else(|| {
                anyhow::anyhow!("plot_pass_at_k: {name}: `pass_at` must be a map from k to Pass@k")
            })?;
        let mut pts: Vec<(f64, f64)> = at
            .iter()
            .map(|(k, v)| {
                let k: f64 = k.parse().map_err(|_| {
                    anyhow::anyhow!("plot_pass_at_k: {name}: k {k:?} is not a number")
                })?;
                let v = super::opts::as_f64(v).ok_or_else(|| {
                    anyhow::anyhow!("plot_pass_at_k: {name}: Pass@{k} is not a number")
                })?;
                Ok((k, v))
            })
            .collect::<Result<_>>()?;
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        series.push((name, pts));
    }
    plot::lines(
        Path::new(path),
        "Pass@k",
        "k (samples per problem)",
        "Pass@k",
        &series,
    )
}
