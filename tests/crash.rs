//! Crash safety of run directories (tests/scripts/crash.rhai on a tiny model,
//! a checkpoint every step, token records on): a run SIGKILLed at 20 seeded
//! moments (in rollouts, backward passes, optimizer updates, checkpoint and
//! metrics writes, or at a random time) and resumed each time ends
//! bit-identical to the straight run; damaged checkpoints are reported by
//! file and skipped for the one before.
mod common;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
use tarpo::analysis::frame::read_parquet;

const STEPS: u32 = 6;

/// `tarpo run tests/scripts/crash.rhai` on run directory `run`.
fn command(run: &Path, data: &Path, steps: u32) -> Command {
    let model = common::tiny_models().join("llama_mha_tied");
    let mut c = common::tarpo();
    c.arg("run")
        .arg(common::root().join("tests/scripts/crash.rhai"))
        .args(["--set", &format!("model={}", model.display())])
        .args(["--set", &format!("data={}", data.display())])
        .args(["--set", &format!("run={}", run.display())])
        .args(["--set", &format!("steps={steps}")]);
    c
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Runs to the end; panics with both streams unless it succeeds.
fn run_ok(mut c: Command) -> Output {
    let o = c.output().expect("run tarpo");
    assert!(
        o.status.success(),
        "stdout:\n{}\nstderr:\n{}",
        text(&o.stdout),
        text(&o.stderr)
    );
    o
}

/// A scratch directory with the prompts file and a straight run of `steps`.
fn straight(name: &str, steps: u32) -> (PathBuf, PathBuf) {
    let dir = common::empty_scratch(name);
    let data = dir.join("data.jsonl");
    common::write_prompts(&data, 16, 7);
    let run = dir.join("straight").join("run");
    run_ok(command(&run, &data, steps));
    (data, run)
}

/// metrics.jsonl rows without their wall-clock times.
fn rows(run: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    text.lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().remove("time_s");
            v
        })
        .collect()
}

/// The `.parquet` files of a directory, by name.
fn parquet_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".parquet"))
        .collect();
    names.sort();
    names
}

/// Files whose names say they are temporary (what a crash can leave).
fn temp_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if name.contains(".tmp") {
            out.push(p.clone());
        }
        if p.is_dir() {
            out.extend(temp_files(&p));
        }
    }
    out
}

/// Two runs with the same outcome: every checkpoint (manifests: sizes and
/// SHA-256 of every file), metrics rows, metrics.parquet and token and sample
/// records equal, and no temporary files left.
fn assert_same_run(want: &Path, got: &Path) {
    assert_eq!(rows(want), rows(got), "metrics.jsonl");
    let frame = |run: &Path| {
        read_parquet(&run.join("metrics.parquet"))
            .unwrap()
            .drop("time_s")
            .unwrap()
    };
    assert!(
        frame(want).equals_missing(&frame(got)),
        "metrics.parquet:\n{}\n!=\n{}",
        frame(want),
        frame(got)
    );
    for kind in ["tokens", "samples"] {
        let names = parquet_files(&want.join(kind));
        assert_eq!(names.len(), rows(want).len(), "{kind}/: a file per step");
        assert_eq!(names, parquet_files(&got.join(kind)), "{kind}/");
        for n in &names {
            let (a, b) = (want.join(kind).join(n), got.join(kind).join(n));
            let (a, b) = (read_parquet(&a).unwrap(), read_parquet(&b).unwrap());
            assert!(a.equals_missing(&b), "{kind}/{n} differs");
        }
    }
    let ckpts = want.join("checkpoints");
    for e in std::fs::read_dir(&ckpts).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let file = if name == "latest" {
            PathBuf::from(&name)
        } else {
            Path::new(&name).join("manifest.json")
        };
        let read = |run: &Path| std::fs::read(run.join("checkpoints").join(&file));
        assert_eq!(
            read(want).unwrap(),
            read(got).unwrap(),
            "checkpoints/{}",
            file.display()
        );
    }
    assert_eq!(
        temp_files(got),
        Vec::<PathBuf>::new(),
        "temporary files left"
    );
}

/// How one attempt is stopped: at the N-th pass of a fault point, or by the
/// test after a delay.
#[derive(Debug, Clone)]
enum Plan {
    Point(&'static str, u64),
    After(Duration),
}

/// Fault points and the passes one step makes of each here (2 chunks of 4
/// completions of 6 tokens; ~30 LoRA and router tensors; 4 checkpoint files;
/// metrics.parquet, tokens, samples and `latest` written atomically).
const POINTS: [(&str, u64); 7] = [
    ("rollout.step", 12),
    ("replay.backward", 2),
    ("optimizer.step", 30),
    ("checkpoint.file", 4),
    ("checkpoint.rename", 1),
    ("metrics.append", 1),
    ("file.rename", 4),
];

/// splitmix64: the test's own seeded choices.
struct Draw(u64);

impl Draw {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in 1..=n.
    fn upto(&mut self, n: u64) -> u64 {
        1 + self.next() % n
    }

