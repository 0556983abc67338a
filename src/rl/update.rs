//! Gradients of the policy loss on a scored rollout, in bounded memory: the
//! rows replay in micro-batches, the LM head runs over the positions in
//! chunks, and each chunk's part of the loss is backpropagated at once, so
//! no (B, T, V) logits tensor outlives its chunk (at a 152k vocabulary and
//! T = 1024 a micro-batch's logits alone are gigabytes).
//!
//! The normalisation is deferred: `backward` adds the gradient of the loss's
//! numerator (the weighted sum of `loss_agg::token_weights`) and returns it
//! with its denominator in `LossSums`. Any number of calls (micro-batches of a
//! rollout, or several rollouts accumulated into one optimizer step) then
//! give exactly the gradient of the whole batch's loss once `finish` divides
//! by the summed denominator, in every normalisation mode.
use super::loss::{masked_sum, token_terms, LossConfig, LossInputs, LossMetrics};
use super::loss_agg::{denominator, token_weights, weighted_sum, Norm};
use super::optim::scale_grads;
use super::policy::{Policy, Reference};
use super::rltt::{self, LoopWeighting};
use crate::model::Llama;
use crate::policy::replay::{self, ReplayBatch, Scores};
use crate::policy::Rollout;
use anyhow::{bail, Result};
use tch::{Kind, Tensor};

/// Which inputs the reference sees: the policy's own (default) or all-hard ones
/// (the paper's code, whose token KL then compares different conditionals).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefInputs {
    Same,
    Hard,
}

/// How the rollout is replayed for the loss.
#[derive(Debug, Clone)]
pub struct ReplayConfig {
    pub loss: LossConfig,
    /// Completions per replay forward.
    pub micro_batch: usize,
    pub ref_inputs: RefInputs,
    /// Log-probs are scored at the rollout's temperature unless set.
    pub score_temperature: Option<f64>,
    /// Positions per LM-head chunk (default: `replay::chunk_len`'s budget).
    pub logits_chunk: Option<i64>,
    /// RLTT: every loop of a looped model in the policy gradient, weighted so
    /// (None: the final loop alone, GRPO's).
    pub loops: Option<LoopWeighting>,
}

impl ReplayConfig {
    pub fn new(loss: LossConfig) -> Self {
        ReplayConfig {
            loss,
            micro_batch: 8,
            ref_inputs: RefInputs::Same,
            score_temperature: None,
            logits_chunk: None,
            loops: None,
        }
    }
}

/// The loss's numerator and denominator and its metrics' sums, added up over
/// the calls of `backward` that make one optimizer step.
#[derive(Debug, Clone, Copy)]
pub struct LossSums {
    pub norm: Norm,
    pub max_len: i64,
    /// Weighted sum of the per-token loss (the numerator).
    pub loss: f64,
    /// Sequences with a token (`token-mean`: tokens): the denominator.
    pub denominator: f64,
    pub kl_token: f64,
    pub tokens: f64,
    pub kl_router: f64,
    pub decisions: f64,
    pub clipped: f64,
    /// Squared norm of the numerator's gradient at the heads' input.
    pub grad_h_sq: f64,
}

impl LossSums {
    pub fn new(cfg: &LossConfig) -> Self {
        LossSums {
            norm: cfg.norm,
            max_len: cfg.max_len,
            loss: 0.0,
            denominator: 0.0,
            kl_token: 0.0,
            tokens: 0.0,
            kl_router: 0.0,
            decisions: 0.0,
            clipped: 0.0,
            grad_h_sq: 0.0,
        }
    }

    /// Adds another part of the same batch (same normalisation).
    pub fn add(&mut self, o: &LossSums) -> Result<()> {
        if o.norm != self.norm
            || (self.norm == Norm::SeqMeanTokenSumNorm && o.max_len != self.max_len)
        {
            bail!(
                "cannot accumulate a {} loss (max_len {}) with a {} one (max_len {}): one optimizer step has one normalisation",
                o.norm, o.max_len, self.norm, self.max_len
            );
        }
        self.loss += o.loss;
        self.denominator += o.denominator;
        self.kl_token += o.kl_token;
        self.tokens += o.tokens;
        self.kl_router += o.kl_router;
        self.decisions += o.decisions;
        self.clipped += o.clipped;
        self.grad_h_sq += o.grad_h_sq;
        Ok(())
    }

