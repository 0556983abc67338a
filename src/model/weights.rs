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
        let sharded = index_path.exists();
        for path in files {
            let shard = if sharded {
                open_shard(&path).with_context(|| {
                    format!(
                        "{}: key `weight_map` lists this shard",
                        index_path.display()
                    )
                })?
            } else {
                open_shard(&path)?
            };
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
        let shard = self.shard_of(name)?;
        let info = shard.meta.info(name).ok_or_else(|| {
            anyhow!(
                "{}: tensor {} is missing",
                shard.path.display(),
                show_name(name)
            )
        })?;
        // Headers were checked on open: every dimension fits an i64.
        let info_shape: Vec<i64> = info.shape.iter().map(|&d| d as i64).collect();
        if info_shape != shape {
            bail!(
                "{}: tensor {} has shape {}, expected {shape:?}",
                shard.path.display(),
                show_name(name),
                short_dims(&info_shape)
            );
        }
        let kind = kind_of(info.dtype).ok_or_else(|| {
            anyhow!(
                "{}: tensor {} has unsupported dtype {:?}",
                shard.path.display(),
                show_name(name),
                info.dtype
            )
        })?;
        let start = 8 + shard.header_len + info.data_offsets.0;
        let end = 8 + shard.header_len + info.data_offsets.1;
        let bytes = shard.mmap.get(start..end).ok_or_else(|| {
            anyhow!(
                "{}: tensor {}: data bytes {start}..{end} are past the end of the file",
                shard.path.display(),
                show_name(name)
            )
        })?;
        Tensor::f_from_data_size(bytes, &info_shape, kind)
            .and_then(|t| t.f_to_kind(dtype))
            .and_then(|t| t.f_to_device(self.device))
            .with_context(|| format!("{}: tensor {}", shard.path.display(), show_name(name)))
    }

    fn shard_of(&self, name: &str) -> Result<&Shard> {
        let &i = self.index.get(name).ok_or_else(|| {
            let files: Vec<String> = self
                .shards
                .iter()
                .map(|s| s.path.display().to_string())
                .collect();
            anyhow!(
                "{}: tensor {} is missing",
                files.join(", "),
                show_name(name)
            )
        })?;
        Ok(&self.shards[i])
    }
}

