//! Checkpoints of a training run, enough to continue it exactly: the LoRA
//! adapter (PEFT layout, loadable by Python peft) or the fully trained
//! weights, the router and its reference, the HRPO gate, the optimizer's
//! moments and schedule position, the step and RNG state, and the data
//! cursor.
//!
//! Crash safety: a checkpoint is written into `step-N.tmp/`, every file
//! synced, `manifest.json` (each file's size and SHA-256) written last, the
//! directory synced and renamed to `step-N/`. Loading checks the manifest and
//! reads every file before it changes anything; `newest_intact` skips a
//! damaged checkpoint (reported by file) for the one before it.
use super::dataset::Sampler;
use super::optim::AdamW;
use super::policy::Policy;
use crate::faults;
use crate::fsio;
use crate::model::lora::ADAPTER_WEIGHTS;
use crate::model::text::{clip, shorten};
use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};
use tch::Tensor;

#[derive(Serialize, Deserialize)]
struct State {
    format: u32,
    /// Optimizer steps applied (the schedule position).
    step: u64,
    rng: u64,
    sampler: Option<Sampler>,
    /// The run's step (its metrics rows) at the save; format 1 lacks it.
    #[serde(default)]
    run_step: Option<u64>,
}

/// 2: manifest.json and run_step. 1 is still read (unverified).
const FORMAT: u32 = 2;
/// The fully trained base weights, by checkpoint name.
const WEIGHTS: &str = "weights.safetensors";
const MANIFEST: &str = "manifest.json";

#[derive(Serialize, Deserialize)]
struct Manifest {
    format: u32,
    /// Relative path -> size and SHA-256 of every other file.
    files: BTreeMap<String, FileSum>,
}

#[derive(Serialize, Deserialize, PartialEq, Debug)]
struct FileSum {
    bytes: u64,
    sha256: String,
}

/// What a run's state is made of, wherever it lives (a `Trainer`, or a
/// script's backbone and optimizer).
pub struct Parts<'a> {
    pub policy: &'a Policy,
    pub opt: &'a AdamW,
    /// Optimizer steps applied.
    pub step: u64,
    /// The run's step (its last metrics row) at the save.
    pub run_step: u64,
    /// The state of the generator that draws rollout seeds.
    pub rng: u64,
    pub sampler: Option<&'a Sampler>,
}

/// What `load_parts` restored beside the tensors, for the caller to put back.
#[derive(Debug, Clone, Copy)]
pub struct Restored {
    pub step: u64,
    pub run_step: u64,
    pub rng: u64,
    pub sampler: Option<Sampler>,
}

/// Where the checkpoint of step `step` lives.
pub fn step_dir(run_dir: &Path, step: u64) -> PathBuf {
    run_dir.join("checkpoints").join(format!("step-{step:06}"))
}

/// Writes `run_dir/checkpoints/step-NNNNNN/` (N: optimizer steps taken,
/// skipped ones included) and points `run_dir/checkpoints/latest` at it.
/// On an error (a full disk) the partial checkpoint is removed and the
/// earlier ones stay as they were.
pub fn save_parts(tr: &Parts, run_dir: &Path) -> Result<PathBuf> {
    let root = run_dir.join("checkpoints");
    let taken = tr.opt.step_count() + tr.opt.skipped_steps();
    let dir = step_dir(run_dir, taken);
    let tmp = root.join(format!("{}.tmp", file_name(&dir)));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)
            .with_context(|| format!("{}: cannot clear", tmp.display()))?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
    if let Err(e) = write_files(tr, &tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e.context(format!("checkpoint {} not written", dir.display())));
    }
    if dir.exists() {
        std::fs::remove_dir_all(&dir)
            .with_context(|| format!("{}: cannot replace", dir.display()))?;
    }
    std::fs::rename(&tmp, &dir)
        .with_context(|| format!("{}: cannot rename into place", dir.display()))?;
    fsio::sync_dir(&root)?;
    faults::point("checkpoint.rename");
    point_latest(&dir)?;
    Ok(dir)
}

