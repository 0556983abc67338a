//! Learning-rate schedules: linear warm-up, then constant, linear or cosine
//! decay, as transformers' `get_*_schedule_with_warmup` lambdas under
//! `LambdaLR` (the k-th optimizer step, 0-based, uses `lambda(k)`).
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// The shape of the learning-rate curve after warm-up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    /// Factor 1 after warm-up.
    Constant,
    /// Linear decay from 1 at the end of warm-up to `min_lr_ratio` at `total_steps`.
    Linear,
    /// Half-cosine decay from 1 at the end of warm-up to `min_lr_ratio` at `total_steps`.
    Cosine,
}

impl ScheduleKind {
    pub const NAMES: [&'static str; 3] = ["constant", "linear", "cosine"];

    /// Parses `constant`, `linear` or `cosine` (case-insensitive).
    pub fn parse(name: &str) -> Result<Self> {
        match name.trim().to_ascii_lowercase().as_str() {
            "constant" => Ok(ScheduleKind::Constant),
            "linear" => Ok(ScheduleKind::Linear),
            "cosine" => Ok(ScheduleKind::Cosine),
            _ => bail!(
                "unknown learning-rate schedule {name:?}; expected one of: {}",
                Self::NAMES.join(", ")
            ),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ScheduleKind::Constant => "constant",
            ScheduleKind::Linear => "linear",
            ScheduleKind::Cosine => "cosine",
        }
    }
}

impl FromStr for ScheduleKind {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::parse(s)
    }
}

impl fmt::Display for ScheduleKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A learning-rate multiplier per optimizer step: linear warm-up from 0 over
/// `warmup_steps`, then constant, linear or cosine decay to `min_lr_ratio`
/// at `total_steps` (and held there afterwards).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    pub kind: ScheduleKind,
    pub warmup_steps: u64,
    /// Total optimizer steps (warm-up included). Ignored by `Constant`.
    pub total_steps: u64,
    /// Final factor of the decay, in [0, 1]. Ignored by `Constant`.
    pub min_lr_ratio: f64,
}

impl Default for Schedule {
    fn default() -> Self {
        Schedule::constant()
    }
}

impl Schedule {
    /// Factor 1 at every step.
    pub fn constant() -> Self {
        Schedule {
            kind: ScheduleKind::Constant,
            warmup_steps: 0,
            total_steps: 0,
            min_lr_ratio: 0.0,
        }
    }

    /// A validated schedule with the warm-up given in steps.
    pub fn new(
        kind: ScheduleKind,
        warmup_steps: u64,
        total_steps: u64,
        min_lr_ratio: f64,
    ) -> Result<Self> {
        let s = Schedule {
            kind,
            warmup_steps,
            total_steps,
            min_lr_ratio,
        };
        s.validate()?;
        Ok(s)
    }

    /// A validated schedule with the warm-up given as a fraction of
    /// `total_steps` (e.g. 0.1): `warmup_steps = ceil(fraction * total_steps)`
    /// as transformers' `warmup_ratio` computes it, except that a product
    /// within 1e-9 of an integer is taken as that integer (0.1 * 30 = 3, not 4).
    pub fn with_warmup_fraction(
        kind: ScheduleKind,
        warmup_fraction: f64,
        total_steps: u64,
        min_lr_ratio: f64,
    ) -> Result<Self> {
        if !(0.0..=1.0).contains(&warmup_fraction) {
            bail!("warm-up fraction must be in [0, 1], got {warmup_fraction}");
        }
        let x = warmup_fraction * total_steps as f64;
        let warmup = if (x - x.round()).abs() < 1e-9 {
            x.round()
        } else {
            x.ceil()
        };
        Self::new(kind, warmup as u64, total_steps, min_lr_ratio)
    }

    /// Parses a schedule kind name (`constant`, `linear`, `cosine`); the same
    /// as [`ScheduleKind::parse`]. Combine with [`Schedule::new`] or
    /// [`Schedule::with_warmup_fraction`].
    pub fn parse(kind: &str) -> Result<ScheduleKind> {
        ScheduleKind::parse(kind)
    }

