//! RLTT (ALGORITHMS.md section 6): on a looped model, every loop's
//! log-probability of the sampled token takes part in the policy gradient,
//!
//!   loss = -(1/G) sum_i (1/|y_i|) sum_j sum_t w_t,ij log P^(t)(y_ij) A_i,
//!
//! plain REINFORCE, the normalisation modes of `loss_agg`, and the KL on the
//! final loop only. This file holds the loop weightings w; `update` runs the
//! replay with every loop's states.
use anyhow::{bail, Result};
use tch::{Kind, Tensor};

/// How the loops share the credit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LoopWeighting {
    /// 1/T each.
    Uniform,
    /// t^alpha / sum_s s^alpha, t from 1 (alpha 1: 0.1, 0.2, 0.3, 0.4 at T = 4).
    Progressive(f64),
    /// Per token, the exit gate's distribution p_t, not detached: the gate and
    /// the shared layers get gradient through it.
    ExitPdf,
    /// softmax(theta) over T trainable logits (`Policy::loop_logits`).
    Learned,
}

impl LoopWeighting {
    pub const NAMES: [&'static str; 4] = ["uniform", "progressive", "exit_pdf", "learned"];

    pub fn parse(name: &str, alpha: f64) -> Result<Self> {
        Ok(match name {
            "uniform" => LoopWeighting::Uniform,
            "progressive" if alpha.is_finite() => LoopWeighting::Progressive(alpha),
            "progressive" => bail!("progressive loop weights need a finite alpha, got {alpha}"),
            "exit_pdf" => LoopWeighting::ExitPdf,
            "learned" => LoopWeighting::Learned,
            other => bail!(
                "unknown loop weighting {other:?} (valid: final, {})",
                Self::NAMES.join(", ")
            ),
        })
    }
}

/// The weights: (T) for `uniform`, `progressive` and `learned`, (B, L, T)
/// for `exit_pdf` (its `pdf`); each sums to 1 over T.
pub fn weights(
    w: LoopWeighting,
    loops: usize,
    pdf: Option<&Tensor>,
    theta: Option<&Tensor>,
) -> Result<Tensor> {
    let t = loops as i64;
    Ok(match w {
        LoopWeighting::Uniform => {
            Tensor::f_full([t], 1.0 / t as f64, (Kind::Float, tch::Device::Cpu))?
        }
        LoopWeighting::Progressive(alpha) => {
            let raw: Vec<f32> = (1..=loops).map(|s| (s as f64).powf(alpha) as f32).collect();
            let sum: f32 = raw.iter().sum();
            Tensor::from_slice(&raw.iter().map(|x| x / sum).collect::<Vec<_>>())
        }
        LoopWeighting::ExitPdf => match pdf {
            Some(p) => p.shallow_clone(),
            None => bail!("exit_pdf loop weights need the model's exit gate (a looped model)"),
        },
        LoopWeighting::Learned => match theta {
            Some(th) if th.size() == [t] => th.f_softmax(0, Kind::Float)?,
            Some(th) => bail!(
                "learned loop weights: {} logits for {loops} loops",
                th.size()[0]
            ),
            None => bail!("learned loop weights need attach_loop_weights(m) first"),
        },
    })
}

/// sum_t w_t log P^(t): `logps` per loop (B, L); `w` from `weights`.
pub fn mix(logps: &[Tensor], w: &Tensor) -> Result<Tensor> {
    let stacked = Tensor::f_stack(logps, -1)?; // (B, L, T)
    let w = w.f_to_device(stacked.device())?;
    Ok(stacked
        .f_mul(&w)?
        .f_sum_dim_intlist([-1].as_slice(), false, Kind::Float)?)
}

/// The learned weighting's starting logits: zeros (uniform) or the log of
/// the progressive weights (alpha).
pub fn initial_logits(loops: usize, progressive: Option<f64>) -> Result<Tensor> {
    Ok(match progressive {
        None => Tensor::f_zeros([loops as i64], (Kind::Float, tch::Device::Cpu))?,
        Some(a) => weights(LoopWeighting::Progressive(a), loops, None, None)?.f_log()?,
    })
}
