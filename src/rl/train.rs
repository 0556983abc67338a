//! One training step of TARPO or of a token-only baseline, composed of the
//! primitives: rollout -> rewards -> advantages -> replay -> loss -> AdamW.
//! Each piece is its own function elsewhere; this file only wires them and
//! gathers the per-step metrics of ALGORITHMS.md section 2.
use super::advantage;
use super::loss::{policy_loss, LossConfig, LossInputs, LossMetrics};
use super::loss_agg::Norm;
use super::metrics::{rollout_metrics, StepMetrics};
use super::optim::{grad_norm, AdamW};
use crate::model::Model;
use crate::policy::replay::{self, ReplayBatch};
use crate::policy::router::HARD;
use crate::policy::{rollout_with, HrpoGate, Rng, Rollout, RolloutOptions, Router};
use anyhow::{bail, Result};
use tch::{Kind, Tensor};

/// Draws `k` more prompts (token ids) and their reference answers.
pub type PromptSource<'a> = dyn FnMut(usize) -> Result<(Vec<Vec<i64>>, Vec<String>)> + 'a;

/// What the KL terms compare against.
pub enum Reference {
    /// The policy's own base weights with LoRA switched off (no second copy).
    Base,
    /// A separate frozen model (full fine-tuning).
    Model(Box<Model>),
    /// No KL (beta = 0).
    None,
}

/// Which inputs the reference sees: the policy's own (default) or all-hard ones
/// (the paper's code, whose KL then compares different conditionals).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefInputs {
    Same,
    Hard,
}

pub struct Policy {
    pub model: Model,
    /// TARPO's router; None for token-only methods (GRPO, Dr. GRPO, DAPO).
    pub router: Option<Router>,
    /// The router at initialisation (the router's KL reference).
    pub router_ref: Option<Router>,
    /// HRPO's gated latent inputs (with `rollout.latent = Latent::Hrpo`).
    pub gate: Option<HrpoGate>,
    pub reference: Reference,
}

#[derive(Debug, Clone)]
pub struct TrainConfig {
    /// Completions per prompt.
    pub group: usize,
    /// Sampling, stop tokens, mixture size, answer marker (the seed is drawn per step).
    pub rollout: RolloutOptions,
    pub estimator: String,
    pub loss: LossConfig,
    /// Completions per replay forward (bounds memory at any group size).
    pub micro_batch: usize,
    pub ref_inputs: RefInputs,
    /// Log-probs are scored at the sampling temperature unless set (the
    /// reference code scored at 1.0 while sampling at 0.5).
    pub score_temperature: Option<f64>,
    /// DAPO's soft overlong punishment (max_len, cache), added to the reward.
    pub overlong: Option<(usize, usize)>,
    /// Optimizer steps per rollout (PPO epochs; > 1 needs `loss.clip`).
    pub epochs: usize,
}

pub struct Trainer {
    pub policy: Policy,
    pub opt: AdamW,
    pub cfg: TrainConfig,
    /// Optimizer steps taken.
    pub step: u64,
    /// Draws each step's rollout seed (part of the resumable state).
    pub rng: Rng,
}

impl Trainer {
    /// One step on `prompts` (token ids, each sampled `group` times) whose
    /// reference answers are `answers`; `reward(completion, answer)` scores text.
    pub fn step(
        &mut self,
        prompts: &[Vec<i64>],
        answers: &[String],
        reward: &dyn Fn(&str, &str) -> f64,
    ) -> Result<StepMetrics> {
        let (ro, rewards) = self.sample(prompts, answers, reward)?;
        let zero = advantage::zero_advantage_fraction(&rewards, self.cfg.group)?;
        self.update(&ro, &rewards, zero)
    }

    /// DAPO's dynamic sampling: groups whose rewards are all equal carry no
    /// signal, so they are dropped and more prompts drawn from `next(k)` until
    /// `n` informative groups are collected or `max_rounds` rollouts are spent
    /// (then the step trains on what it has; a step with none is skipped).
    pub fn step_dynamic(
        &mut self,
        n: usize,
        max_rounds: usize,
        next: &mut PromptSource,
        reward: &dyn Fn(&str, &str) -> f64,
    ) -> Result<StepMetrics> {
        let g = self.cfg.group;
        let (mut kept, mut kept_rewards, mut seen, mut zero) =
            (None::<Rollout>, Vec::new(), 0usize, 0usize);
        for _ in 0..max_rounds.max(1) {
            let have = kept_rewards.len() / g;
            if have >= n {
                break;
            }
            let (prompts, answers) = next(n - have)?;
            let (ro, rewards) = self.sample(&prompts, &answers, reward)?;
            let informative = advantage::informative_groups(&rewards, g)?;
            seen += rewards.len() / g;
            zero += rewards.len() / g - informative.len();
            let rows: Vec<usize> = informative
                .iter()
                .flat_map(|&k| k * g..(k + 1) * g)
                .take((n - have) * g)
                .collect();
            kept_rewards.extend(rows.iter().map(|&i| rewards[i]));
            let part = select_rows(&ro, &rows);
            kept = Some(match kept {
                Some(k) => concat(k, part)?,
                None => part,
            });
        }
        let zero_frac = if seen == 0 {
            0.0
        } else {
            zero as f64 / seen as f64
        };
        match kept {
            Some(ro) if !kept_rewards.is_empty() => self.update(&ro, &kept_rewards, zero_frac),
            _ => Ok(StepMetrics {
                step: self.step,
                zero_adv_frac: zero_frac,
                skipped: true,
                ..StepMetrics::default()
            }),
        }
    }

