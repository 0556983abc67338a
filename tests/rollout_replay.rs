//! The hybrid rollout engine and its teacher-forced replay on a tiny model:
//! soft inputs really are the recorded mixtures, replay reproduces the
//! rollout's inputs and log-probs, and after the answer marker every mode is hard.
mod common;
use tarpo::model::{Model, Tokenizer};
use tarpo::policy::replay;
use tarpo::policy::router::{Router, HARD, SOFT};
use tarpo::policy::{rollout, RolloutOptions, Sampling};
use tch::{Device, Kind};

fn model() -> Model {
    Model::load(
        &common::tiny_models().join("llama_gqa_llama3_bias"),
        Device::Cpu,
        Kind::Float,
    )
    .unwrap()
}

fn prompts() -> Vec<Vec<i64>> {
    vec![
        vec![5, 9, 33, 2],
        vec![7, 100, 3],
        vec![40, 41, 42, 43, 44, 45],
        vec![12],
    ]
}

fn options(seed: u64) -> RolloutOptions {
    let mut o = RolloutOptions::new(
        20,
        Sampling {
            temperature: 0.7,
            top_k: 0,
            top_p: 1.0,
        },
        seed,
        vec![1],
    );
    o.mix_k = 4;
    o.keep_inputs = true;
    o
}

#[test]
fn replay_rebuilds_the_rollout_inputs_and_log_probs() {
    let m = model();
    let router = Router::new(m.net.cfg.hidden_size, 0.5, 1.0, 3, Device::Cpu).unwrap();
    let ro = rollout(&m.net, Some(&router), None, &prompts(), &options(11)).unwrap();
    let soft: usize = ro
        .records
        .iter()
        .flatten()
        .filter(|r| r.mode == SOFT)
        .count();
    let all: usize = ro.records.iter().map(Vec::len).sum();
    assert!(
        soft > all / 4 && soft < all,
        "a real mix of modes: {soft} of {all}"
    );
    for r in ro.records.iter().flatten() {
        if r.mode == SOFT {
            assert_eq!(r.mix_ids.len(), 4);
            let s: f32 = r.mix_weights.iter().sum();
            assert!((s - 1.0).abs() < 1e-5, "renormalised weights sum to {s}");
            assert!(r.mix_weights.windows(2).all(|w| w[0] >= w[1]));
        }
        assert!(r.p_soft > 0.3 && r.p_soft < 0.7);
    }
    let rows: Vec<usize> = (0..4).collect();
    let batch = replay::build(&m.net, &ro, &rows).unwrap();
    let p = batch.prompt_width;
    for (i, recs) in ro.records.iter().enumerate() {
        for (t, rec) in recs.iter().enumerate().take(recs.len().saturating_sub(1)) {
            // Input fed after token t in the rollout vs the replayed one.
            let fed = ro.inputs[t].get(i as i64);
            let replayed = batch.inputs.get(i as i64).get(p + t as i64);
            let d = common::max_abs_diff(&fed, &replayed);
            assert!(
                d == 0.0,
                "row {i} token {t} ({}): {d}",
                if rec.mode == SOFT { "soft" } else { "hard" }
            );
            if rec.mode == SOFT {
                // A soft input is the mixture, not the sampled token's embedding.
                let hard = m.net.embed_tokens.get(rec.token);
                assert!(common::max_abs_diff(&fed, &hard) > 1e-3);
            }
        }
    }
    let _g = tch::no_grad_guard();
    let s = replay::score(&m.net, Some(&router), &batch, ro.temperature).unwrap();
    for (i, recs) in ro.records.iter().enumerate() {
        for (t, rec) in recs.iter().enumerate() {
            let lp = s.logp.double_value(&[i as i64, t as i64]);
            assert!(
                (lp - rec.logp as f64).abs() < 1e-4,
                "row {i} token {t}: {lp} vs {}",
                rec.logp
            );
            let rlp = s
                .router_logp
                .as_ref()
                .unwrap()
                .double_value(&[i as i64, t as i64]);
            assert!(
                (rlp - rec.router_logp as f64).abs() < 1e-4,
                "router row {i} token {t}"
            );
        }
    }
    let mask = Vec::<Vec<i64>>::try_from(batch.mask.to_kind(Kind::Int64)).unwrap();
    assert_eq!(
        mask.iter()
            .map(|r| r.iter().sum::<i64>() as usize)
            .collect::<Vec<_>>(),
        ro.records.iter().map(Vec::len).collect::<Vec<_>>()
    );
}

