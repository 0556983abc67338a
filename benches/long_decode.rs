//! Long completions: tarpo's rollout tokens/s at 128, 256, 512 and 1024 new
//! tokens, to show the KV cache and attention do not come to dominate.
//!
//! SmolLM2-135M-Instruct on the CPU, the 8 chat prompts of the rollout bench,
//! sampling (T 0.7, top-k 50, top-p 0.95), no early stop. Each pass runs the
//! lengths short to long, the next long to short (the machine's speed drifts);
//! prints every pass, the median per length and the ratio to 128 tokens.
//!
//! Run: `cargo bench --bench long_decode` with the env of ./dev.sh.
//! Env: TARPO_BENCH_THREADS (2), TARPO_BENCH_RUNS (passes, 2),
//! TARPO_BENCH_DTYPE (f32 or bf16).
mod common;
use anyhow::Result;
use common::{env_or, median};
use tarpo::model::Model;
use tch::Device;

const LENGTHS: [usize; 4] = [128, 256, 512, 1024];

fn main() -> Result<()> {
    let threads = env_or("TARPO_BENCH_THREADS", 2);
    let passes = env_or("TARPO_BENCH_RUNS", 2);
    let (dtype, kind, _) = common::bench_dtype()?;
    tch::set_num_threads(threads as i32);
    let m = Model::load(&common::smollm2_dir()?, Device::Cpu, kind)?;
    let prompts = common::chat_prompts(&m, &common::QUESTIONS)?;
    common::generate_rate(&m.net, &prompts, 8, 0)?; // warm-up

    let mut rates = vec![Vec::new(); LENGTHS.len()];
    for pass in 0..passes {
        let order: Vec<usize> = if pass % 2 == 0 {
            (0..LENGTHS.len()).collect()
        } else {
            (0..LENGTHS.len()).rev().collect()
        };
        for i in order {
            let rate = common::generate_rate(&m.net, &prompts, LENGTHS[i], pass as u64)?;
            eprintln!(
                "pass {}: {} new tokens {rate:.1} tok/s",
                pass + 1,
                LENGTHS[i]
            );
            rates[i].push(rate);
        }
    }
    println!(
        "long decode: SmolLM2-135M {dtype} CPU, group 8, sampling, {threads} threads, median of {passes}"
    );
    let base = median(&rates[0]);
    for (n, r) in LENGTHS.iter().zip(&rates) {
        let med = median(r);
        println!(
            "  {n:5} new tokens  {med:7.1} tok/s  {:5.0}% of the rate at 128   runs {r:.1?}",
            100.0 * med / base
        );
    }
    Ok(())
}
