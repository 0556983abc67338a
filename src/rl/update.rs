//! Gradients of the policy loss on a scored rollout: replay in micro-batches,
//! score against the reference, and backpropagate each chunk's share of the
//! full-batch loss (so memory stays bounded at any group size). Used by
//! `train::Trainer` and bound one to one in scripts (`tarpo_loss`).
use super::loss::{policy_loss, LossConfig, LossInputs, LossMetrics};
use super::loss_agg::Norm;
use super::train::{Policy, RefInputs, Reference};
use crate::policy::replay::{self, ReplayBatch};
use crate::policy::router::HARD;
use crate::policy::Rollout;
use anyhow::{bail, Result};
use tch::{Kind, Tensor};

/// How the rollout is replayed for the loss.
#[derive(Debug, Clone)]
pub struct ReplayConfig {
    pub loss: LossConfig,
    /// Completions per replay forward.
    pub micro_batch: usize,
    pub ref_inputs: RefInputs,
    /// Log-probs are scored at the rollout's temperature unless set.
    pub score_temperature: Option<f64>,
}

/// Adds the gradient of the loss on `ro` (advantages `adv`, one per row) to
/// the parameters' `.grad`, micro-batch by micro-batch, and returns the
/// full-batch loss metrics. The caller zeroes gradients before and steps after.
pub fn accumulate_gradients(
    p: &Policy,
    ro: &Rollout,
    adv: &[f64],
    cfg: &ReplayConfig,
) -> Result<LossMetrics> {
    let n = ro.records.len();
    if adv.len() != n {
        bail!("{} advantages for a rollout of {n} completions", adv.len());
    }
    let lens: Vec<usize> = ro.records.iter().map(Vec::len).collect();
    let total_tokens: usize = lens.iter().sum();
    let seqs = lens.iter().filter(|&&l| l > 0).count().max(1);
    let mut sum = LossMetrics::default();
    let mut grad_h_sq = 0.0;
    let rows: Vec<usize> = (0..n).filter(|&i| lens[i] > 0).collect();
    let chunks: Vec<&[usize]> = rows.chunks(cfg.micro_batch.max(1)).collect();
    let bar = crate::ctl::Progress::new("replay", chunks.len() as u64);
    for (c, chunk) in chunks.into_iter().enumerate() {
        crate::ctl::check()?;
        bar.set(c as u64);
        let share = match cfg.loss.norm {
            Norm::TokenMean => {
                chunk.iter().map(|&i| lens[i]).sum::<usize>() as f64 / total_tokens.max(1) as f64
            }
            _ => chunk.len() as f64 / seqs as f64,
        };
        let batch = replay::build_with(&p.model.net, p.gate.as_ref(), ro, chunk)?;
        let adv_t = Tensor::from_slice(&chunk.iter().map(|&i| adv[i] as f32).collect::<Vec<_>>())
            .f_to_device(batch.inputs.device())?;
        let (loss, m, leaf, h) = chunk_loss(p, ro, &batch, &adv_t, cfg)?;
        // Backward to the heads' input first (dL/dh), then on into the backbone.
        loss.f_mul_scalar(share)?.f_backward()?;
        let g = leaf.grad();
        if g.defined() {
            grad_h_sq += g.f_square()?.f_sum(Kind::Double)?.double_value(&[]);
            if h.requires_grad() {
                h.f_mul(&g)?.f_sum(Kind::Float)?.f_backward()?;
            }
        }
        sum.loss += m.loss * share;
        sum.kl_token += m.kl_token * share;
        sum.kl_router += m.kl_router * share;
    }
    sum.grad_hidden_norm = grad_h_sq.sqrt();
    Ok(sum)
}

