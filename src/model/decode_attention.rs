//! Attention of one new token per row over the KV cache: the decode step's.
//!
//! libtorch's fused CPU kernel is built for long query blocks; with one query
//! it spends most of its time in per-call set-up and small GEMM calls, and its
//! cost grows with the cache. This kernel reads each (row, kv head) slice of
//! the cache once for all the query heads that share it, splits the pairs over
//! `spin_pool`, and keeps the softmax exact (max-subtracted, then normalised).
//! Only for f32 or bf16 CPU tensors outside autograd (bf16 keys and values
//! are read as stored and widened; sums in f32); the rest goes to libtorch.
use super::spin_pool::{SharedOut, SpinPool};
use super::vec_exp;
use anyhow::{ensure, Result};
use tch::{Device, Kind, Tensor};

/// Whether q (B, H, 1, D) over k, v (B, G, S, D) can take this path.
pub fn applies(q: &Tensor, k: &Tensor, v: &Tensor) -> bool {
    let (qs, ks) = (q.size(), k.size());
    qs.len() == 4
        && qs[2] == 1
        && ks.len() == 4
        && q.device() == Device::Cpu
        && (k.kind() == Kind::Float || k.kind() == Kind::BFloat16)
        && [q, v].iter().all(|t| t.kind() == k.kind())
        && !(q.requires_grad() || k.requires_grad() || v.requires_grad())
        && k.stride()[3] == 1
        && v.stride()[3] == 1
        && k.stride() == v.stride()
        && qs[1] % ks[1] == 0
        && super::small_matmul::has_fma()
}

/// softmax(scale q k^T, masked) v for q (B, H, 1, D), k and v (B, G, S, D)
/// with G dividing H (grouped-query), `mask` (B, 1, 1, S) true where a key
/// may be seen. Returns (B, H, 1, D) in q's dtype. Callers check `applies`.
pub fn attend(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, scale: f64) -> Result<Tensor> {
    let (qs, ks) = (q.size(), k.size());
    let (b, h, d) = (qs[0] as usize, qs[1] as usize, qs[3] as usize);
    let s = ks[2] as usize;
    ensure!(
        mask.size() == [b as i64, 1, 1, s as i64],
        "decode attention: mask {:?} for {b} rows and {s} keys",
        mask.size()
    );
    let kind = q.kind();
    let q = q.f_to_kind(Kind::Float)?.f_contiguous()?;
    let mask = mask.f_to_kind(Kind::Bool)?.f_contiguous()?;
    let y = Tensor::f_empty(
        [b as i64, h as i64, 1, d as i64],
        (Kind::Float, Device::Cpu),
    )?;
    // SAFETY: contiguous f32 q and y, bool mask, of the sizes used.
    unsafe {
        let qs = std::slice::from_raw_parts(q.data_ptr() as *const f32, b * h * d);
        let ms = std::slice::from_raw_parts(mask.data_ptr() as *const bool, b * s);
        let ys = std::slice::from_raw_parts_mut(y.data_ptr() as *mut f32, b * h * d);
        attend_into(qs, h, k, v, s, ms, scale, ys)?;
    }
    Ok(if kind == Kind::Float {
        y
    } else {
        y.f_to_kind(kind)?
    })
}