/// Points `checkpoints/latest` (for people and tools; loading picks the
/// newest intact checkpoint itself) at checkpoint directory `dir`.
pub fn point_latest(dir: &Path) -> Result<()> {
    let root = dir.parent().unwrap_or(Path::new("."));
    fsio::write_atomic(&root.join("latest"), |f| {
        use std::io::Write;
        Ok(f.write_all(file_name(dir).as_bytes())?)
    })
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Every file of a checkpoint into `tmp`, each synced, the manifest last.
fn write_files(tr: &Parts, tmp: &Path) -> Result<()> {
    let net = &tr.policy.model.net;
    if net.has_lora() {
        tr.policy.model.save_lora(&tmp.join("adapter"))?;
        faults::point("checkpoint.file");
    }
    let trained = net.trainable();
    if !trained.is_empty() {
        write_tensors(&tmp.join(WEIGHTS), trained)?;
    }
    for (file, named) in policy_parts(tr.policy) {
        write_tensors(&tmp.join(file), named)?;
    }
    tr.opt.save(&tmp.join("optimizer.safetensors"))?;
    faults::point("checkpoint.file");
    let state = State {
        format: FORMAT,
        step: tr.step,
        rng: tr.rng,
        sampler: tr.sampler.copied(),
        run_step: Some(tr.run_step),
    };
    let path = tmp.join("state.json");
    std::fs::write(&path, serde_json::to_string_pretty(&state)?)
        .with_context(|| format!("{}: cannot write", path.display()))?;
    faults::point("checkpoint.file");
    let mut files = BTreeMap::new();
    for rel in list_files(tmp)? {
        let path = tmp.join(&rel);
        fsio::sync_file(&path)?;
        files.insert(rel, checksum(&path)?);
    }
    let manifest = Manifest {
        format: FORMAT,
        files,
    };
    let path = tmp.join(MANIFEST);
    std::fs::write(&path, serde_json::to_string_pretty(&manifest)?)
        .with_context(|| format!("{}: cannot write", path.display()))?;
    fsio::sync_file(&path)?;
    if net.has_lora() {
        fsio::sync_dir(&tmp.join("adapter"))?;
    }
    fsio::sync_dir(tmp)
}

fn write_tensors(path: &Path, named: Vec<(String, Tensor)>) -> Result<()> {
    let tensors: Vec<(String, Tensor)> = named.into_iter().map(|(n, t)| (n, t.detach())).collect();
    Tensor::write_safetensors(&tensors, path)
        .map_err(|e| anyhow!("{}: cannot write: {e}", path.display()))?;
    faults::point("checkpoint.file");
    Ok(())
}

/// The files under `dir` (relative paths, sorted), the manifest aside.
fn list_files(dir: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let mut todo = vec![PathBuf::new()];
    while let Some(rel) = todo.pop() {
        let here = dir.join(&rel);
        let entries =
            std::fs::read_dir(&here).with_context(|| format!("{}: cannot list", here.display()))?;
        for e in entries {
            let e = e.with_context(|| format!("{}: cannot list", here.display()))?;
            let r = rel.join(e.file_name());
            if e.path().is_dir() {
                todo.push(r);
            } else if r != Path::new(MANIFEST) {
                out.push(r.to_string_lossy().into_owned());
            }
        }
    }
    out.sort();
    Ok(out)
}

fn checksum(path: &Path) -> Result<FileSum> {
    let mut f =
        std::fs::File::open(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("{}: cannot read", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        bytes += n as u64;
    }
    let sha256 = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    Ok(FileSum { bytes, sha256 })
}

/// Checks a checkpoint against its manifest: every listed file present with
/// its size and checksum, nothing unlisted. The error names the file.
pub fn verify(dir: &Path) -> Result<()> {
    let path = dir.join(MANIFEST);
    let text = match std::fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && format_of(dir) == Some(1) => {
            return Ok(()); // written before manifests: nothing to check against
        }
        Err(e) => return Err(e).with_context(|| format!("{}: cannot read", path.display())),
    };
    let m: Manifest = serde_json::from_slice(&text)
        .map_err(|e| anyhow!("{}: malformed: {}", path.display(), clip(&e.to_string())))?;
    for (rel, want) in &m.files {
        let file = dir.join(rel);
        let odd = |c: &str| c.is_empty() || c == ".." || c.chars().any(char::is_control);
        if rel.split(['/', '\\']).any(odd) || Path::new(rel).is_absolute() {
            bail!(
                "{}: lists {}, not a file of the checkpoint",
                path.display(),
                shorten(rel)
            );
        }
        if !file.is_file() {
            bail!("{}: missing (listed in {MANIFEST})", file.display());
        }
        let got = checksum(&file)?;
        if got.bytes != want.bytes {
            bail!(
                "{}: {} bytes, the manifest says {} (truncated or overwritten)",
                file.display(),
                got.bytes,
                want.bytes
            );
        }
        if got.sha256 != want.sha256 {
            bail!(
                "{}: checksum differs from the manifest (damaged)",
                file.display()
            );
        }
    }
    if let Some(extra) = list_files(dir)?
        .into_iter()
        .find(|f| !m.files.contains_key(f))
    {
        bail!(
            "{}: not in {MANIFEST} (a checkpoint from elsewhere?)",
            dir.join(extra).display()
        );
    }
    Ok(())
}

/// The `format` a checkpoint's state.json declares, if it can be read.
fn format_of(dir: &Path) -> Option<u32> {
    let text = std::fs::read(dir.join("state.json")).ok()?;
    serde_json::from_slice::<serde_json::Value>(&text).ok()?["format"]
        .as_u64()
        .map(|f| f as u32)
}

/// The newest checkpoint of a run that passes `verify`, and one line for
/// each newer one that did not (skipped). Ok(None) when there are none at all;
/// an error when every checkpoint is damaged.
pub fn newest_intact(run_dir: &Path) -> Result<(Option<PathBuf>, Vec<String>)> {
    let root = run_dir.join("checkpoints");
    let mut steps: Vec<(u64, PathBuf)> = match std::fs::read_dir(&root) {
        Ok(entries) => entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let n = name.strip_prefix("step-")?.parse::<u64>().ok()?;
                e.path().is_dir().then(|| (n, e.path()))
            })
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((None, Vec::new())),
        Err(e) => return Err(e).with_context(|| format!("{}: cannot list", root.display())),
    };
    steps.sort_by_key(|(n, _)| std::cmp::Reverse(*n));
    let mut skipped = Vec::new();
    for (_, dir) in &steps {
        match verify(dir) {
            Ok(()) => return Ok((Some(dir.clone()), skipped)),
            Err(e) => skipped.push(format!("{e:#}")),
        }
    }
    if skipped.is_empty() {
        return Ok((None, skipped));
    }
    bail!(
        "no intact checkpoint in {}:\n  {}",
        root.display(),
        skipped.join("\n  ")
    )
}

