//! The scripting layer from the outside: `tarpo run` on Rhai scripts that call
//! every primitive and train with the stdlib, and the errors users see.
mod common;
use std::path::{Path, PathBuf};
use std::process::Output;

fn run(args: &[&str]) -> Output {
    common::tarpo()
        .arg("run")
        .args(args)
        .output()
        .expect("run tarpo")
}

/// `tarpo run tests/scripts/NAME --set model=<tiny model> --set KEY=VALUE...`
fn run_script(name: &str, sets: &[(&str, String)]) -> Output {
    let mut cmd = common::tarpo();
    cmd.arg("run")
        .arg(common::root().join("tests/scripts").join(name))
        .args(["--set", &format!("model={}", tiny())]);
    for (k, v) in sets {
        cmd.args(["--set", &format!("{k}={v}")]);
    }
    cmd.output().expect("run tarpo")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).to_string()
}

fn tiny() -> String {
    common::tiny_models()
        .join("llama_mha_tied")
        .display()
        .to_string()
}

fn png_size(path: &Path) -> (u32, u32) {
    let b = std::fs::read(path).unwrap_or_else(|_| panic!("{} missing", path.display()));
    assert_eq!(
        &b[..8],
        b"\x89PNG\r\n\x1a\n",
        "{} is not a PNG",
        path.display()
    );
    let be = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    (be(16), be(20))
}

#[test]
fn every_primitive_from_a_script() {
    let out = common::empty_scratch("script-primitives");
    let data = out.join("data.jsonl");
    let rows: String = ["a 1", "b 2", "c 3", "d 4", "e 5", "f 6"]
        .iter()
        .enumerate()
        .map(|(i, p)| format!("{{\"prompt\": \"{p}\", \"answer\": \"{}\"}}\n", i + 1))
        .collect();
    std::fs::write(&data, rows).unwrap();
    let o = run_script(
        "primitives.rhai",
        &[
            ("data", data.display().to_string()),
            ("out", out.display().to_string()),
        ],
    );
    let (so, se) = (text(&o.stdout), text(&o.stderr));
    assert!(
        o.status.success() && so.contains("primitives: ok"),
        "stdout:\n{so}\nstderr:\n{se}"
    );
    // help("rollout_group") printed the options with their defaults.
    assert!(so.contains("temperature") && so.contains("0.5"), "{so}");
    // The run directory and the files the script wrote are real.
    let run = out.join("run");
    let lines = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 2);
    assert!(run.join("metrics.parquet").exists() && run.join("config.json").exists());
    assert!(
        so.contains("loss 0.9877") && !so.contains("loss 0.1235"),
        "a run prints each logged row unless made with quiet: true:\n{so}"
    );
    assert!(run.join("tokens/step-000001.parquet").exists());
    for chart in [
        "soft_ratio.png",
        "p_soft.png",
        "by_position.png",
        "length.png",
    ] {
        let (w, h) = png_size(&out.join(chart));
        assert!(w >= 400 && h >= 300, "{chart}: {w}x{h}");
    }
    assert!(out.join("adapter/adapter_config.json").exists());
    assert!(out.join("adapter/adapter_model.safetensors").exists());
    // One highlighted span per soft token of the rollout (the frame counts them).
    let page = std::fs::read_to_string(out.join("soft.html")).unwrap();
    let soft_spans = page.matches("<span class=\"soft\"").count();
    let soft_line = so.lines().find(|l| l.starts_with("soft tokens ")).unwrap();
    assert_eq!(soft_line, format!("soft tokens {soft_spans}"), "{page}");
    assert_eq!(page.matches("<h3>").count(), 8);
    let csv = std::fs::read_to_string(out.join("head.csv")).unwrap();
    assert_eq!(csv.lines().count(), 4, "{csv}"); // header + 3 rows
    assert!(
        csv.starts_with("run,step,prompt_id,sample_id,position,token_id,token,token_class,mode"),
        "{csv}"
    );
}

fn train_toy(method: &str) -> (f64, f64) {
    let out = common::empty_scratch(&format!("script-train-{method}"));
    let (data, held) = (out.join("train.jsonl"), out.join("held.jsonl"));
    common::write_prompts(&data, 64, 1);
    common::write_prompts(&held, 16, 999);
    let o = run_script(
        "train_toy.rhai",
        &[
            ("data", data.display().to_string()),
            ("held", held.display().to_string()),
            ("out", out.display().to_string()),
            ("method", method.to_string()),
        ],
    );
    let (so, se) = (text(&o.stdout), text(&o.stderr));
    assert!(o.status.success(), "stdout:\n{so}\nstderr:\n{se}");
    // One summary line per step.
    assert_eq!(
        so.lines().filter(|l| l.starts_with("step ")).count(),
        25,
        "{so}"
    );
    let line = so
        .lines()
        .find(|l| l.starts_with("held-out reward"))
        .unwrap();
    let nums: Vec<f64> = line
        .trim_start_matches("held-out reward ")
        .split(" -> ")
        .map(|x| x.trim().parse().unwrap())
        .collect();
    let metrics = std::fs::read_to_string(out.join(method).join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 25);
    eprintln!("{method}: {line}");
    (nums[0], nums[1])
}

