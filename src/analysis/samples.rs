//! The samples frame: one row per completion of a rollout, with what the
//! routing frame leaves out (the prompt, the reference answer and the decoded
//! completion), so a run directory can show its rollouts as text later.
use super::frame::RecordMeta;
use crate::policy::{Rollout, SOFT};
use anyhow::{anyhow, bail, Result};
use polars::prelude::*;

/// Column names, in order.
pub const SAMPLE_COLUMNS: [&str; 11] = [
    "run",
    "step",
    "prompt_id",
    "sample_id",
    "prompt",
    "answer",
    "completion",
    "tokens",
    "soft",
    "reward",
    "advantage",
];

/// One row per sequence of `ro`: `prompts[i]` and `answers[i]` belong to
/// prompt i (sequence s is prompt s / group), `texts[s]` is the decoded
/// completion; `tokens` and `soft` count its generated and soft steps.
pub fn samples_frame(
    ro: &Rollout,
    prompts: &[String],
    answers: &[String],
    texts: &[String],
    meta: &RecordMeta,
) -> Result<DataFrame> {
    let n = ro.records.len();
    if texts.len() != n || prompts.len() != answers.len() {
        bail!(
            "samples frame: {} texts for {n} sequences, {} prompts with {} answers",
            texts.len(),
            prompts.len(),
            answers.len()
        );
    }
    if meta.group == 0 || prompts.len() * meta.group != n {
        bail!(
            "samples frame: {} prompts x group {} != {n} sequences",
            prompts.len(),
            meta.group
        );
    }
    let per = |s: usize| s / meta.group;
    let columns = vec![
        Column::new("run".into(), vec![meta.run; n]),
        Column::new("step".into(), vec![meta.step; n]),
        Column::new(
            "prompt_id".into(),
            (0..n).map(|s| per(s) as i64).collect::<Vec<_>>(),
        ),
        Column::new(
            "sample_id".into(),
            (0..n).map(|s| (s % meta.group) as i64).collect::<Vec<_>>(),
        ),
        Column::new(
            "prompt".into(),
            (0..n).map(|s| prompts[per(s)].as_str()).collect::<Vec<_>>(),
        ),
        Column::new(
            "answer".into(),
            (0..n).map(|s| answers[per(s)].as_str()).collect::<Vec<_>>(),
        ),
        Column::new("completion".into(), texts.to_vec()),
        Column::new(
            "tokens".into(),
            ro.records
                .iter()
                .map(|r| r.len() as i64)
                .collect::<Vec<_>>(),
        ),
        Column::new(
            "soft".into(),
            ro.records
                .iter()
                .map(|r| r.iter().filter(|t| t.mode == SOFT).count() as i64)
                .collect::<Vec<_>>(),
        ),
        Column::new("reward".into(), values(meta.rewards, n)?),
        Column::new("advantage".into(), values(meta.advantages, n)?),
    ];
    DataFrame::new(n, columns).map_err(|e| anyhow!("samples frame: {e}"))
}

fn values(v: Option<&[f64]>, n: usize) -> Result<Vec<Option<f64>>> {
    match v {
        Some(v) if v.len() != n => bail!("samples frame: {} values for {n} sequences", v.len()),
        Some(v) => Ok(v.iter().map(|&x| Some(x)).collect()),
        None => Ok(vec![None; n]),
    }
}