/// Clears what a crash in `save_parts` left: a `step-N.tmp/` directory is
/// removed, unless it is complete (its manifest verifies) and `step-N/` is
/// missing (the crash came while replacing it): then it takes its place.
/// Temporary `latest` files go too.
pub fn clear_partial(run_dir: &Path) -> Result<()> {
    let root = run_dir.join("checkpoints");
    let Ok(entries) = std::fs::read_dir(&root) else {
        return Ok(());
    };
    for e in entries.flatten() {
        let p = e.path();
        let name = file_name(&p);
        let Some(base) = name.strip_suffix(".tmp").filter(|_| p.is_dir()) else {
            continue;
        };
        let dir = root.join(base);
        if !dir.exists() && p.join(MANIFEST).exists() && verify(&p).is_ok() {
            std::fs::rename(&p, &dir)
                .with_context(|| format!("{}: cannot rename into place", dir.display()))?;
        } else {
            std::fs::remove_dir_all(&p)
                .with_context(|| format!("{}: cannot remove", p.display()))?;
        }
    }
    fsio::remove_temp_files(&root)?;
    fsio::sync_dir(&root)
}

/// Restores a checkpoint into a policy and optimizer built the same way as
/// the ones that saved it. Values are copied into the existing tensors, so the
/// optimizer's handles on them stay valid. Everything is checked and read
/// before anything changes: on an error the policy and optimizer are as they
/// were.
pub fn load_parts(policy: &Policy, opt: &mut AdamW, dir: &Path) -> Result<Restored> {
    verify(dir)?;
    let state_path = dir.join("state.json");
    let text = std::fs::read(&state_path)
        .with_context(|| format!("{}: cannot read", state_path.display()))?;
    let state: State = serde_json::from_slice(&text).map_err(|e| {
        anyhow!(
            "{}: malformed: {}",
            state_path.display(),
            clip(&e.to_string())
        )
    })?;
    if state.format == 0 || state.format > FORMAT {
        bail!(
            "{}: checkpoint format {} (this build reads 1 to {FORMAT})",
            state_path.display(),
            state.format
        );
    }
    let net = &policy.model.net;
    let mut plan = Vec::new();
    if net.has_lora() {
        let path = dir.join("adapter").join(ADAPTER_WEIGHTS);
        plan.push(read_into(&path, net.named_lora_parameters())?);
    }
    let trained = net.trainable();
    if !trained.is_empty() {
        plan.push(read_into(&dir.join(WEIGHTS), trained)?);
    }
    for (file, named) in policy_parts(policy) {
        plan.push(read_into(&dir.join(file), named)?);
    }
    opt.load(&dir.join("optimizer.safetensors"))?;
    for pairs in plan {
        for (name, target, src) in pairs {
            tch::no_grad(|| target.shallow_clone().f_copy_(&src))
                .with_context(|| format!("{}: tensor '{name}'", dir.display()))?;
        }
    }
    Ok(Restored {
        step: state.step,
        run_step: state.run_step.unwrap_or(state.step),
        rng: state.rng,
        sampler: state.sampler,
    })
}

