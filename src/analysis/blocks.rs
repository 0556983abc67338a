//! Completions as text blocks (`plot_text::TextBlock`), the one form both the
//! HTML page and the picture draw: from a live rollout, or from a run's
//! routing frame with its samples frame (prompt, reference answer, reward).
use super::frame::{column_f64, column_strings};
use super::plot_text::{TextBlock, TextToken};
use crate::model::Tokenizer;
use crate::policy::{Rollout, SOFT};
use anyhow::{bail, Result};
use polars::prelude::DataFrame;
use std::collections::HashMap;

/// Prompt and reference answer of prompt i of a rollout.
pub struct PromptText<'a> {
    pub prompt: &'a str,
    pub answer: &'a str,
}

fn heading(
    step: Option<i64>,
    prompt: i64,
    sample: i64,
    reward: Option<f64>,
    soft: usize,
    n: usize,
) -> String {
    let step = step.map_or(String::new(), |s| format!("step {s}, "));
    let reward = reward.map_or(String::new(), |r| format!(", reward {r:.3}"));
    format!("{step}prompt {prompt} sample {sample}{reward}, {soft}/{n} soft")
}

fn context(prompt: Option<&str>, answer: Option<&str>) -> Vec<String> {
    let mut c = Vec::new();
    if let Some(p) = prompt {
        c.push(format!("prompt: {}", p.trim_end()));
    }
    if let Some(a) = answer.filter(|a| !a.is_empty()) {
        c.push(format!("reference answer: {a}"));
    }
    c
}

/// One block per completion of `ro` (sequence i belongs to prompt i / group).
pub fn from_rollout(
    ro: &Rollout,
    tok: &Tokenizer,
    group: usize,
    prompts: &[PromptText],
    rewards: Option<&[f64]>,
) -> Result<Vec<TextBlock>> {
    let n = ro.records.len();
    if group == 0 || prompts.len() * group != n {
        bail!(
            "soft text: {} prompts x group {group} != {n} completions",
            prompts.len()
        );
    }
    if let Some(r) = rewards.filter(|r| r.len() != n) {
        bail!("soft text: {} rewards for {n} completions", r.len());
    }
    let mut blocks = Vec::with_capacity(n);
    for (i, recs) in ro.records.iter().enumerate() {
        let soft = recs.iter().filter(|r| r.mode == SOFT).count();
        let p = &prompts[i / group];
        let mut tokens = Vec::with_capacity(recs.len());
        for r in recs {
            let text = if r.has_token() {
                tok.decode(&[r.token], false)?
            } else {
                String::new()
            };
            tokens.push(TextToken {
                text,
                soft: r.mode == SOFT,
                thought: !r.has_token(),
                p_soft: r.p_soft as f64,
                logp: r.logp as f64,
                entropy: r.entropy as f64,
            });
        }
        let (pi, si) = ((i / group) as i64, (i % group) as i64);
        blocks.push(TextBlock {
            heading: heading(None, pi, si, rewards.map(|r| r[i]), soft, recs.len()),
            context: context(Some(p.prompt), Some(p.answer)),
            tokens,
        });
    }
    Ok(blocks)
}

/// Key of a completion in a run's frames.
type Key = (i64, i64, i64);

fn keys(df: &DataFrame) -> Result<Vec<Option<Key>>> {
    let (st, p, s) = (
        column_f64(df, "step")?,
        column_f64(df, "prompt_id")?,
        column_f64(df, "sample_id")?,
    );
    Ok((0..df.height())
        .map(|i| Some((st[i]? as i64, p[i]? as i64, s[i]? as i64)))
        .collect())
}

/// The first `max` completions of a routing frame (in row order), with the
/// prompt, reference answer and reward from `samples` where it has the
/// completion.
pub fn from_frames(
    tokens: &DataFrame,
    samples: Option<&DataFrame>,
    max: usize,
) -> Result<Vec<TextBlock>> {
    let key = keys(tokens)?;
    let text = column_strings(tokens, "token")?;
    let mode = column_strings(tokens, "mode")?;
    let num = |c: &str| column_f64(tokens, c);
    let (p_soft, logp, entropy) = (num("p_soft")?, num("logp")?, num("entropy")?);
    let mut order: Vec<Key> = Vec::new();
    let mut by_key: HashMap<Key, Vec<TextToken>> = HashMap::new();
    for i in 0..tokens.height() {
        let Some(k) = key[i] else { continue };
        if !by_key.contains_key(&k) {
            if order.len() == max {
                continue;
            }
            order.push(k);
        }
        let m = mode[i].as_deref().unwrap_or("hard");
        by_key.entry(k).or_default().push(TextToken {
            text: text[i].clone().unwrap_or_default(),
            soft: m == "soft",
            thought: m == "latent",
            p_soft: p_soft[i].unwrap_or(0.0),
            logp: logp[i].unwrap_or(f64::NAN),
            entropy: entropy[i].unwrap_or(f64::NAN),
        });
    }
    let info = match samples {
        Some(s) => sample_info(s)?,
        None => HashMap::new(),
    };
    Ok(order
        .into_iter()
        .map(|k| {
            let tokens = by_key.remove(&k).unwrap_or_default();
            let soft = tokens.iter().filter(|t| t.soft).count();
            let s = info.get(&k);
            TextBlock {
                heading: heading(Some(k.0), k.1, k.2, s.and_then(|s| s.2), soft, tokens.len()),
                context: context(s.map(|s| s.0.as_str()), s.map(|s| s.1.as_str())),
                tokens,
            }
        })
        .collect())
}

/// Prompt, reference answer and reward of a completion.
type SampleInfo = (String, String, Option<f64>);

/// (prompt, answer, reward) per completion of a samples frame.
fn sample_info(df: &DataFrame) -> Result<HashMap<Key, SampleInfo>> {
    let key = keys(df)?;
    let prompt = column_strings(df, "prompt")?;
    let answer = column_strings(df, "answer")?;
    let reward = column_f64(df, "reward")?;
    Ok((0..df.height())
        .filter_map(|i| {
            let v = (
                prompt[i].clone().unwrap_or_default(),
                answer[i].clone().unwrap_or_default(),
                reward[i],
            );
            Some((key[i]?, v))
        })
        .collect())
}
