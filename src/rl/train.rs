//! One training step of TARPO or of a token-only baseline, composed of the
//! primitives: rollout -> rewards -> advantages -> replay -> loss -> AdamW.
//! Each piece is its own function elsewhere; this file only wires them and
//! gathers the per-step metrics of ALGORITHMS.md section 2.
use super::advantage;
use super::loss::LossMetrics;
use super::metrics::{rollout_metrics, StepMetrics};
use super::optim::{grad_norm, AdamW};
use super::update::{self, ReplayConfig};
use crate::model::Model;
use crate::policy::{rollout_with, HrpoGate, Rng, Rollout, RolloutOptions, Router};
use anyhow::{bail, Result};
use tch::Tensor;

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

impl Policy {
    /// Everything training updates: LoRA, router, HRPO gate.
    pub fn parameters(&self) -> Vec<Tensor> {
        let mut params = self.model.net.lora_parameters();
        if let Some(r) = &self.router {
            params.extend(r.parameters());
        }
        if let Some(g) = &self.gate {
            params.extend(g.parameters());
        }
        params
    }
}

#[derive(Debug, Clone)]
pub struct TrainConfig {
    /// Completions per prompt.
    pub group: usize,
    /// Sampling, stop tokens, mixture size, answer marker (the seed is drawn per step).
    pub rollout: RolloutOptions,
    pub estimator: String,
    /// Loss, micro-batch, reference inputs and scoring temperature.
    pub replay: ReplayConfig,
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
            let part = ro.select(&rows);
            kept = Some(match kept {
                Some(k) => k.concat(part)?,
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
        if epochs > 1 && self.cfg.replay.loss.clip.is_none() {
            bail!("epochs = {epochs} needs the PPO clip (loss.clip): without the ratio every epoch repeats the same on-policy step");
        }
        // Several epochs over one rollout (PPO); the reported loss is the first, on-policy one.
        let (mut loss, mut router_grad, mut skipped) = (LossMetrics::default(), 0.0, false);
        let mut report = None;
        for e in 0..epochs {
            let l = update::accumulate_gradients(&self.policy, ro, &adv, &self.cfg.replay)?;
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
        m.grad_hidden_norm = loss.grad_hidden_norm;
        m.grad_action_norm = router_grad;
        m.lr = report.lr;
        m.skipped = skipped;
        Ok(m)
    }
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
