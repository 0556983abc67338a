//! The decoder stack for one decode step on the CPU, over plain f32 rows.
//!
//! A decode step pushes ~8 rows through every layer; as libtorch ops that
//! is ~50 small calls per layer (norms, reshapes, RoPE, cache writes,
//! residual adds), about a quarter of the step spent in dispatch while the
//! second core waits. Here each layer is: RMSNorm, q/k/v (`small_matmul`),
//! RoPE, the cache write, attention (`decode_attention`), o + residual,
//! RMSNorm, gate/up, silu(gate) * up, down + residual, in place on one
//! (B, H) buffer. The maths is the layer's (`Layer::forward`): same
//! products, f32 throughout. Taken for f32 Llama/Qwen2 stacks (no loops,
//! no sandwich norms) with no LoRA adapter in use, outside autograd.
use super::{Angles, KvCache, Llama, LoraUse, RmsNorm, Step};
use crate::model::{decode_attention, small_matmul, vec_exp};
use anyhow::{ensure, Result};
use std::cell::Cell;
use std::sync::OnceLock;
use tch::{Device, Kind, Tensor};

thread_local! {
    static ENABLED: Cell<bool> = const { Cell::new(true) };
    static STEPS: Cell<u64> = const { Cell::new(0) };
}

/// Decode steps this thread ran through the fused path.
pub fn steps() -> u64 {
    STEPS.get()
}

/// Turns the fused path off (or back on) for this thread, to compare it
/// with the libtorch layers (tests, benchmarks); the rollout's CPU scan of
/// the logits (`policy::step_stats`) follows the same switch. Off everywhere with
/// TARPO_FUSED_DECODE=0.
pub fn set_enabled(on: bool) {
    ENABLED.set(on);
}

pub fn enabled() -> bool {
    static ENV_OFF: OnceLock<bool> = OnceLock::new();
    ENABLED.get()
        && !*ENV_OFF.get_or_init(|| std::env::var("TARPO_FUSED_DECODE").is_ok_and(|v| v == "0"))
}

/// Whether `forward` can run this step.
pub(super) fn applies(
    net: &Llama,
    x: &Tensor,
    step: &Step,
    cache: Option<&KvCache>,
    lora: LoraUse,
) -> bool {
    let Some(cache) = cache else { return false };
    let xs = x.size();
    let rows = xs[0];
    let plain = net.cfg.loops == 1 && net.layers.iter().all(|l| l.sandwich.is_none());
    let no_lora = net.lora_cfg.is_none() || lora == LoraUse::Off;
    let f32_cache = cache
        .k
        .iter()
        .chain(&cache.v)
        .all(|t| t.kind() == Kind::Float && t.is_contiguous());
    enabled()
        && plain
        && no_lora
        && f32_cache
        && step.write_at.is_some()
        && xs.len() == 3
        && xs[1] == 1
        && x.kind() == Kind::Float
        && x.device() == Device::Cpu
        && small_matmul::has_avx512()
        && net.layers.iter().all(|l| {
            [
                &l.attn.q,
                &l.attn.k,
                &l.attn.v,
                &l.attn.o,
                &l.mlp.gate,
                &l.mlp.up,
                &l.mlp.down,
            ]
            .iter()
            .all(|lin| small_matmul::applies(x, &lin.weight, rows))
        })
}

/// Scratch rows of one step, reused by every layer.
struct Rows {
    xn: Aligned,
    q: Aligned,
    k: Aligned,
    v: Aligned,
    att: Aligned,
    out: Aligned,
    gate: Aligned,
    up: Aligned,
}

/// `n` zeroed f32 starting on a 64-byte line: the matmul kernel reads the
/// rows of x 16 floats at a time, and a load across two lines costs two.
struct Aligned {
    buf: Vec<f32>,
    at: usize,
    n: usize,
}

