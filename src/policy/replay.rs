//! Teacher-forced replay of a rollout, with autograd.
//!
//! Rebuilds exactly the inputs the rollout fed the model: prompt tokens, then
//! for each generated token its embedding (hard) or its mixture rebuilt from
//! the recorded top-k ids and weights with the current embedding matrix (soft),
//! with the rollout's positions and attention mask (the reference code dropped
//! the mask in training). One forward gives every position's hidden state, from
//! which token and router log-probs follow.
//!
//! Latent steps of the other methods (`rollout::Latent`): Soft Thinking's and
//! Coconut's recorded input vectors are fed back as constants (no gradient
//! flows through a latent input into the positions that produced it, as in the
//! GRPO-style training of these methods); HRPO's input is recomputed from the
//! recorded h_hat as gate(E[y_t], h_hat) with autograd, so the gate trains
//! (`build_with`). Only SOFT records use their latent vector: a record turned
//! HARD replays as E[y_t].
use super::hrpo::HrpoGate;
use super::mix;
use super::rollout::{LatentRecord, Rollout};
use super::router::{Router, SOFT};
use crate::model::{Llama, Step};
use anyhow::{bail, Result};
use tch::{Kind, Tensor};

pub struct ReplayBatch {
    /// Rollout rows in this batch.
    pub rows: Vec<usize>,
    /// (B, W, H) input embeddings: left-padded prompts, then generated inputs.
    pub inputs: Tensor,
    /// (B, W) real positions.
    pub valid: Tensor,
    /// (B, T) generated tokens, their modes, and which are real.
    pub tokens: Tensor,
    pub modes: Tensor,
    pub mask: Tensor,
    /// (B, T) router decisions (real and not forced).
    pub router_mask: Tensor,
    /// Width of the left-padded prompt block.
    pub prompt_width: i64,
}

/// Builds the replay inputs for `rows` of the rollout (no HRPO steps: those
/// need the gate, `build_with`).
pub fn build(net: &Llama, ro: &Rollout, rows: &[usize]) -> Result<ReplayBatch> {
    build_with(net, None, ro, rows)
}

