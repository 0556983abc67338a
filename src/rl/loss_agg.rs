//! Reducing per-token loss terms to a scalar, and the PPO clipped surrogate.
//!
//! [`aggregate`] takes a `(B, T)` tensor of per-token terms and a `(B, T)`
//! mask of the tokens that count (completion tokens, not prompt or padding)
//! and reduces it according to a [`Norm`]:
//!
//! | name                      | reduction                                          | used by        |
//! |---------------------------|----------------------------------------------------|----------------|
//! | `seq-mean-token-mean`     | mean over each sequence's tokens, then over seqs   | TARPO, GRPO    |
//! | `token-mean`              | mean over all tokens of the batch, pooled          | DAPO           |
//! | `seq-mean-token-sum-norm` | sum over each sequence's tokens / `max_len`, then mean over seqs | Dr. GRPO |
//!
//! Empty sequences (no masked-in token) contribute 0 and are NOT counted in
//! the "mean over sequences": the denominator is the number of sequences with
//! at least one token (at least 1). So an empty completion neither produces a
//! NaN nor dilutes the gradient of the others. (TRL divides by `B` instead;
//! the two agree whenever no sequence is empty.) A batch with no token at all
//! gives 0 in every mode, with zero (not NaN) gradients.

use anyhow::{bail, ensure, Result};
use tch::{Kind, Tensor};

/// How per-token terms are reduced to a scalar; see the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Norm {
    /// Per sequence mean over its tokens, then mean over (non-empty) sequences.
    #[default]
    SeqMeanTokenMean,
    /// All masked-in tokens of the batch pooled into one mean (DAPO).
    TokenMean,
    /// Per sequence sum over its tokens divided by the constant `max_len`, then
    /// mean over (non-empty) sequences (Dr. GRPO).
    SeqMeanTokenSumNorm,
}

/// The `(name, Norm)` table used by [`Norm::parse`] and [`Norm::name`]. Names are
/// unique (tested).
pub const NORMS: &[(&str, Norm)] = &[
    ("seq-mean-token-mean", Norm::SeqMeanTokenMean),
    ("token-mean", Norm::TokenMean),
    ("seq-mean-token-sum-norm", Norm::SeqMeanTokenSumNorm),
];

impl Norm {
    /// Parses a configuration name. Unknown names produce an error that names
    /// the culprit and lists the valid names.
    pub fn parse(name: &str) -> Result<Norm> {
        match NORMS.iter().find(|(n, _)| *n == name) {
            Some((_, norm)) => Ok(*norm),
            None => bail!(
                "unknown loss aggregation {name:?} (valid: {})",
                names().join(", ")
            ),
        }
    }

    /// The configuration name of this mode (inverse of [`Norm::parse`]).
    pub fn name(self) -> &'static str {
        NORMS
            .iter()
            .find(|(_, n)| *n == self)
            .map(|(name, _)| *name)
            .unwrap_or("?")
    }
}

impl std::fmt::Display for Norm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Valid aggregation names, in table order.
pub fn names() -> Vec<&'static str> {
    NORMS.iter().map(|(name, _)| *name).collect()
}

/// Reduces `per_token` `(B, T)` to a 0-dim tensor over the tokens selected by
/// `mask` `(B, T)`, according to `norm`. Differentiable with respect to
/// `per_token`. It is `weighted_sum(per_token, mask, token_weights(..)) /
/// denominator(..)`: the form `rl::update` uses to add up chunks of a batch.
///
/// * `mask` may be bool or numeric; any non-zero entry selects the token (so a
///   0/1 float mask works, and values are not used as weights).
/// * Masked-out entries of `per_token` are never read into the result, even if
///   they hold NaN or inf (they are replaced by 0 with `where`, not multiplied
///   by 0), and receive zero gradient.
/// * `max_len` is the constant normaliser of `SeqMeanTokenSumNorm` (the
///   generation length cap, Dr. GRPO's constant); it must be `>= 1` for that
///   mode and is ignored by the others. It is not checked against `T`.
/// * Half-precision inputs are reduced in f32 (result f32); f32/f64 inputs keep
///   their kind.
///
/// Errors: `per_token` not 2-D or not floating point, `mask` of another
/// shape, `max_len < 1` for `SeqMeanTokenSumNorm`, device mismatch.
pub fn aggregate(per_token: &Tensor, mask: &Tensor, norm: Norm, max_len: i64) -> Result<Tensor> {
    let w = token_weights(mask, norm, max_len)?;
    let den = denominator(mask, norm)?;
    Ok(weighted_sum(per_token, mask, &w)?.f_div_scalar(den)?)
}

