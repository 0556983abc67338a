//! A linear layer y = x W^T + b with its optional LoRA update, and the
//! products that decode steps send to the streaming kernel (`small_matmul`).
use super::lora::{LoraAdapter, LoraUse};
use super::small_matmul;
use super::weights::Weights;
use anyhow::Result;
use tch::Tensor;

pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    /// Trainable low-rank update, when attached (see `lora`).
    pub lora: Option<LoraAdapter>,
}

impl Linear {
    pub(crate) fn load(w: &Weights, prefix: &str, inp: i64, out: i64, bias: bool) -> Result<Self> {
        let weight = w.get(&format!("{prefix}.weight"), &[out, inp])?;
        let bias = if bias {
            Some(w.get(&format!("{prefix}.bias"), &[out])?)
        } else {
            None
        };
        Ok(Linear {
            weight,
            bias,
            lora: None,
        })
    }

    /// A copy of the base weights outside autograd (no adapter).
    pub(crate) fn frozen(&self) -> Result<Self> {
        Ok(Linear {
            weight: self.weight.f_detach_copy()?,
            bias: self.bias.as_ref().map(|b| b.f_detach_copy()).transpose()?,
            lora: None,
        })
    }

    /// x W^T + b, plus the LoRA update if an adapter is attached.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with(x, LoraUse::Trained)
    }

    /// Like `forward`, with the adapter `lora` says. The base product keeps
    /// `linear`'s fast path; the update is plain libtorch (autograd).
    pub fn forward_with(&self, x: &Tensor, lora: LoraUse) -> Result<Tensor> {
        self.add_lora(x, linear(x, &self.weight, self.bias.as_ref())?, lora)
    }

    /// y (this layer's base product of x) plus the update `lora` says.
    fn add_lora(&self, x: &Tensor, y: Tensor, lora: LoraUse) -> Result<Tensor> {
        match self
            .lora
            .as_ref()
            .map(|ad| ad.delta(x, lora))
            .transpose()?
            .flatten()
        {
            Some(d) => Ok(y.f_add(&d)?),
            None => Ok(y),
        }
    }
}

/// x W^T + b for x (.., in) and W (out, in); few-row CPU products (decoding)
/// go to the streaming kernel in `small_matmul`.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    Ok(linears(x, &[(w, b)])?.remove(0))
}

/// `linear` for each (W, b) of `ws`, which share x: the few-row CPU products
/// take one pass of the streaming kernel together.
fn linears(x: &Tensor, ws: &[(&Tensor, Option<&Tensor>)]) -> Result<Vec<Tensor>> {
    let inp = ws[0].0.size()[1];
    let rows = if inp == 0 { 0 } else { x.numel() as i64 / inp };
    if !ws.iter().all(|(w, _)| small_matmul::applies(x, w, rows)) {
        return ws.iter().map(|(w, b)| Ok(x.f_linear(w, *b)?)).collect();
    }
    let mut shape = x.size();
    small_matmul::matmul_many(x, ws)?
        .into_iter()
        .zip(ws)
        .map(|(y, (w, _))| {
            if let Some(last) = shape.last_mut() {
                *last = w.size()[0];
            }
            Ok(y.f_reshape(shape.as_slice())?)
        })
        .collect()
}

/// `l.forward_with(x, lora)` for each of `ls`, which share x (see `linears`).
pub(super) fn linear_many(x: &Tensor, ls: &[&Linear], lora: LoraUse) -> Result<Vec<Tensor>> {
    let ws: Vec<_> = ls.iter().map(|l| (&l.weight, l.bias.as_ref())).collect();
    linears(x, &ws)?
        .into_iter()
        .zip(ls)
        .map(|(y, l)| l.add_lora(x, y, lora))
        .collect()
}
