//! Per-token KL penalty estimators against a frozen reference policy.
//!
//! Every estimator takes `(logp, logp_ref)`: the log-probabilities of the
//! sampled tokens under the policy being trained and under the reference,
//! two floating-point tensors of the SAME shape (no broadcasting). With
//! `d = logp_ref - logp` (Schulman's "approximating KL divergence"):
//!
//! | name | per-token value      | notes                                     |
//! |------|----------------------|-------------------------------------------|
//! | `k1` | `-d`                 | unbiased for KL(pi ‖ ref), can be < 0     |
//! | `k2` | `d^2 / 2`            | biased, low variance, `>= 0`              |
//! | `k3` | `exp(d) - d - 1`     | unbiased, `>= 0`; the default (as in GRPO) |
//!
//! Results keep the input shape; reduce them with
//! [`crate::rl::loss_agg::aggregate`]. Gradients flow through both inputs;
//! detach the reference if it is not already a constant.

use anyhow::{ensure, Result};
use tch::Tensor;

/// One KL estimator: `(logp, logp_ref) -> per-token penalty`.
pub type KlEstimator = fn(&Tensor, &Tensor) -> Result<Tensor>;

/// The estimator registry: `(name, function)`. Names are unique (tested).
pub const ESTIMATORS: &[(&str, KlEstimator)] = &[("k1", k1), ("k2", k2), ("k3", k3)];

/// Estimator used when the configuration names none.
pub const DEFAULT_ESTIMATOR: &str = "k3";

/// Registered estimator names, in table order.
pub fn names() -> Vec<&'static str> {
    super::registry::names(ESTIMATORS)
}

/// Looks an estimator up by name. Unknown names produce an error that names
/// the culprit and lists the valid names.
pub fn lookup(name: &str) -> Result<KlEstimator> {
    super::registry::lookup(ESTIMATORS, name, "KL estimator")
}

/// Looks the named estimator up and applies it.
pub fn compute(name: &str, logp: &Tensor, logp_ref: &Tensor) -> Result<Tensor> {
    lookup(name)?(logp, logp_ref)
}

/// `k1 = -d = logp - logp_ref`.
pub fn k1(logp: &Tensor, logp_ref: &Tensor) -> Result<Tensor> {
    Ok(log_ratio(logp, logp_ref)?.f_neg()?)
}

/// `k2 = d^2 / 2`.
pub fn k2(logp: &Tensor, logp_ref: &Tensor) -> Result<Tensor> {
    Ok(log_ratio(logp, logp_ref)?.f_square()?.f_mul_scalar(0.5)?)
}

/// `k3 = exp(d) - d - 1`, evaluated as `expm1(d) - d` (no cancellation for
/// small `|d|`, where the `exp(d) - 1` form loses all digits in f32), then
/// clamped at 0 so that rounding can never make it negative. The clamp is
/// inactive wherever the exact value is positive, so gradients are
/// unaffected: `d k3 / d logp = 1 - exp(d)`. Large positive `d` overflows to
/// `+inf` like the exact value would in the tensor's precision.
pub fn k3(logp: &Tensor, logp_ref: &Tensor) -> Result<Tensor> {
    let d = log_ratio(logp, logp_ref)?;
    Ok(d.f_expm1()?.f_sub(&d)?.f_clamp_min(0.0)?)
}