#[test]
fn rollouts_are_seeded_and_hard_without_a_router() {
    let m = model();
    let router = Router::new(m.net.cfg.hidden_size, 0.5, 1.0, 3, Device::Cpu).unwrap();
    let a = rollout(&m.net, Some(&router), None, &prompts(), &options(5)).unwrap();
    let b = rollout(&m.net, Some(&router), None, &prompts(), &options(5)).unwrap();
    assert_eq!(a.records, b.records);
    let plain = rollout(&m.net, None, None, &prompts(), &options(5)).unwrap();
    assert!(plain
        .records
        .iter()
        .flatten()
        .all(|r| r.mode == HARD && r.forced && r.mix_ids.is_empty()));
}

#[test]
fn after_the_answer_marker_every_mode_is_hard() {
    let m = model();
    let tok: &Tokenizer = &m.tok;
    let router = Router::new(m.net.cfg.hidden_size, 0.6, 1.0, 9, Device::Cpu).unwrap();
    // Use as marker the text of a token the rollout produces mid-sequence.
    let first = rollout(&m.net, Some(&router), None, &prompts(), &options(21)).unwrap();
    let pick = first.records[0][6].token;
    let marker = tok.decode(&[pick], false).unwrap().trim().to_string();
    assert!(!marker.is_empty());
    let mut opts = options(21);
    opts.answer_marker = Some(marker.clone());
    let ro = rollout(&m.net, Some(&router), Some(tok), &prompts(), &opts).unwrap();
    let mut checked = 0;
    for recs in &ro.records {
        let mut text = String::new();
        let mut after = false;
        for rec in recs {
            text.push_str(&tok.decode(&[rec.token], false).unwrap());
            after |= text.contains(&marker);
            if after {
                assert!(
                    rec.mode == HARD && rec.forced,
                    "soft or unforced step after the marker {marker:?}"
                );
                checked += 1;
            }
        }
    }
    assert!(checked > 0, "the marker {marker:?} appeared");
    // Before the marker, soft steps still happen.
    assert!(ro.records.iter().flatten().any(|r| r.mode == SOFT));
}

#[test]
fn soft_spans_are_marked_in_sample_text() {
    let m = model();
    let router = Router::new(m.net.cfg.hidden_size, 0.5, 1.0, 3, Device::Cpu).unwrap();
    let ro = rollout(&m.net, Some(&router), None, &prompts(), &options(11)).unwrap();
    let recs = &ro.records[0];
    let marked = tarpo::rl::metrics::mark_soft(&m.tok, recs).unwrap();
    let runs = recs
        .windows(2)
        .filter(|w| w[0].mode != SOFT && w[1].mode == SOFT)
        .count()
        + usize::from(recs[0].mode == SOFT);
    assert_eq!(marked.matches('⟦').count(), runs);
    assert_eq!(marked.matches('⟧').count(), runs);
    let plain = m
        .tok
        .decode(&recs.iter().map(|r| r.token).collect::<Vec<_>>(), false)
        .unwrap();
    assert_eq!(marked.replace(['⟦', '⟧'], ""), plain);
}

/// A group's repeated prompts are prefilled once and their cache rows copied:
/// each completion is what the prompt gives alone (greedy, so comparable).
#[test]
fn shared_prefill_equals_separate_prompts() {
    let m = model();
    let p = prompts();
    let grouped = vec![
        p[0].clone(),
        p[2].clone(),
        p[0].clone(),
        p[2].clone(),
        p[0].clone(),
    ];
    let mut o = options(0);
    o.sampling = Sampling::greedy();
    let ro = rollout(&m.net, None, None, &grouped, &o).unwrap();
    for (i, prompt) in grouped.iter().enumerate() {
        let alone = rollout(&m.net, None, None, std::slice::from_ref(prompt), &o).unwrap();
        assert_eq!(ro.tokens()[i], alone.tokens()[0], "row {i}");
        for (a, b) in ro.records[i].iter().zip(&alone.records[0]) {
            assert!(
                (a.logp - b.logp).abs() < 1e-4,
                "row {i}: {} vs {}",
                a.logp,
                b.logp
            );
        }
    }
}

