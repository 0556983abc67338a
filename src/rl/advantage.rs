//! Group-relative advantage estimators and the reward-side helpers around them
//! (zero-advantage fraction, DAPO dynamic sampling (its overlong penalty is in `dapo`),
//! per-step advantage statistics).
//!
//! Rewards come as one flat slice laid out group by group: with group size
//! `G`, group `g` (the `G` completions of prompt `g`) is
//! `rewards[g*G .. (g+1)*G]`. Every estimator sees one group at a time.
//!
//! | name     | advantage of completion `i` in its group                      |
//! |----------|---------------------------------------------------------------|
//! | `grpo`   | `(r_i - mean(r)) / (std(r) + 1e-4)`, std unbiased (`G - 1`)   |
//! | `drgrpo` | `r_i - mean(r)` (Dr. GRPO: no std normalisation)              |
//! | `rloo`   | `r_i - mean_{j != i} r_j` (leave-one-out baseline, `G >= 2`)  |
//! | `aapo`   | `grpo` (or `drgrpo` without `scale_rewards`) + `clip(r_i - r_i^ref, -0.2, 0.28)` |
//!
//! Means are computed relative to the group's first reward
//! (`r_0 + sum(r_j - r_0) / G`), so a group whose rewards are all equal gets
//! advantages that are exactly `0.0` under every estimator (a plain
//! `sum / G` can leave residues like `1e-17`, which `grpo` would then blow up
//! by `1 / 1e-4`). This keeps [`compute`] consistent with
//! [`zero_advantage_fraction`] and [`informative_groups`], which compare
//! rewards with exact `==`.

use anyhow::{anyhow, bail, ensure, Result};

pub use super::dapo::overlong_penalty;

/// What an estimator may read besides its group's rewards.
#[derive(Debug, Default, Clone, Copy)]
pub struct Extra<'a> {
    /// AAPO: the frozen reference's rewards on the same prompts, paired by
    /// index (the group's slice when an estimator sees it).
    pub ref_rewards: Option<&'a [f64]>,
    /// AAPO: divide by the group's std (`scale_rewards`, default on).
    pub scale: Option<bool>,
}

/// One advantage estimator: maps the rewards of ONE group to its advantages
/// (same length). Errors when the group is unsuitable (e.g. `rloo` with a
/// single completion).
pub type Estimator = fn(&[f64], &Extra) -> Result<Vec<f64>>;

/// The estimator registry: `(name, function)`. Names are unique (tested).
pub const ESTIMATORS: &[(&str, Estimator)] = &[
    ("grpo", |g, _| grpo(g)),
    ("drgrpo", |g, _| drgrpo(g)),
    ("rloo", |g, _| rloo(g)),
    ("aapo", aapo),
];

/// The estimators that read the reference's rewards (and `scale_rewards`).
const PAIRED: &[&str] = &["aapo"];

/// AAPO's clip of the margin `r_i - r_i^ref` (the reference code's bounds).
pub const AAPO_MARGIN: (f64, f64) = (-0.2, 0.28);

/// Estimator used when the configuration names none.
pub const DEFAULT_ESTIMATOR: &str = "grpo";

/// Added to the standard deviation in `grpo`, as in TRL.
pub const GRPO_STD_EPS: f64 = 1e-4;

/// Registered estimator names, in table order.
pub fn names() -> Vec<&'static str> {
    super::registry::names(ESTIMATORS)
}

/// Looks an estimator up by name. Unknown names produce an error that names
/// the culprit and lists the valid names.
pub fn lookup(name: &str) -> Result<Estimator> {
    super::registry::lookup(ESTIMATORS, name, "advantage estimator")
}

/// Advantages for a flat, group-by-group list of rewards, using the named
/// estimator on each group of `group` consecutive rewards.
///
/// Errors: unknown estimator name; `group == 0`; `rewards.len()` not a
/// positive multiple of `group`; a non-finite reward; an estimator that
/// rejects the group size (`rloo` with `group == 1`); advantages that
/// overflow to a non-finite value (rewards near `f64::MAX`).
pub fn compute(rewards: &[f64], group: usize, estimator: &str) -> Result<Vec<f64>> {
    compute_with(rewards, group, estimator, &Extra::default())
}

