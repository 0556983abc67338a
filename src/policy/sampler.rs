//! Token sampling: temperature, top-k, top-p, greedy, drawing from the
//! crate's seeded generator (`crate::rng::Rng`).
pub use crate::rng::Rng;
use anyhow::{bail, Result};
use tch::{Kind, Tensor};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// 0 means greedy (argmax).
    pub temperature: f64,
    /// 0 disables top-k.
    pub top_k: i64,
    /// 1.0 disables nucleus sampling.
    pub top_p: f64,
}

impl Sampling {
    pub fn greedy() -> Self {
        Sampling {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
        }
    }

    pub fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            bail!("temperature must be >= 0, got {}", self.temperature);
        }
        if self.top_k < 0 {
            bail!("top_k must be >= 0, got {}", self.top_k);
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            bail!("top_p must be in (0, 1], got {}", self.top_p);
        }
        Ok(())
    }
}

/// A row-wise sampling distribution after truncation (`Sampling::truncate`).
pub struct Truncated {
    /// (B, K) probabilities of the kept tokens: softmax(z / T) over the top-k
    /// (K = k) or the whole vocabulary (K = V), zeroed past the top-p nucleus
    /// (not renormalised after that cut).
    pub probs: Tensor,
    /// (B, K) the token id of each column when a cut ordered them (descending
    /// probability); None when column j is token j.
    pub ids: Option<Tensor>,
}

impl Truncated {
    /// The probabilities as (B, V) in vocabulary order.
    pub fn in_vocab_order(&self, vocab: i64) -> Result<Tensor> {
        match &self.ids {
            None => Ok(self.probs.shallow_clone()),
            Some(ids) => {
                let b = self.probs.size()[0];
                let zeros = Tensor::f_zeros([b, vocab], (Kind::Float, self.probs.device()))?;
                Ok(zeros.f_scatter(-1, ids, &self.probs)?)
            }
        }
    }
}

impl Sampling {
    /// The temperature the logits are divided by: 1 when greedy.
    pub fn scale(&self) -> f64 {
        if self.temperature == 0.0 {
            1.0
        } else {
            self.temperature
        }
    }

    /// The k of the top-k cut over a vocabulary of `v`: 0 when nothing is cut
    /// (greedy decoding, k = 0, or k >= v).
    pub fn top_k_cut(&self, v: i64) -> i64 {
        if self.temperature != 0.0 && self.top_k > 0 && self.top_k < v {
            self.top_k
        } else {
            0
        }
    }

    /// The distribution a token is drawn from, cut in transformers' order:
    /// temperature, then top-k, then top-p. Greedy decoding cuts nothing and
    /// scales by 1 (softmax(z)).
    pub fn truncate(&self, logits: &Tensor) -> Result<Truncated> {
        let scaled = logits.f_to_kind(Kind::Float)?.f_div_scalar(self.scale())?;
        // Only truncation needs the order: without it the columns stay token
        // ids (a sort of V per row was a sixth of a decode step).
        let top_k = self.top_k_cut(scaled.size()[1]);
        let (vals, ids) = if top_k > 0 {
            let (vals, idx) = scaled.f_topk(top_k, -1, true, true)?;
            (vals, Some(idx))
        } else if self.top_p() < 1.0 {
            let (vals, idx) = scaled.f_sort(-1, true)?;
            (vals, Some(idx))
        } else {
            (scaled, None)
        };
        self.cut(&vals, ids)
    }

    /// The top-p cut of candidates: `vals` (B, K) scaled logits, descending
    /// when `ids` (B, K) says which token each column is, else in vocabulary
    /// order (then there is no top-p to apply).
    pub fn cut(&self, vals: &Tensor, ids: Option<Tensor>) -> Result<Truncated> {
        let mut probs = vals.f_softmax(-1, Kind::Float)?; // descending when ordered
        if self.top_p() < 1.0 {
            // Drop a token once the mass strictly before it reaches top_p (keeps the first).
            let before = probs.f_cumsum(-1, Kind::Float)?.f_sub(&probs)?;
            probs = probs.f_mul(&before.f_lt(self.top_p)?.f_to_kind(Kind::Float)?)?;
        }
        Ok(Truncated { probs, ids })
    }

    fn top_p(&self) -> f64 {
        if self.temperature == 0.0 {
            1.0
        } else {
            self.top_p
        }
    }
}

