//! Exact resume on CPU: 6 steps straight, and 3 steps + checkpoint + a fresh
//! trainer restored from it + 3 steps, give identical losses and weights.
mod common;
use tarpo::model::lora::LoraConfig;
use tarpo::model::Model;
use tarpo::policy::{Rng, RolloutOptions, Router, Sampling};
use tarpo::rl::checkpoint;
use tarpo::rl::dataset::Sampler;
use tarpo::rl::loss::LossConfig;
use tarpo::rl::optim::{AdamW, AdamWConfig, Schedule, ScheduleKind};
use tarpo::rl::train::{param_groups, Policy, RefInputs, Reference, TrainConfig, Trainer};
use tarpo::rl::update::ReplayConfig;
use tch::{Device, Kind, Tensor};

fn digits(text: &str, _: &str) -> f64 {
    let n = text.chars().filter(|c| !c.is_whitespace()).count().max(1);
    text.chars().filter(|c| c.is_ascii_digit()).count() as f64 / n as f64
}

fn trainer() -> Trainer {
    let mut model = Model::load(
        &common::tiny_models().join("qwen2_gqa_untied_linear"),
        Device::Cpu,
        Kind::Float,
    )
    .unwrap();
    model
        .net
        .attach_lora(&LoraConfig {
            seed: 4,
            ..LoraConfig::new(4, 8.0)
        })
        .unwrap();
    let router = Router::new(model.net.cfg.hidden_size, 0.3, 1.0, 8, Device::Cpu).unwrap();
    let router_ref = Some(router.frozen_copy().unwrap());
    let policy = Policy {
        model,
        router: Some(router),
        router_ref,
        gate: None,
        reference: Reference::Base,
    };
    let schedule = Schedule::with_warmup_fraction(ScheduleKind::Cosine, 0.34, 6, 0.1).unwrap();
    let opt = AdamW::new(
        param_groups(&policy, 1e-2, 1e-2, 0.1),
        AdamWConfig {
            schedule,
            ..AdamWConfig::default()
        },
    )
    .unwrap();
    let mut rollout = RolloutOptions::new(
        8,
        Sampling {
            temperature: 1.0,
            top_k: 20,
            top_p: 0.9,
        },
        0,
        vec![1],
    );
    rollout.mix_k = 3;
    let cfg = TrainConfig {
        group: 4,
        rollout,
        estimator: "grpo".into(),
        replay: ReplayConfig {
            loss: LossConfig {
                lambda: 0.1,
                beta: 0.01,
                ..LossConfig::default()
            },
            micro_batch: 3,
            ref_inputs: RefInputs::Same,
            score_temperature: None,
        },
        overlong: None,
        epochs: 1,
    };
    Trainer {
        policy,
        opt,
        cfg,
        step: 0,
        rng: Rng::new(11),
    }
}

/// Runs `n` steps on prompts drawn by the sampler; returns the losses.
fn run(t: &mut Trainer, sampler: &mut Sampler, n: usize) -> Vec<f64> {
    let data: Vec<Vec<i64>> = (0..10)
        .map(|i| vec![3 + i, 50 + 2 * i, 7, 90 + i])
        .collect();
    (0..n)
        .map(|_| {
            let idx = sampler.next(data.len(), 2).unwrap();
            let prompts: Vec<Vec<i64>> = idx.iter().map(|&i| data[i].clone()).collect();
            t.step(&prompts, &vec![String::new(); 2], &digits)
                .unwrap()
                .loss
        })
        .collect()
}

fn weights(t: &Trainer) -> Vec<Tensor> {
    let mut w = t.policy.model.net.lora_parameters();
    w.extend(t.policy.router.as_ref().unwrap().parameters());
    w.into_iter().map(|x| x.detach().copy()).collect()
}

#[test]
fn three_plus_resume_plus_three_equals_six() {
    let mut straight = trainer();
    let mut s = Sampler::new(5);
    let losses6 = run(&mut straight, &mut s, 6);

    let mut first = trainer();
    let mut s1 = Sampler::new(5);
    let mut losses = run(&mut first, &mut s1, 3);
    let dir = common::scratch("resume").join("run");
    let _ = std::fs::remove_dir_all(&dir);
    let ckpt = checkpoint::save(&first, Some(&s1), &dir).unwrap();
    assert_eq!(checkpoint::latest(&dir).unwrap().unwrap(), ckpt);
    drop(first);

    let mut resumed = trainer();
    let mut s2 = checkpoint::load(&mut resumed, &ckpt).unwrap().unwrap();
    assert_eq!(resumed.step, 3);
    losses.extend(run(&mut resumed, &mut s2, 3));
    assert_eq!(losses, losses6, "losses");
    for (a, b) in weights(&straight).iter().zip(weights(&resumed).iter()) {
        assert!(a.equal(b), "weights differ after resume");
    }
    // The run really trained: weights moved away from the start.
    let fresh = trainer();
    assert!(weights(&fresh)
        .iter()
        .zip(weights(&straight).iter())
        .any(|(a, b)| !a.equal(b)));
}

#[test]
fn a_damaged_checkpoint_is_a_clear_error() {
    let mut t = trainer();
    let mut s = Sampler::new(1);
    run(&mut t, &mut s, 1);
    let dir = common::scratch("resume").join("damaged");
    let _ = std::fs::remove_dir_all(&dir);
    let ckpt = checkpoint::save(&t, Some(&s), &dir).unwrap();
    std::fs::write(ckpt.join("router.safetensors"), b"junk").unwrap();
    let err = format!("{:#}", checkpoint::load(&mut trainer(), &ckpt).unwrap_err());
    assert!(err.contains("router.safetensors"), "{err}");
    std::fs::remove_file(ckpt.join("state.json")).unwrap();
    let err = format!("{:#}", checkpoint::load(&mut trainer(), &ckpt).unwrap_err());
    assert!(
        err.contains("state.json") && err.contains("cannot read"),
        "{err}"
    );
}