/// The policy's parts beside the backbone, each saved to its own file:
/// router and its reference, HRPO gate, RLTT loop weights, DRO value head.
fn policy_parts(policy: &Policy) -> Vec<(&'static str, Vec<(String, Tensor)>)> {
    let named = |ps: Vec<(&str, Tensor)>| ps.into_iter().map(|(n, t)| (n.to_string(), t)).collect();
    let mut out = Vec::new();
    if let (Some(r), Some(r0)) = (&policy.router, &policy.router_ref) {
        let c = |t: &Tensor| t.shallow_clone();
        out.push((
            "router.safetensors",
            named(vec![
                ("weight", c(&r.weight)),
                ("bias", c(&r.bias)),
                ("weight_ref", c(&r0.weight)),
                ("bias_ref", c(&r0.bias)),
            ]),
        ));
    }
    if let Some(g) = &policy.gate {
        out.push(("hrpo_gate.safetensors", named(g.named_parameters())));
    }
    if let Some(theta) = &policy.loop_logits {
        out.push((
            "loop_weights.safetensors",
            named(vec![("logits", theta.shallow_clone())]),
        ));
    }
    if let Some(v) = &policy.value_head {
        out.push(("value_head.safetensors", named(v.named_parameters())));
    }
    out
}

/// Reads the named tensors of a safetensors file for `targets` (same names
/// and shapes): (name, target, saved value) to copy once all are read.
fn read_into(path: &Path, targets: Vec<(String, Tensor)>) -> Result<Vec<(String, Tensor, Tensor)>> {
    let mut saved: HashMap<String, Tensor> = Tensor::read_safetensors(path)
        .map_err(|e| anyhow!("{}: cannot read: {e}", path.display()))?
        .into_iter()
        .collect();
    targets
        .into_iter()
        .map(|(name, t)| {
            let src = saved
                .remove(&name)
                .ok_or_else(|| anyhow!("{}: tensor '{name}' is missing", path.display()))?;
            if src.size() != t.size() {
                bail!(
                    "{}: tensor '{name}' has shape {:?}, expected {:?}",
                    path.display(),
                    src.size(),
                    t.size()
                );
            }
            Ok((name, t, src))
        })
        .collect()
}
