//! `config.json` of a Hugging Face causal LM (Llama and Qwen2 families, and
//! Ouro's looped Llama).
//!
//! Field names are the checkpoint's own. Every field that changes the maths is
//! either used or refused with an error naming it, so a checkpoint we cannot
//! run exactly never loads silently.
use super::text::{describe, json_short, read_text, shorten};
use anyhow::{anyhow, bail, Context, Result};
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

/// Largest sizes we accept: far above any real checkpoint, and small enough
/// that products of them (q heads x head_dim, ...) cannot overflow.
const MAX_VOCAB: i64 = 1 << 31;
const MAX_WIDTH: i64 = 1 << 22;
const MAX_LAYERS: i64 = 4096;
const MAX_HEADS: i64 = 1 << 14;
const MAX_HEAD_DIM: i64 = 1 << 16;

/// The JSON object of a config, read key by key: every refusal names its key.
struct Fields<'a>(&'a serde_json::Map<String, Value>);

impl Fields<'_> {
    /// A key's value; null counts as absent.
    fn get(&self, key: &str) -> Option<&Value> {
        self.0.get(key).filter(|v| !v.is_null())
    }

    fn int(&self, key: &str, range: std::ops::RangeInclusive<i64>) -> Result<Option<i64>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let n = v
            .as_i64()
            .ok_or_else(|| anyhow!("key `{key}`: expected an integer, got {}", describe(v)))?;
        if !range.contains(&n) {
            bail!(
                "key `{key}`: {n} is out of range (expected {} to {})",
                range.start(),
                range.end()
            );
        }
        Ok(Some(n))
    }

    fn required_int(&self, key: &str, range: std::ops::RangeInclusive<i64>) -> Result<i64> {
        self.int(key, range)?
            .ok_or_else(|| anyhow!("key `{key}`: missing (an integer is required)"))
    }

    /// A finite number, positive unless `zero_ok`.
    fn number(&self, key: &str, zero_ok: bool) -> Result<Option<f64>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let x = v
            .as_f64()
            .ok_or_else(|| anyhow!("key `{key}`: expected a number, got {}", describe(v)))?;
        if !x.is_finite() || x < 0.0 || (x == 0.0 && !zero_ok) {
            let want = if zero_ok { ">= 0" } else { "> 0" };
            bail!("key `{key}`: expected a finite number {want}, got {x}");
        }
        Ok(Some(x))
    }

    fn bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => bail!("key `{key}`: expected true or false, got {}", describe(v)),
        }
    }

    fn str(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => bail!("key `{key}`: expected a string, got {}", describe(v)),
        }
    }

    fn object(&self, key: &str) -> Result<Option<Fields<'_>>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Object(o)) => Ok(Some(Fields(o))),
            Some(v) => bail!("key `{key}`: expected an object, got {}", describe(v)),
        }
    }
}

