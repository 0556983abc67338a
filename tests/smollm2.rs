//! The converted real checkpoint (SmolLM2-135M-Instruct) through the CLI, against
//! transformers on the same directory.
mod common;
use serde_json::Value;

fn oracle() -> Value {
    let model = common::smollm2();
    let dir = common::cached_oracle("smollm2_oracle.py", &[model.to_str().unwrap()]);
    serde_json::from_str(&std::fs::read_to_string(dir.join("smollm2.json")).unwrap()).unwrap()
}

fn run(args: &[&str]) -> String {
    let out = common::tarpo().args(args).output().unwrap();
    assert!(
        out.status.success(),
        "tarpo {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn greedy_chat_generation_matches_transformers() {
    let o = oracle();
    let model = common::smollm2();
    let m = model.to_str().unwrap();
    let prompt = o["prompt"].as_str().unwrap();
    // Text output.
    let text = run(&[
        "generate",
        "--model",
        m,
        "--chat",
        "--greedy",
        "--max-new",
        "48",
        "--prompt",
        prompt,
    ]);
    assert_eq!(text.trim_end_matches('\n'), o["text"].as_str().unwrap());
    // Id output, with the prompt given as text and as ids.
    let want: Vec<i64> = serde_json::from_value(o["greedy"].clone()).unwrap();
    assert!(
        want.len() > 8,
        "the oracle continuation is long enough to mean something"
    );
    let got: Vec<i64> = serde_json::from_str(&run(&[
        "generate",
        "--model",
        m,
        "--chat",
        "--greedy",
        "--max-new",
        "48",
        "--prompt",
        prompt,
        "--ids",
    ]))
    .unwrap();
    assert_eq!(got, want);
    let prompt_ids: Vec<String> = o["prompt_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.to_string())
        .collect();
    let got: Vec<i64> = serde_json::from_str(&run(&[
        "generate",
        "--model",
        m,
        "--greedy",
        "--max-new",
        "48",
        "--ids",
        &prompt_ids.join(","),
    ]))
    .unwrap();
    assert_eq!(got, want);
}

#[test]
fn logits_and_tokenize_commands_match_transformers() {
    let o = oracle();
    let model = common::smollm2();
    let m = model.to_str().unwrap();
    let ids: Vec<String> = o["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.to_string())
        .collect();
    let got: Vec<f64> =
        serde_json::from_str(&run(&["logits", "--model", m, "--ids", &ids.join(",")])).unwrap();
    let want: Vec<f64> = serde_json::from_value(o["logits"].clone()).unwrap();
    assert_eq!(got.len(), 49152);
    let diff = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(diff < 1e-4, "max |logit diff| {diff}");
    let tokens: Vec<i64> =
        serde_json::from_str(&run(&["tokenize", "--model", m, "--text", "Hello, world!"])).unwrap();
    assert_eq!(tokens, vec![19556, 28, 905, 17]);
}

/// scripts/smollm2_gsm_symbolic.rhai with tiny counts: GSM-Symbolic rows from
/// `tarpo data gsm-symbolic`, a warm-up phase on the format reward and a
/// phase on correctness, each a run directory, and the time per step.
#[test]
fn gsm_symbolic_script_runs_both_phases_on_smollm2() {
    let dir = common::scratch("smollm2-gsm");
    let data = dir.join("gsm.jsonl");
    run(&["data", "gsm-symbolic", data.to_str().unwrap()]);
    let stdout = common::shipped_script(
        "smollm2_gsm_symbolic.rhai",
        &[
            format!("data={}", data.display()),
            format!("out={}", dir.join("run").display()),
            "warmup=1".into(),
            "steps=1".into(),
            "prompts=1".into(),
            "group=2".into(),
            "max_new=8".into(),
        ],
    );
    assert!(
        stdout.contains("time per step: median") && stdout.contains("over 2 steps"),
        "{stdout}"
    );
    for phase in ["warmup", "train"] {
        let m = std::fs::read_to_string(dir.join("run").join(phase).join("metrics.jsonl")).unwrap();
        assert_eq!(m.lines().count(), 1, "{phase}: one step");
    }
    let cfg = std::fs::read_to_string(dir.join("run/warmup/config.json")).unwrap();
    assert!(
        cfg.contains("format_gsm8k"),
        "the warm-up trains on the format reward: {cfg}"
    );
}

/// scripts/eval_humaneval.rhai with tiny counts: HumanEval rows through the
/// sandbox, Pass@1 and Pass@k printed, the per-problem frame and chart written.
#[test]
fn humaneval_evaluation_script_reports_pass_at_k() {
    let dir = common::scratch("smollm2-humaneval");
    let data = dir.join("humaneval.jsonl");
    run(&["data", "humaneval", data.to_str().unwrap()]);
    let stdout = common::shipped_script(
        "eval_humaneval.rhai",
        &[
            format!("data={}", data.display()),
            format!("out={}", dir.join("eval").display()),
            "problems=2".into(),
            "k=2".into(),
            "max_new=8".into(),
        ],
    );
    assert!(
        stdout.contains("HumanEval: 2 problems x 2 samples"),
        "{stdout}"
    );
    assert!(
        stdout.contains("pass@1 ") && stdout.contains("pass@2 "),
        "{stdout}"
    );
    assert!(dir.join("eval/problems.parquet").is_file());
    assert!(dir.join("eval/pass_at_k.png").is_file());
}
