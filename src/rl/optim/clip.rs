//! Global-norm gradient clipping, as `torch.nn.utils.clip_grad_norm_`.
use anyhow::Result;
use tch::{Kind, Tensor};

/// The gradients (defined ones only) of some parameters.
pub(super) fn grads_of<'a, I: IntoIterator<Item = &'a Tensor>>(params: I) -> Result<Vec<Tensor>> {
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
pub(super) fn total_norm_tensor(grads: &[Tensor]) -> Result<Tensor> {
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
pub(super) fn clip_with_norm(grads: &[Tensor], total_norm: &Tensor, max_norm: f64) -> Result<()> {
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

pub(super) fn clip_enabled(max_norm: Option<f64>) -> Option<f64> {
    max_norm.filter(|&m| m > 0.0)
}

/// Zeroes (and detaches) every defined gradient of `params` in place.
pub fn zero_grads<'a, I: IntoIterator<Item = &'a Tensor>>(params: I) -> Result<()> {
    for g in grads_of(params)? {
        let mut g = g;
        let _ = g.f_detach_()?;
        let _ = g.f_zero_()?;
    }
    Ok(())
}

/// Multiplies every defined gradient of `params` by `factor` in place (turns
/// accumulated sums into means).
pub fn scale_grads<'a, I: IntoIterator<Item = &'a Tensor>>(params: I, factor: f64) -> Result<()> {
    if factor == 1.0 {
        return Ok(());
    }
    tch::no_grad(|| {
        for g in grads_of(params)? {
            let mut g = g;
            let _ = g.f_mul_scalar_(factor)?;
        }
        Ok(())
    })
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rl::optim::test_util::{add_grad, param};

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
}
