//! The pieces of a training step that surround the loss: gradient
//! accumulation across rollouts, full fine-tuning with its frozen reference,
//! router-only training, the KL reference of a warm start, and Coconut's
//! continuous thoughts in the loss.
mod common;
use tarpo::model::Model;
use tarpo::policy::{rollout, Latent, Rollout, RolloutOptions, Router, Sampling, LATENT};
use tarpo::rl::advantage;
use tarpo::rl::loss::LossConfig;
use tarpo::rl::loss_agg::Norm;
use tarpo::rl::optim::{AdamW, AdamWConfig};
use tarpo::rl::policy::{param_groups, Policy, Reference};
use tarpo::rl::update::{accumulate_gradients, backward, finish, LossSums, ReplayConfig};
use tch::{Device, Kind, Tensor};

fn model() -> Model {
    Model::load(
        &common::tiny_models().join("llama_mha_tied"),
        Device::Cpu,
        Kind::Float,
    )
    .unwrap()
}

fn options(max_new: usize, seed: u64) -> RolloutOptions {
    // Many stop tokens: completions of many lengths (what tells the norms apart).
    let mut o = RolloutOptions::new(
        max_new,
        Sampling {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
        },
        seed,
        (1..40).collect(),
    );
    o.mix_k = 4;
    o
}

/// `n` prompts, each repeated `group` times.
fn prompts(n: usize, group: usize) -> Vec<Vec<i64>> {
    (0..n)
        .flat_map(|i| std::iter::repeat_n(vec![50 + i as i64, 60, 70 + 3 * i as i64], group))
        .collect()
}

fn grads(params: &[Tensor]) -> Vec<Tensor> {
    params.iter().map(|p| p.grad().copy()).collect()
}

fn zero(params: &[Tensor]) {
    for p in params {
        let g = p.grad();
        if g.defined() {
            let _ = g.detach().f_zero_();
        }
    }
}

/// Largest difference relative to the largest entry, over all tensors.
fn rel_diff(a: &[Tensor], b: &[Tensor]) -> f64 {
    let scale = a
        .iter()
        .map(|t| t.abs().max().double_value(&[]))
        .fold(0.0, f64::max);
    let d = a
        .iter()
        .zip(b)
        .map(|(x, y)| common::max_abs_diff(x, y))
        .fold(0.0, f64::max);
    assert!(scale > 0.0, "gradients are zero");
    d / scale
}

/// A LoRA policy with a router whose adapters already moved (so policy and
/// reference differ and the KL is not 0).
fn lora_policy() -> Policy {
    let mut m = model();
    tch::manual_seed(11);
    common::attach_moved_lora(&mut m.net, 0.05);
    let router = Router::new(m.net.cfg.hidden_size, 0.3, 1.0, 3, Device::Cpu).unwrap();
    let mut policy = Policy::new(m);
    policy.router_ref = Some(router.frozen_copy().unwrap());
    policy.router = Some(router);
    policy
}

