//! LoRA against peft: an adapter tarpo saves loads into `PeftModel` and gives
//! tarpo's logits; the merged export loads into transformers and gives them
//! too; with LoRA off the model is its base; saving and loading round-trips;
//! the init is PEFT's; gradients reach the adapters only; bad adapter
//! directories give one clear line naming the file and the key.
mod common;
use std::path::{Path, PathBuf};
use tarpo::model::lora::{ADAPTER_CONFIG, ADAPTER_WEIGHTS, TARGETS};
use tarpo::model::{Llama, LoraConfig, Model, Step};
use tch::{Device, Kind, Tensor};

const CPU: (Kind, Device) = (Kind::Float, Device::Cpu);

fn load(name: &str, kind: Kind) -> Model {
    Model::load(&common::tiny_models().join(name), Device::Cpu, kind).unwrap()
}

/// A fresh scratch directory.
fn fresh(group: &str, name: &str) -> PathBuf {
    common::empty_scratch(&format!("{group}/{name}"))
}

/// Left-padded prompts of a few lengths: (input_ids, attention_mask) (B, L).
fn inputs(seed: i64) -> (Tensor, Tensor) {
    tch::manual_seed(seed);
    let lengths = [7i64, 12, 2, 9];
    let l = 12;
    let ids = Tensor::randint_low(2, 320, [4, l], (Kind::Int64, Device::Cpu));
    let pos = Tensor::arange(l, (Kind::Int64, Device::Cpu)).unsqueeze(0);
    let starts = Tensor::from_slice(&lengths.map(|n| l - n)).unsqueeze(1);
    let mask = pos.ge_tensor(&starts).to_kind(Kind::Int64);
    (ids * &mask, mask)
}

fn logits(net: &Llama, ids: &Tensor, mask: &Tensor) -> Tensor {
    let valid = mask.to_kind(Kind::Bool);
    let h = net
        .forward(&net.embed(ids).unwrap(), &Step::full(&valid).unwrap(), None)
        .unwrap();
    net.logits(&h).unwrap()
}

/// max |a - b| over the real (unpadded) positions.
fn diff(a: &Tensor, b: &Tensor, mask: &Tensor) -> f64 {
    let sel = mask.to_kind(Kind::Bool).unsqueeze(-1).expand_as(a);
    common::max_abs_diff(&a.masked_select(&sel), &b.masked_select(&sel))
}

/// Random non-zero A and B (B = 0 would make every comparison vacuous).
fn randomize(net: &Llama, seed: i64) {
    let _g = tch::no_grad_guard();
    tch::manual_seed(seed);
    for mut p in net.lora_parameters() {
        let r = Tensor::randn(p.size(), CPU) * 0.1;
        p.copy_(&r);
    }
}

fn rank4() -> LoraConfig {
    LoraConfig {
        rank: 4,
        alpha: 8.0,
        targets: TARGETS.iter().map(|t| t.to_string()).collect(),
        seed: 11,
    }
}

