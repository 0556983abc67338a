//! Llama decoder (also Qwen2, which is Llama with q/k/v biases), written to match
//! transformers' `modeling_llama.py` / `modeling_qwen2.py` numerically; with
//! `loops > 1` the Ouro looped form (the stack applied `loops` times, see
//! `ouro.rs` for its exit gate).
//!
//! Shapes: B batch, T new tokens, S keys (cache + new), H hidden, D head dim.
use super::config::{Arch, ModelConfig};
use super::decode_attention;
use super::kv_cache::{KvCache, Step};
use super::linear::linear_many;
pub use super::linear::{linear, Linear};
use super::lora::{LoraConfig, LoraUse};
use super::ouro::ExitGate;
use super::rope::{Angles, Rope};
use super::weights::Weights;
use anyhow::{Context, Result};
#[path = "decode_fused.rs"]
pub mod fused;
use std::cell::Cell;
use tch::{Kind, Tensor};

/// softmax(scale q k^T, masked) v for q (B, H, T, D) over k, v (B, G, S, D):
/// one query per row on the CPU takes `decode_attention`, the rest
/// libtorch's fused kernel.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, scale: f64) -> Result<Tensor> {
    if decode_attention::applies(q, k, v) {
        return decode_attention::attend(q, k, v, mask, scale);
    }
    Ok(Tensor::f_scaled_dot_product_attention(
        q,
        k,
        v,
        Some(mask),
        0.0,
        false,
        scale,
        true,
    )?)
}

/// HF module path of a linear layer of block `i`.
fn module_path(i: usize, short: &str) -> String {
    let group = if ["gate_proj", "up_proj", "down_proj"].contains(&short) {
        "mlp"
    } else {
        "self_attn"
    };
    format!("model.layers.{i}.{group}.{short}")
}

pub struct RmsNorm {
    pub weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn load(w: &Weights, name: &str, dim: i64, eps: f64) -> Result<Self> {
        Ok(RmsNorm {
            weight: w.get(name, &[dim])?,
            eps,
        })
    }

    fn frozen(&self) -> Result<Self> {
        Ok(RmsNorm {
            weight: self.weight.f_detach_copy()?,
            eps: self.eps,
        })
    }

    /// Normalises in fp32, scales in the input dtype (as transformers does).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.kind() == Kind::Float {
            // Same maths in one fused op (a decode step runs 61 of these).
            return Ok(x.f_rms_norm(
                [x.size()[x.dim() - 1]].as_slice(),
                Some(&self.weight),
                self.eps,
            )?);
        }
        let x32 = x.f_to_kind(Kind::Float)?;
        let var = x32
            .f_pow_tensor_scalar(2)?
            .f_mean_dim(-1, true, Kind::Float)?;
        let normed = x32.f_mul(&var.f_add_scalar(self.eps)?.f_rsqrt()?)?;
        Ok(self.weight.f_mul(&normed.f_to_kind(x.kind())?)?)
    }
}

struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    heads: i64,
    kv_heads: i64,
    head_dim: i64,
}

impl Attention {
    fn load(w: &Weights, p: &str, c: &ModelConfig) -> Result<Self> {
        let (h, d) = (c.hidden_size, c.head_dim);
        let (nq, nkv) = (c.num_attention_heads * d, c.num_key_value_heads * d);
        Ok(Attention {
            q: Linear::load(w, &format!("{p}.q_proj"), h, nq, c.qkv_bias)?,
            k: Linear::load(w, &format!("{p}.k_proj"), h, nkv, c.qkv_bias)?,
            v: Linear::load(w, &format!("{p}.v_proj"), h, nkv, c.qkv_bias)?,
            o: Linear::load(w, &format!("{p}.o_proj"), nq, h, c.o_bias)?,
            heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads,
            head_dim: d,
        })
    }

