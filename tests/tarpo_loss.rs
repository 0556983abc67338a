//! The TARPO loss on a fixed rollout of a tiny model against an independent
//! PyTorch computation on the same weights (tests/oracle/tarpo_loss_oracle.py),
//! and the router gradient against finite differences.
mod common;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use tarpo::model::Model;
use tarpo::policy::replay::{self, ReplayBatch};
use tarpo::policy::{rollout, Rollout, RolloutOptions, Router, Sampling};
use tarpo::rl::loss::{policy_loss, LossConfig, LossInputs};
use tch::{Device, Kind, Tensor};

const BASE: &str = "llama_gqa_llama3_bias";

/// A copy of the tiny model with its decoder layers and embeddings perturbed,
/// as a fully fine-tuned policy would be (the reference then embeds the same
/// tokens and mixtures with its own table).
fn perturbed_policy(test: &str) -> PathBuf {
    let src = common::tiny_models().join(BASE);
    // One directory per test: tests run in parallel, and a rewrite while
    // another test loads the file corrupts that load.
    let dst = common::scratch("tarpo_loss").join(test).join("policy");
    std::fs::create_dir_all(&dst).unwrap();
    for f in ["config.json", "tokenizer.json", "generation_config.json"] {
        std::fs::copy(src.join(f), dst.join(f)).unwrap();
    }
    tch::manual_seed(7);
    let mut ts = Tensor::read_safetensors(src.join("model.safetensors")).unwrap();
    ts.sort_by(|a, b| a.0.cmp(&b.0)); // read order is not stable; the draws must be
    let ts: Vec<(String, Tensor)> = ts
        .into_iter()
        .map(|(n, t)| {
            if n.contains("layers") || n.contains("embed_tokens") {
                let p = &t + t.randn_like() * 0.05;
                (n, p)
            } else {
                (n, t)
            }
        })
        .collect();
    Tensor::write_safetensors(&ts, dst.join("model.safetensors")).unwrap();
    dst
}

struct Case {
    policy: Model,
    reference: Model,
    router: Router,
    router_ref: Router,
    ro: Rollout,
    batch: ReplayBatch,
    adv: Tensor,
}

/// Four prompts of different lengths, 12 tokens each at T 0.5, top-5 mixtures.
fn case_rollout(m: &Model, router: &Router) -> Rollout {
    let prompts = vec![
        vec![5, 9, 33, 2],
        vec![7, 100, 3],
        vec![40, 41, 42, 43, 44, 45],
        vec![12, 13],
    ];
    let mut opts = RolloutOptions::new(
        12,
        Sampling {
            temperature: 0.5,
            top_k: 0,
            top_p: 1.0,
        },
        17,
        vec![1],
    );
    opts.mix_k = 5;
    rollout(&m.net, Some(router), None, &prompts, &opts).unwrap()
}

fn case(test: &str) -> (Case, PathBuf) {
    let policy_dir = perturbed_policy(test);
    let policy = Model::load(&policy_dir, Device::Cpu, Kind::Float).unwrap();
    let reference =
        Model::load(&common::tiny_models().join(BASE), Device::Cpu, Kind::Float).unwrap();
    let router_ref = Router::new(policy.net.cfg.hidden_size, 0.3, 1.0, 5, Device::Cpu).unwrap();
    let router = Router::new(policy.net.cfg.hidden_size, 0.3, 1.0, 5, Device::Cpu).unwrap();
    tch::no_grad(|| {
        tch::manual_seed(3);
        let _ = router
            .weight
            .shallow_clone()
            .g_add_(&(router.weight.randn_like() * 0.2));
        let _ = router
            .bias
            .shallow_clone()
            .g_add_(&Tensor::from_slice(&[-0.3f32, 0.2]));
    });
    let ro = case_rollout(&policy, &router);
    let batch = replay::build(&policy.net, &ro, &[0, 1, 2, 3]).unwrap();
    let adv = Tensor::from_slice(&[1.0f32, -0.5, 0.25, -1.0]);
    (
        Case {
            policy,
            reference,
            router,
            router_ref,
            ro,
            batch,
            adv,
        },
        policy_dir,
    )
}

