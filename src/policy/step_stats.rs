//! What a rollout reads from a decode step's logits: the sampled token, its
//! log-prob and the entropy under softmax(z / T), and the renormalised top-k
//! mixture (TARPO's soft input) with its entropy.
//!
//! As tensor ops (any device) that is ~20 ops over (B, V): two top-k's, a
//! log-softmax, exp, products and sums, 2 ms of a 31 ms CPU step over
//! SmolLM2's 49k vocabulary. On the CPU, `scan` reads each row of logits
//! twice instead (the top-k, then the softmax sums), rows split over the
//! spin pool. The token is still drawn by `Sampling::cut` and
//! `sampler::draw`, from the same top-k values, so both paths draw the same
//! token from the same logits and uniforms.
use super::mix;
use super::sampler::{draw, sample, Rng, Sampling};
use crate::model::llama::fused;
use crate::model::small_matmul;
use crate::model::spin_pool::SpinPool;
use crate::model::vec_exp;
use anyhow::Result;
use std::sync::OnceLock;
use tch::{Device, Kind, Tensor};

/// A step's statistics, on the logits' device.
pub struct TokenStats {
    /// (B,) int64 sampled tokens.
    pub next: Tensor,
    /// (B,) log p(next) under softmax(z / T).
    pub logp: Tensor,
    /// (B,) entropy of softmax(z / T).
    pub entropy: Tensor,
    /// (B, k) the top-k tokens of softmax(z / T) and their renormalised weights.
    pub mix_ids: Tensor,
    pub mix_w: Tensor,
    /// (B,) entropy of the mixture weights.
    pub mix_entropy: Tensor,
}

/// Samples a token per row of `logits` (B, V) f32 and computes the step's
/// statistics, with mixtures of `mix_k` tokens.
pub fn token_stats(logits: &Tensor, s: &Sampling, mix_k: i64, rng: &mut Rng) -> Result<TokenStats> {
    if let Some((rows, z)) = scan(logits, s, mix_k)? {
        return from_scan(logits, z, &rows, s, mix_k, rng);
    }
    let next = sample(logits, s, rng)?;
    let logp_all = logits
        .f_div_scalar(s.scale())?
        .f_log_softmax(-1, Kind::Float)?;
    let probs = logp_all.f_exp()?;
    let logp = logp_all
        .f_gather(-1, &next.f_unsqueeze(-1)?, false)?
        .f_squeeze_dim(-1)?;
    let entropy = probs
        .f_mul(&logp_all)?
        .f_sum_dim_intlist(-1, false, Kind::Float)?
        .f_neg()?;
    let (mix_ids, mix_w) = mix::top_k(&probs, mix_k)?;
    let mix_entropy = mix::entropy(&mix_w)?;
    Ok(TokenStats {
        next,
        logp,
        entropy,
        mix_ids,
        mix_w,
        mix_entropy,
    })
}

/// One row of logits, scanned: log sum exp(z / T), the entropy, and the
/// largest z / T with their tokens (descending; ties by token id).
#[derive(Debug, Clone, PartialEq)]
pub struct RowScan {
    pub lse: f32,
    pub entropy: f32,
    pub top: Vec<(f32, i64)>,
}

/// The CPU scan of every row, when it applies: f32 CPU logits, the fused
/// decode path on (`fused::set_enabled`), 1 <= mix_k <= V, at most 1024 top
/// tokens kept, and no NaN or infinite maximum in any row (those go the
/// tensor way, which says what it says about them).
/// Returns the rows' scans and the logits as a slice.
fn scan<'a>(
    logits: &'a Tensor,
    s: &Sampling,
    mix_k: i64,
) -> Result<Option<(Vec<RowScan>, &'a [f32])>> {
    let size = logits.size();
    let (b, v) = (size[0] as usize, size[1]);
    let k = s.top_k_cut(v).max(mix_k);
    let applies = fused::enabled()
        && logits.device() == Device::Cpu
        && logits.kind() == Kind::Float
        && logits.is_contiguous()
        && (1..=v).contains(&mix_k)
        && k <= 1024;
    if !applies {
        return Ok(None);
    }
    // SAFETY: a contiguous f32 CPU tensor of b * v elements, borrowed while
    // `logits` lives and nothing writes to it.
    let z = unsafe { std::slice::from_raw_parts(logits.data_ptr() as *const f32, b * v as usize) };
    Ok(scan_rows(z, v as usize, s.scale() as f32, k as usize).map(|rows| (rows, z)))
}

