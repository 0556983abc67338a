//! RLTT on the looped fixtures of tests/ouro.rs: each weighting's weights
//! (shape and sum), the loss and its gradients (exit gate, final norm,
//! learned loop logits) against an independent PyTorch computation
//! (tests/oracle/rltt_oracle.py), and `exit_pdf` as the only weighting whose
//! gradient reaches the gate.
mod common;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use tarpo::model::Model;
use tarpo::policy::{rollout, RolloutOptions, Sampling};
use tarpo::rl::loss::LossConfig;
use tarpo::rl::policy::{Policy, Reference};
use tarpo::rl::rltt::{self, LoopWeighting};
use tarpo::rl::update::{accumulate_gradients, ReplayConfig};
use tch::{Device, Kind, Tensor};

/// A fixture with early exit off (RLTT samples from the last loop), copied
/// into a directory of the calling test's own: tests run in parallel, and
/// one test rewriting a file another is loading corrupts the load.
fn fixture(name: &str, test: &str) -> PathBuf {
    let src = common::cached_oracle("ouro_models.py", &[]).join(name);
    let dir = common::scratch("rltt").join(test).join(name);
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["tokenizer.json", "model.safetensors"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    cfg["early_exit_threshold"] = 1.0.into();
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    dir
}

fn save(model: &Model, path: &Path) {
    let named: Vec<(String, Tensor)> = model
        .net
        .named_tensors()
        .into_iter()
        .map(|(n, t)| (n, t.detach()))
        .collect();
    Tensor::write_safetensors(&named, path).unwrap();
}

#[test]
fn fixed_weightings_have_their_shape_and_sum_to_one() {
    let u = rltt::weights(LoopWeighting::Uniform, 4, None, None).unwrap();
    assert_eq!(Vec::<f32>::try_from(&u).unwrap(), [0.25; 4]);
    let p = rltt::weights(LoopWeighting::Progressive(1.0), 4, None, None).unwrap();
    let p = Vec::<f32>::try_from(&p).unwrap();
    for (a, b) in p.iter().zip([0.1, 0.2, 0.3, 0.4]) {
        assert!((a - b).abs() < 1e-6, "{p:?}");
    }
    let theta = Tensor::from_slice(&[0.3f32, -0.2, 0.1]);
    let l = rltt::weights(LoopWeighting::Learned, 3, None, Some(&theta)).unwrap();
    assert_eq!(l.size(), [3]);
    assert!((l.sum(Kind::Float).double_value(&[]) - 1.0).abs() < 1e-6);
    assert!(rltt::weights(LoopWeighting::Learned, 4, None, Some(&theta)).is_err());
    assert!(rltt::weights(LoopWeighting::ExitPdf, 4, None, None).is_err());
    assert!(LoopWeighting::parse("geometric", 1.0)
        .unwrap_err()
        .to_string()
        .contains("valid: final, uniform"));
}

fn case(name: &str, weighting: LoopWeighting, theta: Option<[f32; 4]>) {
    let dir = fixture(name, "oracle");
    let policy_model = Model::load(&dir, Device::Cpu, Kind::Float).unwrap();
    let reference = Model::load(&dir, Device::Cpu, Kind::Float).unwrap();
    let loops = policy_model.net.cfg.loops;
    // A trained policy: its final norm moved off the reference's.
    tch::no_grad(|| {
        let (_, w) = policy_model
            .net
            .named_tensors()
            .into_iter()
            .find(|(n, _)| n == "model.norm.weight")
            .unwrap();
        let _ = w.shallow_clone().g_mul_scalar_(1.1);
    });
    let names = [
        "model.early_exit_gate.weight",
        "model.early_exit_gate.bias",
        "model.norm.weight",
    ];
    policy_model
        .net
        .set_trainable(&names.map(String::from))
        .unwrap();
    let prompts = vec![
        vec![5, 9, 33, 2],
        vec![7, 100, 3],
        vec![40, 41, 42, 43, 44],
        vec![12, 13],
    ];
    let sampling = Sampling {
        temperature: 0.7,
        top_k: 0,
        top_p: 1.0,
    };
    let ro = rollout(
        &policy_model.net,
        None,
        None,
        &prompts,
        &RolloutOptions::new(8, sampling, 11, vec![]),
    )
    .unwrap();
    let adv = [1.0, -0.5, 0.25, -1.0];
    let scratch = common::scratch("rltt");
    let tag = format!("{name}-{weighting:?}");
    let (pol, refw) = (
        scratch.join(format!("{tag}-policy.safetensors")),
        scratch.join(format!("{tag}-ref.safetensors")),
    );
    save(&policy_model, &pol);
    save(&reference, &refw);
    let (kind, alpha) = match weighting {
        LoopWeighting::Uniform => ("uniform", 1.0),
        LoopWeighting::Progressive(a) => ("progressive", a),
        LoopWeighting::ExitPdf => ("exit_pdf", 1.0),
        LoopWeighting::Learned => ("learned", 1.0),
    };
    let beta = 0.05;
    let case = json!({
        "prompts": prompts, "tokens": ro.tokens(), "adv": adv, "temperature": 0.7, "beta": beta,
        "loops": loops, "kv_heads": policy_model.net.cfg.num_key_value_heads, "weighting": kind,
        "alpha": alpha, "theta": theta.map(|t| t[..loops].to_vec()),
    });
    let case_path = scratch.join(format!("{tag}.json"));
    std::fs::write(&case_path, case.to_string()).unwrap();
    let out = scratch.join(format!("{tag}-oracle.json"));
    common::run_python(
        "rltt_oracle.py",
        &[
            out.to_str().unwrap(),
            case_path.to_str().unwrap(),
            pol.to_str().unwrap(),
            refw.to_str().unwrap(),
        ],
    );
    let o: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();

    let mut policy = Policy::new(policy_model);
    policy.reference = Reference::Model(Box::new(reference.net));
    policy.loop_logits = theta.map(|t| Tensor::from_slice(&t[..loops]).set_requires_grad(true));
    let mut cfg = ReplayConfig::new(LossConfig {
        lambda: 0.0,
        beta,
        ..LossConfig::default()
    });
    cfg.loops = Some(weighting);
    cfg.micro_batch = 3;
    cfg.logits_chunk = Some(3);
    let m = accumulate_gradients(&policy, &ro, &adv, &cfg).unwrap();
    let want = o["loss"].as_f64().unwrap();
    assert!(
        (m.loss - want).abs() < 1e-5 * want.abs().max(1.0),
        "{tag}: loss {} vs pytorch {want}",
        m.loss
    );
    assert!(
        m.kl_token > 1e-4,
        "{tag}: the final-loop KL is not trivially 0 ({})",
        m.kl_token
    );
    let grads = policy.model.net.trainable();
    for n in names {
        let g = &grads.iter().find(|(k, _)| k == n).unwrap().1.grad();
        let want: Vec<f32> = serde_json::from_value(o[n].clone()).unwrap();
        let want = Tensor::from_slice(&want);
        let scale = want.abs().max().double_value(&[]).max(1e-3);
        let got = if g.defined() {
            g.flatten(0, -1)
        } else {
            want.zeros_like()
        };
        let d = common::max_abs_diff(&got, &want);
        // f32 through loops x layers passes: a few 1e-5 of the largest entry.
        assert!(
            d < 5e-5 * scale.max(1.0),
            "{tag}: {n} gradient differs by {d} (scale {scale})"
        );
        if n.starts_with("model.early_exit_gate") {
            // Only exit_pdf puts the gate in the loss.
            let norm = got.abs().max().double_value(&[]);
            match weighting {
                LoopWeighting::ExitPdf => assert!(norm > 1e-6, "{tag}: no gradient into the gate"),
                _ => assert_eq!(norm, 0.0, "{tag}: gate gradient {norm}"),
            }
        }
    }
    if let Some(th) = &policy.loop_logits {
        let want: Vec<f32> = serde_json::from_value(o["theta"].clone()).unwrap();
        let d = common::max_abs_diff(&th.grad(), &Tensor::from_slice(&want));
        assert!(d < 1e-6, "{tag}: loop-logit gradient differs by {d}");
        assert!(
            th.grad().abs().max().double_value(&[]) > 1e-6,
            "{tag}: the loop logits get gradient"
        );
    }
}

#[test]
fn rltt_loss_and_gradients_match_pytorch() {
    for name in ["ouro_gqa_t2_untied", "ouro_mha_t4_tied"] {
        case(name, LoopWeighting::Uniform, None);
        case(name, LoopWeighting::Progressive(1.5), None);
        case(name, LoopWeighting::ExitPdf, None);
        case(name, LoopWeighting::Learned, Some([0.3, -0.2, 0.1, 0.5]));
    }
}

#[test]
fn rltt_trains_from_a_script_with_every_weighting() {
    let dir = fixture("ouro_gqa_t2_untied", "script");
    let data = common::scratch("rltt").join("prompts.jsonl");
    let rows: String = ["the cat", "a sum of", "one and we", "to the cat"]
        .iter()
        .map(|p| format!("{{\"prompt\": \"{p}\", \"answer\": \"\"}}\n"))
        .collect();
    std::fs::write(&data, rows).unwrap();
    let plain = common::tiny_models().join("llama_mha_tied");
    let o = common::tarpo()
        .arg("run")
        .arg(common::root().join("tests/scripts/rltt.rhai"))
        .args(["--set", &format!("model={}", dir.display())])
        .args(["--set", &format!("plain={}", plain.display())])
        .args(["--set", &format!("data={}", data.display())])
        .output()
        .unwrap();
    let (so, se) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(
        o.status.success() && so.contains("rltt: ok"),
        "stdout:\n{so}\nstderr:\n{se}"
    );
}