impl Aligned {
    fn new(n: usize) -> Aligned {
        let buf = vec![0f32; n + 16];
        let at = (buf.as_ptr() as usize).next_multiple_of(64) - buf.as_ptr() as usize;
        Aligned { buf, at: at / 4, n }
    }
}

impl std::ops::Deref for Aligned {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.buf[self.at..self.at + self.n]
    }
}

impl std::ops::DerefMut for Aligned {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.buf[self.at..self.at + self.n]
    }
}

/// The stack on input embeddings `x` (B, 1, H): the hidden states (B, 1, H)
/// before the final norm, the new keys and values written into `cache`.
pub(super) fn forward(
    net: &Llama,
    x: &Tensor,
    rot: &Angles,
    step: &Step,
    cache: &KvCache,
) -> Result<Tensor> {
    let _g = tch::no_grad_guard();
    STEPS.set(STEPS.get() + 1);
    let c = &net.cfg;
    let (b, hid) = (x.size()[0] as usize, c.hidden_size as usize);
    let (nh, ng, d) = (
        c.num_attention_heads as usize,
        c.num_key_value_heads as usize,
        c.head_dim as usize,
    );
    let inter = c.intermediate_size as usize;
    let at = step.write_at.unwrap_or(0) as usize;
    let s = at + 1;
    let mut h = Vec::<f32>::try_from(x.f_reshape([-1])?)?;
    let mask = Vec::<bool>::try_from(step.mask.f_to_kind(Kind::Bool)?.f_reshape([-1])?)?;
    ensure!(
        mask.len() == b * s,
        "decode step: mask of {} for {b} rows and {s} keys",
        mask.len()
    );
    let (cos, sin) = rot.parts();
    let cos = Vec::<f32>::try_from(cos.f_to_kind(Kind::Float)?.f_reshape([-1])?)?;
    let sin = Vec::<f32>::try_from(sin.f_to_kind(Kind::Float)?.f_reshape([-1])?)?;
    ensure!(
        cos.len() == b * d && sin.len() == b * d,
        "decode step: rotary angles"
    );
    let mut r = Rows {
        xn: Aligned::new(b * hid),
        q: Aligned::new(b * nh * d),
        k: Aligned::new(b * ng * d),
        v: Aligned::new(b * ng * d),
        att: Aligned::new(b * nh * d),
        out: Aligned::new(b * hid),
        gate: Aligned::new(b * inter),
        up: Aligned::new(b * inter),
    };
    let scale = (d as f64).powf(-0.5);
    for (i, layer) in net.layers.iter().enumerate() {
        let (a, m) = (&layer.attn, &layer.mlp);
        rms_norm(&h, &layer.input_norm, hid, &mut r.xn)?;
        let qkv = [
            (&a.q.weight, a.q.bias.as_ref()),
            (&a.k.weight, a.k.bias.as_ref()),
            (&a.v.weight, a.v.bias.as_ref()),
        ];
        small_matmul::matmul_into(&r.xn, b, &qkv, &mut [&mut r.q, &mut r.k, &mut r.v])?;
        rope(&mut r.q, nh, d, &cos, &sin);
        rope(&mut r.k, ng, d, &cos, &sin);
        write_cache(&cache.k[i], &r.k, ng, d, at)?;
        write_cache(&cache.v[i], &r.v, ng, d, at)?;
        decode_attention::attend_into(
            &r.q,
            nh,
            &cache.k[i],
            &cache.v[i],
            s,
            &mask,
            scale,
            &mut r.att,
        )?;
        small_matmul::matmul_into(
            &r.att,
            b,
            &[(&a.o.weight, a.o.bias.as_ref())],
            &mut [&mut r.out],
        )?;
        add(&mut h, &r.out);
        rms_norm(&h, &layer.post_norm, hid, &mut r.xn)?;
        let gu = [
            (&m.gate.weight, m.gate.bias.as_ref()),
            (&m.up.weight, m.up.bias.as_ref()),
        ];
        small_matmul::matmul_into(&r.xn, b, &gu, &mut [&mut r.gate, &mut r.up])?;
        silu_mul(&mut r.gate, &r.up);
        small_matmul::matmul_into(
            &r.gate,
            b,
            &[(&m.down.weight, m.down.bias.as_ref())],
            &mut [&mut r.out],
        )?;
        add(&mut h, &r.out);
    }
    Ok(Tensor::from_slice(&h).f_reshape([b as i64, 1, hid as i64])?)
}

