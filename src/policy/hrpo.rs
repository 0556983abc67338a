//! HRPO's hybrid input gate (Yue et al. 2025, "Hybrid Latent Reasoning via
//! Reinforcement Learning"; reference code Yueeeeeeee/HRPO, `thinking_residual`
//! in its patched `modeling_qwen2.py` / `modeling_llama.py`).
//!
//! Before the answer marker, the input after token y_t blends its embedding
//! e = E[y_t] with h_hat = p_t^T E / ||p_t||_2 (p_t the sampling distribution,
//! after temperature and top-k):
//!
//!   r = sigmoid(W_r e + b_r),  i = sigmoid(W_i e + b_i),
//!   a = exp(-c softplus(-Lambda) r)            (c = 8),
//!   x = a e + sqrt(1 - a^2 + 1e-8) (i h_hat).
//!
//! Lambda (H,) is initialised as -log(u^(-1/c) - 1) with u ~ U[r_min, r_max]
//! per dimension, so that softplus(-Lambda) = -log(u) / c and a = u^r: the
//! input starts as almost exactly the token embedding (a close to 1).
//!
//! Initialisation. The reference declares the gates as `nn.Linear(H, H)` and
//! leaves them to transformers' `_init_weights` (`post_init`, and the same
//! routine for modules missing from a checkpoint): weight ~ N(0, 0.02^2)
//! (`initializer_range`), bias 0. Lambda is set by `reset_lambda_parameters(
//! r_min, r_max)` after the LoRA wrap, with r_min = 0.99 and r_max = 0.999 in
//! the paper's runs. The same here, drawn from this crate's seeded `Rng`
//! (W_r row-major, then W_i, then the H uniforms of Lambda), so a seed fixes
//! the gate exactly.
use super::sampler::Rng;
use anyhow::{bail, Result};
use tch::{Device, Kind, Tensor};

/// HRPO's constant c in a = exp(-c softplus(-Lambda) r).
pub const C: f64 = 8.0;
/// Standard deviation of the initial gate weights (transformers' default
/// `initializer_range`).
pub const INIT_STD: f64 = 0.02;
/// Range of u in Lambda's initialisation (the paper's r_min, r_max).
pub const R_MIN: f64 = 0.99;
pub const R_MAX: f64 = 0.999;
/// Inside sqrt(1 - a^2 + EPS), as in the reference.
pub const EPS: f64 = 1e-8;

/// The trainable gate: every tensor fp32 with requires_grad.
pub struct HrpoGate {
    /// (H, H) reset gate weight (`thinking_residual_gate_r.weight`).
    pub w_r: Tensor,
    /// (H,) reset gate bias.
    pub b_r: Tensor,
    /// (H, H) input gate weight (`thinking_residual_gate_i.weight`).
    pub w_i: Tensor,
    /// (H,) input gate bias.
    pub b_i: Tensor,
    /// (H,) per-dimension decay parameter (`thinking_residual_Lambda.Lambda`).
    pub lambda: Tensor,
}

impl HrpoGate {
    /// The paper's initialisation: W ~ N(0, 0.02^2), b = 0, u ~ U[0.99, 0.999].
    pub fn new(hidden: i64, seed: u64, device: Device) -> Result<Self> {
        Self::with_lambda_range(hidden, seed, device, R_MIN, R_MAX)
    }

    /// Like `new` with u ~ U[r_min, r_max] in Lambda's initialisation
    /// (the reference's `--residual_r_min` / `r_max`).
    pub fn with_lambda_range(
        hidden: i64,
        seed: u64,
        device: Device,
        r_min: f64,
        r_max: f64,
    ) -> Result<Self> {
        if hidden < 1 {
            bail!("HRPO gate: hidden size must be >= 1, got {hidden}");
        }
        if !(r_min > 0.0 && r_min <= r_max && r_max < 1.0) {
            bail!("HRPO gate: need 0 < r_min <= r_max < 1, got r_min {r_min}, r_max {r_max}");
        }
        let mut rng = Rng::new(seed);
        let n = (hidden * hidden) as usize;
        let mut normal = |count: usize| -> Vec<f32> {
            (0..count)
                .map(|_| (rng.next_normal() * INIT_STD) as f32)
                .collect()
        };
        let w_r = normal(n);
        let w_i = normal(n);
        let lambda: Vec<f32> = (0..hidden)
            .map(|_| {
                let u = r_min + (r_max - r_min) * rng.next_f64();
                -(u.powf(-1.0 / C) - 1.0).ln() as f32
            })
            .collect();
        let param = |v: &[f32], shape: &[i64]| -> Result<Tensor> {
            Ok(Tensor::from_slice(v)
                .f_view(shape)?
                .f_to_device(device)?
                .set_requires_grad(true))
        };
        let zeros = vec![0f32; hidden as usize];
        Ok(HrpoGate {
            w_r: param(&w_r, &[hidden, hidden])?,
            b_r: param(&zeros, &[hidden])?,
            w_i: param(&w_i, &[hidden, hidden])?,
            b_i: param(&zeros, &[hidden])?,
            lambda: param(&lambda, &[hidden])?,
        })
    }

