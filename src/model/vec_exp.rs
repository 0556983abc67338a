//! e^x as straight-line f32 arithmetic that the compiler vectorises.
//!
//! libm's `expf` is one call per element: in a decode step that was silu's
//! 370k exponentials (about 1 % of the rollout's samples) and most of the
//! step's statistics (softmax sums over 8 x 49k logits). This is Cephes'
//! `expf` (Cody-Waite reduction by ln 2, a degree-6 polynomial), within 2
//! ulp of e^x, with no calls, tables, branches or int conversions, so a
//! loop over it becomes SIMD code (AVX-512 inside a function compiled for it).

const LOG2E: f32 = std::f32::consts::LOG2_E;
/// ln 2 split so that n * LN2_HI is exact for the n that occur.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// 1.5 * 2^23: adding and subtracting it rounds an f32 to an integer.
const ROUND: f32 = 12_582_912.0;
/// e^x is below f32's smallest normal here (0 is returned) ...
const LO: f32 = -87.336_55;
/// ... and above here 2^n leaves the exponent range (inf is returned).
const HI: f32 = 88.0;

/// e^x for f32 x: within 2 ulp on [-87.3, 88], 0 below (and at -inf), inf
/// above, NaN for NaN.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let xc = x.clamp(LO, HI);
    let n = (xc * LOG2E + ROUND) - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let p = (((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2)
        * r
        + 1.666_666_5e-1)
        * r
        + 0.5)
        * (r * r)
        + r
        + 1.0;
    // 2^n without a float-to-int conversion (that one stays scalar): n + 127
    // is an integer in 1..=254, the low bits of n + 127 + 2^23.
    let y = p * f32::from_bits((n + (127.0 + 8_388_608.0)).to_bits() << 23);
    if x < LO {
        0.0
    } else if x > HI {
        f32::INFINITY
    } else {
        y
    }
}

/// xs[i] = exp(xs[i] - m) for every i; returns their sum (16 lanes, then
/// added up). Inlined into the caller, SIMD where the caller is compiled for it.
#[inline(always)]
pub fn exp_shifted_sum(xs: &mut [f32], m: f32) -> f32 {
    let mut lanes = [0f32; 16];
    let mut blocks = xs.chunks_exact_mut(16);
    for blk in &mut blocks {
        for (x, l) in blk.iter_mut().zip(lanes.iter_mut()) {
            *x = exp(*x - m);
            *l += *x;
        }
    }
    for x in blocks.into_remainder() {
        *x = exp(*x - m);
        lanes[0] += *x;
    }
    lanes.iter().sum()
}

#[cfg(test)]
mod tests {
    use super::exp;

    #[test]
    fn within_two_ulp_of_the_true_value() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let got = exp(x) as f64;
            // One ulp of the true value, as an f32 sees it.
            let ulp = (want as f32).next_up() as f64 - want as f32 as f64;
            worst = worst.max((got - want).abs() / ulp);
            x += 0.001_37;
        }
        assert!(worst <= 2.0, "worst error {worst} ulp");
        for (x, want) in [(0.0, 1.0), (1.0, std::f32::consts::E), (-1e-30, 1.0)] {
            assert!((exp(x) - want).abs() <= f32::EPSILON * want, "exp({x})");
        }
    }

    #[test]
    fn ends_of_the_range() {
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp(89.0), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
        assert!(exp(87.9).is_finite() && exp(87.9) > 1e38);
    }
}