/// [`compute`] with what paired estimators (`aapo`) read: `ref_rewards` has
/// the layout of `rewards`. Giving them to an estimator that ignores them is
/// an error, not a silent no-op.
pub fn compute_with(
    rewards: &[f64],
    group: usize,
    estimator: &str,
    extra: &Extra,
) -> Result<Vec<f64>> {
    let f = lookup(estimator)?;
    check_layout(rewards, group)?;
    let paired = PAIRED.contains(&estimator);
    if !paired && (extra.ref_rewards.is_some() || extra.scale.is_some()) {
        bail!(
            "ref_rewards and scale_rewards are for the paired estimators ({}), not {estimator:?}",
            PAIRED.join(", ")
        );
    }
    if let Some(r) = extra.ref_rewards {
        ensure!(
            r.len() == rewards.len(),
            "ref_rewards has {} values but rewards has {}: the reference's completions pair with the policy's by index",
            r.len(),
            rewards.len()
        );
        if let Some(j) = r.iter().position(|x| !x.is_finite()) {
            bail!("ref_rewards[{j}] is not finite ({})", r[j]);
        }
    }
    let mut out = Vec::with_capacity(rewards.len());
    for (g, chunk) in rewards.chunks_exact(group).enumerate() {
        let mine = Extra {
            ref_rewards: extra.ref_rewards.map(|r| &r[g * group..(g + 1) * group]),
            scale: extra.scale,
        };
        let adv =
            f(chunk, &mine).map_err(|e| e.context(format!("advantage estimator {estimator:?}")))?;
        ensure!(
            adv.len() == chunk.len(),
            "advantage estimator {estimator:?} returned {} values for a group of {}",
            adv.len(),
            chunk.len()
        );
        if let Some(j) = adv.iter().position(|a| !a.is_finite()) {
            bail!(
                "advantage estimator {estimator:?} produced a non-finite advantage ({}) \
                 at index {} (group {g}); rewards too large in magnitude?",
                adv[j],
                g * group + j
            );
        }
        out.extend(adv);
    }
    Ok(out)
}

/// GRPO: `A_i = (r_i - mean(r)) / (std(r) + 1e-4)` with the unbiased
/// (Bessel, `G - 1`) standard deviation of the group, as TRL does with
/// `torch.std`. A group of one has advantage `0` (no spread to normalise by).
pub fn grpo(group: &[f64]) -> Result<Vec<f64>> {
    let n = group.len();
    if n <= 1 {
        return Ok(vec![0.0; n]);
    }
    let m = mean(group);
    let ss: f64 = group.iter().map(|r| (r - m) * (r - m)).sum();
    let std = (ss / (n - 1) as f64).sqrt();
    Ok(group
        .iter()
        .map(|r| (r - m) / (std + GRPO_STD_EPS))
        .collect())
}

/// Dr. GRPO: `A_i = r_i - mean(r)`, no standard-deviation normalisation.
pub fn drgrpo(group: &[f64]) -> Result<Vec<f64>> {
    let m = mean(group);
    Ok(group.iter().map(|r| r - m).collect())
}

/// RLOO: `A_i = r_i - mean_{j != i} r_j`, the leave-one-out baseline.
/// Computed as the equivalent `G / (G - 1) * (r_i - mean(r))`.
/// Needs at least two completions per group.
pub fn rloo(group: &[f64]) -> Result<Vec<f64>> {
    let n = group.len();
    ensure!(
        n >= 2,
        "rloo needs a group size of at least 2 (got {n}): the leave-one-out baseline of a \
         single completion is undefined"
    );
    let m = mean(group);
    let scale = n as f64 / (n - 1) as f64;
    Ok(group.iter().map(|r| scale * (r - m)).collect())
}

