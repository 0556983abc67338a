//! LoRA adapters on the decoder's linear layers, with PEFT's semantics (the
//! files and the merged export are in `peft`).
//!
//! An adapted layer computes `y = x W^T + b + ((x A^T) B^T) * alpha / r`
//! (PEFT's default scaling, not rslora; no dropout, as in the reference setting).
//!
//! Choices:
//! - A (r, in) and B (out, r) are fp32 masters on the model's device whatever the
//!   model dtype: they are small, the optimizer wants fp32, and PEFT also keeps
//!   adapters in fp32 by default (`autocast_adapter_dtype`). The forward casts them
//!   to x's dtype.
//! - Init as PEFT's `reset_lora_parameters`: A is `kaiming_uniform_(a=sqrt(5))`,
//!   i.e. U(-1/sqrt(in), 1/sqrt(in)), and B = 0, so a fresh adapter leaves the model
//!   unchanged. Draws come from the crate's SplitMix64 (`rng::Rng`) seeded by
//!   (seed, module path), so a module's A does not depend on which other modules
//!   are targeted.
//! - The base product keeps going through `llama::linear` (decoding keeps its
//!   streaming kernel); the LoRA product uses plain libtorch ops so autograd reaches
//!   A and B. Base weights stay frozen under LoRA.
//! - Which adapters a forward uses (`LoraUse`) is a `Cell` on the model, read
//!   once per forward and passed down to every layer, so one flag cannot get out
//!   of step between layers. `Start` is the KL reference without a second copy
//!   of the model: the base alone for fresh adapters, and base + the adapter as
//!   loaded for a warm start (`start` keeps a frozen copy of it). (`Llama` is
//!   `Send` but not `Sync`, tch tensors being `!Sync`, so a `Cell` is enough.)
use super::llama::Llama;
pub use super::peft::{ADAPTER_CONFIG, ADAPTER_WEIGHTS};
use crate::rng::Rng;
use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use tch::{Device, Kind, Tensor};

/// The linear layers of a decoder block, by their HF module name, in the
/// order used everywhere here (parameters, init draws, files).
pub const TARGETS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// PEFT's prefix for a causal LM: `PeftModelForCausalLM.base_model` (LoraModel)
/// `.model` (the transformers model).
const PEFT_PREFIX: &str = "base_model.model.";

/// Which adapters a forward adds to the base weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraUse {
    /// The trainable adapters (the policy).
    Trained,
    /// The adapters as they started: none for fresh ones, the loaded ones
    /// after a warm start (the KL reference).
    Start,
    /// None: the base model.
    Off,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    /// r, the inner dimension of B A.
    pub rank: i64,
    /// lora_alpha; the update is scaled by alpha / rank.
    pub alpha: f64,
    /// Short module names from `TARGETS` (PEFT's `target_modules`).
    pub targets: Vec<String>,
    /// Seed of A's init.
    pub seed: u64,
}

impl Default for LoraConfig {
    /// r = 8, alpha = 16, every linear layer of the decoder, seed 0.
    fn default() -> Self {
        LoraConfig::new(8, 16.0)
    }
}

impl LoraConfig {
    /// Rank and alpha on all seven linear layers, seed 0.
    pub fn new(rank: i64, alpha: f64) -> Self {
        LoraConfig {
            rank,
            alpha,
            targets: TARGETS.iter().map(|t| t.to_string()).collect(),
            seed: 0,
        }
    }

    /// alpha / rank.
    pub fn scaling(&self) -> f64 {
        self.alpha / self.rank as f64
    }

    /// Checks rank, alpha and targets; returns the targets deduplicated, in
    /// `TARGETS` order.
    pub fn validate(&self) -> Result<Vec<&'static str>> {
        if self.rank <= 0 {
            bail!("LoRA rank must be positive, got {}", self.rank);
        }
        if !self.alpha.is_finite() || self.alpha <= 0.0 {
            bail!("LoRA alpha must be positive and finite, got {}", self.alpha);
        }
        if self.targets.is_empty() {
            bail!(
                "LoRA targets are empty (valid targets: {})",
                TARGETS.join(", ")
            );
        }
        for t in &self.targets {
            if !TARGETS.contains(&t.as_str()) {
                bail!(
                    "LoRA target {} matches no layer (valid targets: {})",
                    super::text::shorten(t),
                    TARGETS.join(", ")
                );
            }
        }
        Ok(TARGETS
            .into_iter()
            .filter(|t| self.targets.iter().any(|s| s == t))
            .collect())
    }
}

/// The trainable low-rank update of one `Linear`.
pub struct LoraAdapter {
    /// (r, in), fp32, requires grad.
    pub a: Tensor,
    /// (out, r), fp32, requires grad.
    pub b: Tensor,
    /// alpha / r.
    pub scaling: f64,
    /// Frozen copies of A and B as loaded (a warm start), for `LoraUse::Start`.
    pub start: Option<(Tensor, Tensor)>,
}

