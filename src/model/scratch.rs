//! Models from scratch: a byte-level BPE tokenizer trained on a corpus with
//! the `tokenizers` crate, and a Qwen2-architecture (or Ouro looped) checkpoint with freshly
//! initialised weights, both written as a normal Hugging Face directory
//! (config.json, generation_config.json, tokenizer.json, tokenizer_config.json,
//! model.safetensors)
//! that transformers loads as it is.
use crate::rng::Rng;
use anyhow::{anyhow, bail, Context, Result};
use serde_json::json;
use std::path::Path;
use tch::{Device, Kind, Tensor};
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper};
use tokenizers::{PreTokenizerWrapper, TokenizerBuilder};

/// The end-of-text token every tokenizer made here has, as id 0.
pub const EOS: &str = "<|endoftext|>";

/// Trains a byte-level BPE tokenizer of `vocab` tokens on `texts` and writes
/// it to `path`: every byte is a token (any text encodes), digits are split
/// one by one (numbers tokenise the same way wherever they appear, as in
/// Qwen2's tokenizer), `<|endoftext|>` is id 0, and nothing is added around
/// a text (no BOS).
pub fn train_tokenizer(texts: &[String], vocab: usize, path: &Path) -> Result<()> {
    if vocab < 300 {
        bail!("train_tokenizer: vocab must be >= 300 (256 bytes, the end token and some merges), got {vocab}");
    }
    if texts.is_empty() {
        bail!("train_tokenizer: no texts to train on");
    }
    let mut trainer = BpeTrainerBuilder::new()
        .show_progress(false)
        .vocab_size(vocab)
        .min_frequency(2)
        .special_tokens(vec![AddedToken::from(EOS.to_string(), true)])
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let pre: PreTokenizerWrapper = Sequence::new(vec![
        Digits::new(true).into(),
        ByteLevel::new(false, true, true).into(),
    ])
    .into();
    let mut tok = TokenizerBuilder::<
        BPE,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    >::new()
    .with_model(BPE::default())
    .with_pre_tokenizer(Some(pre))
    .with_decoder(Some(ByteLevel::default().into()))
    .build()
    .map_err(|e| anyhow!("train_tokenizer: {e}"))?;
    tok.train(&mut trainer, texts.iter())
        .map_err(|e| anyhow!("train_tokenizer: {e}"))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("{}: cannot create", dir.display()))?;
    }
    tok.save(path, true)
        .map_err(|e| anyhow!("{}: cannot write the tokenizer: {e}", path.display()))
}

/// The shape of a model from scratch (Qwen2: q/k/v biases, RMSNorm, SwiGLU,
/// tied embeddings).
#[derive(Debug, Clone, PartialEq)]
pub struct ScratchConfig {
    pub hidden: i64,
    pub layers: i64,
    pub heads: i64,
    pub kv_heads: i64,
    pub intermediate: i64,
    pub max_positions: i64,
    pub seed: u64,
    /// Passes through the stack: above 1, an Ouro looped model (sandwich
    /// norms, exit gate, no biases) instead of Qwen2.
    pub loops: i64,
}

impl ScratchConfig {
    fn check(&self) -> Result<()> {
        let pos = [
            self.hidden,
            self.layers,
            self.heads,
            self.kv_heads,
            self.intermediate,
            self.max_positions,
            self.loops,
        ];
        if pos.iter().any(|&v| v < 1) {
            bail!("new_model: every size must be >= 1, got {self:?}");
        }
        if self.hidden % self.heads != 0 || (self.hidden / self.heads) % 2 != 0 {
            bail!(
                "new_model: hidden ({}) must split into {} heads of an even size",
                self.hidden,
                self.heads
            );
        }
        if self.heads % self.kv_heads != 0 {
            bail!(
                "new_model: heads ({}) must be a multiple of kv_heads ({})",
                self.heads,
                self.kv_heads
            );
        }
        Ok(())
    }
}

