//! The decoder against transformers on tiny random-weight Llama and Qwen2
//! models: logits at every real position of a left-padded batch, and greedy
//! generation, for several configurations (GQA/MQA, biases, tied and untied
//! embeddings, default/llama3/linear rope, new and legacy config keys).
mod common;
use tarpo::model::{Model, Step};
use tarpo::policy::{generate, GenerateOptions, Sampling};
use tch::{Device, Kind, Tensor};

fn load(name: &str) -> (Model, std::collections::HashMap<String, Tensor>) {
    load_as(name, Kind::Float)
}

/// A tiny model in `kind` and what transformers computed on it.
fn load_as(name: &str, kind: Kind) -> (Model, std::collections::HashMap<String, Tensor>) {
    let dir = common::tiny_models().join(name);
    let model = Model::load(&dir, Device::Cpu, kind).unwrap();
    (
        model,
        common::read_tensors(&dir.join("expected.safetensors")),
    )
}

fn mean_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().mean(Kind::Float).double_value(&[])
}

fn rows(ids: &Tensor, mask: &Tensor) -> Vec<Vec<i64>> {
    let ids = Vec::<Vec<i64>>::try_from(ids).unwrap();
    let mask = Vec::<Vec<i64>>::try_from(mask).unwrap();
    ids.iter()
        .zip(&mask)
        .map(|(r, m)| {
            r.iter()
                .zip(m)
                .filter(|(_, &v)| v == 1)
                .map(|(&t, _)| t)
                .collect()
        })
        .collect()
}

#[test]
fn padded_batch_logits_match_transformers() {
    let _g = tch::no_grad_guard();
    for name in common::TINY_NAMES {
        let (m, exp) = load(name);
        let (ids, mask) = (&exp["input_ids"], &exp["attention_mask"]);
        let valid = mask.to_kind(Kind::Bool);
        let h = m
            .net
            .forward(
                &m.net.embed(ids).unwrap(),
                &Step::full(&valid).unwrap(),
                None,
            )
            .unwrap();
        let logits = m.net.logits(&h).unwrap();
        let sel = valid.unsqueeze(-1).expand_as(&logits);
        let diff = common::max_abs_diff(
            &logits.masked_select(&sel),
            &exp["logits"].masked_select(&sel),
        );
        assert!(diff < 1e-4, "{name}: max |logit diff| {diff}");
        // Sanity: the logits are not trivially small, so 1e-4 is a real bound.
        assert!(exp["logits"].abs().max().double_value(&[]) > 1.0, "{name}");
    }
}

#[test]
fn bf16_logits_match_transformers_bf16() {
    // bf16 has 8 bits of mantissa: both sides round differently inside their
    // matmuls, so the bound is in units of the logits' scale, not 1e-4.
    let _g = tch::no_grad_guard();
    for name in common::TINY_NAMES {
        let (m, exp) = load_as(name, Kind::BFloat16);
        let valid = exp["attention_mask"].to_kind(Kind::Bool);
        let h = m
            .net
            .forward(
                &m.net.embed(&exp["input_ids"]).unwrap(),
                &Step::full(&valid).unwrap(),
                None,
            )
            .unwrap();
        assert_eq!(h.kind(), Kind::BFloat16);
        let logits = m.net.logits(&h).unwrap().to_kind(Kind::Float);
        let sel = valid.unsqueeze(-1).expand_as(&logits);
        let (ours, theirs, f32) = (
            logits.masked_select(&sel),
            exp["logits_bf16"].masked_select(&sel),
            exp["logits"].masked_select(&sel),
        );
        // Self-calibrated bound: we may differ from transformers' bf16 by no
        // more than transformers' own bf16 differs from its f32.
        let (ours_vs_hf, hf_vs_f32) = (mean_abs_diff(&ours, &theirs), mean_abs_diff(&theirs, &f32));
        let max = common::max_abs_diff(&ours, &theirs);
        let max_hf = common::max_abs_diff(&theirs, &f32);
        eprintln!("{name}: bf16 ours-vs-hf mean {ours_vs_hf:.5} max {max:.4}; hf bf16-vs-f32 mean {hf_vs_f32:.5} max {max_hf:.4}");
        assert!(ours_vs_hf < hf_vs_f32 && max < max_hf, "{name}");
        assert!(hf_vs_f32 > 0.0, "bf16 really differs from f32");
    }
}

