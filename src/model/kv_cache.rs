//! Key/value cache for batched decoding of ragged sequences.
//!
//! Every row shares the same slot index (the cache is written one column per
//! decode step), but each sequence has its own length: padding slots are marked
//! invalid and never attended to, and positions count only real tokens. So a
//! left-padded prompt gives exactly the logits of the same prompt alone.
use anyhow::{bail, Result};
use tch::{Device, Kind, Tensor};

/// The attention context of one forward call: positions of the new tokens and
/// which keys each of them may see.
pub struct Step {
    /// (B, T) rotary positions of the new tokens.
    pub positions: Tensor,
    /// (B, 1, T, S) true where query t may attend key slot s.
    pub mask: Tensor,
    /// Cache column the new keys are written at (None without a cache).
    pub write_at: Option<i64>,
}

impl Step {
    /// Whole sequences at once without a cache; `valid` (B, T) marks real tokens.
    pub fn full(valid: &Tensor) -> Result<Step> {
        let positions = valid
            .f_cumsum(1, Kind::Int64)?
            .f_sub_scalar(1)?
            .f_clamp_min(0)?;
        let mask = attention_mask(valid, 0)?;
        Ok(Step {
            positions,
            mask,
            write_at: None,
        })
    }
}

/// (B, 1, T, S) mask for T new queries at slot `offset` over S = offset + T keys,
/// `keys_valid` (B, S): causal, only valid keys, and always the query's own slot
/// (a padding query would otherwise see nothing and produce NaN).
fn attention_mask(keys_valid: &Tensor, offset: i64) -> Result<Tensor> {
    let s = keys_valid.size()[1];
    let dev = keys_valid.device();
    let q_slot = Tensor::f_arange_start(offset, s, (Kind::Int64, dev))?.f_unsqueeze(1)?; // (T, 1)
    let k_slot = Tensor::f_arange(s, (Kind::Int64, dev))?.f_unsqueeze(0)?; // (1, S)
    let causal = k_slot.f_le_tensor(&q_slot)?; // (T, S)
    let own = k_slot.f_eq_tensor(&q_slot)?;
    let valid = keys_valid.f_to_kind(Kind::Bool)?.f_view([-1, 1, 1, s])?;
    Ok(valid.f_logical_and(&causal)?.f_logical_or(&own)?)
}

pub struct KvCache {
    /// Per layer (B, kv_heads, capacity, head_dim).
    pub(crate) k: Vec<Tensor>,
    pub(crate) v: Vec<Tensor>,
    /// (B, capacity) which slots hold real tokens.
    valid: Tensor,
    /// (B,) real tokens seen per sequence (the next position).
    lens: Tensor,
    used: i64,
    capacity: i64,
}

impl KvCache {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        layers: i64,
        batch: i64,
        kv_heads: i64,
        head_dim: i64,
        capacity: i64,
        dtype: Kind,
        device: Device,
    ) -> Result<Self> {
        let shape = [batch, kv_heads, capacity, head_dim];
        let mut k = Vec::new();
        let mut v = Vec::new();
        for _ in 0..layers {
            k.push(Tensor::f_zeros(shape, (dtype, device))?);
            v.push(Tensor::f_zeros(shape, (dtype, device))?);
        }
        Ok(KvCache {
            k,
            v,
            valid: Tensor::f_zeros([batch, capacity], (Kind::Bool, device))?,
            lens: Tensor::f_zeros([batch], (Kind::Int64, device))?,
            used: 0,
            capacity,
        })
    }

    /// A cache whose row i is this cache's row `rows[i]` (rows may repeat):
    /// a prompt prefilled once serves every member of its group.
    pub fn select_rows(&self, rows: &Tensor) -> Result<KvCache> {
        let pick = |ts: &[Tensor]| -> Result<Vec<Tensor>> {
            ts.iter().map(|t| Ok(t.f_index_select(0, rows)?)).collect()
        };
        Ok(KvCache {
            k: pick(&self.k)?,
            v: pick(&self.v)?,
            valid: self.valid.f_index_select(0, rows)?,
            lens: self.lens.f_index_select(0, rows)?,
            used: self.used,
            capacity: self.capacity,
        })
    }

    /// Slots written so far (the same for every row).
    pub fn used(&self) -> i64 {
        self.used
    }

    /// Real tokens per sequence.
    pub fn lengths(&self) -> Result<Vec<i64>> {
        Ok(Vec::<i64>::try_from(&self.lens)?)
    }

    /// Reserves T slots for new tokens; `valid` (B, T) marks which are real.
    pub fn step(&mut self, valid: &Tensor) -> Result<Step> {
        let t = valid.size()[1];
        if self.used + t > self.capacity {
            bail!(
                "KV cache full: {} + {t} slots exceed capacity {}",
                self.used,
                self.capacity
            );
        }
        let valid_i = valid.f_to_kind(Kind::Int64)?;
        let positions = valid_i
            .f_cumsum(1, Kind::Int64)?
            .f_add(&self.lens.f_unsqueeze(1)?)?
            .f_sub_scalar(1)?
            .f_clamp_min(0)?;
        self.valid
            .f_narrow(1, self.used, t)?
            .f_copy_(&valid.f_to_kind(Kind::Bool)?)?;
        let keys = self.valid.f_narrow(1, 0, self.used + t)?;
        let mask = attention_mask(&keys, self.used)?;
        self.lens = self
            .lens
            .f_add(&valid_i.f_sum_dim_intlist(1, false, Kind::Int64)?)?;
        let write_at = Some(self.used);
        self.used += t;
        Ok(Step {
            positions,
            mask,
            write_at,
        })
    }

    /// Writes layer `layer`'s new keys/values (B, kv_heads, T, D) at `at` and
    /// returns all keys/values so far.
    pub(crate) fn append(
        &self,
        layer: usize,
        at: i64,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let t = k.size()[2];
        self.k[layer].f_narrow(2, at, t)?.f_copy_(k)?;
        self.v[layer].f_narrow(2, at, t)?.f_copy_(v)?;
        Ok((
            self.k[layer].f_narrow(2, 0, at + t)?,
            self.v[layer].f_narrow(2, 0, at + t)?,
        ))
    }
}