    /// Rolls out `group` completions per prompt and scores them (plus DAPO's
    /// overlong penalty when configured).
    fn sample(
        &mut self,
        prompts: &[Vec<i64>],
        answers: &[String],
        reward: &dyn Fn(&str, &str) -> f64,
    ) -> Result<(Rollout, Vec<f64>)> {
        if prompts.len() != answers.len() {
            bail!("{} prompts but {} answers", prompts.len(), answers.len());
        }
        let g = self.cfg.group;
        let expanded: Vec<Vec<i64>> = prompts
            .iter()
            .flat_map(|p| std::iter::repeat_n(p.clone(), g))
            .collect();
        let mut opts = self.cfg.rollout.clone();
        opts.seed = self.rng.next_u64();
        let p = &self.policy;
        let ro = rollout_with(
            &p.model.net,
            p.router.as_ref(),
            p.gate.as_ref(),
            Some(&p.model.tok),
            &expanded,
            &opts,
        )?;
        let mut rewards = Vec::with_capacity(expanded.len());
        for (i, toks) in ro.tokens().iter().enumerate() {
            let mut r = reward(&p.model.tok.decode(toks, true)?, &answers[i / g]);
            if let Some((max_len, cache)) = self.cfg.overlong {
                r += advantage::overlong_penalty(toks.len(), max_len, cache);
            }
            rewards.push(r);
        }
        Ok((ro, rewards))
    }

    /// Advantages, gradients and one optimizer step on a scored rollout.
    fn update(&mut self, ro: &Rollout, rewards: &[f64], zero_adv_frac: f64) -> Result<StepMetrics> {
        let g = self.cfg.group;
        let adv = advantage::compute(rewards, g, &self.cfg.estimator)?;
        let epochs = self.cfg.epochs.max(1);
        if epochs > 1 && self.cfg.loss.clip.is_none() {
            bail!("epochs = {epochs} needs the PPO clip (loss.clip): without the ratio every epoch repeats the same on-policy step");
        }
        // Several epochs over one rollout (PPO); the reported loss is the first, on-policy one.
        let (mut loss, mut router_grad, mut skipped) = (LossMetrics::default(), 0.0, false);
        let mut report = None;
        for e in 0..epochs {
            let l = self.accumulate_gradients(ro, &adv)?;
            if e == 0 {
                loss = l;
            }
            router_grad = match &self.policy.router {
                Some(r) => grad_norm(&r.parameters())?,
                None => 0.0,
            };
            let r = self.opt.step()?;
            self.opt.zero_grad()?;
            skipped |= r.skipped;
            self.step += 1;
            report = Some(r);
        }
        let Some(report) = report else {
            bail!("no optimizer step taken")
        };
        let mut m = rollout_metrics(&self.policy.model.net, ro, rewards, &adv, g)?;
        m.zero_adv_frac = zero_adv_frac;
        m.step = self.step;
        m.loss = loss.loss;
        m.kl_token = loss.kl_token;
        m.kl_router = loss.kl_router;
        m.grad_norm = report.grad_norm;
        m.grad_action_norm = router_grad;
        m.lr = report.lr;
        m.skipped = skipped;
        Ok(m)
    }