impl ModelConfig {
    /// Reads `dir/config.json`. Errors are one line: the path, then the key
    /// (or the JSON syntax error's line and column).
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = read_text(&path)?;
        Self::from_json(&text).with_context(|| format!("{}", path.display()))
    }

    pub fn from_json(text: &str) -> Result<Self> {
        let value: Value = serde_json::from_str(text).context("malformed JSON")?;
        let Value::Object(obj) = &value else {
            bail!("expected a JSON object at line 1, got {}", describe(&value));
        };
        let f = Fields(obj);
        let arch = detect_arch(&f)?;
        if let Some(act) = f.str("hidden_act")? {
            if act != "silu" {
                bail!(
                    "key `hidden_act`: {} is not supported (only \"silu\")",
                    shorten(act)
                );
            }
        }
        if f.bool("use_sliding_window")? == Some(true) {
            bail!("key `use_sliding_window`: true is not supported");
        }
        if let Some(v) = f.get("layer_types") {
            let Value::Array(items) = v else {
                bail!(
                    "key `layer_types`: expected an array of strings, got {}",
                    describe(v)
                );
            };
            if let Some(t) = items.iter().find(|t| t.as_str() != Some("full_attention")) {
                bail!(
                    "key `layer_types`: entry {} is not supported (only \"full_attention\")",
                    describe(t)
                );
            }
        }
        let vocab_size = f.required_int("vocab_size", 1..=MAX_VOCAB)?;
        let hidden_size = f.required_int("hidden_size", 1..=MAX_WIDTH)?;
        let intermediate_size = f.required_int("intermediate_size", 1..=MAX_WIDTH)?;
        let num_hidden_layers = f.required_int("num_hidden_layers", 1..=MAX_LAYERS)?;
        let heads = f.required_int("num_attention_heads", 1..=MAX_HEADS)?;
        let kv_heads = f
            .int("num_key_value_heads", 1..=MAX_HEADS)?
            .unwrap_or(heads);
        if heads % kv_heads != 0 {
            bail!("key `num_key_value_heads`: num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv_heads})");
        }
        let head_dim = match f.int("head_dim", 1..=MAX_HEAD_DIM)? {
            Some(d) => d,
            None => {
                if hidden_size % heads != 0 {
                    bail!(
                        "key `num_attention_heads`: hidden_size ({hidden_size}) is not divisible by num_attention_heads ({heads}) (and no head_dim is given)"
                    );
                }
                hidden_size / heads
            }
        };
        if head_dim % 2 != 0 || head_dim > MAX_HEAD_DIM {
            bail!("key `head_dim`: head_dim ({head_dim}) must be even (rotary embeddings) and at most {MAX_HEAD_DIM}");
        }
        let rms_norm_eps = f
            .number("rms_norm_eps", true)?
            .ok_or_else(|| anyhow!("key `rms_norm_eps`: missing (a number is required)"))?;
        let (rope_theta, rope_scaling) = parse_rope(&f)?;
        let attention_bias = f.bool("attention_bias")?.unwrap_or(false);
        let (loops, early_exit_threshold) = parse_loops(&f, arch)?;
        let bos_token_id = match f.get("bos_token_id") {
            None => None,
            Some(v) => Some(token_id(v).ok_or_else(|| {
                anyhow!(
                    "key `bos_token_id`: expected a token id (an integer >= 0), got {}",
                    describe(v)
                )
            })?),
        };
        let eos_token_ids = match f.get("eos_token_id") {
            None => Vec::new(),
            Some(v @ Value::Array(items)) => items
                .iter()
                .map(|t| {
                    token_id(t).ok_or_else(|| {
                        anyhow!(
                            "key `eos_token_id`: expected token ids (integers >= 0), got {} in {}",
                            describe(t),
                            describe(v)
                        )
                    })
                })
                .collect::<Result<_>>()?,
            Some(v) => vec![token_id(v).ok_or_else(|| {
                anyhow!(
                    "key `eos_token_id`: expected a token id or a list of them, got {}",
                    describe(v)
                )
            })?],
        };
        Ok(ModelConfig {
            arch,
            vocab_size,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            rms_norm_eps,
            rope_theta,
            rope_scaling,
            max_position_embeddings: f
                .int("max_position_embeddings", 1..=i64::MAX)?
                .unwrap_or(4096),
            tie_word_embeddings: f.bool("tie_word_embeddings")?.unwrap_or(false),
            qkv_bias: arch == Arch::Qwen2 || attention_bias,
            o_bias: arch != Arch::Qwen2 && attention_bias,
            mlp_bias: f.bool("mlp_bias")?.unwrap_or(false),
            bos_token_id,
            eos_token_ids,
            loops,
            early_exit_threshold,
        })
    }
}

fn token_id(v: &Value) -> Option<i64> {
    v.as_i64().filter(|&i| i >= 0)
}

/// Ouro's loop count and exit threshold (1 and 1.0 for plain models).
fn parse_loops(f: &Fields, arch: Arch) -> Result<(usize, f64)> {
    if arch != Arch::Ouro {
        if f.get("total_ut_steps").is_some() {
            bail!("key `total_ut_steps`: an Ouro field (model_type \"ouro\"), not {arch:?}'s");
        }
        return Ok((1, 1.0));
    }
    let loops = match f.get("total_ut_steps") {
        None => {
            bail!("key `total_ut_steps`: total_ut_steps is missing (the number of passes through the shared stack)")
        }
        Some(v) => v
            .as_u64()
            .filter(|&n| (1..=64).contains(&n))
            .ok_or_else(|| {
                anyhow!(
                    "key `total_ut_steps`: total_ut_steps must be an integer from 1 to 64, got {}",
                    json_short(v)
                )
            })?,
    };
    let q = match f.get("early_exit_threshold") {
        None => 1.0,
        Some(v) => v
            .as_f64()
            .filter(|q| *q > 0.0 && *q <= 1.0)
            .ok_or_else(|| {
                anyhow!(
                    "key `early_exit_threshold`: early_exit_threshold must be a number in (0, 1], got {}",
                    json_short(v)
                )
            })?,
    };
    Ok((loops as usize, q))
}

