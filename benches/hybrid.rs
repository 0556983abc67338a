//! Cost of hybrid (hard/soft) rollouts against hard-only rollouts of the same
//! length, in one run: SmolLM2-135M-Instruct, CPU f32, a group of 8 chat
//! prompts, 128 new tokens each (no early stop), sampling at T 0.5 with top-k 50.
//! The hybrid side uses a router that starts at 50 % soft (far more soft steps
//! than a trained TARPO router takes), mixing the top-10 embeddings.
//!
//! Run: ./dev.sh bench   (or `cargo bench --bench hybrid` with the env of ./dev.sh)
mod common;
use anyhow::{bail, Result};
use common::{env_or, median};
use std::path::PathBuf;
use std::time::Instant;
use tarpo::model::{Message, Model};
use tarpo::policy::router::SOFT;
use tarpo::policy::{rollout, RolloutOptions, Router, Sampling};
use tch::{Device, Kind};

fn main() -> Result<()> {
    let threads = env_or("TARPO_BENCH_THREADS", 2) as i32;
    let runs = env_or("TARPO_BENCH_RUNS", 5);
    let dir = PathBuf::from(std::env::var("TARPO_MODELS").unwrap_or_else(|_| "models".into()))
        .join("SmolLM2-135M-Instruct");
    if !dir.join("model.safetensors").exists() {
        bail!("{} missing: run ./dev.sh setup", dir.display());
    }
    tch::set_num_threads(threads);
    let m = Model::load(&dir, Device::Cpu, Kind::Float)?;
    let questions = [
        "What is 12 times 7?",
        "Name three prime numbers.",
        "How far does a train at 60 mph go in 3 hours?",
        "Explain what a fraction is.",
        "What is the square root of 81?",
        "Write a haiku about numbers.",
        "What is 15% of 80?",
        "Is 91 a prime number?",
    ];
    let prompts: Vec<Vec<i64>> = questions
        .iter()
        .map(|q| {
            m.tok.encode(
                &m.tok
                    .apply_chat_template(&[Message::new("user", q)], true)?,
                false,
            )
        })
        .collect::<Result<_>>()?;
    let router = Router::new(m.net.cfg.hidden_size, 0.5, 1.0, 0, Device::Cpu)?;
    let opts = |seed| {
        RolloutOptions::new(
            128,
            Sampling {
                temperature: 0.5,
                top_k: 50,
                top_p: 1.0,
            },
            seed,
            vec![],
        )
    };
    rollout(
        &m.net,
        Some(&router),
        None,
        &prompts,
        &RolloutOptions {
            max_new: 8,
            ..opts(0)
        },
    )?; // warm-up
    let (mut hard, mut hybrid, mut soft_frac) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..runs {
        let t = Instant::now();
        rollout(&m.net, None, None, &prompts, &opts(r as u64))?;
        hard.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        let ro = rollout(&m.net, Some(&router), None, &prompts, &opts(r as u64))?;
        hybrid.push(t.elapsed().as_secs_f64());
        let recs: Vec<_> = ro.records.iter().flatten().collect();
        soft_frac.push(recs.iter().filter(|x| x.mode == SOFT).count() as f64 / recs.len() as f64);
        eprintln!(
            "run {}: hard-only {:.2} s, hybrid {:.2} s ({:.0} % soft)",
            r + 1,
            hard[r],
            hybrid[r],
            100.0 * soft_frac[r]
        );
    }
    let (h, y) = (median(&hard), median(&hybrid));
    println!("hybrid rollout: SmolLM2-135M f32 CPU, group 8 x 128 tokens, {threads} threads, median of {runs}");
    println!("  hard-only  {h:.2} s   {:.1} tok/s", 8.0 * 128.0 / h);
    println!(
        "  hybrid     {y:.2} s   {:.1} tok/s   ({:.0} % soft steps)",
        8.0 * 128.0 / y,
        100.0 * median(&soft_frac)
    );
    println!("  overhead   {:+.1} %", 100.0 * (y / h - 1.0));
    Ok(())
}