    fn frozen(&self) -> Result<Self> {
        Ok(Attention {
            q: self.q.frozen()?,
            k: self.k.frozen()?,
            v: self.v.frozen()?,
            o: self.o.frozen()?,
            ..*self
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        rot: &Angles,
        step: &Step,
        cache: Option<(&KvCache, usize)>,
        lora: LoraUse,
    ) -> Result<Tensor> {
        let (b, t) = (x.size()[0], x.size()[1]);
        let split = |y: Tensor, n: i64| -> Result<Tensor> {
            Ok(y.f_reshape([b, t, n, self.head_dim])?.f_transpose(1, 2)?) // (B, n, T, D)
        };
        let [q, k, v]: [Tensor; 3] = linear_many(x, &[&self.q, &self.k, &self.v], lora)?
            .try_into()
            .map_err(|_| anyhow::anyhow!("q, k, v: three products"))?;
        let q = rot.apply(&split(q, self.heads)?)?;
        let k = rot.apply(&split(k, self.kv_heads)?)?;
        let v = split(v, self.kv_heads)?;
        let (k, v) = match (cache, step.write_at) {
            (Some((c, layer)), Some(at)) => c.append(layer, at, &k, &v)?,
            _ => (k, v),
        };
        let scale = (self.head_dim as f64).powf(-0.5);
        let y = attention(&q, &k, &v, &step.mask, scale)?;
        let y = y
            .f_transpose(1, 2)?
            .f_reshape([b, t, self.heads * self.head_dim])?;
        self.o.forward_with(&y, lora)
    }
}

struct Mlp {
    gate: Linear,
    up: Linear,
    down: Linear,
}

impl Mlp {
    fn load(w: &Weights, p: &str, c: &ModelConfig) -> Result<Self> {
        let (h, i) = (c.hidden_size, c.intermediate_size);
        Ok(Mlp {
            gate: Linear::load(w, &format!("{p}.gate_proj"), h, i, c.mlp_bias)?,
            up: Linear::load(w, &format!("{p}.up_proj"), h, i, c.mlp_bias)?,
            down: Linear::load(w, &format!("{p}.down_proj"), i, h, c.mlp_bias)?,
        })
    }

    fn frozen(&self) -> Result<Self> {
        Ok(Mlp {
            gate: self.gate.frozen()?,
            up: self.up.frozen()?,
            down: self.down.frozen()?,
        })
    }

    fn forward(&self, x: &Tensor, lora: LoraUse) -> Result<Tensor> {
        let [g, u]: [Tensor; 2] = linear_many(x, &[&self.gate, &self.up], lora)?
            .try_into()
            .map_err(|_| anyhow::anyhow!("gate, up: two products"))?;
        self.down.forward_with(&g.f_silu()?.f_mul(&u)?, lora)
    }
}

struct Layer {
    input_norm: RmsNorm,
    attn: Attention,
    post_norm: RmsNorm,
    mlp: Mlp,
    /// Ouro's sandwich norms on the attention and MLP outputs
    /// (`input_layernorm_2`, `post_attention_layernorm_2`).
    sandwich: Option<[RmsNorm; 2]>,
}

impl Layer {
    fn frozen(&self) -> Result<Self> {
        Ok(Layer {
            input_norm: self.input_norm.frozen()?,
            attn: self.attn.frozen()?,
            post_norm: self.post_norm.frozen()?,
            mlp: self.mlp.frozen()?,
            sandwich: match &self.sandwich {
                Some([a, m]) => Some([a.frozen()?, m.frozen()?]),
                None => None,
            },
        })
    }

    /// h + Attn(norm(h)), then + MLP(norm(.)), each output normed again in Ouro.
    fn forward(
        &self,
        h: &Tensor,
        rot: &Angles,
        step: &Step,
        cache: Option<(&KvCache, usize)>,
        lora: LoraUse,
    ) -> Result<Tensor> {
        let mut a = self
            .attn
            .forward(&self.input_norm.forward(h)?, rot, step, cache, lora)?;
        if let Some([n, _]) = &self.sandwich {
            a = n.forward(&a)?;
        }
        let h = h.f_add(&a)?;
        let mut m = self.mlp.forward(&self.post_norm.forward(&h)?, lora)?;
        if let Some([_, n]) = &self.sandwich {
            m = n.forward(&m)?;
        }
        Ok(h.f_add(&m)?)
    }

    fn load(w: &Weights, i: usize, c: &ModelConfig) -> Result<Self> {
        let p = format!("model.layers.{i}");
        let eps = c.rms_norm_eps;
        Ok(Layer {
            input_norm: RmsNorm::load(
                w,
                &format!("{p}.input_layernorm.weight"),
                c.hidden_size,
                eps,
            )?,
            attn: Attention::load(w, &format!("{p}.self_attn"), c)?,
            post_norm: RmsNorm::load(
                w,
                &format!("{p}.post_attention_layernorm.weight"),
                c.hidden_size,
                eps,
            )?,
            mlp: Mlp::load(w, &format!("{p}.mlp"), c)?,
            sandwich: match c.arch {
                Arch::Ouro => Some([
                    RmsNorm::load(
                        w,
                        &format!("{p}.input_layernorm_2.weight"),
                        c.hidden_size,
                        eps,
                    )?,
                    RmsNorm::load(
                        w,
                        &format!("{p}.post_attention_layernorm_2.weight"),
                        c.hidden_size,
                        eps,
                    )?,
                ]),
                _ => None,
            },
        })
    }
}

pub struct Llama {
    pub cfg: ModelConfig,
    /// (V, H) token embedding matrix E.
    pub embed_tokens: Tensor,
    layers: Vec<Layer>,
    norm: RmsNorm,
    /// None when tied to `embed_tokens`.
    lm_head: Option<Tensor>,
    rope: Rope,
    /// Ouro's exit gate (looped models only).
    pub(crate) exit_gate: Option<ExitGate>,
    /// The attached adapters' configuration (`lora`), None without adapters.
    pub(crate) lora_cfg: Option<LoraConfig>,
    /// Which adapters forwards use: one flag for the whole model, read once
    /// per forward (`set_lora_enabled`, `set_lora_reference`).
    pub(crate) lora_use: Cell<LoraUse>,
}

impl Llama {
    pub fn load(cfg: ModelConfig, w: &Weights) -> Result<Self> {
        let (v, h) = (cfg.vocab_size, cfg.hidden_size);
        let embed_tokens = w.get("model.embed_tokens.weight", &[v, h])?;
        let layers = (0..cfg.num_hidden_layers as usize)
            .map(|i| Layer::load(w, i, &cfg))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::load(w, "model.norm.weight", h, cfg.rms_norm_eps)?;
        // Tied checkpoints may still carry an lm_head copy; the tie decides.
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(w.get("lm_head.weight", &[v, h])?)
        };
        let rope = Rope::new(&cfg, w.device).context("rotary embeddings")?;
        let exit_gate = match cfg.arch {
            Arch::Ouro => Some(ExitGate::load(w, h)?),
            _ => None,
        };
        Ok(Llama {
            cfg,
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope,
            exit_gate,
            lora_cfg: None,
            lora_use: Cell::new(LoraUse::Trained),
        })
    }

    /// A frozen copy of the base weights (no adapters, nothing requires grad):
    /// the KL reference of a fully fine-tuned backbone.
    pub fn frozen_copy(&self) -> Result<Llama> {
        let _g = tch::no_grad_guard();
        Ok(Llama {
            cfg: self.cfg.clone(),
            embed_tokens: self.embed_tokens.f_detach_copy()?,
            layers: self
                .layers
                .iter()
                .map(Layer::frozen)
                .collect::<Result<_>>()?,
            norm: self.norm.frozen()?,
            lm_head: self
                .lm_head
                .as_ref()
                .map(|h| h.f_detach_copy())
                .transpose()?,
            rope: Rope::new(&self.cfg, self.embed_tokens.device()).context("rotary embeddings")?,
            exit_gate: self.exit_gate.as_ref().map(ExitGate::frozen).transpose()?,
            lora_cfg: None,
            lora_use: Cell::new(LoraUse::Trained),
        })
    }

    /// (B, T) token ids -> (B, T, H) input embeddings.
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(Tensor::f_embedding(
            &self.embed_tokens,
            ids,
            -1,
            false,
            false,
        )?)
    }

