//! Teacher-forced replay of a rollout, with autograd.
//!
//! Rebuilds exactly the inputs the rollout fed the model: prompt tokens, then
//! for each generated step its token's embedding (hard), its mixture rebuilt
//! from the recorded top-k ids and weights with the current embedding matrix
//! (soft), or its recorded vector (latent), with the rollout's positions and
//! attention mask (the reference code dropped the mask in training). One
//! forward (each distinct prompt once, `hidden_states_loops`) gives every
//! position's hidden state, from which token and router log-probs follow.
//!
//! Latent steps of the other methods (`latent::Latent`): Soft Thinking's and
//! Coconut's recorded input vectors are fed back as constants (no gradient
//! flows through a latent input into the positions that produced it, as in the
//! GRPO-style training of these methods); HRPO's input is recomputed from the
//! recorded h_hat as gate(E[y_t], h_hat) with autograd, so the gate trains
//! (`build_with`). Only SOFT and LATENT records use their latent vector: a
//! record turned HARD replays as E[y_t]. Coconut's thoughts (LATENT) carry no
//! token: they are steps of the sequence but not of the token mask.
//!
//! The LM head runs over the positions in chunks (`chunk_len`): at a 152k
//! vocabulary the (B, T, V) logits of a whole micro-batch are gigabytes, and
//! `rl::update` backpropagates chunk by chunk so that only one chunk's logits
//! ever exist.
use super::hrpo::HrpoGate;
use super::mix;
use super::records::{LatentRecord, Rollout, LATENT, SOFT};
use super::router::Router;
use crate::model::{left_pad, Llama};
use anyhow::{bail, Result};
use tch::{Kind, Tensor};

pub struct ReplayBatch {
    /// Rollout rows in this batch.
    pub rows: Vec<usize>,
    /// (B, W, H) input embeddings: left-padded prompts, then generated inputs.
    pub inputs: Tensor,
    /// (B, W) real positions.
    pub valid: Tensor,
    /// (B, T) generated tokens (0 at LATENT steps) and their modes.
    pub tokens: Tensor,
    pub modes: Tensor,
    /// (B, T) real steps.
    pub steps: Tensor,
    /// (B, T) steps with a sampled token: what the token loss counts.
    pub mask: Tensor,
    /// (B, T) router decisions (real and not forced).
    pub router_mask: Tensor,
    /// Width of the left-padded prompt block.
    pub prompt_width: i64,
    /// Each row's prompt (what the forward runs once per distinct prompt).
    pub prompts: Vec<Vec<i64>>,
}

/// Builds the replay inputs for `rows` of the rollout (no HRPO steps: those
/// need the gate, `build_with`).
pub fn build(net: &Llama, ro: &Rollout, rows: &[usize]) -> Result<ReplayBatch> {
    build_with(net, None, ro, rows)
}

/// Per-step host arrays of a batch, (B, T) row-major (mixtures (B, T, k),
/// latent vectors (B, T, H) allocated when first needed).
struct HostSteps {
    /// Steps, mixture size and hidden size of the batch.
    t: usize,
    k: usize,
    hs: usize,
    toks: Vec<i64>,
    modes: Vec<i64>,
    steps: Vec<bool>,
    mask: Vec<bool>,
    rmask: Vec<bool>,
    mix_ids: Vec<i64>,
    mix_w: Vec<f32>,
    inputs: Option<Vec<f32>>,
    is_input: Vec<bool>,
    hrpo: Option<Vec<f32>>,
    is_hrpo: Vec<bool>,
}

impl HostSteps {
    fn new(b: usize, t: usize, k: usize, hs: usize) -> Self {
        let n = b * t;
        HostSteps {
            t,
            k,
            hs,
            toks: vec![0; n],
            modes: vec![0; n],
            steps: vec![false; n],
            mask: vec![false; n],
            rmask: vec![false; n],
            mix_ids: vec![0; n * k],
            mix_w: vec![0.0; n * k],
            inputs: None,
            is_input: vec![false; n],
            hrpo: None,
            is_hrpo: vec![false; n],
        }
    }