/// Per-token weights `(B, T)` f32 whose weighted sum, divided by
/// `denominator`, is the reduction of `norm`: `1 / |y_b|` per token of
/// sequence b (`seq-mean-token-mean`), 1 (`token-mean`), `1 / max_len`
/// (`seq-mean-token-sum-norm`); 0 off the mask. A sequence's weights depend
/// on it alone, so a batch split into parts sums to the same numerator.
pub fn token_weights(mask: &Tensor, norm: Norm, max_len: i64) -> Result<Tensor> {
    ensure!(
        mask.dim() == 2,
        "aggregate: mask must be 2-D (B, T), got shape {:?}",
        mask.size()
    );
    let keep = mask.f_ne(0)?.f_to_kind(Kind::Float)?;
    Ok(match norm {
        Norm::TokenMean => keep,
        Norm::SeqMeanTokenMean => {
            let count = keep
                .f_sum_dim_intlist(1, true, Kind::Float)?
                .f_clamp_min(1.0)?;
            keep.f_div(&count)?
        }
        Norm::SeqMeanTokenSumNorm => {
            ensure!(
                max_len >= 1,
                "aggregate: {} needs max_len >= 1 (got {max_len})",
                norm.name()
            );
            keep.f_div_scalar(max_len as f64)?
        }
    })
}

/// What the weighted sum is divided by: the tokens of the batch
/// (`token-mean`) or its sequences with at least one token (the other two);
/// at least 1, so a batch without tokens gives 0.
pub fn denominator(mask: &Tensor, norm: Norm) -> Result<f64> {
    let keep = mask.f_ne(0)?;
    let n = match norm {
        Norm::TokenMean => keep.f_sum(Kind::Int64)?.int64_value(&[]),
        _ => keep
            .f_any_dim(1, false)?
            .f_sum(Kind::Int64)?
            .int64_value(&[]),
    };
    Ok(n.max(1) as f64)
}

/// sum over the mask of `per_token * weights` (masked entries never read).
pub fn weighted_sum(per_token: &Tensor, mask: &Tensor, weights: &Tensor) -> Result<Tensor> {
    let size = per_token.size();
    ensure!(
        size.len() == 2,
        "aggregate: per-token tensor must be 2-D (B, T), got shape {size:?}"
    );
    ensure!(
        mask.size() == size && weights.size() == size,
        "aggregate: mask has shape {:?} but the per-token tensor has shape {size:?}",
        mask.size()
    );
    ensure!(
        per_token.is_floating_point(),
        "aggregate: per-token tensor must be floating point, got {:?}",
        per_token.kind()
    );
    let kind = match per_token.kind() {
        Kind::Double => Kind::Double,
        _ => Kind::Float,
    };
    let keep = mask.f_ne(0)?;
    let masked = per_token.f_to_kind(kind)?.f_where_scalarother(&keep, 0.0)?;
    Ok(masked.f_mul(&weights.f_to_kind(kind)?)?.f_sum(kind)?)
}