    /// Hidden size H.
    pub fn hidden(&self) -> i64 {
        self.lambda.size()[0]
    }

    /// [W_r, b_r, W_i, b_i, Lambda] (shared handles: gradients land here).
    pub fn parameters(&self) -> Vec<Tensor> {
        self.named_parameters()
            .into_iter()
            .map(|(_, t)| t)
            .collect()
    }

    /// The parameters under the reference's module names.
    pub fn named_parameters(&self) -> Vec<(&'static str, Tensor)> {
        vec![
            ("thinking_residual_gate_r.weight", self.w_r.shallow_clone()),
            ("thinking_residual_gate_r.bias", self.b_r.shallow_clone()),
            ("thinking_residual_gate_i.weight", self.w_i.shallow_clone()),
            ("thinking_residual_gate_i.bias", self.b_i.shallow_clone()),
            (
                "thinking_residual_Lambda.Lambda",
                self.lambda.shallow_clone(),
            ),
        ]
    }

    /// The reset gate r = sigmoid(W_r e + b_r) for e (.., H): (.., H) fp32.
    pub fn reset_gate(&self, e: &Tensor) -> Result<Tensor> {
        Ok(e.f_to_kind(Kind::Float)?
            .f_linear(&self.w_r, Some(&self.b_r))?
            .f_sigmoid()?)
    }

    /// The input gate i = sigmoid(W_i e + b_i) for e (.., H): (.., H) fp32.
    pub fn input_gate(&self, e: &Tensor) -> Result<Tensor> {
        Ok(e.f_to_kind(Kind::Float)?
            .f_linear(&self.w_i, Some(&self.b_i))?
            .f_sigmoid()?)
    }

    /// a = exp(-c softplus(-Lambda) r) for a reset gate r (.., H): (.., H) fp32
    /// (the reference logs its mean as `embeds_ratio`).
    pub fn decay(&self, r: &Tensor) -> Result<Tensor> {
        // torch's softplus(beta = 1, threshold = 20), as the reference calls it.
        let sp = self.lambda.f_neg()?.f_softplus()?;
        Ok(r.f_to_kind(Kind::Float)?
            .f_mul(&sp)?
            .f_mul_scalar(-C)?
            .f_exp()?)
    }

    /// x = a e + sqrt(1 - a^2 + 1e-8) (i h_hat) for e, h_hat (.., H) in any
    /// dtype: (.., H) fp32, differentiable in the gate's parameters.
    pub fn forward(&self, e: &Tensor, h_hat: &Tensor) -> Result<Tensor> {
        let h = self.hidden();
        if e.size().last() != Some(&h) || h_hat.size() != e.size() {
            bail!(
                "HRPO gate of hidden size {h}: got e {:?} and h_hat {:?}",
                e.size(),
                h_hat.size()
            );
        }
        let e = e.f_to_kind(Kind::Float)?;
        let h_hat = h_hat.f_to_kind(Kind::Float)?;
        let a = self.decay(&self.reset_gate(&e)?)?;
        let i = self.input_gate(&e)?;
        let keep = a.f_mul(&a)?.f_neg()?.f_add_scalar(1.0 + EPS)?.f_sqrt()?;
        Ok(a.f_mul(&e)?.f_add(&keep.f_mul(&i.f_mul(&h_hat)?)?)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_is_seeded_and_in_range() {
        let a = HrpoGate::new(16, 5, Device::Cpu).unwrap();
        let b = HrpoGate::new(16, 5, Device::Cpu).unwrap();
        for (x, y) in a.parameters().iter().zip(b.parameters()) {
            assert!(x.requires_grad());
            assert_eq!(x.kind(), Kind::Float);
            assert_eq!((x - y).abs().max().double_value(&[]), 0.0);
        }
        // u = sigmoid(Lambda)^c lies in [r_min, r_max].
        let u = a.lambda.detach().sigmoid().pow_tensor_scalar(C);
        assert!(u.min().double_value(&[]) >= R_MIN - 1e-6);
        assert!(u.max().double_value(&[]) <= R_MAX + 1e-6);
        assert!(HrpoGate::with_lambda_range(16, 0, Device::Cpu, 0.5, 1.0).is_err());
        assert!(HrpoGate::new(0, 0, Device::Cpu).is_err());
    }
}