impl LoraAdapter {
    /// PEFT's init for a layer of shape (out, in): A ~ U(-1/sqrt(in), 1/sqrt(in)), B = 0.
    pub fn init(
        inp: i64,
        out: i64,
        rank: i64,
        scaling: f64,
        seed: u64,
        device: Device,
    ) -> Result<Self> {
        let mut rng = Rng::new(seed);
        let bound = 1.0 / (inp as f64).sqrt();
        let vals: Vec<f32> = (0..rank * inp)
            .map(|_| (bound * (2.0 * rng.next_f64() - 1.0)) as f32)
            .collect();
        let a = Tensor::f_from_slice(&vals)?
            .f_reshape([rank, inp])?
            .f_to_device(device)?;
        let b = Tensor::f_zeros([out, rank], (Kind::Float, device))?;
        Self::new(a, b, scaling)
    }

    /// Wraps fp32 A and B as trainable leaves.
    fn new(a: Tensor, b: Tensor, scaling: f64) -> Result<Self> {
        Ok(LoraAdapter {
            a: a.f_detach()?.f_set_requires_grad(true)?,
            b: b.f_detach()?.f_set_requires_grad(true)?,
            scaling,
            start: None,
        })
    }

    /// A loaded adapter: trainable A and B, and a frozen copy of where they start.
    pub(crate) fn loaded(a: Tensor, b: Tensor, scaling: f64) -> Result<Self> {
        let start = Some((a.f_detach_copy()?, b.f_detach_copy()?));
        Ok(LoraAdapter {
            start,
            ..Self::new(a, b, scaling)?
        })
    }

    /// The update this forward adds, if any.
    pub fn delta(&self, x: &Tensor, use_: LoraUse) -> Result<Option<Tensor>> {
        let (a, b) = match (use_, &self.start) {
            (LoraUse::Trained, _) => (&self.a, &self.b),
            (LoraUse::Start, Some((a, b))) => (a, b),
            (LoraUse::Start, None) | (LoraUse::Off, _) => return Ok(None),
        };
        Ok(Some(low_rank(x, a, b, self.scaling)?))
    }

    pub fn rank(&self) -> i64 {
        self.a.size()[0]
    }

    /// ((x A^T) B^T) * scaling in x's dtype, differentiable in A and B.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        low_rank(x, &self.a, &self.b, self.scaling)
    }

    /// scaling * B A (out, in) in fp32, outside autograd.
    pub fn delta_weight(&self) -> Result<Tensor> {
        Ok(self
            .b
            .f_detach()?
            .f_matmul(&self.a.f_detach()?)?
            .f_mul_scalar(self.scaling)?)
    }

    /// W + scaling * B A, computed in fp32 and returned in `kind`.
    pub fn merged_weight(&self, w: &Tensor, kind: Kind) -> Result<Tensor> {
        let w32 = w.f_detach()?.f_to_kind(Kind::Float)?;
        let delta = self.delta_weight()?.f_to_device(w.device())?;
        Ok(w32.f_add(&delta)?.f_to_kind(kind)?)
    }
}

/// ((x A^T) B^T) * scaling in x's dtype.
fn low_rank(x: &Tensor, a: &Tensor, b: &Tensor, scaling: f64) -> Result<Tensor> {
    let a = a.f_to_kind(x.kind())?;
    let b = b.f_to_kind(x.kind())?;
    Ok(x.f_linear(&a, None::<&Tensor>)?
        .f_linear(&b, None::<&Tensor>)?
        .f_mul_scalar(scaling)?)
}

/// The init seed of one module: the config seed mixed with the module path (FNV-1a).
fn module_seed(seed: u64, module: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in module.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    Rng::new(seed ^ h).next_u64()
}

pub(crate) fn lora_key(module: &str, which: &str) -> String {
    format!("{PEFT_PREFIX}{module}.lora_{which}.weight")
}

impl Llama {
    /// Attaches fresh adapters (PEFT init, seeded) to the targeted linear layers
    /// of every decoder block, replacing any adapters already attached, and
    /// enables them. Errors if a target matches no layer, listing the valid names.
    pub fn attach_lora(&mut self, cfg: &LoraConfig) -> Result<()> {
        let targets = cfg.validate()?;
        let device = self.embed_tokens.device();
        let scaling = cfg.scaling();
        let mut adapters = HashMap::new();
        for (module, short, lin) in self.linear_modules() {
            if !targets.contains(&short) {
                continue;
            }
            let (out, inp) = (lin.weight.size()[0], lin.weight.size()[1]);
            let seed = module_seed(cfg.seed, &module);
            let ad = LoraAdapter::init(inp, out, cfg.rank, scaling, seed, device)
                .with_context(|| format!("LoRA init of {module}"))?;
            adapters.insert(module, ad);
        }
        let cfg = LoraConfig {
            targets: targets.iter().map(|t| t.to_string()).collect(),
            ..cfg.clone()
        };
        self.install_lora(cfg, adapters);
        Ok(())
    }

    /// Removes every adapter: the model is its base again.
    pub fn remove_lora(&mut self) {
        for (_, _, lin) in self.linear_modules_mut() {
            lin.lora = None;
        }
        self.lora_cfg = None;
        self.lora_use.set(LoraUse::Trained);
    }

