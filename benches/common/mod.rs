//! Helpers the side-by-side benchmarks share (not every bench uses each).
#![allow(dead_code)]

/// An integer setting from the environment, else `default`.
pub fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The middle value (upper middle for an even count).
pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// `$TARPO_MODELS/SmolLM2-135M-Instruct`, or an error naming the setup step.
pub fn smollm2_dir() -> anyhow::Result<std::path::PathBuf> {
    let models = std::env::var("TARPO_MODELS").unwrap_or_else(|_| "models".into());
    let dir = std::path::PathBuf::from(models).join("SmolLM2-135M-Instruct");
    if !dir.join("model.safetensors").exists() {
        anyhow::bail!("{} missing: run ./dev.sh setup", dir.display());
    }
    Ok(dir)
}

/// The venv's python (TARPO_VENV, else .venv).
pub fn python() -> std::path::PathBuf {
    let venv = std::env::var("TARPO_VENV").unwrap_or_else(|_| ".venv".into());
    std::path::PathBuf::from(venv).join("bin/python")
}

/// Each question as a user turn of the model's chat template, as token ids.
pub fn chat_prompts(m: &tarpo::model::Model, questions: &[&str]) -> anyhow::Result<Vec<Vec<i64>>> {
    use tarpo::model::Message;
    questions
        .iter()
        .map(|q| {
            let text = m
                .tok
                .apply_chat_template(&[Message::new("user", q)], true)?;
            m.tok.encode(&text, false)
        })
        .collect()
}

/// The peer of the rollout benchmarks: transformers `generate` on `dir`
/// (benches/hf_generate.py), `new` tokens per prompt, no early stop.
pub struct HfGenerate {
    pub dir: std::path::PathBuf,
    pub prompts_json: std::path::PathBuf,
    pub threads: usize,
    pub new: usize,
    pub sampling: tarpo::policy::Sampling,
    /// torch dtype name of the weights ("float32", "bfloat16").
    pub dtype: &'static str,
}

impl HfGenerate {
    pub fn new(
        dir: &std::path::Path,
        prompts: &[Vec<i64>],
        threads: usize,
        new: usize,
        sampling: tarpo::policy::Sampling,
    ) -> anyhow::Result<Self> {
        let prompts_json =
            std::env::temp_dir().join(format!("tarpo-bench-prompts-{}.json", std::process::id()));
        std::fs::write(&prompts_json, serde_json::to_string(prompts)?)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            prompts_json,
            threads,
            new,
            sampling,
            dtype: "float32",
        })
    }

    /// One timed generate (after its own warm-up): generated tokens per second.
    pub fn run(&self, seed: usize) -> anyhow::Result<f64> {
        use anyhow::Context;
        let script =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/hf_generate.py");
        let s = &self.sampling;
        let out = std::process::Command::new(python())
            .arg(&script)
            .arg(&self.dir)
            .arg(&self.prompts_json)
            .args([
                self.threads.to_string(),
                self.new.to_string(),
                "1".into(),
                seed.to_string(),
            ])
            .args([
                s.temperature.to_string(),
                s.top_k.to_string(),
                s.top_p.to_string(),
                self.dtype.to_string(),
            ])
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .context("running benches/hf_generate.py")?;
        if !out.status.success() {
            anyhow::bail!(
                "hf_generate.py failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let v: serde_json::Value = serde_json::from_slice(out.stdout.trim_ascii())?;
        v["tokens_per_s"][0]
            .as_f64()
            .context("hf_generate.py output")
    }
}

/// The weights' dtype of a bench, from TARPO_BENCH_DTYPE (f32, the default,
/// or bf16): its name, its kind, and torch's name for the peer.
pub fn bench_dtype() -> anyhow::Result<(String, tch::Kind, &'static str)> {
    let name = std::env::var("TARPO_BENCH_DTYPE").unwrap_or_else(|_| "f32".into());
    let (kind, torch) = match name.as_str() {
        "f32" => (tch::Kind::Float, "float32"),
        "bf16" => (tch::Kind::BFloat16, "bfloat16"),
        other => anyhow::bail!("TARPO_BENCH_DTYPE={other}: f32 or bf16"),
    };
    Ok((name, kind, torch))
}

/// Eight chat questions, the group of the rollout benchmarks.
pub const QUESTIONS: [&str; 8] = [
    "What is 12 times 7?",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did Natalia sell altogether?",
    "Name three prime numbers.",
    "If a train travels 60 miles per hour for 3 hours, how far does it go?",
    "Explain what a fraction is.",
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much did she earn?",
    "What is the square root of 81?",
    "Write a haiku about numbers.",
];

/// The rollout benchmarks' sampling on both sides: T 0.7, top-k 50, top-p 0.95.
pub const SAMPLING: tarpo::policy::Sampling = tarpo::policy::Sampling {
    temperature: 0.7,
    top_k: 50,
    top_p: 0.95,
};

/// One timed tarpo `generate` of exactly `new` tokens per prompt (no early
/// stop): generated tokens per second.
pub fn generate_rate(
    net: &tarpo::model::llama::Llama,
    prompts: &[Vec<i64>],
    new: usize,
    seed: u64,
) -> anyhow::Result<f64> {
    let opts = tarpo::policy::GenerateOptions {
        max_new: new,
        sampling: SAMPLING,
        seed,
        eos: vec![],
    };
    let start = std::time::Instant::now();
    let out = tarpo::policy::generate(net, prompts, &opts)?;
    let n: usize = out.iter().map(Vec::len).sum();
    anyhow::ensure!(
        n == prompts.len() * new,
        "generated {n} tokens, not {}",
        prompts.len() * new
    );
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// `runs` rounds of both sides, tarpo first in even rounds and the peer first
/// in odd ones, so both see the same machine conditions; prints each round.
/// Returns (tarpo, peer) rates.
pub fn side_by_side(
    runs: usize,
    mut ours: impl FnMut(usize) -> anyhow::Result<f64>,
    mut peer: impl FnMut(usize) -> anyhow::Result<f64>,
) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for r in 0..runs {
        if r % 2 == 0 {
            a.push(ours(r)?);
            b.push(peer(r)?);
        } else {
            b.push(peer(r)?);
            a.push(ours(r)?);
        }
        eprintln!(
            "run {}: tarpo {:.1} tok/s, transformers {:.1} tok/s",
            r + 1,
            a[r],
            b[r]
        );
    }
    Ok((a, b))
}
