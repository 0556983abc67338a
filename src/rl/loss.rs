//! The policy-gradient loss of TARPO and of its token-only baselines (GRPO,
//! Dr. GRPO, DAPO), per ALGORITHMS.md section 2:
//!
//!   L_i = -(1/|y_i|) sum_t [ obj(log p(y_t)) + lambda * m_t * obj(log pi_r(m_t)) ] * A_i
//!         + beta * (1/|y_i|) sum_t [ KL_token,t + m_t * KL_router,t ]
//!
//! with m_t = 1 where the mode was a router decision (forced steps after the
//! answer marker are masked: the reference code left them in), obj the plain
//! log-prob (REINFORCE, one update per rollout) or the PPO clipped ratio, and
//! the 1/|y_i| and the mean over i given by the normalisation mode.
//! lambda = 0 and no router gives GRPO; `token-mean` + clip 0.2/0.28 gives DAPO.
use super::kl;
use super::loss_agg::{aggregate, ppo_clip_objective, ppo_clipped, Norm};
use anyhow::{bail, Result};
use tch::{Kind, Tensor};

#[derive(Debug, Clone)]
pub struct LossConfig {
    /// Weight of the router's policy-gradient term (TARPO 0.1).
    pub lambda: f64,
    /// Weight of the KL penalties (TARPO 0.005).
    pub beta: f64,
    /// KL estimator name: k1, k2 or k3.
    pub kl: String,
    pub norm: Norm,
    /// Dr. GRPO's constant normaliser (the generation cap).
    pub max_len: i64,
    /// PPO clip range (eps_low, eps_high); None is plain REINFORCE.
    pub clip: Option<(f64, f64)>,
}

impl Default for LossConfig {
    fn default() -> Self {
        LossConfig {
            lambda: 0.1,
            beta: 0.005,
            kl: "k3".into(),
            norm: Norm::SeqMeanTokenMean,
            max_len: 1024,
            clip: None,
        }
    }
}

/// Everything (B, T) unless noted; `adv` is (B,).
pub struct LossInputs<'a> {
    /// The log-probs the policy gradient reads (RLTT: the loop mixture).
    pub logp: &'a Tensor,
    /// The log-probs the KL reads when not `logp` (RLTT: the final loop's).
    pub logp_kl: Option<&'a Tensor>,
    pub logp_ref: Option<&'a Tensor>,
    /// The rollout's log-probs, for the PPO ratio.
    pub logp_old: Option<&'a Tensor>,
    pub router_logp: Option<&'a Tensor>,
    pub router_logp_ref: Option<&'a Tensor>,
    pub router_logp_old: Option<&'a Tensor>,
    pub adv: &'a Tensor,
    pub mask: &'a Tensor,
    pub router_mask: &'a Tensor,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct LossMetrics {
    pub loss: f64,
    /// Mean KL per generated token, and per router decision.
    pub kl_token: f64,
    pub kl_router: f64,
    /// ||dL/dh||, h the final-normed hidden states the heads read (filled by
    /// `update::backward`; 0 from `policy_loss` alone).
    pub grad_hidden_norm: f64,
    /// Fraction of tokens whose PPO ratio was clipped (0 without the clip).
    pub clip_frac: f64,
}

/// The loss before its reduction, every tensor (B, T).
pub struct TokenTerms {
    /// The per-token loss: policy-gradient terms and beta-weighted KL.
    pub loss: Tensor,
    /// KL per token (0 without beta), and per router decision (masked).
    pub kl_token: Tensor,
    pub kl_router: Tensor,
    /// 1 where the PPO clip was active on the token term, else 0.
    pub clipped: Tensor,
}

/// The per-token terms of the loss in the module docs; `aggregate` with the
/// normalisation mode reduces `loss` to L.
pub fn token_terms(x: &LossInputs, cfg: &LossConfig) -> Result<TokenTerms> {
    let adv = x.adv.f_to_kind(Kind::Float)?.f_unsqueeze(1)?; // (B, 1)
    let objective = |lp: &Tensor, old: Option<&Tensor>| -> Result<Tensor> {
        match (cfg.clip, old) {
            (Some((lo, hi)), Some(old)) => ppo_clip_objective(lp, old, &adv, lo, hi),
            (Some(_), None) => bail!("PPO clip needs the rollout's log-probs"),
            (None, _) => Ok(lp.f_mul(&adv)?),
        }
    };
    let rmask = x.router_mask.f_to_kind(Kind::Float)?;
    let mut loss = objective(x.logp, x.logp_old)?.f_neg()?;
    let clipped = match (cfg.clip, x.logp_old) {
        (Some((lo, hi)), Some(old)) => {
            ppo_clipped(x.logp, old, &adv, lo, hi)?.f_to_kind(Kind::Float)?
        }
        _ => Tensor::f_zeros_like(x.logp)?,
    };
    let (mut kl_token, mut kl_router) =
        (Tensor::f_zeros_like(x.logp)?, Tensor::f_zeros_like(x.logp)?);
    if let Some(rlp) = x.router_logp.filter(|_| cfg.lambda != 0.0) {
        let router_obj = objective(rlp, x.router_logp_old)?.f_mul(&rmask)?;
        loss = loss.f_sub(&router_obj.f_mul_scalar(cfg.lambda)?)?;
    }
    if cfg.beta != 0.0 {
        let Some(lref) = x.logp_ref else {
            bail!("beta > 0 needs reference log-probs")
        };
        kl_token = kl::compute(&cfg.kl, x.logp_kl.unwrap_or(x.logp), lref)?;
        if let (Some(rlp), Some(rref)) = (x.router_logp, x.router_logp_ref) {
            kl_router = kl::compute(&cfg.kl, rlp, rref)?.f_mul(&rmask)?;
        }
        loss = loss.f_add(&kl_token.f_add(&kl_router)?.f_mul_scalar(cfg.beta)?)?;
    }
    Ok(TokenTerms {
        loss,
        kl_token,
        kl_router,
        clipped,
    })
}

/// Sum of `v` over `mask` (detached), and the number of entries there.
pub fn masked_sum(v: &Tensor, mask: &Tensor) -> Result<(f64, f64)> {
    let m = mask.f_to_kind(Kind::Float)?;
    let n = m.f_sum(Kind::Float)?.double_value(&[]);
    let s = v
        .f_detach()?
        .f_mul(&m)?
        .f_sum(Kind::Float)?
        .double_value(&[]);
    Ok((s, n))
}

/// The loss L of the module docs on one batch, and its metrics.
pub fn policy_loss(x: &LossInputs, cfg: &LossConfig) -> Result<(Tensor, LossMetrics)> {
    let terms = token_terms(x, cfg)?;
    let loss = aggregate(&terms.loss, x.mask, cfg.norm, cfg.max_len)?;
    let mean_over = |v: &Tensor, m: &Tensor| -> Result<f64> {
        let (s, n) = masked_sum(v, m)?;
        Ok(if n > 0.0 { s / n } else { 0.0 })
    };
    let metrics = LossMetrics {
        loss: loss.f_detach()?.double_value(&[]),
        kl_token: mean_over(&terms.kl_token, x.mask)?,
        kl_router: mean_over(&terms.kl_router, x.router_mask)?,
        grad_hidden_norm: 0.0,
        clip_frac: mean_over(&terms.clipped, x.mask)?,
    };
    Ok((loss, metrics))
}