/// `scan_row` for every row of `z` (rows of `v`): over the spin pool for
/// the few rows of the decode kernels' steps, where the rollout holds
/// libtorch to one thread; on this thread for more (there libtorch keeps
/// its threads, and a helper spinning after the scan would take a core
/// from them: 4x slower steps on 2 cores).
pub fn scan_rows(z: &[f32], v: usize, t: f32, k: usize) -> Option<Vec<RowScan>> {
    let rows = z.len() / v;
    if rows > small_matmul::MAX_ROWS as usize {
        return (z.chunks(v)).map(|row| scan_row(row, t, k)).collect();
    }
    let out: Vec<OnceLock<Option<RowScan>>> = (0..rows).map(|_| OnceLock::new()).collect();
    SpinPool::global().share(rows, 1, &|chunks| {
        for i in chunks.flatten() {
            let _ = out[i].set(scan_row(&z[i * v..(i + 1) * v], t, k));
        }
    });
    out.into_iter().map(|o| o.into_inner().flatten()).collect()
}

/// One row, with AVX-512 where the CPU has it.
pub fn scan_row(z: &[f32], t: f32, k: usize) -> Option<RowScan> {
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    fn wide(z: &[f32], t: f32, k: usize) -> Option<RowScan> {
        scan_body(z, t, k)
    }
    #[cfg(target_arch = "x86_64")]
    if small_matmul::has_avx512() {
        // SAFETY: the CPU has AVX-512 (checked on the line above).
        return unsafe { wide(z, t, k) };
    }
    scan_body(z, t, k)
}

/// Lanes of the scan: 16 f32 fill one AVX-512 register.
const L: usize = 16;

/// Pass 1 keeps the k largest z / T (a value must beat the k-th to enter,
/// so after the first few blocks most blocks are one compare); pass 2 sums
/// e = exp(z / T - max) and e * (z / T - max) in L lanes. Then
/// lse = max + ln Z and the entropy is ln Z - A / Z.
#[inline(always)]
pub fn scan_body(z: &[f32], t: f32, k: usize) -> Option<RowScan> {
    let k = k.min(z.len());
    if k == 0 {
        return None;
    }
    let mut top: Vec<(f32, i64)> = Vec::with_capacity(k + 1);
    for (i, &x) in z[..k].iter().enumerate() {
        insert(&mut top, k, x / t, i as i64);
    }
    let mut thr = top[k - 1].0;
    let blocks = z[k..].chunks_exact(L);
    let tail = blocks.remainder();
    for (bi, blk) in blocks.enumerate() {
        let mut s = [0f32; L];
        let mut hit = false;
        for j in 0..L {
            s[j] = blk[j] / t;
            hit |= s[j] > thr;
        }
        if hit {
            for (j, &sj) in s.iter().enumerate() {
                if sj > thr {
                    insert(&mut top, k, sj, (k + bi * L + j) as i64);
                    thr = top[k - 1].0;
                }
            }
        }
    }
    let at = z.len() - tail.len();
    for (j, &x) in tail.iter().enumerate() {
        if x / t > thr {
            insert(&mut top, k, x / t, (at + j) as i64);
            thr = top[k - 1].0;
        }
    }

    let m = top[0].0;
    let (mut zs, mut az) = ([0f32; L], [0f32; L]);
    let blocks = z.chunks_exact(L);
    let tail = blocks.remainder();
    for blk in blocks {
        for j in 0..L {
            let d = blk[j] / t - m;
            let e = vec_exp::exp(d);
            zs[j] += e;
            az[j] += if e > 0.0 { e * d } else { 0.0 };
        }
    }
    for &x in tail {
        let d = x / t - m;
        let e = vec_exp::exp(d);
        zs[0] += e;
        az[0] += if e > 0.0 { e * d } else { 0.0 };
    }
    let (zsum, asum): (f32, f32) = (zs.iter().sum(), az.iter().sum());
    if !zsum.is_finite() || !m.is_finite() {
        return None;
    }
    let ln_z = zsum.ln();
    Some(RowScan {
        lse: m + ln_z,
        entropy: ln_z - asum / zsum,
        top,
    })
}

