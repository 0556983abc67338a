//! Hugging Face checkpoints: config, weights, decoder, KV cache, tokenizer.
pub mod batch;
pub mod config;
pub mod decode_attention;
pub mod device;
pub mod host_memory;
pub mod kv_cache;
pub mod linear;
pub mod llama;
pub mod lora;
pub mod ouro;
pub mod peft;
pub mod rope;
pub mod scratch;
mod simd_dots;
pub mod small_matmul;
pub mod spin_pool;
pub mod text;
pub mod tokenizer;
pub mod trainable;
pub mod vec_exp;
pub mod weights;

use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use tch::{Device, Kind};

pub use batch::left_pad;
pub use config::ModelConfig;
pub use kv_cache::{KvCache, Step};
pub use llama::Llama;
pub use lora::{LoraAdapter, LoraConfig, LoraUse};
pub use tokenizer::{Message, Tokenizer};
pub use weights::Weights;

/// The embedded default model (a tiny Qwen2 trained on the synthetic task by
/// scripts/make_default_model.rhai, committed under assets/default-model):
/// `TARPO_DEFAULT_MODEL` when set, else the repository's copy.
pub fn default_dir() -> PathBuf {
    match std::env::var_os("TARPO_DEFAULT_MODEL") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/assets/default-model")),
    }
}

/// The embedded looped default model (an Ouro model of 2 layers applied
/// twice, trained like the default one): `TARPO_LOOPED_MODEL` when set, else
/// the repository's copy under assets/looped-model.
pub fn looped_dir() -> PathBuf {
    match std::env::var_os("TARPO_LOOPED_MODEL") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/assets/looped-model")),
    }
}

/// A loaded checkpoint directory: decoder, tokenizer and stop tokens.
pub struct Model {
    pub dir: PathBuf,
    pub net: Llama,
    pub tok: Tokenizer,
    /// Token ids that end a generation.
    pub eos: Vec<i64>,
}

impl Model {
    pub fn load(dir: &Path, device: Device, dtype: Kind) -> Result<Self> {
        if !dir.is_dir() {
            anyhow::bail!("{}: not a model directory", dir.display());
        }
        host_memory::keep_freed_memory();
        let cfg = ModelConfig::load(dir)?;
        let tok = Tokenizer::load(dir)?;
        let weights = Weights::open(dir, device, dtype)?;
        let eos = stop_tokens(dir, &cfg, &tok)?;
        let net = Llama::load(cfg, &weights)?;
        host_memory::pack_weights(&net.tensors())?;
        Ok(Model {
            dir: dir.to_path_buf(),
            net,
            tok,
            eos,
        })
    }
}

/// LoRA on a loaded checkpoint: the `Llama` methods with this directory as
/// the base model.
impl Model {
    /// Saves the adapters in PEFT's layout, `base_model_name_or_path` being
    /// this checkpoint's directory.
    pub fn save_lora(&self, dir: &Path) -> Result<()> {
        let base = self.dir.canonicalize().unwrap_or_else(|_| self.dir.clone());
        self.net.save_lora(dir, &base.to_string_lossy())
    }

    /// Loads a PEFT LoRA adapter onto the decoder (replacing any adapters).
    pub fn load_lora(&mut self, dir: &Path) -> Result<()> {
        self.net.load_lora(dir)
    }

    /// Writes this checkpoint with the adapters merged in to `out_dir`.
    pub fn export_merged(&self, out_dir: &Path) -> Result<()> {
        self.net.export_merged(&self.dir, out_dir)
    }
}

/// generation_config.json's `eos_token_id`, else config.json's, else the tokenizer's.
fn stop_tokens(dir: &Path, cfg: &ModelConfig, tok: &Tokenizer) -> Result<Vec<i64>> {
    let path = dir.join("generation_config.json");
    if path.exists() {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("{}: cannot read", path.display()))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: malformed JSON", path.display()))?;
        let ids = config::token_ids(v.get("eos_token_id"));
        if !ids.is_empty() {
            return Ok(ids);
        }
    }
    if !cfg.eos_token_ids.is_empty() {
        return Ok(cfg.eos_token_ids.clone());
    }
    Ok(tok.eos_id().into_iter().collect())
}