/// y = x / sqrt(mean(x^2) + eps) * w per row of `hid` (f32, as transformers).
fn rms_norm(x: &[f32], norm: &RmsNorm, hid: usize, y: &mut [f32]) -> Result<()> {
    ensure!(
        norm.weight.kind() == Kind::Float && norm.weight.is_contiguous(),
        "rms_norm: f32 weight"
    );
    // SAFETY: a contiguous f32 tensor of `hid` elements (the layer's norm).
    let w = unsafe { std::slice::from_raw_parts(norm.weight.data_ptr() as *const f32, hid) };
    for (xr, yr) in x.chunks(hid).zip(y.chunks_mut(hid)) {
        let ss: f32 = xr.iter().map(|v| v * v).sum();
        let inv = 1.0 / (ss / hid as f32 + norm.eps as f32).sqrt();
        for ((y, x), w) in yr.iter_mut().zip(xr).zip(w) {
            *y = x * inv * w;
        }
    }
    Ok(())
}

/// x * cos + rotate_half(x) * sin for each head of each row, in place
/// (`sin` carries rotate_half's sign, as `Angles` keeps it).
fn rope(x: &mut [f32], heads: usize, d: usize, cos: &[f32], sin: &[f32]) {
    let half = d / 2;
    let mut tmp = vec![0f32; d];
    for (i, head) in x.chunks_mut(d).enumerate() {
        let row = i / heads;
        let (c, s) = (&cos[row * d..(row + 1) * d], &sin[row * d..(row + 1) * d]);
        tmp.copy_from_slice(head);
        let (lo, hi) = tmp.split_at(half);
        for j in 0..half {
            head[j] = lo[j] * c[j] + hi[j] * s[j];
            head[half + j] = hi[j] * c[half + j] + lo[j] * s[half + j];
        }
    }
}

/// Writes the step's keys or values (B, G, D) at slot `at` of a layer's
/// cache (B, G, capacity, D).
fn write_cache(cache: &Tensor, new: &[f32], g: usize, d: usize, at: usize) -> Result<()> {
    let size = cache.size();
    let cap = size[2] as usize;
    ensure!(
        at < cap && new.len() == size[0] as usize * g * d,
        "decode step: cache slot {at}"
    );
    // SAFETY: a contiguous f32 cache tensor (`applies`) of B * G * cap * D
    // elements; slot `at` of every (row, head) is inside it, and nothing
    // else reads or writes the cache during the step.
    let all =
        unsafe { std::slice::from_raw_parts_mut(cache.data_ptr() as *mut f32, new.len() * cap) };
    for (rh, src) in new.chunks(d).enumerate() {
        all[(rh * cap + at) * d..][..d].copy_from_slice(src);
    }
    Ok(())
}

/// g = silu(g) * u, in AVX-512 registers (`vec_exp`; `applies` checked it).
fn silu_mul(gate: &mut [f32], up: &[f32]) {
    #[inline(always)]
    fn each(gate: &mut [f32], up: &[f32]) {
        for (g, u) in gate.iter_mut().zip(up) {
            *g = *g / (1.0 + vec_exp::exp(-*g)) * u;
        }
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    fn wide(gate: &mut [f32], up: &[f32]) {
        each(gate, up)
    }
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the fused path runs only where AVX-512 is (`applies`).
    unsafe {
        wide(gate, up)
    }
    #[cfg(not(target_arch = "x86_64"))]
    each(gate, up)
}

fn add(h: &mut [f32], y: &[f32]) {
    for (a, b) in h.iter_mut().zip(y) {
        *a += b;
    }
}
