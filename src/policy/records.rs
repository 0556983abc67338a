//! What a rollout leaves behind: one record per generated step, enough to
//! replay it exactly, score it and analyse it.
use anyhow::{bail, Result};
use tch::Tensor;

/// How a step's output is fed back as the next input. HARD and SOFT are also
/// the router's two actions, in this order (ALGORITHMS.md section 2).
pub const HARD: i64 = 0;
pub const SOFT: i64 = 1;
/// A Coconut continuous thought: no token was sampled at this step (it is not
/// in the text, the reward or the token loss); the next input is the hidden
/// state itself.
pub const LATENT: i64 = 2;

/// The vector a latent step recorded (H floats), so replay rebuilds its input.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum LatentRecord {
    /// Not a latent step (hard, or a router mixture rebuilt from `mix_ids`).
    #[default]
    None,
    /// The next input itself (Soft Thinking's p_t^T E, Coconut's h_t), in the
    /// model dtype's values. Replay feeds it back as a constant: no gradient
    /// flows through it into earlier positions (as in the GRPO-style training
    /// of these methods, where the rollout's latent inputs are data).
    Input(Vec<f32>),
    /// HRPO's h_hat (fp32, a constant); replay recomputes the input
    /// gate(E[y_t], h_hat) with autograd, so the gate trains.
    Hrpo(Vec<f32>),
}

/// What happened at one generated step.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenRecord {
    /// The sampled token; -1 at a LATENT step (none was sampled).
    pub token: i64,
    /// HARD, SOFT or LATENT: how this step is fed back as the next input.
    pub mode: i64,
    /// Not a router decision (after the answer marker, the last token, or a
    /// mode chosen by another method's rule).
    pub forced: bool,
    /// log p_t(y_t) under softmax(z_t / T) (before top-k/top-p truncation); 0
    /// at a LATENT step.
    pub logp: f32,
    /// log pi_r(m_t | h_t); 0 without a router.
    pub router_logp: f32,
    pub p_soft: f32,
    /// Entropy of p_t.
    pub entropy: f32,
    /// Entropy of the top-k mixture weights.
    pub topk_entropy: f32,
    /// The router mixture (ids and renormalised weights); empty for hard
    /// tokens and for the latent steps of the other methods.
    pub mix_ids: Vec<i64>,
    pub mix_weights: Vec<f32>,
    /// A latent step's vector (Soft Thinking, Coconut, HRPO); None otherwise.
    pub latent: LatentRecord,
}

impl TokenRecord {
    /// Whether a token was sampled at this step (every mode but LATENT).
    pub fn has_token(&self) -> bool {
        self.mode != LATENT
    }
}

pub struct Rollout {
    /// The prompts as the model read them (after left-truncation).
    pub prompts: Vec<Vec<i64>>,
    /// Per sequence, one record per generated step.
    pub records: Vec<Vec<TokenRecord>>,
    /// With `keep_inputs`: per step, the (B, H) next-input embeddings.
    pub inputs: Vec<Tensor>,
    pub temperature: f64,
    pub mix_k: i64,
}

impl Rollout {
    /// The given rows, in that order (kept inputs are dropped).
    pub fn select(&self, rows: &[usize]) -> Rollout {
        Rollout {
            prompts: rows.iter().map(|&i| self.prompts[i].clone()).collect(),
            records: rows.iter().map(|&i| self.records[i].clone()).collect(),
            inputs: Vec::new(),
            temperature: self.temperature,
            mix_k: self.mix_k,
        }
    }

    /// This rollout followed by `other` (same temperature and mixture size).
    pub fn concat(mut self, other: Rollout) -> Result<Rollout> {
        if self.mix_k != other.mix_k || self.temperature != other.temperature {
            bail!("cannot join rollouts made with different settings");
        }
        self.prompts.extend(other.prompts);
        self.records.extend(other.records);
        self.inputs.clear();
        Ok(self)
    }

    /// Fraction of generated steps whose next input was not a token
    /// embedding (SOFT or LATENT); 0 with no steps.
    pub fn soft_ratio(&self) -> f64 {
        let recs = || self.records.iter().flatten();
        let soft = recs().filter(|r| r.mode != HARD).count() as f64;
        soft / recs().count().max(1) as f64
    }

    /// Each completion's sampled tokens (its text), LATENT steps left out.
    pub fn tokens(&self) -> Vec<Vec<i64>> {
        self.records
            .iter()
            .map(|r| {
                r.iter()
                    .filter(|t| t.has_token())
                    .map(|t| t.token)
                    .collect()
            })
            .collect()
    }

    /// Each completion's number of sampled tokens.
    pub fn lengths(&self) -> Vec<usize> {
        self.records
            .iter()
            .map(|r| r.iter().filter(|t| t.has_token()).count())
            .collect()
    }
}