#[test]
fn four_accumulated_chunks_equal_one_batch_in_every_norm() {
    let group = 4;
    let policy = lora_policy();
    let ro = rollout(
        &policy.model.net,
        policy.router.as_ref(),
        None,
        &prompts(8, group),
        &options(9, 3),
    )
    .unwrap();
    let lens = ro.lengths();
    assert!(
        lens.iter().min() < lens.iter().max(),
        "completions of several lengths: {lens:?}"
    );
    let rewards: Vec<f64> = lens.iter().map(|&n| (n % 3) as f64).collect();
    let adv = advantage::compute(&rewards, group, "grpo").unwrap();
    let params = policy.parameters();
    for norm in [
        Norm::SeqMeanTokenMean,
        Norm::TokenMean,
        Norm::SeqMeanTokenSumNorm,
    ] {
        let mut cfg = ReplayConfig::new(LossConfig {
            norm,
            max_len: 9,
            ..LossConfig::default()
        });
        cfg.micro_batch = 3; // smaller than a chunk of 2 prompts x 4
        zero(&params);
        let whole = accumulate_gradients(&policy, &ro, &adv, &cfg).unwrap();
        let want = grads(&params);

        zero(&params);
        let mut sums = LossSums::new(&cfg.loss);
        for c in 0..4 {
            let rows: Vec<usize> = (c * 8..(c + 1) * 8).collect();
            let part: Rollout = ro.select(&rows);
            let a: Vec<f64> = rows.iter().map(|&i| adv[i]).collect();
            sums.add(&backward(&policy, &part, &a, &cfg).unwrap())
                .unwrap();
        }
        let acc = finish(&params, &sums).unwrap();
        let d = rel_diff(&want, &grads(&params));
        assert!(d < 1e-5, "{norm}: accumulated gradients differ by {d:e}");
        assert!(
            (acc.loss - whole.loss).abs() < 1e-6,
            "{norm}: loss {} vs {}",
            acc.loss,
            whole.loss
        );
        assert!((acc.kl_token - whole.kl_token).abs() < 1e-7 && whole.kl_token > 0.0);
        assert!((acc.kl_router - whole.kl_router).abs() < 1e-7);
        let gh = (acc.grad_hidden_norm - whole.grad_hidden_norm).abs();
        assert!(
            gh < 1e-5 * whole.grad_hidden_norm,
            "{norm}: grad_hidden_norm"
        );

        // Weighting the chunks equally instead would not be the same batch.
        if norm != Norm::SeqMeanTokenMean {
            zero(&params);
            for c in 0..4 {
                let rows: Vec<usize> = (c * 8..(c + 1) * 8).collect();
                let a: Vec<f64> = rows.iter().map(|&i| adv[i]).collect();
                accumulate_gradients(&policy, &ro.select(&rows), &a, &cfg).unwrap();
            }
            for p in &params {
                let _ = p.grad().detach().f_div_scalar_(4.0);
            }
            let naive = rel_diff(&want, &grads(&params));
            assert!(
                naive > 1e-3,
                "{norm}: the test can tell weightings apart ({naive:e})"
            );
        }
    }
}

#[test]
fn accumulating_different_normalisations_is_refused() {
    let a = LossSums::new(&LossConfig::default());
    let mut b = LossSums::new(&LossConfig {
        norm: Norm::TokenMean,
        ..LossConfig::default()
    });
    let e = b.add(&a).unwrap_err().to_string();
    assert!(e.contains("one normalisation"), "{e}");
}

/// Every trainable weight of a fully fine-tuned model moves in one step, the
/// frozen reference copy does not, and the KL is 0 before the first step.
#[test]
fn full_fine_tuning_trains_every_weight_against_a_frozen_copy() {
    let m = model();
    let names = m.net.set_trainable(&["*".into()]).unwrap();
    assert_eq!(names.len(), m.net.named_tensors().len());
    let start: Vec<Tensor> = m.net.tensors().iter().map(|t| t.detach().copy()).collect();
    let router = Router::new(m.net.cfg.hidden_size, 0.3, 1.0, 3, Device::Cpu).unwrap();
    let mut policy = Policy::new(m);
    assert!(matches!(policy.reference, Reference::Own));
    policy.freeze_reference().unwrap();
    assert!(matches!(policy.reference, Reference::Model(_)));
    policy.router_ref = Some(router.frozen_copy().unwrap());
    policy.router = Some(router);
    let groups = param_groups(&policy, 1e-2, 1e-2, 0.1);
    let names: Vec<&str> = groups.iter().map(|g| g.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "backbone",
            "backbone_no_decay",
            "router_weight",
            "router_bias"
        ]
    );
    assert!(groups[1].params.iter().all(|p| p.dim() == 1) && groups[1].weight_decay == 0.0);
    let mut opt = AdamW::new(groups, AdamWConfig::default()).unwrap();

    let net = &policy.model.net;
    let ro = rollout(
        net,
        policy.router.as_ref(),
        None,
        &prompts(2, 4),
        &options(8, 5),
    )
    .unwrap();
    let rewards: Vec<f64> = ro.lengths().iter().map(|&n| n as f64).collect();
    let adv = advantage::compute(&rewards, 4, "grpo").unwrap();
    let cfg = ReplayConfig::new(LossConfig::default());
    let before = accumulate_gradients(&policy, &ro, &adv, &cfg).unwrap();
    assert!(
        before.kl_token.abs() < 1e-9,
        "KL before the first step: {}",
        before.kl_token
    );
    assert!(
        before.kl_router.abs() < 1e-12,
        "router KL before the first step"
    );
    assert!(!opt.step().unwrap().skipped);
    opt.zero_grad().unwrap();

    let now = policy.model.net.named_tensors();
    for ((name, t), s) in now.iter().zip(&start) {
        assert!(!t.equal(s), "{name} did not move");
    }
    let Reference::Model(reference) = &policy.reference else {
        unreachable!()
    };
    for (t, s) in reference.tensors().iter().zip(&start) {
        assert!(t.equal(s) && !t.requires_grad(), "the reference moved");
    }
    let after = accumulate_gradients(&policy, &ro, &adv, &cfg).unwrap();
    assert!(after.kl_token > 1e-6, "KL after a step: {}", after.kl_token);
}

