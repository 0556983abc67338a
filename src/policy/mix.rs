//! Soft input embeddings: mixtures of token embeddings.
use anyhow::Result;
use tch::{Kind, Tensor};

/// The renormalised top-k of `probs` (.., V): ids (.., k) and weights (.., k)
/// summing to 1 (the reference code mixed raw top-k probabilities at rollout
/// and renormalised ones in training: one rule for both here).
pub fn top_k(probs: &Tensor, k: i64) -> Result<(Tensor, Tensor)> {
    let (vals, ids) = probs.f_topk(k, -1, true, true)?;
    let w = vals.f_div(&vals.f_sum_dim_intlist(-1, true, Kind::Float)?)?;
    Ok((ids, w))
}

/// sum_j w_j E[ids_j] for ids, w (.., k) and E (V, H): (.., H) in E's dtype.
/// Rollout and replay both build soft inputs here, so they agree exactly.
pub fn embed(e: &Tensor, ids: &Tensor, w: &Tensor) -> Result<Tensor> {
    let rows = Tensor::f_embedding(e, ids, -1, false, false)?; // (.., k, H)
    let w = w.f_to_kind(e.kind())?.f_unsqueeze(-1)?;
    Ok(rows.f_mul(&w)?.f_sum_dim_intlist(-2, false, e.kind())?)
}

/// Entropy of each row of weights (.., k) that sum to 1.
pub fn entropy(w: &Tensor) -> Result<Tensor> {
    let logw = w.f_clamp_min(1e-30)?.f_log()?;
    Ok(w.f_mul(&logw)?
        .f_sum_dim_intlist(-1, false, Kind::Float)?
        .f_neg()?)
}
