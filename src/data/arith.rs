//! The synthetic task: multi-step arithmetic word problems with GSM8K-style
//! worked solutions ending in `#### answer`, generated from a seed.
//!
//! A problem follows one person's count of one kind of thing through `steps`
//! operations (buying, giving away, doubling, sharing out), with distractor
//! sentences about someone else mixed in. The solution writes one equation
//! per operation, `a op b = c`, so a model can be taught to reason step by
//! step and a checker can verify every line. Every intermediate value stays
//! a whole number in 0..=`max_value`.
use crate::rng::Rng;
use anyhow::{bail, Result};
use serde::Serialize;

/// The difficulty knobs.
#[derive(Debug, Clone, PartialEq)]
pub struct ArithConfig {
    /// Operations per problem, drawn uniformly in this range (inclusive).
    pub min_steps: usize,
    pub max_steps: usize,
    /// Operands of additions and subtractions, and the starting count, are
    /// at most this.
    pub max_operand: i64,
    /// No intermediate value exceeds this.
    pub max_value: i64,
    /// Distractor sentences per problem, drawn uniformly in 0..=this.
    pub distractors: usize,
    /// Probability that a step of the worked solution slips: its result is
    /// written 1 or 2 off and the solution goes on from the wrong value, to
    /// a wrong `####` (`answer` stays right). Noisy demonstrations, for a
    /// model that knows the method but is not yet reliable. Drawn from their
    /// own stream, so the problems are the same as without slips.
    pub slips: f64,
    pub seed: u64,
}

impl Default for ArithConfig {
    fn default() -> Self {
        ArithConfig {
            min_steps: 2,
            max_steps: 4,
            max_operand: 10,
            max_value: 50,
            distractors: 1,
            slips: 0.0,
            seed: 0,
        }
    }
}

impl ArithConfig {
    pub fn validate(&self) -> Result<()> {
        if self.min_steps < 1 || self.min_steps > self.max_steps {
            bail!(
                "arith: steps must satisfy 1 <= min_steps <= max_steps, got {}..{}",
                self.min_steps,
                self.max_steps
            );
        }
        if self.max_operand < 2 {
            bail!("arith: max_operand must be >= 2, got {}", self.max_operand);
        }
        if !(0.0..=1.0).contains(&self.slips) {
            bail!(
                "arith: slips must be a probability in [0, 1], got {}",
                self.slips
            );
        }
        if self.max_value < 2 * self.max_operand {
            bail!(
                "arith: max_value ({}) must be at least 2 x max_operand ({})",
                self.max_value,
                self.max_operand
            );
        }
        Ok(())
    }
}

/// One problem as a data-set row.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Problem {
    pub prompt: String,
    pub answer: String,
    /// The worked solution, one equation per line, ending in `#### answer`.
    pub solution: String,
    pub steps: usize,
    /// Whether the worked solution slipped (its `####` is then wrong).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub slipped: bool,
}

/// The instruction every prompt ends with (general models need it; the
/// default model was trained with it).
pub const INSTRUCTION: &str = "Think step by step, then give the final answer after ####.";

const NAMES: [&str; 12] = [
    "Ava", "Ben", "Cleo", "Dan", "Eli", "Fay", "Gus", "Hana", "Ivo", "June", "Kai", "Lea",
];
const THINGS: [&str; 10] = [
    "apples", "pencils", "stickers", "marbles", "cookies", "books", "coins", "shells", "cards",
    "stamps",
];

/// `n` problems from `cfg` (the same seed gives the same problems).
pub fn generate(n: usize, cfg: &ArithConfig) -> Result<Vec<Problem>> {
    cfg.validate()?;
    let mut rng = Rng::new(cfg.seed);
    let mut slip_rng = Rng::new(cfg.seed ^ 0x5117_5117_5117_5117);
    Ok((0..n)
        .map(|_| {
            let (mut p, ops) = problem(&mut rng, cfg);
            if cfg.slips > 0.0 {
                slip(&mut p, &ops, cfg.slips, &mut slip_rng);
            }
            p
        })
        .collect())
}

/// One step of a solution: `a op b = c`.
type Op = (i64, char, i64);

fn apply((_, op, b): Op, a: i64) -> i64 {
    match op {
        '+' => a + b,
        '-' => a - b,
        '*' => a * b,
        _ => a / b,
    }
}

/// Rewrites the solution of `p` with each addition, subtraction or
/// multiplication slipping with probability `rate` (its result 1 or 2 off,
/// never below 0); later steps go on, exactly, from the written values. A
/// problem whose slipped value a later division would not divide keeps its
/// clean solution.
fn slip(p: &mut Problem, ops: &[Op], rate: f64, rng: &mut Rng) {
    let lines: Vec<String> = p.solution.lines().map(str::to_string).collect();
    let (first, who_what) = (&lines[0], &lines[lines.len() - 2]);
    let mut a = ops.first().map_or(0, |o| o.0);
    let mut out = vec![first.clone()];
    let mut slipped = false;
    for &(_, op, b) in ops {
        if op == '/' && a % b != 0 {
            return;
        }
        let mut c = apply((a, op, b), a);
        if op != '/' && rng.next_f64() < rate {
            let d = 1 + (rng.next_u64() % 2) as i64;
            c = if c >= d && rng.next_u64().is_multiple_of(2) {
                c - d
            } else {
                c + d
            };
            slipped = true;
        }
        out.push(format!("{a} {op} {b} = {c}."));
        a = c;
    }
    if !slipped {
        return;
    }
    // "{who} has {n} {what} now." with the slipped count.
    let w: Vec<&str> = who_what.split_whitespace().collect();
    out.push(format!("{} has {a} {} now.", w[0], w[3]));
    p.solution = format!("{}\n#### {a}", out.join("\n"));
    p.slipped = true;
}