fn loss(c: &Case, cfg: &LossConfig) -> (Tensor, tarpo::rl::loss::LossMetrics) {
    let s = replay::score(&c.policy.net, Some(&c.router), &c.batch, c.ro.temperature).unwrap();
    // The reference embeds the rollout's inputs with its own table.
    let r = tch::no_grad(|| {
        let batch = replay::build(&c.reference.net, &c.ro, &[0, 1, 2, 3]).unwrap();
        replay::score(
            &c.reference.net,
            Some(&c.router_ref),
            &batch,
            c.ro.temperature,
        )
        .unwrap()
    });
    let x = LossInputs {
        logp_kl: None,
        logp: &s.logp,
        logp_ref: Some(&r.logp),
        logp_old: None,
        router_logp: s.router_logp.as_ref(),
        router_logp_ref: r.router_logp.as_ref(),
        router_logp_old: None,
        adv: &c.adv,
        mask: &c.batch.mask,
        router_mask: &c.batch.router_mask,
    };
    policy_loss(&x, cfg).unwrap()
}

fn write_case(c: &Case, dir: &Path) -> (PathBuf, PathBuf) {
    let records: Vec<Value> =
        c.ro.records
            .iter()
            .map(|recs| {
                recs.iter()
                    .map(|r| {
                        json!({"token": r.token, "mode": r.mode, "forced": r.forced,
                                "mix_ids": r.mix_ids, "mix_weights": r.mix_weights})
                    })
                    .collect()
            })
            .collect();
    let case = json!({
        "prompts": c.ro.prompts, "records": records, "adv": Vec::<f32>::try_from(&c.adv).unwrap(),
        "temperature": c.ro.temperature, "router_temperature": 1.0, "lambda": 0.1, "beta": 0.05,
    });
    let case_path = dir.join("case.json");
    std::fs::write(&case_path, case.to_string()).unwrap();
    let routers = dir.join("routers.safetensors");
    let d = |t: &Tensor| t.detach().copy();
    Tensor::write_safetensors(
        &[
            ("weight", d(&c.router.weight)),
            ("bias", d(&c.router.bias)),
            ("weight_ref", d(&c.router_ref.weight)),
            ("bias_ref", d(&c.router_ref.bias)),
        ],
        &routers,
    )
    .unwrap();
    (case_path, routers)
}

