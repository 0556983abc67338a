//! Batches of sequences of different lengths for the decoder: left padding
//! (real tokens end at the same column, as transformers' `generate` pads).
use anyhow::{bail, Result};
use tch::{Device, Tensor};

/// Left-pads `seqs` into (B, L) ids and a (B, L) validity mask (pad id 0).
pub fn left_pad(seqs: &[Vec<i64>], device: Device) -> Result<(Tensor, Tensor)> {
    if seqs.is_empty() {
        bail!("no prompts given");
    }
    if let Some(i) = seqs.iter().position(|p| p.is_empty()) {
        bail!("prompt {i} is empty");
    }
    let l = seqs.iter().map(Vec::len).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(seqs.len() * l);
    let mut valid = Vec::with_capacity(seqs.len() * l);
    for p in seqs {
        let pad = l - p.len();
        ids.extend(std::iter::repeat_n(0i64, pad).chain(p.iter().copied()));
        valid.extend(std::iter::repeat_n(false, pad).chain(std::iter::repeat_n(true, p.len())));
    }
    let shape = [seqs.len() as i64, l as i64];
    Ok((
        Tensor::from_slice(&ids)
            .f_view(shape)?
            .f_to_device(device)?,
        Tensor::from_slice(&valid)
            .f_view(shape)?
            .f_to_device(device)?,
    ))
}