    /// The sums, in a fixed order (what ranks add up).
    pub fn values(&self) -> [f64; 8] {
        [
            self.loss,
            self.denominator,
            self.kl_token,
            self.tokens,
            self.kl_router,
            self.decisions,
            self.clipped,
            self.grad_h_sq,
        ]
    }

    /// Sets the sums from `values()`'s order.
    pub fn set_values(&mut self, v: [f64; 8]) {
        [
            self.loss,
            self.denominator,
            self.kl_token,
            self.tokens,
            self.kl_router,
            self.decisions,
            self.clipped,
            self.grad_h_sq,
        ] = v;
    }

    /// What the gradient is divided by (at least 1: a batch without tokens gives 0).
    pub fn scale(&self) -> f64 {
        self.denominator.max(1.0)
    }

    /// The batch's loss and its means.
    pub fn metrics(&self) -> LossMetrics {
        let per = |s: f64, n: f64| if n > 0.0 { s / n } else { 0.0 };
        LossMetrics {
            loss: self.loss / self.scale(),
            kl_token: per(self.kl_token, self.tokens),
            kl_router: per(self.kl_router, self.decisions),
            grad_hidden_norm: self.grad_h_sq.sqrt() / self.scale(),
            clip_frac: per(self.clipped, self.tokens),
        }
    }
}

/// Turns the summed gradients in `params` into the whole batch's (divides by
/// the denominator) and returns the batch's metrics.
pub fn finish(params: &[Tensor], sums: &LossSums) -> Result<LossMetrics> {
    scale_grads(params, 1.0 / sums.scale())?;
    Ok(sums.metrics())
}

/// Adds the gradient of the loss on `ro` (advantages `adv`, one per row) to
/// the parameters' `.grad` and returns the full-batch loss metrics: `backward`
/// then `finish`. The caller zeroes gradients before and steps after.
pub fn accumulate_gradients(
    p: &Policy,
    ro: &Rollout,
    adv: &[f64],
    cfg: &ReplayConfig,
) -> Result<LossMetrics> {
    let sums = backward(p, ro, adv, cfg)?;
    finish(&p.parameters(), &sums)
}

/// Adds the gradient of the loss's numerator on `ro` to the parameters'
/// `.grad`, micro-batch by micro-batch, and returns its sums.
pub fn backward(p: &Policy, ro: &Rollout, adv: &[f64], cfg: &ReplayConfig) -> Result<LossSums> {
    let n = ro.records.len();
    if adv.len() != n {
        bail!("{} advantages for a rollout of {n} completions", adv.len());
    }
    if cfg.micro_batch == 0 {
        bail!("micro_batch must be >= 1 (completions per replay forward)");
    }
    if let Some(i) = adv.iter().position(|a| !a.is_finite()) {
        bail!("advantage {i} is {} (not finite)", adv[i]);
    }
    if cfg.loops.is_some() {
        check_rltt(p, cfg)?;
    }
    let lens = ro.lengths();
    let rows: Vec<usize> = (0..n).filter(|&i| lens[i] > 0).collect();
    let chunks: Vec<&[usize]> = rows.chunks(cfg.micro_batch).collect();
    let mut sums = LossSums::new(&cfg.loss);
    let bar = crate::ctl::Progress::new("replay", chunks.len() as u64);
    for (c, chunk) in chunks.into_iter().enumerate() {
        crate::ctl::check()?;
        bar.set(c as u64);
        let batch = replay::build_with(&p.model.net, p.gate.as_ref(), ro, chunk)?;
        let adv_t = Tensor::from_slice(&chunk.iter().map(|&i| adv[i] as f32).collect::<Vec<_>>())
            .f_to_device(batch.inputs.device())?;
        sums.add(&micro_batch(p, ro, &batch, &adv_t, cfg)?)?;
    }
    Ok(sums)
}