/// `attend` on slices: q (B, H, D) and the output (B, H, D) as f32 rows,
/// over the first `s` key slots of k and v (B, G, >= s, D), `mask` (B, s).
/// The fused decode layer's call (no tensors made).
#[allow(clippy::too_many_arguments)]
pub fn attend_into(
    qs: &[f32],
    h: usize,
    k: &Tensor,
    v: &Tensor,
    s: usize,
    mask: &[bool],
    scale: f64,
    out: &mut [f32],
) -> Result<()> {
    let ks = k.size();
    let (b, g, d) = (ks[0] as usize, ks[1] as usize, ks[3] as usize);
    ensure!(
        qs.len() == b * h * d
            && out.len() == qs.len()
            && mask.len() == b * s
            && s <= ks[2] as usize,
        "decode attention: sizes"
    );
    ensure!(
        k.stride()[3] == 1
            && k.stride() == v.stride()
            && k.kind() == v.kind()
            && h.is_multiple_of(g),
        "decode attention: cache layout"
    );
    let sh = Shape {
        b,
        h,
        g,
        s,
        d,
        row: k.stride()[0] as usize,
        head: k.stride()[1] as usize,
    };
    // SAFETY: out holds b * h * d f32 (checked); k and v have unit stride in
    // D, read as f32 or as bf16 bit patterns (`cache`); everything outlives
    // this call.
    unsafe {
        let out = SharedOut::new(out.as_mut_ptr());
        if k.kind() == Kind::BFloat16 {
            let kv = (cache::<Bf16>(k, &sh), cache::<Bf16>(v, &sh));
            run(qs, kv, mask, scale as f32, &sh, &out);
        } else {
            let kv = (cache::<f32>(k, &sh), cache::<f32>(v, &sh));
            run(qs, kv, mask, scale as f32, &sh, &out);
        }
    }
    Ok(())
}

/// Sizes and cache strides (rows, kv heads) of one `attend` call.
struct Shape {
    b: usize,
    h: usize,
    g: usize,
    s: usize,
    d: usize,
    row: usize,
    head: usize,
}

/// The elements of a cache view `t` (B, G, S, D) with `sh`'s strides, from
/// its first to its last.
/// # Safety
/// `t` holds elements of type E and outlives the slice.
unsafe fn cache<'a, E>(t: &'a Tensor, sh: &Shape) -> &'a [E] {
    let span = (sh.b - 1) * sh.row + (sh.g - 1) * sh.head + sh.s * sh.d;
    unsafe { std::slice::from_raw_parts(t.data_ptr() as *const E, span) }
}

/// `attend`'s work over the pool, for keys and values of element type E:
/// the parts take (row, kv head) pairs as they go.
fn run<E: Widen>(
    qs: &[f32],
    (ks, vs): (&[E], &[E]),
    ms: &[bool],
    scale: f32,
    sh: &Shape,
    out: &SharedOut,
) {
    let (h, g, s, d) = (sh.h, sh.g, sh.s, sh.d);
    let per_group = h / g;
    let wide = E::wide(d);
    SpinPool::global().share(sh.b * g, 1, &|pairs| {
        let (mut scores, mut acc) = (vec![0f32; s], vec![0f32; d]);
        for pair in pairs.flatten() {
            let (r, kv) = (pair / g, pair % g);
            let base = r * sh.row + kv * sh.head;
            let (kr, vr) = (&ks[base..base + s * d], &vs[base..base + s * d]);
            for j in kv * per_group..(kv + 1) * per_group {
                let at = (r * h + j) * d;
                acc.fill(0.0);
                let (qh, mr) = (&qs[at..at + d], &ms[r * s..(r + 1) * s]);
                // SAFETY: `applies` checked AVX2 and FMA (`E::wide` AVX-512
                // and 16 | d); (r, j) is written by this part alone, inside y.
                unsafe {
                    if wide {
                        E::one_head_wide(qh, kr, vr, mr, scale, &mut scores, &mut acc);
                    } else {
                        one_head(qh, kr, vr, mr, scale, &mut scores, &mut acc);
                    }
                    out.write(at, &acc);
                }
            }
        }
    });
}

/// An element of the cache, read as f32.
trait Widen: Copy + Sync {
    fn widen(self) -> f32;

    /// Whether `one_head_wide` runs here for head size d.
    fn wide(_d: usize) -> bool {
        false
    }

    /// `one_head` with explicit AVX-512 (callers check `wide`).
    /// # Safety
    /// AVX-512F is available and 16 divides q.len().
    unsafe fn one_head_wide(
        q: &[f32],
        k: &[Self],
        v: &[Self],
        mask: &[bool],
        scale: f32,
        scores: &mut [f32],
        acc: &mut [f32],
    ) {
        unsafe { one_head(q, k, v, mask, scale, scores, acc) }
    }
}

