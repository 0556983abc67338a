//! AdamW over parameter groups, with a non-finite-gradient guard.
//!
//! tch cannot reset a gradient to "none", so `zero_grad` fills gradients
//! with zeros (torch's `set_to_none=False`). A parameter skipped as "without
//! a gradient" is therefore one that has never received a gradient since it
//! was created.
use super::clip::{clip_enabled, clip_with_norm, grad_norm, grads_of, total_norm_tensor};
use super::groups::{validate_groups, ParamGroup};
use super::schedule::Schedule;
use anyhow::{bail, Result};
use tch::Tensor;

/// Hyper-parameters shared by all groups.
#[derive(Clone, Debug, PartialEq)]
pub struct AdamWConfig {
    /// Default (0.9, 0.99) per the TARPO reference (torch's default is (0.9, 0.999)).
    pub betas: (f64, f64),
    pub eps: f64,
    /// Global-norm clipping threshold; `None` or 0 disables clipping.
    pub max_grad_norm: Option<f64>,
    /// `step` fails once this many consecutive steps had non-finite
    /// gradients (0: never fail, keep skipping).
    pub max_consecutive_skips: usize,
    pub schedule: Schedule,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            betas: (0.9, 0.99),
            eps: 1e-8,
            max_grad_norm: Some(1.0),
            max_consecutive_skips: 3,
            schedule: Schedule::constant(),
        }
    }
}

/// What one call of [`AdamW::step`] did.
#[derive(Clone, Debug, PartialEq)]
pub struct StepReport {
    /// Total gradient 2-norm before clipping (non-finite when skipped).
    pub grad_norm: f64,
    /// Learning rate of the first group at this step (scheduled).
    pub lr: f64,
    /// True when the loss or the gradients were non-finite and nothing was
    /// updated.
    pub skipped: bool,
    /// What was non-finite when skipped: "loss" and the names of the
    /// parameter groups whose gradients were.
    pub nonfinite: Vec<String>,
}

/// Per-parameter state, created the first time the parameter has a gradient
/// at a step (as torch does).
#[derive(Default)]
pub(super) struct ParamState {
    pub(super) step: u64,
    pub(super) exp_avg: Option<Tensor>,
    pub(super) exp_avg_sq: Option<Tensor>,
}

// Fields are `pub(super)` for `state.rs` (save/load).
pub struct AdamW {
    pub(super) groups: Vec<ParamGroup>,
    pub(super) state: Vec<Vec<ParamState>>,
    pub(super) config: AdamWConfig,
    /// Applied optimizer steps: the schedule position.
    pub(super) step: u64,
    pub(super) consecutive_skips: usize,
    pub(super) skipped_steps: u64,
}

impl AdamW {
    pub fn new(groups: Vec<ParamGroup>, config: AdamWConfig) -> Result<Self> {
        let (b1, b2) = config.betas;
        if !(0.0..1.0).contains(&b1) || !(0.0..1.0).contains(&b2) {
            bail!("AdamW betas must be in [0, 1), got ({b1}, {b2})");
        }
        if !(config.eps.is_finite() && config.eps >= 0.0) {
            bail!("AdamW eps must be finite and >= 0, got {}", config.eps);
        }
        if let Some(m) = config.max_grad_norm {
            if !(m.is_finite() && m >= 0.0) {
                bail!("max_grad_norm must be finite and >= 0, got {m}");
            }
        }
        config.schedule.validate()?;
        if groups.iter().all(|g| g.params.is_empty()) {
            bail!("AdamW got no parameters");
        }
        validate_groups(&groups)?;
        let state = groups
            .iter()
            .map(|g| g.params.iter().map(|_| ParamState::default()).collect())
            .collect();
        Ok(AdamW {
            groups,
            state,
            config,
            step: 0,
            consecutive_skips: 0,
            skipped_steps: 0,
        })
    }

