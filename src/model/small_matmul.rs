//! y = x W^T (+ b) for a handful of rows of x: the matmul of CPU decoding.
//!
//! While decoding a group, each weight matrix meets only ~8 rows. MKL's sgemm
//! then reaches a small fraction of memory bandwidth (it packs W for a big GEMM
//! that never comes), and that matmul is most of a decode step. This kernel
//! streams every row of W once, dots it with all rows of x (which sit in L1),
//! and splits the rows of W across the threads of `spin_pool`; the SIMD dots
//! are in `simd_dots`. Only for contiguous f32 or bf16 CPU tensors that
//! autograd does not track; everything else goes to libtorch.
#[cfg(target_arch = "x86_64")]
use super::simd_dots::{avx512, avx512_pairs, fma};
use super::spin_pool::SpinPool;
use anyhow::Result;
use std::sync::atomic::{AtomicUsize, Ordering};
use tch::{Device, Kind, Tensor};

/// Most rows of x this kernel takes; more is a real GEMM, better left to MKL.
/// (Measured against MKL on 2 threads at SmolLM2's shapes: 1.3-2.4x faster at
/// 16 rows, 1.0-1.5x at 32, even at 48.)
pub const MAX_ROWS: i64 = 32;
/// Rows of x handled per pass over a row of W (accumulators kept in registers).
pub(crate) const GROUP: usize = 8;
/// Rows of W per pass with AVX-512 (3 x 8 accumulators of the 32 registers).
pub(crate) const WB: usize = 3;
/// Rows of W a thread takes at a time: whole blocks of the kernel and whole
/// cache lines of y (no two threads write one line).
const CHUNK: usize = 96;

