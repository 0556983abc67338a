//! Full fine-tuning: which base weights of a decoder train. Weights are named
//! by their checkpoint keys (`model.layers.0.self_attn.q_proj.weight`), and
//! selected by patterns over those names with the `model.` prefix optional:
//! `*` matches any run of characters, and a pattern also selects everything
//! below a dotted prefix, so `"layers.*"` is every decoder block, `"norm"` the
//! final norm, `"layers.0"` the first block, `"embed_tokens"` the embedding
//! (and a tied LM head with it).
use super::llama::Llama;
use anyhow::{bail, Result};
use tch::Tensor;

/// Whether `pattern` selects the weight `name`.
pub fn matches(pattern: &str, name: &str) -> bool {
    let short = name.strip_prefix("model.").unwrap_or(name);
    [name, short].iter().any(|n| {
        glob(pattern, n)
            || n.char_indices()
                .filter(|&(_, c)| c == '.')
                .any(|(i, _)| glob(pattern, &n[..i]))
    })
}

/// `*` matches any run of characters (dots included); everything else itself.
fn glob(pattern: &str, text: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == text,
        Some((head, rest)) => {
            let Some(tail) = text.strip_prefix(head) else {
                return false;
            };
            (0..=tail.len())
                .filter(|&i| tail.is_char_boundary(i))
                .any(|i| glob(rest, &tail[i..]))
        }
    }
}

impl Llama {
    /// Makes the base weights that `patterns` select trainable (and every
    /// other base weight frozen); returns their names. A pattern that selects
    /// nothing is an error naming it.
    pub fn set_trainable(&self, patterns: &[String]) -> Result<Vec<String>> {
        let named = self.named_tensors();
        for p in patterns {
            if !named.iter().any(|(n, _)| matches(p, n)) {
                let some: Vec<&str> = named.iter().take(4).map(|(n, _)| n.as_str()).collect();
                bail!(
                    "train: pattern {p:?} selects no weight of this model (names look like {}, ...; `*` matches anything, `model.` may be left out)",
                    some.join(", ")
                );
            }
        }
        let mut chosen = Vec::new();
        for (n, t) in named {
            let on = patterns.iter().any(|p| matches(p, &n));
            let _ = t.set_requires_grad(on);
            if on {
                chosen.push(n);
            }
        }
        Ok(chosen)
    }

    /// The trainable base weights with their names (handles sharing storage
    /// and gradient with the model); empty unless `set_trainable` chose some.
    pub fn trainable(&self) -> Vec<(String, Tensor)> {
        self.named_tensors()
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .map(|(n, t)| (n, t.shallow_clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_select_by_name_and_dotted_prefix() {
        let q = "model.layers.0.self_attn.q_proj.weight";
        let norm = "model.norm.weight";
        let ln = "model.layers.0.input_layernorm.weight";
        assert!(matches("layers.*", q) && matches("*", q) && matches(q, q));
        assert!(matches("layers.0", q) && !matches("layers.1", q));
        assert!(matches("norm", norm) && !matches("norm", ln));
        assert!(matches("*norm*", ln) && matches("*q_proj*", q));
        assert!(matches("layers.*.self_attn", q) && !matches("layers.*.mlp", q));
        assert!(!matches("lm_head", norm) && matches("lm_head", "lm_head.weight"));
        assert!(!matches("layers.", q) && !matches("ayers.*", q));
    }
}
