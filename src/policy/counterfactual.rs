//! Counterfactual routing: what a completion becomes when the router's
//! decision at one position is flipped (or set hard, or soft).
//!
//! The rollout is run again on the same prompts with the same seed, one
//! round per position: in round p every row whose decision at p was free
//! (not forced) has it replaced, so each row's prefix before p is the
//! original's and the rest is re-sampled from the same random stream (the
//! stream draws per row and step whatever the mode). Each round checks that
//! the untouched parts reproduce the original; they do not when the weights
//! changed since the rollout was made.
use super::records::{Rollout, TokenRecord, HARD, SOFT};
use super::rollout::{rollout, RolloutOptions};
use super::router::Router;
use crate::model::{Llama, Tokenizer};
use anyhow::{bail, Result};

/// What the decision at the chosen position becomes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// Hard becomes soft and soft becomes hard.
    Flip,
    /// Set to this mode (positions already in it are left out).
    Set(i64),
}

impl Change {
    pub fn parse(s: &str) -> Result<Change> {
        Ok(match s {
            "flip" => Change::Flip,
            "hard" => Change::Set(HARD),
            "soft" => Change::Set(SOFT),
            other => bail!("counterfactual: mode {other:?} must be \"flip\", \"hard\" or \"soft\""),
        })
    }

    /// The new mode of a free decision, or None when it would not change.
    fn apply(self, mode: i64) -> Option<i64> {
        let new = match self {
            Change::Flip if mode == SOFT => HARD,
            Change::Flip => SOFT,
            Change::Set(m) => m,
        };
        (new != mode).then_some(new)
    }
}

/// One changed decision and the completion that followed it.
pub struct Flipped {
    pub row: usize,
    pub position: usize,
    pub before: i64,
    pub after: i64,
    pub records: Vec<TokenRecord>,
}

/// Every (row, position) with a free decision at a position in `positions`
/// (None: all), changed by `change`, re-rolled. `opts` are the options
/// `original` was made with (its seed among them).
#[allow(clippy::too_many_arguments)]
pub fn counterfactuals(
    net: &Llama,
    router: &Router,
    tok: &Tokenizer,
    original: &Rollout,
    opts: &RolloutOptions,
    rows: &[usize],
    positions: Option<&[usize]>,
    change: Change,
) -> Result<Vec<Flipped>> {
    let b = original.records.len();
    if let Some(&r) = rows.iter().find(|&&r| r >= b) {
        bail!("counterfactual: row {r} is out of range (the rollout has {b} completions)");
    }
    let longest = rows
        .iter()
        .map(|&r| original.records[r].len())
        .max()
        .unwrap_or(0);
    let rounds: Vec<usize> = match positions {
        Some(p) => {
            let mut p = p.to_vec();
            p.sort_unstable();
            p.dedup();
            p
        }
        None => (0..longest).collect(),
    };
    let bar = crate::ctl::Progress::new("counterfactual", rounds.len() as u64);
    let mut out = Vec::new();
    for (k, &pos) in rounds.iter().enumerate() {
        bar.set(k as u64);
        let mut overrides = vec![None; b];
        for &r in rows {
            let Some(rec) = original.records[r].get(pos) else {
                continue;
            };
            if let (false, Some(new)) = (rec.forced, change.apply(rec.mode)) {
                overrides[r] = Some((pos, new));
            }
        }
        if overrides.iter().all(Option::is_none) {
            continue;
        }
        let mut o = opts.clone();
        o.overrides = overrides.clone();
        let again = rollout(net, Some(router), Some(tok), &original.prompts, &o)?;
        for (r, (recs, over)) in again.records.into_iter().zip(&overrides).enumerate() {
            let same_until = over.map_or(usize::MAX, |(p, _)| p);
            check_reproduced(&original.records[r], &recs, same_until, r)?;
            if let Some((p, new)) = *over {
                out.push(Flipped {
                    row: r,
                    position: p,
                    before: original.records[r][p].mode,
                    after: new,
                    records: recs,
                });
            }
        }
    }
    Ok(out)
}

/// The re-run row must equal the original before `until` (token and mode),
/// and at `until` sample the same token (its mode is the changed one).
fn check_reproduced(
    orig: &[TokenRecord],
    again: &[TokenRecord],
    until: usize,
    row: usize,
) -> Result<()> {
    let n = orig.len().min(until.saturating_add(1));
    let same = |j: usize| {
        let (a, b) = (&orig[j], again.get(j));
        b.is_some_and(|b| a.token == b.token && (j == until || a.mode == b.mode))
    };
    if let Some(j) = (0..n).find(|&j| !same(j)) {
        bail!(
            "counterfactual: completion {row} did not reproduce at position {j}: the rollout \
             must be replayed with the weights and options that made it (has the model trained since?)"
        );
    }
    if until == usize::MAX && again.len() != orig.len() {
        bail!("counterfactual: completion {row} did not reproduce (its length changed)");
    }
    Ok(())
}
