//! Short CPU training runs on a tiny model and a learnable toy task: reward is
//! the fraction of digit characters in the completion. TARPO (LoRA + router)
//! and GRPO (LoRA only) must both raise the reward on held-out prompts.
mod common;
use tarpo::model::lora::LoraConfig;
use tarpo::model::Model;
use tarpo::policy::{rollout, Rng, RolloutOptions, Router, Sampling};
use tarpo::rl::loss::LossConfig;
use tarpo::rl::optim::{AdamW, AdamWConfig};
use tarpo::rl::train::{param_groups, Policy, RefInputs, Reference, TrainConfig, Trainer};
use tch::{Device, Kind};

fn digits(text: &str, _answer: &str) -> f64 {
    let chars: Vec<char> = text.chars().filter(|c| !c.is_whitespace()).collect();
    if chars.is_empty() {
        return 0.0;
    }
    chars.iter().filter(|c| c.is_ascii_digit()).count() as f64 / chars.len() as f64
}

fn prompts(n: usize, seed: u64) -> Vec<Vec<i64>> {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|_| {
            (0..4 + rng.next_u64() % 4)
                .map(|_| 2 + (rng.next_u64() % 300) as i64)
                .collect()
        })
        .collect()
}

fn rollout_opts(seed: u64) -> RolloutOptions {
    let mut o = RolloutOptions::new(
        10,
        Sampling {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
        },
        seed,
        vec![],
    );
    o.mix_k = 4;
    o
}

fn trainer(with_router: bool) -> Trainer {
    let mut model = Model::load(
        &common::tiny_models().join("llama_mha_tied"),
        Device::Cpu,
        Kind::Float,
    )
    .unwrap();
    model
        .net
        .attach_lora(&LoraConfig {
            seed: 1,
            ..LoraConfig::new(8, 16.0)
        })
        .unwrap();
    let h = model.net.cfg.hidden_size;
    let router = with_router.then(|| Router::new(h, 0.2, 1.0, 2, Device::Cpu).unwrap());
    let router_ref = router.as_ref().map(|r| r.frozen_copy().unwrap());
    let policy = Policy {
        model,
        router,
        router_ref,
        reference: Reference::Base,
    };
    let opt = AdamW::new(
        param_groups(&policy, 2e-2, 2e-2, 0.0),
        AdamWConfig::default(),
    )
    .unwrap();
    let cfg = TrainConfig {
        group: 8,
        rollout: rollout_opts(0),
        estimator: "grpo".into(),
        loss: LossConfig {
            lambda: 0.1,
            beta: 0.001,
            ..LossConfig::default()
        },
        micro_batch: 16,
        ref_inputs: RefInputs::Same,
        score_temperature: None,
    };
    Trainer {
        policy,
        opt,
        cfg,
        step: 0,
        rng: Rng::new(3),
    }
}

/// Mean reward of 8 samples per held-out prompt.
fn held_out_reward(t: &Trainer) -> f64 {
    let p = &t.policy;
    let held: Vec<Vec<i64>> = prompts(16, 999)
        .into_iter()
        .flat_map(|q| std::iter::repeat_n(q, 8))
        .collect();
    let ro = rollout(
        &p.model.net,
        p.router.as_ref(),
        None,
        &held,
        &rollout_opts(77),
    )
    .unwrap();
    let r: Vec<f64> = ro
        .tokens()
        .iter()
        .map(|toks| digits(&p.model.tok.decode(toks, true).unwrap(), ""))
        .collect();
    r.iter().sum::<f64>() / r.len() as f64
}

fn train(with_router: bool) -> (f64, f64, Vec<f64>) {
    let mut t = trainer(with_router);
    let before = held_out_reward(&t);
    let train = prompts(64, 1);
    let answers = vec![String::new(); 4];
    let mut rewards = Vec::new();
    for step in 0..25 {
        let batch: Vec<Vec<i64>> = (0..4).map(|i| train[(step * 4 + i) % 64].clone()).collect();
        let m = t.step(&batch, &answers, &digits).unwrap();
        assert!(!m.skipped && m.loss.is_finite());
        if with_router {
            assert!(m.soft_ratio > 0.0, "TARPO takes soft steps");
        } else {
            assert_eq!(m.soft_ratio, 0.0);
        }
        rewards.push(m.reward);
    }
    (before, held_out_reward(&t), rewards)
}

#[test]
fn tarpo_and_grpo_raise_held_out_reward() {
    for with_router in [true, false] {
        let name = if with_router { "TARPO" } else { "GRPO" };
        let (before, after, curve) = train(with_router);
        eprintln!("{name}: held-out reward {before:.3} -> {after:.3}; train curve {curve:.2?}");
        assert!(
            after > before + 0.1 && after > 2.0 * before,
            "{name}: {before:.3} -> {after:.3}"
        );
    }
}