/// Whether `x (.., in) @ w (out, in)^T` can take this path.
pub fn applies(x: &Tensor, w: &Tensor, rows: i64) -> bool {
    rows <= MAX_ROWS
        && rows > 0
        && x.device() == Device::Cpu
        && x.kind() == w.kind()
        && match w.kind() {
            Kind::Float => has_fma(),
            Kind::BFloat16 => has_avx512(),
            _ => false,
        }
        && w.is_contiguous()
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

/// Whether the AVX2/FMA kernels can run here.
#[cfg(target_arch = "x86_64")]
pub fn has_fma() -> bool {
    std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
}

#[cfg(not(target_arch = "x86_64"))]
pub fn has_fma() -> bool {
    false
}

/// Whether the bf16 pair-dot kernel (AVX512_BF16) can run here.
#[cfg(target_arch = "x86_64")]
fn has_avx512_bf16() -> bool {
    has_avx512() && std::is_x86_feature_detected!("avx512bf16")
}

#[cfg(not(target_arch = "x86_64"))]
fn has_avx512_bf16() -> bool {
    false
}

/// Whether the AVX-512 kernels (f32, and bf16 with 16-bit lanes) can run here.
#[cfg(target_arch = "x86_64")]
pub fn has_avx512() -> bool {
    std::is_x86_feature_detected!("avx512f")
        && std::is_x86_feature_detected!("avx512bw")
        && std::is_x86_feature_detected!("avx512vl")
}

#[cfg(not(target_arch = "x86_64"))]
pub fn has_avx512() -> bool {
    false
}

/// Computes `x (rows, in) @ w (out, in)^T + b` into a new (rows, out) tensor.
/// Callers check `applies` first.
pub fn matmul(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let mut y = matmul_many(x, &[(w, b)], has_avx512())?;
    Ok(y.remove(0))
}

/// One product per (W, b) of `ws`, all with the same x, in one pass of the
/// pool (q, k and v of a layer; its gate and up). Callers check `applies`
/// for each W; `wide` picks the AVX-512 kernel over the AVX2 one (bf16
/// weights always take it). bf16 x and W give bf16 y, accumulated in f32.
pub fn matmul_many(
    x: &Tensor,
    ws: &[(&Tensor, Option<&Tensor>)],
    wide: bool,
) -> Result<Vec<Tensor>> {
    matmul_kernels(x, ws, wide, has_avx512_bf16())
}

/// `matmul_many`; `pairs` takes bf16 x and W through the bf16 pair-dot
/// instruction (else x is widened to f32 and W in registers).
fn matmul_kernels(
    x: &Tensor,
    ws: &[(&Tensor, Option<&Tensor>)],
    wide: bool,
    pairs: bool,
) -> Result<Vec<Tensor>> {
    let k = ws[0].0.size()[1] as usize;
    let bf16 = x.kind() == Kind::BFloat16;
    let (wide, pairs) = (wide || bf16, pairs && bf16);
    let x = if pairs {
        x.f_contiguous()?
    } else {
        x.f_to_kind(Kind::Float)?.f_contiguous()?
    };
    let rows = x.numel() / k;
    // SAFETY: x is contiguous (bf16 with `pairs`, else f32) on the CPU with
    // rows * k elements and outlives this borrow (nothing writes to it).
    let xs = unsafe {
        if pairs {
            Elems::Bf16(std::slice::from_raw_parts(
                x.data_ptr() as *const u16,
                rows * k,
            ))
        } else {
            Elems::F32(std::slice::from_raw_parts(
                x.data_ptr() as *const f32,
                rows * k,
            ))
        }
    };
    let mut outs = Vec::with_capacity(ws.len());
    let mut jobs = Vec::with_capacity(ws.len());
    for (w, b) in ws {
        let n = w.size()[0] as usize;
        anyhow::ensure!(w.size()[1] as usize == k, "matmul_many: widths differ");
        let b = b
            .map(|b| b.f_to_kind(Kind::Float)?.f_contiguous())
            .transpose()?;
        let y = Tensor::f_empty([rows as i64, n as i64], (Kind::Float, Device::Cpu))?;
        // SAFETY: W is a contiguous f32 or bf16 CPU tensor of n * k elements
        // (`applies`), b f32 of n; the caller or `outs` holds them until we return.
        jobs.push(unsafe {
            Job {
                w: if bf16 {
                    Elems::Bf16(std::slice::from_raw_parts(
                        w.data_ptr() as *const u16,
                        n * k,
                    ))
                } else {
                    Elems::F32(std::slice::from_raw_parts(
                        w.data_ptr() as *const f32,
                        n * k,
                    ))
                },
                b: b.as_ref()
                    .map(|b| std::slice::from_raw_parts(b.data_ptr() as *const f32, n)),
                out: OutPtr(y.data_ptr() as *mut f32),
                n,
            }
        });
        outs.push((y, b));
    }
    let total: usize = jobs.iter().map(|j| j.n).sum();
    // The parts take chunks of rows of all the Ws as they go (one that falls
    // behind, woken late or slowed by the other core's traffic, takes fewer).
    let next = AtomicUsize::new(0);
    SpinPool::global().run(&|_, _| loop {
        let lo = next.fetch_add(CHUNK, Ordering::Relaxed);
        if lo >= total {
            break;
        }
        let hi = (lo + CHUNK).min(total);
        let mut start = 0;
        for job in &jobs {
            let (a, z) = (
                lo.max(start) - start,
                hi.min(start + job.n).max(start) - start,
            );
            if a < z {
                job.rows(xs, rows, k, a..z, wide);
            }
            start += job.n;
        }
    });
    outs.into_iter()
        .map(|(y, _)| {
            Ok(if bf16 {
                y.f_to_kind(Kind::BFloat16)?
            } else {
                y
            })
        })
        .collect()
}

/// The elements of a weight matrix: f32, or bf16 (widened in the kernel).
#[derive(Clone, Copy)]
enum Elems<'a> {
    F32(&'a [f32]),
    Bf16(&'a [u16]),
}

impl<'a> Elems<'a> {
    /// Rows lo..hi of a matrix with k columns.
    fn rows(self, lo: usize, hi: usize, k: usize) -> Elems<'a> {
        match self {
            Elems::F32(w) => Elems::F32(&w[lo * k..hi * k]),
            Elems::Bf16(w) => Elems::Bf16(&w[lo * k..hi * k]),
        }
    }
}

/// One product of `matmul_many`: W (n, k), its bias and where y goes.
struct Job<'a> {
    w: Elems<'a>,
    b: Option<&'a [f32]>,
    out: OutPtr,
    n: usize,
}

impl Job<'_> {
    /// y[r][o] = x[r] . W[o] + b[o] for the rows `os` of W and all rows of x.
    fn rows(&self, xs: Elems, rows: usize, k: usize, os: std::ops::Range<usize>, wide: bool) {
        let mut o = os.start;
        while o < os.end {
            let wb = if wide { WB.min(os.end - o) } else { 1 };
            let mut r = 0;
            while r < rows {
                let g = GROUP.min(rows - r);
                let mut acc = [[0f32; GROUP]; WB];
                let (w, x) = (self.w.rows(o, o + wb, k), xs.rows(r, r + g, k));
                dot_block(w, x, g, k, &mut acc, wide);
                for (c, accs) in acc[..wb].iter().enumerate() {
                    let bias = self.b.map_or(0.0, |b| b[o + c]);
                    for (i, v) in accs[..g].iter().enumerate() {
                        // SAFETY: y is a fresh (rows, n) f32 tensor; parts
                        // write disjoint columns, and run() returns after all.
                        unsafe { self.out.write((r + i) * self.n + o + c, v + bias) };
                    }
                }
                r += g;
            }
            o += wb;
        }
    }
}