/// AAPO: the group-relative advantage over the policy's group (std-scaled
/// with `scale_rewards`, the default) plus the clipped, unnormalised margin
/// over the paired reference completion, so a group whose policy rewards are
/// all equal still learns where the reference did better or worse.
pub fn aapo(group: &[f64], x: &Extra) -> Result<Vec<f64>> {
    let r_ref = x.ref_rewards.ok_or_else(|| {
        anyhow!("aapo needs ref_rewards: the frozen reference's rewards on the same prompts, paired by index")
    })?;
    let base = if x.scale.unwrap_or(true) {
        grpo(group)?
    } else {
        drgrpo(group)?
    };
    let (lo, hi) = AAPO_MARGIN;
    Ok((base.iter().zip(group).zip(r_ref))
        .map(|((a, r), rr)| a + (r - rr).clamp(lo, hi))
        .collect())
}

/// Fraction of groups where GRPO's advantage is zero (all policy rewards
/// equal) but AAPO's is not (some margin over the reference is nonzero).
pub fn aapo_revived_fraction(rewards: &[f64], ref_rewards: &[f64], group: usize) -> Result<f64> {
    let n = check_layout(rewards, group)?;
    ensure!(
        ref_rewards.len() == rewards.len(),
        "ref_rewards and rewards differ in length"
    );
    let revived = (rewards
        .chunks_exact(group)
        .zip(ref_rewards.chunks_exact(group)))
    .filter(|(r, rr)| all_equal(r) && r.iter().zip(*rr).any(|(a, b)| a != b))
    .count();
    Ok(revived as f64 / n as f64)
}

/// Fraction (in `[0, 1]`) of groups whose rewards are all exactly equal.
/// Those groups have advantage 0 everywhere under every estimator, so they
/// contribute nothing to the policy gradient; reported every step so that a
/// zero loss is not mistaken for a bug.
pub fn zero_advantage_fraction(rewards: &[f64], group: usize) -> Result<f64> {
    let n_groups = check_layout(rewards, group)?;
    let flat = rewards
        .chunks_exact(group)
        .filter(|chunk| all_equal(chunk))
        .count();
    Ok(flat as f64 / n_groups as f64)
}

/// DAPO dynamic sampling: indices of the groups whose rewards are NOT all
/// equal (the informative ones), in increasing order. DAPO keeps these and
/// samples more prompts to replace the others.
pub fn informative_groups(rewards: &[f64], group: usize) -> Result<Vec<usize>> {
    check_layout(rewards, group)?;
    Ok(rewards
        .chunks_exact(group)
        .enumerate()
        .filter(|(_, chunk)| !all_equal(chunk))
        .map(|(g, _)| g)
        .collect())
}

/// Summary of a batch of advantages, for the per-step metrics
/// `adv_min` / `adv_max` / `adv_mean` / `adv_std`.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdvantageStats {
    pub min: f64,
    pub max: f64,
    /// POPULATION standard deviation (divide by `n`, not `n - 1`).
    pub std: f64,
    pub mean: f64,
}

/// Min, max, population std and mean of `xs`. An empty slice gives all
/// zeros (so metrics stay finite/serialisable); non-finite inputs propagate.
pub fn stats(xs: &[f64]) -> AdvantageStats {
    if xs.is_empty() {
        return AdvantageStats {
            min: 0.0,
            max: 0.0,
            std: 0.0,
            mean: 0.0,
        };
    }
    let m = mean(xs);
    let var = xs.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / xs.len() as f64;
    AdvantageStats {
        min: xs.iter().copied().fold(f64::INFINITY, f64::min),
        max: xs.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        std: var.sqrt(),
        mean: m,
    }
}

/// Validates the flat group layout and the rewards; returns the number of
/// groups.
fn check_layout(rewards: &[f64], group: usize) -> Result<usize> {
    ensure!(
        group >= 1,
        "group size must be at least 1 (got 0) for {} rewards",
        rewards.len()
    );
    ensure!(
        !rewards.is_empty() && rewards.len().is_multiple_of(group),
        "got {} rewards, which is not a positive multiple of the group size {group}",
        rewards.len()
    );
    if let Some(i) = rewards.iter().position(|r| !r.is_finite()) {
        bail!(
            "reward at index {i} (group {}) is not finite: {}",
            i / group,
            rewards[i]
        );
    }
    Ok(rewards.len() / group)
}

