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

/// A port for a job this test starts by hand, free now: below the kernel's
/// ephemeral range (no connection takes it as its source port, no launcher's
/// bind to port 0 gets it) and a new one on every call in this binary.
fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let base = 20_000 + (std::process::id() % 1000) as u16 * 10;
    loop {
        let p = base + NEXT.fetch_add(1, Ordering::Relaxed);
        if std::net::TcpListener::bind(("127.0.0.1", p)).is_ok() {
            return p;
        }
    }
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
    // Checkpoints are named by optimizer steps: `epochs` of them per loop step.
    let epochs: usize = sets
        .iter()
        .find(|s| s.0 == "epochs")
        .map_or(1, |s| s.1.parse().unwrap());
    // Float noise in the sums (ranks reduce in another order) is ~1e-8 after
    // step 1; AdamW's normalised update can lift an entry whose gradient is
    // that noise to a step's size. Measured: TARPO 1.3e-5, GRPO 3.3e-6, AAPO
    // 4.4e-6, against weights that move ~2e-2 (checked below).
    let mut worst = 0.0f64;
    for step in (1..=3).map(|s| s * epochs) {
        let d = max_weight_diff(&checkpoint(&one_dir, step), &checkpoint(&two_dir, step));
        assert!(
            d <= 2e-5,
            "{name}: LoRA/router weights differ by {d} after step {step}"
        );
        worst = worst.max(d);
    }
    // The weights moved far more than the two runs differ.
    let moved = max_weight_diff(
        &checkpoint(&one_dir, epochs),
        &checkpoint(&one_dir, 3 * epochs),
    );
    assert!(
        moved > 1e3 * worst.max(1e-9),
        "{name}: moved {moved}, runs differ by {worst}"
    );
    eprintln!(
        "{name}: 1 vs 2 processes differ by at most {worst:.2e}; steps 1 -> 3 moved {moved:.2e}"
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

#[test]
fn aapo_with_ppo_epochs_and_held_out_evaluation_on_two_processes_matches_one() {
    same_job_on_one_and_two(
        "dp-aapo",
        &[
            ("method", "tarpo"),
            ("estimator", "aapo"),
            ("epochs", "2"),
            ("clip_low", "0.2"),
            ("eval_every", "2"),
        ],
        nproc,
    );
    let rows = metrics(&common::scratch("dp-aapo").join("two"));
    assert!(
        rows[1].contains_key("eval_pass1") && rows[1].contains_key("ref_reward"),
        "{:?}",
        rows[1]
    );
}

#[test]
fn a_job_the_ranks_cannot_share_exactly_is_refused_before_it_starts() {
    let out = common::empty_scratch("dp-refused");
    for (sets, needle) in [
        (
            vec![("accumulation", "1")],
            "accumulation (1) must be a multiple of the world size (2)",
        ),
        (vec![("dynamic", "true")], "dynamic sampling"),
    ] {
        let mut cmd = nproc(2);
        cmd.arg(common::root().join("tests/scripts/data_parallel.rhai"))
            .args(["--set", &format!("data={}", data().display())])
            .args(["--set", &format!("run={}", out.join("r").display())])
            .args(["--set", "method=grpo", "--set", "steps=1"]);
        for (k, v) in sets {
            cmd.args(["--set", &format!("{k}={v}")]);
        }
        let o = cmd.output().unwrap();
        assert!(!o.status.success());
        let err = text(&o.stderr);
        assert!(err.contains(needle), "{needle}: {err}");
        assert!(!out.join("r/metrics.jsonl").exists(), "a step ran");
    }
}

/// One rank of a job started by hand (as a launcher would), on `port`.
fn rank(rank: usize, size: &str, port: u16, script: &[&str]) -> Command {
    let mut c = common::tarpo();
    c.args(["--threads", "1", "run"])
        .args(script)
        .env("RANK", rank.to_string())
        .env("LOCAL_RANK", rank.to_string())
        .env("WORLD_SIZE", size)
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

#[test]
fn a_killed_rank_stops_the_other_within_the_timeout_and_the_job_resumes_exactly() {
    let out = common::empty_scratch("dp-kill");
    let (straight, killed) = (out.join("straight"), out.join("killed"));
    let sets = [("method", "tarpo"), ("steps", "6"), ("every", "2")];
    job(&mut nproc(2), &straight, &sets);

    let script = common::root().join("tests/scripts/data_parallel.rhai");
    let mut args: Vec<String> = vec![script.display().to_string()];
    let all = [
        ("data", data().display().to_string()),
        ("run", killed.display().to_string()),
        ("method", "tarpo".into()),
        ("steps", "6".into()),
        ("every", "2".into()),
    ];
    for (k, v) in &all {
        args.extend(["--set".into(), format!("{k}={v}")]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let port = free_port();
    let timeout = 20.0;
    let spawn = |r| {
        rank(r, "2", port, &args)
            .env("TARPO_DIST_TIMEOUT", timeout.to_string())
            .spawn()
            .unwrap()
    };
    let (mut r0, mut r1) = (spawn(0), spawn(1));
    // Into step 3: the checkpoint of step 2 is complete, then rank 1 dies.
    let t = Instant::now();
    while !checkpoint(&killed, 2).join("state.json").exists() {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "no checkpoint of step 2"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    r1.kill().unwrap();
    let killed_at = Instant::now();
    r1.wait().unwrap();
    let status = loop {
        if let Some(s) = r0.try_wait().unwrap() {
            break s;
        }
        assert!(
            killed_at.elapsed().as_secs_f64() < timeout + 10.0,
            "rank 0 still running after the collective timeout"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let waited = killed_at.elapsed().as_secs_f64();
    let err = text(&r0.wait_with_output().unwrap().stderr);
    assert!(!status.success(), "rank 0 succeeded without its peer");
    assert!(
        err.contains("failed on rank 0 of 2") && err.contains("TARPO_DIST_TIMEOUT"),
        "{err}"
    );
    assert!(waited < timeout + 5.0, "rank 0 took {waited} s");
    eprintln!("rank 0 stopped {waited:.1} s after its peer was killed");
    assert!(
        !checkpoint(&killed, 6).exists(),
        "the job finished before the kill"
    );

    // Both ranks resume from the last checkpoint and end as the straight job.
    job(
        &mut nproc(2),
        &killed,
        &[
            ("method", "tarpo"),
            ("steps", "6"),
            ("every", "2"),
            ("resume", "true"),
        ],
    );
    let d = max_weight_diff(&checkpoint(&straight, 6), &checkpoint(&killed, 6));
    assert_eq!(
        d, 0.0,
        "resumed weights differ from the straight job's by {d}"
    );
    assert_metrics_match(&straight, &killed, 0.0);
}

/// `tarpo run -e CODE` as ranks of a job described by `env`; every rank's
/// output once all have exited, and how long the slowest took.
fn launch(ranks: &[(usize, &str)], extra: &[(&str, &str)]) -> (Vec<Output>, f64) {
    let port = free_port();
    let t = Instant::now();
    let kids: Vec<_> = ranks
        .iter()
        .map(|&(r, size)| {
            let mut c = rank(r, size, port, &["-e", "world()"]);
            c.env("TARPO_DIST_INIT_TIMEOUT", "2");
            for (k, v) in extra {
                c.env(k, v);
            }
            c.spawn().unwrap()
        })
        .collect();
    let outs = kids
        .into_iter()
        .map(|k| k.wait_with_output().unwrap())
        .collect();
    (outs, t.elapsed().as_secs_f64())
}

fn refused(outs: &[Output], needle: &str) {
    for o in outs {
        let err = text(&o.stderr);
        assert!(!o.status.success(), "a rank succeeded: {}", text(&o.stdout));
        assert!(err.contains(needle), "wanted {needle:?} in:\n{err}");
    }
}

#[test]
fn a_wrong_launch_fails_within_seconds_naming_the_variable() {
    // Two processes of a job that says three.
    let (outs, secs) = launch(&[(0, "3"), (1, "3")], &[]);
    refused(&outs, "WORLD_SIZE=3");
    eprintln!("WORLD_SIZE=3 with 2 processes: refused in {secs:.1} s");
    assert!(secs < 10.0, "{secs} s");
    // Two processes that disagree.
    let (outs, secs) = launch(&[(0, "2"), (1, "3")], &[]);
    assert!(outs
        .iter()
        .any(|o| text(&o.stderr).contains("disagree on WORLD_SIZE")));
    refused(&outs, "WORLD_SIZE");
    assert!(secs < 10.0, "{secs} s");
    // A rendezvous address nobody answers (unroutable), and one that does not resolve.
    for addr in ["10.255.255.1", "no-such-host.invalid"] {
        let (outs, secs) = launch(&[(1, "2")], &[("MASTER_ADDR", addr)]);
        refused(&outs, &format!("MASTER_ADDR={addr}"));
        eprintln!("MASTER_ADDR={addr}: refused in {secs:.1} s");
        assert!(secs < 10.0, "{addr}: {secs} s");
    }
    let (outs, _) = launch(&[(2, "2")], &[]);
    refused(&outs, "RANK=2 is not below WORLD_SIZE=2");
    let (outs, _) = launch(&[(0, "two")], &[]);
    refused(&outs, "WORLD_SIZE=\"two\" is not a process count");
    let (outs, _) = launch(&[(0, "2")], &[("MASTER_PORT", "")]);
    refused(&outs, "MASTER_PORT is not set");
    // A stale socket variable of `tarpo run --nproc` (stdin is no socket).
    let (outs, _) = launch(&[(0, "2")], &[("TARPO_STORE_FD", "0")]);
    refused(
        &outs,
        "TARPO_STORE_FD=0 is not a socket bound to MASTER_PORT=",
    );
    // The backend: NCCL needs this rank's GPU (none here), and the name is checked.
    let (outs, _) = launch(&[(0, "1")], &[("TARPO_DIST_BACKEND", "nccl")]);
    refused(&outs, "TARPO_DIST_BACKEND=nccl: no CUDA device 0");
    let (outs, _) = launch(&[(0, "1")], &[("TARPO_DIST_BACKEND", "mpi")]);
    refused(
        &outs,
        "TARPO_DIST_BACKEND=\"mpi\" is not gloo, nccl or auto",
    );
}

#[test]
fn outside_a_launch_the_world_is_one_process_and_collectives_say_so() {
    let run = |code: &str| common::tarpo().args(["run", "-e", code]).output().unwrap();
    let o = run("world()");
    assert_eq!(
        text(&o.stdout).trim(),
        "#{\"local_rank\": 0, \"rank\": 0, \"size\": 1}"
    );
    for code in ["all_reduce(1.0, \"sum\")", "all_gather(1)", "barrier()"] {
        let o = run(code);
        assert!(!o.status.success());
        assert!(
            text(&o.stderr).contains("not part of a distributed launch"),
            "{code}: {}",
            text(&o.stderr)
        );
    }
    let o = common::tarpo()
        .arg("repl")
        .env("WORLD_SIZE", "2")
        .env("RANK", "0")
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        text(&o.stderr).contains("the REPL is single-process"),
        "{}",
        text(&o.stderr)
    );
    // A job of two: reductions and gathers see both ranks.
    let o = common::tarpo()
        .args(["run", "--nproc", "2", "-e"])
        .arg("let w = world(); [all_reduce(w.rank + 1.0, \"sum\"), all_reduce([w.rank, 5], \"max\"), all_gather(#{r: w.rank, s: `x${w.rank}`})]")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(
        text(&o.stdout).trim(),
        "[3.0, [1.0, 5.0], [#{\"r\": 0, \"s\": \"x0\"}, #{\"r\": 1, \"s\": \"x1\"}]]"
    );
}
