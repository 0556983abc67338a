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
use super::spin_pool::{SharedOut, SpinPool};
use anyhow::Result;
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

/// One product `x (rows, in) @ W (out, in)^T + b` per (W, b) of `ws`, each
/// a new (rows, out) tensor, in one pass of the pool (q, k and v of a layer;
/// its gate and up). Callers check `applies` for each W. bf16 x and W give
/// bf16 y, accumulated in f32.
pub fn matmul_many(x: &Tensor, ws: &[(&Tensor, Option<&Tensor>)]) -> Result<Vec<Tensor>> {
    matmul_kernels(x, ws, has_avx512(), has_avx512_bf16())
}

/// `matmul_many` with the kernels picked: `wide` takes f32 W through AVX-512
/// (else AVX2; bf16 W always takes AVX-512), `pairs` bf16 x and W through the
/// bf16 pair-dot instruction (else x is widened to f32, and W in registers).
fn matmul_kernels(
    x: &Tensor,
    ws: &[(&Tensor, Option<&Tensor>)],
    wide: bool,
    pairs: bool,
) -> Result<Vec<Tensor>> {
    let k = ws[0].0.size()[1] as usize;
    let bf16 = x.kind() == Kind::BFloat16;
    let wide = wide || bf16;
    let x = if pairs && bf16 {
        x.f_contiguous()?
    } else {
        x.f_to_kind(Kind::Float)?.f_contiguous()?
    };
    let rows = x.numel() / k;
    let ys = (ws.iter())
        .map(|(w, _)| Tensor::f_empty([rows as i64, w.size()[0]], (Kind::Float, Device::Cpu)))
        .collect::<Result<Vec<_>, _>>()?;
    // SAFETY: x is contiguous on the CPU with rows * k elements and outlives
    // this borrow (nothing writes to it meanwhile); each y is a fresh
    // (rows, n) f32 tensor held until we return.
    unsafe {
        let xs = Elems::of(&x, rows * k);
        let outs: Vec<*mut f32> = ys.iter().map(|y| y.data_ptr() as *mut f32).collect();
        run_jobs(xs, rows, k, ws, &outs, wide)?;
    }
    ys.into_iter()
        .map(|y| {
            Ok(if bf16 {
                y.f_to_kind(Kind::BFloat16)?
            } else {
                y
            })
        })
        .collect()
}

/// `matmul_many` for an f32 x given as rows of a slice, each product written
/// into `outs[i]` (rows x n_i): the fused decode layer's call, no tensors
/// made. Callers check `applies` for each W.
pub fn matmul_into(
    x: &[f32],
    rows: usize,
    ws: &[(&Tensor, Option<&Tensor>)],
    outs: &mut [&mut [f32]],
) -> Result<()> {
    let k = ws[0].0.size()[1] as usize;
    anyhow::ensure!(
        x.len() == rows * k && outs.len() == ws.len(),
        "matmul_into: sizes"
    );
    for ((w, _), out) in ws.iter().zip(outs.iter()) {
        anyhow::ensure!(
            out.len() == rows * w.size()[0] as usize,
            "matmul_into: output size"
        );
    }
    let ptrs: Vec<*mut f32> = outs.iter_mut().map(|o| o.as_mut_ptr()).collect();
    // SAFETY: x holds rows * k f32 and each out rows * n (checked above);
    // all outlive the call.
    unsafe { run_jobs(Elems::F32(x), rows, k, ws, &ptrs, has_avx512()) }
}

/// y_i = x W_i^T + b_i for every (W_i, b_i) of `ws` into `outs[i]`, rows of
/// all the Ws split over the pool.
/// # Safety
/// x holds rows * k elements; each `outs[i]` points at rows * n_i writable
/// f32 that nothing else touches during the call.
unsafe fn run_jobs(
    xs: Elems,
    rows: usize,
    k: usize,
    ws: &[(&Tensor, Option<&Tensor>)],
    outs: &[*mut f32],
    wide: bool,
) -> Result<()> {
    let mut biases = Vec::with_capacity(ws.len());
    let mut jobs = Vec::with_capacity(ws.len());
    for ((w, b), &out) in ws.iter().zip(outs) {
        let n = w.size()[0] as usize;
        anyhow::ensure!(w.size()[1] as usize == k, "matmul_many: widths differ");
        let b = b
            .map(|b| b.f_to_kind(Kind::Float)?.f_contiguous())
            .transpose()?;
        // SAFETY: W is a contiguous f32 or bf16 CPU tensor of n * k elements
        // (`applies`), b f32 of n (held in `biases` until we return).
        jobs.push(unsafe {
            Job {
                w: Elems::of(w, n * k),
                b: b.as_ref()
                    .map(|b| std::slice::from_raw_parts(b.data_ptr() as *const f32, n)),
                out: SharedOut::new(out),
                n,
            }
        });
        biases.push(b);
    }
    // Chunks of rows of all the Ws, one after the other.
    let total: usize = jobs.iter().map(|j| j.n).sum();
    SpinPool::global().share(total, CHUNK, &|chunks| {
        for chunk in chunks {
            let mut start = 0;
            for job in &jobs {
                let (a, z) = (chunk.start.max(start), chunk.end.min(start + job.n));
                if a < z {
                    job.rows(xs, rows, k, a - start..z - start, wide);
                }
                start += job.n;
            }
        }
    });
    Ok(())
}

