//! Rollout throughput, side by side with transformers `generate` in one run.
//!
//! SmolLM2-135M-Instruct on the CPU (f32, or bf16 weights on both sides), a
//! group of 8 chat prompts, 128 new tokens each (no early stop), sampling
//! (T 0.7, top-k 50, top-p 0.95), the same thread count on both sides. Prints
//! generated tokens per second for each side, the ratio, and the
//! memory-bandwidth ceiling for this decode (read bandwidth measured before
//! every tarpo run, median).
//!
//! Run: ./dev.sh bench   (or `cargo bench --bench rollout` with the env of ./dev.sh)
//! Env: TARPO_BENCH_THREADS (default 2), TARPO_BENCH_RUNS (default 5),
//! TARPO_BENCH_PEER=0 (tarpo alone, to profile: `perf record` the bench binary),
//! TARPO_BENCH_DTYPE=bf16 (bf16 weights; default f32).
mod common;
use anyhow::Result;
use common::{env_or, median};
use std::time::Instant;
use tarpo::model::Model;
use tch::{Device, Kind, Tensor};

const GROUP: usize = 8;
const NEW: usize = 128;

/// Read bandwidth in bytes/s: summing a 512 MB tensor with the same threads,
/// on huge pages like the model's weights (`host_memory::pack_weights`).
fn read_bandwidth() -> f64 {
    let t = Tensor::ones([128 * 1024 * 1024], (Kind::Float, Device::Cpu));
    tarpo::model::host_memory::pack_weights(&[&t]).expect("pack the probe");
    let _ = t.sum(Kind::Float);
    let runs = 5;
    let start = Instant::now();
    for _ in 0..runs {
        let _ = t.sum(Kind::Float).double_value(&[]);
    }
    (runs as f64 * 512.0 * 1024.0 * 1024.0) / start.elapsed().as_secs_f64()
}

fn main() -> Result<()> {
    let threads = env_or("TARPO_BENCH_THREADS", 2);
    let runs = env_or("TARPO_BENCH_RUNS", 5);
    let dir = common::smollm2_dir()?;
    tch::set_num_threads(threads as i32);
    let (dtype, kind, torch_dtype) = common::bench_dtype()?;
    let m = Model::load(&dir, Device::Cpu, kind)?;
    let prompts = common::chat_prompts(&m, &common::QUESTIONS)?;
    let mut peer = common::HfGenerate::new(&dir, &prompts, threads, NEW, common::SAMPLING)?;
    peer.dtype = torch_dtype;

    common::generate_rate(&m.net, &prompts, 8, 0)?; // warm-up
    if std::env::var("TARPO_BENCH_PEER").as_deref() == Ok("0") {
        // tarpo alone, for a profiler (`perf record`): no peer, no ratio.
        for r in 0..runs {
            let rate = common::generate_rate(&m.net, &prompts, NEW, r as u64)?;
            println!("run {}: tarpo {rate:.1} tok/s", r + 1);
        }
        return Ok(());
    }
    let mut bws = Vec::new();
    let (ours, hf) = common::side_by_side(
        runs,
        |r| {
            bws.push(read_bandwidth());
            common::generate_rate(&m.net, &prompts, NEW, r as u64)
        },
        |r| peer.run(r),
    )?;

    // Each decode step reads every weight once (the tied embedding as LM head).
    let weight_bytes = m.net.weight_bytes() as f64;
    let bw = median(&bws);
    let ceiling = bw / weight_bytes * GROUP as f64;
    let (o, h) = (median(&ours), median(&hf));
    println!("rollout: SmolLM2-135M {dtype} CPU, group {GROUP} x {NEW} new tokens, sampling, {threads} threads, median of {runs}");
    println!("  tarpo         {o:8.1} tok/s   runs {ours:.1?}");
    println!("  transformers  {h:8.1} tok/s   runs {hf:.1?}");
    println!("  ratio         {:8.2}x", o / h);
    println!(
        "  bandwidth     {:.1} GB/s read (runs {:.1?}); {:.0} MB of weights per step -> ceiling {ceiling:.1} tok/s; tarpo at {:.0}%",
        bw / 1e9,
        bws.iter().map(|b| b / 1e9).collect::<Vec<_>>(),
        weight_bytes / 1e6,
        100.0 * o / ceiling
    );
    Ok(())
}