    pub(crate) fn install_lora(
        &mut self,
        cfg: LoraConfig,
        mut adapters: HashMap<String, LoraAdapter>,
    ) {
        for (module, _, lin) in self.linear_modules_mut() {
            lin.lora = adapters.remove(&module);
        }
        self.lora_cfg = Some(cfg);
        self.lora_use.set(LoraUse::Trained);
    }

    pub fn has_lora(&self) -> bool {
        self.lora_cfg.is_some()
    }

    /// The attached adapters' configuration (targets normalised; seed 0 after `load_lora`).
    pub fn lora_config(&self) -> Option<&LoraConfig> {
        self.lora_cfg.as_ref()
    }

    /// Runs the model with (true, the default) or without its adapters.
    pub fn set_lora_enabled(&self, on: bool) {
        self.lora_use
            .set(if on { LoraUse::Trained } else { LoraUse::Off });
    }

    /// Runs the model with its adapters as they started (true: the KL
    /// reference) or as trained (false, the default).
    pub fn set_lora_reference(&self, on: bool) {
        self.lora_use
            .set(if on { LoraUse::Start } else { LoraUse::Trained });
    }

    /// Which adapters forwards use.
    pub fn lora_use(&self) -> LoraUse {
        self.lora_use.get()
    }

    /// The trainable tensors (handles sharing storage and grad with the model):
    /// per decoder block, per module in `TARGETS` order, A then B.
    pub fn lora_parameters(&self) -> Vec<Tensor> {
        self.named_lora_parameters()
            .into_iter()
            .map(|(_, t)| t)
            .collect()
    }

    /// `lora_parameters` with their PEFT names
    /// (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`, ...).
    pub fn named_lora_parameters(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (module, _, lin) in self.linear_modules() {
            if let Some(ad) = &lin.lora {
                out.push((lora_key(&module, "A"), ad.a.shallow_clone()));
                out.push((lora_key(&module, "B"), ad.b.shallow_clone()));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_validation() {
        let c = LoraConfig::new(4, 8.0);
        assert_eq!(c.scaling(), 2.0);
        assert_eq!(c.validate().unwrap(), TARGETS.to_vec());
        let mut c2 = c.clone();
        c2.targets = vec!["v_proj".into(), "q_proj".into(), "v_proj".into()];
        assert_eq!(c2.validate().unwrap(), vec!["q_proj", "v_proj"]);
        c2.targets = vec!["qproj".into()];
        let e = c2.validate().unwrap_err().to_string();
        assert!(
            e.contains("\"qproj\"") && e.contains("q_proj, k_proj"),
            "{e}"
        );
        c2.targets.clear();
        assert!(c2.validate().is_err());
        assert!(LoraConfig::new(0, 8.0).validate().is_err());
        assert!(LoraConfig::new(4, f64::NAN).validate().is_err());
    }

    #[test]
    fn init_is_peft_kaiming_uniform_and_seeded() {
        let ad = LoraAdapter::init(64, 96, 4, 2.0, 7, Device::Cpu).unwrap();
        assert_eq!(ad.a.size(), [4, 64]);
        assert_eq!(ad.b.size(), [96, 4]);
        assert!(ad.a.requires_grad() && ad.b.requires_grad());
        assert_eq!(ad.b.abs().max().double_value(&[]), 0.0);
        let bound = 1.0 / 8.0;
        let max = ad.a.abs().max().double_value(&[]);
        assert!(max <= bound && max > 0.9 * bound, "{max}");
        // Mean ~0 and variance ~bound^2/3 of a uniform on (-bound, bound).
        let var = ad.a.square().mean(Kind::Float).double_value(&[]);
        assert!((var / (bound * bound / 3.0) - 1.0).abs() < 0.2, "{var}");
        let same = LoraAdapter::init(64, 96, 4, 2.0, 7, Device::Cpu).unwrap();
        assert!(ad.a.equal(&same.a));
        let other = LoraAdapter::init(64, 96, 4, 2.0, 8, Device::Cpu).unwrap();
        assert!(!ad.a.equal(&other.a));
        assert_ne!(module_seed(0, "a"), module_seed(0, "b"));
    }

    #[test]
    fn forward_and_merge_agree() {
        let _g = tch::no_grad_guard();
        let mut ad = LoraAdapter::init(6, 5, 2, 1.5, 1, Device::Cpu).unwrap();
        ad.b.copy_(&Tensor::randn([5, 2], (Kind::Float, Device::Cpu)));
        let w = Tensor::randn([5, 6], (Kind::Float, Device::Cpu));
        let x = Tensor::randn([3, 6], (Kind::Float, Device::Cpu));
        let y = x.linear(&w, None::<&Tensor>) + ad.forward(&x).unwrap();
        let merged = ad.merged_weight(&w, Kind::Float).unwrap();
        let y2 = x.linear(&merged, None::<&Tensor>);
        assert!((y - y2).abs().max().double_value(&[]) < 1e-5);
    }
}
