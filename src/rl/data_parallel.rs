//! One optimizer step over several ranks. Each rank's `backward` leaves the
//! gradient of its part of the loss's numerator and its `LossSums`; summing
//! both across ranks before `finish` divides by the job's denominator gives
//! exactly the gradient of the whole batch's loss, in every normalisation
//! mode (the deferral that makes accumulation exact makes this exact too).
use super::update::LossSums;
use crate::dist::{world, Op};
use anyhow::{bail, Result};
use tch::Tensor;

/// Sums the ranks' gradients and loss sums in place (a no-op alone).
pub fn all_reduce_step(params: &[Tensor], sums: &mut LossSums) -> Result<()> {
    let w = world();
    if !w.launched() {
        return Ok(());
    }
    same_parameters(params)?;
    // The sums, then per parameter whether any rank has its gradient.
    let mut xs = sums.values().to_vec();
    xs.extend(params.iter().map(|p| p.grad().defined() as u8 as f64));
    w.reduce_f64("the step's loss sums", &mut xs, Op::Sum)?;
    sums.set_values(xs[..8].try_into()?);
    let mut grads = Vec::new();
    for (p, &any) in params.iter().zip(&xs[8..]) {
        if any == 0.0 {
            continue; // no rank touched it: undefined everywhere, as alone
        }
        if !p.grad().defined() {
            // Another rank has a gradient here: this rank's part is zero.
            (p * 0.0).sum(p.kind()).f_backward()?;
        }
        grads.push(p.grad());
    }
    w.all_reduce("the gradient all-reduce", &grads, Op::Sum)
}

/// Rank 0's parameter values on every rank (at the start of training, and
/// whenever the trained set changes: a router attached later).
pub fn broadcast_parameters(params: &[Tensor]) -> Result<()> {
    let w = world();
    if !w.launched() {
        return Ok(());
    }
    same_parameters(params)?;
    let data: Vec<Tensor> = params.iter().map(|p| p.detach()).collect();
    tch::no_grad(|| w.broadcast("the parameter broadcast from rank 0", &data, 0))
}

/// Every rank must train the same tensors: their count and sizes agree.
fn same_parameters(params: &[Tensor]) -> Result<()> {
    let n = params.len() as f64;
    let numel: f64 = params.iter().map(|p| p.numel() as f64).sum();
    let mut xs = [n, -n, numel, -numel];
    world().reduce_f64("the parameter check", &mut xs, Op::Max)?;
    if xs[0] != -xs[1] || xs[2] != -xs[3] {
        bail!(
            "the ranks train different parameters: this rank has {n} tensors of {numel} values, the job between {} and {} tensors of {} to {} values (every rank must load the same model, LoRA and router)",
            -xs[1], xs[0], -xs[3], xs[2]
        );
    }
    Ok(())
}