#[test]
fn a_subset_of_weights_trains_by_name() {
    let m = model();
    let chosen = m
        .net
        .set_trainable(&["layers.1.*".into(), "norm".into()])
        .unwrap();
    assert!(chosen
        .iter()
        .all(|n| n.starts_with("model.layers.1.") || n == "model.norm.weight"));
    assert!(chosen.contains(&"model.norm.weight".to_string()) && chosen.len() == 10);
    let e = m
        .net
        .set_trainable(&["layer.*".into()])
        .unwrap_err()
        .to_string();
    assert!(e.contains("\"layer.*\" selects no weight"), "{e}");
}

/// A frozen backbone (router-only training) is its own reference: the token
/// KL is exactly 0, the router's KL is against the router's start, and only
/// the router trains.
#[test]
fn router_only_training_is_its_own_reference() {
    let m = model();
    let start: Vec<Tensor> = m.net.tensors().iter().map(|t| t.detach().copy()).collect();
    let router = Router::new(m.net.cfg.hidden_size, 0.3, 1.0, 3, Device::Cpu).unwrap();
    let mut policy = Policy::new(m);
    policy.freeze_reference().unwrap();
    assert!(
        matches!(policy.reference, Reference::Own),
        "nothing to copy"
    );
    policy.router_ref = Some(router.frozen_copy().unwrap());
    policy.router = Some(router);
    let mut opt = AdamW::new(
        param_groups(&policy, 1e-2, 5e-2, 0.0),
        AdamWConfig::default(),
    )
    .unwrap();
    let net = &policy.model.net;
    let ro = rollout(
        net,
        policy.router.as_ref(),
        None,
        &prompts(2, 4),
        &options(8, 6),
    )
    .unwrap();
    let rewards: Vec<f64> = ro
        .records
        .iter()
        .map(|r| r.iter().filter(|t| t.mode == 1).count() as f64)
        .collect();
    let adv = advantage::compute(&rewards, 4, "grpo").unwrap();
    let cfg = ReplayConfig::new(LossConfig::default());
    accumulate_gradients(&policy, &ro, &adv, &cfg).unwrap();
    opt.step().unwrap();
    opt.zero_grad().unwrap();
    let m = accumulate_gradients(&policy, &ro, &adv, &cfg).unwrap();
    assert_eq!(m.kl_token, 0.0);
    assert!(m.kl_router > 0.0, "the router moved from its reference");
    for (t, s) in policy.model.net.tensors().iter().zip(&start) {
        assert!(t.equal(s), "a frozen weight moved");
    }
}