fn pick<'a>(rng: &mut Rng, xs: &[&'a str]) -> &'a str {
    xs[(rng.next_u64() % xs.len() as u64) as usize]
}

/// Uniform in lo..=hi.
fn uniform(rng: &mut Rng, lo: i64, hi: i64) -> i64 {
    lo + (rng.next_u64() % (hi - lo + 1) as u64) as i64
}

/// One operation on the count `a`: the sentence, the step and the new count.
fn operation(
    rng: &mut Rng,
    cfg: &ArithConfig,
    who: &str,
    what: &str,
    other: &str,
    a: i64,
) -> (String, Op, i64) {
    loop {
        match rng.next_u64() % 4 {
            0 if a < cfg.max_value => {
                let b = uniform(rng, 1, cfg.max_operand.min(cfg.max_value - a));
                let verb = pick(rng, &["buys", "finds", "gets"]);
                return (format!("{who} {verb} {b} more {what}."), (a, '+', b), a + b);
            }
            1 if a >= 2 => {
                let b = uniform(rng, 1, cfg.max_operand.min(a - 1));
                return (
                    format!("{who} gives {b} {what} to {other}."),
                    (a, '-', b),
                    a - b,
                );
            }
            2 if 2 * a <= cfg.max_value && a >= 1 => {
                let k = uniform(rng, 2, (cfg.max_value / a).min(4));
                let word = ["", "", "doubles", "triples", "quadruples"][k as usize];
                return (
                    format!("{who}'s number of {what} {word}."),
                    (a, '*', k),
                    a * k,
                );
            }
            3 => {
                let ks: Vec<i64> = (2..=5).filter(|k| a % k == 0 && a / k >= 1).collect();
                if ks.is_empty() {
                    continue;
                }
                let k = ks[(rng.next_u64() % ks.len() as u64) as usize];
                return (
                    format!("{who} splits the {what} into {k} equal piles and keeps one pile."),
                    (a, '/', k),
                    a / k,
                );
            }
            _ => continue,
        }
    }
}

fn problem(rng: &mut Rng, cfg: &ArithConfig) -> (Problem, Vec<Op>) {
    let who = pick(rng, &NAMES);
    let other = loop {
        let o = pick(rng, &NAMES);
        if o != who {
            break o;
        }
    };
    let what = pick(rng, &THINGS);
    let steps = uniform(rng, cfg.min_steps as i64, cfg.max_steps as i64) as usize;
    let mut a = uniform(rng, 2, cfg.max_operand);
    let mut sentences = vec![format!("{who} has {a} {what}.")];
    let mut lines = vec![format!("{who} starts with {a} {what}.")];
    let mut ops = Vec::with_capacity(steps);
    for _ in 0..steps {
        let (s, op, next) = operation(rng, cfg, who, what, other, a);
        sentences.push(s);
        lines.push(format!("{a} {} {} = {next}.", op.1, op.2));
        ops.push((a, op.1, op.2));
        a = next;
    }
    // Distractors go anywhere after the first sentence.
    let n_distract = uniform(rng, 0, cfg.distractors as i64) as usize;
    for _ in 0..n_distract {
        let thing = pick(rng, &THINGS);
        let x = uniform(rng, 2, cfg.max_operand);
        let at = uniform(rng, 1, sentences.len() as i64) as usize;
        sentences.insert(at, format!("{other} has {x} {thing}."));
    }
    lines.push(format!("{who} has {a} {what} now."));
    let prompt = format!(
        "{} How many {what} does {who} have now? {INSTRUCTION}",
        sentences.join(" ")
    );
    let p = Problem {
        prompt,
        answer: a.to_string(),
        solution: format!("{}\n#### {a}", lines.join("\n")),
        steps,
        slipped: false,
    };
    (p, ops)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_and_within_the_knobs() {
        let cfg = ArithConfig {
            min_steps: 2,
            max_steps: 4,
            distractors: 2,
            seed: 7,
            ..ArithConfig::default()
        };
        let a = generate(200, &cfg).unwrap();
        assert_eq!(a, generate(200, &cfg).unwrap());
        assert_ne!(
            a,
            generate(
                200,
                &ArithConfig {
                    seed: 8,
                    ..cfg.clone()
                }
            )
            .unwrap()
        );
        for p in &a {
            assert!((2..=4).contains(&p.steps));
            assert!(p.solution.ends_with(&format!("#### {}", p.answer)));
            let v: i64 = p.answer.parse().unwrap();
            assert!((0..=cfg.max_value).contains(&v), "{p:?}");
            assert_eq!(
                p.solution.lines().filter(|l| l.contains(" = ")).count(),
                p.steps
            );
        }
        assert!(ArithConfig {
            min_steps: 0,
            ..cfg.clone()
        }
        .validate()
        .is_err());
        assert!(ArithConfig {
            max_value: 10,
            ..cfg
        }
        .validate()
        .is_err());
    }
}
