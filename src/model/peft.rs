//! LoRA adapters on disk in PEFT's layout, and a merge-and-export to a plain
//! Hugging Face directory (the adapter maths is in `lora`).
//!
//! - Files: `adapter_config.json` + `adapter_model.safetensors`, keys
//!   `base_model.model.<module>.lora_{A,B}.weight`, exactly what peft 0.21's
//!   `save_pretrained` writes (metadata `format: pt`). Loading is strict: unknown
//!   options that change the maths (rslora, DoRA, patterns, biases, ...) and
//!   missing, misshapen or unexpected tensors are errors naming the file and key.
//! - The saved adapter is fp32; a merge is done in fp32 and rounded once to the
//!   model dtype.
use super::llama::{Linear, Llama};
use super::lora::{lora_key, LoraAdapter, LoraConfig};
use super::text::{describe, read_text, shorten};
use super::weights::{read_header, short_dims, show_name, TensorBytes};
use anyhow::{anyhow, bail, Context, Result};
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use serde_json::{json, Value};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";

impl Llama {
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
        let bad = |e: &dyn std::fmt::Display| {
            anyhow!("{}: not a valid safetensors file: {e:#}", path.display())
        };
        read_header(&bytes).map_err(|e| bad(&e))?;
        let st = SafeTensors::deserialize(&bytes).map_err(|e| bad(&format!("{e:?}")))?;
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
            adapters.insert(module, LoraAdapter::loaded(a, b, cfg.scaling())?);
        }
        let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
        names.sort();
        if let Some(extra) = names.iter().find(|n| !expected.contains(*n)) {
            bail!(
                "{}: unexpected tensor {} (not the LoRA A/B weight of a targeted module of this model)",
                path.display(),
                show_name(extra)
            );
        }
        let cfg = LoraConfig {
            targets: targets.iter().map(|t| t.to_string()).collect(),
            ..cfg
        };
        self.install_lora(cfg, adapters);
        Ok(())
    }

    /// Writes an HF model directory of the model as trained: `config.json`
    /// (its dtype entry set to the written dtype), tokenizer files and
    /// `generation_config.json` when present, and `model.safetensors` holding
    /// every tensor of the checkpoint in `src_dir` under its own name, with
    /// `W + scaling * B A` for adapted layers and the current values of fully
    /// trained weights. Written in the model's dtype (non-float tensors as
    /// they are); a tied checkpoint gets no `lm_head` unless it had one.
    pub fn export_merged(&self, src_dir: &Path, out_dir: &Path) -> Result<()> {
        let kind = self.embed_tokens.kind();
        let dtype_name = kind_name(kind)?;
        std::fs::create_dir_all(out_dir)
            .with_context(|| format!("{}: cannot create directory", out_dir.display()))?;
        let same = match (src_dir.canonicalize(), out_dir.canonicalize()) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        };
        // A fully trained model may replace its own directory (every file is
        // read before any is replaced, each atomically); merged adapters
        // would destroy the base they were trained on.
        if same && self.has_lora() {
            bail!(
                "{}: the merged model must go to another directory than its base (the adapter's base_model)",
                out_dir.display()
            );
        }
        let mut adapted: HashMap<String, &Linear> = HashMap::new();
        for (module, _, lin) in self.linear_modules() {
            if lin.lora.is_some() {
                adapted.insert(format!("{module}.weight"), lin);
            }
        }
        let mut trained: HashMap<String, Tensor> = self.trainable().into_iter().collect();
        if self.cfg.tie_word_embeddings {
            if let Some(e) = trained
                .get("model.embed_tokens.weight")
                .map(Tensor::shallow_clone)
            {
                trained.insert("lm_head.weight".into(), e);
            }
        }
        let mut tensors = Vec::new();
        for file in checkpoint_files(src_dir)? {
            let loaded = Tensor::read_safetensors(&file)
                .map_err(|e| anyhow!("{}: cannot read ({e})", file.display()))?;
            for (name, t) in loaded {
                if let Some(w) = trained.get(&name) {
                    tensors.push((name, TensorBytes::of(&w.f_detach()?.f_to_kind(kind)?)?));
                    continue;
                }
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
    let text = read_text(path)?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| anyhow!("{}: malformed JSON ({e})", path.display()))?;
    let err = |key: &str, what: &str| anyhow!("{}: key '{key}' {what}", path.display());
    if !v.is_object() {
        bail!(
            "{}: expected a JSON object at line 1, got {}",
            path.display(),
            describe(&v)
        );
    }
    match v.get("peft_type") {
        Some(Value::String(t)) if t == "LORA" => {}
        Some(Value::String(other)) => {
            return Err(err(
                "peft_type",
                &format!("is {}, expected \"LORA\"", shorten(other)),
            ))
        }
        Some(other) => {
            return Err(err(
                "peft_type",
                &format!("is {}, expected \"LORA\"", describe(other)),
            ))
        }
        None => return Err(err("peft_type", "is missing (expected \"LORA\")")),
    }
    let rank = match v.get("r") {
        None => return Err(err("r", "is missing")),
        Some(r) => r.as_i64().filter(|&r| r > 0).ok_or_else(|| {
            err(
                "r",
                &format!("must be a positive integer, got {}", describe(r)),
            )
        })?,
    };
    let alpha = match v.get("lora_alpha") {
        None => return Err(err("lora_alpha", "is missing")),
        Some(a) => a
            .as_f64()
            .filter(|a| a.is_finite() && *a > 0.0)
            .ok_or_else(|| {
                err(
                    "lora_alpha",
                    &format!("must be a positive number, got {}", describe(a)),
                )
            })?,
    };
    let targets = match v.get("target_modules") {
        None | Some(Value::Null) => return Err(err("target_modules", "is missing")),
        Some(Value::Array(items)) => items
            .iter()
            .map(|t| {
                t.as_str().map(str::to_string).ok_or_else(|| {
                    err(
                        "target_modules",
                        &format!("has a non-string entry: {}", describe(t)),
                    )
                })
            })
            .collect::<Result<Vec<_>>>()?,
        Some(other) => {
            return Err(err(
                "target_modules",
                &format!(
                    "must be a list of module names, got {} (regex targets are not supported)",
                    describe(other)
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
            return Err(err(
                key,
                &format!("is {}, only {ok} is supported", describe(got)),
            ));
        }
    }
    if let Some(d) = v.get("lora_dropout") {
        if !d.as_f64().is_some_and(|d| (0.0..1.0).contains(&d)) {
            return Err(err(
                "lora_dropout",
                &format!("must be a number in [0, 1), got {}", describe(d)),
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
            "{}: tensor '{key}' has shape {}, expected {shape:?}",
            path.display(),
            short_dims(&got)
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
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let views = tensors.iter().map(|(n, b)| (n.as_str(), b));
    let bytes = safetensors::tensor::serialize(views, Some(meta))
        .map_err(|e| anyhow!("{}: cannot write ({e})", path.display()))?;
    write_atomic(path, &bytes)
}

/// A whole file, atomically and synced (`fsio::write_atomic`).
fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    crate::fsio::write_atomic(path, |f| Ok(std::io::Write::write_all(f, data)?))
}