/// PPO clipped surrogate OBJECTIVE (to be maximised; the loss is its negation),
/// per token:
///
/// `min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A)`,
/// `rho = exp(logp - logp_old)`.
///
/// `eps_low != eps_high` gives DAPO's decoupled ("clip-higher") range.
/// `logp_old` and `adv` are treated as constants (detached inside), as in PPO.
/// Shapes: `logp_old` must have `logp`'s shape; `adv` must be 0-dim or have
/// `logp`'s number of dimensions and broadcast to its shape, e.g. `(B, 1)` or
/// `(B, T)` for `(B, T)` log-probabilities (a `(B,)` advantage against `(B, T)`
/// is rejected: it would broadcast along `T`, silently wrong when `B == T`).
/// Returns a tensor of `logp`'s shape; reduce it with [`aggregate`].
///
/// On-policy (one update per batch), pass `logp_old = logp.detach()` (or
/// `logp` itself): then `rho == 1`, the value is exactly `A` and the gradient
/// with respect to `logp` is exactly `A` (so `d obj = A * d logp`): plain
/// REINFORCE with baseline. Outside the clip range the clipped branch wins the
/// `min` only when it is the pessimistic one, and then has zero gradient.
///
/// Errors: `eps_low` not in `[0, 1]`, `eps_high` negative or non-finite,
/// shape mismatches as above, device mismatch.
pub fn ppo_clip_objective(
    logp: &Tensor,
    logp_old: &Tensor,
    adv: &Tensor,
    eps_low: f64,
    eps_high: f64,
) -> Result<Tensor> {
    ensure!(
        (0.0..=1.0).contains(&eps_low),
        "ppo clip: eps_low must be in [0, 1], got {eps_low}"
    );
    ensure!(
        eps_high.is_finite() && eps_high >= 0.0,
        "ppo clip: eps_high must be finite and >= 0, got {eps_high}"
    );
    ensure!(
        logp_old.size() == logp.size(),
        "ppo clip: logp_old has shape {:?} but logp has shape {:?}",
        logp_old.size(),
        logp.size()
    );
    ensure!(
        adv.dim() == 0 || adv.dim() == logp.dim(),
        "ppo clip: advantages of shape {:?} must be 0-dim or have as many dimensions as \
         logp {:?} (use (B, 1) for per-sequence advantages)",
        adv.size(),
        logp.size()
    );
    let (unclipped, clipped) = ppo_branches(logp, logp_old, adv, eps_low, eps_high)?;
    let out = unclipped.f_minimum(&clipped)?;
    ensure!(
        out.size() == logp.size(),
        "ppo clip: advantages of shape {:?} do not broadcast to logp's shape {:?}",
        adv.size(),
        logp.size()
    );
    Ok(out)
}

/// rho * A and clip(rho, 1 - eps_low, 1 + eps_high) * A, with logp_old and A constants.
fn ppo_branches(
    logp: &Tensor,
    logp_old: &Tensor,
    adv: &Tensor,
    eps_low: f64,
    eps_high: f64,
) -> Result<(Tensor, Tensor)> {
    let adv = adv.f_detach()?;
    let rho = logp.f_sub(&logp_old.f_detach()?)?.f_exp()?;
    let clipped = rho.f_clamp(1.0 - eps_low, 1.0 + eps_high)?.f_mul(&adv)?;
    Ok((rho.f_mul(&adv)?, clipped))
}

