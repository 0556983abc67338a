//! `config.json` of a Hugging Face causal LM (Llama and Qwen2 families, and
//! Ouro's looped Llama).
//!
//! Field names are the checkpoint's own. Every field that changes the maths is
//! either used or refused with an error naming it, so a checkpoint we cannot
//! run exactly never loads silently.
use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;
use serde_json::Value;
use std::path::Path;

/// The decoder families we run. Qwen2 is Llama with q/k/v biases.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Qwen2,
    /// Ouro: one Llama stack applied `loops` times, sandwich norms, an exit gate.
    Ouro,
}

/// How rotary frequencies are derived from `rope_theta`.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    Default,
    /// Positions divided by `factor`.
    Linear {
        factor: f64,
    },
    /// Llama-3.1 frequency-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub num_key_value_heads: i64,
    pub head_dim: i64,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: i64,
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v projections (Qwen2 always; Llama when `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on the output projection (Llama `attention_bias` only).
    pub o_bias: bool,
    pub mlp_bias: bool,
    pub bos_token_id: Option<i64>,
    pub eos_token_ids: Vec<i64>,
    /// Ouro's `total_ut_steps`: passes through the shared stack (1 otherwise).
    pub loops: usize,
    /// Ouro's `early_exit_threshold`: inference reads the first loop whose
    /// cumulative exit probability reaches it (1: the last loop).
    pub early_exit_threshold: f64,
}

/// The subset of HF fields we read; unknown fields are ignored unless they
/// change the computation, in which case `check_refused` names them.
#[derive(Deserialize)]
struct Raw {
    vocab_size: i64,
    hidden_size: i64,
    intermediate_size: i64,
    num_hidden_layers: i64,
    num_attention_heads: i64,
    num_key_value_heads: Option<i64>,
    head_dim: Option<i64>,
    rms_norm_eps: f64,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    rope_parameters: Option<Value>,
    max_position_embeddings: Option<i64>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    hidden_act: Option<String>,
    use_sliding_window: Option<bool>,
    layer_types: Option<Vec<String>>,
    bos_token_id: Option<Value>,
    eos_token_id: Option<Value>,
    total_ut_steps: Option<Value>,
    early_exit_threshold: Option<Value>,
}

impl ModelConfig {
    /// Reads `dir/config.json`.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("{}: cannot read", path.display()))?;
        Self::from_json(&text).with_context(|| format!("{}", path.display()))
    }

    pub fn from_json(text: &str) -> Result<Self> {
        let value: Value = serde_json::from_str(text).context("malformed JSON")?;
        let arch = detect_arch(&value)?;
        let raw: Raw = serde_json::from_value(value).map_err(|e| anyhow!("{e}"))?;
        if let Some(act) = &raw.hidden_act {
            if act != "silu" {
                bail!("hidden_act {act:?} is not supported (only \"silu\")");
            }
        }
        if raw.use_sliding_window == Some(true) {
            bail!("use_sliding_window = true is not supported");
        }
        if let Some(t) = raw
            .layer_types
            .iter()
            .flatten()
            .find(|t| *t != "full_attention")
        {
            bail!("layer_types entry {t:?} is not supported (only \"full_attention\")");
        }
        let heads = raw.num_attention_heads;
        let kv_heads = raw.num_key_value_heads.unwrap_or(heads);
        if heads <= 0 || kv_heads <= 0 || heads % kv_heads != 0 {
            bail!("num_attention_heads ({heads}) must be a positive multiple of num_key_value_heads ({kv_heads})");
        }
        if raw.hidden_size % heads != 0 && raw.head_dim.is_none() {
            bail!(
                "hidden_size ({}) is not divisible by num_attention_heads ({heads})",
                raw.hidden_size
            );
        }
        let head_dim = raw.head_dim.unwrap_or(raw.hidden_size / heads);
        if head_dim % 2 != 0 {
            bail!("head_dim ({head_dim}) must be even for rotary embeddings");
        }
        let (rope_theta, rope_scaling) = parse_rope(&raw)?;
        let attention_bias = raw.attention_bias.unwrap_or(false);
        let (loops, early_exit_threshold) = parse_loops(&raw, arch)?;
        Ok(ModelConfig {
            arch,
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            rms_norm_eps: raw.rms_norm_eps,
            rope_theta,
            rope_scaling,
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(4096),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            qkv_bias: arch == Arch::Qwen2 || attention_bias,
            o_bias: arch != Arch::Qwen2 && attention_bias,
            mlp_bias: raw.mlp_bias.unwrap_or(false),
            bos_token_id: raw.bos_token_id.as_ref().and_then(Value::as_i64),
            eos_token_ids: token_ids(raw.eos_token_id.as_ref()),
            loops,
            early_exit_threshold,
        })
    }
}

/// Ouro's loop count and exit threshold (1 and 1.0 for plain models).
fn parse_loops(raw: &Raw, arch: Arch) -> Result<(usize, f64)> {
    if arch != Arch::Ouro {
        if raw.total_ut_steps.is_some() {
            bail!("total_ut_steps is an Ouro field (model_type \"ouro\"), not {arch:?}'s");
        }
        return Ok((1, 1.0));
    }
    let loops = match &raw.total_ut_steps {
        None => bail!("total_ut_steps is missing (the number of passes through the shared stack)"),
        Some(v) => v
            .as_u64()
            .filter(|&n| (1..=64).contains(&n))
            .ok_or_else(|| anyhow!("total_ut_steps must be an integer from 1 to 64, got {v}"))?,
    };
    let q = match &raw.early_exit_threshold {
        None | Some(Value::Null) => 1.0,
        Some(v) => v
            .as_f64()
            .filter(|q| *q > 0.0 && *q <= 1.0)
            .ok_or_else(|| anyhow!("early_exit_threshold must be a number in (0, 1], got {v}"))?,
    };
    Ok((loops as usize, q))
}

fn detect_arch(v: &Value) -> Result<Arch> {
    let model_type = v.get("model_type").and_then(Value::as_str);
    let archs: Vec<&str> = v
        .get("architectures")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    match model_type {
        Some("llama") => return Ok(Arch::Llama),
        Some("qwen2") => return Ok(Arch::Qwen2),
        Some("ouro") => return Ok(Arch::Ouro),
        _ => {}
    }
    for a in &archs {
        match *a {
            "LlamaForCausalLM" => return Ok(Arch::Llama),
            "Qwen2ForCausalLM" => return Ok(Arch::Qwen2),
            "OuroForCausalLM" => return Ok(Arch::Ouro),
            _ => {}
        }
    }
    bail!(
        "unknown architecture (model_type {:?}, architectures {:?}); supported: llama, qwen2, ouro",
        model_type.unwrap_or("missing"),
        archs
    )
}

/// `eos_token_id` may be an int or a list of ints.
pub fn token_ids(v: Option<&Value>) -> Vec<i64> {
    match v {
        Some(Value::Number(n)) => n.as_i64().into_iter().collect(),
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_i64).collect(),
        _ => Vec::new(),
    }
}

/// Reads `rope_theta` + `rope_scaling` (transformers < 5) or `rope_parameters` (>= 5).
fn parse_rope(raw: &Raw) -> Result<(f64, RopeScaling)> {
    let params = raw.rope_parameters.as_ref().filter(|v| !v.is_null());
    let theta = params
        .and_then(|p| p.get("rope_theta"))
        .and_then(Value::as_f64)
        .or(raw.rope_theta)
        .unwrap_or(10000.0);
    let scaling = params.or(raw.rope_scaling.as_ref().filter(|v| !v.is_null()));
    let Some(s) = scaling else {
        return Ok((theta, RopeScaling::Default));
    };
    let key = if params.is_some() {
        "rope_parameters"
    } else {
        "rope_scaling"
    };
    let kind = s
        .get("rope_type")
        .or_else(|| s.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let num = |name: &str| -> Result<f64> {
        s.get(name)
            .and_then(Value::as_f64)
            .ok_or_else(|| anyhow!("{key}.{name} is missing or not a number"))
    };
    let scaling = match kind {
        "default" => RopeScaling::Default,
        "linear" => RopeScaling::Linear {
            factor: num("factor")?,
        },
        "llama3" => RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")?,
        },
        other => bail!("{key}.rope_type {other:?} is not supported (default, linear, llama3)"),
    };
    Ok((theta, scaling))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#""vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
        "num_hidden_layers": 1, "num_attention_heads": 2, "rms_norm_eps": 1e-6"#;

    #[test]
    fn qwen2_has_qkv_bias_and_legacy_rope_theta() {
        let c = ModelConfig::from_json(&format!(
            r#"{{"model_type": "qwen2", "rope_theta": 1e6, "num_key_value_heads": 1, {BASE}}}"#
        ))
        .unwrap();
        assert_eq!(c.arch, Arch::Qwen2);
        assert!(c.qkv_bias && !c.o_bias);
        assert_eq!(
            (c.rope_theta, c.num_key_value_heads, c.head_dim),
            (1e6, 1, 4)
        );
    }

    #[test]
    fn llama3_rope_parameters() {
        let c = ModelConfig::from_json(&format!(
            r#"{{"architectures": ["LlamaForCausalLM"], {BASE}, "eos_token_id": [1, 2],
            "rope_parameters": {{"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}}}"#
        ))
        .unwrap();
        assert_eq!(c.rope_theta, 5e5);
        assert_eq!(c.eos_token_ids, vec![1, 2]);
        assert!(matches!(c.rope_scaling, RopeScaling::Llama3 { factor, .. } if factor == 8.0));
    }

    #[test]
    fn refusals_name_the_field() {
        let err = |json: String| format!("{:#}", ModelConfig::from_json(&json).unwrap_err());
        assert!(
            err(format!(r#"{{"model_type": "gpt2", {BASE}}}"#)).contains("unknown architecture")
        );
        assert!(err(r#"{"model_type": "llama"}"#.into()).contains("vocab_size"));
        assert!(err(format!(
            r#"{{"model_type": "llama", "hidden_act": "gelu", {BASE}}}"#
        ))
        .contains("hidden_act"));
        assert!(err(format!(
            r#"{{"model_type": "llama", "rope_scaling": {{"rope_type": "yarn"}}, {BASE}}}"#
        ))
        .contains("rope_scaling.rope_type \"yarn\""));
    }
}