/// `rl::update` backpropagates in two halves (to the heads' input h, then on
/// into the backbone): the parameter gradients equal one plain backward, and
/// grad_hidden_norm equals ||dL/dh|| from autograd on the plain graph.
#[test]
fn split_backward_equals_plain_backward() {
    use tarpo::rl::loss::{policy_loss, LossConfig, LossInputs};
    use tarpo::rl::policy::Policy;
    use tarpo::rl::update::{accumulate_gradients, ReplayConfig};
    use tch::Tensor;
    let mut model = model();
    common::attach_moved_lora(&mut model.net, 0.02);
    let router = Router::new(model.net.cfg.hidden_size, 0.3, 1.0, 3, Device::Cpu).unwrap();
    let ro = rollout(&model.net, Some(&router), None, &prompts(), &options(5)).unwrap();
    let mut policy = Policy::new(model);
    policy.router = Some(router);
    let adv = [0.5, -1.0, 1.5, -0.25];
    let loss_cfg = LossConfig {
        beta: 0.0,
        ..LossConfig::default()
    };
    let mut cfg = ReplayConfig::new(loss_cfg.clone());
    cfg.micro_batch = 3;
    // The LM head in chunks of 2 positions, each backpropagated on its own.
    cfg.logits_chunk = Some(2);
    let mut params = policy.model.net.lora_parameters();
    params.extend(policy.router.as_ref().unwrap().parameters());
    let m = accumulate_gradients(&policy, &ro, &adv, &cfg).unwrap();
    let split: Vec<Tensor> = params.iter().map(|p| p.grad().copy()).collect();
    for p in &params {
        let _ = p.grad().f_zero_();
    }

    let rows: Vec<usize> = (0..4).collect();
    let batch = replay::build(&policy.model.net, &ro, &rows).unwrap();
    let s = replay::score(
        &policy.model.net,
        policy.router.as_ref(),
        &batch,
        ro.temperature,
    )
    .unwrap();
    let adv_t = Tensor::from_slice(&adv.map(|a| a as f32));
    let x = LossInputs {
        logp_kl: None,
        logp: &s.logp,
        logp_ref: None,
        logp_old: None,
        router_logp: s.router_logp.as_ref(),
        router_logp_ref: None,
        router_logp_old: None,
        adv: &adv_t,
        mask: &batch.mask,
        router_mask: &batch.router_mask,
    };
    let (loss, _) = policy_loss(&x, &loss_cfg).unwrap();
    let dh = Tensor::run_backward(&[&loss], &[&s.hidden], true, false).remove(0);
    let want = dh.square().sum(Kind::Double).double_value(&[]).sqrt();
    assert!(want > 0.0);
    assert!(
        (m.grad_hidden_norm - want).abs() < 1e-5 * want,
        "grad_hidden_norm {} vs autograd {want}",
        m.grad_hidden_norm
    );
    loss.backward();
    for (p, g) in params.iter().zip(&split) {
        let d = common::max_abs_diff(&p.grad(), g);
        let scale = g.abs().max().double_value(&[]).max(1e-8);
        assert!(d <= 1e-5 * scale, "gradient differs by {d} (scale {scale})");
    }
}

