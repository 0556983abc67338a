//! Rollout throughput, side by side with transformers `generate` in one run.
//!
//! SmolLM2-135M-Instruct, CPU f32, a group of 8 chat prompts, 128 new tokens
//! each (no early stop), sampling (T 0.7, top-k 50, top-p 0.95), the same
//! thread count on both sides. Prints generated tokens per second for each
//! side, the ratio, and the memory-bandwidth ceiling for this decode.
//!
//! Run: ./dev.sh bench   (or `cargo bench --bench rollout` with the env of ./dev.sh)
//! Env: TARPO_BENCH_THREADS (default 2), TARPO_BENCH_RUNS (default 5).
mod common;
use anyhow::{bail, Context, Result};
use common::{env_or, median};
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;
use tarpo::model::{Message, Model};
use tarpo::policy::{generate, GenerateOptions, Sampling};
use tch::{Device, Kind, Tensor};

const GROUP: usize = 8;
const NEW: usize = 128;
const QUESTIONS: [&str; GROUP] = [
    "What is 12 times 7?",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did Natalia sell altogether?",
    "Name three prime numbers.",
    "If a train travels 60 miles per hour for 3 hours, how far does it go?",
    "Explain what a fraction is.",
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much did she earn?",
    "What is the square root of 81?",
    "Write a haiku about numbers.",
];

/// Read bandwidth in bytes/s: summing a 512 MB tensor with the same threads.
fn read_bandwidth() -> f64 {
    let t = Tensor::ones([128 * 1024 * 1024], (Kind::Float, Device::Cpu));
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
    let models = std::env::var("TARPO_MODELS").unwrap_or_else(|_| "models".into());
    let dir = PathBuf::from(models).join("SmolLM2-135M-Instruct");
    if !dir.join("model.safetensors").exists() {
        bail!("{} missing: run ./dev.sh setup", dir.display());
    }
    tch::set_num_threads(threads as i32);
    let m = Model::load(&dir, Device::Cpu, Kind::Float)?;
    let prompts: Vec<Vec<i64>> = QUESTIONS
        .iter()
        .map(|q| {
            m.tok.encode(
                &m.tok
                    .apply_chat_template(&[Message::new("user", q)], true)?,
                false,
            )
        })
        .collect::<Result<_>>()?;
    let sampling = Sampling {
        temperature: 0.7,
        top_k: 50,
        top_p: 0.95,
    };
    let opts = |seed| GenerateOptions {
        max_new: NEW,
        sampling,
        seed,
        eos: vec![],
    };

    let prompts_json = std::env::temp_dir().join("tarpo-bench-prompts.json");
    std::fs::write(&prompts_json, serde_json::to_string(&prompts)?)?;
    let venv = std::env::var("TARPO_VENV").unwrap_or_else(|_| ".venv".into());
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("benches/hf_generate.py");
    let hf_run = |seed: usize| -> Result<f64> {
        let out = Command::new(PathBuf::from(&venv).join("bin/python"))
            .arg(&script)
            .arg(&dir)
            .arg(&prompts_json)
            .args([
                threads.to_string(),
                NEW.to_string(),
                "1".into(),
                seed.to_string(),
            ])
            .args(["0.7", "50", "0.95"])
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .context("running benches/hf_generate.py")?;
        if !out.status.success() {
            bail!(
                "hf_generate.py failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let v: serde_json::Value = serde_json::from_slice(out.stdout.trim_ascii())?;
        v["tokens_per_s"][0]
            .as_f64()
            .context("hf_generate.py output")
    };

    // Alternate the two sides so both see the same machine conditions.
    generate(
        &m.net,
        &prompts,
        &GenerateOptions {
            max_new: 8,
            ..opts(0)
        },
    )?; // warm-up
    let (mut ours, mut hf) = (Vec::new(), Vec::new());
    for r in 0..runs {
        let start = Instant::now();
        let out = generate(&m.net, &prompts, &opts(r as u64))?;
        let n: usize = out.iter().map(Vec::len).sum();
        assert_eq!(n, GROUP * NEW);
        ours.push(n as f64 / start.elapsed().as_secs_f64());
        hf.push(hf_run(r)?);
        eprintln!(
            "run {}: tarpo {:.1} tok/s, transformers {:.1} tok/s",
            r + 1,
            ours[r],
            hf[r]
        );
    }

    // Each decode step reads every weight once (the tied embedding as LM head).
    let weight_bytes = m.net.weight_bytes() as f64;
    let bw = read_bandwidth();
    let ceiling = bw / weight_bytes * GROUP as f64;
    let (o, h) = (median(&ours), median(&hf));
    println!("rollout: SmolLM2-135M f32 CPU, group {GROUP} x {NEW} new tokens, sampling, {threads} threads, median of {runs}");
    println!("  tarpo         {o:8.1} tok/s   runs {ours:.1?}");
    println!("  transformers  {h:8.1} tok/s   runs {hf:.1?}");
    println!("  ratio         {:8.2}x", o / h);
    println!(
        "  bandwidth     {:.1} GB/s read; {:.0} MB of weights per step -> ceiling {ceiling:.1} tok/s; tarpo at {:.0}%",
        bw / 1e9,
        weight_bytes / 1e6,
        100.0 * o / ceiling
    );
    Ok(())
}
