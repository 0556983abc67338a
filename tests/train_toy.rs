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
use tarpo::rl::update::ReplayConfig;
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
        gate: None,
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
        replay: ReplayConfig {
            loss: LossConfig {
                lambda: 0.1,
                beta: 0.001,
                ..LossConfig::default()
            },
            micro_batch: 16,
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

#[test]
fn dynamic_sampling_keeps_only_informative_groups() {
    let mut t = trainer(false);
    // Answer "flat" makes every completion of that prompt score 0.5: no signal.
    let reward = |text: &str, answer: &str| {
        if answer == "flat" {
            0.5
        } else {
            digits(text, answer)
        }
    };
    let pool = prompts(8, 4);
    let mut drawn = 0usize;
    let mut next = |k: usize| -> anyhow::Result<(Vec<Vec<i64>>, Vec<String>)> {
        let mut ps = Vec::new();
        let mut ans = Vec::new();
        for _ in 0..k {
            ps.push(pool[drawn % pool.len()].clone());
            ans.push(if drawn.is_multiple_of(2) {
                "flat".to_string()
            } else {
                String::new()
            });
            drawn += 1;
        }
        Ok((ps, ans))
    };
    let m = t.step_dynamic(2, 4, &mut next, &reward).unwrap();
    assert!(!m.skipped);
    // Round 1 draws 2 prompts (one flat), round 2 draws 1 more (flat), round 3 one (informative).
    assert_eq!(drawn, 4);
    assert!((m.zero_adv_frac - 0.5).abs() < 1e-12, "{}", m.zero_adv_frac);
    assert!(m.reward < 0.5, "flat groups were dropped: {}", m.reward);
    // With only flat prompts, nothing is left to train on and the step is skipped.
    let mut flat = |k: usize| -> anyhow::Result<(Vec<Vec<i64>>, Vec<String>)> {
        Ok((pool[..k].to_vec(), vec!["flat".to_string(); k]))
    };
    let m = t.step_dynamic(2, 2, &mut flat, &reward).unwrap();
    assert!(m.skipped && m.zero_adv_frac == 1.0);
}

#[test]
fn overlong_penalty_is_added_to_the_reward() {
    let mut t = trainer(false);
    let zero = |_: &str, _: &str| 0.0;
    let batch = prompts(2, 8);
    let answers = vec![String::new(); 2];
    // 10 tokens, no stop token: past max_len 6 the penalty is -1 for every completion.
    t.cfg.overlong = Some((6, 2));
    assert_eq!(t.step(&batch, &answers, &zero).unwrap().reward, -1.0);
    // Within max_len - cache nothing changes.
    t.cfg.overlong = Some((20, 5));
    assert_eq!(t.step(&batch, &answers, &zero).unwrap().reward, 0.0);
    // In the soft band: len 10, max 12, cache 4 -> (12 - 4 - 10) / 4 = -0.5.
    t.cfg.overlong = Some((12, 4));
    assert_eq!(t.step(&batch, &answers, &zero).unwrap().reward, -0.5);
}

#[test]
fn ppo_epochs_reuse_one_rollout() {
    let mut t = trainer(false);
    t.cfg.epochs = 3;
    let batch = prompts(2, 8);
    let answers = vec![String::new(); 2];
    let err = t.step(&batch, &answers, &digits).unwrap_err().to_string();
    assert!(err.contains("needs the PPO clip"), "{err}");
    t.cfg.replay.loss.clip = Some((0.2, 0.28));
    let m = t.step(&batch, &answers, &digits).unwrap();
    assert_eq!(t.step, 3, "three optimizer steps on one rollout");
    assert!(m.loss.is_finite() && !m.skipped);
}

#[test]
fn hrpo_trains_its_gate_through_the_same_step() {
    use tarpo::policy::{HrpoGate, Latent};
    let mut t = trainer(false);
    let h = t.policy.model.net.cfg.hidden_size;
    t.policy.gate = Some(HrpoGate::new(h, 5, Device::Cpu).unwrap());
    t.opt = AdamW::new(
        param_groups(&t.policy, 2e-2, 1e-2, 0.0),
        AdamWConfig::default(),
    )
    .unwrap();
    t.cfg.rollout.latent = Latent::Hrpo;
    let before: Vec<_> = t
        .policy
        .gate
        .as_ref()
        .unwrap()
        .parameters()
        .iter()
        .map(|p| p.detach().copy())
        .collect();
    let batch = prompts(2, 8);
    // A reward that always varies within a group, so every group carries signal.
    let text_len = |text: &str, _: &str| text.len() as f64;
    let m = t.step(&batch, &vec![String::new(); 2], &text_len).unwrap();
    assert!(!m.skipped && m.loss.is_finite() && m.zero_adv_frac == 0.0);
    assert!(
        m.soft_ratio > 0.5,
        "HRPO steps are latent before the marker: {}",
        m.soft_ratio
    );
    let after = t.policy.gate.as_ref().unwrap().parameters();
    let moved: Vec<bool> = before
        .iter()
        .zip(&after)
        .map(|(b, a)| !b.equal(a))
        .collect();
    assert!(
        moved.iter().all(|&m| m),
        "every gate tensor moved: {moved:?}"
    );
}