/// One micro-batch: the backbone forward, the heads and the loss chunk by
/// chunk over T with a backward each (to the heads' input h, a leaf), then
/// one backward of dL/dh into the backbone.
fn micro_batch(
    p: &Policy,
    ro: &Rollout,
    batch: &ReplayBatch,
    adv: &Tensor,
    cfg: &ReplayConfig,
) -> Result<LossSums> {
    let net = &p.model.net;
    let temp = cfg.score_temperature.unwrap_or(ro.temperature);
    replay::check_temperature(temp)?;
    // Every loop's states for RLTT, else the one the heads read; each a
    // detached leaf whose gradient is carried into the backbone at the end.
    let hs = match cfg.loops {
        Some(_) => replay::hidden_states_loops(net, batch)?,
        None => vec![replay::hidden_states(net, batch)?],
    };
    let leaves = (hs.iter())
        .map(|h| Ok(h.f_detach()?.set_requires_grad(true)))
        .collect::<Result<Vec<_>>>()?;
    let leaf = leaves.last().expect("one loop at least");
    let reference = match (cfg.loss.beta != 0.0, &p.reference, cfg.ref_inputs) {
        (false, ..) => None,
        // A frozen backbone is its own reference: its scores are the policy's.
        (true, Reference::Own, RefInputs::Same) => None,
        _ => Some(reference_scores(p, ro, batch, temp, cfg.ref_inputs)?),
    };
    let old = if cfg.loss.clip.is_some() {
        Some(old_logps(ro, batch)?)
    } else {
        None
    };
    let norm = cfg.loss.norm;
    let weights = token_weights(&batch.mask, norm, cfg.loss.max_len)?;
    let mut sums = LossSums::new(&cfg.loss);
    let (b, t) = (batch.tokens.size()[0], batch.tokens.size()[1]);
    let step = cfg
        .logits_chunk
        .unwrap_or_else(|| replay::chunk_len(b, net.cfg.vocab_size) / leaves.len() as i64)
        .max(1);
    for start in (0..t).step_by(step as usize) {
        let cut = |x: &Tensor| x.f_narrow(1, start, step.min(t - start));
        let hc = cut(leaf)?;
        let modes = cut(&batch.modes)?;
        let tokens = cut(&batch.tokens)?;
        let logp = replay::token_logp(net, &hc, &tokens, temp)?;
        let mixed = match cfg.loops {
            Some(w) => Some(loop_mixture(p, w, &leaves, &cut, &tokens, &logp, temp)?),
            None => None,
        };
        let router = match &p.router {
            Some(r) => Some(replay::router_logp(r, &hc, &modes)?.1),
            None => None,
        };
        let (logp_ref, router_ref) = match &reference {
            Some(s) => (
                Some(cut(&s.logp)?),
                s.router_logp.as_ref().map(cut).transpose()?,
            ),
            None if cfg.loss.beta != 0.0 => own_reference(p, &hc, &modes, &logp)?,
            None => (None, None),
        };
        let old_c = match &old {
            Some((lp, rlp)) => Some((cut(lp)?, cut(rlp)?)),
            None => None,
        };
        let (mask, rmask) = (cut(&batch.mask)?, cut(&batch.router_mask)?);
        let x = LossInputs {
            logp: mixed.as_ref().unwrap_or(&logp),
            logp_kl: mixed.as_ref().map(|_| &logp),
            logp_ref: logp_ref.as_ref(),
            logp_old: old_c.as_ref().map(|o| &o.0),
            router_logp: router.as_ref(),
            router_logp_ref: router_ref.as_ref(),
            router_logp_old: old_c.as_ref().map(|o| &o.1),
            adv,
            mask: &mask,
            router_mask: &rmask,
        };
        let terms = token_terms(&x, &cfg.loss)?;
        let mut part = weighted_sum(&terms.loss, &mask, &cut(&weights)?)?;
        if crate::faults::nan("loss") {
            part = part.f_mul_scalar(f64::NAN)?;
        }
        crate::faults::point("replay.backward");
        part.f_backward()?;
        sums.loss += part.double_value(&[]);
        let (kl, n) = masked_sum(&terms.kl_token, &mask)?;
        let (klr, nr) = masked_sum(&terms.kl_router, &rmask)?;
        let (clipped, _) = masked_sum(&terms.clipped, &mask)?;
        sums.kl_token += kl;
        sums.tokens += n;
        sums.kl_router += klr;
        sums.decisions += nr;
        sums.clipped += clipped;
    }
    sums.denominator = denominator(&batch.mask, norm)?;
    let mut carry: Option<Tensor> = None;
    for (h, leaf) in hs.iter().zip(&leaves) {
        let g = leaf.grad();
        if !g.defined() {
            continue;
        }
        sums.grad_h_sq += g.f_square()?.f_sum(Kind::Double)?.double_value(&[]);
        if h.requires_grad() {
            let part = h.f_mul(&g)?.f_sum(Kind::Float)?;
            carry = Some(match carry {
                Some(c) => c.f_add(&part)?,
                None => part,
            });
        }
    }
    // One backward through the shared stack for every loop's gradient.
    if let Some(c) = carry {
        c.f_backward()?;
    }
    Ok(sums)
}

