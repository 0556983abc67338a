//! Offline, value-free optimisation (ALGORITHMS.md section 5): RPO and the
//! comparison losses it is measured against, on (prompt, completion, reward)
//! rows. Every loss is a function of l_theta, the completion's mean per-token
//! log-probability (EOS included), so each method here is a small function
//! giving per row its loss and dL/dl_theta; `update::backward` then carries
//! that derivative into the model as a teacher-forced replay whose
//! "advantage" is -B dL/dl (under `seq-mean-token-mean`, the gradient of
//! -(1/B) sum_i A_i l_i is exactly the loss's).
use anyhow::{bail, ensure, Result};

/// What one row brings to a loss.
#[derive(Debug, Clone, Copy, Default)]
pub struct Row {
    /// l_theta: the policy's mean per-token log-prob of the completion.
    pub l: f64,
    /// l_ref: the frozen reference's.
    pub l_ref: f64,
    /// The (z-scored) reward.
    pub reward: f64,
    /// RPO: the prompt's partition value V_hat.
    pub v_hat: f64,
}

/// Per row: the loss term (the batch loss is their mean) and dL_i/dl_i.
pub type Terms = (Vec<f64>, Vec<f64>);

/// RPO: 1/2 [(l - l_ref) - (r - V_hat)/tau]^2.
pub fn rpo(rows: &[Row], tau: f64) -> Terms {
    rows.iter()
        .map(|x| {
            let res = (x.l - x.l_ref) - (x.reward - x.v_hat) / tau;
            (0.5 * res * res, res)
        })
        .unzip()
}

