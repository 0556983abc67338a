//! Per-step training metrics (ALGORITHMS.md section 2, with the reference
//! run's names), gathered in one place from the rollout and the loss.
use super::advantage;
use crate::model::Llama;
use crate::policy::mix;
use crate::policy::Rollout;
use crate::policy::{HARD, LATENT, SOFT};
use anyhow::Result;
use serde::Serialize;
use tch::{Device, Kind, Tensor};

#[derive(Debug, Clone, Default, Serialize)]
pub struct StepMetrics {
    pub step: u64,
    pub reward: f64,
    pub reward_std: f64,
    pub adv_min: f64,
    pub adv_max: f64,
    pub adv_std: f64,
    /// 0 for group-centred estimators; AAPO's margins move it.
    pub adv_mean: f64,
    /// Fraction of groups whose rewards are all equal (advantage 0 everywhere).
    pub zero_adv_frac: f64,
    pub soft_ratio: f64,
    pub hard_ratio: f64,
    /// Mean generated tokens per completion (Coconut's thoughts not counted),
    /// and mean hard ones.
    pub completion_length: f64,
    pub valid_completion_length: f64,
    pub kl_token: f64,
    pub kl_router: f64,
    pub token_entropy: f64,
    /// Entropy of the router's mode distribution at its decisions.
    pub action_entropy: f64,
    /// Entropy of the top-k mixture weights at soft positions.
    pub topk_entropy: f64,
    /// Mean L2 distance between a soft input and the sampled token's embedding.
    pub embed_dist: f64,
    pub grad_norm: f64,
    /// ||dL/dh|| at the final-normed hidden states the token and router heads read.
    pub grad_hidden_norm: f64,
    pub grad_action_norm: f64,
    /// Fraction of tokens whose PPO ratio was clipped.
    pub clip_frac: f64,
    pub lr: f64,
    pub loss: f64,
    /// The optimizer skipped this step (non-finite gradient).
    pub skipped: bool,
}

fn mean(xs: impl Iterator<Item = f64>) -> f64 {
    let (s, n) = xs.fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    if n == 0 {
        0.0
    } else {
        s / n as f64
    }
}

/// The metrics that follow from the rollout, its rewards and advantages.
pub fn rollout_metrics(
    net: &Llama,
    ro: &Rollout,
    rewards: &[f64],
    adv: &[f64],
    group: usize,
) -> Result<StepMetrics> {
    let recs = || ro.records.iter().flatten();
    let soft_ratio = ro.soft_ratio();
    let r = advantage::stats(rewards);
    let a = advantage::stats(adv);
    let bern = |p: f64| {
        if p <= 0.0 || p >= 1.0 {
            0.0
        } else {
            -(p * p.ln() + (1.0 - p) * (1.0 - p).ln())
        }
    };
    Ok(StepMetrics {
        reward: r.mean,
        reward_std: r.std,
        adv_min: a.min,
        adv_max: a.max,
        adv_std: a.std,
        adv_mean: a.mean,
        zero_adv_frac: advantage::zero_advantage_fraction(rewards, group)?,
        soft_ratio,
        hard_ratio: 1.0 - soft_ratio,
        completion_length: mean(ro.lengths().into_iter().map(|n| n as f64)),
        valid_completion_length: mean(
            ro.records
                .iter()
                .map(|r| r.iter().filter(|t| t.mode == HARD).count() as f64),
        ),
        token_entropy: mean(recs().map(|r| r.entropy as f64)),
        action_entropy: mean(recs().filter(|r| !r.forced).map(|r| bern(r.p_soft as f64))),
        topk_entropy: mean(
            recs()
                .filter(|r| r.mode == SOFT)
                .map(|r| r.topk_entropy as f64),
        ),
        embed_dist: embed_dist(net, ro)?,
        ..StepMetrics::default()
    })
}

/// Mean ||mixture - E[y_t]|| over the router's soft tokens (top-k mixtures;
/// the latent inputs of Soft Thinking, Coconut and HRPO carry no ids).
fn embed_dist(net: &Llama, ro: &Rollout) -> Result<f64> {
    let k = ro.mix_k as usize;
    let soft: Vec<_> = ro
        .records
        .iter()
        .flatten()
        .filter(|r| r.mode == SOFT && r.mix_ids.len() == k)
        .collect();
    if soft.is_empty() {
        return Ok(0.0);
    }
    let _g = tch::no_grad_guard();
    let k = k as i64;
    let dev = net.embed_tokens.device();
    let ids: Vec<i64> = soft
        .iter()
        .flat_map(|r| r.mix_ids.iter().copied())
        .collect();
    let w: Vec<f32> = soft
        .iter()
        .flat_map(|r| r.mix_weights.iter().copied())
        .collect();
    let toks: Vec<i64> = soft.iter().map(|r| r.token).collect();
    let n = soft.len() as i64;
    let ids = Tensor::from_slice(&ids).f_view([n, k])?.f_to_device(dev)?;
    let w = Tensor::from_slice(&w).f_view([n, k])?.f_to_device(dev)?;
    let mixed = mix::embed(&net.embed_tokens, &ids, &w)?;
    let hard = net.embed(&Tensor::from_slice(&toks).f_to_device(dev)?)?;
    let d = mixed
        .f_sub(&hard)?
        .f_to_kind(Kind::Float)?
        .f_norm_scalaropt_dim(2, [-1].as_slice(), false)?;
    Ok(d.f_mean(Kind::Float)?
        .f_to_device(Device::Cpu)?
        .double_value(&[]))
}

/// A completion's text with its soft spans marked `⟦...⟧` (the tokens shown
/// are the sampled ones; the model was fed their mixtures) and each run of
/// Coconut's thoughts as `⟨N thoughts⟩`, for sample logs.
pub fn mark_soft(
    tok: &crate::model::Tokenizer,
    records: &[crate::policy::TokenRecord],
) -> Result<String> {
    let mut out = String::new();
    let mut i = 0;
    while i < records.len() {
        let mode = records[i].mode;
        let j = (i..records.len())
            .find(|&j| records[j].mode != mode)
            .unwrap_or(records.len());
        if mode == LATENT {
            out.push_str(&format!("⟨{} thoughts⟩", j - i));
        } else {
            let ids: Vec<i64> = records[i..j].iter().map(|r| r.token).collect();
            let text = tok.decode(&ids, false)?;
            if mode == SOFT {
                out.push('⟦');
                out.push_str(&text);
                out.push('⟧');
            } else {
                out.push_str(&text);
            }
        }
        i = j;
    }
    Ok(out)
}
