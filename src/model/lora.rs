//! LoRA adapters on the decoder's linear layers, with PEFT's semantics and
//! on-disk layout, and a merge-and-export to a plain Hugging Face directory.
//!
//! An adapted layer computes `y = x W^T + b + ((x A^T) B^T) * alpha / r`
//! (PEFT's default scaling, not rslora; no dropout, as in the reference setting).
//!
//! Choices:
//! - A (r, in) and B (out, r) are fp32 masters on the model's device whatever the
//!   model dtype: they are small, the optimizer wants fp32, and PEFT also keeps
//!   adapters in fp32 by default (`autocast_adapter_dtype`). The forward casts them
//!   to x's dtype; the saved adapter is fp32; a merge is done in fp32 and rounded
//!   once to the model dtype.
//! - Init as PEFT's `reset_lora_parameters`: A is `kaiming_uniform_(a=sqrt(5))`,
//!   i.e. U(-1/sqrt(in), 1/sqrt(in)), and B = 0, so a fresh adapter leaves the model
//!   unchanged. Draws come from a local SplitMix64 seeded by (seed, module path),
//!   so a module's A does not depend on which other modules are targeted.
//! - The base product keeps going through `llama::linear` (decoding keeps its
//!   streaming kernel); the LoRA product uses plain libtorch ops so autograd reaches
//!   A and B. Base weights are never made trainable.
//! - The on/off switch (`Llama::set_lora_enabled`) is a `Cell<bool>` on the model,
//!   read once per forward and passed down to every layer: the frozen base weights
//!   are the KL reference, so no second copy of the model is needed, and one flag on
//!   the model cannot get out of step between layers. (`Llama` is `Send` but not
//!   `Sync`, tch tensors being `!Sync`, so a `Cell` is enough.)
//! - Files: `adapter_config.json` + `adapter_model.safetensors`, keys
//!   `base_model.model.<module>.lora_{A,B}.weight`, exactly what peft 0.21's
//!   `save_pretrained` writes (metadata `format: pt`). Loading is strict: unknown
//!   options that change the maths (rslora, DoRA, patterns, biases, ...) and
//!   missing, misshapen or unexpected tensors are errors naming the file and key.
use super::llama::{Linear, Llama};
use super::weights::TensorBytes;
use anyhow::{anyhow, bail, Context, Result};
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use serde_json::{json, Value};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
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

pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// PEFT's prefix for a causal LM: `PeftModelForCausalLM.base_model` (LoraModel)
/// `.model` (the transformers model).
const PEFT_PREFIX: &str = "base_model.model.";

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
                    "LoRA target {t:?} matches no layer (valid targets: {})",
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
        let mut rng = SplitMix64(seed);
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
        })
    }

    pub fn rank(&self) -> i64 {
        self.a.size()[0]
    }

    /// ((x A^T) B^T) * scaling in x's dtype, differentiable in A and B.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let a = self.a.f_to_kind(x.kind())?;
        let b = self.b.f_to_kind(x.kind())?;
        Ok(x.f_linear(&a, None::<&Tensor>)?
            .f_linear(&b, None::<&Tensor>)?
            .f_mul_scalar(self.scaling)?)
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

/// SplitMix64 (Steele et al.), enough for a reproducible uniform init.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1) with 53 random bits.
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// The init seed of one module: the config seed mixed with the module path (FNV-1a).
fn module_seed(seed: u64, module: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in module.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    SplitMix64(seed ^ h).next_u64()
}