#[test]
fn stdlib_tarpo_and_grpo_train_a_tiny_model_from_a_script() {
    for method in ["tarpo", "grpo"] {
        let (before, after) = train_toy(method);
        assert!(
            after > before + 0.1 && after > 2.0 * before,
            "{method}: held-out reward {before:.3} -> {after:.3}"
        );
    }
}

#[test]
fn misspelled_option_fails_with_the_valid_keys() {
    let o = run(&[
        "-e",
        "let a = 1;\ncompute_advantages([1.0, 0.0], #{group: 2, estimatr: \"grpo\"})",
    ]);
    let e = text(&o.stderr);
    assert!(!o.status.success());
    assert!(
        e.contains("<-e>:2:1: compute_advantages: unknown option `estimatr` (did you mean `estimator`?); valid options: estimator, group"),
        "{e}"
    );
    // The same inside a stdlib method, with the call chain.
    let o = run(&[
        "-e",
        "import \"tarpo\" as t;\nt::train((), (), #{stepz: 3})",
    ]);
    let e = text(&o.stderr);
    assert!(
        e.contains("tarpo.train: unknown option `stepz` (did you mean `steps`?)"),
        "{e}"
    );
    assert!(e.contains("valid options: ") && e.contains("steps"), "{e}");
    assert!(e.contains("in train(), called at <-e>:2"), "{e}");
}

#[test]
fn script_errors_name_file_line_and_column() {
    let dir = common::scratch("script-errors");
    let f: PathBuf = dir.join("bad.rhai");
    std::fs::write(&f, "let x = 1;\nlet y = [1, 2];\nlet z = y[5];\n").unwrap();
    let o = run(&[f.to_str().unwrap()]);
    let e = text(&o.stderr);
    assert!(!o.status.success());
    assert!(
        e.contains(&format!("{}:3:", f.display())) && e.contains("out of bounds"),
        "{e}"
    );
    assert!(!e.contains("panicked"), "{e}");
    // Syntax errors too.
    std::fs::write(&f, "let x = ;\n").unwrap();
    let e = text(&run(&[f.to_str().unwrap()]).stderr);
    assert!(e.contains(&format!("{}:1:9", f.display())), "{e}");
    // A native error: a missing model directory.
    let e = text(&run(&["-e", "load_backbone(\"/nonexistent\")"]).stderr);
    assert!(
        e.contains("<-e>:1:1: /nonexistent: not a model directory"),
        "{e}"
    );
}