    pub fn groups(&self) -> &[ParamGroup] {
        &self.groups
    }

    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    /// Applied (not skipped) optimizer steps so far: the schedule position.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// Non-finite steps in a row just before now.
    pub fn consecutive_skips(&self) -> usize {
        self.consecutive_skips
    }

    /// All skipped steps so far.
    pub fn skipped_steps(&self) -> u64 {
        self.skipped_steps
    }

    /// Brings the groups in line with `want`, matched by name: a group with
    /// the same tensors keeps its state (and learning rate), a new group or
    /// one whose tensors were replaced (a router attached again) starts fresh,
    /// and a group not in `want` is dropped. Returns the names of the groups
    /// that were added or replaced.
    pub fn sync_groups(&mut self, want: Vec<ParamGroup>) -> Result<Vec<String>> {
        let same = |a: &ParamGroup, b: &ParamGroup| {
            a.params.len() == b.params.len()
                && a.params
                    .iter()
                    .zip(&b.params)
                    .all(|(x, y)| x.data_ptr() == y.data_ptr() && x.size() == y.size())
        };
        validate_groups(&want)?;
        let mut old: Vec<(ParamGroup, Vec<ParamState>)> =
            self.groups.drain(..).zip(self.state.drain(..)).collect();
        let mut changed = Vec::new();
        for g in want {
            let kept = old
                .iter()
                .position(|(o, _)| o.name == g.name && same(o, &g));
            let (group, state) = match kept {
                Some(i) => old.swap_remove(i),
                None => {
                    changed.push(g.name.clone());
                    let state = g.params.iter().map(|_| ParamState::default()).collect();
                    (g, state)
                }
            };
            self.groups.push(group);
            self.state.push(state);
        }
        Ok(changed)
    }

    /// Schedule factor of the next step.
    pub fn lr_factor(&self) -> f64 {
        self.config.schedule.factor(self.step)
    }

    /// Learning rate of each group at the next step.
    pub fn lrs(&self) -> Vec<f64> {
        let f = self.lr_factor();
        self.groups.iter().map(|g| g.lr * f).collect()
    }

    fn all_params(&self) -> impl Iterator<Item = &Tensor> {
        self.groups.iter().flat_map(|g| g.params.iter())
    }

    /// Zeroes every defined gradient in place.
    pub fn zero_grad(&self) -> Result<()> {
        super::clip::zero_grads(self.all_params())
    }

    /// Total 2-norm of the current gradients (no clipping).
    pub fn grad_norm(&self) -> Result<f64> {
        grad_norm(self.all_params())
    }

    /// One optimizer step on the accumulated gradients: computes the total
    /// gradient norm; if it is not finite, skips the step (see
    /// [`AdamW::step_guarded`]). Otherwise clips to `max_grad_norm`, applies
    /// AdamW with each group's scheduled learning rate and advances the
    /// schedule. Gradients of an applied step are left in place (call
    /// [`AdamW::zero_grad`]).
    pub fn step(&mut self) -> Result<StepReport> {
        self.step_guarded(true)
    }