#[test]
fn tarpo_loss_and_router_gradient_match_pytorch_and_finite_differences() {
    let (c, policy_dir) = case("loss");
    let modes: Vec<i64> = c.ro.records.iter().flatten().map(|r| r.mode).collect();
    assert!(
        modes.contains(&0) && modes.contains(&1),
        "the rollout mixes hard and soft steps"
    );
    let cfg = LossConfig {
        lambda: 0.1,
        beta: 0.05,
        ..LossConfig::default()
    };
    let (l, metrics) = loss(&c, &cfg);
    l.backward();
    let grad_w = c.router.weight.grad();
    let grad_b = c.router.bias.grad();

    let dir = common::scratch("tarpo_loss");
    let (case_path, routers) = write_case(&c, &dir);
    let out = dir.join("oracle.json");
    let base = common::tiny_models().join(BASE);
    common::run_python(
        "tarpo_loss_oracle.py",
        &[
            out.to_str().unwrap(),
            policy_dir.to_str().unwrap(),
            base.to_str().unwrap(),
            case_path.to_str().unwrap(),
            routers.to_str().unwrap(),
        ],
    );
    let o: Value = serde_json::from_str(&std::fs::read_to_string(out).unwrap()).unwrap();
    let want = o["loss"].as_f64().unwrap();
    assert!(
        (metrics.loss - want).abs() < 1e-5,
        "loss {} vs pytorch {want}",
        metrics.loss
    );
    assert!(
        metrics.kl_token > 1e-4,
        "the KL term is not trivially zero: {}",
        metrics.kl_token
    );
    let kl_want = o["kl_token"].as_f64().unwrap();
    assert!(
        (metrics.kl_token - kl_want).abs() < 1e-5 * kl_want,
        "kl {} vs {kl_want}",
        metrics.kl_token
    );
    let gw: Vec<Vec<f64>> = serde_json::from_value(o["grad_weight"].clone()).unwrap();
    let gw = Tensor::from_slice(&gw.concat())
        .view([2, -1])
        .to_kind(Kind::Float);
    let gb: Vec<f64> = serde_json::from_value(o["grad_bias"].clone()).unwrap();
    let scale = gw.abs().max().double_value(&[]);
    assert!(scale > 1e-4, "router gradient is not trivially zero");
    assert!(
        common::max_abs_diff(&grad_w, &gw) < 1e-5 * scale.max(1.0),
        "router weight grad"
    );
    for (i, g) in gb.iter().enumerate() {
        assert!(
            (grad_b.double_value(&[i as i64]) - g).abs() < 1e-6,
            "router bias grad {i}"
        );
    }

    // Finite differences on the router weights with the largest gradients.
    let flat = grad_w.abs().flatten(0, -1);
    let top = Vec::<i64>::try_from(flat.topk(4, 0, true, true).1).unwrap();
    let h = c.policy.net.cfg.hidden_size;
    let eps = 1e-2;
    for idx in top {
        let (i, j) = (idx / h, idx % h);
        let at = |delta: f64| {
            tch::no_grad(|| {
                let _ = c
                    .router
                    .weight
                    .get(i)
                    .get(j)
                    .shallow_clone()
                    .g_add_(&Tensor::from(delta as f32));
            });
            let v = tch::no_grad(|| loss(&c, &cfg).1.loss);
            tch::no_grad(|| {
                let _ = c
                    .router
                    .weight
                    .get(i)
                    .get(j)
                    .shallow_clone()
                    .g_add_(&Tensor::from(-delta as f32));
            });
            v
        };
        let fd = (at(eps) - at(-eps)) / (2.0 * eps);
        let g = grad_w.double_value(&[i, j]);
        assert!(
            (fd - g).abs() < 2e-3 * g.abs().max(1e-3),
            "W[{i},{j}]: autograd {g} vs finite difference {fd}"
        );
    }
}

/// Runs the oracle on the case with the reference's inputs `ref_inputs`.
fn oracle(c: &Case, policy_dir: &Path, ref_inputs: &str) -> Value {
    let dir = common::scratch("tarpo_loss").join(ref_inputs);
    std::fs::create_dir_all(&dir).unwrap();
    let (case_path, routers) = write_case(c, &dir);
    let out = dir.join("oracle.json");
    let base = common::tiny_models().join(BASE);
    common::run_python(
        "tarpo_loss_oracle.py",
        &[
            out.to_str().unwrap(),
            policy_dir.to_str().unwrap(),
            base.to_str().unwrap(),
            case_path.to_str().unwrap(),
            routers.to_str().unwrap(),
            ref_inputs,
        ],
    );
    serde_json::from_str(&std::fs::read_to_string(out).unwrap()).unwrap()
}