fn peft_parity(name: &str) {
    let _g = tch::no_grad_guard();
    let work = fresh("lora_peft", name);
    let (ids, mask) = inputs(3);
    let inputs_path = work.join("inputs.safetensors");
    Tensor::write_safetensors(
        &[("input_ids", &ids), ("attention_mask", &mask)],
        &inputs_path,
    )
    .unwrap();

    let mut m = load(name, Kind::Float);
    let base = logits(&m.net, &ids, &mask);
    m.net.attach_lora(&rank4()).unwrap();
    // A fresh adapter (B = 0) is the identity, as in PEFT.
    assert_eq!(diff(&logits(&m.net, &ids, &mask), &base, &mask), 0.0);
    randomize(&m.net, 5);
    let adapted = logits(&m.net, &ids, &mask);
    let moved = diff(&adapted, &base, &mask);
    assert!(
        moved > 0.1,
        "{name}: the adapter barely changes the logits ({moved})"
    );

    // Off: exactly the base model; on again: the adapted one.
    m.net.set_lora_enabled(false);
    assert_eq!(diff(&logits(&m.net, &ids, &mask), &base, &mask), 0.0);
    m.net.set_lora_enabled(true);
    assert_eq!(diff(&logits(&m.net, &ids, &mask), &adapted, &mask), 0.0);

    let (adapter, merged) = (work.join("adapter"), work.join("merged"));
    m.save_lora(&adapter).unwrap();
    m.export_merged(&merged).unwrap();

    // What peft and transformers make of these files.
    let out = work.join("oracle.safetensors");
    common::run_python(
        "peft_oracle.py",
        &[
            m.dir.to_str().unwrap(),
            adapter.to_str().unwrap(),
            merged.to_str().unwrap(),
            inputs_path.to_str().unwrap(),
            out.to_str().unwrap(),
        ],
    );
    let o = common::read_tensors(&out);
    for key in ["peft", "peft_merge", "merged"] {
        let d = diff(&adapted, &o[key], &mask);
        eprintln!("{name}: ours vs {key}: {d:.2e}");
        assert!(d < 1e-4, "{name}: adapted logits vs {key}: {d}");
    }
    let d = diff(&base, &o["peft_off"], &mask);
    assert!(
        d < 1e-4,
        "{name}: base logits vs peft with adapter disabled: {d}"
    );

    // The merged directory: same tensor names as the source, same config,
    // and tarpo loads it to the adapted logits.
    let names = |d: &Path| {
        let mut n: Vec<String> = Tensor::read_safetensors(d.join("model.safetensors"))
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        n.sort();
        n
    };
    assert_eq!(names(&merged), names(&m.dir), "{name}");
    for f in ["tokenizer.json", "generation_config.json"] {
        assert_eq!(
            std::fs::read(merged.join(f)).unwrap(),
            std::fs::read(m.dir.join(f)).unwrap(),
            "{f}"
        );
    }
    let mm = Model::load(&merged, Device::Cpu, Kind::Float).unwrap();
    assert!(!mm.net.has_lora());
    let d = diff(&logits(&mm.net, &ids, &mask), &adapted, &mask);
    assert!(d < 1e-4, "{name}: tarpo on the merged export: {d}");

    // load_lora of the saved adapter reproduces the adapted model exactly.
    let mut fresh_model = load(name, Kind::Float);
    fresh_model.load_lora(&adapter).unwrap();
    let want = m.net.lora_config().map(|c| LoraConfig {
        seed: 0,
        ..c.clone()
    });
    assert_eq!(fresh_model.net.lora_config().cloned(), want);
    assert_eq!(
        diff(&logits(&fresh_model.net, &ids, &mask), &adapted, &mask),
        0.0
    );
}

#[test]
fn peft_parity_llama_gqa_llama3_bias() {
    peft_parity("llama_gqa_llama3_bias");
}

#[test]
fn peft_parity_qwen2_gqa_untied_linear() {
    peft_parity("qwen2_gqa_untied_linear");
}

#[test]
fn peft_parity_llama_mha_tied() {
    // Tied embeddings: the export has no lm_head.weight (the source had none).
    peft_parity("llama_mha_tied");
    let merged = common::scratch("lora_peft").join("llama_mha_tied/merged");
    let t = common::read_tensors(&merged.join("model.safetensors"));
    assert!(!t.contains_key("lm_head.weight"));
}

#[test]
fn adapter_saved_by_peft_loads() {
    // peft's own save_pretrained output (its full config, unordered targets,
    // an integer lora_alpha) loads and gives peft's logits.
    let _g = tch::no_grad_guard();
    let name = "qwen2_gqa_untied_linear";
    let work = fresh("lora_peft", "peft_made");
    let (ids, mask) = inputs(6);
    let inputs_path = work.join("inputs.safetensors");
    Tensor::write_safetensors(
        &[("input_ids", &ids), ("attention_mask", &mask)],
        &inputs_path,
    )
    .unwrap();
    let (adapter, out) = (work.join("adapter"), work.join("oracle.safetensors"));
    let base = common::tiny_models().join(name);
    common::run_python(
        "peft_oracle.py",
        &[
            "--make",
            base.to_str().unwrap(),
            adapter.to_str().unwrap(),
            inputs_path.to_str().unwrap(),
            out.to_str().unwrap(),
        ],
    );
    let mut m = load(name, Kind::Float);
    let base_logits = logits(&m.net, &ids, &mask);
    m.load_lora(&adapter).unwrap();
    let cfg = m.net.lora_config().unwrap();
    assert_eq!((cfg.rank, cfg.alpha), (4, 8.0));
    assert_eq!(cfg.targets, ["q_proj", "v_proj", "down_proj"]);
    assert_eq!(m.net.lora_parameters().len(), 2 * 3 * 2);
    let ours = logits(&m.net, &ids, &mask);
    let theirs = &common::read_tensors(&out)["peft"];
    let d = diff(&ours, theirs, &mask);
    assert!(d < 1e-4, "ours vs peft: {d}");
    assert!(
        diff(&ours, &base_logits, &mask) > 0.1,
        "the adapter matters"
    );
}

