//! The looped (Ouro) model against an independent PyTorch implementation of
//! ALGORITHMS.md section 6 on the same random weights
//! (tests/oracle/ouro_models.py): every loop's logits, the exit distribution,
//! the early-exit choice and the logits it reads, and greedy decoding with the
//! KV cache (T x L entries) equal to recomputing from scratch; the CLI's
//! `logits --loop N`, `info`, and clear errors for broken checkpoints.
mod common;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use tarpo::model::{Model, Step};
use tch::{Device, Kind, Tensor};

const NAMES: [&str; 3] = [
    "ouro_gqa_t2_untied",
    "ouro_mha_t4_tied",
    "ouro_mqa_t4_untied",
];
static MODELS: OnceLock<PathBuf> = OnceLock::new();

fn models() -> &'static Path {
    MODELS.get_or_init(|| common::cached_oracle("ouro_models.py", &[]))
}

fn expected(name: &str) -> std::collections::HashMap<String, Tensor> {
    common::read_tensors(&models().join(name).join("expected.safetensors"))
}

#[test]
fn every_loop_and_the_exit_match_pytorch() {
    for name in NAMES {
        let m = Model::load(&models().join(name), Device::Cpu, Kind::Float).unwrap();
        let e = expected(name);
        let ids = &e["input_ids"];
        let _g = tch::no_grad_guard();
        let step = Step::full(&ids.ones_like().to_kind(Kind::Bool)).unwrap();
        let x = m.net.embed(ids).unwrap();
        let states = m.net.forward_loops(&x, &step, None).unwrap();
        let want = &e["loop_logits"];
        assert_eq!(states.len() as i64, want.size()[0], "{name}: loops");
        for (t, h) in states.iter().enumerate() {
            let d = common::max_abs_diff(&m.net.logits(h).unwrap(), &want.get(t as i64));
            assert!(d < 1e-4, "{name}: loop {} logits differ by {d}", t + 1);
        }
        let pdf = m.net.exit_distribution(&states).unwrap().unwrap();
        assert_eq!(pdf.kind(), Kind::Float);
        let d = common::max_abs_diff(&pdf, &e["exit_pdf"]);
        assert!(d < 1e-5, "{name}: exit distribution differs by {d}");
        let q = m.net.cfg.early_exit_threshold;
        let at = tarpo::model::ouro::exit_index(&pdf, q).unwrap();
        assert!(
            at.equal(&e["exit_index"]),
            "{name}: exit loops {at} vs {}",
            e["exit_index"]
        );
        // forward() reads the exit loop at each position.
        let d = common::max_abs_diff(
            &m.net
                .logits(&m.net.forward(&x, &step, None).unwrap())
                .unwrap(),
            &e["exit_logits"],
        );
        assert!(d < 1e-4, "{name}: exit logits differ by {d}");
    }
    // The fixtures exercise early exit: positions leave at different loops.
    let at = &expected("ouro_mha_t4_tied")["exit_index"];
    assert!(
        at.min().int64_value(&[]) == 0 && at.max().int64_value(&[]) == 3,
        "{at}"
    );
}

/// The replay's shared prompts on a looped model with early exit: every
/// loop's states, the exit states and their gradients equal one forward.
#[test]
fn shared_prompt_replay_of_every_loop_equals_one_forward() {
    use tarpo::policy::{replay, rollout, RolloutOptions, Sampling};
    for name in NAMES {
        let mut m = Model::load(&models().join(name), Device::Cpu, Kind::Float).unwrap();
        common::attach_moved_lora(&mut m.net, 0.05);
        let sampling = Sampling {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
        };
        let prompts = vec![
            vec![3, 8, 5],
            vec![9],
            vec![3, 8, 5],
            vec![9],
            vec![3, 8, 5],
        ];
        let o = RolloutOptions::new(6, sampling, 4, vec![]);
        let ro = rollout(&m.net, None, None, &prompts, &o).unwrap();
        let batch = replay::build(&m.net, &ro, &[1, 0, 2, 3, 4]).unwrap();
        let params = m.net.lora_parameters();
        let g = common::assert_shared_replay_is_one_forward(&m.net, &batch, &params);
        assert!(g > 1e-6, "{name}: no gradient reached the adapters ({g})");
        let _g = tch::no_grad_guard();
        let exit = m
            .net
            .exit_state(common::one_forward_states(&m.net, &batch))
            .unwrap();
        let steps = batch.steps.to_kind(Kind::Float).unsqueeze(-1);
        let shared = replay::hidden_states(&m.net, &batch).unwrap();
        let d = common::max_abs_diff(&(&exit * &steps), &(&shared * &steps));
        // Relative to the states' scale, as the loop states above (two
        // orders of summation in f32; up to 1.5e-5 absolute seen here).
        let scale = exit.abs().max().double_value(&[]);
        assert!(
            d < 2e-5 * scale.max(1.0),
            "{name}: exit states differ by {d} of {scale}"
        );
    }
}

