//! Code rewards in scripts: `score_code` on one completion and
//! `reward(ro, "humaneval")` on a rollout of HumanEval rows, both through
//! the sandbox (rl/sandbox.rs); a rollout's completions run in parallel.
use super::help;
use super::opts::Opts;
use super::types::*;
use crate::rl::sandbox::{self, Limits};
use anyhow::{anyhow, Result};
use rayon::prelude::*;
use rhai::{Engine, Map};
use std::time::Duration;

pub fn register(engine: &mut Engine) {
    engine.register_fn("score_code", |completion: &str, row: Map| {
        rt(score_code(completion, row, Map::new()))
    });
    engine.register_fn("score_code", |completion: &str, row: Map, o: Map| {
        rt(score_code(completion, row, o))
    });
}

fn limits(func: &'static str, o: Map) -> Result<Limits> {
    let o = Opts::check(func, help::SCORE_CODE, o)?;
    let wall = o.finite("wall")?;
    if !(wall > 0.0 && wall < 3600.0) {
        anyhow::bail!("{func}: option `wall` must be in (0, 3600) seconds, got {wall}");
    }
    Ok(Limits {
        cpu_seconds: o.positive("cpu_seconds")? as u64,
        wall: Duration::from_secs_f64(wall),
        memory_bytes: (o.positive("memory_mb")? as u64) << 20,
        output_bytes: o.positive("output_kb")? << 10,
        ..Limits::default()
    })
}

fn need<T>(v: Option<T>, key: &str, func: &str) -> Result<T> {
    v.ok_or_else(|| anyhow!("{func}: the row has no `{key}` (rows of `tarpo data humaneval` have prompt, test and entry_point)"))
}

fn score_code(completion: &str, row: Map, o: Map) -> Result<f64> {
    let l = limits("score_code", o)?;
    let get = |k: &str| {
        let v = row.get(k).filter(|v| v.is_string()).map(|v| v.to_string());
        need(v, k, "score_code")
    };
    sandbox::score_code(
        &get("prompt")?,
        completion,
        &get("test")?,
        &get("entry_point")?,
        &l,
    )
}

/// 1 or 0 per completion of a rollout of HumanEval rows.
pub fn humaneval_rewards(d: &RolloutData, o: Map) -> Result<Vec<f64>> {
    let l = limits("reward", o)?;
    let f = "reward(ro, \"humaneval\")";
    let jobs = d
        .texts
        .iter()
        .enumerate()
        .map(|(i, text)| {
            let it = &d.items[i / d.group];
            let get = |k: &str| need(it.fields.get(k).map(String::as_str), k, f);
            Ok((
                it.prompt.as_str(),
                text.as_str(),
                get("test")?,
                get("entry_point")?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    jobs.par_iter()
        .map(|(p, c, t, e)| sandbox::score_code(p, c, t, e, &l))
        .collect()
}
