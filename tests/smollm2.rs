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
