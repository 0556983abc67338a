//! TARPO's action-head router: one linear layer on the final-normed hidden
//! state h_t (the vector the LM head reads) choosing, for every generated
//! token, whether the next input is the token's embedding (hard) or a mixture
//! of embeddings (soft). pi_r(m | h) = softmax((W h + b) / T_act).
use super::sampler::Rng;
use anyhow::{bail, Result};
use tch::{Device, Kind, Tensor};

/// The router's actions, in this order (ALGORITHMS.md section 2).
pub use super::records::{HARD, SOFT};

pub struct Router {
    /// (2, H) fp32: in bf16 a bias of 4.6 moves in steps of 0.03, far larger than an Adam step.
    pub weight: Tensor,
    /// (2,) fp32; never weight-decayed.
    pub bias: Tensor,
    pub temperature: f64,
}

impl Router {
    /// W ~ N(0, 0.001^2) and b = [ln((1 - p) / p), 0], so pi_r(soft) starts at
    /// about `init_soft` (0.01 gives b = [4.6, 0], the paper's 1.5B/7B setting).
    pub fn new(
        hidden: i64,
        init_soft: f64,
        temperature: f64,
        seed: u64,
        device: Device,
    ) -> Result<Self> {
        if !(temperature > 0.0 && temperature.is_finite()) {
            bail!("router temperature must be > 0, got {temperature}");
        }
        let mut rng = Rng::new(seed);
        let w: Vec<f32> = (0..2 * hidden)
            .map(|_| (rng.next_normal() * 0.001) as f32)
            .collect();
        let b = [(Self::hard_bias(init_soft)? * temperature) as f32, 0.0];
        Ok(Router {
            weight: Tensor::from_slice(&w)
                .f_view([2, hidden])?
                .f_to_device(device)?
                .set_requires_grad(true),
            bias: Tensor::from_slice(&b)
                .f_to_device(device)?
                .set_requires_grad(true),
            temperature,
        })
    }

    /// The hard-mode bias that gives soft probability `p` when W h = 0 (at T_act = 1).
    pub fn hard_bias(p: f64) -> Result<f64> {
        if !(p > 0.0 && p < 1.0) {
            bail!("init_soft must be in (0, 1), got {p}");
        }
        Ok(((1.0 - p) / p).ln())
    }

    /// log pi_r(. | h) for h (.., H) in any dtype: (.., 2) fp32.
    pub fn log_probs(&self, h: &Tensor) -> Result<Tensor> {
        let z = h
            .f_to_kind(Kind::Float)?
            .f_linear(&self.weight, Some(&self.bias))?;
        Ok(z.f_div_scalar(self.temperature)?
            .f_log_softmax(-1, Kind::Float)?)
    }

    /// A frozen copy (the router reference: the router at initialisation).
    pub fn frozen_copy(&self) -> Result<Router> {
        Ok(Router {
            weight: self.weight.f_detach_copy()?,
            bias: self.bias.f_detach_copy()?,
            temperature: self.temperature,
        })
    }

    pub fn parameters(&self) -> Vec<Tensor> {
        vec![self.weight.shallow_clone(), self.bias.shallow_clone()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn initial_soft_probability_is_the_requested_one() {
        assert!((Router::hard_bias(0.01).unwrap() - 4.595).abs() < 1e-3);
        assert!((Router::hard_bias(0.1).unwrap() - 2.197).abs() < 1e-3);
        let r = Router::new(64, 0.01, 1.0, 42, Device::Cpu).unwrap();
        let h = Tensor::randn([5, 64], (Kind::Float, Device::Cpu));
        let p_soft = r.log_probs(&h).unwrap().exp().select(1, SOFT);
        // W is tiny (std 1e-3), so p_soft stays close to 1 %.
        let max_dev = (p_soft - 0.01).abs().max().double_value(&[]);
        assert!(max_dev < 2e-3, "{max_dev}");
        let std = r.weight.std(true).double_value(&[]);
        assert!((std - 0.001).abs() < 2e-4, "{std}");
        assert!(Router::new(64, 1.5, 1.0, 0, Device::Cpu).is_err());
    }
}