/// DRO with the value `v` of each row's prompt: 1/2 [r - V - tau (l - l_ref)]^2.
pub fn dro(rows: &[Row], values: &[f64], tau: f64) -> Terms {
    rows.iter()
        .zip(values)
        .map(|(x, v)| {
            let res = x.reward - v - tau * (x.l - x.l_ref);
            (0.5 * res * res, -tau * res)
        })
        .unzip()
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// KTO: rewards above `threshold` (the training mean) are desirable;
/// r_theta = l - l_ref, z0 the batch mean of r_theta (held fixed), and
/// lambda - lambda sigma(beta (r_theta - z0)) for desirable rows,
/// lambda - lambda sigma(beta (z0 - r_theta)) for the others (one lambda).
pub fn kto(rows: &[Row], beta: f64, lambda: f64, threshold: f64) -> Terms {
    let z0 = rows.iter().map(|x| x.l - x.l_ref).sum::<f64>() / rows.len().max(1) as f64;
    rows.iter()
        .map(|x| {
            let sign = if x.reward > threshold { 1.0 } else { -1.0 };
            let s = sigmoid(beta * sign * (x.l - x.l_ref - z0));
            (lambda - lambda * s, -lambda * s * (1.0 - s) * beta * sign)
        })
        .unzip()
}

/// V_hat(x) = tau * logsumexp_i(l_ref_i + r_i / tau) over the prompt's
/// completions, computed stably.
pub fn v_hat(l_ref: &[f64], rewards: &[f64], tau: f64) -> Result<f64> {
    ensure!(
        !l_ref.is_empty() && l_ref.len() == rewards.len(),
        "v_hat: {} log-probs for {} rewards",
        l_ref.len(),
        rewards.len()
    );
    ensure!(tau > 0.0, "tau must be > 0, got {tau}");
    let z: Vec<f64> = l_ref
        .iter()
        .zip(rewards)
        .map(|(l, r)| l + r / tau)
        .collect();
    let m = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    Ok(tau * (m + z.iter().map(|v| (v - m).exp()).sum::<f64>().ln()))
}

/// Mean and population std of the training rewards (std 1 when they are
/// all equal, so z-scores stay finite).
pub fn reward_stats(rewards: &[f64]) -> Result<(f64, f64)> {
    if rewards.is_empty() {
        bail!("no rewards to z-score");
    }
    let n = rewards.len() as f64;
    let mean = rewards.iter().sum::<f64>() / n;
    let std = (rewards.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / n).sqrt();
    Ok((mean, if std > 0.0 { std } else { 1.0 }))
}

/// DRO's value head V_phi: Linear(H, width) -> tanh -> Linear(width, 1), on
/// the mean of the prompt's final hidden states (detached here: the head
/// trains, the backbone learns from the loss's l term).
pub struct ValueHead {
    pub w1: tch::Tensor,
    pub b1: tch::Tensor,
    pub w2: tch::Tensor,
    pub b2: tch::Tensor,
}

impl ValueHead {
    /// N(0, 0.02) matrices, zero biases, from the crate's seeded generator.
    pub fn new(hidden: i64, width: i64, seed: u64, device: tch::Device) -> Result<Self> {
        let mut rng = crate::rng::Rng::new(seed);
        let mut normal = |rows: i64, cols: i64| -> Result<tch::Tensor> {
            let v: Vec<f32> = (0..rows * cols)
                .map(|_| (rng.next_normal() * 0.02) as f32)
                .collect();
            Ok(tch::Tensor::from_slice(&v)
                .f_view([rows, cols])?
                .f_to_device(device)?
                .set_requires_grad(true))
        };
        let zeros = |n: i64| -> Result<tch::Tensor> {
            Ok(tch::Tensor::f_zeros([n], (tch::Kind::Float, device))?.set_requires_grad(true))
        };
        Ok(ValueHead {
            w1: normal(width, hidden)?,
            b1: zeros(width)?,
            w2: normal(1, width)?,
            b2: zeros(1)?,
        })
    }

    /// (B, H) -> (B,) values.
    pub fn forward(&self, x: &tch::Tensor) -> Result<tch::Tensor> {
        let h = x.f_linear(&self.w1, Some(&self.b1))?.f_tanh()?;
        Ok(h.f_linear(&self.w2, Some(&self.b2))?.f_squeeze_dim(-1)?)
    }

    pub fn named_parameters(&self) -> Vec<(&'static str, tch::Tensor)> {
        [
            ("w1", &self.w1),
            ("b1", &self.b1),
            ("w2", &self.w2),
            ("b2", &self.b2),
        ]
        .into_iter()
        .map(|(n, t)| (n, t.shallow_clone()))
        .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &[f64], b: &[f64]) {
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-12, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn rpo_dro_kto_by_hand() {
        let rows = [
            Row {
                l: -1.0,
                l_ref: -1.5,
                reward: 1.0,
                v_hat: 0.5,
            },
            Row {
                l: -2.0,
                l_ref: -1.0,
                reward: -1.0,
                v_hat: 0.5,
            },
        ];
        // RPO, tau 5: residuals 0.5 - 0.1 = 0.4 and -1 + 0.3 = -0.7.
        let (loss, d) = rpo(&rows, 5.0);
        close(&loss, &[0.08, 0.245]);
        close(&d, &[0.4, -0.7]);
        // DRO, tau 1, values 0.2 and -0.3: residuals 1 - 0.2 - 0.5 = 0.3 and
        // -1 + 0.3 + 1 = 0.3; dL/dl = -tau * residual.
        let (loss, d) = dro(&rows, &[0.2, -0.3], 1.0);
        close(&loss, &[0.045, 0.045]);
        close(&d, &[-0.3, -0.3]);
        // KTO, beta = lambda = 1, threshold 0: r_theta 0.5 and -1, z0 -0.25;
        // desirable s = sigma(0.75), undesirable s = sigma(0.75) too.
        let s = 1.0 / (1.0 + (-0.75f64).exp());
        let (loss, d) = kto(&rows, 1.0, 1.0, 0.0);
        close(&loss, &[1.0 - s, 1.0 - s]);
        close(&d, &[-s * (1.0 - s), s * (1.0 - s)]);
    }

    #[test]
    fn v_hat_is_a_logsumexp() {
        let (l, r) = ([-1.0, -2.0, -0.5], [1.0, 0.0, -1.0]);
        let direct = 5.0 * ((-1.0f64 + 0.2).exp() + (-2.0f64).exp() + (-0.5f64 - 0.2).exp()).ln();
        assert!((v_hat(&l, &r, 5.0).unwrap() - direct).abs() < 1e-12);
        // Stable where the direct sum overflows.
        let big = v_hat(&[800.0, 800.0], &[0.0, 0.0], 1.0).unwrap();
        assert!((big - (800.0 + 2f64.ln())).abs() < 1e-9, "{big}");
        assert!(v_hat(&[], &[], 5.0).is_err());
    }

    #[test]
    fn reward_stats_are_population() {
        let (m, s) = reward_stats(&[1.0, 2.0, 3.0, 4.0]).unwrap();
        assert_eq!(m, 2.5);
        assert!((s - 1.25f64.sqrt()).abs() < 1e-12);
        assert_eq!(reward_stats(&[2.0, 2.0]).unwrap(), (2.0, 1.0));
    }
}
