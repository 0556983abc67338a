//! Faults a run meets besides being killed (tests/scripts/crash.rhai on a
//! tiny model): non-finite steps injected through `TARPO_FAULTS` are
//! skipped, counted and reported, and too many in a row stop the run with
//! its last checkpoint intact; a full disk or a read-only run directory
//! fails with a clear error and the previous checkpoint stays valid (a
//! size-limited tmpfs in a private mount namespace, `unshare -m`).
mod common;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

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

fn rows(run: &Path) -> Vec<serde_json::Map<String, Value>> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| match serde_json::from_str(l).unwrap() {
            Value::Object(m) => m,
            v => panic!("not a row: {v}"),
        })
        .collect()
}

fn ckpt(run: &Path, n: u32) -> PathBuf {
    run.join("checkpoints").join(format!("step-{n:06}"))
}

fn scratch(name: &str) -> (PathBuf, PathBuf) {
    let dir = common::empty_scratch(name);
    let data = dir.join("data.jsonl");
    common::write_prompts(&data, 16, 7);
    (dir, data)
}

#[test]
fn nonfinite_steps_are_skipped_counted_and_reported() {
    let (dir, data) = scratch("faults-nan");
    let run = dir.join("run");
    // Step 2's first loss chunk is NaN (so are all its gradients); step 4's
    // router bias gradient is NaN.
    let o = command(&run, &data, 5)
        .env("TARPO_FAULTS", "nan@loss:3,nan@grad.router_bias:4")
        .output()
        .unwrap();
    let err = text(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("warning: optimizer step 2 skipped: non-finite loss, gradients of lora, router_weight, router_bias (1 in a row)"),
        "{err}"
    );
    assert!(
        err.contains(
            "warning: optimizer step 4 skipped: non-finite gradients of router_bias (1 in a row)"
        ),
        "{err}"
    );
    let rows = rows(&run);
    let col = |k: &str| -> Vec<Value> {
        rows.iter()
            .map(|r| r.get(k).cloned().unwrap_or(Value::Null))
            .collect()
    };
    assert_eq!(col("step"), [1, 2, 3, 4, 5].map(Value::from));
    assert_eq!(
        col("skipped"),
        [false, true, false, true, false].map(Value::from)
    );
    assert_eq!(col("opt_step"), [1, 1, 2, 2, 3].map(Value::from));
    assert_eq!(
        col("nonfinite"),
        [
            Value::Null,
            "loss, gradients of lora, router_weight, router_bias".into(),
            Value::Null,
            "gradients of router_bias".into(),
            Value::Null
        ]
    );
    // A skipped step changes nothing: its checkpoint's weights and moments
    // are the step before's; an applied one changes them.
    let same = |a: u32, b: u32, f: &str| {
        std::fs::read(ckpt(&run, a).join(f)).unwrap()
            == std::fs::read(ckpt(&run, b).join(f)).unwrap()
    };
    for f in ["adapter/adapter_model.safetensors", "router.safetensors"] {
        assert!(
            same(1, 2, f) && same(3, 4, f),
            "{f} changed in a skipped step"
        );
        assert!(!same(2, 3, f), "{f} did not change in an applied step");
    }
    // The skip counters are part of the optimizer's state: the checkpoint of
    // step 5 says 3 applied steps.
    let state: Value =
        serde_json::from_str(&std::fs::read_to_string(ckpt(&run, 5).join("state.json")).unwrap())
            .unwrap();
    assert_eq!(
        (state["step"].as_u64(), state["run_step"].as_u64()),
        (Some(3), Some(5))
    );
}

#[test]
fn too_many_nonfinite_steps_in_a_row_stop_the_run_with_its_checkpoint_intact() {
    let (dir, data) = scratch("faults-nan-stop");
    let run = dir.join("run");
    let o = command(&run, &data, 6)
        .env(
            "TARPO_FAULTS",
            "nan@grad.lora:2,nan@grad.lora:3,nan@grad.lora:4",
        )
        .output()
        .unwrap();
    let err = text(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("3 optimizer steps in a row were non-finite (last: gradients of lora;")
            && err.contains("resume from the last checkpoint"),
        "{err}"
    );
    assert_eq!(
        rows(&run).len(),
        3,
        "steps 1-3 logged, the run stopped in step 4"
    );
    assert!(ckpt(&run, 3).exists() && !ckpt(&run, 4).exists());
    // The last checkpoint is whole: the run resumes from it and finishes.
    let o = command(&run, &data, 6).output().unwrap();
    let err = text(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("step-000003 (step 3)"), "{err}");
    assert_eq!(rows(&run).len(), 6);
}