#[test]
fn set_values_reach_the_script_as_args() {
    let o = run(&[
        "-e",
        "print(args.n + 1); print(args.name); print(args.xs.len()); args.flag",
        "--set",
        "n=41",
        "--set",
        "name=abc",
        "--set",
        "xs=[1,2,3]",
        "--set",
        "flag=true",
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(text(&o.stdout), "42\nabc\n3\ntrue\n");
    let e = text(&run(&["-e", "1", "--set", "novalue"]).stderr);
    assert!(e.contains("expected KEY=VALUE"), "{e}");
}

#[test]
fn every_stdlib_method_runs_from_a_script() {
    let out = common::scratch("script-stdlib");
    let data = out.join("data.jsonl");
    common::write_prompts(&data, 16, 5);
    let o = run_script(
        "stdlib_methods.rhai",
        &[("data", data.display().to_string())],
    );
    let (so, se) = (text(&o.stdout), text(&o.stderr));
    assert!(
        o.status.success() && so.contains("stdlib: ok"),
        "stdout:\n{so}\nstderr:\n{se}"
    );
}

#[test]
fn aapo_samples_the_reference_and_trains_from_a_script() {
    let out = common::scratch("script-aapo");
    let data = out.join("data.jsonl");
    common::write_prompts(&data, 16, 9);
    let o = run_script("aapo.rhai", &[("data", data.display().to_string())]);
    let (so, se) = (text(&o.stdout), text(&o.stderr));
    assert!(
        o.status.success() && so.contains("aapo: ok"),
        "stdout:\n{so}\nstderr:\n{se}"
    );
}

#[test]
fn rpo_lowers_the_held_out_loss_from_a_script() {
    let o = common::tarpo()
        .arg("run")
        .arg(common::root().join("tests/scripts/rpo.rhai"))
        .args([
            "--set",
            &format!(
                "data={}",
                common::root().join("datasets/arith_test.jsonl").display()
            ),
        ])
        .args([
            "--set",
            &format!(
                "model={}",
                common::root().join("assets/default-model").display()
            ),
        ])
        .output()
        .unwrap();
    let (so, se) = (text(&o.stdout), text(&o.stderr));
    assert!(
        o.status.success() && so.contains("rpo: ok"),
        "stdout:\n{so}\nstderr:\n{se}"
    );
}

#[test]
fn offline_files_are_checked_row_by_row() {
    let dir = common::scratch("offline-bad");
    let f = dir.join("off.jsonl");
    for (body, needle) in [
        ("{\"prompt\": \"a\", \"completion\": \"b\", \"reward\": 1}\n{\"prompt\": \"a\", \"reward\": 1}\n", ":2: missing string field `completion`"),
        ("{\"prompt\": \"a\", \"completion\": \"b\", \"reward\": \"high\"}\n", ":1: `reward` must be a finite number"),
        ("{\"prompt\": \"a\", \"completion\": \"b\", \"reward\": 1}\nnot json\n", ":2: malformed JSON"),
    ] {
        std::fs::write(&f, body).unwrap();
        let o = run(&["-e", &format!("load_offline({:?}).len()", f.display().to_string())]);
        let e = text(&o.stderr);
        assert!(!o.status.success() && e.contains(needle), "{e}");
    }
    std::fs::write(
        &f,
        "{\"prompt\": \"a\", \"completion\": \"b\", \"reward\": 0.5}\n",
    )
    .unwrap();
    let o = run(&[
        "-e",
        &format!("load_offline({:?})[0].reward", f.display().to_string()),
    ]);
    assert_eq!(text(&o.stdout).trim(), "0.5", "{}", text(&o.stderr));
}

#[test]
fn the_training_loop_pieces_from_a_script() {
    let out = common::scratch("script-training-loop");
    let data = out.join("data.jsonl");
    // Every other row's answer is "flat": the test's reward gives those 0.5.
    let words = [
        "a cat", "the sum", "one and", "we is", "of the", "to a", "cat sum", "and we",
    ];
    let rows: String = words
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let a = if i % 2 == 0 { "flat" } else { "x" };
            format!("{{\"prompt\": \"{p}\", \"answer\": \"{a}\"}}\n")
        })
        .collect();
    std::fs::write(&data, rows).unwrap();
    let o = run_script(
        "training_loop.rhai",
        &[
            ("data", data.display().to_string()),
            ("out", out.display().to_string()),
        ],
    );
    let (so, se) = (text(&o.stdout), text(&o.stderr));
    assert!(
        o.status.success() && so.contains("training loop: ok"),
        "stdout:\n{so}\nstderr:\n{se}"
    );
}

#[test]
fn a_stdlib_run_resumes_exactly_from_its_checkpoint() {
    let out = common::empty_scratch("script-resume");
    let data = out.join("data.jsonl");
    common::write_prompts(&data, 16, 7);
    let go = |run: &str, steps: u32, resume: bool| -> String {
        let o = run_script(
            "resume.rhai",
            &[
                ("data", data.display().to_string()),
                ("run", out.join(run).display().to_string()),
                ("steps", steps.to_string()),
                ("resume", resume.to_string()),
            ],
        );
        let (so, se) = (text(&o.stdout), text(&o.stderr));
        assert!(o.status.success(), "stdout:\n{so}\nstderr:\n{se}");
        so.lines()
            .find(|l| l.starts_with("bias"))
            .unwrap()
            .to_string()
    };
    let straight = go("straight", 6, false);
    go("stopped", 3, false);
    let resumed = go("stopped", 6, true);
    assert_eq!(straight, resumed, "router after 6 steps");
    // Every logged step equals the straight run's (time aside).
    let rows = |run: &str| -> Vec<serde_json::Value> {
        std::fs::read_to_string(out.join(run).join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                v.as_object_mut().unwrap().remove("time_s");
                v
            })
            .collect()
    };
    let (a, b) = (rows("straight"), rows("stopped"));
    assert_eq!(a.len(), 6);
    assert_eq!(a, b);
    assert!(out
        .join("stopped/checkpoints/step-000006/optimizer.safetensors")
        .exists());
}

#[test]
fn code_rewards_run_in_the_sandbox() {
    let o = run_script("code_reward.rhai", &[]);
    let (so, se) = (text(&o.stdout), text(&o.stderr));
    assert!(
        o.status.success() && so.contains("code_reward: ok"),
        "stdout:\n{so}\nstderr:\n{se}"
    );
}
