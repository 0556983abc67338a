//! Peak memory of one replay micro-batch (forward, KL reference, backward) at
//! a Qwen2.5-size vocabulary, against the completion length T.
//!
//! A random-weight Qwen2-architecture model (vocabulary 151936 as in Qwen2.5,
//! hidden 256, 2 layers, tied embeddings; written once under the system temp
//! directory) with LoRA r 8; one micro-batch of 8 completions of T tokens after
//! a 16-token prompt, a quarter of them soft; the TARPO loss with beta 0.005
//! (so the reference forward is in) and its backward. Each T runs in a fresh
//! child process, which reports its resident set before the replay (the
//! loaded model) and its peak (VmHWM) after it.
//!
//! Run: cargo bench --bench replay_memory   (TARPO_BENCH_T=128,256,512,1024)
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;
use tarpo::model::lora::LoraConfig;
use tarpo::model::Model;
use tarpo::policy::{Rng, Rollout, Router, TokenRecord, HARD, SOFT};
use tarpo::rl::loss::LossConfig;
use tarpo::rl::policy::Policy;
use tarpo::rl::update::{accumulate_gradients, ReplayConfig};
use tch::{Device, Kind, Tensor};

const VOCAB: i64 = 151_936;
const HIDDEN: i64 = 256;
const ROWS: usize = 8;
const PROMPT: usize = 16;
const MIX: usize = 10;

/// Resident and peak resident set of this process in MB.
fn rss_mb() -> Result<(f64, f64)> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let field = |name: &str| -> Result<f64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
            .map(|kb| kb / 1024.0)
            .with_context(|| format!("{name} in /proc/self/status"))
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// The random-weight model directory (made once).
fn model_dir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("tarpo-bench-vocab{VOCAB}-h{HIDDEN}"));
    if dir.join("model.safetensors").exists() {
        return Ok(dir);
    }
    let tmp = dir.with_extension(format!("tmp{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let config = serde_json::json!({
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
        "vocab_size": VOCAB, "hidden_size": HIDDEN, "intermediate_size": 512,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 4096,
        "tie_word_embeddings": true, "bos_token_id": 0, "eos_token_id": 1,
    });
    std::fs::write(tmp.join("config.json"), config.to_string())?;
    // A word-level tokenizer of two words: the bench feeds ids, not text.
    let tok = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": {"<unk>": 0, "a": 1}, "unk_token": "<unk>"},
    });
    std::fs::write(tmp.join("tokenizer.json"), tok.to_string())?;
    tch::manual_seed(0);
    let opts = (Kind::Float, Device::Cpu);
    let mut ts: Vec<(String, Tensor)> = vec![
        (
            "model.embed_tokens.weight".into(),
            Tensor::randn([VOCAB, HIDDEN], opts) * 0.02,
        ),
        ("model.norm.weight".into(), Tensor::ones([HIDDEN], opts)),
    ];
    for i in 0..2 {
        let p = format!("model.layers.{i}");
        for (name, shape) in [
            ("self_attn.q_proj.weight", vec![HIDDEN, HIDDEN]),
            ("self_attn.q_proj.bias", vec![HIDDEN]),
            ("self_attn.k_proj.weight", vec![HIDDEN / 2, HIDDEN]),
            ("self_attn.k_proj.bias", vec![HIDDEN / 2]),
            ("self_attn.v_proj.weight", vec![HIDDEN / 2, HIDDEN]),
            ("self_attn.v_proj.bias", vec![HIDDEN / 2]),
            ("self_attn.o_proj.weight", vec![HIDDEN, HIDDEN]),
            ("mlp.gate_proj.weight", vec![512, HIDDEN]),
            ("mlp.up_proj.weight", vec![512, HIDDEN]),
            ("mlp.down_proj.weight", vec![HIDDEN, 512]),
        ] {
            ts.push((
                format!("{p}.{name}"),
                Tensor::randn(shape.as_slice(), opts) * 0.05,
            ));
        }
        for norm in ["input_layernorm", "post_attention_layernorm"] {
            ts.push((format!("{p}.{norm}.weight"), Tensor::ones([HIDDEN], opts)));
        }
    }
    Tensor::write_safetensors(&ts, tmp.join("model.safetensors"))?;
    match std::fs::rename(&tmp, &dir) {
        Ok(()) => Ok(dir),
        Err(_) if dir.join("model.safetensors").exists() => {
            let _ = std::fs::remove_dir_all(&tmp);
            Ok(dir)
        }
        Err(e) => Err(e.into()),
    }
}

