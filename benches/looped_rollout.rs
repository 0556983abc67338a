//! Looped-model (Ouro) rollout throughput, side by side with transformers in
//! one run. The looped model is SmolLM2-135M's first LAYERS layers as a shared
//! stack applied LOOPS times (benches/make_looped.py); the peer runs the same
//! stack unrolled, a Llama model of LOOPS x LAYERS layers with the same
//! weights, through `generate`. Both sides: CPU f32, the 8 chat prompts of the
//! rollout benchmark, 128 new tokens each (no early stop), sampling (T 0.7,
//! top-k 50, top-p 0.95), the same thread count. tarpo's side does slightly
//! more work: the sandwich norms and the final norm after every loop.
//!
//! Run: ./dev.sh bench   (or `cargo bench --bench looped_rollout` with the env of ./dev.sh)
//! Env: TARPO_BENCH_THREADS (2), TARPO_BENCH_RUNS (5), TARPO_BENCH_LAYERS (6),
//! TARPO_BENCH_LOOPS (4).
mod common;
use anyhow::{bail, Context, Result};
use common::{env_or, median};
use std::path::{Path, PathBuf};
use tarpo::model::Model;
use tch::{Device, Kind};

const NEW: usize = 128;

/// The Ouro and unrolled-Llama checkpoints, made once per (layers, loops).
fn checkpoints(smollm2: &Path, layers: usize, loops: usize) -> Result<PathBuf> {
    let out = std::env::temp_dir().join(format!("tarpo-bench-looped-l{layers}-t{loops}"));
    if out.join("llama/model.safetensors").exists() {
        return Ok(out);
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/make_looped.py");
    let st = std::process::Command::new(common::python())
        .arg(&script)
        .arg(smollm2)
        .arg(&out)
        .args([layers.to_string(), loops.to_string()])
        .status()
        .context("running benches/make_looped.py")?;
    if !st.success() {
        bail!("benches/make_looped.py failed ({st})");
    }
    Ok(out)
}

fn main() -> Result<()> {
    let threads = env_or("TARPO_BENCH_THREADS", 2);
    let runs = env_or("TARPO_BENCH_RUNS", 5);
    let layers = env_or("TARPO_BENCH_LAYERS", 6);
    let loops = env_or("TARPO_BENCH_LOOPS", 4);
    let dir = checkpoints(&common::smollm2_dir()?, layers, loops)?;
    tch::set_num_threads(threads as i32);
    let m = Model::load(&dir.join("ouro"), Device::Cpu, Kind::Float)?;
    if m.net.cfg.loops != loops || m.net.cfg.num_hidden_layers != layers as i64 {
        bail!("{}: not the looped model asked for", dir.display());
    }
    let prompts = common::chat_prompts(&m, &common::QUESTIONS)?;
    let peer =
        common::HfGenerate::new(&dir.join("llama"), &prompts, threads, NEW, common::SAMPLING)?;

    common::generate_rate(&m.net, &prompts, 8, 0)?; // warm-up
    let (ours, hf) = common::side_by_side(
        runs,
        |r| common::generate_rate(&m.net, &prompts, NEW, r as u64),
        |r| peer.run(r),
    )?;
    let (o, h) = (median(&ours), median(&hf));
    println!(
        "looped rollout: {layers} layers x {loops} loops (SmolLM2-135M weights) f32 CPU, group {} x {NEW} new tokens, sampling, {threads} threads, median of {runs}",
        prompts.len()
    );
    println!("  tarpo (looped)                  {o:8.1} tok/s   runs {ours:.1?}");
    println!(
        "  transformers ({} plain layers)  {h:8.1} tok/s   runs {hf:.1?}",
        layers * loops
    );
    println!("  ratio                           {:8.2}x", o / h);
    Ok(())
}