    /// Runs the decoder on input embeddings `x` (B, T, H) and returns the
    /// final-normed hidden states (B, T, H): the vector the LM head (and a
    /// router) reads. A looped model returns, per position, the state of the
    /// loop inference exits at (`ouro::exit_loops`).
    pub fn forward(&self, x: &Tensor, step: &Step, cache: Option<&KvCache>) -> Result<Tensor> {
        self.exit_state(self.forward_loops(x, step, cache)?)
    }

    /// Of every loop's states (`forward_loops`), per position the one
    /// inference exits at: the last loop's unless the model exits early.
    pub fn exit_state(&self, mut states: Vec<Tensor>) -> Result<Tensor> {
        match &self.exit_gate {
            Some(gate) if self.cfg.early_exit_threshold < 1.0 => {
                let at = gate.exit_loops(&states, self.cfg.early_exit_threshold)?;
                super::ouro::gather_loops(&states, &at)
            }
            _ => Ok(states.pop().expect("at least one loop")),
        }
    }

    /// Every loop's final-normed state (one for plain models): the stack
    /// runs `loops` times, each loop's normed output feeding the next, one
    /// set of rotary angles for all, cache slot `loop * layers + layer`.
    pub fn forward_loops(
        &self,
        x: &Tensor,
        step: &Step,
        cache: Option<&KvCache>,
    ) -> Result<Vec<Tensor>> {
        let rot = self.rope.angles(&step.positions, x.kind())?;
        let lora = self.lora_use.get();
        if let Some(c) = cache.filter(|&c| fused::applies(self, x, step, Some(c), lora)) {
            let h = fused::forward(self, x, &rot, step, c)?;
            return Ok(vec![self.norm.forward(&h)?]);
        }
        let n = self.layers.len();
        let mut h = x.shallow_clone();
        let mut out = Vec::with_capacity(self.cfg.loops);
        for lp in 0..self.cfg.loops {
            for (i, layer) in self.layers.iter().enumerate() {
                h = layer.forward(&h, &rot, step, cache.map(|c| (c, lp * n + i)), lora)?;
            }
            h = self.norm.forward(&h)?;
            out.push(h.shallow_clone());
        }
        Ok(out)
    }

