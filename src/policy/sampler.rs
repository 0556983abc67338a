//! Token sampling: temperature, top-k, top-p, greedy, with a seeded generator
//! whose whole state is one u64 (so a run can checkpoint and resume it exactly).
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

/// SplitMix64: tiny, fast, and its state is a single word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rng {
    pub state: u64,
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1) with 24 random bits (exactly representable in f32).
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 * (1.0 / (1u32 << 24) as f32)
    }

    /// Standard normal (Box-Muller).
    pub fn next_normal(&mut self) -> f64 {
        let u1 = 1.0 - self.next_f64(); // (0, 1]
        let u2 = self.next_f64();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// Picks one token per row of `logits` (B, V); returns (B,) int64 ids.
/// Order as in transformers: temperature, then top-k, then top-p.
pub fn sample(logits: &Tensor, s: &Sampling, rng: &mut Rng) -> Result<Tensor> {
    if s.temperature == 0.0 {
        return Ok(logits.f_argmax(-1, false)?);
    }
    let (b, v) = (logits.size()[0], logits.size()[1]);
    let scaled = logits.f_to_kind(Kind::Float)?.f_div_scalar(s.temperature)?;
    // Only truncation needs the order: plain sampling inverts the CDF over the
    // vocabulary as it is (a sort of V per row was a sixth of a decode step),
    // so its positions are the token ids themselves (no index to map through).
    let (vals, idx) = if s.top_k > 0 && s.top_k < v {
        let (vals, idx) = scaled.f_topk(s.top_k, -1, true, true)?;
        (vals, Some(idx))
    } else if s.top_p < 1.0 {
        let (vals, idx) = scaled.f_sort(-1, true)?;
        (vals, Some(idx))
    } else {
        (scaled, None)
    };
    let mut probs = vals.f_softmax(-1, Kind::Float)?; // descending when ordered
    if s.top_p < 1.0 {
        // Drop a token once the mass strictly before it reaches top_p (keeps the first).
        let before = probs.f_cumsum(-1, Kind::Float)?.f_sub(&probs)?;
        probs = probs.f_mul(&before.f_lt(s.top_p)?.f_to_kind(Kind::Float)?)?;
    }
    let cum = probs.f_cumsum(-1, Kind::Float)?;
    let total = cum.f_narrow(1, cum.size()[1] - 1, 1)?;
    let u: Vec<f32> = (0..b).map(|_| rng.next_f32()).collect();
    let target = Tensor::from_slice(&u)
        .f_to_device(logits.device())?
        .f_view([b, 1])?
        .f_mul(&total)?;
    // Index of the first cumulative mass above the target, never past the last
    // token with mass (rounding in u * total must not reach a dropped token).
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
    let j = match idx {
        Some(idx) => idx.f_gather(-1, &j, false)?,
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
