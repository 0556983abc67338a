//! The optimizer: AdamW over parameter groups, global-norm gradient clipping,
//! a non-finite-gradient guard, learning-rate schedules with warm-up, and
//! optimizer state save/load for exact resume.
//!
//! The update mirrors `torch.optim.AdamW` (single-tensor path,
//! `foreach=False`) operation by operation, so that on the same inputs the
//! parameters agree with PyTorch to float rounding (the oracle test checks
//! 1e-6). Clipping mirrors `torch.nn.utils.clip_grad_norm_`, and the schedule
//! factors mirror transformers' `get_*_schedule_with_warmup` lambdas as
//! applied by `LambdaLR` (the k-th optimizer step, 0-based, uses `lambda(k)`).
//!
//! Gradients are accumulated by the caller: any number of `backward()` calls,
//! then one [`AdamW::step`], then [`AdamW::zero_grad`]. `step` never zeroes
//! the gradients of a step it applies (only those of a skipped step).
//!
//! One difference from PyTorch: tch cannot reset a gradient to "none", so
//! `zero_grad` fills gradients with zeros (torch's `set_to_none=False`). A
//! parameter skipped as "without a gradient" is therefore one that has never
//! received a gradient since it was created.
use anyhow::{anyhow, bail, Context, Result};
use safetensors::tensor::{Dtype, View};
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use tch::{Device, Kind, Tensor};

// ---------------------------------------------------------------------------
// Learning-rate schedules
// ---------------------------------------------------------------------------

/// The shape of the learning-rate curve after warm-up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    /// Factor 1 after warm-up.
    Constant,
    /// Linear decay from 1 at the end of warm-up to `min_lr_ratio` at `total_steps`.
    Linear,
    /// Half-cosine decay from 1 at the end of warm-up to `min_lr_ratio` at `total_steps`.
    Cosine,
}

impl ScheduleKind {
    pub const NAMES: [&'static str; 3] = ["constant", "linear", "cosine"];

    /// Parses `constant`, `linear` or `cosine` (case-insensitive).
    pub fn parse(name: &str) -> Result<Self> {
        match name.trim().to_ascii_lowercase().as_str() {
            "constant" => Ok(ScheduleKind::Constant),
            "linear" => Ok(ScheduleKind::Linear),
            "cosine" => Ok(ScheduleKind::Cosine),
            _ => bail!(
                "unknown learning-rate schedule {name:?}; expected one of: {}",
                Self::NAMES.join(", ")
            ),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ScheduleKind::Constant => "constant",
            ScheduleKind::Linear => "linear",
            ScheduleKind::Cosine => "cosine",
        }
    }
}

impl FromStr for ScheduleKind {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::parse(s)
    }
}

impl fmt::Display for ScheduleKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A learning-rate multiplier per optimizer step: linear warm-up from 0 over
/// `warmup_steps`, then constant, linear or cosine decay to `min_lr_ratio`
/// at `total_steps` (and held there afterwards).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    pub kind: ScheduleKind,
    pub warmup_steps: u64,
    /// Total optimizer steps (warm-up included). Ignored by `Constant`.
    pub total_steps: u64,
    /// Final factor of the decay, in [0, 1]. Ignored by `Constant`.
    pub min_lr_ratio: f64,
}

impl Default for Schedule {
    fn default() -> Self {
        Schedule::constant()
    }
}

impl Schedule {
    /// Factor 1 at every step.
    pub fn constant() -> Self {
        Schedule {
            kind: ScheduleKind::Constant,
            warmup_steps: 0,
            total_steps: 0,
            min_lr_ratio: 0.0,
        }
    }

    /// A validated schedule with the warm-up given in steps.
    pub fn new(
        kind: ScheduleKind,
        warmup_steps: u64,
        total_steps: u64,
        min_lr_ratio: f64,
    ) -> Result<Self> {
        let s = Schedule {
            kind,
            warmup_steps,
            total_steps,
            min_lr_ratio,
        };
        s.validate()?;
        Ok(s)
    }

    /// A validated schedule with the warm-up given as a fraction of
    /// `total_steps` (e.g. 0.1): `warmup_steps = ceil(fraction * total_steps)`
    /// as transformers' `warmup_ratio` computes it, except that a product
    /// within 1e-9 of an integer is taken as that integer (0.1 * 30 = 3, not 4).
    pub fn with_warmup_fraction(
        kind: ScheduleKind,
        warmup_fraction: f64,
        total_steps: u64,
        min_lr_ratio: f64,
    ) -> Result<Self> {
        if !(0.0..=1.0).contains(&warmup_fraction) {
            bail!("warm-up fraction must be in [0, 1], got {warmup_fraction}");
        }
        let x = warmup_fraction * total_steps as f64;
        let warmup = if (x - x.round()).abs() < 1e-9 {
            x.round()
        } else {
            x.ceil()
        };
        Self::new(kind, warmup as u64, total_steps, min_lr_ratio)
    }