fn lora_key(module: &str, which: &str) -> String {
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
        self.lora_on.set(true);
    }

    fn install_lora(&mut self, cfg: LoraConfig, mut adapters: HashMap<String, LoraAdapter>) {
        for (module, _, lin) in self.linear_modules_mut() {
            lin.lora = adapters.remove(&module);
        }
        self.lora_cfg = Some(cfg);
        self.lora_on.set(true);
    }

    pub fn has_lora(&self) -> bool {
        self.lora_cfg.is_some()
    }

    /// The attached adapters' configuration (targets normalised; seed 0 after `load_lora`).
    pub fn lora_config(&self) -> Option<&LoraConfig> {
        self.lora_cfg.as_ref()
    }

    /// Runs the model with (true, the default) or without its adapters. Off, the
    /// model is exactly the frozen base: the KL reference without a second copy.
    pub fn set_lora_enabled(&self, on: bool) {
        self.lora_on.set(on);
    }

    /// Whether forwards use the adapters (true when there are none to use).
    pub fn lora_enabled(&self) -> bool {
        self.lora_on.get()
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

    /// Writes `dir/adapter_config.json` and `dir/adapter_model.safetensors` in
    /// PEFT's layout (fp32), each atomically. `base_model` goes to
    /// `base_model_name_or_path` (the base checkpoint's directory).
    pub fn save_lora(&self, dir: &Path, base_model: &str) -> Result<()> {
        let cfg = self
            .lora_cfg
            .as_ref()
            .ok_or_else(|| anyhow!("save_lora: the model has no LoRA adapters"))?;
        std::fs::create_dir_all(dir)
            .with_context(|| format!("{}: cannot create directory", dir.display()))?;
        let mut tensors = Vec::new();
        for (name, t) in self.named_lora_parameters() {
            let t = t.f_detach()?.f_to_kind(Kind::Float)?;
            tensors.push((name, TensorBytes::of(&t)?));
        }
        write_safetensors(&dir.join(ADAPTER_WEIGHTS), tensors)?;
        let config = json!({
            "alpha_pattern": {},
            "base_model_name_or_path": base_model,
            "bias": "none",
            "exclude_modules": null,
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "layer_replication": null,
            "layers_pattern": null,
            "layers_to_transform": null,
            "lora_alpha": cfg.alpha,
            "lora_bias": false,
            "lora_dropout": 0.0,
            "modules_to_save": null,
            "peft_type": "LORA",
            "r": cfg.rank,
            "rank_pattern": {},
            "revision": null,
            "target_modules": cfg.targets,
            "target_parameters": null,
            "task_type": "CAUSAL_LM",
            "trainable_token_indices": null,
            "use_dora": false,
            "use_rslora": false,
        });
        let text = serde_json::to_string_pretty(&config)? + "\n";
        write_atomic(&dir.join(ADAPTER_CONFIG), text.as_bytes())
    }

    /// Reads an adapter in PEFT's layout (as written by `save_lora` or peft's
    /// `save_pretrained`) and attaches it, replacing any adapters. Checks r,
    /// alpha, targets and every tensor's presence and shape; on error the model
    /// is left as it was.
    pub fn load_lora(&mut self, dir: &Path) -> Result<()> {
        if !dir.is_dir() {
            bail!("{}: not an adapter directory", dir.display());
        }
        let cfg_path = dir.join(ADAPTER_CONFIG);
        let cfg = read_adapter_config(&cfg_path)?;
        let targets = cfg
            .validate()
            .map_err(|e| anyhow!("{}: key 'target_modules': {e}", cfg_path.display()))?;
        let path = dir.join(ADAPTER_WEIGHTS);
        if !path.exists() && dir.join("adapter_model.bin").exists() {
            bail!(
                "{}: missing (adapter_model.bin is not supported; save the adapter with safetensors)",
                path.display()
            );
        }
        let bytes =
            std::fs::read(&path).map_err(|e| anyhow!("{}: cannot read ({e})", path.display()))?;
        let st = SafeTensors::deserialize(&bytes).map_err(|e| {
            anyhow!(
                "{}: not a valid safetensors file (truncated or corrupt: {e:?})",
                path.display()
            )
        })?;
        let device = self.embed_tokens.device();
        let mut expected = BTreeSet::new();
        let mut adapters = HashMap::new();
        for (module, short, lin) in self.linear_modules() {
            if !targets.contains(&short) {
                continue;
            }
            let (out, inp) = (lin.weight.size()[0], lin.weight.size()[1]);
            let (ka, kb) = (lora_key(&module, "A"), lora_key(&module, "B"));
            let a = read_tensor(&st, &path, &ka, &[cfg.rank, inp], device)?;
            let b = read_tensor(&st, &path, &kb, &[out, cfg.rank], device)?;
            expected.insert(ka);
            expected.insert(kb);
            adapters.insert(module, LoraAdapter::new(a, b, cfg.scaling())?);
        }
        let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
        names.sort();
        if let Some(extra) = names.iter().find(|n| !expected.contains(*n)) {
            bail!(
                "{}: unexpected tensor '{extra}' (not the LoRA A/B weight of a targeted module of this model)",
                path.display()
            );
        }
        let cfg = LoraConfig {
            targets: targets.iter().map(|t| t.to_string()).collect(),
            ..cfg
        };
        self.install_lora(cfg, adapters);
        Ok(())
    }

    /// Writes an HF model directory with the adapters merged in: `config.json`
    /// (its dtype entry set to the written dtype), tokenizer files and
    /// `generation_config.json` when present, and `model.safetensors` holding
    /// every tensor of the checkpoint in `src_dir` under its own name, with
    /// `W + scaling * B A` for adapted layers. Written in the model's dtype
    /// (non-float tensors as they are); a tied checkpoint gets no `lm_head`
    /// unless it had one.
    pub fn export_merged(&self, src_dir: &Path, out_dir: &Path) -> Result<()> {
        let kind = self.embed_tokens.kind();
        let dtype_name = kind_name(kind)?;
        std::fs::create_dir_all(out_dir)
            .with_context(|| format!("{}: cannot create directory", out_dir.display()))?;
        let same = match (src_dir.canonicalize(), out_dir.canonicalize()) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        };
        if same {
            bail!(
                "{}: the merged model must go to another directory than its source",
                out_dir.display()
            );
        }
        let mut adapted: HashMap<String, &Linear> = HashMap::new();
        for (module, _, lin) in self.linear_modules() {
            if lin.lora.is_some() {
                adapted.insert(format!("{module}.weight"), lin);
            }
        }
        let mut tensors = Vec::new();
        for file in checkpoint_files(src_dir)? {
            let loaded = Tensor::read_safetensors(&file)
                .map_err(|e| anyhow!("{}: cannot read ({e})", file.display()))?;
            for (name, t) in loaded {
                let t = match adapted.remove(&name) {
                    Some(lin) => {
                        let want = lin.weight.size();
                        if t.size() != want {
                            bail!(
                                "{}: tensor '{name}' has shape {:?}, the model's is {want:?}",
                                file.display(),
                                t.size()
                            );
                        }
                        let ad = lin.lora.as_ref().expect("adapted");
                        ad.merged_weight(&t, kind)
                            .with_context(|| format!("merging '{name}'"))?
                    }
                    None if t.is_floating_point() => t.f_to_kind(kind)?,
                    None => t,
                };
                tensors.push((name, TensorBytes::of(&t)?));
            }
        }
        if let Some(name) = adapted.keys().min() {
            bail!(
                "{}: tensor '{name}' is missing from the checkpoint",
                src_dir.display()
            );
        }
        write_safetensors(&out_dir.join("model.safetensors"), tensors)?;
        // A stale shard index would make loaders ignore the single file.
        let stale = out_dir.join("model.safetensors.index.json");
        if stale.exists() {
            std::fs::remove_file(&stale)
                .map_err(|e| anyhow!("{}: cannot remove ({e})", stale.display()))?;
        }

        let cfg_path = src_dir.join("config.json");
        let text = std::fs::read_to_string(&cfg_path)
            .map_err(|e| anyhow!("{}: cannot read ({e})", cfg_path.display()))?;
        let mut cfg: Value = serde_json::from_str(&text)
            .map_err(|e| anyhow!("{}: malformed JSON ({e})", cfg_path.display()))?;
        if let Some(obj) = cfg.as_object_mut() {
            obj.insert("dtype".into(), json!(dtype_name));
            if obj.contains_key("torch_dtype") {
                obj.insert("torch_dtype".into(), json!(dtype_name));
            }
        }
        let text = serde_json::to_string_pretty(&cfg)? + "\n";
        write_atomic(&out_dir.join("config.json"), text.as_bytes())?;
        for f in COPIED_FILES {
            let src = src_dir.join(f);
            if src.is_file() {
                let data = std::fs::read(&src)
                    .map_err(|e| anyhow!("{}: cannot read ({e})", src.display()))?;
                write_atomic(&out_dir.join(f), &data)?;
            }
        }
        Ok(())
    }
}

