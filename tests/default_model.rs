//! The embedded default model (assets/default-model) is a normal Hugging Face
//! directory: transformers loads it as it is and computes the same logits at
//! every position and the same greedy continuation; and the CLI uses it when
//! no model is named.
mod common;
use serde_json::Value;
use tarpo::model::{default_dir, Model, Step};
use tch::{Device, Kind, Tensor};

const PROMPT: &str = "Ava has 12 apples. Ava buys 7 more apples. How many apples does Ava have now? Think step by step, then give the final answer after ####.";

#[test]
fn transformers_loads_the_default_model_with_the_same_logits() {
    let dir = default_dir();
    let o = common::cached_oracle("default_model_oracle.py", &[dir.to_str().unwrap(), PROMPT]);
    let o: Value =
        serde_json::from_str(&std::fs::read_to_string(o.join("default_model.json")).unwrap())
            .unwrap();
    let m = Model::load(&dir, Device::Cpu, Kind::Float).unwrap();
    let ids = m.tok.encode(PROMPT, true).unwrap();
    let want_ids: Vec<i64> = serde_json::from_value(o["ids"].clone()).unwrap();
    assert_eq!(ids, want_ids, "token ids");
    let want: Vec<Vec<f32>> = serde_json::from_value(o["logits"].clone()).unwrap();
    let want = Tensor::from_slice(&want.concat()).view([ids.len() as i64, -1]);
    let x = Tensor::from_slice(&ids).view([1, -1]);
    let h = m
        .net
        .forward(
            &m.net.embed(&x).unwrap(),
            &Step::full(&x.ones_like().to_kind(Kind::Bool)).unwrap(),
            None,
        )
        .unwrap();
    let got = tch::no_grad(|| m.net.logits(&h).unwrap().squeeze_dim(0));
    let d = common::max_abs_diff(&got, &want);
    assert!(d < 1e-4, "logits differ from transformers by {d}");

    // Greedy from the CLI with no --model: the default model, as transformers decodes it.
    let out = common::tarpo()
        .args([
            "generate",
            "--greedy",
            "--max-new",
            "64",
            "--prompt",
            PROMPT,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text.trim_end_matches('\n'), o["text"].as_str().unwrap());
    assert!(
        text.contains("####"),
        "the default model answers in the task's format: {text}"
    );
}
