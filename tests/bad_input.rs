//! Broken model directories give one clear line naming the file and the key,
//! a non-zero exit, and never a panic. Sharded checkpoints load like single ones.
mod common;
use std::path::{Path, PathBuf};
use tch::Tensor;

/// A fresh copy of a tiny model directory to break.
fn copy_model(case: &str) -> PathBuf {
    let src = common::tiny_models().join("llama_mha_tied");
    let dst = common::empty_scratch(&format!("bad_input/{case}"));
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(src.join(f), dst.join(f)).unwrap();
    }
    dst
}

/// Runs `tarpo logits` on `dir`; returns (stdout, stderr, success).
fn logits(dir: &Path) -> (String, String, bool) {
    let out = common::tarpo()
        .args(["logits", "--model", dir.to_str().unwrap(), "--ids", "2,3,4"])
        .output()
        .unwrap();
    (
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
        out.status.success(),
    )
}

fn expect_error(dir: &Path, needles: &[&str]) {
    let (_, err, ok) = logits(dir);
    assert!(!ok, "{}: expected failure", dir.display());
    assert!(
        !err.contains("panicked") && !err.contains("internal error"),
        "panic: {err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(err.starts_with("error: "), "{err}");
    for n in needles {
        assert!(err.contains(n), "expected {n:?} in: {err}");
    }
}

fn tensors(dir: &Path) -> Vec<(String, Tensor)> {
    Tensor::read_safetensors(dir.join("model.safetensors")).unwrap()
}

fn write(path: &Path, ts: &[(String, Tensor)]) {
    Tensor::write_safetensors(ts, path).unwrap();
}

#[test]
fn config_errors() {
    let d = copy_model("no_config");
    std::fs::remove_file(d.join("config.json")).unwrap();
    expect_error(&d, &["config.json", "cannot read"]);

    let d = copy_model("malformed_config");
    std::fs::write(d.join("config.json"), "{\"model_type\": \"llama\", ").unwrap();
    expect_error(&d, &["config.json", "malformed JSON"]);

    let d = copy_model("unknown_arch");
    let cfg = std::fs::read_to_string(d.join("config.json")).unwrap();
    std::fs::write(
        d.join("config.json"),
        cfg.replace("\"llama\"", "\"gpt2\"")
            .replace("LlamaForCausalLM", "GPT2LMHeadModel"),
    )
    .unwrap();
    expect_error(&d, &["config.json", "unknown architecture", "gpt2"]);

    let d = copy_model("missing_key");
    let cfg = std::fs::read_to_string(d.join("config.json")).unwrap();
    std::fs::write(
        d.join("config.json"),
        cfg.replace("\"num_hidden_layers\"", "\"num_layers\""),
    )
    .unwrap();
    expect_error(&d, &["config.json", "num_hidden_layers"]);
}

#[test]
fn weight_errors() {
    let d = copy_model("missing_tensor");
    let ts: Vec<_> = tensors(&d)
        .into_iter()
        .filter(|(n, _)| n != "model.layers.1.mlp.up_proj.weight")
        .collect();
    write(&d.join("model.safetensors"), &ts);
    expect_error(
        &d,
        &[
            "model.safetensors",
            "model.layers.1.mlp.up_proj.weight",
            "missing",
        ],
    );

    let d = copy_model("misshapen_tensor");
    let ts: Vec<_> = tensors(&d)
        .into_iter()
        .map(|(n, t)| {
            if n == "model.layers.0.self_attn.k_proj.weight" {
                (n, t.narrow(0, 0, 8))
            } else {
                (n, t)
            }
        })
        .collect();
    write(&d.join("model.safetensors"), &ts);
    expect_error(
        &d,
        &[
            "model.safetensors",
            "model.layers.0.self_attn.k_proj.weight",
            "shape [8, 64]",
            "expected [64, 64]",
        ],
    );

    let d = copy_model("truncated");
    let bytes = std::fs::read(d.join("model.safetensors")).unwrap();
    std::fs::write(d.join("model.safetensors"), &bytes[..bytes.len() - 100]).unwrap();
    expect_error(&d, &["model.safetensors", "truncated"]);

    let d = copy_model("no_weights");
    std::fs::remove_file(d.join("model.safetensors")).unwrap();
    expect_error(&d, &["no model.safetensors"]);
}

#[test]
fn tokenizer_errors() {
    let d = copy_model("no_tokenizer");
    std::fs::remove_file(d.join("tokenizer.json")).unwrap();
    expect_error(&d, &["tokenizer.json", "missing"]);

    let d = copy_model("bad_tokenizer");
    std::fs::write(d.join("tokenizer.json"), "{\"version\": \"1.0\"}").unwrap();
    expect_error(&d, &["tokenizer.json", "cannot load tokenizer"]);
}

#[test]
fn bad_arguments() {
    let d = copy_model("args");
    let run = |args: &[&str]| {
        let out = common::tarpo().args(args).output().unwrap();
        (String::from_utf8(out.stderr).unwrap(), out.status.success())
    };
    let m = d.to_str().unwrap();
    let (err, ok) = run(&["logits", "--model", m, "--ids", "2,x"]);
    assert!(!ok && err.contains("\"x\" is not an integer"), "{err}");
    let (err, ok) = run(&["logits", "--model", m, "--ids", "2,99999"]);
    assert!(
        !ok && err.contains("99999 is outside the vocabulary"),
        "{err}"
    );
    let (err, ok) = run(&["logits", "--model", m, "--ids", "2", "--device", "tpu"]);
    assert!(!ok && err.contains("unknown device \"tpu\""), "{err}");
    let (err, ok) = run(&["generate", "--model", m, "--prompt", "hi", "--top-p", "0"]);
    assert!(!ok && err.contains("top_p must be in (0, 1]"), "{err}");
    let (err, ok) = run(&["generate", "--model", m, "--prompt", "hi", "--chat"]);
    assert!(!ok && err.contains("no chat template"), "{err}");
    let (err, ok) = run(&["logits", "--model", "/nonexistent/model", "--ids", "2"]);
    assert!(
        !ok && err.contains("/nonexistent/model: not a model directory"),
        "{err}"
    );
}

#[test]
fn sharded_checkpoint_loads_like_single_file() {
    let d = copy_model("sharded");
    let (single, _, ok) = logits(&d);
    assert!(ok);
    let ts = tensors(&d);
    let (a, b): (Vec<_>, Vec<_>) = ts.into_iter().enumerate().partition(|(i, _)| i % 2 == 0);
    let strip =
        |v: Vec<(usize, (String, Tensor))>| v.into_iter().map(|(_, x)| x).collect::<Vec<_>>();
    let (a, b) = (strip(a), strip(b));
    let mut map = serde_json::Map::new();
    for (name, file) in a
        .iter()
        .map(|(n, _)| (n, "model-00001-of-00002.safetensors"))
        .chain(
            b.iter()
                .map(|(n, _)| (n, "model-00002-of-00002.safetensors")),
        )
    {
        map.insert(name.clone(), file.into());
    }
    write(&d.join("model-00001-of-00002.safetensors"), &a);
    write(&d.join("model-00002-of-00002.safetensors"), &b);
    std::fs::remove_file(d.join("model.safetensors")).unwrap();
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(d.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let (sharded, err, ok) = logits(&d);
    assert!(ok, "{err}");
    assert_eq!(sharded, single);

    std::fs::remove_file(d.join("model-00002-of-00002.safetensors")).unwrap();
    expect_error(&d, &["model-00002-of-00002.safetensors", "cannot open"]);
}