/// `d = logp_ref - logp`, after checking both are floating-point tensors of
/// the same shape.
fn log_ratio(logp: &Tensor, logp_ref: &Tensor) -> Result<Tensor> {
    ensure!(
        logp.size() == logp_ref.size(),
        "KL estimator: logp has shape {:?} but logp_ref has shape {:?} (must be equal)",
        logp.size(),
        logp_ref.size()
    );
    ensure!(
        logp.is_floating_point() && logp_ref.is_floating_point(),
        "KL estimator: log-probabilities must be floating point (got {:?} and {:?})",
        logp.kind(),
        logp_ref.kind()
    );
    Ok(logp_ref.f_sub(logp)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn values(t: &Tensor) -> Vec<f64> {
        Vec::<f64>::try_from(&t.to_kind(Kind::Double).flatten(0, -1)).unwrap()
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

    // logp = 0, logp_ref = d, so d takes the listed values.
    const D: [f64; 4] = [-1.0, 0.0, 0.5, 2.0];

    fn inputs() -> (Tensor, Tensor) {
        (
            Tensor::zeros([4], (Kind::Double, Device::Cpu)),
            Tensor::from_slice(&D),
        )
    }

    #[test]
    fn table_names_are_unique_and_default_is_registered() {
        let n = names();
        for (i, a) in n.iter().enumerate() {
            assert!(!n[i + 1..].contains(a), "duplicate KL estimator name {a:?}");
        }
        assert!(n.contains(&DEFAULT_ESTIMATOR));
        assert_eq!(n, ["k1", "k2", "k3"]);
    }

    #[test]
    fn k1_hand_values() {
        // -d = [1, 0, -0.5, -2]
        let (lp, lr) = inputs();
        assert_close(
            &values(&k1(&lp, &lr).unwrap()),
            &[1.0, 0.0, -0.5, -2.0],
            0.0,
        );
    }

    #[test]
    fn k2_hand_values() {
        // d^2 / 2 = [0.5, 0, 0.125, 2]
        let (lp, lr) = inputs();
        assert_close(
            &values(&k2(&lp, &lr).unwrap()),
            &[0.5, 0.0, 0.125, 2.0],
            0.0,
        );
    }

    #[test]
    fn k3_hand_values() {
        // exp(d) - d - 1:
        // d = -1: 0.36787944 + 1 - 1 = 0.36787944
        // d =  0: 1 - 0 - 1 = 0
        // d = .5: 1.64872127 - 0.5 - 1 = 0.14872127
        // d =  2: 7.38905610 - 2 - 1 = 4.38905610
        let (lp, lr) = inputs();
        let want = [0.367_879_44, 0.0, 0.148_721_27, 4.389_056_10];
        assert_close(&values(&k3(&lp, &lr).unwrap()), &want, 1e-8);
        // Non-zero logp: logp = [-2, -0.5], logp_ref = [-1, -1.5] -> d = [1, -1]:
        // k3 = [e - 2, 1/e] = [0.71828183, 0.36787944]; k1 = [-1, 1]; k2 = [0.5, 0.5].
        let lp = Tensor::from_slice(&[-2.0f64, -0.5]);
        let lr = Tensor::from_slice(&[-1.0f64, -1.5]);
        assert_close(
            &values(&compute("k3", &lp, &lr).unwrap()),
            &[0.718_281_83, 0.367_879_44],
            1e-8,
        );
        assert_close(
            &values(&compute("k1", &lp, &lr).unwrap()),
            &[-1.0, 1.0],
            0.0,
        );
        assert_close(&values(&compute("k2", &lp, &lr).unwrap()), &[0.5, 0.5], 0.0);
    }

    #[test]
    fn k3_nonnegative_over_range() {
        for kind in [Kind::Float, Kind::Double] {
            let d = Tensor::linspace(-20.0, 20.0, 40_001, (kind, Device::Cpu));
            // Also around 0, where rounding matters most.
            let small = Tensor::linspace(-1e-3, 1e-3, 20_001, (kind, Device::Cpu));
            for d in [d, small] {
                let lp = d.zeros_like();
                let k = k3(&lp, &d).unwrap();
                let min = k.min().double_value(&[]);
                assert!(min >= 0.0, "{kind:?}: min k3 = {min}");
                assert!(values(&k).iter().all(|v| v.is_finite()));
            }
        }
    }

    #[test]
    fn k3_small_d_is_accurate_in_f32() {
        // exp(d) - d - 1 ~= d^2/2 for small d: 1e-4 -> 5.0e-9 (relative accuracy
        // that the naive f32 form exp(d) - d - 1 cannot reach).
        let d = Tensor::from_slice(&[1e-4f32, -1e-4]);
        let k = values(&k3(&d.zeros_like(), &d).unwrap());
        for v in k {
            assert!((v - 5.0e-9).abs() < 5.0e-10, "{v}");
        }
    }

    #[test]
    fn k3_gradient() {
        // d k3 / d logp = 1 - exp(d): d = [-1, 0, 0.5, 2] -> [0.63212056, 0, -0.64872127, -6.3890561]
        let (lp, lr) = inputs();
        let lp = lp.set_requires_grad(true);
        k3(&lp, &lr).unwrap().sum(Kind::Double).backward();
        let want = [0.632_120_56, 0.0, -0.648_721_27, -6.389_056_10];
        assert_close(&values(&lp.grad()), &want, 1e-8);
    }

    #[test]
    fn errors() {
        let e = lookup("k4").err().unwrap().to_string();
        assert_eq!(e, r#"unknown KL estimator "k4" (valid: k1, k2, k3)"#);
        let a = Tensor::zeros([2, 3], (Kind::Float, Device::Cpu));
        let b = Tensor::zeros([3, 2], (Kind::Float, Device::Cpu));
        let e = k3(&a, &b).unwrap_err().to_string();
        assert!(e.contains("[2, 3]") && e.contains("[3, 2]"), "{e}");
        let i = Tensor::zeros([2, 3], (Kind::Int64, Device::Cpu));
        assert!(k1(&a, &i)
            .unwrap_err()
            .to_string()
            .contains("floating point"));
    }
}