    /// The i-th kill: every fourth after a random delay up to `window`, the
    /// others at the fault points in turn (each one several times), at a
    /// random pass within the attempt's first two steps.
    fn plan(&mut self, i: usize, window: Duration) -> Plan {
        if i % 4 == 3 {
            let ms = self.next() % window.as_millis() as u64;
            return Plan::After(Duration::from_millis(ms));
        }
        let (point, per_step) = POINTS[(i - i / 4) % POINTS.len()];
        Plan::Point(point, self.upto(2 * per_step))
    }
}

/// Runs one attempt under `plan` (None: to the end); true when it was
/// killed, false when it finished the run.
fn attempt(run: &Path, data: &Path, plan: Option<&Plan>) -> bool {
    let mut c = command(run, data, STEPS);
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    if let Some(Plan::Point(p, n)) = plan {
        c.env("TARPO_FAULTS", format!("kill@{p}:{n}"));
    }
    let mut child = c.spawn().expect("start tarpo");
    if let Some(Plan::After(d)) = plan {
        let end = Instant::now() + *d;
        while Instant::now() < end && child.try_wait().unwrap().is_none() {
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = child.kill(); // SIGKILL
    }
    let o = child.wait_with_output().unwrap();
    if o.status.signal() == Some(libc::SIGKILL) {
        return true;
    }
    assert!(
        o.status.success(),
        "{plan:?}: stdout:\n{}\nstderr:\n{}",
        text(&o.stdout),
        text(&o.stderr)
    );
    false
}

#[test]
fn a_run_killed_at_twenty_random_moments_ends_as_the_straight_run() {
    let t0 = Instant::now();
    let (data, want) = straight("crash-kill", STEPS);
    let whole = t0.elapsed();
    let killed = want
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("killed")
        .join("run");
    let mut draw = Draw(42);
    let (mut kills, mut finished, mut tried) = (0, 0, 0usize);
    let mut by_kind: std::collections::BTreeMap<String, u32> = Default::default();
    while kills < 20 {
        tried += 1;
        assert!(tried < 200, "{kills} kills in {tried} attempts");
        let plan = draw.plan(tried - 1, whole / 2);
        if attempt(&killed, &data, Some(&plan)) {
            kills += 1;
            let kind = match &plan {
                Plan::Point(p, _) => p.to_string(),
                Plan::After(_) => "timer".to_string(),
            };
            *by_kind.entry(kind).or_default() += 1;
        } else {
            // The run finished between kills: it must equal the straight
            // one; then it starts over, to be killed again.
            assert_same_run(&want, &killed);
            finished += 1;
            std::fs::remove_dir_all(&killed).unwrap();
        }
    }
    attempt(&killed, &data, None);
    assert_same_run(&want, &killed);
    println!(
        "kills survived: {kills} of {kills} ({by_kind:?}); attempts {tried}, runs finished between kills {finished}, \
         straight run {:.1} s, all {:.1} s",
        whole.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
}

/// Copies a directory tree.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let (src, dst) = (e.path(), to.join(e.file_name()));
        if src.is_dir() {
            copy_dir(&src, &dst);
        } else {
            std::fs::copy(&src, &dst).unwrap();
        }
    }
}

#[test]
fn damaged_checkpoints_are_reported_and_skipped() {
    let (data, three) = straight("crash-damaged", 3);
    let base = three.parent().unwrap().parent().unwrap().to_path_buf();
    let four = base.join("four").join("run");
    run_ok(command(&four, &data, 4));
    let step = |run: &Path, n: u32| run.join("checkpoints").join(format!("step-{n:06}"));
    // (what, the message wanted, the damage done to the file)
    type Case = (&'static str, &'static str, fn(&Path));
    let cases: [Case; 3] = [
        ("truncated", "optimizer.safetensors: ", |p| {
            let b = std::fs::read(p).unwrap();
            std::fs::write(p, &b[..b.len() / 2]).unwrap();
        }),
        ("bit-flipped", "checksum differs from the manifest", |p| {
            let mut b = std::fs::read(p).unwrap();
            let i = b.len() - 5;
            b[i] ^= 0x10;
            std::fs::write(p, b).unwrap();
        }),
        ("missing", "missing (listed in manifest.json)", |p| {
            std::fs::remove_file(p).unwrap();
        }),
    ];
    let files = [
        "optimizer.safetensors",
        "adapter/adapter_model.safetensors",
        "router.safetensors",
    ];
    for ((case, why, damage), file) in cases.iter().zip(files) {
        let run = base.join(case).join("run");
        copy_dir(&three, &run);
        damage(&step(&run, 3).join(file));
        let o = run_ok(command(&run, &data, 4));
        let err = text(&o.stderr);
        assert!(
            err.contains("warning: skipped a damaged checkpoint: ")
                && err.contains(&format!("step-000003/{file}"))
                && err.contains(why),
            "{case}: {err}"
        );
        if *case == "truncated" {
            assert!(err.contains("bytes, the manifest says"), "{err}");
        }
        assert!(err.contains("step-000002 (step 2)"), "{case}: {err}");
        // Resumed from step 2, the run redid steps 3 and 4 exactly.
        assert_same_run(&four, &run);
    }
    // No intact checkpoint at all: a clear error, and the run left as it was.
    let run = base.join("all").join("run");
    copy_dir(&three, &run);
    for n in 1..=3 {
        std::fs::remove_file(step(&run, n).join("state.json")).unwrap();
    }
    let before = std::fs::read(run.join("metrics.jsonl")).unwrap();
    let o = command(&run, &data, 4).output().unwrap();
    let err = text(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(err.contains("no intact checkpoint in"), "{err}");
    for n in 1..=3 {
        assert!(err.contains(&format!("step-00000{n}/state.json")), "{err}");
    }
    assert_eq!(std::fs::read(run.join("metrics.jsonl")).unwrap(), before);
}
