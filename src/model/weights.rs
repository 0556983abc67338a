//! Safetensors checkpoints: a single `model.safetensors` or shards listed in
//! `model.safetensors.index.json`, memory-mapped and validated when opened.
use anyhow::{anyhow, bail, Context, Result};
use memmap2::Mmap;
use safetensors::tensor::{Dtype, Metadata};
use safetensors::SafeTensors;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

struct Shard {
    path: PathBuf,
    mmap: Mmap,
    header_len: usize,
    meta: Metadata,
}

/// All tensors of a checkpoint, read on demand into the requested dtype and device.
pub struct Weights {
    shards: Vec<Shard>,
    index: HashMap<String, usize>,
    pub device: Device,
    pub dtype: Kind,
}

impl Weights {
    pub fn open(dir: &Path, device: Device, dtype: Kind) -> Result<Self> {
        let index_path = dir.join("model.safetensors.index.json");
        let files = if index_path.exists() {
            shard_files(&index_path)?
        } else {
            let single = dir.join("model.safetensors");
            if !single.exists() {
                bail!(
                    "{}: no model.safetensors or model.safetensors.index.json",
                    dir.display()
                );
            }
            vec![single]
        };
        let mut shards = Vec::new();
        let mut index = HashMap::new();
        for path in files {
            let shard = open_shard(&path)?;
            for name in shard.meta.tensors().keys() {
                index.insert(name.clone(), shards.len());
            }
            shards.push(shard);
        }
        Ok(Weights {
            shards,
            index,
            device,
            dtype,
        })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// Tensor names in a stable order.
    pub fn names(&self) -> Vec<String> {
        let mut n: Vec<String> = self.index.keys().cloned().collect();
        n.sort();
        n
    }

    /// Number of parameters and the stored dtypes, from the headers alone.
    pub fn summary(&self) -> (usize, Vec<String>) {
        let mut count = 0;
        let mut dtypes = std::collections::BTreeSet::new();
        for s in &self.shards {
            for info in s.meta.tensors().values() {
                count += info.shape.iter().product::<usize>();
                dtypes.insert(format!("{:?}", info.dtype));
            }
        }
        (count, dtypes.into_iter().collect())
    }

    /// Loads `name`, checks its shape, converts to the model dtype and device.
    pub fn get(&self, name: &str, shape: &[i64]) -> Result<Tensor> {
        self.get_as(name, shape, self.dtype)
    }

    /// Like `get` but with an explicit dtype (e.g. fp32 router or norms).
    pub fn get_as(&self, name: &str, shape: &[i64], dtype: Kind) -> Result<Tensor> {
        let (shard, info_shape, t) = self.raw(name)?;
        if info_shape != shape {
            bail!(
                "{}: tensor '{name}' has shape {info_shape:?}, expected {shape:?}",
                shard.path.display()
            );
        }
        t.f_to_kind(dtype)
            .and_then(|t| t.f_to_device(self.device))
            .with_context(|| format!("{}: tensor '{name}'", shard.path.display()))
    }

    fn raw(&self, name: &str) -> Result<(&Shard, Vec<i64>, Tensor)> {
        let &i = self.index.get(name).ok_or_else(|| {
            let files: Vec<String> = self
                .shards
                .iter()
                .map(|s| {
                    s.path
                        .file_name()
                        .unwrap_or_default()
                        .to_string_lossy()
                        .into_owned()
                })
                .collect();
            anyhow!("{}: tensor '{name}' is missing", files.join(", "))
        })?;
        let shard = &self.shards[i];
        let info = shard.meta.info(name).expect("indexed name is in its shard");
        let kind = kind_of(info.dtype).ok_or_else(|| {
            anyhow!(
                "{}: tensor '{name}' has unsupported dtype {:?}",
                shard.path.display(),
                info.dtype
            )
        })?;
        let shape: Vec<i64> = info.shape.iter().map(|&d| d as i64).collect();
        let start = 8 + shard.header_len + info.data_offsets.0;
        let end = 8 + shard.header_len + info.data_offsets.1;
        let t = Tensor::f_from_data_size(&shard.mmap[start..end], &shape, kind)
            .with_context(|| format!("{}: tensor '{name}'", shard.path.display()))?;
        Ok((shard, shape, t))
    }
}

/// The tch kind of a safetensors dtype.
pub fn kind_of(d: Dtype) -> Option<Kind> {
    Some(match d {
        Dtype::F32 => Kind::Float,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F64 => Kind::Double,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::I16 => Kind::Int16,
        Dtype::I8 => Kind::Int8,
        Dtype::U8 => Kind::Uint8,
        Dtype::BOOL => Kind::Bool,
        _ => return None,
    })
}

fn open_shard(path: &Path) -> Result<Shard> {
    let file = File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    // SAFETY: the file is only read; a concurrent writer would be a user error
    // that at worst yields wrong numbers, as with any reader.
    let mmap =
        unsafe { Mmap::map(&file) }.with_context(|| format!("{}: cannot map", path.display()))?;
    let (header_len, meta) = SafeTensors::read_metadata(&mmap).map_err(|e| {
        anyhow!(
            "{}: not a valid safetensors file (truncated or corrupt: {e:?})",
            path.display()
        )
    })?;
    Ok(Shard {
        path: path.to_path_buf(),
        mmap,
        header_len,
        meta,
    })
}

/// The shard file names listed in `model.safetensors.index.json`.
fn shard_files(index_path: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index_path)
        .with_context(|| format!("{}: cannot read", index_path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: malformed JSON", index_path.display()))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| anyhow!("{}: no 'weight_map' object", index_path.display()))?;
    let mut files = BTreeMap::new();
    for (tensor, file) in map {
        let file = file.as_str().ok_or_else(|| {
            anyhow!(
                "{}: weight_map['{tensor}'] is not a string",
                index_path.display()
            )
        })?;
        files.insert(file.to_string(), ());
    }
    let dir = index_path.parent().unwrap_or(Path::new("."));
    Ok(files.into_keys().map(|f| dir.join(f)).collect())
}

/// The safetensors dtype of a tch kind.
pub fn dtype_of(k: Kind) -> Option<Dtype> {
    Some(match k {
        Kind::Float => Dtype::F32,
        Kind::Half => Dtype::F16,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Double => Dtype::F64,
        Kind::Int64 => Dtype::I64,
        Kind::Int => Dtype::I32,
        Kind::Int16 => Dtype::I16,
        Kind::Int8 => Dtype::I8,
        Kind::Uint8 => Dtype::U8,
        Kind::Bool => Dtype::BOOL,
        _ => return None,
    })
}

/// A tensor copied to host bytes, ready for `safetensors::serialize`
/// (adapters, optimizer state).
pub struct TensorBytes {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl TensorBytes {
    pub fn of(t: &Tensor) -> Result<Self> {
        let kind = t.f_kind()?;
        let dtype =
            dtype_of(kind).ok_or_else(|| anyhow!("cannot write a tensor of dtype {kind:?}"))?;
        let t = t.f_detach()?.f_to_device(Device::Cpu)?.f_contiguous()?;
        let numel = t.numel();
        let mut data = vec![0u8; numel * kind.elt_size_in_bytes()];
        t.f_copy_data_u8(&mut data, numel)?;
        Ok(TensorBytes {
            dtype,
            shape: t.size().iter().map(|&d| d as usize).collect(),
            data,
        })
    }
}

impl safetensors::tensor::View for &TensorBytes {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}
