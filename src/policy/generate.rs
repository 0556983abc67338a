//! Batched, KV-cached generation for a group of prompts of different lengths.
//!
//! Prompts are left-padded into one batch; the cache keeps a length per
//! sequence, so each row decodes exactly as it would alone.
use super::sampler::{sample, Rng, Sampling};
use crate::model::Llama;
use anyhow::{bail, Result};
use tch::{Kind, Tensor};

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_new: usize,
    pub sampling: Sampling,
    pub seed: u64,
    /// Generation stops for a sequence after one of these tokens.
    pub eos: Vec<i64>,
}

/// Sets libtorch's intra-op thread count until dropped.
pub struct IntraOpThreads(i32);

impl IntraOpThreads {
    pub fn set(n: i32) -> Self {
        let old = tch::get_num_threads();
        tch::set_num_threads(n);
        IntraOpThreads(old)
    }
}

impl Drop for IntraOpThreads {
    fn drop(&mut self) {
        tch::set_num_threads(self.0);
    }
}

/// Left-pads `prompts` into (B, L) ids and a (B, L) validity mask.
pub fn left_pad(prompts: &[Vec<i64>], device: tch::Device) -> Result<(Tensor, Tensor)> {
    if prompts.is_empty() {
        bail!("no prompts given");
    }
    if let Some(i) = prompts.iter().position(|p| p.is_empty()) {
        bail!("prompt {i} is empty");
    }
    let l = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(prompts.len() * l);
    let mut valid = Vec::with_capacity(prompts.len() * l);
    for p in prompts {
        let pad = l - p.len();
        ids.extend(std::iter::repeat_n(0i64, pad).chain(p.iter().copied()));
        valid.extend(std::iter::repeat_n(false, pad).chain(std::iter::repeat_n(true, p.len())));
    }
    let shape = [prompts.len() as i64, l as i64];
    Ok((
        Tensor::from_slice(&ids)
            .f_view(shape)?
            .f_to_device(device)?,
        Tensor::from_slice(&valid)
            .f_view(shape)?
            .f_to_device(device)?,
    ))
}

/// Generates up to `max_new` tokens per prompt. Returns each sequence's new
/// tokens, ending with the stop token when one was produced.
pub fn generate(
    net: &Llama,
    prompts: &[Vec<i64>],
    opts: &GenerateOptions,
) -> Result<Vec<Vec<i64>>> {
    opts.sampling.validate()?;
    let _no_grad = tch::no_grad_guard();
    let vocab = net.cfg.vocab_size;
    for (i, p) in prompts.iter().enumerate() {
        if let Some(t) = p.iter().find(|&&t| t < 0 || t >= vocab) {
            bail!("prompt {i}: token id {t} is outside the vocabulary (0..{vocab})");
        }
    }
    let device = net.embed_tokens.device();
    let (ids, valid) = left_pad(prompts, device)?;
    let (b, l) = (ids.size()[0], ids.size()[1]);
    let mut cache = net.new_cache(b, l + opts.max_new as i64)?;
    let mut rng = Rng::new(opts.seed);

    let step = cache.step(&valid)?;
    let h = net.forward(&net.embed(&ids)?, &step, Some(&cache))?;
    let mut logits = net.logits(&h.f_narrow(1, l - 1, 1)?.f_squeeze_dim(1)?)?;

    // Decode steps are small: their matmuls run on our own threads
    // (model::small_matmul), and libtorch's OpenMP workers, left spinning
    // between ops, would only compete with them for the cores.
    let _threads = (device == tch::Device::Cpu).then(|| IntraOpThreads::set(1));
    let mut out: Vec<Vec<i64>> = vec![Vec::new(); b as usize];
    let mut done = vec![false; b as usize];
    let one_new = Tensor::f_ones([b, 1], (Kind::Bool, device))?;
    for t in 0..opts.max_new {
        let next = sample(&logits, &opts.sampling, &mut rng)?;
        let next_ids = Vec::<i64>::try_from(&next)?;
        for (i, &tok) in next_ids.iter().enumerate() {
            if !done[i] {
                out[i].push(tok);
                done[i] = opts.eos.contains(&tok);
            }
        }
        if t + 1 == opts.max_new || done.iter().all(|&d| d) {
            break;
        }
        // Finished rows keep decoding (the batch shape stays fixed) but are ignored.
        let step = cache.step(&one_new)?;
        let x = net.embed(&next.f_view([b, 1])?)?;
        let h = net.forward(&x, &step, Some(&cache))?;
        logits = net.logits(&h.f_squeeze_dim(1)?)?;
    }
    Ok(out)
}