/// Puts (x, id) into the descending list `top` of at most k, after the
/// entries equal to x (ties keep the smaller id first).
#[inline(always)]
fn insert(top: &mut Vec<(f32, i64)>, k: usize, x: f32, id: i64) {
    let at = top.partition_point(|e| e.0 >= x);
    if at < k {
        top.insert(at, (x, id));
        top.truncate(k);
    }
}

/// The statistics from the scanned rows (CPU tensors).
fn from_scan(
    logits: &Tensor,
    z: &[f32],
    rows: &[RowScan],
    s: &Sampling,
    mix_k: i64,
    rng: &mut Rng,
) -> Result<TokenStats> {
    let (b, v) = (rows.len() as i64, logits.size()[1]);
    let cut_k = s.top_k_cut(v) as usize;
    let next = if s.temperature == 0.0 {
        let ids: Vec<i64> = rows.iter().map(|r| r.top[0].1).collect();
        Tensor::from_slice(&ids)
    } else if cut_k > 0 {
        let (vals, ids) = columns(rows, cut_k);
        let vals = Tensor::from_slice(&vals).f_view([b, cut_k as i64])?;
        let ids = Tensor::from_slice(&ids).f_view([b, cut_k as i64])?;
        draw(&s.cut(&vals, Some(ids))?, rng)?
    } else {
        sample(logits, s, rng)?
    };
    let next_ids = Vec::<i64>::try_from(&next)?;
    let t = s.scale() as f32;
    let logp: Vec<f32> = (rows.iter().zip(&next_ids).enumerate())
        .map(|(i, (r, &id))| z[i * v as usize + id as usize] / t - r.lse)
        .collect();
    let entropy: Vec<f32> = rows.iter().map(|r| r.entropy).collect();
    // The mixture: exp(z / T - max) over the top mix_k, renormalised.
    let (vals, ids) = columns(rows, mix_k as usize);
    let mut w = Vec::with_capacity(vals.len());
    for (row, r) in vals.chunks(mix_k as usize).zip(rows) {
        let e: Vec<f32> = row.iter().map(|x| (x - r.top[0].0).exp()).collect();
        let total: f32 = e.iter().sum();
        w.extend(e.iter().map(|x| x / total));
    }
    let mix_w = Tensor::from_slice(&w).f_view([b, mix_k])?;
    Ok(TokenStats {
        next,
        logp: Tensor::from_slice(&logp),
        entropy: Tensor::from_slice(&entropy),
        mix_ids: Tensor::from_slice(&ids).f_view([b, mix_k])?,
        mix_entropy: mix::entropy(&mix_w)?,
        mix_w,
    })
}