/// Runs `script` under `sh` in a private mount namespace (so its tmpfs
/// mounts vanish with it); the tarpo binary is `$T`.
fn in_namespace(script: &str) -> Output {
    let o = Command::new("unshare")
        .args(["-m", "sh", "-c", script])
        .env("T", env!("CARGO_BIN_EXE_tarpo"))
        .output()
        .expect("unshare (util-linux) runs the disk tests");
    assert!(
        !text(&o.stderr).contains("unshare failed"),
        "this test needs to mount a tmpfs (root, or CAP_SYS_ADMIN): {}",
        text(&o.stderr)
    );
    o
}

/// Bytes a run directory takes on a tmpfs (each file whole 4 KiB pages).
fn pages(dir: &Path) -> u64 {
    let mut n = 0;
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        n += if p.is_dir() {
            pages(&p)
        } else {
            p.metadata().unwrap().len().div_ceil(4096) * 4096
        };
    }
    n
}

/// The command line of `command` for a shell script.
fn shell_line(run: &Path, data: &Path, steps: u32) -> String {
    let c = command(run, data, steps);
    let args: Vec<String> = c
        .get_args()
        .map(|a| format!("'{}'", a.to_string_lossy()))
        .collect();
    format!("\"$T\" {}", args.join(" "))
}

#[test]
fn a_full_disk_or_a_read_only_run_directory_fails_cleanly_and_keeps_the_checkpoint() {
    let (dir, data) = scratch("faults-disk");
    // How much a run of one step and of three takes, measured on disk.
    let (one, three) = (dir.join("one").join("run"), dir.join("three").join("run"));
    for (run, steps) in [(&one, 1), (&three, 3)] {
        let o = command(run, &data, steps).output().unwrap();
        assert!(o.status.success(), "{}", text(&o.stderr));
    }
    let (a, b) = (pages(&one), pages(&three));
    // Room for step 1 and part of step 2: the disk fills during step 2.
    let size = a + (b - a) / 4;
    let mnt = dir.join("mnt");
    let out = dir.join("out");
    std::fs::create_dir_all(&mnt).unwrap();
    let run = mnt.join("run");
    let line = |steps| shell_line(&run, &data, steps);
    let script = format!(
        "mount -t tmpfs -o size={size} tarpo-test {mnt} || {{ echo 'unshare failed' >&2; exit 99; }}
         {full} 2>{out}/full.err; echo \"full: $?\"
         find {mnt} -name '*.tmp*' | sed 's/^/left: /'
         mount -o remount,size=64m {mnt} && {again} 2>{out}/again.err; echo \"again: $?\"
         mount -o remount,ro {mnt} && {ro} 2>{out}/ro.err; echo \"ro: $?\"
         mount -o remount,rw {mnt} && {rw} 2>{out}/rw.err; echo \"rw: $?\"
         cp -a {run} {out}/run",
        mnt = mnt.display(),
        out = out.display(),
        run = run.display(),
        full = line(3),
        again = line(3),
        ro = line(4),
        rw = line(4),
    );
    std::fs::create_dir_all(&out).unwrap();
    let o = in_namespace(&script);
    let (so, se) = (text(&o.stdout), text(&o.stderr));
    let read = |f: &str| std::fs::read_to_string(out.join(f)).unwrap_or_default();
    let report = format!(
        "stdout:\n{so}\nstderr:\n{se}\nfull.err:\n{}\nro.err:\n{}",
        read("full.err"),
        read("ro.err")
    );
    // A full disk: a clear error naming a file of the run, nothing half-written left.
    assert!(so.contains("full: 1"), "{report}");
    let full = read("full.err");
    assert!(
        full.contains("No space left on device") && full.contains(&run.display().to_string()),
        "{report}"
    );
    assert!(
        !so.contains("left: "),
        "temporary files left after the failure: {report}"
    );
    // The previous checkpoint is valid: the run resumes from it and finishes.
    assert!(
        so.contains("again: 0"),
        "{report}\nagain.err:\n{}",
        read("again.err")
    );
    assert!(
        read("again.err").contains("(step 1)"),
        "{}",
        read("again.err")
    );
    // Read-only: a clear error naming a file of the run.
    assert!(so.contains("ro: 1"), "{report}");
    let ro = read("ro.err");
    assert!(
        ro.contains("Read-only file system") && ro.contains(&run.display().to_string()),
        "{report}"
    );
    // Writable again, the run continues from its last checkpoint to step 4.
    assert!(
        so.contains("rw: 0"),
        "{report}\nrw.err:\n{}",
        read("rw.err")
    );
    assert!(read("rw.err").contains("(step 3)"), "{}", read("rw.err"));
    let done = out.join("run");
    let steps: Vec<u64> = rows(&done)
        .iter()
        .map(|r| r["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, [1, 2, 3, 4]);
    let want = rows(&three);
    let strip = |mut r: serde_json::Map<String, Value>| {
        r.remove("time_s");
        r
    };
    let got: Vec<_> = rows(&done).into_iter().take(3).map(strip).collect();
    let want: Vec<_> = want.into_iter().map(strip).collect();
    assert_eq!(
        got, want,
        "the first three steps equal the undisturbed run's"
    );
}