impl Widen for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }

    fn wide(d: usize) -> bool {
        d.is_multiple_of(16) && d <= 256 && super::small_matmul::has_avx512()
    }

    unsafe fn one_head_wide(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        mask: &[bool],
        scale: f32,
        scores: &mut [f32],
        acc: &mut [f32],
    ) {
        #[cfg(target_arch = "x86_64")]
        unsafe {
            one_head_avx512(q, k, v, mask, scale, scores, acc)
        }
        #[cfg(not(target_arch = "x86_64"))]
        unsafe {
            one_head(q, k, v, mask, scale, scores, acc)
        }
    }
}

/// `one_head` for an f32 cache with 16 | d <= 256: q and the output row stay
/// in registers, each key's dot is one tree reduction instead of a chain of
/// 16 scalar adds (the chain was most of a decode step's attention).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn one_head_avx512(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: &[bool],
    scale: f32,
    scores: &mut [f32],
    acc: &mut [f32],
) {
    use std::arch::x86_64::*;
    let d = q.len();
    let n = d / 16;
    let mut qv = [_mm512_setzero_ps(); 16];
    for (c, r) in qv[..n].iter_mut().enumerate() {
        *r = _mm512_loadu_ps(q.as_ptr().add(16 * c));
    }
    let mut max = f32::NEG_INFINITY;
    for (i, sc) in scores.iter_mut().enumerate() {
        *sc = if mask[i] {
            let kp = k.as_ptr().add(i * d);
            let mut sum = _mm512_mul_ps(qv[0], _mm512_loadu_ps(kp));
            for (c, &qc) in qv[..n].iter().enumerate().skip(1) {
                sum = _mm512_fmadd_ps(qc, _mm512_loadu_ps(kp.add(16 * c)), sum);
            }
            scale * _mm512_reduce_add_ps(sum)
        } else {
            f32::NEG_INFINITY
        };
        max = max.max(*sc);
    }
    let total = vec_exp::exp_shifted_sum(scores, max);
    let mut out = [_mm512_setzero_ps(); 16];
    for (i, &p) in scores.iter().enumerate() {
        if p != 0.0 {
            let (w, vp) = (_mm512_set1_ps(p / total), v.as_ptr().add(i * d));
            for (c, o) in out[..n].iter_mut().enumerate() {
                *o = _mm512_fmadd_ps(w, _mm512_loadu_ps(vp.add(16 * c)), *o);
            }
        }
    }
    for (c, &o) in out[..n].iter().enumerate() {
        _mm512_storeu_ps(acc.as_mut_ptr().add(16 * c), o);
    }
}

/// A bf16 bit pattern: the top half of an f32.
#[derive(Clone, Copy)]
#[repr(transparent)]
struct Bf16(u16);

impl Widen for Bf16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        f32::from_bits((self.0 as u32) << 16)
    }
}

/// One query head: scores, exact softmax over the visible keys, weighted V
/// (compiled for AVX2 and FMA; `dot` and `axpy` inline into it).
#[cfg_attr(target_arch = "x86_64", target_feature(enable = "avx2,fma"))]
unsafe fn one_head<E: Widen>(
    q: &[f32],
    k: &[E],
    v: &[E],
    mask: &[bool],
    scale: f32,
    scores: &mut [f32],
    acc: &mut [f32],
) {
    let d = q.len();
    let mut max = f32::NEG_INFINITY;
    for (i, sc) in scores.iter_mut().enumerate() {
        *sc = if mask[i] {
            scale * dot(q, &k[i * d..(i + 1) * d])
        } else {
            f32::NEG_INFINITY
        };
        max = max.max(*sc);
    }
    let total = vec_exp::exp_shifted_sum(scores, max);
    for (i, &p) in scores.iter().enumerate() {
        if p != 0.0 {
            axpy(p / total, &v[i * d..(i + 1) * d], acc);
        }
    }
}