/// After a warm start from a saved adapter the KL reference is base + that
/// adapter (KL 0 before training), not the bare base model.
#[test]
fn a_warm_start_is_its_own_kl_reference() {
    let trained = lora_policy();
    let dir = common::scratch("train_loop").join("warm_adapter");
    trained.model.save_lora(&dir).unwrap();
    let mut m = model();
    m.load_lora(&dir).unwrap();
    let policy = Policy::new(m);
    assert!(matches!(policy.reference, Reference::Base));
    let net = &policy.model.net;
    let ro = rollout(net, None, None, &prompts(2, 4), &options(8, 7)).unwrap();
    let adv = vec![0.5; 8];
    let mut cfg = ReplayConfig::new(LossConfig {
        lambda: 0.0,
        ..LossConfig::default()
    });
    cfg.micro_batch = 4;
    let m = accumulate_gradients(&policy, &ro, &adv, &cfg).unwrap();
    assert!(
        m.kl_token.abs() < 1e-9,
        "KL to the warm start: {}",
        m.kl_token
    );
    // Against the bare base the same rollout has a clear KL: the test can fail.
    net.set_lora_enabled(false);
    let base = tarpo::policy::replay::score(
        net,
        None,
        &tarpo::policy::replay::build(net, &ro, &[0, 1]).unwrap(),
        1.0,
    )
    .unwrap();
    net.set_lora_enabled(true);
    let own = tarpo::policy::replay::score(
        net,
        None,
        &tarpo::policy::replay::build(net, &ro, &[0, 1]).unwrap(),
        1.0,
    )
    .unwrap();
    let d = common::max_abs_diff(&base.logp.detach(), &own.logp.detach());
    assert!(d > 1e-3, "the loaded adapter changes the model ({d})");
}

/// Coconut's thoughts: no token sampled, none in the text, none in the
/// token loss (checked against a hand computation over the text tokens).
#[test]
fn coconut_thoughts_have_no_text_and_no_token_loss() {
    let m = model();
    let mut o = options(5, 9);
    o.eos = vec![];
    o.latent = Latent::Coconut { latent_steps: 3 };
    let ro = rollout(&m.net, None, None, &prompts(2, 2), &o).unwrap();
    for recs in &ro.records {
        assert_eq!(recs.len(), 3 + 5, "3 thoughts then 5 tokens");
        for (j, r) in recs.iter().enumerate() {
            assert_eq!(r.mode == LATENT, j < 3, "step {j}");
            if j < 3 {
                assert!(r.token == -1 && r.logp == 0.0 && !r.has_token());
            }
        }
    }
    assert!(ro
        .tokens()
        .iter()
        .all(|t| t.len() == 5 && t.iter().all(|&x| x >= 0)));
    assert_eq!(ro.lengths(), vec![5; 4]);

    let net = &m.net;
    let batch = tarpo::policy::replay::build(net, &ro, &[0, 1, 2, 3]).unwrap();
    let mask = Vec::<Vec<bool>>::try_from(&batch.mask).unwrap();
    let steps = Vec::<Vec<bool>>::try_from(&batch.steps).unwrap();
    assert!(mask
        .iter()
        .all(|r| r == &[false, false, false, true, true, true, true, true]));
    assert!(steps.iter().flatten().all(|&s| s));
    // Hand loss: -mean_i A_i * mean over the 5 text tokens of log p.
    let s = tarpo::policy::replay::score(net, None, &batch, ro.temperature).unwrap();
    let logp = Vec::<Vec<f32>>::try_from(&s.logp).unwrap();
    let adv = [1.0, -1.0, 0.5, -0.5];
    let want: f64 = -(0..4)
        .map(|i| adv[i] * logp[i][3..].iter().map(|&x| x as f64).sum::<f64>() / 5.0)
        .sum::<f64>()
        / 4.0;
    let policy = Policy::new(m);
    let cfg = ReplayConfig::new(LossConfig {
        lambda: 0.0,
        beta: 0.0,
        ..LossConfig::default()
    });
    let got = accumulate_gradients(&policy, &ro, &adv, &cfg).unwrap().loss;
    assert!((got - want).abs() < 1e-6, "loss {got} vs hand {want}");
}