/// Files besides the weights that make an HF directory usable, copied as they are.
const COPIED_FILES: [&str; 10] = [
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
];

/// `adapter_config.json` -> LoraConfig, refusing options we do not implement.
fn read_adapter_config(path: &Path) -> Result<LoraConfig> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow!("{}: cannot read ({e})", path.display()))?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| anyhow!("{}: malformed JSON ({e})", path.display()))?;
    let err = |key: &str, what: &str| anyhow!("{}: key '{key}' {what}", path.display());
    if !v.is_object() {
        bail!("{}: not a JSON object", path.display());
    }
    match v.get("peft_type").and_then(Value::as_str) {
        Some("LORA") => {}
        Some(other) => {
            return Err(err(
                "peft_type",
                &format!("is {other:?}, expected \"LORA\""),
            ))
        }
        None => return Err(err("peft_type", "is missing (expected \"LORA\")")),
    }
    let rank = match v.get("r") {
        None => return Err(err("r", "is missing")),
        Some(r) => r
            .as_i64()
            .filter(|&r| r > 0)
            .ok_or_else(|| err("r", &format!("must be a positive integer, got {r}")))?,
    };
    let alpha = match v.get("lora_alpha") {
        None => return Err(err("lora_alpha", "is missing")),
        Some(a) => a
            .as_f64()
            .filter(|a| a.is_finite() && *a > 0.0)
            .ok_or_else(|| err("lora_alpha", &format!("must be a positive number, got {a}")))?,
    };
    let targets = match v.get("target_modules") {
        None | Some(Value::Null) => return Err(err("target_modules", "is missing")),
        Some(Value::Array(items)) => items
            .iter()
            .map(|t| {
                t.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| err("target_modules", &format!("has a non-string entry {t}")))
            })
            .collect::<Result<Vec<_>>>()?,
        Some(other) => {
            return Err(err(
                "target_modules",
                &format!(
                    "must be a list of module names, got {other} (regex targets are not supported)"
                ),
            ))
        }
    };
    // Options that would change the maths: only their neutral values load.
    let options: [(&str, Value); 21] = [
        ("use_rslora", json!(false)),
        ("use_dora", json!(false)),
        ("fan_in_fan_out", json!(false)),
        ("bias", json!("none")),
        ("lora_bias", json!(false)),
        ("rank_pattern", json!({})),
        ("alpha_pattern", json!({})),
        ("layers_to_transform", Value::Null),
        ("layers_pattern", Value::Null),
        ("modules_to_save", Value::Null),
        ("layer_replication", Value::Null),
        ("target_parameters", Value::Null),
        ("trainable_token_indices", Value::Null),
        ("exclude_modules", Value::Null),
        ("alora_invocation_tokens", Value::Null),
        ("use_qalora", json!(false)),
        ("use_bdlora", Value::Null),
        ("arrow_config", Value::Null),
        ("kasa_config", Value::Null),
        ("monteclora_config", Value::Null),
        ("velora_config", Value::Null),
    ];
    for (key, ok) in &options {
        let Some(got) = v.get(*key) else { continue };
        let neutral = got == ok
            || got.is_null()
            || matches!(got, Value::Array(a) if a.is_empty())
            || matches!(got, Value::Object(o) if o.is_empty());
        if !neutral {
            return Err(err(key, &format!("is {got}, only {ok} is supported")));
        }
    }
    if let Some(d) = v.get("lora_dropout") {
        if !d.as_f64().is_some_and(|d| (0.0..1.0).contains(&d)) {
            return Err(err(
                "lora_dropout",
                &format!("must be a number in [0, 1), got {d}"),
            ));
        }
    }
    Ok(LoraConfig {
        rank,
        alpha,
        targets,
        seed: 0,
    })
}

