//! The SIMD dot-product kernels of `small_matmul`: rows of W against a few
//! rows of x, accumulators in registers. AVX2/FMA (f32), AVX-512 (f32 W, or
//! bf16 W widened in registers) and AVX512_BF16 (bf16 W and x, pair dots).
//! Callers check the CPU features (`small_matmul::has_fma` and friends).
#[cfg(target_arch = "x86_64")]
use super::small_matmul::{GROUP, WB};

/// out[b][r] = the sum of the 16 lanes of acc[b][r] (the AVX-512 kernels' end).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn reduce<const B: usize, const R: usize>(
    acc: &[[std::arch::x86_64::__m512; R]; B],
    out: &mut [[f32; GROUP]; WB],
) {
    for (o, a) in out.iter_mut().zip(acc) {
        for (o, a) in o.iter_mut().zip(a) {
            *o = std::arch::x86_64::_mm512_reduce_add_ps(*a);
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub mod fma {
    use std::arch::x86_64::*;

    /// R dot products of `w` (k) with the R rows of `x` (R x k).
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dots<const R: usize>(w: &[f32], x: &[f32], y: &mut [f32]) {
        let k = w.len();
        let lanes = k / 8 * 8;
        let mut acc = [_mm256_setzero_ps(); R];
        let (wp, xp) = (w.as_ptr(), x.as_ptr());
        let mut i = 0;
        while i < lanes {
            // The hardware prefetcher alone leaves this loop waiting on DRAM:
            // fetch the same place in the next row of W (one row ahead).
            if i % 16 == 0 {
                _mm_prefetch::<_MM_HINT_T0>(wp.add(i + k) as *const i8);
            }
            let wv = _mm256_loadu_ps(wp.add(i));
            for (r, a) in acc.iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xp.add(r * k + i)), *a);
            }
            i += 8;
        }
        for (r, a) in acc.iter().enumerate() {
            let half = _mm_add_ps(_mm256_castps256_ps128(*a), _mm256_extractf128_ps(*a, 1));
            let pair = _mm_add_ps(half, _mm_movehl_ps(half, half));
            let mut s = _mm_cvtss_f32(_mm_add_ss(pair, _mm_shuffle_ps(pair, pair, 1)));
            for j in lanes..k {
                s += w[j] * x[r * k + j];
            }
            y[r] = s;
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub mod avx512 {
    use super::{GROUP, WB};
    use std::arch::x86_64::*;

    /// acc[b][r] = w[b] . x[r] for the B rows of `w` (B x k, f32 or with
    /// BF16 bf16) and the R rows of `x` (R x k): each 16-element slice of W
    /// meets all R rows of x.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    #[allow(clippy::needless_range_loop)] // r indexes both x and acc
    pub unsafe fn dots<const B: usize, const R: usize, const BF16: bool>(
        w: *const u8,
        x: &[f32],
        k: usize,
        out: &mut [[f32; GROUP]; WB],
    ) {
        let mut acc = [[_mm512_setzero_ps(); R]; B];
        let xp = x.as_ptr();
        let size = if BF16 { 2 } else { 4 };
        // 16 elements of W from element `at`, widened to f32 (bf16 is the top
        // half of an f32: shift it up). Macros, not closures: a closure is
        // not always inlined here, and then the accumulators live in memory.
        macro_rules! load {
            ($at:expr, $mask:expr) => {
                if BF16 {
                    let h = _mm256_maskz_loadu_epi16($mask, w.add($at * 2) as *const i16);
                    _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
                } else {
                    _mm512_maskz_loadu_ps($mask, w.add($at * 4) as *const f32)
                }
            };
        }
        // One 16-element slice of the B rows of W against all R rows of x.
        macro_rules! step {
            ($i:expr, $mask:expr) => {{
                let (i, mask): (usize, __mmask16) = ($i, $mask);
                let mut wv = [_mm512_setzero_ps(); B];
                for (b, v) in wv.iter_mut().enumerate() {
                    // The same place in the next block of W (see `fma::dots`).
                    _mm_prefetch::<_MM_HINT_T0>(w.add(((B + b) * k + i) * size) as *const i8);
                    *v = load!(b * k + i, mask);
                }
                for r in 0..R {
                    let xv = _mm512_maskz_loadu_ps(mask, xp.add(r * k + i));
                    for b in 0..B {
                        acc[b][r] = _mm512_fmadd_ps(wv[b], xv, acc[b][r]);
                    }
                }
            }};
        }
        let full = k / 16 * 16;
        let mut i = 0;
        while i < full {
            step!(i, !0);
            i += 16;
        }
        if i < k {
            step!(i, (1u16 << (k - i)) - 1);
        }
        super::reduce(&acc, out);
    }
}

#[cfg(target_arch = "x86_64")]
pub mod avx512_pairs {
    use super::{GROUP, WB};
    use std::arch::x86_64::*;

    /// acc[b][r] = w[b] . x[r] for B rows of bf16 `w` and R rows of bf16 `x`
    /// (each k long): one instruction multiplies 32 bf16 pairs and adds each
    /// pair's sum into 16 f32 lanes, half the instructions of widening W.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    #[allow(clippy::needless_range_loop)] // r indexes both x and acc
    pub unsafe fn pair_dots<const B: usize, const R: usize>(
        w: *const u16,
        x: *const u16,
        k: usize,
        out: &mut [[f32; GROUP]; WB],
    ) {
        let mut acc = [[_mm512_setzero_ps(); R]; B];
        macro_rules! step {
            ($i:expr, $mask:expr) => {{
                let (i, mask): (usize, __mmask32) = ($i, $mask);
                let mut wv = [_mm512_setzero_si512(); B];
                for (b, v) in wv.iter_mut().enumerate() {
                    _mm_prefetch::<_MM_HINT_T0>(w.add((B + b) * k + i) as *const i8);
                    *v = _mm512_maskz_loadu_epi16(mask, w.add(b * k + i) as *const i16);
                }
                for r in 0..R {
                    let xv = _mm512_maskz_loadu_epi16(mask, x.add(r * k + i) as *const i16);
                    let xv: __m512bh = std::mem::transmute(xv);
                    for b in 0..B {
                        let wb: __m512bh = std::mem::transmute(wv[b]);
                        acc[b][r] = _mm512_dpbf16_ps(acc[b][r], wb, xv);
                    }
                }
            }};
        }
        let full = k / 32 * 32;
        let mut i = 0;
        while i < full {
            step!(i, !0);
            i += 32;
        }
        if i < k {
            step!(i, (1u32 << (k - i)) - 1);
        }
        super::reduce(&acc, out);
    }
}
