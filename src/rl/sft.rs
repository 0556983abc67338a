//! Supervised fine-tuning as a replay: a (prompt, completion) pair is a
//! rollout whose every step is one of the completion's tokens, hard, and its
//! loss with advantage 1, no router term and no KL is the negative
//! log-likelihood of the completion at temperature 1. So SFT shares the
//! policy loss's bounded-memory replay and its exact accumulation
//! (`update::backward`), and its normalisation modes: `token-mean` is the
//! usual mean NLL per token, `seq-mean-token-mean` the mean over sequences of
//! their mean.
use super::loss::LossConfig;
use super::loss_agg::Norm;
use super::policy::Policy;
use super::update::{backward, LossSums, ReplayConfig};
use crate::policy::{Rollout, TokenRecord, HARD};
use anyhow::{bail, Result};

/// The rollout that replays `completions` after `prompts` (token ids).
pub fn teacher_forced(prompts: Vec<Vec<i64>>, completions: Vec<Vec<i64>>) -> Result<Rollout> {
    if prompts.len() != completions.len() {
        bail!(
            "{} prompts but {} completions",
            prompts.len(),
            completions.len()
        );
    }
    if let Some(i) = completions.iter().position(Vec::is_empty) {
        bail!("completion {i} is empty");
    }
    let records = completions
        .into_iter()
        .map(|c| {
            c.into_iter()
                .map(|token| TokenRecord {
                    token,
                    mode: HARD,
                    forced: true,
                    logp: 0.0,
                    router_logp: 0.0,
                    p_soft: 0.0,
                    entropy: 0.0,
                    topk_entropy: 0.0,
                    mix_ids: Vec::new(),
                    mix_weights: Vec::new(),
                    latent: Default::default(),
                })
                .collect()
        })
        .collect();
    Ok(Rollout {
        prompts,
        records,
        inputs: Vec::new(),
        temperature: 1.0,
        mix_k: 1,
    })
}

/// The replay settings of the NLL loss.
pub fn config(norm: Norm, micro_batch: usize) -> ReplayConfig {
    let mut cfg = ReplayConfig::new(LossConfig {
        lambda: 0.0,
        beta: 0.0,
        norm,
        max_len: 1,
        ..LossConfig::default()
    });
    cfg.micro_batch = micro_batch;
    cfg
}

/// Adds the gradient of the NLL numerator of `completions` after `prompts`
/// to the parameters and returns its sums (`update::finish` makes it a mean).
pub fn nll_backward(
    p: &Policy,
    prompts: Vec<Vec<i64>>,
    completions: Vec<Vec<i64>>,
    cfg: &ReplayConfig,
) -> Result<LossSums> {
    let ro = teacher_forced(prompts, completions)?;
    let adv = vec![1.0; ro.records.len()];
    backward(p, &ro, &adv, cfg)
}
