//! Where a decode step's time goes: SmolLM2-135M, CPU f32, 8 rows, the
//! rollout benchmark's prompts and sampling, parts timed in isolation on the
//! shapes of a real step (the cache holds the prompts plus 64 tokens).
//!
//! Parts: the decoder's matmuls (q, k, v, o, gate, up, down of every layer),
//! the LM head, attention (the fused kernel over the cache), the rest of the
//! decoder (norms, RoPE, cache writes, adds, SiLU: op dispatch mostly), and
//! sampling with the step's statistics. "step" is a whole decode step as the
//! rollout runs it; "other" is what the parts leave of it. The decoder is
//! timed both fused (`model::llama::fused`, what rollouts run) and as
//! libtorch layers.
//!
//! Run: `cargo bench --bench decode_profile` (env of ./dev.sh).
//! Env: TARPO_BENCH_REPS (default 50), TARPO_BENCH_ROWS (default 8).
mod common;
use anyhow::Result;
use common::{env_or, median};
use std::time::Instant;
use tarpo::model::{left_pad, llama::linear, Model};
use tarpo::policy::{step_stats::token_stats, Rng};
use tch::{Device, Kind, Tensor};

/// Median milliseconds of `reps` calls of `f` (after one warm-up call).
fn time_ms(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut v = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t = Instant::now();
        f()?;
        v.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(median(&v))
}

fn main() -> Result<()> {
    let reps = env_or("TARPO_BENCH_REPS", 50);
    let rows = env_or("TARPO_BENCH_ROWS", 8);
    let dir = common::smollm2_dir()?;
    tch::set_num_threads(2);
    let m = Model::load(&dir, Device::Cpu, Kind::Float)?;
    let net = &m.net;
    let _g = tch::no_grad_guard();
    let questions: Vec<&str> = common::QUESTIONS
        .iter()
        .copied()
        .cycle()
        .take(rows)
        .collect();
    let prompts = common::chat_prompts(&m, &questions)?;

    // The whole step, as the rollout runs it: 64 tokens after the prompt.
    let new = 64;
    let opts = tarpo::policy::GenerateOptions {
        max_new: new,
        sampling: common::SAMPLING,
        seed: 0,
        eos: vec![],
    };
    let gen_ms = |max_new: usize| {
        let o = tarpo::policy::GenerateOptions {
            max_new,
            ..opts.clone()
        };
        time_ms(reps.div_ceil(10), || {
            tarpo::policy::generate(net, &prompts, &o).map(|_| ())
        })
    };
    // Without the prefill: a rollout of 1 token is the prefill and one step.
    let first_ms = gen_ms(1)?;
    let step_ms = (gen_ms(new)? - first_ms) / (new - 1) as f64;

    // A cache as after 64 decode steps, and the step's shapes.
    let (ids, valid) = left_pad(&prompts, Device::Cpu)?;
    let l = ids.size()[1];
    let mut cache = net.new_cache(rows as i64, l + new as i64 + 2 * reps as i64 + 4)?;
    let st = cache.step(&valid)?;
    let _ = net.forward(&net.embed(&ids)?, &st, Some(&cache))?;
    let one = Tensor::ones([rows as i64, 1], (Kind::Bool, Device::Cpu));
    let x = Tensor::randn([rows as i64, 1, 576], (Kind::Float, Device::Cpu)) * 0.1;
    for _ in 0..new {
        let st = cache.step(&one)?;
        let _ = net.forward(&x, &st, Some(&cache))?;
    }
    let _one_thread = tarpo::policy::rollout::IntraOpThreads::set(1);
    let mut decoder = |fused: bool| {
        tarpo::model::llama::fused::set_enabled(fused);
        time_ms(reps, || {
            let st = cache.step(&one)?;
            let _ = net.forward(&x, &st, Some(&cache))?;
            Ok(())
        })
    };
    let layers_ms = decoder(false)?;
    let decoder_ms = decoder(true)?;

    let named = net.named_tensors();
    let weights: Vec<&Tensor> = named
        .iter()
        .filter(|(n, _)| n.contains("_proj.weight"))
        .map(|(_, t)| *t)
        .collect();
    let inputs: Vec<Tensor> = weights
        .iter()
        .map(|w| Tensor::randn([rows as i64, 1, w.size()[1]], (Kind::Float, Device::Cpu)))
        .collect();
    let matmul_ms = time_ms(reps, || {
        for (w, x) in weights.iter().zip(&inputs) {
            let _ = linear(x, w, None)?;
        }
        Ok(())
    })?;
    let h = Tensor::randn([rows as i64, 576], (Kind::Float, Device::Cpu));
    let head_ms = time_ms(reps, || net.logits(&h).map(|_| ()))?;

    // Attention alone: every layer's decode kernel over a cache of this length.
    let cfg = &net.cfg;
    let s = l + new as i64;
    let q = Tensor::randn(
        [rows as i64, cfg.num_attention_heads, 1, cfg.head_dim],
        (Kind::Float, Device::Cpu),
    );
    // Every layer its own keys and values, as in a step (47 MB at 129 keys).
    let kvs: Vec<Tensor> = (0..cfg.num_hidden_layers)
        .map(|_| {
            Tensor::randn(
                [rows as i64, cfg.num_key_value_heads, s, cfg.head_dim],
                (Kind::Float, Device::Cpu),
            )
        })
        .collect();
    let mask = Tensor::ones([rows as i64, 1, 1, s], (Kind::Bool, Device::Cpu));
    let scale = (cfg.head_dim as f64).powf(-0.5);
    let attention_ms = time_ms(reps, || {
        for kv in &kvs {
            let _ = tarpo::model::llama::attention(&q, kv, kv, &mask, scale)?;
        }
        Ok(())
    })?;

    let logits = net.logits(&h)?;
    let mut rng = Rng::new(1);
    // The rollout's token statistics: the CPU scan, and the tensor ops.
    let mut stats_ms = [0.0; 2];
    for (i, fast) in [true, false].into_iter().enumerate() {
        tarpo::model::llama::fused::set_enabled(fast);
        stats_ms[i] = time_ms(reps, || {
            token_stats(&logits, &common::SAMPLING, 10, &mut rng).map(|_| ())
        })?;
    }
    tarpo::model::llama::fused::set_enabled(true);
    let sampling_ms = stats_ms[0];

    let rest = decoder_ms - matmul_ms - attention_ms;
    let other = step_ms - decoder_ms - head_ms - sampling_ms;
    let weight_mb = net.weight_bytes() as f64 / 1e6;
    println!("decode step: SmolLM2-135M f32 CPU, {rows} rows, cache {s}, median of {reps}");
    let line =
        |name: &str, ms: f64| println!("  {name:<28} {ms:7.2} ms  {:5.1}%", 100.0 * ms / step_ms);
    line("step (rollout)", step_ms);
    println!(
        "  {:<28} {:7.2} ms  (once per rollout)",
        "prefill",
        first_ms - step_ms
    );
    line("decoder matmuls", matmul_ms);
    line("LM head", head_ms);
    line("attention", attention_ms);
    line("decoder, rest (dispatch)", rest);
    line("sampling and statistics", sampling_ms);
    line("(the same as tensor ops)", stats_ms[1]);
    line("(decoder as libtorch layers)", layers_ms);
    line("(decoder, fused)", decoder_ms);
    line("other (host, records)", other);
    println!(
        "  weights streamed {:.0} MB per step: {:.1} GB/s in the whole step",
        weight_mb,
        weight_mb / step_ms
    );
    Ok(())
}