fn detect_arch(f: &Fields) -> Result<Arch> {
    let model_type = f.str("model_type")?;
    let archs: Vec<&str> = match f.get("architectures") {
        None => Vec::new(),
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
        Some(v) => bail!(
            "key `architectures`: expected a list of class names, got {}",
            describe(v)
        ),
    };
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
    let archs: Vec<String> = archs.iter().take(4).map(|a| shorten(a)).collect();
    bail!(
        "key `model_type`: unknown architecture (model_type {}, architectures [{}]); supported: llama, qwen2, ouro",
        model_type.map_or("missing".into(), shorten),
        archs.join(", ")
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
fn parse_rope(f: &Fields) -> Result<(f64, RopeScaling)> {
    let (key, params) = match f.object("rope_parameters")? {
        Some(p) => ("rope_parameters", Some(p)),
        None => ("rope_scaling", f.object("rope_scaling")?),
    };
    // Errors inside name the nested key: `rope_scaling`.`factor`.
    let inner =
        |e: anyhow::Error| anyhow!("key `{key}`.{}", e.to_string().trim_start_matches("key "));
    let nested = match &params {
        Some(p) if key == "rope_parameters" => p.number("rope_theta", false).map_err(inner)?,
        _ => None,
    };
    let theta = match nested {
        Some(t) => t,
        None => f.number("rope_theta", false)?.unwrap_or(10000.0),
    };
    let Some(s) = params else {
        return Ok((theta, RopeScaling::Default));
    };
    let kind = match s.str("rope_type").map_err(inner)? {
        Some(k) => k,
        None => s.str("type").map_err(inner)?.unwrap_or("default"),
    };
    let num = |name: &str| -> Result<f64> {
        s.number(name, false)
            .map_err(inner)?
            .ok_or_else(|| anyhow!("key `{key}`.`{name}`: missing (a number > 0 is required)"))
    };
    let scaling = match kind {
        "default" => RopeScaling::Default,
        "linear" => RopeScaling::Linear {
            factor: num("factor")?,
        },
        "llama3" => {
            let (low, high) = (num("low_freq_factor")?, num("high_freq_factor")?);
            if low == high {
                bail!(
                    "key `{key}`.`high_freq_factor`: must differ from low_freq_factor (both {low})"
                );
            }
            RopeScaling::Llama3 {
                factor: num("factor")?,
                low_freq_factor: low,
                high_freq_factor: high,
                original_max_position_embeddings: num("original_max_position_embeddings")?,
            }
        }
        other => bail!(
            "key `{key}`.`rope_type`: {} is not supported (default, linear, llama3)",
            shorten(other)
        ),
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
        assert!(err(r#"{"model_type": "llama"}"#.into()).contains("key `vocab_size`: missing"));
        assert!(err(format!(
            r#"{{"model_type": "llama", {BASE}, "hidden_size": "8"}}"#
        ))
        .contains("key `hidden_size`: expected an integer, got string \"8\""));
        assert!(err(format!(
            r#"{{"model_type": "llama", {BASE}, "num_hidden_layers": 0}}"#
        ))
        .contains("key `num_hidden_layers`: 0 is out of range"));
        assert!(err(format!(
            r#"{{"model_type": "llama", "hidden_act": "gelu", {BASE}}}"#
        ))
        .contains("hidden_act"));
        assert!(err(format!(
            r#"{{"model_type": "llama", "rope_scaling": {{"rope_type": "yarn"}}, {BASE}}}"#
        ))
        .contains("key `rope_scaling`.`rope_type`: \"yarn\" is not supported"));
    }
}