    /// (.., H) hidden states -> (.., V) logits in the model dtype.
    pub fn logits(&self, h: &Tensor) -> Result<Tensor> {
        linear(h, self.lm_head.as_ref().unwrap_or(&self.embed_tokens), None)
    }

    /// Every decoder linear layer with its HF module path
    /// (`model.layers.{i}.self_attn.q_proj`) and short name, block by block in
    /// `lora::TARGETS` order.
    pub(crate) fn linear_modules(&self) -> Vec<(String, &'static str, &Linear)> {
        let mut out = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            let (a, m) = (&l.attn, &l.mlp);
            for (short, lin) in [
                ("q_proj", &a.q),
                ("k_proj", &a.k),
                ("v_proj", &a.v),
                ("o_proj", &a.o),
                ("gate_proj", &m.gate),
                ("up_proj", &m.up),
                ("down_proj", &m.down),
            ] {
                out.push((module_path(i, short), short, lin));
            }
        }
        out
    }

    /// `linear_modules`, mutably.
    pub(crate) fn linear_modules_mut(&mut self) -> Vec<(String, &'static str, &mut Linear)> {
        let mut out = Vec::new();
        for (i, l) in self.layers.iter_mut().enumerate() {
            let (a, m) = (&mut l.attn, &mut l.mlp);
            for (short, lin) in [
                ("q_proj", &mut a.q),
                ("k_proj", &mut a.k),
                ("v_proj", &mut a.v),
                ("o_proj", &mut a.o),
                ("gate_proj", &mut m.gate),
                ("up_proj", &mut m.up),
                ("down_proj", &mut m.down),
            ] {
                out.push((module_path(i, short), short, lin));
            }
        }
        out
    }

    /// Every base weight with its checkpoint name, once (a tied LM head is
    /// the embedding; LoRA adapters are in `lora_parameters`).
    pub fn named_tensors(&self) -> Vec<(String, &Tensor)> {
        let mut out = vec![("model.embed_tokens.weight".to_string(), &self.embed_tokens)];
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            out.push((format!("{p}.input_layernorm.weight"), &l.input_norm.weight));
            out.push((
                format!("{p}.post_attention_layernorm.weight"),
                &l.post_norm.weight,
            ));
            if let Some([a, m]) = &l.sandwich {
                out.push((format!("{p}.input_layernorm_2.weight"), &a.weight));
                out.push((format!("{p}.post_attention_layernorm_2.weight"), &m.weight));
            }
        }
        for (module, _, lin) in self.linear_modules() {
            out.push((format!("{module}.weight"), &lin.weight));
            if let Some(b) = &lin.bias {
                out.push((format!("{module}.bias"), b));
            }
        }
        out.push(("model.norm.weight".to_string(), &self.norm.weight));
        if let Some(g) = &self.exit_gate {
            out.extend(g.named_tensors());
        }
        if let Some(h) = &self.lm_head {
            out.push(("lm_head.weight".to_string(), h));
        }
        out
    }

    /// Every base weight tensor, once.
    pub fn tensors(&self) -> Vec<&Tensor> {
        self.named_tensors().into_iter().map(|(_, t)| t).collect()
    }

    /// Bytes of weights read by one decode step (every weight once).
    pub fn weight_bytes(&self) -> i64 {
        self.tensors()
            .iter()
            .map(|t| t.numel() as i64 * t.kind().elt_size_in_bytes() as i64)
            .sum()
    }

    pub fn new_cache(&self, batch: i64, capacity: i64) -> Result<KvCache> {
        let c = &self.cfg;
        KvCache::new(
            c.num_hidden_layers * c.loops as i64,
            batch,
            c.num_key_value_heads,
            c.head_dim,
            capacity,
            self.embed_tokens.kind(),
            self.embed_tokens.device(),
        )
    }
}