/// A tensor (or other user-given) name for an error message: quoted, on
/// one line, and cut after 120 characters.
pub fn show_name(name: &str) -> String {
    const KEEP: usize = 120;
    let mut out = String::from("'");
    for (i, c) in name.chars().enumerate() {
        if i == KEEP {
            out.push_str("...");
            break;
        }
        match c {
            '\\' => out.push_str("\\\\"),
            '\'' => out.push_str("\\'"),
            c if c.is_control() => out.extend(c.escape_default()),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

/// Largest header safetensors reads (its own limit).
const MAX_HEADER: u64 = 100_000_000;

/// Reads and checks a safetensors file's header, with an error that says
/// where the file is wrong: the header length (bytes 0..8), a byte of the
/// header, a tensor's entry by name, or the data section. Returns the
/// header length and the metadata, as `SafeTensors::read_metadata`; on
/// success `SafeTensors::deserialize` of the same bytes succeeds too, and
/// every dimension fits an i64.
pub fn read_header(bytes: &[u8]) -> Result<(usize, Metadata)> {
    let len = bytes.len();
    let Some(head) = bytes.get(..8) else {
        bail!("truncated: the file has {len} bytes, fewer than the 8 of its header length");
    };
    let n = u64::from_le_bytes(head.try_into().expect("8 bytes"));
    if n > (len - 8) as u64 {
        bail!(
            "truncated or corrupt: the header length (bytes 0..8) is {n}, past the end of the file ({len} bytes)"
        );
    }
    if n > MAX_HEADER {
        bail!("the header length (bytes 0..8) is {n}, over the limit of {MAX_HEADER} bytes");
    }
    let n = n as usize;
    let text = std::str::from_utf8(&bytes[8..8 + n])
        .map_err(|e| anyhow!("header: invalid UTF-8 at byte {}", 8 + e.valid_up_to()))?;
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| {
        anyhow!(
            "header: malformed JSON at byte {} ({e})",
            8 + byte_of(text, e.line(), e.column())
        )
    })?;
    let serde_json::Value::Object(entries) = v else {
        bail!("header: expected a JSON object at byte 8");
    };
    let mut spans: Vec<(usize, usize, &str)> = Vec::new();
    for (name, entry) in &entries {
        if name == "__metadata__" {
            match entry {
                serde_json::Value::Null => {}
                serde_json::Value::Object(m) => {
                    if let Some((k, _)) = m.iter().find(|(_, v)| !v.is_string()) {
                        bail!(
                            "header: __metadata__ entry {}: expected a string value",
                            show_name(k)
                        );
                    }
                }
                _ => bail!("header: __metadata__: expected an object of strings"),
            }
            continue;
        }
        let at = || format!("header: tensor {}", show_name(name));
        let obj = entry.as_object().ok_or_else(|| {
            anyhow!(
                "{}: expected an object {{dtype, shape, data_offsets}}",
                at()
            )
        })?;
        let dtype: Dtype = match obj.get("dtype") {
            None => bail!("{}: no dtype", at()),
            Some(d) => serde_json::from_value(d.clone())
                .map_err(|_| anyhow!("{}: unknown dtype {}", at(), short_json(d)))?,
        };
        let shape: Vec<usize> = match obj.get("shape").and_then(|s| s.as_array()) {
            None => bail!("{}: shape: expected an array of integers", at()),
            Some(dims) => dims
                .iter()
                .map(|d| {
                    d.as_u64()
                        .filter(|&d| d <= i64::MAX as u64)
                        .map(|d| d as usize)
                        .ok_or_else(|| {
                            anyhow!(
                                "{}: shape: dimension {} is not an integer from 0 to {}",
                                at(),
                                short_json(d),
                                i64::MAX
                            )
                        })
                })
                .collect::<Result<_>>()?,
        };
        let (start, end) = match obj.get("data_offsets").and_then(|o| o.as_array()) {
            Some(o) if o.len() == 2 => match (o[0].as_u64(), o[1].as_u64()) {
                (Some(s), Some(e)) if e >= s && e <= usize::MAX as u64 => (s as usize, e as usize),
                _ => bail!(
                    "{}: data_offsets {}: expected [start, end] with start <= end",
                    at(),
                    short_json(&obj["data_offsets"])
                ),
            },
            _ => bail!("{}: data_offsets: expected [start, end]", at()),
        };
        let elements = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        let bits = elements.and_then(|e| e.checked_mul(dtype.bitsize()));
        let Some(bits) = bits else {
            bail!(
                "{}: shape {} has too many elements",
                at(),
                short_dims(&shape)
            );
        };
        if bits % 8 != 0 {
            bail!(
                "{}: shape {shape:?} of {dtype:?} is not a whole number of bytes",
                at()
            );
        }
        if end - start != bits / 8 {
            bail!(
                "{}: data_offsets [{start}, {end}] hold {} bytes, but shape {} of {dtype:?} needs {}",
                at(),
                end - start,
                short_dims(&shape),
                bits / 8
            );
        }
        spans.push((start, end, name));
    }
    spans.sort();
    let mut next = 0;
    for &(start, end, name) in &spans {
        if start != next {
            bail!(
                "header: tensor {}: data_offsets [{start}, {end}] {} (the previous tensor ends at byte {next} of the data section)",
                show_name(name),
                if start < next { "overlap another tensor" } else { "leave a gap" }
            );
        }
        next = end;
    }
    let data = len - 8 - n;
    if next > data {
        bail!(
            "truncated: the tensors need {next} bytes of data, the data section after the header has {data}"
        );
    }
    if next < data {
        bail!(
            "the data section has {} bytes past the last tensor (at byte {})",
            data - next,
            8 + n + next
        );
    }
    // The checks above are safetensors' own; should it still disagree, say so.
    SafeTensors::read_metadata(bytes).map_err(|e| anyhow!("header: {e:?}"))
}

/// A shape for an error message, its first dimensions if it has many.
pub fn short_dims<T: std::fmt::Debug>(shape: &[T]) -> String {
    if shape.len() <= 8 {
        format!("{shape:?}")
    } else {
        format!("{:?}... ({} dimensions)", &shape[..8], shape.len())
    }
}

/// A JSON value, shortened for an error message.
fn short_json(v: &serde_json::Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 60 {
        format!("{}...", s.chars().take(60).collect::<String>())
    } else {
        s
    }
}

/// The byte offset of a (1-based) line and column of serde_json's errors.
fn byte_of(text: &str, line: usize, column: usize) -> usize {
    let start: usize = text
        .split_inclusive('\n')
        .take(line.saturating_sub(1))
        .map(str::len)
        .sum();
    (start + column.saturating_sub(1)).min(text.len())
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
    let (header_len, meta) = read_header(&mmap)
        .map_err(|e| anyhow!("{}: not a valid safetensors file: {e:#}", path.display()))?;
    Ok(Shard {
        path: path.to_path_buf(),
        mmap,
        header_len,
        meta,
    })
}

/// The shard files listed in `model.safetensors.index.json`: names of files
/// in the checkpoint's directory.
fn shard_files(index_path: &Path) -> Result<Vec<PathBuf>> {
    let at = index_path.display();
    let text = super::text::read_text(index_path)?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| anyhow!("{at}: malformed JSON ({e})"))?;
    let map = match v.get("weight_map") {
        Some(serde_json::Value::Object(m)) => m,
        Some(other) => bail!(
            "{at}: key `weight_map`: expected an object of tensor names to shard files, got {}",
            super::text::describe(other)
        ),
        None => bail!("{at}: key `weight_map`: missing"),
    };
    let mut files = BTreeMap::new();
    for (tensor, file) in map {
        let Some(file) = file.as_str() else {
            bail!(
                "{at}: key `weight_map`, tensor {}: expected a shard file name, got {}",
                show_name(tensor),
                super::text::describe(file)
            );
        };
        let plain = Path::new(file)
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)));
        if file.is_empty() || file.len() > 255 || !plain || file.chars().any(char::is_control) {
            bail!(
                "{at}: key `weight_map`, tensor {}: shard {} is not a file name in the checkpoint's directory",
                show_name(tensor),
                super::text::shorten(file)
            );
        }
        files.insert(file.to_string(), ());
    }
    if files.is_empty() {
        bail!("{at}: key `weight_map`: empty (no shard files)");
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