/// q . k in 16 independent lanes (so the compiler keeps it vectorised).
#[inline(always)]
fn dot<E: Widen>(q: &[f32], k: &[E]) -> f32 {
    let mut lanes = [0f32; 16];
    let (qc, kc) = (q.chunks_exact(16), k.chunks_exact(16));
    let tail: f32 = qc
        .remainder()
        .iter()
        .zip(kc.remainder())
        .map(|(a, b)| a * b.widen())
        .sum();
    for (a, b) in qc.zip(kc) {
        for l in 0..16 {
            lanes[l] = a[l].mul_add(b[l].widen(), lanes[l]);
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// acc += p v.
#[inline(always)]
fn axpy<E: Widen>(p: f32, v: &[E], acc: &mut [f32]) {
    for (a, x) in acc.iter_mut().zip(v) {
        *a = p.mul_add(x.widen(), *a);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_libtorch_sdpa_with_a_mask_and_grouped_heads() {
        let _g = tch::no_grad_guard();
        let opts = (Kind::Float, Device::Cpu);
        for (b, h, g, s, d, cap) in [
            (8, 9, 3, 129, 64, 140),
            (3, 4, 4, 5, 20, 5),
            (2, 6, 1, 33, 7, 40),
            (2, 4, 2, 35, 128, 40),
            (1, 2, 1, 16, 16, 16),
        ] {
            let q = Tensor::randn([b, h, 1, d], opts);
            let kc = Tensor::randn([b, g, cap, d], opts);
            let vc = Tensor::randn([b, g, cap, d], opts);
            let (k, v) = (kc.narrow(2, 0, s), vc.narrow(2, 0, s));
            // Every other row sees only a suffix; key 0 hidden everywhere but row 0.
            let mask = Tensor::rand([b, 1, 1, s], opts).gt(0.3);
            let _ = mask.narrow(3, s - 1, 1).fill_(1);
            assert!(applies(&q, &k, &v));
            let scale = (d as f64).powf(-0.5);
            let want = Tensor::scaled_dot_product_attention(
                &q,
                &k,
                &v,
                Some(&mask),
                0.0,
                false,
                scale,
                true,
            );
            let got = attend(&q, &k, &v, &mask, scale).unwrap();
            let diff = (&got - &want).abs().max().double_value(&[]);
            assert!(diff < 1e-5, "{b}x{h}/{g}x{s}x{d}: {diff}");
        }
    }

    #[test]
    fn bf16_cache_is_read_as_stored() {
        let _g = tch::no_grad_guard();
        let bf = (Kind::BFloat16, Device::Cpu);
        let (b, h, g, s, d) = (4, 6, 2, 50, 64);
        let q = Tensor::randn([b, h, 1, d], bf);
        let kc = Tensor::randn([b, g, s + 7, d], bf);
        let vc = Tensor::randn([b, g, s + 7, d], bf);
        let (k, v) = (kc.narrow(2, 0, s), vc.narrow(2, 0, s));
        let mask = Tensor::rand([b, 1, 1, s], (Kind::Float, Device::Cpu)).gt(0.2);
        let _ = mask.narrow(3, s - 1, 1).fill_(1);
        assert!(applies(&q, &k, &v));
        let f = |t: &Tensor| t.to_kind(Kind::Float);
        let scale = 0.125;
        let want = Tensor::scaled_dot_product_attention(
            &f(&q),
            &f(&k),
            &f(&v),
            Some(&mask),
            0.0,
            false,
            scale,
            true,
        );
        let got = attend(&q, &k, &v, &mask, scale).unwrap();
        assert_eq!(got.kind(), Kind::BFloat16);
        // f32 sums, one bf16 rounding at the end (2^-8 relative).
        let diff = (f(&got) - &want).abs().max().double_value(&[]);
        let top = want.abs().max().double_value(&[]);
        assert!(diff <= top / 128.0, "{diff} of {top}");
    }
}