/// The output of a matmul, written by every part of the pool at once.
struct OutPtr(*mut f32);
// SAFETY: the parts write disjoint elements (see `matmul`).
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// # Safety
    /// `i` is in bounds and no other part writes element `i`.
    unsafe fn write(&self, i: usize, v: f32) {
        unsafe { *self.0.add(i) = v }
    }
}

/// acc[b][r] = w[b] . x[r] for the rows of W and the g rows of x (both
/// row-major with k columns). bf16 W needs `wide`; bf16 x needs bf16 W.
fn dot_block(w: Elems, x: Elems, g: usize, k: usize, acc: &mut [[f32; GROUP]; WB], wide: bool) {
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! pairs {
            ($wb:literal, $w:expr, $x:expr) => {
                // SAFETY: `has_avx512_bf16` held; w has $wb*k elements, x g*k.
                unsafe {
                    let (w, x) = ($w.as_ptr(), $x.as_ptr());
                    match g {
                        8 => avx512_pairs::pair_dots::<$wb, 8>(w, x, k, acc),
                        7 => avx512_pairs::pair_dots::<$wb, 7>(w, x, k, acc),
                        6 => avx512_pairs::pair_dots::<$wb, 6>(w, x, k, acc),
                        5 => avx512_pairs::pair_dots::<$wb, 5>(w, x, k, acc),
                        4 => avx512_pairs::pair_dots::<$wb, 4>(w, x, k, acc),
                        3 => avx512_pairs::pair_dots::<$wb, 3>(w, x, k, acc),
                        2 => avx512_pairs::pair_dots::<$wb, 2>(w, x, k, acc),
                        _ => avx512_pairs::pair_dots::<$wb, 1>(w, x, k, acc),
                    }
                }
            };
        }
        let x = match (w, x) {
            (Elems::Bf16(w), Elems::Bf16(x)) => {
                return match w.len() / k {
                    3 => pairs!(3, w, x),
                    2 => pairs!(2, w, x),
                    _ => pairs!(1, w, x),
                };
            }
            (_, Elems::F32(x)) => x,
            (Elems::F32(_), Elems::Bf16(_)) => {
                debug_assert!(false, "bf16 x with f32 W");
                return;
            }
        };
        macro_rules! pick {
            ($wb:literal, $bf:literal, $w:expr) => {
                // SAFETY: `has_avx512` (and avx512bw for bf16) held; w has
                // $wb*k elements, x g*k.
                unsafe {
                    let w = $w.as_ptr() as *const u8;
                    match g {
                        8 => avx512::dots::<$wb, 8, $bf>(w, x, k, acc),
                        7 => avx512::dots::<$wb, 7, $bf>(w, x, k, acc),
                        6 => avx512::dots::<$wb, 6, $bf>(w, x, k, acc),
                        5 => avx512::dots::<$wb, 5, $bf>(w, x, k, acc),
                        4 => avx512::dots::<$wb, 4, $bf>(w, x, k, acc),
                        3 => avx512::dots::<$wb, 3, $bf>(w, x, k, acc),
                        2 => avx512::dots::<$wb, 2, $bf>(w, x, k, acc),
                        _ => avx512::dots::<$wb, 1, $bf>(w, x, k, acc),
                    }
                }
            };
        }
        let w = match (w, wide) {
            (Elems::Bf16(w), _) => {
                return match w.len() / k {
                    3 => pick!(3, true, w),
                    2 => pick!(2, true, w),
                    _ => pick!(1, true, w),
                };
            }
            (Elems::F32(w), true) => {
                return match w.len() / k {
                    3 => pick!(3, false, w),
                    2 => pick!(2, false, w),
                    _ => pick!(1, false, w),
                };
            }
            (Elems::F32(w), false) => w,
        };
        let y = &mut acc[0][..g];
        // SAFETY: `applies` checked AVX2 and FMA; x holds g*k floats, w k.
        unsafe {
            match g {
                8 => fma::dots::<8>(w, x, y),
                7 => fma::dots::<7>(w, x, y),
                6 => fma::dots::<6>(w, x, y),
                5 => fma::dots::<5>(w, x, y),
                4 => fma::dots::<4>(w, x, y),
                3 => fma::dots::<3>(w, x, y),
                2 => fma::dots::<2>(w, x, y),
                _ => fma::dots::<1>(w, x, y),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn many_products_match_one_at_a_time() {
        let _g = tch::no_grad_guard();
        let x = Tensor::randn([8, 1, 96], (Kind::Float, Device::Cpu));
        let ws: Vec<Tensor> = [200, 64, 7]
            .iter()
            .map(|&n| Tensor::randn([n, 96], (Kind::Float, Device::Cpu)))
            .collect();
        let b = Tensor::randn([64], (Kind::Float, Device::Cpu));
        let bias = [None, Some(&b), None];
        if !ws.iter().all(|w| applies(&x, w, 8)) {
            return; // no AVX2/FMA on this machine: nothing to compare
        }
        let pairs: Vec<_> = ws.iter().zip(bias).collect();
        for wide in [false, has_avx512()] {
            let got = matmul_many(&x, &pairs, wide).unwrap();
            for ((w, b), y) in pairs.iter().zip(&got) {
                let want = x.reshape([8, 96]).linear(w, *b);
                assert_eq!(y.size(), want.size());
                let diff = (y - &want).abs().max().double_value(&[]);
                assert!(diff < 1e-3, "{:?} wide={wide}: {diff}", w.size());
            }
        }
    }

    #[test]
    fn bf16_weights_accumulate_in_f32() {
        let _g = tch::no_grad_guard();
        let bf = (Kind::BFloat16, Device::Cpu);
        for (rows, k, n) in [(8, 576, 200), (3, 77, 5), (16, 40, 33)] {
            let x = Tensor::randn([rows, k], bf);
            let w = Tensor::randn([n, k], bf);
            let b = Tensor::randn([n], bf);
            if !applies(&x, &w, rows) {
                assert!(!has_avx512(), "bf16 takes the kernel with AVX-512");
                return;
            }
            let f = |t: &Tensor| t.to_kind(Kind::Float);
            let want = f(&x).linear(&f(&w), Some(&f(&b))).to_kind(Kind::BFloat16);
            for pairs in [false, true] {
                if pairs && !has_avx512_bf16() {
                    continue;
                }
                let got = matmul_kernels(&x, &[(&w, Some(&b))], true, pairs)
                    .unwrap()
                    .remove(0);
                assert_eq!(got.kind(), Kind::BFloat16);
                // One bf16 rounding of an f32 sum: at most one ulp (2^-7 relative).
                let diff = (f(&got) - f(&want)).abs().max().double_value(&[]);
                let scale = f(&want).abs().max().double_value(&[]);
                assert!(
                    diff <= scale / 128.0,
                    "{rows}x{k}x{n} {pairs}: {diff} of {scale}"
                );
                let torch = x.linear(&w, Some(&b));
                let off = (f(&got) - f(&torch)).abs().max().double_value(&[]);
                assert!(
                    off <= scale / 64.0,
                    "{rows}x{k}x{n} {pairs} vs libtorch: {off}"
                );
            }
        }
    }

    #[test]
    fn matches_libtorch_linear() {
        let _g = tch::no_grad_guard();
        for (rows, k, n) in [
            (1, 64, 10),
            (8, 576, 1536),
            (5, 100, 33),
            (16, 77, 65),
            (32, 576, 100),
            (11, 8, 3),
        ] {
            let x = Tensor::randn([rows, k], (Kind::Float, Device::Cpu));
            let w = Tensor::randn([n, k], (Kind::Float, Device::Cpu));
            let b = Tensor::randn([n], (Kind::Float, Device::Cpu));
            if !applies(&x, &w, rows) {
                return; // no AVX2/FMA on this machine: nothing to compare
            }
            let want = x.linear(&w, Some(&b));
            for wide in [false, true] {
                if wide && !has_avx512() {
                    continue;
                }
                let got = matmul_many(&x, &[(&w, Some(&b))], wide).unwrap().remove(0);
                let diff = (&got - &want).abs().max().double_value(&[]);
                assert!(
                    diff < 1e-4 * (k as f64).sqrt(),
                    "{rows}x{k}x{n} {wide}: {diff}"
                );
            }
        }
    }
}