    /// Parses a schedule kind name (`constant`, `linear`, `cosine`); the same
    /// as [`ScheduleKind::parse`]. Combine with [`Schedule::new`] or
    /// [`Schedule::with_warmup_fraction`].
    pub fn parse(kind: &str) -> Result<ScheduleKind> {
        ScheduleKind::parse(kind)
    }

    pub fn validate(&self) -> Result<()> {
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            bail!("min_lr_ratio must be in [0, 1], got {}", self.min_lr_ratio);
        }
        if self.kind != ScheduleKind::Constant {
            if self.total_steps == 0 {
                bail!("a {} schedule needs total_steps > 0", self.kind);
            }
            if self.warmup_steps > self.total_steps {
                bail!(
                    "warm-up ({} steps) is longer than the whole {} schedule ({} steps)",
                    self.warmup_steps,
                    self.kind,
                    self.total_steps
                );
            }
        }
        Ok(())
    }

    /// The multiplier of every group's base learning rate at optimizer step
    /// `step` (0-based: the first step uses `factor(0)`, which is 0 during a
    /// warm-up, as with transformers' schedules under `LambdaLR`).
    pub fn factor(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return step as f64 / self.warmup_steps.max(1) as f64;
        }
        let min = self.min_lr_ratio;
        match self.kind {
            ScheduleKind::Constant => 1.0,
            ScheduleKind::Linear => {
                let left = self.total_steps.saturating_sub(step) as f64;
                let span = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
                let f = (left / span).max(0.0);
                (f * (1.0 - min) + min).max(0.0)
            }
            ScheduleKind::Cosine => {
                let done = (step - self.warmup_steps) as f64;
                let span = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
                // Held at the end: transformers' cosine would rise again past total_steps.
                let progress = (done / span).min(1.0);
                let num_cycles = 0.5;
                let f = 0.5 * (1.0 + (std::f64::consts::PI * num_cycles * 2.0 * progress).cos());
                (f * (1.0 - min) + min).max(0.0)
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Gradient norm and clipping
// ---------------------------------------------------------------------------

/// The gradients (defined ones only) of some parameters.
fn grads_of<'a, I: IntoIterator<Item = &'a Tensor>>(params: I) -> Result<Vec<Tensor>> {
    let mut out = Vec::new();
    for p in params {
        let g = p.f_grad()?;
        if g.defined() {
            out.push(g);
        }
    }
    Ok(out)
}

/// Total 2-norm of some gradients as torch's `_get_total_norm` computes it:
/// the norm of the stacked per-tensor norms. A 0-d tensor on the first
/// gradient's device.
fn total_norm_tensor(grads: &[Tensor]) -> Result<Tensor> {
    let Some(first) = grads.first() else {
        return Ok(Tensor::f_from_slice(&[0f32])?.f_reshape([0i64; 0])?);
    };
    let device = first.device();
    let mut norms = Vec::with_capacity(grads.len());
    let mut kind = None;
    for g in grads {
        let n = g.f_norm()?.f_to_device(device)?;
        let k = n.f_kind()?;
        kind = Some(match kind {
            None => k,
            Some(k0) if k0 == k => k0,
            Some(_) => Kind::Float,
        });
        norms.push(n);
    }
    let kind = kind.unwrap_or(Kind::Float);
    let norms = norms
        .into_iter()
        .map(|n| {
            if n.kind() == kind {
                Ok(n)
            } else {
                n.f_to_kind(kind)
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Tensor::f_stack(&norms, 0)?.f_norm()?)
}

/// Scales `grads` in place by `min(1, max_norm / (total_norm + 1e-6))`, as
/// `clip_grad_norm_` does (it multiplies even when the factor is 1).
fn clip_with_norm(grads: &[Tensor], total_norm: &Tensor, max_norm: f64) -> Result<()> {
    if grads.is_empty() {
        return Ok(());
    }
    let coef = total_norm
        .f_add_scalar(1e-6)?
        .f_reciprocal()?
        .f_mul_scalar(max_norm)?
        .f_clamp_max(1.0)?;
    for g in grads {
        let c = coef.f_to_device(g.device())?;
        let mut g = g.shallow_clone();
        let _ = g.f_mul_(&c)?;
    }
    Ok(())
}

fn clip_enabled(max_norm: Option<f64>) -> Option<f64> {
    max_norm.filter(|&m| m > 0.0)
}

/// Total 2-norm of the gradients of `params` (parameters without a gradient
/// are left out; 0 when none has one).
pub fn grad_norm<'a, I: IntoIterator<Item = &'a Tensor>>(params: I) -> Result<f64> {
    let grads = grads_of(params)?;
    tch::no_grad(|| Ok(total_norm_tensor(&grads)?.f_double_value(&[])?))
}

/// Like `torch.nn.utils.clip_grad_norm_(params, max_norm)`: scales all
/// gradients in place so that their total 2-norm is at most `max_norm`, and
/// returns the total norm before clipping. `None` or `Some(0.0)` only
/// computes the norm. Non-finite norms are returned as they are (the
/// gradients are then scaled by NaN or 0, as in torch).
pub fn clip_grad_norm<'a, I: IntoIterator<Item = &'a Tensor>>(
    params: I,
    max_norm: Option<f64>,
) -> Result<f64> {
    let grads = grads_of(params)?;
    tch::no_grad(|| {
        let total = total_norm_tensor(&grads)?;
        if let Some(m) = clip_enabled(max_norm) {
            clip_with_norm(&grads, &total, m)?;
        }
        Ok(total.f_double_value(&[])?)
    })
}

// ---------------------------------------------------------------------------
// AdamW
// ---------------------------------------------------------------------------

/// Parameters sharing a base learning rate and weight decay.
pub struct ParamGroup {
    pub name: String,
    /// Leaf tensors with `requires_grad` (shallow clones of the model's).
    pub params: Vec<Tensor>,
    /// Base learning rate, multiplied by the schedule's factor.
    pub lr: f64,
    /// Decoupled weight decay (0 for biases, e.g. the router bias).
    pub weight_decay: f64,
}

impl ParamGroup {
    pub fn new(name: impl Into<String>, params: Vec<Tensor>, lr: f64, weight_decay: f64) -> Self {
        ParamGroup {
            name: name.into(),
            params,
            lr,
            weight_decay,
        }
    }
}

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
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepReport {
    /// Total gradient 2-norm before clipping (non-finite when skipped).
    pub grad_norm: f64,
    /// Learning rate of the first group at this step (scheduled).
    pub lr: f64,
    /// True when the gradients were non-finite and nothing was updated.
    pub skipped: bool,
}

/// Per-parameter state, created the first time the parameter has a gradient
/// at a step (as torch does).
#[derive(Default)]
struct ParamState {
    step: u64,
    exp_avg: Option<Tensor>,
    exp_avg_sq: Option<Tensor>,
}

pub struct AdamW {
    groups: Vec<ParamGroup>,
    state: Vec<Vec<ParamState>>,
    config: AdamWConfig,
    /// Applied optimizer steps: the schedule position.
    step: u64,
    consecutive_skips: usize,
    skipped_steps: u64,
}

fn is_float(kind: Kind) -> bool {
    matches!(
        kind,
        Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16
    )
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
        let mut seen: HashMap<usize, (usize, usize)> = HashMap::new();
        for (gi, g) in groups.iter().enumerate() {
            if !(g.lr.is_finite() && g.lr >= 0.0) {
                bail!(
                    "group {gi} ({}): lr must be finite and >= 0, got {}",
                    g.name,
                    g.lr
                );
            }
            if !(g.weight_decay.is_finite() && g.weight_decay >= 0.0) {
                bail!(
                    "group {gi} ({}): weight_decay must be finite and >= 0, got {}",
                    g.name,
                    g.weight_decay
                );
            }
            for (pi, p) in g.params.iter().enumerate() {
                if !p.defined() {
                    bail!(
                        "group {gi} ({}): parameter {pi} is an undefined tensor",
                        g.name
                    );
                }
                let kind = p.f_kind()?;
                if !is_float(kind) {
                    bail!(
                        "group {gi} ({}): parameter {pi} has dtype {kind:?}; only floating-point parameters can be optimized",
                        g.name
                    );
                }
                if !p.requires_grad() {
                    bail!(
                        "group {gi} ({}): parameter {pi} does not require grad",
                        g.name
                    );
                }
                if p.numel() > 0 {
                    let ptr = p.data_ptr() as usize;
                    if let Some((gj, pj)) = seen.insert(ptr, (gi, pi)) {
                        bail!(
                            "parameter {pi} of group {gi} ({}) is the same tensor as parameter {pj} of group {gj}; a parameter may appear only once",
                            g.name
                        );
                    }
                }
            }
        }
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
        for p in self.all_params() {
            let mut g = p.f_grad()?;
            if g.defined() {
                let _ = g.f_detach_()?;
                let _ = g.f_zero_()?;
            }
        }
        Ok(())
    }

    /// Total 2-norm of the current gradients (no clipping).
    pub fn grad_norm(&self) -> Result<f64> {
        grad_norm(self.all_params())
    }

    /// One optimizer step on the accumulated gradients: computes the total
    /// gradient norm; if it is not finite, zeroes the gradients, updates
    /// nothing (the schedule does not advance either) and reports a skipped
    /// step, or fails after `max_consecutive_skips` such steps in a row.
    /// Otherwise clips to `max_grad_norm`, applies AdamW with each group's
    /// scheduled learning rate and advances the schedule. Gradients of an
    /// applied step are left in place (call [`AdamW::zero_grad`]).
    pub fn step(&mut self) -> Result<StepReport> {
        let factor = self.lr_factor();
        let lr0 = self.groups.first().map(|g| g.lr * factor).unwrap_or(0.0);
        let grads = grads_of(self.all_params())?;
        let total = tch::no_grad(|| total_norm_tensor(&grads))?;
        let norm = total.f_double_value(&[])?;
        if !norm.is_finite() {
            self.zero_grad()?;
            self.consecutive_skips += 1;
            self.skipped_steps += 1;
            let max = self.config.max_consecutive_skips;
            if max > 0 && self.consecutive_skips >= max {
                bail!(
                    "{} consecutive steps had non-finite gradients; stopping (last gradient norm \
                     {norm}): lower the learning rate, check the data and the loss for NaN/inf, or resume \
                     from an earlier checkpoint",
                    self.consecutive_skips
                );
            }
            return Ok(StepReport {
                grad_norm: norm,
                lr: lr0,
                skipped: true,
            });
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
        })
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

// ---------------------------------------------------------------------------
// State save / load
// ---------------------------------------------------------------------------

const STATE_KEY: &str = "tarpo.optim";
const STATE_FORMAT: &str = "tarpo-adamw-v1";

#[derive(Serialize, Deserialize)]
struct SavedParam {
    shape: Vec<i64>,
    dtype: String,
    /// Per-parameter AdamW step; moments are stored iff > 0.
    step: u64,
}

#[derive(Serialize, Deserialize)]
struct SavedGroup {
    name: String,
    lr: f64,
    weight_decay: f64,
    params: Vec<SavedParam>,
}

#[derive(Serialize, Deserialize)]
struct SavedState {
    format: String,
    step: u64,
    consecutive_skips: usize,
    skipped_steps: u64,
    /// For information; the running configuration is kept on load.
    betas: (f64, f64),
    eps: f64,
    schedule: Schedule,
    groups: Vec<SavedGroup>,
}

struct Blob {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl View for &Blob {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn dtype_of(kind: Kind) -> Result<Dtype> {
    Ok(match kind {
        Kind::Float => Dtype::F32,
        Kind::Double => Dtype::F64,
        Kind::Half => Dtype::F16,
        Kind::BFloat16 => Dtype::BF16,
        k => bail!("cannot store optimizer state of dtype {k:?}"),
    })
}

fn kind_of(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F64 => Kind::Double,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        _ => return None,
    })
}

fn blob(t: &Tensor) -> Result<Blob> {
    let kind = t.f_kind()?;
    let t = t.f_to_device(Device::Cpu)?.f_contiguous()?;
    let numel = t.numel();
    let mut data = vec![0u8; numel * kind.elt_size_in_bytes()];
    t.f_copy_data_u8(&mut data, numel)?;
    Ok(Blob {
        dtype: dtype_of(kind)?,
        shape: t.size().iter().map(|&d| d as usize).collect(),
        data,
    })
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".tmp");
    PathBuf::from(s)
}

fn moment_names(gi: usize, pi: usize) -> (String, String) {
    (
        format!("group{gi}.param{pi}.exp_avg"),
        format!("group{gi}.param{pi}.exp_avg_sq"),
    )
}

impl AdamW {
    /// Writes the optimizer state (moments, per-parameter and global step
    /// counts, skip counters) to one safetensors file, the scalars as JSON in
    /// its metadata. Written to `PATH.tmp`, synced, then renamed over `path`.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut blobs: Vec<(String, Blob)> = Vec::new();
        let mut groups = Vec::new();
        for (gi, (g, states)) in self.groups.iter().zip(&self.state).enumerate() {
            let mut params = Vec::new();
            for (pi, (p, st)) in g.params.iter().zip(states).enumerate() {
                params.push(SavedParam {
                    shape: p.size(),
                    dtype: format!("{:?}", dtype_of(p.f_kind()?)?),
                    step: st.step,
                });
                if st.step > 0 {
                    let (Some(m), Some(v)) = (&st.exp_avg, &st.exp_avg_sq) else {
                        bail!("internal: AdamW moments missing for a stepped parameter");
                    };
                    let (nm, nv) = moment_names(gi, pi);
                    blobs.push((nm, blob(m)?));
                    blobs.push((nv, blob(v)?));
                }
            }
            groups.push(SavedGroup {
                name: g.name.clone(),
                lr: g.lr,
                weight_decay: g.weight_decay,
                params,
            });
        }
        let saved = SavedState {
            format: STATE_FORMAT.to_string(),
            step: self.step,
            consecutive_skips: self.consecutive_skips,
            skipped_steps: self.skipped_steps,
            betas: self.config.betas,
            eps: self.config.eps,
            schedule: self.config.schedule,
            groups,
        };
        let meta = HashMap::from([(STATE_KEY.to_string(), serde_json::to_string(&saved)?)]);
        let bytes = safetensors::serialize(blobs.iter().map(|(n, b)| (n.as_str(), b)), Some(meta))
            .map_err(|e| anyhow!("serializing optimizer state: {e}"))?;
        let tmp = tmp_path(path);
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            Ok(())
        };
        if let Err(e) = write() {
            let _ = std::fs::remove_file(&tmp);
            return Err(e).with_context(|| format!("writing {}", tmp.display()));
        }
        std::fs::rename(&tmp, path)
            .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
        if let Some(dir) = path.parent() {
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }

    /// Restores the state written by [`AdamW::save`]. The file must describe
    /// the same groups (names, parameter counts, shapes and dtypes) in the
    /// same order; on any mismatch or damage this fails and the optimizer is
    /// left as it was. Learning rates, weight decays, betas, eps and the
    /// schedule are those of the running configuration, not the file's.
    pub fn load(&mut self, path: &Path) -> Result<()> {
        let ctx = || format!("loading optimizer state {}", path.display());
        let bytes = std::fs::read(path).with_context(ctx)?;
        let (_, header) = SafeTensors::read_metadata(&bytes)
            .map_err(|e| anyhow!("not a safetensors file: {e}"))
            .with_context(ctx)?;
        let json = header
            .metadata()
            .as_ref()
            .and_then(|m| m.get(STATE_KEY))
            .ok_or_else(|| anyhow!("no {STATE_KEY:?} metadata: not an optimizer state file"))
            .with_context(ctx)?;
        let saved: SavedState = serde_json::from_str(json)
            .context("malformed optimizer state metadata")
            .with_context(ctx)?;
        let st = SafeTensors::deserialize(&bytes)
            .map_err(|e| anyhow!("damaged safetensors file: {e}"))
            .with_context(ctx)?;
        let new_state = self.restore(&saved, &st).with_context(ctx)?;
        self.state = new_state;
        self.step = saved.step;
        self.consecutive_skips = saved.consecutive_skips;
        self.skipped_steps = saved.skipped_steps;
        Ok(())
    }

    fn restore(&self, saved: &SavedState, st: &SafeTensors) -> Result<Vec<Vec<ParamState>>> {
        if saved.format != STATE_FORMAT {
            bail!(
                "unsupported optimizer state format {:?} (expected {STATE_FORMAT:?})",
                saved.format
            );
        }
        if saved.groups.len() != self.groups.len() {
            bail!(
                "the file has {} parameter groups, the optimizer {}",
                saved.groups.len(),
                self.groups.len()
            );
        }
        let mut expected_tensors = 0;
        let mut out = Vec::with_capacity(self.groups.len());
        for (gi, (g, sg)) in self.groups.iter().zip(&saved.groups).enumerate() {
            if g.name != sg.name {
                bail!(
                    "group {gi} is {:?} in the file but {:?} in the optimizer",
                    sg.name,
                    g.name
                );
            }
            if g.params.len() != sg.params.len() {
                bail!(
                    "group {gi} ({}) has {} parameters in the file but {} in the optimizer",
                    g.name,
                    sg.params.len(),
                    g.params.len()
                );
            }
            let mut states = Vec::with_capacity(g.params.len());
            for (pi, (p, sp)) in g.params.iter().zip(&sg.params).enumerate() {
                let shape = p.size();
                let kind = p.f_kind()?;
                if sp.shape != shape {
                    bail!(
                        "group {gi} ({}) parameter {pi}: shape {:?} in the file but {:?} in the optimizer",
                        g.name,
                        sp.shape,
                        shape
                    );
                }
                let dtype = format!("{:?}", dtype_of(kind)?);
                if sp.dtype != dtype {
                    bail!(
                        "group {gi} ({}) parameter {pi}: dtype {} in the file but {dtype} in the optimizer",
                        g.name,
                        sp.dtype
                    );
                }
                if sp.step == 0 {
                    states.push(ParamState::default());
                    continue;
                }
                expected_tensors += 2;
                let (nm, nv) = moment_names(gi, pi);
                let read = |name: &str| -> Result<Tensor> {
                    let view = st.tensor(name).map_err(|e| anyhow!("tensor {name}: {e}"))?;
                    let vshape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
                    if vshape != shape {
                        bail!("tensor {name}: shape {vshape:?}, expected {shape:?}");
                    }
                    if kind_of(view.dtype()) != Some(kind) {
                        bail!("tensor {name}: dtype {:?}, expected {dtype}", view.dtype());
                    }
                    let numel: usize = view.shape().iter().product();
                    if view.data().len() != numel * kind.elt_size_in_bytes() {
                        bail!("tensor {name}: data size does not match its shape");
                    }
                    Ok(Tensor::f_from_data_size(view.data(), &vshape, kind)?
                        .f_to_device(p.device())?)
                };
                states.push(ParamState {
                    step: sp.step,
                    exp_avg: Some(read(&nm)?),
                    exp_avg_sq: Some(read(&nv)?),
                });
            }
            out.push(states);
        }
        if st.len() != expected_tensors {
            bail!(
                "the file holds {} tensors but its metadata describes {expected_tensors}",
                st.len()
            );
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EPS: f64 = 1e-12;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < EPS
    }

    fn param(values: &[f32], shape: &[i64]) -> Tensor {
        Tensor::from_slice(values)
            .reshape(shape)
            .set_requires_grad(true)
    }

    /// Accumulates `g` into `p.grad` (grad of `sum(p * g)` is exactly `g`).
    fn add_grad(p: &Tensor, g: &Tensor) {
        (p * g).sum(Kind::Float).backward();
    }

    fn bits_equal(a: &Tensor, b: &Tensor) -> bool {
        let a = Vec::<f32>::try_from(a.detach().flatten(0, -1)).unwrap();
        let b = Vec::<f32>::try_from(b.detach().flatten(0, -1)).unwrap();
        a.len() == b.len() && a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits())
    }

    #[test]
    fn constant_schedule_with_warmup() {
        let s = Schedule::new(ScheduleKind::Constant, 4, 0, 0.0).unwrap();
        assert_eq!(s.factor(0), 0.0);
        assert!(close(s.factor(1), 0.25));
        assert!(close(s.factor(3), 0.75));
        assert_eq!(s.factor(4), 1.0);
        assert_eq!(s.factor(1000), 1.0);
        assert_eq!(Schedule::constant().factor(0), 1.0);
    }

    #[test]
    fn linear_schedule() {
        let s = Schedule::new(ScheduleKind::Linear, 2, 10, 0.2).unwrap();
        assert_eq!(s.factor(0), 0.0);
        assert!(close(s.factor(1), 0.5));
        assert!(close(s.factor(2), 1.0));
        // (10 - 6) / 8 = 0.5 -> 0.2 + 0.8 * 0.5
        assert!(close(s.factor(6), 0.6));
        assert!(close(s.factor(10), 0.2));
        assert!(close(s.factor(50), 0.2));
        let s0 = Schedule::new(ScheduleKind::Linear, 0, 4, 0.0).unwrap();
        assert_eq!(s0.factor(0), 1.0);
        assert!(close(s0.factor(1), 0.75));
        assert_eq!(s0.factor(4), 0.0);
    }

    #[test]
    fn cosine_schedule() {
        let s = Schedule::new(ScheduleKind::Cosine, 10, 110, 0.1).unwrap();
        assert_eq!(s.factor(0), 0.0);
        assert!(close(s.factor(5), 0.5));
        assert!(close(s.factor(9), 0.9));
        assert!(close(s.factor(10), 1.0));
        // Midpoint of the decay: (1 + min) / 2.
        assert!(close(s.factor(60), 0.55));
        // A quarter in: 0.1 + 0.9 * (1 + cos(pi/4)) / 2.
        let q = 0.1 + 0.9 * (1.0 + std::f64::consts::FRAC_1_SQRT_2) / 2.0;
        assert!(close(s.factor(35), q));
        assert!(close(s.factor(110), 0.1));
        // Held at the minimum past the end.
        assert!(close(s.factor(150), 0.1));
        assert!(close(s.factor(10_000), 0.1));
        let s0 = Schedule::new(ScheduleKind::Cosine, 0, 100, 0.0).unwrap();
        assert_eq!(s0.factor(0), 1.0);
        assert!(close(s0.factor(50), 0.5));
        assert!(s0.factor(100).abs() < EPS);
    }

    #[test]
    fn warmup_fraction_and_parse() {
        let s = Schedule::with_warmup_fraction(ScheduleKind::Cosine, 0.1, 30, 0.0).unwrap();
        assert_eq!(s.warmup_steps, 3);
        let s = Schedule::with_warmup_fraction(ScheduleKind::Cosine, 0.1, 25, 0.0).unwrap();
        assert_eq!(s.warmup_steps, 3);
        let s = Schedule::with_warmup_fraction(ScheduleKind::Linear, 0.0, 25, 0.0).unwrap();
        assert_eq!(s.warmup_steps, 0);
        assert!(Schedule::with_warmup_fraction(ScheduleKind::Linear, 1.5, 25, 0.0).is_err());
        assert!(Schedule::with_warmup_fraction(ScheduleKind::Linear, f64::NAN, 25, 0.0).is_err());

        assert_eq!(Schedule::parse("cosine").unwrap(), ScheduleKind::Cosine);
        assert_eq!(Schedule::parse(" Linear ").unwrap(), ScheduleKind::Linear);
        assert_eq!(
            "constant".parse::<ScheduleKind>().unwrap(),
            ScheduleKind::Constant
        );
        let e = Schedule::parse("cosine_restarts").unwrap_err().to_string();
        assert!(
            e.contains("cosine_restarts") && e.contains("constant, linear, cosine"),
            "{e}"
        );

        assert!(Schedule::new(ScheduleKind::Cosine, 0, 10, 1.5).is_err());
        assert!(Schedule::new(ScheduleKind::Cosine, 0, 10, f64::NAN).is_err());
        assert!(Schedule::new(ScheduleKind::Cosine, 20, 10, 0.0).is_err());
        assert!(Schedule::new(ScheduleKind::Linear, 0, 0, 0.0).is_err());
        assert!(Schedule::new(ScheduleKind::Constant, 5, 0, 0.0).is_ok());
    }

    #[test]
    fn clip_coefficient_hand_example() {
        let a = param(&[0.0, 0.0], &[2]);
        let b = param(&[0.0], &[1]);
        let c = param(&[1.0], &[1]); // no gradient: left out of the norm
        add_grad(&a, &Tensor::from_slice(&[3f32, 4.0]));
        add_grad(&b, &Tensor::from_slice(&[12f32]));
        // Total norm sqrt(9 + 16 + 144) = 13.
        let n = clip_grad_norm([&a, &b, &c], None).unwrap();
        assert!((n - 13.0).abs() < 1e-6);
        assert_eq!(Vec::<f32>::try_from(a.grad()).unwrap(), vec![3.0, 4.0]);
        let n = clip_grad_norm([&a, &b, &c], Some(100.0)).unwrap();
        assert!((n - 13.0).abs() < 1e-6);
        assert_eq!(Vec::<f32>::try_from(a.grad()).unwrap(), vec![3.0, 4.0]);
        // max_norm 6.5: coefficient 6.5 / (13 + 1e-6), about 0.5.
        let n = clip_grad_norm([&a, &b, &c], Some(6.5)).unwrap();
        assert!((n - 13.0).abs() < 1e-6);
        let coef = 6.5 / (13.0 + 1e-6);
        let ga = Vec::<f32>::try_from(a.grad()).unwrap();
        let gb = Vec::<f32>::try_from(b.grad()).unwrap();
        assert!((ga[0] as f64 - 3.0 * coef).abs() < 1e-6);
        assert!((ga[1] as f64 - 4.0 * coef).abs() < 1e-6);
        assert!((gb[0] as f64 - 12.0 * coef).abs() < 1e-6);
        let n = grad_norm([&a, &b]).unwrap();
        assert!((n - 6.5).abs() < 1e-5);
        assert!(!c.grad().defined());
        assert_eq!(grad_norm([&c]).unwrap(), 0.0);
    }

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
                    e.contains("3 consecutive steps had non-finite gradients; stopping"),
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

    fn grads_for(k: usize) -> [Tensor; 3] {
        let s = k as f64 + 1.0;
        [
            Tensor::from_slice(&[0.1f32, -0.2, 0.3, 0.05, 0.0, -0.4]).reshape([2, 3]) * s,
            Tensor::from_slice(&[0.7f32, -0.1]) / s,
            Tensor::from_slice(&[-0.3f32]) * (s * 0.5),
        ]
    }

    fn make(params: &[Tensor]) -> AdamW {
        AdamW::new(
            vec![
                ParamGroup::new(
                    "backbone",
                    vec![params[0].shallow_clone(), params[1].shallow_clone()],
                    1e-2,
                    0.1,
                ),
                ParamGroup::new("router_bias", vec![params[2].shallow_clone()], 3e-2, 0.0),
            ],
            AdamWConfig {
                max_grad_norm: Some(1.0),
                schedule: Schedule::new(ScheduleKind::Cosine, 2, 8, 0.1).unwrap(),
                ..Default::default()
            },
        )
        .unwrap()
    }

    fn fresh_params() -> Vec<Tensor> {
        vec![
            param(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3]),
            param(&[-1.0, 0.5], &[2]),
            param(&[0.25], &[1]),
        ]
    }

    fn run(opt: &mut AdamW, params: &[Tensor], ks: std::ops::Range<usize>) {
        for k in ks {
            opt.zero_grad().unwrap();
            for (p, g) in params.iter().zip(grads_for(k)) {
                add_grad(p, &g);
            }
            opt.step().unwrap();
        }
    }

    #[test]
    fn save_load_round_trip() {
        let dir = std::env::temp_dir().join(format!("tarpo-optim-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("optim.safetensors");

        let pa = fresh_params();
        let mut a = make(&pa);
        run(&mut a, &pa, 0..3);
        // One skipped step so the skip counters are non-trivial.
        add_grad(
            &pa[0],
            &Tensor::full([2, 3], f64::NAN, (Kind::Float, Device::Cpu)),
        );
        assert!(a.step().unwrap().skipped);
        a.save(&path).unwrap();
        assert!(!tmp_path(&path).exists());

        let pb: Vec<Tensor> = pa
            .iter()
            .map(|p| p.detach().copy().set_requires_grad(true))
            .collect();
        let mut b = make(&pb);
        b.load(&path).unwrap();
        assert_eq!(b.step_count(), 3);
        assert_eq!(b.consecutive_skips(), 1);
        assert_eq!(b.skipped_steps(), 1);
        assert_eq!(a.lrs(), b.lrs());
        for (sa, sb) in a.state.iter().flatten().zip(b.state.iter().flatten()) {
            assert_eq!(sa.step, sb.step);
            assert!(bits_equal(
                sa.exp_avg.as_ref().unwrap(),
                sb.exp_avg.as_ref().unwrap()
            ));
            assert!(bits_equal(
                sa.exp_avg_sq.as_ref().unwrap(),
                sb.exp_avg_sq.as_ref().unwrap()
            ));
        }
        run(&mut a, &pa, 3..5);
        run(&mut b, &pb, 3..5);
        for (x, y) in pa.iter().zip(&pb) {
            assert!(bits_equal(x, y));
        }
        // Saving again overwrites in place.
        a.save(&path).unwrap();
        b.load(&path).unwrap();
        assert_eq!(b.step_count(), 5);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn load_rejects_mismatches() {
        let dir = std::env::temp_dir().join(format!("tarpo-optim-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("optim.safetensors");
        let pa = fresh_params();
        let mut a = make(&pa);
        run(&mut a, &pa, 0..2);
        a.save(&path).unwrap();

        // Different shape.
        let mut pb = fresh_params();
        pb[1] = param(&[1.0, 2.0, 3.0], &[3]);
        let mut b = make(&pb);
        let e = format!("{:#}", b.load(&path).unwrap_err());
        assert!(e.contains("shape [2] in the file but [3]"), "{e}");
        assert_eq!(b.step_count(), 0);

        // Different parameter count.
        let pc = fresh_params();
        let mut c = AdamW::new(
            vec![
                ParamGroup::new("backbone", vec![pc[0].shallow_clone()], 1e-2, 0.1),
                ParamGroup::new("router_bias", vec![pc[2].shallow_clone()], 3e-2, 0.0),
            ],
            AdamWConfig::default(),
        )
        .unwrap();
        let e = format!("{:#}", c.load(&path).unwrap_err());
        assert!(e.contains("2 parameters in the file but 1"), "{e}");

        // Different group count.
        let mut d = AdamW::new(
            vec![ParamGroup::new("backbone", fresh_params(), 1e-2, 0.1)],
            AdamWConfig::default(),
        )
        .unwrap();
        let e = format!("{:#}", d.load(&path).unwrap_err());
        assert!(e.contains("2 parameter groups"), "{e}");

        // Missing and damaged files.
        let mut ok = make(&fresh_params());
        assert!(ok.load(&dir.join("missing.safetensors")).is_err());
        let junk = dir.join("junk.safetensors");
        std::fs::write(&junk, b"not a safetensors file").unwrap();
        assert!(ok.load(&junk).is_err());
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&junk, &bytes[..bytes.len() - 4]).unwrap();
        assert!(ok.load(&junk).is_err());
        assert_eq!(ok.step_count(), 0);
        let _ = std::fs::remove_dir_all(&dir);
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