/// The replay runs each distinct prompt once: its states and its gradients
/// equal one forward over the padded rows (soft inputs, a router, LoRA,
/// repeated prompts in any order, rows of different lengths).
#[test]
fn shared_prompt_replay_equals_one_forward() {
    let mut m = model();
    common::attach_moved_lora(&mut m.net, 0.02);
    let router = Router::new(m.net.cfg.hidden_size, 0.4, 1.0, 9, Device::Cpu).unwrap();
    let p = prompts();
    let grouped = vec![
        p[1].clone(),
        p[1].clone(),
        p[3].clone(),
        p[1].clone(),
        p[3].clone(),
        p[2].clone(),
    ];
    let mut ro = rollout(&m.net, Some(&router), None, &grouped, &options(2)).unwrap();
    assert!(ro.records.iter().flatten().any(|r| r.mode == SOFT));
    // Rows that stopped early, as at an EOS.
    ro.records[0].truncate(7);
    ro.records[4].truncate(1);
    let params = m.net.lora_parameters();
    for rows in [vec![4, 0, 1, 3, 5], vec![2], vec![0, 1]] {
        let batch = replay::build(&m.net, &ro, &rows).unwrap();
        let g = common::assert_shared_replay_is_one_forward(&m.net, &batch, &params);
        assert!(
            g > 1e-6,
            "rows {rows:?}: no gradient reached the adapters ({g})"
        );
    }
    // And the scores the loss reads come from those states.
    let batch = replay::build(&m.net, &ro, &[4, 0, 1, 3]).unwrap();
    let _g = tch::no_grad_guard();
    let s = replay::score(&m.net, Some(&router), &batch, ro.temperature).unwrap();
    let h = common::one_forward_states(&m.net, &batch).pop().unwrap();
    let lp = replay::token_logp(&m.net, &h, &batch.tokens, ro.temperature).unwrap();
    let d = common::max_abs_diff(&(&lp * &batch.mask), &(&s.logp * &batch.mask));
    assert!(d < 1e-4, "token log-probs differ by {d}");
}

#[test]
fn a_prefix_shared_by_every_prompt_runs_once_and_changes_nothing() {
    // A chat template's system prompt: 10 tokens every prompt starts with,
    // run once in the prefill and copied to every row.
    let mut m = model();
    common::attach_moved_lora(&mut m.net, 0.02);
    let system: Vec<i64> = (60..70).collect();
    let with = |rest: &[i64]| [system.as_slice(), rest].concat();
    let prompts = vec![
        with(&[5, 9]),
        with(&[7]),
        with(&[5, 9]),
        with(&[40, 41, 42, 43]),
    ];
    let before = tarpo::policy::rollout::prefill_positions();
    let ro = rollout(&m.net, None, None, &prompts, &options(6)).unwrap();
    // The 10 system tokens once, then 3 distinct rests padded to 4 tokens
    // (not 4 rows x 14 tokens, nor 3 x 14).
    let ran = tarpo::policy::rollout::prefill_positions() - before;
    assert_eq!(ran, 10 + 3 * 4, "prefill positions");
    let params = m.net.lora_parameters();
    let batch = replay::build(&m.net, &ro, &[0, 1, 2, 3]).unwrap();
    let g = common::assert_shared_replay_is_one_forward(&m.net, &batch, &params);
    assert!(g > 1e-6, "no gradient reached the adapters ({g})");
    // The rollout scored its tokens as one forward over the padded rows does.
    let _g = tch::no_grad_guard();
    let h = common::one_forward_states(&m.net, &batch).pop().unwrap();
    let lp = replay::token_logp(&m.net, &h, &batch.tokens, ro.temperature).unwrap();
    let recorded: Vec<Vec<f64>> = ro
        .records
        .iter()
        .map(|r| r.iter().map(|t| t.logp as f64).collect())
        .collect();
    for (i, rec) in recorded.iter().enumerate() {
        for (t, want) in rec.iter().enumerate() {
            let got = lp.double_value(&[i as i64, t as i64]);
            assert!(
                (got - want).abs() < 1e-4,
                "row {i} token {t}: {got} vs {want}"
            );
        }
    }
}

#[test]
fn a_decode_step_copies_to_the_host_once() {
    // One copy per token step, whatever the rows do: the sampled ids, the
    // stats, the router's log-probs and the mixtures travel together.
    let m = model();
    let router = Router::new(m.net.cfg.hidden_size, 0.5, 1.0, 3, Device::Cpu).unwrap();
    let mut o = options(5);
    o.keep_inputs = false;
    for (r, name) in [(Some(&router), "router"), (None, "plain")] {
        let before = tarpo::policy::rollout::host_copies();
        let ro = rollout(&m.net, r, None, &prompts(), &o).unwrap();
        let copies = tarpo::policy::rollout::host_copies() - before;
        let steps = ro.records.iter().map(Vec::len).max().unwrap() as u64;
        assert!(steps > 1, "{name}: {steps} steps");
        assert_eq!(
            copies, steps,
            "{name}: {copies} host copies for {steps} steps"
        );
        if r.is_some() {
            let soft = ro
                .records
                .iter()
                .flatten()
                .filter(|x| x.mode == SOFT)
                .count();
            assert!(soft > 0, "the soft path ran");
        }
    }
}