    /// Copies the records of rollout row `r` into batch row `i`.
    fn fill(&mut self, i: usize, r: usize, ro: &Rollout, gate: bool) -> Result<()> {
        let (t, k, hs) = (self.t, self.k, self.hs);
        for (j, rec) in ro.records[r].iter().enumerate() {
            let at = i * t + j;
            self.toks[at] = if rec.has_token() { rec.token } else { 0 };
            self.modes[at] = rec.mode;
            self.steps[at] = true;
            self.mask[at] = rec.has_token();
            self.rmask[at] = !rec.forced;
            if rec.mode != SOFT && rec.mode != LATENT {
                continue;
            }
            let (v, dst, flag) = match &rec.latent {
                LatentRecord::None if rec.mode == LATENT => {
                    bail!("row {r} step {j}: a latent step without its recorded input")
                }
                LatentRecord::None => {
                    if rec.mix_ids.len() != k || rec.mix_weights.len() != k {
                        bail!("row {r} token {j}: soft record without its {k} mixture entries");
                    }
                    self.mix_ids[at * k..(at + 1) * k].copy_from_slice(&rec.mix_ids);
                    self.mix_w[at * k..(at + 1) * k].copy_from_slice(&rec.mix_weights);
                    continue;
                }
                LatentRecord::Input(v) => (v, &mut self.inputs, &mut self.is_input),
                LatentRecord::Hrpo(v) => {
                    if !gate {
                        bail!(
                            "row {r} token {j}: an HRPO step needs the gate (replay::build_with)"
                        );
                    }
                    (v, &mut self.hrpo, &mut self.is_hrpo)
                }
            };
            if v.len() != hs {
                bail!(
                    "row {r} token {j}: latent vector of {} values for hidden size {hs}",
                    v.len()
                );
            }
            let n = self.toks.len();
            dst.get_or_insert_with(|| vec![0f32; n * hs])[at * hs..(at + 1) * hs]
                .copy_from_slice(v);
            flag[at] = true;
        }
        Ok(())
    }
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
    let t = rows.iter().map(|&r| ro.records[r].len()).max().unwrap_or(0);
    if t == 0 {
        bail!("replay of completions with no generated tokens");
    }
    let (b, hs) = (rows.len(), net.cfg.hidden_size as usize);
    let mut host = HostSteps::new(b, t, k, hs);
    for (i, &r) in rows.iter().enumerate() {
        host.fill(i, r, ro, gate.is_some())?;
    }
    let (bi, ti, ki, hi) = (b as i64, t as i64, k as i64, hs as i64);
    let ints = |v: &[i64], shape: &[i64]| -> Result<Tensor> {
        Ok(Tensor::from_slice(v).f_view(shape)?.f_to_device(dev)?)
    };
    let flags = |v: &[bool]| -> Result<Tensor> {
        Ok(Tensor::from_slice(v).f_view([bi, ti])?.f_to_device(dev)?)
    };
    let tokens = ints(&host.toks, &[bi, ti])?;
    let modes = ints(&host.modes, &[bi, ti])?;
    let steps = flags(&host.steps)?;

