//! Rotary position embeddings, computed in fp32 like transformers.
use super::config::{ModelConfig, RopeScaling};
use anyhow::Result;
use tch::{Device, Kind, Tensor};

pub struct Rope {
    /// (head_dim / 2,) fp32 inverse frequencies after any scaling.
    inv_freq: Tensor,
    /// rotate_half(x) = x[perm] * sign: the halves swapped, the first negated.
    perm: Tensor,
    sign: Tensor,
}

impl Rope {
    pub fn new(cfg: &ModelConfig, device: Device) -> Result<Self> {
        let dim = cfg.head_dim;
        let exponents = Tensor::f_arange_start_step(0, dim, 2, (Kind::Int64, device))?
            .f_to_kind(Kind::Float)?
            .f_div_scalar(dim as f64)?;
        let mut inv_freq = Tensor::f_pow_scalar(cfg.rope_theta, &exponents)?.f_reciprocal()?;
        match cfg.rope_scaling {
            RopeScaling::Default => {}
            RopeScaling::Linear { factor } => inv_freq = inv_freq.f_div_scalar(factor)?,
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old_ctx,
            } => {
                // Long wavelengths are divided by `factor`, short ones kept, and the
                // band between them interpolated (transformers' llama3 rope).
                let low_wavelen = old_ctx / low_freq_factor;
                let high_wavelen = old_ctx / high_freq_factor;
                let wavelen = inv_freq
                    .f_reciprocal()?
                    .f_mul_scalar(2.0 * std::f64::consts::PI)?;
                let scaled = inv_freq.f_div_scalar(factor)?;
                let long = wavelen.f_gt(low_wavelen)?;
                let base = scaled.f_where_self(&long, &inv_freq)?;
                let smooth = wavelen
                    .f_reciprocal()?
                    .f_mul_scalar(old_ctx)?
                    .f_sub_scalar(low_freq_factor)?
                    .f_div_scalar(high_freq_factor - low_freq_factor)?;
                let smoothed = (base
                    .f_div_scalar(factor)?
                    .f_mul(&smooth.f_neg()?.f_add_scalar(1.0)?)?)
                .f_add(&smooth.f_mul(&base)?)?;
                let medium = wavelen
                    .f_ge(high_wavelen)?
                    .f_logical_and(&wavelen.f_le(low_wavelen)?)?;
                inv_freq = smoothed.f_where_self(&medium, &base)?;
            }
        }
        let half = dim / 2;
        let perm = Tensor::f_cat(
            &[
                Tensor::f_arange_start(half, dim, (Kind::Int64, device))?,
                Tensor::f_arange(half, (Kind::Int64, device))?,
            ],
            0,
        )?;
        let sign = Tensor::f_cat(
            &[
                Tensor::f_full([half], -1.0, (Kind::Float, device))?,
                Tensor::f_ones([half], (Kind::Float, device))?,
            ],
            0,
        )?;
        Ok(Rope {
            inv_freq,
            perm,
            sign,
        })
    }

    /// The rotation for `positions` (B, T): cos and sign-folded sin, each
    /// shaped (B, 1, T, head_dim) in `dtype`, computed once per forward.
    pub fn angles(&self, positions: &Tensor, dtype: Kind) -> Result<Angles> {
        let freqs = positions
            .f_to_kind(Kind::Float)?
            .f_unsqueeze(-1)?
            .f_mul(&self.inv_freq)?; // (B, T, D/2)
        let emb = Tensor::f_cat(&[&freqs, &freqs], -1)?.f_unsqueeze(1)?; // (B, 1, T, D)
        Ok(Angles {
            cos: emb.f_cos()?.f_to_kind(dtype)?,
            signed_sin: emb.f_sin()?.f_mul(&self.sign)?.f_to_kind(dtype)?,
            perm: self.perm.shallow_clone(),
        })
    }
}

pub struct Angles {
    cos: Tensor,
    /// sin with rotate_half's sign folded in (an exact flip).
    signed_sin: Tensor,
    perm: Tensor,
}

impl Angles {
    /// cos and the sign-folded sin, each (B, 1, T, head_dim).
    pub(crate) fn parts(&self) -> (&Tensor, &Tensor) {
        (&self.cos, &self.signed_sin)
    }

    /// x * cos + rotate_half(x) * sin, for x (B, H, T, D), in four ops.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let rotated = x.f_index_select(3, &self.perm)?;
        Ok(x.f_mul(&self.cos)?
            .f_add(&rotated.f_mul(&self.signed_sin)?)?)
    }
}
