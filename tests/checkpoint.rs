//! Checkpoints through `checkpoint::{save_parts, load_parts}`: a fully
//! fine-tuned policy with a router restores exactly (its next step equals the
//! straight run's), and a damaged checkpoint is a clear error naming the file.
mod common;
use tarpo::model::Model;
use tarpo::policy::{rollout, RolloutOptions, Router, Sampling};
use tarpo::rl::checkpoint::{self, Parts};
use tarpo::rl::dataset::Sampler;
use tarpo::rl::loss::LossConfig;
use tarpo::rl::optim::{AdamW, AdamWConfig};
use tarpo::rl::policy::{param_groups, Policy};
use tarpo::rl::update::{accumulate_gradients, ReplayConfig};
use tch::{Device, Kind, Tensor};

/// A fully trainable tiny model with a router, and its optimizer.
fn setup() -> (Policy, AdamW) {
    let m = Model::load(
        &common::tiny_models().join("qwen2_gqa_untied_linear"),
        Device::Cpu,
        Kind::Float,
    )
    .unwrap();
    m.net.set_trainable(&["*".into()]).unwrap();
    let router = Router::new(m.net.cfg.hidden_size, 0.3, 1.0, 8, Device::Cpu).unwrap();
    let mut policy = Policy::new(m);
    policy.freeze_reference().unwrap();
    policy.router_ref = Some(router.frozen_copy().unwrap());
    policy.router = Some(router);
    let opt = AdamW::new(
        param_groups(&policy, 1e-2, 1e-2, 0.1),
        AdamWConfig::default(),
    )
    .unwrap();
    (policy, opt)
}

/// One training step on a fixed rollout seed; returns the loss.
fn step(policy: &Policy, opt: &mut AdamW, seed: u64) -> f64 {
    let opts = RolloutOptions::new(
        6,
        Sampling {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
        },
        seed,
        vec![1],
    );
    let prompts: Vec<Vec<i64>> = (0..4).map(|i| vec![5 + i, 9, 33]).collect();
    let ro = rollout(
        &policy.model.net,
        policy.router.as_ref(),
        None,
        &prompts,
        &opts,
    )
    .unwrap();
    let adv = [1.0, -1.0, 0.5, -0.5];
    let m =
        accumulate_gradients(policy, &ro, &adv, &ReplayConfig::new(LossConfig::default())).unwrap();
    opt.step().unwrap();
    opt.zero_grad().unwrap();
    m.loss
}

fn weights(p: &Policy) -> Vec<Tensor> {
    let mut out: Vec<Tensor> = p
        .model
        .net
        .tensors()
        .iter()
        .map(|t| t.detach().copy())
        .collect();
    out.extend(p.parameters().iter().map(|t| t.detach().copy()));
    out
}

fn save(p: &Policy, opt: &AdamW, dir: &std::path::Path) -> std::path::PathBuf {
    let sampler = Sampler::new(3);
    let parts = Parts {
        policy: p,
        opt,
        step: opt.step_count(),
        run_step: opt.step_count(),
        rng: 77,
        sampler: Some(&sampler),
    };
    checkpoint::save_parts(&parts, dir).unwrap()
}

#[test]
fn full_fine_tuning_resumes_exactly() {
    let (p, mut opt) = setup();
    step(&p, &mut opt, 1);
    let dir = common::scratch("checkpoint").join("full");
    let _ = std::fs::remove_dir_all(&dir);
    let ckpt = save(&p, &opt, &dir);
    assert!(ckpt.join("weights.safetensors").exists());
    let straight = step(&p, &mut opt, 2);

    let (q, mut opt2) = setup();
    let got = checkpoint::load_parts(&q, &mut opt2, &ckpt).unwrap();
    assert_eq!((got.step, got.rng, got.sampler.is_some()), (1, 77, true));
    let resumed = step(&q, &mut opt2, 2);
    assert_eq!(resumed, straight, "the step after resume");
    for (a, b) in weights(&p).iter().zip(&weights(&q)) {
        assert!(a.equal(b), "a weight differs after the resumed step");
    }
}

#[test]
fn a_damaged_checkpoint_is_a_clear_error() {
    let (p, mut opt) = setup();
    step(&p, &mut opt, 1);
    let dir = common::scratch("checkpoint").join("damaged");
    let _ = std::fs::remove_dir_all(&dir);
    let ckpt = save(&p, &opt, &dir);
    let (q, mut opt2) = setup();
    let before = weights(&q);
    let load = |q: &Policy, opt: &mut AdamW| {
        format!("{:#}", checkpoint::load_parts(q, opt, &ckpt).unwrap_err())
    };
    let router = std::fs::read(ckpt.join("router.safetensors")).unwrap();
    std::fs::write(ckpt.join("router.safetensors"), b"junk").unwrap();
    let err = load(&q, &mut opt2);
    assert!(
        err.contains("router.safetensors: 4 bytes, the manifest says"),
        "{err}"
    );
    std::fs::write(ckpt.join("router.safetensors"), router).unwrap();
    std::fs::remove_file(ckpt.join("state.json")).unwrap();
    let err = load(&q, &mut opt2);
    assert!(
        err.contains("state.json: missing (listed in manifest.json)"),
        "{err}"
    );
    // Nothing was loaded from the damaged checkpoint (never half of one).
    for (a, b) in before.iter().zip(&weights(&q)) {
        assert!(a.equal(b), "a weight changed");
    }
    assert_eq!(opt2.step_count(), 0);
}

#[test]
fn a_checkpoint_that_does_not_fit_loads_nothing() {
    // The policy also has RLTT loop weights, which the checkpoint lacks:
    // refused at the last file, after the weights and the router were read
    // and before anything was copied.
    let (p, mut opt) = setup();
    step(&p, &mut opt, 1);
    let dir = common::empty_scratch("checkpoint-mismatch");
    let ckpt = save(&p, &opt, &dir);
    let (mut q, mut opt2) = setup();
    q.loop_logits = Some(Tensor::zeros([4], (Kind::Float, Device::Cpu)).set_requires_grad(true));
    let before = weights(&q);
    let err = format!(
        "{:#}",
        checkpoint::load_parts(&q, &mut opt2, &ckpt).unwrap_err()
    );
    assert!(
        err.contains("loop_weights.safetensors: cannot read"),
        "{err}"
    );
    for (a, b) in before.iter().zip(&weights(&q)) {
        assert!(a.equal(b), "a weight changed");
    }
    assert_eq!(opt2.step_count(), 0, "the optimizer state was not loaded");
}