/// Where the PPO clip is active (the clipped branch strictly below the
/// unclipped one, so its gradient is 0): the `clip_frac` metric. Same shapes as
/// `ppo_clip_objective`.
pub fn ppo_clipped(
    logp: &Tensor,
    logp_old: &Tensor,
    adv: &Tensor,
    eps_low: f64,
    eps_high: f64,
) -> Result<Tensor> {
    let _g = tch::no_grad_guard();
    let (unclipped, clipped) = ppo_branches(logp, logp_old, adv, eps_low, eps_high)?;
    Ok(clipped.f_lt_tensor(&unclipped)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn values(t: &Tensor) -> Vec<f64> {
        Vec::<f64>::try_from(&t.to_kind(Kind::Double).flatten(0, -1)).unwrap()
    }

    fn scalar(t: &Tensor) -> f64 {
        assert_eq!(t.dim(), 0, "not a scalar: {:?}", t.size());
        t.to_kind(Kind::Double).double_value(&[])
    }

    fn assert_close(got: &[f64], want: &[f64], tol: f64) {
        assert_eq!(got.len(), want.len(), "got {got:?}, want {want:?}");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= tol,
                "index {i}: got {g}, want {w} (all: {got:?})"
            );
        }
    }

    fn t2(rows: [[f64; 3]; 2]) -> Tensor {
        Tensor::from_slice2(&rows)
    }

    // per_token [[1, 2, 3], [4, 5, 6]], mask [[1, 1, 0], [1, 0, 0]].
    fn example() -> (Tensor, Tensor) {
        (
            t2([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]),
            t2([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]]),
        )
    }

    #[test]
    fn parse_names() {
        for (name, norm) in NORMS {
            assert_eq!(Norm::parse(name).unwrap(), *norm);
            assert_eq!(norm.name(), *name);
            assert_eq!(norm.to_string(), *name);
        }
        let n = names();
        for (i, a) in n.iter().enumerate() {
            assert!(!n[i + 1..].contains(a), "duplicate norm name {a:?}");
        }
        assert_eq!(Norm::default(), Norm::SeqMeanTokenMean);
        let e = Norm::parse("seq-mean").unwrap_err().to_string();
        assert_eq!(
            e,
            r#"unknown loss aggregation "seq-mean" (valid: seq-mean-token-mean, token-mean, seq-mean-token-sum-norm)"#
        );
    }

    #[test]
    fn aggregate_hand_values() {
        let (x, m) = example();
        // seq 0: (1 + 2) / 2 = 1.5; seq 1: 4 / 1 = 4; mean (1.5 + 4) / 2 = 2.75
        let v = scalar(&aggregate(&x, &m, Norm::SeqMeanTokenMean, 0).unwrap());
        assert!((v - 2.75).abs() < 1e-12, "{v}");
        // pooled: (1 + 2 + 4) / 3 = 2.3333
        let v = scalar(&aggregate(&x, &m, Norm::TokenMean, 0).unwrap());
        assert!((v - 7.0 / 3.0).abs() < 1e-12, "{v}");
        // max_len 4: seq 0: 3 / 4 = 0.75; seq 1: 4 / 4 = 1; mean 0.875
        let v = scalar(&aggregate(&x, &m, Norm::SeqMeanTokenSumNorm, 4).unwrap());
        assert!((v - 0.875).abs() < 1e-12, "{v}");
    }

    #[test]
    fn mask_kinds_agree() {
        let (x, m) = example();
        for norm in [
            Norm::SeqMeanTokenMean,
            Norm::TokenMean,
            Norm::SeqMeanTokenSumNorm,
        ] {
            let want = scalar(&aggregate(&x, &m, norm, 4).unwrap());
            for mk in [Kind::Bool, Kind::Float, Kind::Int64, Kind::Uint8] {
                let got = scalar(&aggregate(&x, &m.to_kind(mk), norm, 4).unwrap());
                assert_eq!(got, want, "{norm} with {mk:?} mask");
            }
            // f32 per-token terms: same value in f32, result f32.
            let r = aggregate(&x.to_kind(Kind::Float), &m, norm, 4).unwrap();
            assert_eq!(r.kind(), Kind::Float);
            assert!((scalar(&r) - want).abs() < 1e-6);
            // bf16 per-token terms are reduced in f32.
            let r = aggregate(&x.to_kind(Kind::BFloat16), &m, norm, 4).unwrap();
            assert_eq!(r.kind(), Kind::Float);
            assert!((scalar(&r) - want).abs() < 1e-6);
        }
    }

    #[test]
    fn empty_sequences_and_garbage_in_masked_slots() {
        // seq 1 has no token; masked-out slots hold NaN / inf.
        let x = t2([[1.0, 2.0, f64::NAN], [f64::INFINITY, f64::NAN, 5.0]]).set_requires_grad(true);
        let m = t2([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]);
        // seq-mean: only seq 0 counts: (1 + 2) / 2 = 1.5 (not 0.75 = 1.5 / 2).
        // token-mean: (1 + 2) / 2 = 1.5. sum-norm (max_len 4): (3 / 4) / 1 = 0.75.
        for (norm, want) in [
            (Norm::SeqMeanTokenMean, 1.5),
            (Norm::TokenMean, 1.5),
            (Norm::SeqMeanTokenSumNorm, 0.75),
        ] {
            let v = aggregate(&x, &m, norm, 4).unwrap();
            assert_eq!(scalar(&v), want, "{norm}");
            let g = tch::Tensor::f_run_backward(&[&v], &[&x], false, false).unwrap();
            let g = values(&g[0]);
            assert!(g.iter().all(|v| v.is_finite()), "{norm}: {g:?}");
            assert_eq!(&g[2..], &[0.0; 4], "{norm}");
        }
        // No token at all: 0, zero gradient, no NaN.
        let none = m.zeros_like();
        for norm in [
            Norm::SeqMeanTokenMean,
            Norm::TokenMean,
            Norm::SeqMeanTokenSumNorm,
        ] {
            let v = aggregate(&x, &none, norm, 4).unwrap();
            assert_eq!(scalar(&v), 0.0, "{norm}");
            let g = tch::Tensor::f_run_backward(&[&v], &[&x], false, false).unwrap();
            assert_eq!(values(&g[0]), [0.0; 6], "{norm}");
        }
        // Empty batch.
        let e = Tensor::zeros([0, 3], (Kind::Float, Device::Cpu));
        for norm in [
            Norm::SeqMeanTokenMean,
            Norm::TokenMean,
            Norm::SeqMeanTokenSumNorm,
        ] {
            assert_eq!(scalar(&aggregate(&e, &e, norm, 4).unwrap()), 0.0);
        }
    }

    #[test]
    fn aggregate_gradients() {
        let (x, m) = example();
        // d/dx of each reduction, on the mask [[1, 1, 0], [1, 0, 0]]:
        // seq-mean: 1 / (count_b * n_seq): seq 0 -> 1/(2*2) = 0.25, seq 1 -> 1/(1*2) = 0.5
        // token-mean: 1 / 3 on every selected token
        // sum-norm (max_len 4): 1 / (4 * 2) = 0.125 on every selected token
        let third = 1.0 / 3.0;
        for (norm, want) in [
            (Norm::SeqMeanTokenMean, [0.25, 0.25, 0.0, 0.5, 0.0, 0.0]),
            (Norm::TokenMean, [third, third, 0.0, third, 0.0, 0.0]),
            (
                Norm::SeqMeanTokenSumNorm,
                [0.125, 0.125, 0.0, 0.125, 0.0, 0.0],
            ),
        ] {
            let x = x.copy().set_requires_grad(true);
            aggregate(&x, &m, norm, 4).unwrap().backward();
            assert_close(&values(&x.grad()), &want, 1e-12);
        }
    }

    #[test]
    fn aggregate_errors() {
        let (x, m) = example();
        let e = aggregate(&x, &m, Norm::SeqMeanTokenSumNorm, 0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_len"), "{e}");
        let e = aggregate(&x, &m.narrow(1, 0, 2), Norm::TokenMean, 0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("[2, 2]") && e.contains("[2, 3]"), "{e}");
        let flat = x.flatten(0, -1);
        assert!(aggregate(&flat, &flat, Norm::TokenMean, 0).is_err());
        let xi = x.to_kind(Kind::Int64);
        assert!(aggregate(&xi, &m, Norm::TokenMean, 0).is_err());
    }

    #[test]
    fn ppo_clip_outside_range() {
        // rho = [1.5, 1.5, 0.5, 0.5], A = [+1, -1, +1, -1], eps 0.2 / 0.2:
        //   rho 1.5, A +1: min(1.5, 1.2) = 1.2   (clipped, gradient 0)
        //   rho 1.5, A -1: min(-1.5, -1.2) = -1.5 (unclipped, gradient rho*A = -1.5)
        //   rho 0.5, A +1: min(0.5, 0.8) = 0.5   (unclipped, gradient 0.5)
        //   rho 0.5, A -1: min(-0.5, -0.8) = -0.8 (clipped, gradient 0)
        let rho = [1.5f64, 1.5, 0.5, 0.5];
        let logp_old = Tensor::from_slice(&[-1.0f64, -2.0, -0.5, -3.0]).view([2, 2]);
        let shift = Tensor::from_slice(&rho.map(f64::ln)).view([2, 2]);
        let logp = (&logp_old + &shift).set_requires_grad(true);
        let adv = Tensor::from_slice(&[1.0f64, -1.0, 1.0, -1.0]).view([2, 2]);
        let obj = ppo_clip_objective(&logp, &logp_old, &adv, 0.2, 0.2).unwrap();
        assert_close(&values(&obj), &[1.2, -1.5, 0.5, -0.8], 1e-12);
        obj.sum(Kind::Double).backward();
        assert_close(&values(&logp.grad()), &[0.0, -1.5, 0.5, 0.0], 1e-12);

        // Decoupled clip (DAPO clip-higher, eps_low 0.2, eps_high 0.28):
        // rho 1.5, A +1 -> 1.28; rho 0.5, A -1 -> -0.8; others as above.
        let obj = ppo_clip_objective(&logp, &logp_old, &adv, 0.2, 0.28).unwrap();
        assert_close(&values(&obj), &[1.28, -1.5, 0.5, -0.8], 1e-12);

        // Per-sequence advantages (B, 1) broadcast over tokens: rows A = +1 / -1.
        // row 0: rho [1.5, 1.5], A +1 -> [1.2, 1.2]; row 1: rho [0.5, 0.5], A -1 -> [-0.8, -0.8].
        let adv_seq = Tensor::from_slice(&[1.0f64, -1.0]).view([2, 1]);
        let obj = ppo_clip_objective(&logp, &logp_old, &adv_seq, 0.2, 0.2).unwrap();
        assert_close(&values(&obj), &[1.2, 1.2, -0.8, -0.8], 1e-12);
    }

    #[test]
    fn ppo_on_policy_is_reinforce() {
        // logp_old = logp.detach(): rho = 1, value = A, d value / d logp = A.
        let logp = Tensor::from_slice(&[-1.0f64, -2.0, -0.5, -0.1, -4.0, -0.7])
            .view([2, 3])
            .set_requires_grad(true);
        let adv = Tensor::from_slice(&[2.0f64, -1.0, 0.5, 0.0, -3.0, 1.0]).view([2, 3]);
        for logp_old in [logp.detach(), logp.shallow_clone()] {
            let obj = ppo_clip_objective(&logp, &logp_old, &adv, 0.2, 0.28).unwrap();
            assert_eq!(values(&obj), values(&adv));
            let g = tch::Tensor::f_run_backward(&[&obj.sum(Kind::Double)], &[&logp], false, false)
                .unwrap();
            assert_close(&values(&g[0]), &values(&adv), 1e-15);
        }
        // Through aggregate (token-mean over all 6): gradient A / 6.
        let obj = ppo_clip_objective(&logp, &logp.detach(), &adv, 0.2, 0.2).unwrap();
        let loss = aggregate(&obj, &obj.ones_like(), Norm::TokenMean, 0).unwrap();
        let g = tch::Tensor::f_run_backward(&[&loss], &[&logp], false, false).unwrap();
        let want: Vec<f64> = values(&adv).iter().map(|a| a / 6.0).collect();
        assert_close(&values(&g[0]), &want, 1e-15);
    }

    #[test]
    fn ppo_errors() {
        let a = Tensor::zeros([2, 3], (Kind::Float, Device::Cpu));
        let b = Tensor::zeros([3, 2], (Kind::Float, Device::Cpu));
        assert!(ppo_clip_objective(&a, &b, &a, 0.2, 0.2).is_err());
        assert!(ppo_clip_objective(&a, &a, &a, -0.1, 0.2).is_err());
        assert!(ppo_clip_objective(&a, &a, &a, 1.5, 0.2).is_err());
        assert!(ppo_clip_objective(&a, &a, &a, 0.2, f64::NAN).is_err());
        assert!(ppo_clip_objective(&a, &a, &a, 0.2, -1.0).is_err());
        // (B,) advantages against (B, T) are rejected even when they would broadcast.
        let sq = Tensor::zeros([3, 3], (Kind::Float, Device::Cpu));
        let v = Tensor::zeros([3], (Kind::Float, Device::Cpu));
        assert!(ppo_clip_objective(&sq, &sq, &v, 0.2, 0.2).is_err());
        // Not broadcastable, and broadcastable to a bigger shape.
        let bad = Tensor::zeros([2, 2], (Kind::Float, Device::Cpu));
        assert!(ppo_clip_objective(&a, &a, &bad, 0.2, 0.2).is_err());
        let big = Tensor::zeros([4, 1], (Kind::Float, Device::Cpu));
        let one = Tensor::zeros([1, 3], (Kind::Float, Device::Cpu));
        assert!(ppo_clip_objective(&one, &one, &big, 0.2, 0.2).is_err());
        // Scalar advantage is fine.
        let s = Tensor::from(1.0f32);
        assert_eq!(
            ppo_clip_objective(&a, &a, &s, 0.2, 0.2).unwrap().size(),
            [2, 3]
        );
    }
}