/// The chunk's loss, its metrics, and the heads' input (a leaf) with the
/// backbone's hidden states behind it (`replay::score_split`).
fn chunk_loss(
    p: &Policy,
    ro: &Rollout,
    batch: &ReplayBatch,
    adv: &Tensor,
    cfg: &ReplayConfig,
) -> Result<(Tensor, LossMetrics, Tensor, Tensor)> {
    let temp = cfg.score_temperature.unwrap_or(ro.temperature);
    let (cur, h) = replay::score_split(&p.model.net, p.router.as_ref(), batch, temp)?;
    let reference = if cfg.loss.beta != 0.0 {
        Some(reference_scores(p, ro, batch, temp, cfg.ref_inputs)?)
    } else {
        None
    };
    let (logp_old, router_old) = if cfg.loss.clip.is_some() {
        old_logps(ro, batch)?
    } else {
        (None, None)
    };
    let x = LossInputs {
        logp: &cur.logp,
        logp_ref: reference.as_ref().map(|r| &r.logp),
        logp_old: logp_old.as_ref(),
        router_logp: cur.router_logp.as_ref(),
        router_logp_ref: reference.as_ref().and_then(|r| r.router_logp.as_ref()),
        router_logp_old: router_old.as_ref(),
        adv,
        mask: &batch.mask,
        router_mask: &batch.router_mask,
    };
    let (loss, m) = policy_loss(&x, &cfg.loss)?;
    Ok((loss, m, cur.hidden, h))
}

/// The frozen reference's scores on the same rows (no autograd).
fn reference_scores(
    p: &Policy,
    ro: &Rollout,
    batch: &ReplayBatch,
    temp: f64,
    inputs: RefInputs,
) -> Result<replay::Scores> {
    let _g = tch::no_grad_guard();
    let hard;
    let rows = match inputs {
        RefInputs::Same => batch,
        RefInputs::Hard => {
            hard = replay::build_with(&p.model.net, p.gate.as_ref(), &all_hard(ro), &batch.rows)?;
            &hard
        }
    };
    match &p.reference {
        Reference::Base => {
            p.model.net.set_lora_enabled(false);
            let s =
                replay::score_shared_prompts(&p.model.net, p.router_ref.as_ref(), ro, rows, temp);
            p.model.net.set_lora_enabled(true);
            s
        }
        Reference::Model(m) => {
            replay::score_shared_prompts(&m.net, p.router_ref.as_ref(), ro, rows, temp)
        }
        Reference::None => {
            bail!(
                "beta > 0 needs a reference model (or LoRA, whose base weights are the reference)"
            )
        }
    }
}

/// The same completions with every input hard (for `ref_inputs: hard`).
fn all_hard(ro: &Rollout) -> Rollout {
    let records = ro
        .records
        .iter()
        .map(|recs| {
            recs.iter()
                .map(|r| {
                    let mut r = r.clone();
                    r.mode = HARD;
                    r.mix_ids.clear();
                    r.mix_weights.clear();
                    r
                })
                .collect()
        })
        .collect();
    Rollout {
        prompts: ro.prompts.clone(),
        records,
        inputs: Vec::new(),
        temperature: ro.temperature,
        mix_k: ro.mix_k,
    }
}

/// The rollout's recorded token and router log-probs as (B, T) tensors (PPO's old policy).
fn old_logps(ro: &Rollout, batch: &ReplayBatch) -> Result<(Option<Tensor>, Option<Tensor>)> {
    let t = batch.tokens.size()[1] as usize;
    let (mut lp, mut rlp) = (
        vec![0f32; batch.rows.len() * t],
        vec![0f32; batch.rows.len() * t],
    );
    for (i, &r) in batch.rows.iter().enumerate() {
        for (j, rec) in ro.records[r].iter().enumerate() {
            lp[i * t + j] = rec.logp;
            rlp[i * t + j] = rec.router_logp;
        }
    }
    let dev = batch.tokens.device();
    let shape = [batch.rows.len() as i64, t as i64];
    let to = |v: &[f32]| -> Result<Tensor> {
        Ok(Tensor::from_slice(v)
            .f_view(shape)?
            .f_to_device(dev)?
            .f_to_kind(Kind::Float)?)
    };
    Ok((Some(to(&lp)?), Some(to(&rlp)?)))
}
