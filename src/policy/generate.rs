//! Plain batched generation: the rollout engine without a router.
use super::rollout::{rollout, RolloutOptions};
use super::sampler::Sampling;
use crate::model::Llama;
use anyhow::Result;

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_new: usize,
    pub sampling: Sampling,
    pub seed: u64,
    /// Generation stops for a sequence after one of these tokens.
    pub eos: Vec<i64>,
}

/// Generates up to `max_new` tokens per prompt (prompts of any lengths, decoded
/// together). Returns each sequence's new tokens, ending with the stop token
/// when one was produced.
pub fn generate(
    net: &Llama,
    prompts: &[Vec<i64>],
    opts: &GenerateOptions,
) -> Result<Vec<Vec<i64>>> {
    let ro = RolloutOptions::new(opts.max_new, opts.sampling, opts.seed, opts.eos.clone());
    Ok(rollout(net, None, None, prompts, &ro)?.tokens())
}