#[test]
fn attach_targets_init_and_parameters() {
    let mut m = load("llama_gqa_llama3_bias", Kind::Float);
    assert!(!m.net.has_lora() && m.net.lora_parameters().is_empty());
    let mut cfg = rank4();
    cfg.targets = vec!["v_proj".into(), "q_proj".into(), "down_proj".into()];
    m.net.attach_lora(&cfg).unwrap();
    assert!(m.net.has_lora());
    assert_eq!(
        m.net.lora_config().unwrap().targets,
        ["q_proj", "v_proj", "down_proj"]
    );
    let named = m.net.named_lora_parameters();
    let names: Vec<&str> = named.iter().map(|(n, _)| n.as_str()).collect();
    // 2 blocks x 3 modules x (A, B), block by block, module order fixed.
    assert_eq!(names.len(), 12);
    assert_eq!(
        &names[..6],
        [
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
            "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight",
            "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight",
            "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight",
            "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight",
        ]
    );
    // Shapes (hidden 64, 4 heads x head_dim 8 = 32 for q, 2 x 8 = 16 for v,
    // intermediate 96), PEFT's init, fp32 trainable leaves.
    let shapes: Vec<Vec<i64>> = named.iter().take(6).map(|(_, t)| t.size()).collect();
    assert_eq!(
        shapes,
        [
            vec![4, 64],
            vec![32, 4],
            vec![4, 64],
            vec![16, 4],
            vec![4, 96],
            vec![64, 4]
        ]
    );
    for (n, t) in &named {
        assert!(t.requires_grad() && t.kind() == Kind::Float, "{n}");
        let max = t.abs().max().double_value(&[]);
        if n.contains("lora_B") {
            assert_eq!(max, 0.0, "{n}");
        } else {
            let bound = 1.0 / (t.size()[1] as f64).sqrt();
            assert!(max > 0.5 * bound && max <= bound, "{n}: {max}");
        }
    }
    // Seeded: same seed, same A; another seed, another A.
    let a0 = named[0].1.detach();
    m.net.attach_lora(&cfg).unwrap();
    assert!(m.net.lora_parameters()[0].equal(&a0));
    m.net
        .attach_lora(&LoraConfig {
            seed: 12,
            ..cfg.clone()
        })
        .unwrap();
    assert!(!m.net.lora_parameters()[0].equal(&a0));
    // Default: all seven modules.
    m.net.attach_lora(&rank4()).unwrap();
    assert_eq!(m.net.lora_parameters().len(), 2 * 7 * 2);
    m.net.remove_lora();
    assert!(!m.net.has_lora() && m.net.lora_parameters().is_empty());

    // An unknown target is refused, naming the valid ones.
    let bad = LoraConfig {
        targets: vec!["q_proj".into(), "qkv_proj".into()],
        ..rank4()
    };
    let e = format!("{:#}", m.net.attach_lora(&bad).unwrap_err());
    assert!(
        e.contains("qkv_proj")
            && e.contains("q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"),
        "{e}"
    );
    assert!(!m.net.has_lora());
    for bad in [
        LoraConfig { rank: 0, ..rank4() },
        LoraConfig {
            alpha: -1.0,
            ..rank4()
        },
    ] {
        assert!(m.net.attach_lora(&bad).is_err());
    }
}

#[test]
fn gradients_reach_the_adapters_only() {
    let mut m = load("qwen2_gqa_untied_linear", Kind::Float);
    m.net.attach_lora(&rank4()).unwrap();
    let (ids, mask) = inputs(1);
    // B = 0 at init: dL/dB is non-zero, dL/dA is zero (A only acts through B).
    let loss = logits(&m.net, &ids, &mask).square().mean(Kind::Float);
    loss.backward();
    let params = m.net.lora_parameters();
    let grad_max = |t: &Tensor| t.grad().abs().max().double_value(&[]);
    for pair in params.chunks(2) {
        assert_eq!(grad_max(&pair[0]), 0.0);
        assert!(grad_max(&pair[1]) > 0.0);
    }
    for t in m.net.tensors() {
        assert!(!t.requires_grad() && !t.grad().defined());
    }
    // With B non-zero, A gets gradients too; with LoRA off, nothing is trainable.
    randomize(&m.net, 2);
    for p in &params {
        let _ = p.grad().zero_();
    }
    logits(&m.net, &ids, &mask)
        .square()
        .mean(Kind::Float)
        .backward();
    assert!(params.iter().all(|p| grad_max(p) > 0.0));
    m.net.set_lora_enabled(false);
    assert!(!logits(&m.net, &ids, &mask).requires_grad());
}

