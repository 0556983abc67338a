//! `tokenizer.json` through the `tokenizers` crate, and chat templates
//! (`chat_template.jinja` or `tokenizer_config.json`) rendered with minijinja
//! configured like transformers' Jinja environment.
use super::text::{clip, read_text};
use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use serde_json::Value;
use std::path::Path;

/// `tokenizer.json` through the tokenizers crate. The JSON is checked first
/// (that crate panics on some syntax errors inside a component), and a panic
/// still raised inside it becomes an error naming the component.
fn parse_tokenizer(text: &str) -> std::result::Result<tokenizers::Tokenizer, String> {
    if let Err(e) = serde_json::from_str::<serde::de::IgnoredAny>(text) {
        return Err(format!("malformed JSON ({})", clip(&e.to_string())));
    }
    match std::panic::catch_unwind(|| text.parse::<tokenizers::Tokenizer>()) {
        Ok(Ok(t)) => Ok(t),
        Ok(Err(e)) => Err(clip(&e.to_string())),
        Err(payload) => {
            let msg = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            Err(format!(
                "key `model`/`normalizer`/`pre_tokenizer`/`post_processor`/`decoder`: not understood by the tokenizers library (it panicked: {})",
                clip(&msg)
            ))
        }
    }
}

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    chat_template: Option<String>,
    /// Special tokens from tokenizer_config.json, passed to the template.
    specials: serde_json::Map<String, Value>,
}

#[derive(Serialize, Clone, Debug)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }
}

impl Tokenizer {
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            bail!("{}: missing (a tokenizer.json is required)", path.display());
        }
        let text = read_text(&path)?;
        let inner = parse_tokenizer(&text)
            .map_err(|e| anyhow!("{}: cannot load tokenizer: {e}", path.display()))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: Value = if cfg_path.exists() {
            let text = read_text(&cfg_path)?;
            serde_json::from_str(&text)
                .with_context(|| format!("{}: malformed JSON", cfg_path.display()))?
        } else {
            Value::Null
        };
        let jinja = dir.join("chat_template.jinja");
        let chat_template = if jinja.exists() {
            Some(
                std::fs::read_to_string(&jinja)
                    .with_context(|| format!("{}: cannot read", jinja.display()))?,
            )
        } else {
            template_from_config(&cfg)
        };
        let mut specials = serde_json::Map::new();
        for key in ["bos_token", "eos_token", "pad_token", "unk_token"] {
            let tok = match cfg.get(key) {
                Some(Value::String(s)) => Some(s.clone()),
                Some(Value::Object(o)) => {
                    o.get("content").and_then(Value::as_str).map(String::from)
                }
                _ => None,
            };
            if let Some(t) = tok {
                specials.insert(key.into(), Value::String(t));
            }
        }
        Ok(Tokenizer {
            inner,
            chat_template,
            specials,
        })
    }

    /// Token ids of `text`; `add_special` applies the tokenizer's post-processor
    /// (e.g. a BOS token), as transformers' `tokenizer(text)` does.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<i64>> {
        let enc = self
            .inner
            .encode(text, add_special)
            .map_err(|e| anyhow!("tokenize: {e}"))?;
        Ok(enc.get_ids().iter().map(|&i| i as i64).collect())
    }

    pub fn decode(&self, ids: &[i64], skip_special: bool) -> Result<String> {
        let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
        self.inner
            .decode(&ids, skip_special)
            .map_err(|e| anyhow!("detokenize: {e}"))
    }

    pub fn token_id(&self, token: &str) -> Option<i64> {
        self.inner.token_to_id(token).map(i64::from)
    }

    /// The `eos_token` named in tokenizer_config.json, as an id.
    pub fn eos_id(&self) -> Option<i64> {
        self.specials
            .get("eos_token")
            .and_then(Value::as_str)
            .and_then(|t| self.token_id(t))
    }

    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// Renders the chat template like transformers' `apply_chat_template(tokenize=False)`.
    pub fn apply_chat_template(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let source = self
            .chat_template
            .as_deref()
            .ok_or_else(|| anyhow!("this tokenizer has no chat template (chat_template.jinja or tokenizer_config.json)"))?;
        let mut env = minijinja::Environment::new();
        // transformers renders with trim_blocks and lstrip_blocks on.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        let mut ctx = self.specials.clone();
        ctx.insert("messages".into(), serde_json::to_value(messages)?);
        ctx.insert(
            "add_generation_prompt".into(),
            Value::Bool(add_generation_prompt),
        );
        env.render_str(source, ctx)
            .map_err(|e| anyhow!("chat template: {e:#}"))
    }
}

/// `chat_template` in tokenizer_config.json: a string, or a list of named templates.
fn template_from_config(cfg: &Value) -> Option<String> {
    match cfg.get("chat_template")? {
        Value::String(s) => Some(s.clone()),
        Value::Array(list) => list
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .or_else(|| list.first())
            .and_then(|t| t.get("template"))
            .and_then(Value::as_str)
            .map(String::from),
        _ => None,
    }
}