    // Inputs of generated steps 0..T-2 (the last step's input predicts nothing).
    let n = ti - 1;
    let first = |x: Tensor| -> Result<Tensor> { Ok(x.f_narrow(1, 0, n)?) };
    let hard = net.embed(&first(tokens.shallow_clone())?)?;
    let weights = Tensor::from_slice(&host.mix_w)
        .f_view([bi, ti, ki])?
        .f_to_device(dev)?;
    let soft = mix::embed(
        &net.embed_tokens,
        &first(ints(&host.mix_ids, &[bi, ti, ki])?)?,
        &first(weights)?,
    )?;
    let is_soft = first(modes.f_eq(SOFT)?)?.f_unsqueeze(-1)?;
    let mut gen_inputs = soft.f_where_self(&is_soft, &hard)?;
    let latent = |v: &[f32]| -> Result<Tensor> {
        first(
            Tensor::from_slice(v)
                .f_view([bi, ti, hi])?
                .f_to_device(dev)?,
        )
    };
    let at_steps = |f: &[bool]| -> Result<Tensor> { Ok(first(flags(f)?)?.f_unsqueeze(-1)?) };
    if let Some(v) = &host.inputs {
        let x = latent(v)?.f_to_kind(hard.kind())?;
        gen_inputs = x.f_where_self(&at_steps(&host.is_input)?, &gen_inputs)?;
    }
    if let (Some(v), Some(g)) = (&host.hrpo, gate) {
        let x = g.forward(&hard, &latent(v)?)?.f_to_kind(hard.kind())?;
        gen_inputs = x.f_where_self(&at_steps(&host.is_hrpo)?, &gen_inputs)?;
    }
    let prompts: Vec<Vec<i64>> = rows.iter().map(|&r| ro.prompts[r].clone()).collect();
    let (prompt_ids, prompt_valid) = left_pad(&prompts, dev)?;
    let inputs = Tensor::f_cat(&[&net.embed(&prompt_ids)?, &gen_inputs], 1)?;
    // A generated input is real iff the step after it is.
    let valid = Tensor::f_cat(&[&prompt_valid, &steps.f_narrow(1, 1, n)?], 1)?;
    Ok(ReplayBatch {
        rows: rows.to_vec(),
        inputs,
        valid,
        tokens,
        modes,
        steps,
        mask: flags(&host.mask)?,
        router_mask: flags(&host.rmask)?,
        prompt_width: prompt_ids.size()[1],
        prompts,
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

/// Elements of fp32 logits one LM-head chunk may hold (256 MB).
pub const LOGITS_BUDGET: i64 = 1 << 26;

/// Positions per LM-head chunk for `rows` sequences at vocabulary `vocab`.
pub fn chunk_len(rows: i64, vocab: i64) -> i64 {
    (LOGITS_BUDGET / (rows * vocab).max(1)).max(1)
}

/// One forward over the replayed inputs (with autograd unless disabled by the
/// caller). Under autograd every chunk's logits stay alive for the backward:
/// training goes through `rl::update`, which backpropagates per chunk.
pub fn score(
    net: &Llama,
    router: Option<&Router>,
    batch: &ReplayBatch,
    temperature: f64,
) -> Result<Scores> {
    check_temperature(temperature)?;
    heads(net, router, batch, &hidden_states(net, batch)?, temperature)
}

pub fn check_temperature(temperature: f64) -> Result<()> {
    if temperature.is_nan() || temperature <= 0.0 {
        bail!("scoring temperature must be > 0, got {temperature}");
    }
    Ok(())
}

/// (B, T, H) final-normed hidden states at the positions that predict each token.
pub fn hidden_states(net: &Llama, batch: &ReplayBatch) -> Result<Tensor> {
    net.exit_state(hidden_states_loops(net, batch)?)
}

/// `hidden_states` of every loop of a looped model (one for plain models).
///
/// Each distinct prompt of the batch runs once (a group repeats its prompt,
/// often half of every row): the prompts go through the model into a cache,
/// and each row's generated inputs then attend to a copy of its prompt's
/// keys and values. Equal to one forward over the padded rows up to float
/// rounding; under autograd the rows of a group backpropagate into their one
/// prompt forward.
pub fn hidden_states_loops(net: &Llama, batch: &ReplayBatch) -> Result<Vec<Tensor>> {
    let (p, w) = (batch.prompt_width, batch.inputs.size()[1]);
    let n = w - p; // generated inputs per row (T - 1)
    let (last, mut cache) = super::rollout::prefill_loops(net, &batch.prompts, n)?;
    if n == 0 {
        return Ok(last); // each predicts token 0
    }
    let step = cache.step(&batch.valid.f_narrow(1, p, n)?)?;
    let gen = net.forward_loops(&batch.inputs.f_narrow(1, p, n)?, &step, Some(&cache))?;
    (last.iter().zip(&gen))
        .map(|(a, g)| Ok(Tensor::f_cat(&[a, g], 1)?))
        .collect()
}

/// log p(y) = z_y - logsumexp(z), z = logits(hidden) / temperature, for hidden
/// (B, T, H) and tokens (B, T): (B, T) fp32. No (B, T, V) log-softmax is kept
/// for the backward, but z itself is: call it on chunks of T.
pub fn token_logp(
    net: &Llama,
    hidden: &Tensor,
    tokens: &Tensor,
    temperature: f64,
) -> Result<Tensor> {
    let z = net
        .logits(hidden)?
        .f_to_kind(Kind::Float)?
        .f_div_scalar(temperature)?;
    Ok(z.f_gather(-1, &tokens.f_unsqueeze(-1)?, false)?
        .f_squeeze_dim(-1)?
        .f_sub(&z.f_logsumexp([-1].as_slice(), false)?)?)
}

/// log pi_r(. | h) (B, T, 2) and its value at `modes` (B, T).
pub fn router_logp(router: &Router, hidden: &Tensor, modes: &Tensor) -> Result<(Tensor, Tensor)> {
    let all = router.log_probs(hidden)?;
    // Coconut's LATENT steps meet no router; clamp keeps the gather in range.
    let at = modes.f_clamp(0, 1)?.f_unsqueeze(-1)?;
    let lp = all.f_gather(-1, &at, false)?.f_squeeze_dim(-1)?;
    Ok((all, lp))
}

/// Token and router log-probs from the hidden states, the LM head in chunks of T.
fn heads(
    net: &Llama,
    router: Option<&Router>,
    batch: &ReplayBatch,
    hidden: &Tensor,
    temperature: f64,
) -> Result<Scores> {
    let (b, t) = (batch.tokens.size()[0], batch.tokens.size()[1]);
    let c = chunk_len(b, net.cfg.vocab_size);
    let mut parts = Vec::new();
    for start in (0..t).step_by(c as usize) {
        let len = c.min(t - start);
        let h = hidden.f_narrow(1, start, len)?;
        parts.push(token_logp(
            net,
            &h,
            &batch.tokens.f_narrow(1, start, len)?,
            temperature,
        )?);
    }
    let (router_all, router_lp) = match router {
        Some(r) => {
            let (all, lp) = router_logp(r, hidden, &batch.modes)?;
            (Some(all), Some(lp))
        }
        None => (None, None),
    };
    Ok(Scores {
        hidden: hidden.shallow_clone(),
        logp: Tensor::f_cat(&parts, 1)?,
        router_logp: router_lp,
        router_all,
    })
}
