//! DAPO's soft overlong punishment, a reward shaping by completion length.

/// DAPO soft overlong punishment, added to the reward of a completion of
/// `len` tokens when generation is capped at `max_len` tokens with a soft
/// zone of `cache` tokens before the cap:
///
/// * `0` if `len <= max_len - cache`,
/// * `(max_len - cache - len) / cache` if `max_len - cache < len <= max_len`
///   (falls linearly from `-1/cache` to `-1`),
/// * `-1` if `len > max_len`.
///
/// Edge cases, chosen so that the function never panics:
/// * `cache == 0`: no soft zone, a hard cut: `0` up to `max_len`, `-1` beyond.
/// * `cache > max_len`: the soft zone is clamped to `[0, max_len]`, i.e.
///   `cache` is treated as `max_len` (penalty `-len / max_len` up to the cap).
pub fn overlong_penalty(len: usize, max_len: usize, cache: usize) -> f64 {
    if len > max_len {
        return -1.0;
    }
    let cache = cache.min(max_len);
    let free = max_len - cache;
    if len <= free {
        // Covers cache == 0 (then free == max_len >= len).
        0.0
    } else {
        // free < len <= max_len, hence cache >= 1.
        (free as f64 - len as f64) / cache as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlong_penalty_boundaries() {
        // max_len 100, cache 20: free up to 80, linear -1/20 .. -1 on 81..=100, -1 beyond.
        assert_eq!(overlong_penalty(0, 100, 20), 0.0);
        assert_eq!(overlong_penalty(80, 100, 20), 0.0);
        assert_eq!(overlong_penalty(81, 100, 20), -0.05); // (80 - 81) / 20
        assert_eq!(overlong_penalty(90, 100, 20), -0.5); // (80 - 90) / 20
        assert_eq!(overlong_penalty(100, 100, 20), -1.0); // (80 - 100) / 20
        assert_eq!(overlong_penalty(101, 100, 20), -1.0);
        assert_eq!(overlong_penalty(10_000, 100, 20), -1.0);
        // cache 0: hard cut at max_len.
        assert_eq!(overlong_penalty(100, 100, 0), 0.0);
        assert_eq!(overlong_penalty(101, 100, 0), -1.0);
        // cache > max_len: treated as cache = max_len.
        assert_eq!(overlong_penalty(0, 100, 150), 0.0);
        assert_eq!(overlong_penalty(50, 100, 150), -0.5);
        assert_eq!(overlong_penalty(100, 100, 150), -1.0);
        assert_eq!(overlong_penalty(101, 100, 150), -1.0);
        // Degenerate max_len 0.
        assert_eq!(overlong_penalty(0, 0, 0), 0.0);
        assert_eq!(overlong_penalty(1, 0, 5), -1.0);
    }
}