    pub fn validate(&self) -> Result<()> {
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            bail!("min_lr_ratio must be in [0, 1], got {}", self.min_lr_ratio);
        }
        if self.kind != ScheduleKind::Constant {
            if self.total_steps == 0 {
                bail!("a {} schedule needs total_steps > 0", self.kind);
            }
            if self.warmup_steps > self.total_steps {
                bail!(
                    "warm-up ({} steps) is longer than the whole {} schedule ({} steps)",
                    self.warmup_steps,
                    self.kind,
                    self.total_steps
                );
            }
        }
        Ok(())
    }

    /// The multiplier of every group's base learning rate at optimizer step
    /// `step` (0-based: the first step uses `factor(0)`, which is 0 during a
    /// warm-up, as with transformers' schedules under `LambdaLR`).
    pub fn factor(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return step as f64 / self.warmup_steps.max(1) as f64;
        }
        let min = self.min_lr_ratio;
        match self.kind {
            ScheduleKind::Constant => 1.0,
            ScheduleKind::Linear => {
                let left = self.total_steps.saturating_sub(step) as f64;
                let span = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
                let f = (left / span).max(0.0);
                (f * (1.0 - min) + min).max(0.0)
            }
            ScheduleKind::Cosine => {
                let done = (step - self.warmup_steps) as f64;
                let span = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
                // Held at the end: transformers' cosine would rise again past total_steps.
                let progress = (done / span).min(1.0);
                let num_cycles = 0.5;
                let f = 0.5 * (1.0 + (std::f64::consts::PI * num_cycles * 2.0 * progress).cos());
                (f * (1.0 - min) + min).max(0.0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EPS: f64 = 1e-12;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < EPS
    }

    #[test]
    fn constant_schedule_with_warmup() {
        let s = Schedule::new(ScheduleKind::Constant, 4, 0, 0.0).unwrap();
        assert_eq!(s.factor(0), 0.0);
        assert!(close(s.factor(1), 0.25));
        assert!(close(s.factor(3), 0.75));
        assert_eq!(s.factor(4), 1.0);
        assert_eq!(s.factor(1000), 1.0);
        assert_eq!(Schedule::constant().factor(0), 1.0);
    }

    #[test]
    fn linear_schedule() {
        let s = Schedule::new(ScheduleKind::Linear, 2, 10, 0.2).unwrap();
        assert_eq!(s.factor(0), 0.0);
        assert!(close(s.factor(1), 0.5));
        assert!(close(s.factor(2), 1.0));
        // (10 - 6) / 8 = 0.5 -> 0.2 + 0.8 * 0.5
        assert!(close(s.factor(6), 0.6));
        assert!(close(s.factor(10), 0.2));
        assert!(close(s.factor(50), 0.2));
        let s0 = Schedule::new(ScheduleKind::Linear, 0, 4, 0.0).unwrap();
        assert_eq!(s0.factor(0), 1.0);
        assert!(close(s0.factor(1), 0.75));
        assert_eq!(s0.factor(4), 0.0);
    }

    #[test]
    fn cosine_schedule() {
        let s = Schedule::new(ScheduleKind::Cosine, 10, 110, 0.1).unwrap();
        assert_eq!(s.factor(0), 0.0);
        assert!(close(s.factor(5), 0.5));
        assert!(close(s.factor(9), 0.9));
        assert!(close(s.factor(10), 1.0));
        // Midpoint of the decay: (1 + min) / 2.
        assert!(close(s.factor(60), 0.55));
        // A quarter in: 0.1 + 0.9 * (1 + cos(pi/4)) / 2.
        let q = 0.1 + 0.9 * (1.0 + std::f64::consts::FRAC_1_SQRT_2) / 2.0;
        assert!(close(s.factor(35), q));
        assert!(close(s.factor(110), 0.1));
        // Held at the minimum past the end.
        assert!(close(s.factor(150), 0.1));
        assert!(close(s.factor(10_000), 0.1));
        let s0 = Schedule::new(ScheduleKind::Cosine, 0, 100, 0.0).unwrap();
        assert_eq!(s0.factor(0), 1.0);
        assert!(close(s0.factor(50), 0.5));
        assert!(s0.factor(100).abs() < EPS);
    }

    #[test]
    fn warmup_fraction_and_parse() {
        let s = Schedule::with_warmup_fraction(ScheduleKind::Cosine, 0.1, 30, 0.0).unwrap();
        assert_eq!(s.warmup_steps, 3);
        let s = Schedule::with_warmup_fraction(ScheduleKind::Cosine, 0.1, 25, 0.0).unwrap();
        assert_eq!(s.warmup_steps, 3);
        let s = Schedule::with_warmup_fraction(ScheduleKind::Linear, 0.0, 25, 0.0).unwrap();
        assert_eq!(s.warmup_steps, 0);
        assert!(Schedule::with_warmup_fraction(ScheduleKind::Linear, 1.5, 25, 0.0).is_err());
        assert!(Schedule::with_warmup_fraction(ScheduleKind::Linear, f64::NAN, 25, 0.0).is_err());

        assert_eq!(Schedule::parse("cosine").unwrap(), ScheduleKind::Cosine);
        assert_eq!(Schedule::parse(" Linear ").unwrap(), ScheduleKind::Linear);
        assert_eq!(
            "constant".parse::<ScheduleKind>().unwrap(),
            ScheduleKind::Constant
        );
        let e = Schedule::parse("cosine_restarts").unwrap_err().to_string();
        assert!(
            e.contains("cosine_restarts") && e.contains("constant, linear, cosine"),
            "{e}"
        );

        assert!(Schedule::new(ScheduleKind::Cosine, 0, 10, 1.5).is_err());
        assert!(Schedule::new(ScheduleKind::Cosine, 0, 10, f64::NAN).is_err());
        assert!(Schedule::new(ScheduleKind::Cosine, 20, 10, 0.0).is_err());
        assert!(Schedule::new(ScheduleKind::Linear, 0, 0, 0.0).is_err());
        assert!(Schedule::new(ScheduleKind::Constant, 5, 0, 0.0).is_ok());
    }
}