/// `build` with the HRPO gate, which rows with HRPO steps need (the inputs of
/// those steps then carry the gate's autograd graph).
pub fn build_with(
    net: &Llama,
    gate: Option<&HrpoGate>,
    ro: &Rollout,
    rows: &[usize],
) -> Result<ReplayBatch> {
    if rows.is_empty() {
        bail!("replay of no rows");
    }
    if let Some(&r) = rows.iter().find(|&&r| r >= ro.records.len()) {
        bail!(
            "replay row {r} out of range (rollout has {} rows)",
            ro.records.len()
        );
    }
    let dev = net.embed_tokens.device();
    let k = ro.mix_k as usize;
    let p = rows.iter().map(|&r| ro.prompts[r].len()).max().unwrap_or(0);
    let t = rows.iter().map(|&r| ro.records[r].len()).max().unwrap_or(0);
    if t == 0 {
        bail!("replay of completions with no generated tokens");
    }
    let b = rows.len();
    let (mut prompt, mut pvalid) = (vec![0i64; b * p], vec![false; b * p]);
    let (mut toks, mut modes, mut mask, mut rmask) = (
        vec![0i64; b * t],
        vec![0i64; b * t],
        vec![false; b * t],
        vec![false; b * t],
    );
    let (mut mids, mut mw) = (vec![0i64; b * t * k], vec![0f32; b * t * k]);
    // Latent vectors (recorded inputs; HRPO states), allocated when first needed.
    let hs = net.cfg.hidden_size as usize;
    let (mut lat_in, mut lat_hrpo): (Option<Vec<f32>>, Option<Vec<f32>>) = (None, None);
    let (mut is_in, mut is_hrpo) = (vec![false; b * t], vec![false; b * t]);
    for (i, &r) in rows.iter().enumerate() {
        let pr = &ro.prompts[r];
        let off = p - pr.len();
        for (j, &id) in pr.iter().enumerate() {
            prompt[i * p + off + j] = id;
            pvalid[i * p + off + j] = true;
        }
        for (j, rec) in ro.records[r].iter().enumerate() {
            let at = i * t + j;
            toks[at] = rec.token;
            modes[at] = rec.mode;
            mask[at] = true;
            rmask[at] = !rec.forced;
            if rec.mode != SOFT {
                continue;
            }
            let (v, dst, flag) = match &rec.latent {
                LatentRecord::None => {
                    if rec.mix_ids.len() != k || rec.mix_weights.len() != k {
                        bail!("row {r} token {j}: soft record without its {k} mixture entries");
                    }
                    mids[at * k..(at + 1) * k].copy_from_slice(&rec.mix_ids);
                    mw[at * k..(at + 1) * k].copy_from_slice(&rec.mix_weights);
                    continue;
                }
                LatentRecord::Input(v) => (v, &mut lat_in, &mut is_in),
                LatentRecord::Hrpo(v) => {
                    if gate.is_none() {
                        bail!(
                            "row {r} token {j}: an HRPO step needs the gate (replay::build_with)"
                        );
                    }
                    (v, &mut lat_hrpo, &mut is_hrpo)
                }
            };
            if v.len() != hs {
                bail!(
                    "row {r} token {j}: latent vector of {} values for hidden size {hs}",
                    v.len()
                );
            }
            dst.get_or_insert_with(|| vec![0f32; b * t * hs])[at * hs..(at + 1) * hs]
                .copy_from_slice(v);
            flag[at] = true;
        }
    }
    let (bi, pi, ti, ki) = (b as i64, p as i64, t as i64, k as i64);
    let tensor = |v: &[i64], shape: &[i64]| -> Result<Tensor> {
        Ok(Tensor::from_slice(v).f_view(shape)?.f_to_device(dev)?)
    };
    let flags = |v: &[bool]| -> Result<Tensor> {
        Ok(Tensor::from_slice(v).f_view([bi, -1])?.f_to_device(dev)?)
    };
    let tokens = tensor(&toks, &[bi, ti])?;
    let modes_t = tensor(&modes, &[bi, ti])?;
    let mask_t = flags(&mask)?;

    // Inputs of generated tokens 0..T-2 (the last token's input predicts nothing).
    let n = ti - 1;
    let hard = net.embed(&tokens.f_narrow(1, 0, n)?)?;
    let soft = mix::embed(
        &net.embed_tokens,
        &tensor(&mids, &[bi, ti, ki])?.f_narrow(1, 0, n)?,
        &Tensor::from_slice(&mw)
            .f_view([bi, ti, ki])?
            .f_to_device(dev)?
            .f_narrow(1, 0, n)?,
    )?;
    let is_soft = modes_t.f_narrow(1, 0, n)?.f_eq(SOFT)?.f_unsqueeze(-1)?;
    let mut gen_inputs = soft.f_where_self(&is_soft, &hard)?;
    let hi = hs as i64;
    let latent = |v: &[f32]| -> Result<Tensor> {
        Ok(Tensor::from_slice(v)
            .f_view([bi, ti, hi])?
            .f_narrow(1, 0, n)?
            .f_to_device(dev)?)
    };
    let at_steps =
        |f: &[bool]| -> Result<Tensor> { Ok(flags(f)?.f_narrow(1, 0, n)?.f_unsqueeze(-1)?) };
    if let Some(v) = &lat_in {
        let x = latent(v)?.f_to_kind(hard.kind())?;
        gen_inputs = x.f_where_self(&at_steps(&is_in)?, &gen_inputs)?;
    }
    if let (Some(v), Some(g)) = (&lat_hrpo, gate) {
        let x = g.forward(&hard, &latent(v)?)?.f_to_kind(hard.kind())?;
        gen_inputs = x.f_where_self(&at_steps(&is_hrpo)?, &gen_inputs)?;
    }
    let prompt_inputs = net.embed(&tensor(&prompt, &[bi, pi])?)?;
    let inputs = Tensor::f_cat(&[&prompt_inputs, &gen_inputs], 1)?;
    // A generated input is real iff the token after it is.
    let gen_valid = mask_t.f_narrow(1, 1, n)?;
    let valid = Tensor::f_cat(&[&flags(&pvalid)?, &gen_valid], 1)?;
    Ok(ReplayBatch {
        rows: rows.to_vec(),
        inputs,
        valid,
        tokens,
        modes: modes_t,
        mask: mask_t,
        router_mask: flags(&rmask)?,
        prompt_width: pi,
    })
}

pub struct Scores {
    /// (B, T, H) final-normed hidden states at the positions that predict each token.
    pub hidden: Tensor,
    /// (B, T) log p(y_t) under softmax(z / temperature).
    pub logp: Tensor,
    /// (B, T) log pi_r(m_t | h_t), with a router.
    pub router_logp: Option<Tensor>,
    /// (B, T, 2) log pi_r(. | h_t), with a router.
    pub router_all: Option<Tensor>,
}