fn run(args: &[&str]) -> std::process::Output {
    common::tarpo().args(args).output().unwrap()
}

fn ids_arg(t: &Tensor) -> String {
    Vec::<i64>::try_from(t)
        .unwrap()
        .iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

#[test]
fn cached_greedy_decoding_and_the_cli_match_pytorch() {
    for name in NAMES {
        let dir = models().join(name);
        let e = expected(name);
        for b in 0..2 {
            let o = run(&[
                "generate",
                "--model",
                dir.to_str().unwrap(),
                "--greedy",
                "--max-new",
                "12",
                "--ids",
                &ids_arg(&e["input_ids"].get(b)),
            ]);
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            let got: Vec<i64> = serde_json::from_slice(&o.stdout).unwrap();
            let want = Vec::<i64>::try_from(&e["greedy"].get(b)).unwrap();
            assert_eq!(got, want, "{name} row {b}: KV-cached greedy decoding");
        }
    }
    let name = "ouro_mha_t4_tied";
    let dir = models().join(name);
    let e = expected(name);
    let ids = ids_arg(&e["input_ids"].get(0));
    let logits = |extra: &[&str]| -> Tensor {
        let mut args = vec!["logits", "--model", dir.to_str().unwrap(), "--ids", &ids];
        args.extend(extra);
        let o = run(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        Tensor::from_slice(&serde_json::from_slice::<Vec<f32>>(&o.stdout).unwrap())
    };
    for n in 1..=4i64 {
        let want = e["loop_logits"].get(n - 1).get(0).get(8);
        let d = common::max_abs_diff(&logits(&["--loop", &n.to_string()]), &want);
        assert!(d < 1e-4, "logits --loop {n}: {d}");
    }
    let d = common::max_abs_diff(&logits(&[]), &e["exit_logits"].get(0).get(8));
    assert!(d < 1e-4, "plain logits read the exit loop: {d}");
    let o = run(&[
        "logits",
        "--model",
        dir.to_str().unwrap(),
        "--ids",
        &ids,
        "--loop",
        "5",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("--loop 5: the model has 4 loop(s)"),
        "{err}"
    );
    let o = run(&["info", "--model", dir.to_str().unwrap()]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("architecture   Ouro") && out.contains("loops          4 (total_ut_steps; 8 layer passes), early exit at cumulative p >= 0.6"), "{out}");
}

/// A copy of a fixture with its config edited or a weight left out.
fn broken(name: &str, edit: &dyn Fn(&mut serde_json::Value), drop: Option<&str>) -> PathBuf {
    let src = models().join("ouro_gqa_t2_untied");
    let dir = common::scratch("ouro-bad").join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(src.join("tokenizer.json"), dir.join("tokenizer.json")).unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let mut w = common::read_tensors(&src.join("model.safetensors"));
    if let Some(k) = drop {
        assert!(w.remove(k).is_some(), "{k}");
    }
    let named: Vec<(String, Tensor)> = w.into_iter().collect();
    Tensor::write_safetensors(&named, dir.join("model.safetensors")).unwrap();
    dir
}

#[test]
fn broken_ouro_checkpoints_fail_with_one_clear_line() {
    let cases: Vec<(PathBuf, &str)> = vec![
        (
            broken(
                "no_norm2",
                &|_| {},
                Some("model.layers.1.input_layernorm_2.weight"),
            ),
            "model.layers.1.input_layernorm_2.weight",
        ),
        (
            broken("no_gate", &|_| {}, Some("model.early_exit_gate.bias")),
            "model.early_exit_gate.bias",
        ),
        (
            broken("zero_loops", &|c| c["total_ut_steps"] = 0.into(), None),
            "total_ut_steps must be an integer from 1 to 64, got 0",
        ),
        (
            broken("text_loops", &|c| c["total_ut_steps"] = "four".into(), None),
            "total_ut_steps must be an integer from 1 to 64, got \"four\"",
        ),
        (
            broken(
                "no_loops",
                &|c| {
                    c.as_object_mut().unwrap().remove("total_ut_steps");
                },
                None,
            ),
            "total_ut_steps is missing",
        ),
        (
            broken(
                "bad_threshold",
                &|c| c["early_exit_threshold"] = 1.5.into(),
                None,
            ),
            "early_exit_threshold must be a number in (0, 1], got 1.5",
        ),
    ];
    for (dir, needle) in cases {
        let o = run(&["logits", "--model", dir.to_str().unwrap(), "--ids", "1,2"]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && err.contains(needle),
            "{}: {err}",
            dir.display()
        );
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}