/// The training path itself (`update::accumulate_gradients`: micro-batches,
/// the LM head in chunks, the reference against a frozen copy) with the
/// reference on the policy's inputs and on all-hard ones (the paper's code),
/// against the PyTorch oracle: loss, both KL terms and the router gradient.
#[test]
fn training_loss_matches_pytorch_with_same_and_hard_reference_inputs() {
    use tarpo::rl::policy::{Policy, Reference};
    use tarpo::rl::update::{accumulate_gradients, RefInputs, ReplayConfig};
    for (name, inputs) in [("same", RefInputs::Same), ("hard", RefInputs::Hard)] {
        let (c, policy_dir) = case("training");
        let o = oracle(&c, &policy_dir, name);
        let adv: Vec<f64> = Vec::<f32>::try_from(&c.adv)
            .unwrap()
            .into_iter()
            .map(f64::from)
            .collect();
        let mut policy = Policy::new(c.policy);
        policy.reference = Reference::Model(Box::new(c.reference.net));
        policy.router = Some(c.router);
        policy.router_ref = Some(c.router_ref);
        let mut cfg = ReplayConfig::new(LossConfig {
            lambda: 0.1,
            beta: 0.05,
            ..LossConfig::default()
        });
        cfg.ref_inputs = inputs;
        cfg.micro_batch = 3;
        cfg.logits_chunk = Some(5);
        let m = accumulate_gradients(&policy, &c.ro, &adv, &cfg).unwrap();
        let close = |got: f64, key: &str, tol: f64| {
            let want = o[key].as_f64().unwrap();
            assert!(
                (got - want).abs() <= tol * want.abs().max(1.0),
                "{name}: {key} {got} vs pytorch {want}"
            );
            want
        };
        close(m.loss, "loss", 1e-5);
        close(m.kl_token, "kl_token", 1e-5);
        let kl_router = close(m.kl_router, "kl_router", 1e-5);
        assert!(kl_router > 1e-4, "{name}: the router KL is not trivially 0");
        let r = policy.router.as_ref().unwrap();
        let gw: Vec<Vec<f64>> = serde_json::from_value(o["grad_weight"].clone()).unwrap();
        let gw = Tensor::from_slice(&gw.concat())
            .view([2, -1])
            .to_kind(Kind::Float);
        let scale = gw.abs().max().double_value(&[]);
        let d = common::max_abs_diff(&r.weight.grad(), &gw);
        assert!(d < 1e-5 * scale.max(1.0), "{name}: router weight grad {d}");
        let gb: Vec<f64> = serde_json::from_value(o["grad_bias"].clone()).unwrap();
        for (i, g) in gb.iter().enumerate() {
            let got = r.bias.grad().double_value(&[i as i64]);
            assert!(
                (got - g).abs() < 1e-6,
                "{name}: router bias grad {i}: {got} vs {g}"
            );
        }
    }
}

/// At initialisation (policy = reference, router = its reference) the router
/// KL is 0 on the same inputs; with all-hard reference inputs it stays near 0
/// (the router reference is scored at the policy's modes), where comparing
/// log pi(soft) with log pi_ref(hard) would give k3 = 0.49 per soft step at
/// p_soft = 0.3.
#[test]
fn router_kl_is_zero_at_initialisation() {
    use tarpo::rl::policy::Policy;
    use tarpo::rl::update::{accumulate_gradients, RefInputs, ReplayConfig};
    let model = Model::load(&common::tiny_models().join(BASE), Device::Cpu, Kind::Float).unwrap();
    let h = model.net.cfg.hidden_size;
    let router = Router::new(h, 0.3, 1.0, 5, Device::Cpu).unwrap();
    let ro = case_rollout(&model, &router);
    let soft = ro.records.iter().flatten().filter(|r| r.mode == 1).count();
    assert!(soft >= 5, "the rollout has soft steps: {soft}");
    let mut policy = Policy::new(model);
    policy.router_ref = Some(router.frozen_copy().unwrap());
    policy.router = Some(router);
    let adv = [1.0, -0.5, 0.25, -1.0];
    for (inputs, bound) in [(RefInputs::Same, 0.0), (RefInputs::Hard, 1e-3)] {
        let mut cfg = ReplayConfig::new(LossConfig::default());
        cfg.ref_inputs = inputs;
        let m = accumulate_gradients(&policy, &ro, &adv, &cfg).unwrap();
        assert!(
            m.kl_router <= bound,
            "{inputs:?}: router KL {} at init",
            m.kl_router
        );
        if inputs == RefInputs::Same {
            assert_eq!(m.kl_token, 0.0, "a frozen backbone is its own reference");
        } else {
            assert!(
                m.kl_token > 1e-4,
                "hard reference inputs differ from the policy's"
            );
        }
        for p in policy.parameters() {
            let _ = p.grad().f_zero_();
        }
    }
}