/// The elements of a matrix: f32, or bf16 (widened or pair-dotted).
#[derive(Clone, Copy)]
enum Elems<'a> {
    F32(&'a [f32]),
    Bf16(&'a [u16]),
}

impl<'a> Elems<'a> {
    /// The first `len` elements of a contiguous f32 or bf16 tensor.
    /// # Safety
    /// `t` holds at least `len` elements and outlives the borrow.
    unsafe fn of(t: &'a Tensor, len: usize) -> Elems<'a> {
        let at = t.data_ptr();
        unsafe {
            if t.kind() == Kind::BFloat16 {
                Elems::Bf16(std::slice::from_raw_parts(at as *const u16, len))
            } else {
                Elems::F32(std::slice::from_raw_parts(at as *const f32, len))
            }
        }
    }

    /// Rows lo..hi of a matrix with k columns.
    fn rows(self, lo: usize, hi: usize, k: usize) -> Elems<'a> {
        match self {
            Elems::F32(w) => Elems::F32(&w[lo * k..hi * k]),
            Elems::Bf16(w) => Elems::Bf16(&w[lo * k..hi * k]),
        }
    }

    fn len(self) -> usize {
        match self {
            Elems::F32(w) => w.len(),
            Elems::Bf16(w) => w.len(),
        }
    }
}

/// One product of `matmul_many`: W (n, k), its bias and where y goes.
struct Job<'a> {
    w: Elems<'a>,
    b: Option<&'a [f32]>,
    out: SharedOut,
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
                        // SAFETY: inside y (rows, n); each W row is in one
                        // chunk, so one part writes column o + c.
                        unsafe { self.out.write((r + i) * self.n + o + c, &[v + bias]) };
                    }
                }
                r += g;
            }
            o += wb;
        }
    }
}

/// `$body` with the const `$name` = `$n` (1..=8): kernels take their block
/// sizes as const generics (accumulators in registers).
#[cfg(target_arch = "x86_64")]
macro_rules! with_const {
    ($n:expr, $name:ident => $body:expr) => {
        match $n {
            8 => {
                const $name: usize = 8;
                $body
            }
            7 => {
                const $name: usize = 7;
                $body
            }
            6 => {
                const $name: usize = 6;
                $body
            }
            5 => {
                const $name: usize = 5;
                $body
            }
            4 => {
                const $name: usize = 4;
                $body
            }
            3 => {
                const $name: usize = 3;
                $body
            }
            2 => {
                const $name: usize = 2;
                $body
            }
            _ => {
                const $name: usize = 1;
                $body
            }
        }
    };
}

/// acc[b][r] = w[b] . x[r] for the rows of W (at most WB) and the g rows of x
/// (both row-major with k columns). bf16 W needs `wide`; bf16 x needs bf16 W.
fn dot_block(w: Elems, x: Elems, g: usize, k: usize, acc: &mut [[f32; GROUP]; WB], wide: bool) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the features each kernel needs were checked (`applies` for
    // AVX2/FMA and bf16's AVX-512, `has_avx512` for `wide`, `has_avx512_bf16`
    // for bf16 x); w holds wb * k elements and x g * k.
    unsafe {
        let wb = w.len() / k;
        match (w, x) {
            (Elems::Bf16(w), Elems::Bf16(x)) => with_const!(wb, B => with_const!(g, R =>
                avx512_pairs::pair_dots::<B, R>(w.as_ptr(), x.as_ptr(), k, acc))),
            (Elems::Bf16(w), Elems::F32(x)) => with_const!(wb, B => with_const!(g, R =>
                avx512::dots::<B, R, true>(w.as_ptr() as *const u8, x, k, acc))),
            (Elems::F32(w), Elems::F32(x)) if wide => with_const!(wb, B => with_const!(g, R =>
                avx512::dots::<B, R, false>(w.as_ptr() as *const u8, x, k, acc))),
            (Elems::F32(w), Elems::F32(x)) => {
                with_const!(g, R => fma::dots::<R>(w, x, &mut acc[0][..g]))
            }
            (Elems::F32(_), Elems::Bf16(_)) => debug_assert!(false, "bf16 x with f32 W"),
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
            let got = matmul_kernels(&x, &pairs, wide, false).unwrap();
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
                let got = matmul_kernels(&x, &[(&w, Some(&b))], wide, false)
                    .unwrap()
                    .remove(0);
                let diff = (&got - &want).abs().max().double_value(&[]);
                assert!(
                    diff < 1e-4 * (k as f64).sqrt(),
                    "{rows}x{k}x{n} {wide}: {diff}"
                );
            }
        }
    }
}