/// Picks one token per row of `logits` (B, V); returns (B,) int64 ids.
/// Order as in transformers: temperature, then top-k, then top-p.
pub fn sample(logits: &Tensor, s: &Sampling, rng: &mut Rng) -> Result<Tensor> {
    if s.temperature == 0.0 {
        return Ok(logits.f_argmax(-1, false)?);
    }
    draw(&s.truncate(logits)?, rng)
}

/// One token per row of a cut distribution by inverse CDF, from one uniform
/// per row: (B,) int64 ids.
pub fn draw(cut: &Truncated, rng: &mut Rng) -> Result<Tensor> {
    let probs = &cut.probs;
    let b = probs.size()[0];
    // The first cumulative mass above u * total.
    let cum = probs.f_cumsum(-1, Kind::Float)?;
    let total = cum.f_narrow(1, cum.size()[1] - 1, 1)?;
    let u: Vec<f32> = (0..b).map(|_| rng.next_f32()).collect();
    let target = Tensor::from_slice(&u)
        .f_to_device(probs.device())?
        .f_view([b, 1])?
        .f_mul(&total)?;
    // Never past the last token with mass (rounding in u * total must not
    // reach a dropped token).
    let at = Tensor::f_arange(probs.size()[1], (Kind::Int64, probs.device()))?;
    let last_kept = probs
        .f_gt(0.0)?
        .f_to_kind(Kind::Int64)?
        .f_mul(&at)?
        .f_amax([-1].as_slice(), true)?;
    let j = cum
        .f_le_tensor(&target)?
        .f_sum_dim_intlist(-1, true, Kind::Int64)?
        .f_minimum(&last_kept)?;
    let j = match &cut.ids {
        Some(ids) => ids.f_gather(-1, &j, false)?,
        None => j,
    };
    Ok(j.f_squeeze_dim(-1)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_is_argmax_and_topk1_agrees() {
        let logits = Tensor::from_slice(&[0.1f32, 2.0, -1.0, 0.5, 3.0, 0.0]).view([2, 3]);
        let mut rng = Rng::new(1);
        let g =
            Vec::<i64>::try_from(sample(&logits, &Sampling::greedy(), &mut rng).unwrap()).unwrap();
        assert_eq!(g, vec![1, 1]);
        let k1 = Sampling {
            temperature: 1.0,
            top_k: 1,
            top_p: 1.0,
        };
        let t = Vec::<i64>::try_from(sample(&logits, &k1, &mut rng).unwrap()).unwrap();
        assert_eq!(t, vec![1, 1]);
    }

    #[test]
    fn frequencies_follow_probabilities_and_top_p_truncates() {
        // probs 0.5, 0.3, 0.2 (log-space logits)
        let p = [0.5f32, 0.3, 0.2];
        let logits = Tensor::from_slice(&p).log().view([1, 3]).repeat([4000, 1]);
        let mut rng = Rng::new(7);
        let s = Sampling {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
        };
        let ids = Vec::<i64>::try_from(sample(&logits, &s, &mut rng).unwrap()).unwrap();
        for (tok, want) in p.iter().enumerate() {
            let f = ids.iter().filter(|&&i| i == tok as i64).count() as f32 / 4000.0;
            assert!((f - want).abs() < 0.03, "token {tok}: {f} vs {want}");
        }
        // top_p 0.7: 0.5 then 0.3 (mass before it 0.5 < 0.7) kept, 0.2 (mass before 0.8) dropped.
        let s = Sampling {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.7,
        };
        let ids = Vec::<i64>::try_from(sample(&logits, &s, &mut rng).unwrap()).unwrap();
        assert!(!ids.contains(&2));
        let f0 = ids.iter().filter(|&&i| i == 0).count() as f32 / 4000.0;
        assert!((f0 - 0.625).abs() < 0.03, "{f0}");
    }

    #[test]
    fn rng_is_reproducible() {
        let (mut a, mut b) = (Rng::new(42), Rng::new(42));
        let xs: Vec<f64> = (0..5).map(|_| a.next_f64()).collect();
        let ys: Vec<f64> = (0..5).map(|_| b.next_f64()).collect();
        assert_eq!(xs, ys);
        assert!(xs.iter().all(|x| (0.0..1.0).contains(x)));
    }
}