    /// `step`, also skipped when the loss was not finite (`loss_finite`
    /// false). A skipped step zeroes the gradients and updates nothing (the
    /// schedule does not advance either); after `max_consecutive_skips` of
    /// them in a row it fails, naming what was non-finite.
    pub fn step_guarded(&mut self, loss_finite: bool) -> Result<StepReport> {
        let factor = self.lr_factor();
        let lr0 = self.groups.first().map(|g| g.lr * factor).unwrap_or(0.0);
        self.inject_faults()?;
        let grads = grads_of(self.all_params())?;
        let total = tch::no_grad(|| total_norm_tensor(&grads))?;
        let norm = total.f_double_value(&[])?;
        if !loss_finite || !norm.is_finite() {
            let mut what = Vec::new();
            if !loss_finite {
                what.push("loss".to_string());
            }
            if !norm.is_finite() {
                what.extend(self.nonfinite_groups()?);
            }
            return self.skip(norm, lr0, what);
        }
        tch::no_grad(|| -> Result<()> {
            if let Some(m) = clip_enabled(self.config.max_grad_norm) {
                clip_with_norm(&grads, &total, m)?;
            }
            let (beta1, beta2) = self.config.betas;
            let eps = self.config.eps;
            for (group, states) in self.groups.iter_mut().zip(self.state.iter_mut()) {
                let lr = group.lr * factor;
                let wd = group.weight_decay;
                for (param, st) in group.params.iter_mut().zip(states.iter_mut()) {
                    crate::faults::point("optimizer.step");
                    let grad = param.f_grad()?;
                    if !grad.defined() {
                        continue;
                    }
                    adamw_update(param, &grad, st, lr, wd, beta1, beta2, eps)?;
                }
            }
            Ok(())
        })?;
        self.step += 1;
        self.consecutive_skips = 0;
        Ok(StepReport {
            grad_norm: norm,
            lr: lr0,
            skipped: false,
            nonfinite: Vec::new(),
        })
    }

    /// The step that does nothing: gradients zeroed, skips counted, and an
    /// error once `max_consecutive_skips` came in a row.
    fn skip(&mut self, norm: f64, lr: f64, what: Vec<String>) -> Result<StepReport> {
        self.zero_grad()?;
        self.consecutive_skips += 1;
        self.skipped_steps += 1;
        let max = self.config.max_consecutive_skips;
        if max > 0 && self.consecutive_skips >= max {
            bail!(
                "{} optimizer steps in a row were non-finite (last: {}; gradient norm {norm}); \
                 stopping: lower the learning rate, check the data and the loss for NaN/inf, or \
                 resume from the last checkpoint",
                self.consecutive_skips,
                describe_nonfinite(&what)
            );
        }
        Ok(StepReport {
            grad_norm: norm,
            lr,
            skipped: true,
            nonfinite: what,
        })
    }

    /// The names of the groups with a non-finite gradient.
    fn nonfinite_groups(&self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for g in &self.groups {
            if !grad_norm(g.params.iter())?.is_finite() {
                out.push(g.name.clone());
            }
        }
        Ok(out)
    }