/// Logits from a prefill of all but the last 4 tokens, then one token at a
/// time through the KV cache (the decode kernels' path).
fn cached_logits(m: &Model, exp: &std::collections::HashMap<String, Tensor>) -> Tensor {
    let (ids, mask) = (&exp["input_ids"], &exp["attention_mask"]);
    let (b, l) = (ids.size()[0], ids.size()[1]);
    let split = l - 4;
    let mut cache = m.net.new_cache(b, l).unwrap();
    let valid = mask.to_kind(Kind::Bool);
    let mut outs = Vec::new();
    for (at, n) in [(0, split)].into_iter().chain((split..l).map(|t| (t, 1))) {
        let step = cache.step(&valid.narrow(1, at, n)).unwrap();
        let x = m.net.embed(&ids.narrow(1, at, n)).unwrap();
        outs.push(m.net.forward(&x, &step, Some(&cache)).unwrap());
    }
    assert_eq!(
        cache.lengths().unwrap(),
        Vec::<i64>::try_from(mask.sum_dim_intlist(1, false, Kind::Int64)).unwrap()
    );
    m.net.logits(&Tensor::cat(&outs, 1)).unwrap()
}

#[test]
fn cached_decoding_matches_uncached_forward() {
    // Prefill + one token at a time through the KV cache gives the same logits
    // as one forward over the whole left-padded sequence.
    let _g = tch::no_grad_guard();
    let (m, exp) = load("llama_gqa_llama3_bias");
    let logits = cached_logits(&m, &exp);
    let sel = exp["attention_mask"]
        .to_kind(Kind::Bool)
        .unsqueeze(-1)
        .expand_as(&logits);
    let diff = common::max_abs_diff(
        &logits.masked_select(&sel),
        &exp["logits"].masked_select(&sel),
    );
    assert!(diff < 1e-4, "cached vs transformers: {diff}");
}

#[test]
fn bf16_cached_decoding_matches_transformers_bf16() {
    // The bf16 decode kernels (bf16 weights and cache widened, f32 sums) on
    // the 4 decoded positions: as close to transformers' bf16 as transformers'
    // bf16 is to its f32 (the bound of bf16_logits_match_transformers_bf16).
    let _g = tch::no_grad_guard();
    for name in common::TINY_NAMES {
        let (m, exp) = load_as(name, Kind::BFloat16);
        let logits = cached_logits(&m, &exp).to_kind(Kind::Float);
        let l = logits.size()[1];
        let last = |t: &Tensor| t.narrow(1, l - 4, 4);
        let sel = last(&exp["attention_mask"].to_kind(Kind::Bool))
            .unsqueeze(-1)
            .expand_as(&last(&logits));
        let pick = |t: &Tensor| last(t).masked_select(&sel);
        let (ours, theirs, f32) = (
            pick(&logits),
            pick(&exp["logits_bf16"]),
            pick(&exp["logits"]),
        );
        let (ours_vs_hf, hf_vs_f32) = (mean_abs_diff(&ours, &theirs), mean_abs_diff(&theirs, &f32));
        eprintln!(
            "{name}: decoded bf16 ours-vs-hf mean {ours_vs_hf:.5}; hf bf16-vs-f32 {hf_vs_f32:.5}"
        );
        assert!(hf_vs_f32 > 0.0, "bf16 really differs from f32");
        assert!(
            ours_vs_hf < hf_vs_f32,
            "{name}: {ours_vs_hf} vs {hf_vs_f32}"
        );
    }
}