/// Mean computed relative to the first element: exact (deviations all 0)
/// when every element is equal. 0 for an empty slice.
fn mean(xs: &[f64]) -> f64 {
    match xs.first() {
        None => 0.0,
        Some(&x0) => x0 + xs.iter().map(|x| x - x0).sum::<f64>() / xs.len() as f64,
    }
}

fn all_equal(xs: &[f64]) -> bool {
    xs.windows(2).all(|w| w[0] == w[1])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_close(got: &[f64], want: &[f64], tol: f64) {
        assert_eq!(got.len(), want.len(), "got {got:?}, want {want:?}");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= tol,
                "index {i}: got {g}, want {w} (all: {got:?})"
            );
        }
    }

    #[test]
    fn table_names_are_unique_and_default_is_registered() {
        let n = names();
        for (i, a) in n.iter().enumerate() {
            assert!(!n[i + 1..].contains(a), "duplicate estimator name {a:?}");
        }
        assert!(n.contains(&DEFAULT_ESTIMATOR));
        assert_eq!(n, ["grpo", "drgrpo", "rloo", "aapo"]);
    }

    #[test]
    fn grpo_g2() {
        // Groups [1, 0] and [0, 1]. Each: mean 0.5, deviations +-0.5,
        // unbiased var = (0.25 + 0.25) / (2 - 1) = 0.5, std = sqrt(0.5) = 0.70710678...
        // A = +-0.5 / (0.70710678 + 0.0001) = +-0.5 / 0.70720678 = +-0.70700680...
        let a = compute(&[1.0, 0.0, 0.0, 1.0], 2, "grpo").unwrap();
        let v = 0.5 / (0.5f64.sqrt() + 1e-4);
        assert!((v - 0.707_006_80).abs() < 1e-8, "{v}");
        assert_close(&a, &[v, -v, -v, v], 1e-12);
    }

    #[test]
    fn drgrpo_g2() {
        // [1, 0] - 0.5 = [0.5, -0.5]; [0, 1] - 0.5 = [-0.5, 0.5].
        let a = compute(&[1.0, 0.0, 0.0, 1.0], 2, "drgrpo").unwrap();
        assert_close(&a, &[0.5, -0.5, -0.5, 0.5], 0.0);
    }

    #[test]
    fn rloo_g2() {
        // Leave-one-out mean of a pair is the other element:
        // [1 - 0, 0 - 1, 0 - 1, 1 - 0] = [1, -1, -1, 1].
        let a = compute(&[1.0, 0.0, 0.0, 1.0], 2, "rloo").unwrap();
        assert_close(&a, &[1.0, -1.0, -1.0, 1.0], 0.0);
    }

    #[test]
    fn grpo_g4_unbiased_std() {
        // [1, 0, 0, 0]: mean 0.25; deviations 0.75, -0.25 x3;
        // sum of squares 0.5625 + 3 * 0.0625 = 0.75; unbiased var 0.75 / 3 = 0.25;
        // std 0.5 (the biased std would be sqrt(0.1875) = 0.433).
        // A = 0.75 / 0.5001 = 1.49970006, -0.25 / 0.5001 = -0.49990002.
        let a = compute(&[1.0, 0.0, 0.0, 0.0], 4, "grpo").unwrap();
        assert_close(
            &a,
            &[1.499_700_06, -0.499_900_02, -0.499_900_02, -0.499_900_02],
            1e-8,
        );
        // [3, 1, 2, 6]: mean 3; deviations 0, -2, -1, 3; ss = 14; var 14/3; std 2.1602469.
        let a = compute(&[3.0, 1.0, 2.0, 6.0], 4, "grpo").unwrap();
        let s = (14.0f64 / 3.0).sqrt() + 1e-4;
        assert!((s - 2.160_346_9).abs() < 1e-7, "{s}");
        assert_close(&a, &[0.0, -2.0 / s, -1.0 / s, 3.0 / s], 1e-12);
    }

    #[test]
    fn rloo_g4() {
        // [1, 0, 0, 0]: A0 = 1 - (0+0+0)/3 = 1; A1..3 = 0 - (1+0+0)/3 = -1/3.
        let a = compute(&[1.0, 0.0, 0.0, 0.0], 4, "rloo").unwrap();
        assert_close(&a, &[1.0, -1.0 / 3.0, -1.0 / 3.0, -1.0 / 3.0], 1e-12);
        // [3, 1, 2, 6]: A0 = 3 - 9/3 = 0; A1 = 1 - 11/3 = -8/3;
        // A2 = 2 - 10/3 = -4/3; A3 = 6 - 6/3 = 4.
        let a = compute(&[3.0, 1.0, 2.0, 6.0], 4, "rloo").unwrap();
        assert_close(&a, &[0.0, -8.0 / 3.0, -4.0 / 3.0, 4.0], 1e-12);
        // Dr. GRPO on the same group: [0, -2, -1, 3].
        let a = compute(&[3.0, 1.0, 2.0, 6.0], 4, "drgrpo").unwrap();
        assert_close(&a, &[0.0, -2.0, -1.0, 3.0], 1e-12);
    }

    #[test]
    fn group_of_one() {
        assert_eq!(compute(&[0.3, 7.0], 1, "grpo").unwrap(), [0.0, 0.0]);
        assert_eq!(compute(&[0.3, 7.0], 1, "drgrpo").unwrap(), [0.0, 0.0]);
        let e = compute(&[0.3, 7.0], 1, "rloo").unwrap_err();
        assert!(format!("{e:#}").contains("at least 2"), "{e:#}");
    }

    #[test]
    fn equal_rewards_give_exact_zeros() {
        // 0.1 * 3 / 3 != 0.1 in floating point; the shifted mean avoids the residue.
        let r = [0.1, 0.1, 0.1, 0.7, 0.7, 0.7];
        for name in names() {
            // AAPO's margins are 0 when the reference scored the same.
            let x = Extra {
                ref_rewards: PAIRED.contains(&name).then_some(&r[..]),
                scale: None,
            };
            let a = compute_with(&r, 3, name, &x).unwrap();
            assert!(a.iter().all(|&x| x == 0.0), "{name}: {a:?}");
        }
    }

    #[test]
    fn aapo_by_hand() {
        let r = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0];
        let r_ref = [0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.9];
        let with = |scale| {
            let x = Extra {
                ref_rewards: Some(&r_ref[..]),
                scale,
            };
            compute_with(&r, 4, "aapo", &x).unwrap()
        };
        // Group 1: mean 0.5, unbiased std sqrt(1/3): 0.5 / (0.57735 + 1e-4)
        // = 0.865875..., plus the margins 1, 0, -1, 0 clipped to [-0.2, 0.28].
        // Group 2: all policy rewards equal, so only the margins 1, 0, 0, 0.1.
        let a = 0.8658754297607016;
        let scaled = [a + 0.28, -a, -a - 0.2, a, 0.28, 0.0, 0.0, 0.1];
        assert_close(&with(None), &scaled, 1e-12);
        assert_close(&with(Some(true)), &scaled, 1e-12);
        // Without scale_rewards: r - mean, unnormalised.
        let plain = [0.5 + 0.28, -0.5, -0.5 - 0.2, 0.5, 0.28, 0.0, 0.0, 0.1];
        assert_close(&with(Some(false)), &plain, 1e-12);
        // GRPO gives group 2 nothing; AAPO revives it.
        assert_eq!(aapo_revived_fraction(&r, &r_ref, 4).unwrap(), 0.5);
        assert_eq!(aapo_revived_fraction(&r, &r, 4).unwrap(), 0.0);
    }

    #[test]
    fn aapo_inputs_are_checked() {
        let r = [1.0, 0.0];
        let e = compute(&r, 2, "aapo").unwrap_err();
        assert!(format!("{e:#}").contains("needs ref_rewards"), "{e:#}");
        let x = Extra {
            ref_rewards: Some(&[1.0][..]),
            scale: None,
        };
        let e = compute_with(&r, 2, "aapo", &x).unwrap_err();
        assert!(
            e.to_string()
                .contains("ref_rewards has 1 values but rewards has 2"),
            "{e}"
        );
        let x = Extra {
            ref_rewards: Some(&[1.0, f64::NAN][..]),
            scale: None,
        };
        assert!(compute_with(&r, 2, "aapo", &x)
            .unwrap_err()
            .to_string()
            .contains("ref_rewards[1]"));
        // The extras are not silently ignored by estimators that do not read them.
        let x = Extra {
            ref_rewards: None,
            scale: Some(false),
        };
        let e = compute_with(&r, 2, "grpo", &x).unwrap_err();
        assert!(e.to_string().contains("not \"grpo\""), "{e}");
    }

    #[test]
    fn layout_and_value_errors() {
        let e = compute(&[1.0, 0.0, 1.0], 2, "grpo")
            .unwrap_err()
            .to_string();
        assert!(e.contains('3') && e.contains('2'), "{e}");
        let e = compute(&[], 2, "grpo").unwrap_err().to_string();
        assert!(e.contains('0') && e.contains('2'), "{e}");
        let e = compute(&[1.0], 0, "grpo").unwrap_err().to_string();
        assert!(e.contains("group size"), "{e}");
        let e = compute(&[1.0, f64::NAN], 2, "grpo")
            .unwrap_err()
            .to_string();
        assert!(e.contains("index 1") && e.contains("NaN"), "{e}");
        let e = compute(&[f64::INFINITY, 0.0], 2, "drgrpo")
            .unwrap_err()
            .to_string();
        assert!(e.contains("not finite"), "{e}");
        // Finite rewards whose differences overflow.
        let e = compute(&[f64::MAX, -f64::MAX], 2, "drgrpo")
            .unwrap_err()
            .to_string();
        assert!(e.contains("non-finite advantage"), "{e}");
        assert!(zero_advantage_fraction(&[1.0, 2.0, 3.0], 2).is_err());
        assert!(informative_groups(&[1.0, f64::NAN], 2).is_err());
    }

    #[test]
    fn unknown_estimator_lists_valid_names() {
        let e = compute(&[1.0, 0.0], 2, "grp").unwrap_err().to_string();
        assert_eq!(
            e,
            r#"unknown advantage estimator "grp" (valid: grpo, drgrpo, rloo, aapo)"#
        );
    }

    #[test]
    fn zero_fraction_and_informative_groups() {
        // Groups: [1, 1] flat, [0, 1] informative, [0.5, 0.5] flat -> 2/3 flat.
        let r = [1.0, 1.0, 0.0, 1.0, 0.5, 0.5];
        assert!((zero_advantage_fraction(&r, 2).unwrap() - 2.0 / 3.0).abs() < 1e-15);
        assert_eq!(informative_groups(&r, 2).unwrap(), [1]);
        // G = 1: every group is trivially flat.
        assert_eq!(zero_advantage_fraction(&r, 1).unwrap(), 1.0);
        assert!(informative_groups(&r, 1).unwrap().is_empty());
        // One group of 6 with spread.
        assert_eq!(zero_advantage_fraction(&r, 6).unwrap(), 0.0);
        assert_eq!(informative_groups(&r, 6).unwrap(), [0]);
        // Flat groups are exactly those whose advantages are all zero.
        let a = compute(&r, 2, "grpo").unwrap();
        for (g, chunk) in a.chunks(2).enumerate() {
            let informative = informative_groups(&r, 2).unwrap().contains(&g);
            assert_eq!(chunk.iter().any(|&x| x != 0.0), informative, "group {g}");
        }
    }

    #[test]
    fn stats_population() {
        // [1, -1, -1, 1]: mean 0, population var 1, std 1 (unbiased would be 1.1547).
        let s = stats(&[1.0, -1.0, -1.0, 1.0]);
        assert_eq!(
            s,
            AdvantageStats {
                min: -1.0,
                max: 1.0,
                std: 1.0,
                mean: 0.0
            }
        );
        // [0, 3]: mean 1.5, var 2.25, std 1.5.
        let s = stats(&[0.0, 3.0]);
        assert_eq!((s.min, s.max, s.std, s.mean), (0.0, 3.0, 1.5, 1.5));
        assert_eq!(
            stats(&[]),
            AdvantageStats {
                min: 0.0,
                max: 0.0,
                std: 0.0,
                mean: 0.0
            }
        );
    }
}