/// Writes a Qwen2 model directory at `dir` with fresh weights (as
/// transformers initialises them: N(0, 0.02) matrices and embedding, zero
/// biases, unit norms; seeded) for the tokenizer at `tokenizer` (copied in).
/// Returns the number of parameters.
pub fn new_model(dir: &Path, tokenizer: &Path, cfg: &ScratchConfig) -> Result<i64> {
    cfg.check()?;
    let tok = tokenizers::Tokenizer::from_file(tokenizer)
        .map_err(|e| anyhow!("{}: cannot load the tokenizer: {e}", tokenizer.display()))?;
    let vocab = tok.get_vocab_size(true) as i64;
    let eos = tok
        .token_to_id(EOS)
        .ok_or_else(|| anyhow!("{}: no {EOS} token", tokenizer.display()))?;
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    let (h, kv) = (cfg.hidden, cfg.kv_heads * (cfg.hidden / cfg.heads));
    let looped = cfg.loops > 1;
    let mut config = json!({
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
        "vocab_size": vocab, "hidden_size": h, "intermediate_size": cfg.intermediate,
        "num_hidden_layers": cfg.layers, "num_attention_heads": cfg.heads,
        "num_key_value_heads": cfg.kv_heads, "max_position_embeddings": cfg.max_positions,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": true,
        "hidden_act": "silu", "initializer_range": 0.02, "use_sliding_window": false,
        "bos_token_id": eos, "eos_token_id": eos, "dtype": "float32",
    });
    if looped {
        config["architectures"] = json!(["OuroForCausalLM"]);
        config["model_type"] = json!("ouro");
        config["total_ut_steps"] = json!(cfg.loops);
        config["early_exit_threshold"] = json!(1.0);
    }
    let write = |name: &str, v: &serde_json::Value| -> Result<()> {
        let p = dir.join(name);
        std::fs::write(&p, serde_json::to_string_pretty(v)? + "\n")
            .with_context(|| format!("{}: cannot write", p.display()))
    };
    write("config.json", &config)?;
    write(
        "generation_config.json",
        &json!({"eos_token_id": eos, "bos_token_id": eos}),
    )?;
    // What AutoTokenizer needs to load tokenizer.json as it is.
    write(
        "tokenizer_config.json",
        &json!({
            "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS,
            "model_max_length": cfg.max_positions, "clean_up_tokenization_spaces": false,
        }),
    )?;
    let to = dir.join("tokenizer.json");
    if tokenizer.canonicalize().ok() != to.canonicalize().ok() {
        std::fs::copy(tokenizer, &to).with_context(|| format!("{}: cannot write", to.display()))?;
    }
    let mut rng = Rng::new(cfg.seed);
    let mut normal = |shape: &[i64]| -> Result<Tensor> {
        let n: i64 = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| (rng.next_normal() * 0.02) as f32).collect();
        Ok(Tensor::from_slice(&v).f_view(shape)?)
    };
    let zeros = |n: i64| Tensor::zeros([n], (Kind::Float, Device::Cpu));
    let ones = |n: i64| Tensor::ones([n], (Kind::Float, Device::Cpu));
    let mut ts: Vec<(String, Tensor)> =
        vec![("model.embed_tokens.weight".into(), normal(&[vocab, h])?)];
    for i in 0..cfg.layers {
        let p = format!("model.layers.{i}");
        for (name, out, inp) in [
            ("q_proj", h, h),
            ("k_proj", kv, h),
            ("v_proj", kv, h),
            ("o_proj", h, h),
        ] {
            ts.push((format!("{p}.self_attn.{name}.weight"), normal(&[out, inp])?));
            if name != "o_proj" && !looped {
                ts.push((format!("{p}.self_attn.{name}.bias"), zeros(out)));
            }
        }
        let ff = cfg.intermediate;
        for (name, out, inp) in [
            ("gate_proj", ff, h),
            ("up_proj", ff, h),
            ("down_proj", h, ff),
        ] {
            ts.push((format!("{p}.mlp.{name}.weight"), normal(&[out, inp])?));
        }
        ts.push((format!("{p}.input_layernorm.weight"), ones(h)));
        ts.push((format!("{p}.post_attention_layernorm.weight"), ones(h)));
        if looped {
            ts.push((format!("{p}.input_layernorm_2.weight"), ones(h)));
            ts.push((format!("{p}.post_attention_layernorm_2.weight"), ones(h)));
        }
    }
    ts.push(("model.norm.weight".into(), ones(h)));
    if looped {
        ts.push(("model.early_exit_gate.weight".into(), normal(&[1, h])?));
        ts.push(("model.early_exit_gate.bias".into(), zeros(1)));
    }
    let params = ts.iter().map(|(_, t)| t.numel() as i64).sum();
    let path = dir.join("model.safetensors");
    Tensor::write_safetensors(&ts, &path)
        .with_context(|| format!("{}: cannot write", path.display()))?;
    Ok(params)
}