/// ROWS completions of `t` tokens, every fourth one soft (a random top-10 mixture).
fn synthetic_rollout(t: usize) -> Rollout {
    let mut rng = Rng::new(1);
    let mut id = || (rng.next_u64() % VOCAB as u64) as i64;
    let prompts = (0..ROWS)
        .map(|_| (0..PROMPT).map(|_| id()).collect())
        .collect();
    let records = (0..ROWS)
        .map(|_| {
            (0..t)
                .map(|j| {
                    let soft = j % 4 == 1 && j + 1 < t;
                    TokenRecord {
                        token: id(),
                        mode: if soft { SOFT } else { HARD },
                        forced: false,
                        logp: -1.0,
                        router_logp: -0.1,
                        p_soft: 0.25,
                        entropy: 1.0,
                        topk_entropy: 1.0,
                        mix_ids: if soft {
                            (0..MIX).map(|_| id()).collect()
                        } else {
                            vec![]
                        },
                        mix_weights: if soft { vec![0.1; MIX] } else { vec![] },
                        latent: Default::default(),
                    }
                })
                .collect()
        })
        .collect();
    Rollout {
        prompts,
        records,
        inputs: Vec::new(),
        temperature: 0.5,
        mix_k: MIX as i64,
    }
}

/// One replay micro-batch in this process; prints "T rss_before_mb peak_mb".
fn child(t: usize) -> Result<()> {
    tch::set_num_threads(2);
    let mut model = Model::load(&model_dir()?, Device::Cpu, Kind::Float)?;
    model.net.attach_lora(&LoraConfig::new(8, 16.0))?;
    let router = Router::new(HIDDEN, 0.25, 1.0, 0, Device::Cpu)?;
    let mut policy = Policy::new(model);
    policy.router_ref = Some(router.frozen_copy()?);
    policy.router = Some(router);
    let ro = synthetic_rollout(t);
    let adv: Vec<f64> = (0..ROWS)
        .map(|i| if i % 2 == 0 { 1.0 } else { -1.0 })
        .collect();
    let mut cfg = ReplayConfig::new(LossConfig::default());
    cfg.micro_batch = ROWS;
    let (before, _) = rss_mb()?;
    let m = accumulate_gradients(&policy, &ro, &adv, &cfg)?;
    let (_, peak) = rss_mb()?;
    if !m.loss.is_finite() {
        bail!("loss is not finite: {m:?}");
    }
    println!("{t} {before:.0} {peak:.0}");
    Ok(())
}

fn run_child(exe: &Path, t: usize) -> Result<Option<(f64, f64)>> {
    let out = Command::new(exe)
        .arg("--child")
        .arg(t.to_string())
        .output()?;
    if !out.status.success() {
        eprintln!(
            "T = {t}: the child failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        return Ok(None);
    }
    let line = String::from_utf8_lossy(&out.stdout).to_string();
    let f: Vec<f64> = line
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    if f.len() != 3 {
        bail!("unexpected child output {line:?}");
    }
    Ok(Some((f[1], f[2])))
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--child") {
        let t = args
            .get(i + 1)
            .and_then(|v| v.parse().ok())
            .context("--child T")?;
        return child(t);
    }
    let ts: Vec<usize> = std::env::var("TARPO_BENCH_T")
        .unwrap_or_else(|_| "128,256,512,1024".into())
        .split(',')
        .filter_map(|v| v.trim().parse().ok())
        .collect();
    model_dir()?;
    let exe = std::env::current_exe()?;
    println!(
        "replay memory: vocabulary {VOCAB}, hidden {HIDDEN}, 2 layers, LoRA r8, one micro-batch of {ROWS} x (prompt {PROMPT} + T), TARPO loss with KL, forward + backward"
    );
    println!("     T   model loaded MB   peak MB   replay peak above the model MB");
    for t in ts {
        match run_child(&exe, t)? {
            Some((before, peak)) => {
                println!(
                    "  {t:>5}  {before:>16.0}  {peak:>8.0}  {:>10.0}",
                    peak - before
                )
            }
            None => println!("  {t:>5}  failed (see above)"),
        }
    }
    Ok(())
}