    /// The test hook `nan@grad.GROUP:N` (see `faults`): NaN gradients for a group.
    fn inject_faults(&self) -> Result<()> {
        for g in &self.groups {
            if crate::faults::nan(&format!("grad.{}", g.name)) {
                for p in &g.params {
                    let grad = p.f_grad()?;
                    if grad.defined() {
                        let _ = tch::no_grad(|| grad.shallow_clone().f_fill_(f64::NAN))?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// "loss, gradients of router_weight, router_bias" for a skip's `nonfinite`.
pub fn describe_nonfinite(what: &[String]) -> String {
    let loss = what.iter().any(|w| w == "loss");
    let groups: Vec<&str> = (what.iter())
        .filter(|w| *w != "loss")
        .map(String::as_str)
        .collect();
    let mut parts = Vec::new();
    if loss {
        parts.push("loss".to_string());
    }
    if !groups.is_empty() {
        parts.push(format!("gradients of {}", groups.join(", ")));
    }
    if parts.is_empty() {
        "gradients".to_string()
    } else {
        parts.join(", ")
    }
}

/// torch's `_single_tensor_adam` with `decoupled_weight_decay=True`,
/// `amsgrad=False`, `maximize=False`, `capturable=False`, op for op.
/// `addcmul_(t1, t2, value=s)` and `addcdiv_(t1, t2, value=s)` compute
/// `self + s * t1 * t2` and `self + s * t1 / t2` in the tensor dtype; tch
/// has no `value` argument, so `s * t1` is formed first (the same rounding).
#[allow(clippy::too_many_arguments)]
fn adamw_update(
    param: &mut Tensor,
    grad: &Tensor,
    st: &mut ParamState,
    lr: f64,
    weight_decay: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
) -> Result<()> {
    if st.exp_avg.is_none() {
        st.exp_avg = Some(param.f_zeros_like()?);
        st.exp_avg_sq = Some(param.f_zeros_like()?);
    }
    let (Some(exp_avg), Some(exp_avg_sq)) = (st.exp_avg.as_mut(), st.exp_avg_sq.as_mut()) else {
        bail!("internal: AdamW moments missing");
    };
    st.step += 1;
    if weight_decay != 0.0 {
        let _ = param.f_mul_scalar_(1.0 - lr * weight_decay)?;
    }
    let _ = exp_avg.f_lerp_(grad, 1.0 - beta1)?;
    let _ = exp_avg_sq.f_mul_scalar_(beta2)?;
    let _ = exp_avg_sq.f_addcmul_(&grad.f_mul_scalar(1.0 - beta2)?, grad)?;
    let step = st.step as f64;
    let bias_correction1 = 1.0 - beta1.powf(step);
    let bias_correction2 = 1.0 - beta2.powf(step);
    let step_size = lr / bias_correction1;
    let bias_correction2_sqrt = bias_correction2.powf(0.5);
    let mut denom = exp_avg_sq.f_sqrt()?.f_div_scalar(bias_correction2_sqrt)?;
    let _ = denom.f_add_scalar_(eps)?;
    let _ = param.f_addcdiv_(&exp_avg.f_mul_scalar(-step_size)?, &denom)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rl::optim::test_util::{add_grad, bits_equal, param};
    use crate::rl::optim::ScheduleKind;

    fn one_group(params: Vec<Tensor>, lr: f64, wd: f64, config: AdamWConfig) -> AdamW {
        AdamW::new(vec![ParamGroup::new("g", params, lr, wd)], config).unwrap()
    }

    #[test]
    fn first_step_is_lr_times_sign() {
        // After one step m_hat = g and v_hat = g^2, so the update is lr * g / (|g| + eps).
        let p = param(&[1.0, -2.0, 0.5], &[3]);
        let cfg = AdamWConfig {
            max_grad_norm: None,
            ..Default::default()
        };
        let mut opt = one_group(vec![p.shallow_clone()], 0.1, 0.5, cfg);
        add_grad(&p, &Tensor::from_slice(&[0.3f32, -0.2, 0.0]));
        let r = opt.step().unwrap();
        assert!(!r.skipped);
        assert!((r.lr - 0.1).abs() < 1e-15);
        let got = Vec::<f32>::try_from(p.detach()).unwrap();
        let decay = 1.0 - 0.1 * 0.5;
        let want = [1.0 * decay - 0.1, -2.0 * decay + 0.1, 0.5 * decay];
        for (g, w) in got.iter().zip(want) {
            assert!((*g as f64 - w).abs() < 1e-6, "{got:?} vs {want:?}");
        }
        assert_eq!(opt.step_count(), 1);
        // The gradients of an applied step stay (the caller zeroes them).
        assert_eq!(
            Vec::<f32>::try_from(p.grad()).unwrap(),
            vec![0.3, -0.2, 0.0]
        );
        opt.zero_grad().unwrap();
        assert_eq!(Vec::<f32>::try_from(p.grad()).unwrap(), vec![0.0; 3]);
    }

    #[test]
    fn params_without_grad_are_skipped() {
        let a = param(&[1.0, 2.0], &[2]);
        let b = param(&[3.0, 4.0], &[2]);
        let mut opt = AdamW::new(
            vec![
                ParamGroup::new("a", vec![a.shallow_clone()], 0.1, 0.1),
                ParamGroup::new("b", vec![b.shallow_clone()], 0.1, 0.1),
            ],
            AdamWConfig::default(),
        )
        .unwrap();
        add_grad(&a, &Tensor::from_slice(&[1f32, 1.0]));
        opt.step().unwrap();
        assert_eq!(Vec::<f32>::try_from(b.detach()).unwrap(), vec![3.0, 4.0]);
        assert_ne!(Vec::<f32>::try_from(a.detach()).unwrap(), vec![1.0, 2.0]);
        assert_eq!(opt.state[0][0].step, 1);
        assert_eq!(opt.state[1][0].step, 0);
        assert!(opt.state[1][0].exp_avg.is_none());
    }

    #[test]
    fn gradient_accumulation_is_a_sum() {
        let g1 = Tensor::from_slice(&[0.25f32, -0.5, 1.0]);
        let g2 = Tensor::from_slice(&[0.5f32, 0.25, -2.0]);
        let p1 = param(&[1.0, 2.0, 3.0], &[3]);
        let p2 = param(&[1.0, 2.0, 3.0], &[3]);
        let mut o1 = one_group(vec![p1.shallow_clone()], 0.01, 0.1, AdamWConfig::default());
        let mut o2 = one_group(vec![p2.shallow_clone()], 0.01, 0.1, AdamWConfig::default());
        for _ in 0..3 {
            o1.zero_grad().unwrap();
            add_grad(&p1, &g1);
            add_grad(&p1, &g2);
            let r1 = o1.step().unwrap();
            o2.zero_grad().unwrap();
            add_grad(&p2, &(&g1 + &g2));
            let r2 = o2.step().unwrap();
            assert_eq!(r1, r2);
        }
        assert!(bits_equal(&p1, &p2));
    }

    #[test]
    fn nonfinite_grad_skips_the_step() {
        let p = param(&[1.0, 2.0], &[2]);
        let cfg = AdamWConfig {
            schedule: Schedule::new(ScheduleKind::Linear, 2, 10, 0.0).unwrap(),
            ..Default::default()
        };
        let mut opt = one_group(vec![p.shallow_clone()], 0.1, 0.1, cfg);
        add_grad(&p, &Tensor::from_slice(&[f32::NAN, 1.0]));
        let r = opt.step().unwrap();
        assert!(r.skipped);
        assert!(r.grad_norm.is_nan());
        assert_eq!(r.nonfinite, ["g"]);
        assert_eq!(Vec::<f32>::try_from(p.detach()).unwrap(), vec![1.0, 2.0]);
        assert_eq!(Vec::<f32>::try_from(p.grad()).unwrap(), vec![0.0, 0.0]);
        assert_eq!(opt.step_count(), 0);
        assert_eq!(opt.consecutive_skips(), 1);
        assert!(opt.state[0][0].exp_avg.is_none());
        // Inf too.
        add_grad(&p, &Tensor::from_slice(&[f32::INFINITY, 1.0]));
        let r = opt.step().unwrap();
        assert!(r.skipped && r.grad_norm.is_infinite());
        assert_eq!(opt.consecutive_skips(), 2);
        // A finite step resets the counter and uses the first schedule factor (0).
        add_grad(&p, &Tensor::from_slice(&[1f32, 1.0]));
        let r = opt.step().unwrap();
        assert!(!r.skipped);
        assert_eq!(r.lr, 0.0);
        assert_eq!(opt.consecutive_skips(), 0);
        assert_eq!(opt.skipped_steps(), 2);
        assert_eq!(opt.step_count(), 1);
    }

    #[test]
    fn a_skip_names_the_loss_and_the_groups_that_were_not_finite() {
        let (a, b) = (param(&[1.0, 2.0], &[2]), param(&[3.0], &[1]));
        let mut opt = AdamW::new(
            vec![
                ParamGroup::new("lora", vec![a.shallow_clone()], 0.1, 0.1),
                ParamGroup::new("router_bias", vec![b.shallow_clone()], 0.1, 0.0),
            ],
            AdamWConfig::default(),
        )
        .unwrap();
        add_grad(&a, &Tensor::from_slice(&[1f32, 1.0]));
        add_grad(&b, &Tensor::from_slice(&[f32::INFINITY]));
        let r = opt.step().unwrap();
        assert_eq!(
            (r.skipped, r.nonfinite.clone()),
            (true, vec!["router_bias".into()])
        );
        assert_eq!(describe_nonfinite(&r.nonfinite), "gradients of router_bias");
        // A non-finite loss skips even with finite gradients.
        add_grad(&a, &Tensor::from_slice(&[1f32, 1.0]));
        let r = opt.step_guarded(false).unwrap();
        assert_eq!(
            (r.skipped, r.nonfinite.clone()),
            (true, vec!["loss".into()])
        );
        assert_eq!(Vec::<f32>::try_from(a.detach()).unwrap(), vec![1.0, 2.0]);
        assert_eq!((opt.step_count(), opt.skipped_steps()), (0, 2));
        let both = ["loss".to_string(), "lora".into(), "router_bias".into()];
        assert_eq!(
            describe_nonfinite(&both),
            "loss, gradients of lora, router_bias"
        );
    }

    #[test]
    fn three_nonfinite_steps_in_a_row_fail() {
        let p = param(&[1.0, 2.0], &[2]);
        let mut opt = one_group(vec![p.shallow_clone()], 0.1, 0.1, AdamWConfig::default());
        for i in 0..3 {
            add_grad(&p, &Tensor::from_slice(&[f32::NAN, 1.0]));
            let r = opt.step();
            if i < 2 {
                assert!(r.unwrap().skipped);
            } else {
                let e = r.unwrap_err().to_string();
                assert!(
                    e.contains("3 optimizer steps in a row were non-finite (last: gradients of g;"),
                    "{e}"
                );
            }
        }
        assert_eq!(Vec::<f32>::try_from(p.detach()).unwrap(), vec![1.0, 2.0]);
        // 0 disables the limit.
        let cfg = AdamWConfig {
            max_consecutive_skips: 0,
            ..Default::default()
        };
        let mut opt = one_group(vec![p.shallow_clone()], 0.1, 0.1, cfg);
        for _ in 0..5 {
            add_grad(&p, &Tensor::from_slice(&[f32::NAN, 1.0]));
            assert!(opt.step().unwrap().skipped);
        }
    }

    #[test]
    fn new_rejects_bad_setups() {
        let p = param(&[1.0], &[1]);
        let frozen = Tensor::from_slice(&[1f32]);
        let cfg = AdamWConfig::default;
        assert!(AdamW::new(vec![ParamGroup::new("x", vec![frozen], 0.1, 0.0)], cfg()).is_err());
        assert!(AdamW::new(vec![ParamGroup::new("x", vec![], 0.1, 0.0)], cfg()).is_err());
        assert!(AdamW::new(
            vec![ParamGroup::new("x", vec![p.shallow_clone()], -1.0, 0.0)],
            cfg()
        )
        .is_err());
        assert!(AdamW::new(
            vec![ParamGroup::new("x", vec![p.shallow_clone()], f64::NAN, 0.0)],
            cfg()
        )
        .is_err());
        let dup = AdamW::new(
            vec![
                ParamGroup::new("a", vec![p.shallow_clone()], 0.1, 0.0),
                ParamGroup::new("b", vec![p.shallow_clone()], 0.1, 0.0),
            ],
            cfg(),
        );
        assert!(dup.is_err());
        let bad_betas = AdamWConfig {
            betas: (0.9, 1.0),
            ..cfg()
        };
        assert!(AdamW::new(
            vec![ParamGroup::new("x", vec![p.shallow_clone()], 0.1, 0.0)],
            bad_betas
        )
        .is_err());
        let ints = Tensor::from_slice(&[1i64]);
        assert!(AdamW::new(vec![ParamGroup::new("x", vec![ints], 0.1, 0.0)], cfg()).is_err());
    }
}