/// One tensor of an adapter file, shape-checked, as fp32 on `device`.
fn read_tensor(
    st: &SafeTensors,
    path: &Path,
    key: &str,
    shape: &[i64],
    device: Device,
) -> Result<Tensor> {
    let view: TensorView = st
        .tensor(key)
        .map_err(|_| anyhow!("{}: tensor '{key}' is missing", path.display()))?;
    let got: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
    if got != shape {
        bail!(
            "{}: tensor '{key}' has shape {got:?}, expected {shape:?}",
            path.display()
        );
    }
    let kind = match view.dtype() {
        Dtype::F32 => Kind::Float,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F64 => Kind::Double,
        d => bail!(
            "{}: tensor '{key}' has dtype {d:?}, expected a float type",
            path.display()
        ),
    };
    Tensor::f_from_data_size(view.data(), shape, kind)
        .and_then(|t| t.f_to_kind(Kind::Float))
        .and_then(|t| t.f_to_device(device))
        .map_err(|e| anyhow!("{}: tensor '{key}': {e}", path.display()))
}

/// The safetensors files of a checkpoint directory (single or sharded).
fn checkpoint_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if !index.exists() {
        let single = dir.join("model.safetensors");
        if !single.exists() {
            bail!(
                "{}: no model.safetensors or model.safetensors.index.json",
                dir.display()
            );
        }
        return Ok(vec![single]);
    }
    let text = std::fs::read_to_string(&index)
        .map_err(|e| anyhow!("{}: cannot read ({e})", index.display()))?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| anyhow!("{}: malformed JSON ({e})", index.display()))?;
    let map = v
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| anyhow!("{}: no 'weight_map' object", index.display()))?;
    let mut files = BTreeSet::new();
    for (tensor, file) in map {
        let file = file.as_str().ok_or_else(|| {
            anyhow!(
                "{}: weight_map['{tensor}'] is not a string",
                index.display()
            )
        })?;
        files.insert(dir.join(file));
    }
    Ok(files.into_iter().collect())
}

fn kind_name(kind: Kind) -> Result<&'static str> {
    Ok(match kind {
        Kind::Float => "float32",
        Kind::BFloat16 => "bfloat16",
        Kind::Half => "float16",
        Kind::Double => "float64",
        k => bail!("cannot export a model in dtype {k:?}"),
    })
}

fn write_safetensors(path: &Path, tensors: Vec<(String, TensorBytes)>) -> Result<()> {
    let tmp = tmp_path(path);
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let views = tensors.iter().map(|(n, b)| (n.as_str(), b));
    safetensors::tensor::serialize_to_file(views, Some(meta), &tmp)
        .map_err(|e| anyhow!("{}: cannot write ({e})", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        anyhow!("{}: cannot write ({e})", path.display())
    })
}

fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let tmp = tmp_path(path);
    std::fs::write(&tmp, data).map_err(|e| anyhow!("{}: cannot write ({e})", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        anyhow!("{}: cannot write ({e})", path.display())
    })
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp{}", std::process::id()));
    path.with_file_name(name)
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
