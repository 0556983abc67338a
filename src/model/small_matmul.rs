//! y = x W^T (+ b) for a handful of rows of x: the matmul of CPU decoding.
//!
//! While decoding a group, each weight matrix meets only ~8 rows. MKL's sgemm
//! then reaches a small fraction of memory bandwidth (it packs W for a big GEMM
//! that never comes), and that matmul is most of a decode step. This kernel
//! streams every row of W once, dots it with all rows of x (which sit in L1),
//! and splits the rows of W across threads. Only for contiguous f32 CPU tensors
//! that autograd does not track; everything else goes to libtorch.
use anyhow::Result;
use rayon::prelude::*;
use tch::{Device, Kind, Tensor};

/// Most rows of x this kernel takes; more is a real GEMM, better left to MKL.
pub const MAX_ROWS: i64 = 16;
/// Rows of x handled per pass over a row of W (accumulators kept in registers).
const GROUP: usize = 8;
/// Rows of W per parallel task.
const TASK: usize = 32;

/// Whether `x (.., in) @ w (out, in)^T` can take this path.
pub fn applies(x: &Tensor, w: &Tensor, rows: i64) -> bool {
    rows <= MAX_ROWS
        && rows > 0
        && x.device() == Device::Cpu
        && x.kind() == Kind::Float
        && w.kind() == Kind::Float
        && w.is_contiguous()
        && has_fma()
        && !((x.requires_grad() || w.requires_grad()) && grad_enabled())
}

/// Whether autograd records operations (trainable weights under no_grad,
/// as in a rollout, may still take this path).
fn grad_enabled() -> bool {
    // SAFETY: sets the thread's grad mode and puts the previous one back.
    unsafe {
        let prev = torch_sys::at_grad_set_enabled(0);
        torch_sys::at_grad_set_enabled(prev);
        prev != 0
    }
}

#[cfg(target_arch = "x86_64")]
fn has_fma() -> bool {
    std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
}

#[cfg(not(target_arch = "x86_64"))]
fn has_fma() -> bool {
    false
}

/// Computes `x (rows, in) @ w (out, in)^T + b` into a new (rows, out) tensor.
/// Callers check `applies` first.
pub fn matmul(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let (n, k) = (w.size()[0] as usize, w.size()[1] as usize);
    let x = x.f_contiguous()?;
    let rows = x.numel() / k;
    // SAFETY: both tensors are contiguous f32 on the CPU with the numel used
    // here, and outlive these borrows (no other handle writes to them meanwhile).
    let (xs, ws) = unsafe {
        (
            std::slice::from_raw_parts(x.data_ptr() as *const f32, rows * k),
            std::slice::from_raw_parts(w.data_ptr() as *const f32, n * k),
        )
    };
    // Transposed result (out, rows): each task writes whole rows of it.
    let mut yt = vec![0f32; n * rows];
    yt.par_chunks_mut(TASK * rows)
        .enumerate()
        .for_each(|(t, chunk)| {
            for (i, y) in chunk.chunks_mut(rows).enumerate() {
                let o = t * TASK + i;
                dot_rows(&ws[o * k..(o + 1) * k], xs, rows, y);
            }
        });
    let mut y = Tensor::f_empty([rows as i64, n as i64], (Kind::Float, Device::Cpu))?;
    // SAFETY: a fresh contiguous (rows, n) f32 tensor that nothing else holds.
    let ys = unsafe { std::slice::from_raw_parts_mut(y.data_ptr() as *mut f32, rows * n) };
    for o in 0..n {
        for r in 0..rows {
            ys[r * n + o] = yt[o * rows + r];
        }
    }
    if let Some(b) = b {
        y = y.f_add(b)?;
    }
    Ok(y)
}

/// y[r] = w . x[r] for every row r of x (rows x k, row-major).
fn dot_rows(w: &[f32], x: &[f32], rows: usize, y: &mut [f32]) {
    let k = w.len();
    let mut r = 0;
    while r < rows {
        let g = GROUP.min(rows - r);
        let xg = &x[r * k..(r + g) * k];
        let yg = &mut y[r..r + g];
        // SAFETY: `applies` checked AVX2 and FMA; slices have g*k and k floats.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            match g {
                8 => fma::dots::<8>(w, xg, yg),
                7 => fma::dots::<7>(w, xg, yg),
                6 => fma::dots::<6>(w, xg, yg),
                5 => fma::dots::<5>(w, xg, yg),
                4 => fma::dots::<4>(w, xg, yg),
                3 => fma::dots::<3>(w, xg, yg),
                2 => fma::dots::<2>(w, xg, yg),
                _ => fma::dots::<1>(w, xg, yg),
            }
        }
        r += g;
    }
}

#[cfg(target_arch = "x86_64")]
mod fma {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_libtorch_linear() {
        let _g = tch::no_grad_guard();
        for (rows, k, n) in [
            (1, 64, 10),
            (8, 576, 1536),
            (5, 100, 33),
            (16, 77, 65),
            (11, 8, 3),
        ] {
            let x = Tensor::randn([rows, k], (Kind::Float, Device::Cpu));
            let w = Tensor::randn([n, k], (Kind::Float, Device::Cpu));
            let b = Tensor::randn([n], (Kind::Float, Device::Cpu));
            if !applies(&x, &w, rows) {
                return; // no AVX2/FMA on this machine: nothing to compare
            }
            let want = x.linear(&w, Some(&b));
            let got = matmul(&x, &w, Some(&b)).unwrap();
            let diff = (&got - &want).abs().max().double_value(&[]);
            assert!(diff < 1e-4 * (k as f64).sqrt(), "{rows}x{k}x{n}: {diff}");
        }
    }
}