/// One forward over the replayed inputs (with autograd unless disabled by the caller).
pub fn score(
    net: &Llama,
    router: Option<&Router>,
    batch: &ReplayBatch,
    temperature: f64,
) -> Result<Scores> {
    check_temperature(temperature)?;
    heads(net, router, batch, &hidden_states(net, batch)?, temperature)
}

/// `score` with the heads on a detached copy of the hidden states that
/// requires grad: a backward of the loss then stops there and leaves dL/dh in
/// `scores.hidden.grad()` (the grad_hidden_norm metric), and `h.backward`
/// with that gradient (see `rl::update`) carries it on into the backbone, so
/// the two halves cost one backward. Returns (scores, the backbone's h).
pub fn score_split(
    net: &Llama,
    router: Option<&Router>,
    batch: &ReplayBatch,
    temperature: f64,
) -> Result<(Scores, Tensor)> {
    check_temperature(temperature)?;
    let h = hidden_states(net, batch)?;
    let leaf = h.f_detach()?.set_requires_grad(true);
    Ok((heads(net, router, batch, &leaf, temperature)?, h))
}

/// `score` without autograd for the KL reference, prefilling each distinct
/// prompt of the batch once (a group repeats its prompt, often more than half
/// of every row) and running only the generated inputs per row over a copy of
/// its prompt's cache. Equal to `score` up to float rounding.
pub fn score_shared_prompts(
    net: &Llama,
    router: Option<&Router>,
    ro: &Rollout,
    batch: &ReplayBatch,
    temperature: f64,
) -> Result<Scores> {
    check_temperature(temperature)?;
    let _g = tch::no_grad_guard();
    let prompts: Vec<Vec<i64>> = batch.rows.iter().map(|&r| ro.prompts[r].clone()).collect();
    let (p, w) = (batch.prompt_width, batch.inputs.size()[1]);
    let n = w - p; // generated inputs per row (T - 1)
    let (last, mut cache) = super::rollout::prefill(net, &prompts, n)?;
    let mut hidden = last.f_unsqueeze(1)?; // predicts token 0
    if n > 0 {
        let step = cache.step(&batch.valid.f_narrow(1, p, n)?)?;
        let gen = net.forward(&batch.inputs.f_narrow(1, p, n)?, &step, Some(&cache))?;
        hidden = Tensor::f_cat(&[&hidden, &gen], 1)?;
    }
    heads(net, router, batch, &hidden, temperature)
}

fn check_temperature(temperature: f64) -> Result<()> {
    if temperature.is_nan() || temperature <= 0.0 {
        bail!("scoring temperature must be > 0, got {temperature}");
    }
    Ok(())
}

/// (B, T, H) final-normed hidden states at the positions that predict each token.
fn hidden_states(net: &Llama, batch: &ReplayBatch) -> Result<Tensor> {
    let h = net.forward(&batch.inputs, &Step::full(&batch.valid)?, None)?;
    let t = batch.tokens.size()[1];
    let at = Tensor::f_arange_start(
        batch.prompt_width - 1,
        batch.prompt_width - 1 + t,
        (Kind::Int64, h.device()),
    )?;
    Ok(h.f_index_select(1, &at)?)
}

/// Token and router log-probs from the hidden states.
fn heads(
    net: &Llama,
    router: Option<&Router>,
    batch: &ReplayBatch,
    hidden: &Tensor,
    temperature: f64,
) -> Result<Scores> {
    // log p(y) = z_y - logsumexp(z): no (B, T, V) log-softmax is kept for backward.
    let z = net
        .logits(hidden)?
        .f_to_kind(Kind::Float)?
        .f_div_scalar(temperature)?;
    let logp = z
        .f_gather(-1, &batch.tokens.f_unsqueeze(-1)?, false)?
        .f_squeeze_dim(-1)?
        .f_sub(&z.f_logsumexp([-1].as_slice(), false)?)?;
    let (router_logp, router_all) = match router {
        Some(r) => {
            let all = r.log_probs(hidden)?;
            let lp = all
                .f_gather(-1, &batch.modes.f_unsqueeze(-1)?, false)?
                .f_squeeze_dim(-1)?;
            (Some(lp), Some(all))
        }
        None => (None, None),
    };
    Ok(Scores {
        hidden: hidden.shallow_clone(),
        logp,
        router_logp,
        router_all,
    })
}
