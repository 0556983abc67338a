//! Scaling of one data-parallel training step from 1 to 2 processes.
//!
//! The job of tests/scripts/data_parallel.rhai on SmolLM2-135M-Instruct
//! (LoRA r 32 / alpha 64, GRPO, 4 prompts per step in 2 chunks, a group of 4,
//! up to 32 new tokens, CPU f32): the same step, and the same weights, on
//!   - 1 process with 1 thread,
//!   - 1 process with 2 threads,
//!   - 2 processes with 1 thread each (`tarpo run --nproc 2`, Gloo on loopback),
//!
//! the three alternating round by round (the order rotates). A run's step
//! time is the median of its logged `time_s` after the first (warm-up) step.
//! Prints every run, the medians, the ratios against both one-process
//! sides, and the bytes each rank all-reduces per step.
//!
//! Run: `cargo bench --bench data_parallel` with the env of ./dev.sh.
//! Env: TARPO_BENCH_RUNS (rounds, default 3), TARPO_BENCH_STEPS (default 4),
//!      TARPO_BENCH_MAX_NEW (default 32).
mod common;
use anyhow::{bail, Context, Result};
use common::{env_or, median};
use std::path::Path;
use std::process::Command;

struct Side {
    name: &'static str,
    procs: usize,
    threads: usize,
    times: Vec<f64>,
    bytes: Option<u64>,
}

fn run_once(
    side: &Side,
    model: &Path,
    run: &Path,
    steps: usize,
    max_new: usize,
) -> Result<(f64, u64)> {
    let _ = std::fs::remove_dir_all(run);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tarpo"));
    cmd.args(["--threads", &side.threads.to_string(), "run"]);
    if side.procs > 1 {
        cmd.args(["--nproc", &side.procs.to_string()]);
    }
    cmd.arg(root.join("tests/scripts/data_parallel.rhai"));
    for (k, v) in [
        ("model", model.display().to_string()),
        (
            "data",
            root.join("datasets/arith_train.jsonl")
                .display()
                .to_string(),
        ),
        ("run", run.display().to_string()),
        ("lora", "32".into()),
        ("method", "grpo".into()),
        ("steps", steps.to_string()),
        ("every", "0".into()),
        ("max_new", max_new.to_string()),
    ] {
        cmd.args(["--set", &format!("{k}={v}")]);
    }
    let out = cmd.output().context("start tarpo")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "{}: {}\n{}",
            side.name,
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let bytes = stdout
        .lines()
        .find_map(|l| l.strip_prefix("bytes all-reduced per step: "))
        .context("no bytes line")?
        .trim()
        .parse()?;
    let text = std::fs::read_to_string(run.join("metrics.jsonl"))?;
    let times: Vec<f64> = text
        .lines()
        .skip(1)
        .map(|l| -> Result<f64> {
            let v: serde_json::Value = serde_json::from_str(l)?;
            v["time_s"].as_f64().context("no time_s")
        })
        .collect::<Result<_>>()?;
    Ok((median(&times), bytes))
}

fn main() -> Result<()> {
    let model = common::smollm2_dir()?;
    let (rounds, steps, max_new) = (
        env_or("TARPO_BENCH_RUNS", 3),
        env_or("TARPO_BENCH_STEPS", 4).max(2),
        env_or("TARPO_BENCH_MAX_NEW", 32),
    );
    let mut sides = [
        Side {
            name: "1 process, 1 thread",
            procs: 1,
            threads: 1,
            times: vec![],
            bytes: None,
        },
        Side {
            name: "1 process, 2 threads",
            procs: 1,
            threads: 2,
            times: vec![],
            bytes: None,
        },
        Side {
            name: "2 processes, 1 thread each",
            procs: 2,
            threads: 1,
            times: vec![],
            bytes: None,
        },
    ];
    let scratch = std::env::temp_dir().join(format!("tarpo-bench-dp-{}", std::process::id()));
    for round in 0..rounds {
        for k in 0..sides.len() {
            let i = (round + k) % sides.len();
            let run = scratch.join(format!("r{round}-{i}"));
            let (t, bytes) = run_once(&sides[i], &model, &run, steps, max_new)?;
            println!("round {}: {:<28} {t:.2} s/step", round + 1, sides[i].name);
            sides[i].times.push(t);
            sides[i].bytes = Some(bytes);
        }
    }
    let _ = std::fs::remove_dir_all(&scratch);
    println!("\nSmolLM2-135M, LoRA r 32, GRPO, 4 prompts x 4 completions x {max_new} new tokens per step, {rounds} rounds of {} timed steps:", steps - 1);
    for s in &sides {
        let runs: Vec<String> = s.times.iter().map(|t| format!("{t:.2}")).collect();
        println!(
            "  {:<28} median {:.2} s/step   runs [{}]",
            s.name,
            median(&s.times),
            runs.join(", ")
        );
    }
    let m: Vec<f64> = sides.iter().map(|s| median(&s.times)).collect();
    println!("  speed-up of 2 processes: {:.2}x over 1 process / 1 thread, {:.2}x over 1 process / 2 threads", m[0] / m[2], m[1] / m[2]);
    if let Some(b) = sides[2].bytes {
        println!(
            "  all-reduced per step and rank: {b} bytes ({:.2} MiB)",
            b as f64 / (1 << 20) as f64
        );
    }
    Ok(())
}