/// The first n (value, id) columns of every row's top list, row-major.
fn columns(rows: &[RowScan], n: usize) -> (Vec<f32>, Vec<i64>) {
    rows.iter().flat_map(|r| r.top[..n].iter().copied()).unzip()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Random logits with three exact ties at `tied` (tokens 7, 8, 9).
    fn logits(b: i64, v: i64, seed: i64, tied: f64) -> Tensor {
        tch::manual_seed(seed);
        let z = Tensor::randn([b, v], (Kind::Float, Device::Cpu)) * 3.0;
        let _ = z.narrow(1, 7, 3).fill_(tied);
        z
    }

    #[test]
    fn the_scan_equals_a_double_precision_softmax_and_libtorch_top_k() {
        let (b, v, k, t) = (3i64, 5003i64, 50usize, 0.7f32);
        let z = logits(b, v, 1, 20.25);
        let scaled = z.f_div_scalar(t as f64).unwrap();
        let (vals, ids) = scaled.topk(k as i64, -1, true, true);
        let zs = Vec::<f32>::try_from(z.reshape([-1])).unwrap();
        for i in 0..b as usize {
            let row = &zs[i * v as usize..(i + 1) * v as usize];
            let wide = scan_row(row, t, k).unwrap();
            assert_eq!(wide, scan_body(row, t, k).unwrap(), "row {i}: both builds");
            // Values bit-equal to libtorch's z / T, in its order up to ties.
            let want_vals = Vec::<f32>::try_from(vals.get(i as i64)).unwrap();
            let got_vals: Vec<f32> = wide.top.iter().map(|e| e.0).collect();
            assert_eq!(got_vals, want_vals, "row {i}");
            let want_ids = Vec::<i64>::try_from(ids.get(i as i64)).unwrap();
            for (j, (x, id)) in wide.top.iter().enumerate() {
                assert_eq!(row[*id as usize] / t, *x, "row {i} col {j}");
                if j + 1 < k && wide.top[j + 1].0 == *x {
                    assert!(wide.top[j + 1].1 > *id, "ties by id");
                } else if j == 0 || wide.top[j - 1].0 != *x {
                    assert_eq!(*id, want_ids[j], "row {i} col {j}");
                }
            }
            let tied = 20.25 / t;
            assert_eq!(&wide.top[..3], &[(tied, 7), (tied, 8), (tied, 9)]);
            let s: Vec<f64> = row.iter().map(|&x| (x / t) as f64).collect();
            let m = s.iter().cloned().fold(f64::MIN, f64::max);
            let zsum: f64 = s.iter().map(|x| (x - m).exp()).sum();
            let lse = m + zsum.ln();
            let ent: f64 = -s.iter().map(|x| (x - lse).exp() * (x - lse)).sum::<f64>();
            assert!(
                (wide.lse as f64 - lse).abs() < 2e-5,
                "{} vs {lse}",
                wide.lse
            );
            assert!(
                (wide.entropy as f64 - ent).abs() < 2e-5,
                "{} vs {ent}",
                wide.entropy
            );
        }
    }

    #[test]
    fn nan_or_infinite_rows_are_left_to_the_tensor_path() {
        let mut row = vec![0.5f32; 100];
        assert!(scan_row(&row, 1.0, 5).is_some());
        row[40] = f32::NAN;
        assert!(scan_row(&row, 1.0, 5).is_none());
        row[40] = f32::INFINITY;
        assert!(scan_row(&row, 1.0, 5).is_none());
        row.fill(f32::NEG_INFINITY);
        assert!(scan_row(&row, 1.0, 5).is_none());
        // Masked (-inf) tokens among finite ones are fine.
        row[3] = 1.0;
        let r = scan_row(&row, 1.0, 2).unwrap();
        assert_eq!((r.top[0], r.lse, r.entropy), ((1.0, 3), 1.0, 0.0));
    }

    /// Both ways through `token_stats` on the same logits and uniforms: the
    /// same tokens and mixtures, statistics equal to float rounding.
    #[test]
    fn the_cpu_scan_and_the_tensor_ops_agree() {
        let top_p = |k: i64, p: f64| Sampling {
            temperature: 0.7,
            top_k: k,
            top_p: p,
        };
        let cases = [
            top_p(50, 0.95),
            top_p(50, 1.0),
            top_p(0, 1.0),
            top_p(0, 0.9),
            top_p(3, 1.0),
            Sampling::greedy(),
        ];
        for (c, s) in cases.iter().enumerate() {
            // (libtorch orders tied values its own way: none in the top-k here.)
            // 40 rows take the scan on this thread, 8 the spin pool.
            let rows = if c == 0 { 40 } else { 8 };
            let z = logits(rows, 4099, 10 + c as i64, 0.0);
            let run = |fast: bool| {
                fused::set_enabled(fast);
                let out = token_stats(&z, s, 10, &mut Rng::new(3)).unwrap();
                fused::set_enabled(true);
                out
            };
            assert!(
                scan(&z, s, 10).unwrap().is_some(),
                "case {c}: the scan applies"
            );
            let (fast, slow) = (run(true), run(false));
            assert_eq!(
                Vec::<i64>::try_from(&fast.next).unwrap(),
                Vec::<i64>::try_from(&slow.next).unwrap(),
                "case {c}: tokens"
            );
            assert!(fast.mix_ids.equal(&slow.mix_ids), "case {c}: mixture ids");
            for (name, a, b) in [
                ("logp", &fast.logp, &slow.logp),
                ("entropy", &fast.entropy, &slow.entropy),
                ("mix_w", &fast.mix_w, &slow.mix_w),
                ("mix_entropy", &fast.mix_entropy, &slow.mix_entropy),
            ] {
                let d = (a - b).abs().max().double_value(&[]);
                assert!(d < 1e-5, "case {c}: {name} differs by {d}");
            }
        }
    }
}