#[test]
fn bf16_model_exports_bf16() {
    let _g = tch::no_grad_guard();
    let work = fresh("lora_peft", "bf16");
    let mut m = load("qwen2_gqa_untied_linear", Kind::BFloat16);
    m.net.attach_lora(&rank4()).unwrap();
    randomize(&m.net, 9);
    let (ids, mask) = inputs(4);
    let adapted = logits(&m.net, &ids, &mask);
    assert_eq!(adapted.kind(), Kind::BFloat16);
    // Masters stay fp32; so does the saved adapter.
    assert!(m
        .net
        .lora_parameters()
        .iter()
        .all(|p| p.kind() == Kind::Float));
    m.save_lora(&work.join("adapter")).unwrap();
    let saved = common::read_tensors(&work.join("adapter").join(ADAPTER_WEIGHTS));
    assert!(saved.values().all(|t| t.kind() == Kind::Float));
    m.export_merged(&work.join("merged")).unwrap();
    let t = common::read_tensors(&work.join("merged/model.safetensors"));
    assert!(t.values().all(|t| t.kind() == Kind::BFloat16));
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(work.join("merged/config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["dtype"], "bfloat16");
    // The merge, rounded once to bf16, is close to the bf16 adapted model.
    let mm = Model::load(&work.join("merged"), Device::Cpu, Kind::BFloat16).unwrap();
    let merged = logits(&mm.net, &ids, &mask).to_kind(Kind::Float);
    let adapted = adapted.to_kind(Kind::Float);
    let scale = adapted.abs().max().double_value(&[]);
    let d = diff(&merged, &adapted, &mask);
    assert!(
        d < 0.05 * scale,
        "bf16 merged vs adapted: {d} (scale {scale})"
    );
    // Exporting onto the source directory is refused.
    let e = format!("{:#}", m.export_merged(&m.dir).unwrap_err());
    assert!(e.contains("another directory"), "{e}");
}

/// load_lora on `dir` fails with one line containing every needle, and leaves
/// the model without adapters.
fn expect_load_error(dir: &Path, needles: &[&str]) {
    let mut m = load("llama_gqa_llama3_bias", Kind::Float);
    let e = format!("{:#}", m.load_lora(dir).unwrap_err());
    assert_eq!(e.lines().count(), 1, "one line: {e}");
    for n in needles {
        assert!(e.contains(n), "expected {n:?} in: {e}");
    }
    assert!(!m.net.has_lora(), "{e}");
}

/// A good adapter in a fresh directory, to break.
fn good_adapter(case: &str) -> PathBuf {
    let dir = fresh("lora_bad", case);
    let mut m = load("llama_gqa_llama3_bias", Kind::Float);
    m.net.attach_lora(&rank4()).unwrap();
    m.save_lora(&dir).unwrap();
    dir
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join(ADAPTER_CONFIG);
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&path, serde_json::to_string(&v).unwrap()).unwrap();
}

fn edit_weights(dir: &Path, f: impl FnOnce(&mut Vec<(String, Tensor)>)) {
    let path = dir.join(ADAPTER_WEIGHTS);
    let mut t = Tensor::read_safetensors(&path).unwrap();
    f(&mut t);
    Tensor::write_safetensors(&t, &path).unwrap();
}

#[test]
fn bad_adapter_dirs() {
    // The good one loads.
    let d = good_adapter("good");
    let mut m = load("llama_gqa_llama3_bias", Kind::Float);
    m.load_lora(&d).unwrap();
    assert_eq!(m.net.lora_parameters().len(), 28);

    expect_load_error(&d.join("nope"), &["nope", "not an adapter directory"]);

    let d = good_adapter("no_config");
    std::fs::remove_file(d.join(ADAPTER_CONFIG)).unwrap();
    expect_load_error(&d, &["adapter_config.json", "cannot read"]);

    let d = good_adapter("malformed_config");
    std::fs::write(d.join(ADAPTER_CONFIG), "{\"r\": 4,").unwrap();
    expect_load_error(&d, &["adapter_config.json", "malformed JSON"]);

    let d = good_adapter("no_r");
    edit_config(&d, |v| {
        v.as_object_mut().unwrap().remove("r");
    });
    expect_load_error(&d, &["adapter_config.json", "'r'", "missing"]);

    let d = good_adapter("bad_alpha");
    edit_config(&d, |v| v["lora_alpha"] = "8".into());
    expect_load_error(&d, &["adapter_config.json", "'lora_alpha'"]);

    let d = good_adapter("not_lora");
    edit_config(&d, |v| v["peft_type"] = "IA3".into());
    expect_load_error(&d, &["adapter_config.json", "'peft_type'", "IA3"]);

    let d = good_adapter("rslora");
    edit_config(&d, |v| v["use_rslora"] = true.into());
    expect_load_error(&d, &["adapter_config.json", "'use_rslora'"]);

    let d = good_adapter("dora");
    edit_config(&d, |v| v["use_dora"] = true.into());
    expect_load_error(&d, &["adapter_config.json", "'use_dora'"]);

    let d = good_adapter("rank_pattern");
    edit_config(&d, |v| v["rank_pattern"] = serde_json::json!({"q_proj": 8}));
    expect_load_error(&d, &["adapter_config.json", "'rank_pattern'"]);

    let d = good_adapter("unknown_target");
    edit_config(&d, |v| {
        v["target_modules"] = serde_json::json!(["q_proj", "c_attn"])
    });
    expect_load_error(
        &d,
        &[
            "adapter_config.json",
            "'target_modules'",
            "c_attn",
            "valid targets",
        ],
    );

    let d = good_adapter("regex_target");
    edit_config(&d, |v| v["target_modules"] = ".*proj".into());
    expect_load_error(&d, &["adapter_config.json", "'target_modules'", "regex"]);

    let d = good_adapter("no_weights");
    std::fs::remove_file(d.join(ADAPTER_WEIGHTS)).unwrap();
    expect_load_error(&d, &["adapter_model.safetensors", "cannot read"]);

    let d = good_adapter("truncated_weights");
    let bytes = std::fs::read(d.join(ADAPTER_WEIGHTS)).unwrap();
    std::fs::write(d.join(ADAPTER_WEIGHTS), &bytes[..bytes.len() / 2]).unwrap();
    expect_load_error(
        &d,
        &["adapter_model.safetensors", "not a valid safetensors"],
    );

    let key = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight";
    let d = good_adapter("missing_tensor");
    edit_weights(&d, |t| t.retain(|(n, _)| n != key));
    expect_load_error(&d, &["adapter_model.safetensors", key, "missing"]);

    let d = good_adapter("wrong_shape");
    edit_weights(&d, |t| {
        for (n, v) in t.iter_mut() {
            if n == key {
                *v = Tensor::zeros([96, 3], CPU);
            }
        }
    });
    expect_load_error(
        &d,
        &["adapter_model.safetensors", key, "[96, 3]", "[96, 4]"],
    );

    // r in the config disagrees with the tensors.
    let d = good_adapter("wrong_r");
    edit_config(&d, |v| v["r"] = 8.into());
    expect_load_error(
        &d,
        &[
            "adapter_model.safetensors",
            "lora_A.weight",
            "[4, 64]",
            "[8, 64]",
        ],
    );

    let d = good_adapter("extra_tensor");
    edit_weights(&d, |t| {
        t.push((
            "base_model.model.lm_head.lora_A.weight".into(),
            Tensor::zeros([4, 64], CPU),
        ))
    });
    expect_load_error(
        &d,
        &["adapter_model.safetensors", "lm_head.lora_A", "unexpected"],
    );

    // Fewer targets than the file holds: the extras are unexpected.
    let d = good_adapter("fewer_targets");
    edit_config(&d, |v| v["target_modules"] = serde_json::json!(["q_proj"]));
    expect_load_error(&d, &["adapter_model.safetensors", "unexpected"]);

    let d = good_adapter("int_tensor");
    edit_weights(&d, |t| {
        for (n, v) in t.iter_mut() {
            if n == key {
                *v = Tensor::zeros([96, 4], (Kind::Int64, Device::Cpu));
            }
        }
    });
    expect_load_error(&d, &["adapter_model.safetensors", key, "dtype"]);

    // A model without adapters has nothing to save.
    let m = load("llama_gqa_llama3_bias", Kind::Float);
    let e = format!("{:#}", m.save_lora(&fresh("lora_bad", "none")).unwrap_err());
    assert!(e.contains("no LoRA adapters"), "{e}");
}