#[test]
fn greedy_generation_matches_transformers() {
    for name in common::TINY_NAMES {
        let (m, exp) = load(name);
        let prompts = rows(&exp["input_ids"], &exp["attention_mask"]);
        let opts = GenerateOptions {
            max_new: 32,
            sampling: Sampling::greedy(),
            seed: 0,
            eos: vec![],
        };
        let got = generate(&m.net, &prompts, &opts).unwrap();
        let want = Vec::<Vec<i64>>::try_from(&exp["greedy"]).unwrap();
        assert_eq!(got, want, "{name}");
        // Each row alone gives the same tokens as in the padded batch.
        for (i, p) in prompts.iter().enumerate() {
            let alone = generate(&m.net, std::slice::from_ref(p), &opts).unwrap();
            assert_eq!(alone[0], want[i], "{name} row {i} alone");
        }
    }
}

#[test]
fn sampling_is_seeded_and_stops_at_eos() {
    let (m, exp) = load("qwen2_gqa_untied_linear");
    let prompts = rows(&exp["input_ids"], &exp["attention_mask"]);
    let sampling = Sampling {
        temperature: 1.5,
        top_k: 40,
        top_p: 0.95,
    };
    let opts = |seed, eos: Vec<i64>| GenerateOptions {
        max_new: 24,
        sampling,
        seed,
        eos,
    };
    let a = generate(&m.net, &prompts, &opts(3, vec![])).unwrap();
    let b = generate(&m.net, &prompts, &opts(3, vec![])).unwrap();
    let c = generate(&m.net, &prompts, &opts(4, vec![])).unwrap();
    assert_eq!(a, b);
    assert_ne!(a, c);
    assert!(a.iter().all(|r| r.len() == 24));
    // Use the token sampled at step 5 of row 0 as the stop token: row 0 ends there.
    let stop = a[0][5];
    let d = generate(&m.net, &prompts, &opts(3, vec![stop])).unwrap();
    let first = a[0].iter().position(|&t| t == stop).unwrap();
    assert_eq!(d[0], a[0][..=first].to_vec());
    for (row_d, row_a) in d.iter().zip(&a) {
        let cut = row_a
            .iter()
            .position(|&t| t == stop)
            .map_or(row_a.len(), |p| p + 1);
        assert_eq!(row_d, &row_a[..cut]);
    }
}

#[test]
fn fused_decode_steps_equal_the_libtorch_layers() {
    // The fused CPU decode stack (model::llama::fused) against the same
    // steps through the libtorch layers: every tiny configuration (GQA/MQA,
    // q/k/v biases, tied and untied heads), a left-padded batch, 6 steps.
    use tarpo::model::llama::fused;
    let _g = tch::no_grad_guard();
    for name in common::TINY_NAMES {
        let (m, exp) = load(name);
        let (ids, mask) = (&exp["input_ids"], &exp["attention_mask"]);
        let run = |on: bool| -> Vec<Tensor> {
            fused::set_enabled(on);
            let b = ids.size()[0];
            let mut cache = m.net.new_cache(b, ids.size()[1] + 8).unwrap();
            let step = cache.step(&mask.to_kind(Kind::Bool)).unwrap();
            let h = m
                .net
                .forward(&m.net.embed(ids).unwrap(), &step, Some(&cache))
                .unwrap();
            let mut next = m.net.logits(&h.select(1, -1)).unwrap().argmax(-1, false);
            let mut out = Vec::new();
            for _ in 0..6 {
                let step = cache
                    .step(&Tensor::ones([b, 1], (Kind::Bool, Device::Cpu)))
                    .unwrap();
                let h = m
                    .net
                    .forward(
                        &m.net.embed(&next.unsqueeze(1)).unwrap(),
                        &step,
                        Some(&cache),
                    )
                    .unwrap();
                let logits = m.net.logits(&h).unwrap().squeeze_dim(1);
                next = logits.argmax(-1, false);
                out.push(logits);
            }
            fused::set_enabled(true);
            out
        };
        let before = fused::steps();
        let fast = run(true);
        assert_eq!(fused::steps() - before, 6, "{name}: the fused path ran");
        let slow = run(false);
        assert_eq!(fused::steps() - before, 6, "{name}: switched off");
        for (i, (a, b)) in fast.iter().zip(&slow).enumerate() {
            let scale = b.abs().max().double_value(&[]);
            let diff = common::max_abs_diff(a, b);
            assert!(
                diff <= 1e-5 * scale.max(1.0),
                "{name} step {i}: {diff} of {scale}"
            );
        }
    }
}
