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
//! Layout: `schedule` (learning-rate schedules), `clip` (gradient norm and
//! clipping), `groups` (parameter groups and their checks), `adamw` (the optimizer and
//! its step), `state` (save/load).
mod adamw;
mod clip;
mod groups;
mod schedule;
mod state;

pub use adamw::{describe_nonfinite, AdamW, AdamWConfig, StepReport};
pub use clip::{clip_grad_norm, grad_norm, scale_grads, zero_grads};
pub use groups::ParamGroup;
pub use schedule::{Schedule, ScheduleKind};

/// Helpers shared by the unit tests of the submodules.
#[cfg(test)]
mod test_util {
    use tch::{Kind, Tensor};

    pub(super) fn param(values: &[f32], shape: &[i64]) -> Tensor {
        Tensor::from_slice(values)
            .reshape(shape)
            .set_requires_grad(true)
    }

    /// Accumulates `g` into `p.grad` (grad of `sum(p * g)` is exactly `g`).
    pub(super) fn add_grad(p: &Tensor, g: &Tensor) {
        (p * g).sum(Kind::Float).backward();
    }

    pub(super) fn bits_equal(a: &Tensor, b: &Tensor) -> bool {
        let a = Vec::<f32>::try_from(a.detach().flatten(0, -1)).unwrap();
        let b = Vec::<f32>::try_from(b.detach().flatten(0, -1)).unwrap();
        a.len() == b.len() && a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits())
    }
}