    /// Replays the rollout in micro-batches, backpropagating each chunk's share
    /// of the full-batch loss, so the summed gradient equals one big batch's.
    fn accumulate_gradients(&self, ro: &Rollout, adv: &[f64]) -> Result<LossMetrics> {
        let n = ro.records.len();
        let lens: Vec<usize> = ro.records.iter().map(Vec::len).collect();
        let total_tokens: usize = lens.iter().sum();
        let seqs = lens.iter().filter(|&&l| l > 0).count().max(1);
        let mut sum = LossMetrics::default();
        let rows: Vec<usize> = (0..n).filter(|&i| lens[i] > 0).collect();
        for chunk in rows.chunks(self.cfg.micro_batch.max(1)) {
            let share = match self.cfg.loss.norm {
                Norm::TokenMean => {
                    chunk.iter().map(|&i| lens[i]).sum::<usize>() as f64
                        / total_tokens.max(1) as f64
                }
                _ => chunk.len() as f64 / seqs as f64,
            };
            let batch =
                replay::build_with(&self.policy.model.net, self.policy.gate.as_ref(), ro, chunk)?;
            let adv_t =
                Tensor::from_slice(&chunk.iter().map(|&i| adv[i] as f32).collect::<Vec<_>>())
                    .f_to_device(batch.inputs.device())?;
            let (loss, m) = self.chunk_loss(ro, &batch, &adv_t)?;
            loss.f_mul_scalar(share)?.f_backward()?;
            sum.loss += m.loss * share;
            sum.kl_token += m.kl_token * share;
            sum.kl_router += m.kl_router * share;
        }
        Ok(sum)
    }

    fn chunk_loss(
        &self,
        ro: &Rollout,
        batch: &ReplayBatch,
        adv: &Tensor,
    ) -> Result<(Tensor, LossMetrics)> {
        let p = &self.policy;
        let temp = self.cfg.score_temperature.unwrap_or(ro.temperature);
        let cur = replay::score(&p.model.net, p.router.as_ref(), batch, temp)?;
        let reference = if self.cfg.loss.beta != 0.0 {
            Some(self.reference_scores(ro, batch, temp)?)
        } else {
            None
        };
        let (logp_old, router_old) = if self.cfg.loss.clip.is_some() {
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
        policy_loss(&x, &self.cfg.loss)
    }

    /// The frozen reference's scores on the same rows (no autograd).
    fn reference_scores(
        &self,
        ro: &Rollout,
        batch: &ReplayBatch,
        temp: f64,
    ) -> Result<replay::Scores> {
        let _g = tch::no_grad_guard();
        let p = &self.policy;
        let hard;
        let rows = match self.cfg.ref_inputs {
            RefInputs::Same => batch,
            RefInputs::Hard => {
                hard =
                    replay::build_with(&p.model.net, p.gate.as_ref(), &all_hard(ro), &batch.rows)?;
                &hard
            }
        };
        match &p.reference {
            Reference::Base => {
                p.model.net.set_lora_enabled(false);
                let s = replay::score(&p.model.net, p.router_ref.as_ref(), rows, temp);
                p.model.net.set_lora_enabled(true);
                s
            }
            Reference::Model(m) => replay::score(&m.net, p.router_ref.as_ref(), rows, temp),
            Reference::None => bail!(
                "beta > 0 needs a reference model (or LoRA, whose base weights are the reference)"
            ),
        }
    }
}

/// The given rows of a rollout (kept inputs are dropped).
fn select_rows(ro: &Rollout, rows: &[usize]) -> Rollout {
    Rollout {
        prompts: rows.iter().map(|&i| ro.prompts[i].clone()).collect(),
        records: rows.iter().map(|&i| ro.records[i].clone()).collect(),
        inputs: Vec::new(),
        temperature: ro.temperature,
        mix_k: ro.mix_k,
    }
}

/// Two rollouts of the same settings, one after the other.
fn concat(mut a: Rollout, b: Rollout) -> Result<Rollout> {
    if a.mix_k != b.mix_k || a.temperature != b.temperature {
        bail!("cannot join rollouts made with different settings");
    }
    a.prompts.extend(b.prompts);
    a.records.extend(b.records);
    a.inputs.clear();
    Ok(a)
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

/// Optimizer groups as the reference runs them: LoRA (backbone) at `lr`, the
/// router weight at `router_lr`, the router bias at `router_lr` without weight
/// decay (decay would pull the initial soft probability back to 50 %).
pub fn param_groups(
    policy: &Policy,
    lr: f64,
    router_lr: f64,
    weight_decay: f64,
) -> Vec<super::optim::ParamGroup> {
    use super::optim::ParamGroup;
    let mut groups = Vec::new();
    let lora = policy.model.net.lora_parameters();
    if !lora.is_empty() {
        groups.push(ParamGroup::new("lora", lora, lr, weight_decay));
    }
    if let Some(r) = &policy.router {
        groups.push(ParamGroup::new(
            "router_weight",
            vec![r.weight.shallow_clone()],
            router_lr,
            weight_decay,
        ));
        groups.push(ParamGroup::new(
            "router_bias",
            vec![r.bias.shallow_clone()],
            router_lr,
            0.0,
        ));
    }
    if let Some(g) = &policy.gate {
        // The HRPO reference trains its gates at 1e-4 like the router.
        groups.push(ParamGroup::new("hrpo_gate", g.parameters(), router_lr, 0.0));
    }
    groups
}