/// RLTT trains every loop of a looped model that samples from its last.
fn check_rltt(p: &Policy, cfg: &ReplayConfig) -> Result<()> {
    let c = &p.model.net.cfg;
    if c.loops < 2 {
        bail!(
            "loop weights (RLTT) need a looped model (total_ut_steps >= 2); this one has {} loop",
            c.loops
        );
    }
    if c.early_exit_threshold < 1.0 {
        bail!(
            "RLTT credits every loop of completions sampled from the last one: this model exits early (early_exit_threshold {}); set it to 1 in config.json",
            c.early_exit_threshold
        );
    }
    if cfg.loss.clip.is_some() {
        bail!("RLTT is plain REINFORCE (one update per rollout): leave clip_low unset");
    }
    Ok(())
}

/// RLTT's sum_t w_t log P^(t)(y) on one chunk (`cut`) of every loop's
/// states; `last` is the final loop's, already scored.
fn loop_mixture(
    p: &Policy,
    w: LoopWeighting,
    leaves: &[Tensor],
    cut: &dyn Fn(&Tensor) -> Result<Tensor, tch::TchError>,
    tokens: &Tensor,
    last: &Tensor,
    temp: f64,
) -> Result<Tensor> {
    let net = &p.model.net;
    let hc: Vec<Tensor> = leaves.iter().map(cut).collect::<Result<_, _>>()?;
    let mut logps = Vec::with_capacity(hc.len());
    for h in &hc[..hc.len() - 1] {
        logps.push(replay::token_logp(net, h, tokens, temp)?);
    }
    logps.push(last.shallow_clone());
    let pdf = match w {
        LoopWeighting::ExitPdf => net.exit_distribution(&hc)?,
        _ => None,
    };
    let weights = rltt::weights(w, hc.len(), pdf.as_ref(), p.loop_logits.as_ref())?;
    rltt::mix(&logps, &weights)
}

/// A frozen backbone's reference on the policy's own inputs: its token
/// log-probs are the policy's, and the router reference reads the same h.
fn own_reference(
    p: &Policy,
    hc: &Tensor,
    modes: &Tensor,
    logp: &Tensor,
) -> Result<(Option<Tensor>, Option<Tensor>)> {
    let _g = tch::no_grad_guard();
    let router = match &p.router_ref {
        Some(r) => Some(replay::router_logp(r, &hc.f_detach()?, modes)?.1),
        None => None,
    };
    Ok((Some(logp.f_detach()?), router))
}

/// The frozen reference's scores on the same rows (no autograd).
fn reference_scores(
    p: &Policy,
    ro: &Rollout,
    batch: &ReplayBatch,
    temp: f64,
    inputs: RefInputs,
) -> Result<Scores> {
    let _g = tch::no_grad_guard();
    let net = &p.model.net;
    let hard;
    let source = match inputs {
        RefInputs::Same => ro,
        RefInputs::Hard => {
            hard = all_hard(ro);
            &hard
        }
    };
    let score = |reference: &Llama| {
        // The reference embeds the inputs with its own table (a fully
        // fine-tuned policy's has moved). Its router is scored at the modes
        // the policy chose, not at all-hard modes: those would compare
        // log pi(soft) with log pi_ref(hard) at every soft step (about 93
        // nats of k3 at the paper's initial bias).
        let own;
        let rows = if std::ptr::eq(reference, net) && inputs == RefInputs::Same {
            batch
        } else {
            let mut b = replay::build_with(reference, p.gate.as_ref(), source, &batch.rows)?;
            b.modes = batch.modes.shallow_clone();
            own = b;
            &own
        };
        replay::score(reference, p.router_ref.as_ref(), rows, temp)
    };
    p.with_reference(score)
}

/// The same completions with every input hard (for `ref_inputs: hard`).
fn all_hard(ro: &Rollout) -> Rollout {
    let mut out = ro.select(&(0..ro.records.len()).collect::<Vec<_>>());
    for r in out.records.iter_mut().flatten() {
        if r.has_token() {
            r.mode = crate::policy::HARD;
            r.mix_ids.clear();
            r.mix_weights.clear();
            r.latent = Default::default();
        }
    }
    out
}

/// The rollout's recorded token and router log-probs as (B, T) tensors (PPO's old policy).
fn old_logps(ro: &Rollout, batch: &ReplayBatch) -> Result<(Tensor, Tensor)> {
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
    Ok((to(&lp)?, to(&rlp)?))
}
