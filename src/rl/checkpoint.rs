//! Checkpoints of a training run, enough to continue it exactly: the LoRA
//! adapter (PEFT layout, loadable by Python peft) or the fully trained
//! weights, the router and its reference, the HRPO gate, the optimizer's
//! moments and schedule position, the step and RNG state, and the data
//! cursor. A checkpoint is written into `step-N.tmp/` and renamed to
//! `step-N/`, so a crash never leaves half of one.
use super::dataset::Sampler;
use super::optim::AdamW;
use super::policy::Policy;
use crate::model::lora::ADAPTER_WEIGHTS;
use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tch::Tensor;

#[derive(Serialize, Deserialize)]
struct State {
    format: u32,
    step: u64,
    rng: u64,
    sampler: Option<Sampler>,
}

const FORMAT: u32 = 1;
/// The fully trained base weights, by checkpoint name.
const WEIGHTS: &str = "weights.safetensors";

/// What a run's state is made of, wherever it lives (a `Trainer`, or a
/// script's backbone and optimizer).
pub struct Parts<'a> {
    pub policy: &'a Policy,
    pub opt: &'a AdamW,
    /// Optimizer steps taken.
    pub step: u64,
    /// The state of the generator that draws rollout seeds.
    pub rng: u64,
    pub sampler: Option<&'a Sampler>,
}

/// Where the checkpoint of optimizer step `step` lives.
pub fn step_dir(run_dir: &Path, step: u64) -> PathBuf {
    run_dir.join("checkpoints").join(format!("step-{step:06}"))
}

/// Writes `run_dir/checkpoints/step-NNNNNN/` and points `run_dir/checkpoints/latest` at it.
pub fn save_parts(tr: &Parts, run_dir: &Path) -> Result<PathBuf> {
    let root = run_dir.join("checkpoints");
    let name = format!("step-{:06}", tr.step);
    let (dir, tmp) = (step_dir(run_dir, tr.step), root.join(format!("{name}.tmp")));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)
            .with_context(|| format!("{}: cannot clear", tmp.display()))?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
    let net = &tr.policy.model.net;
    if net.has_lora() {
        tr.policy.model.save_lora(&tmp.join("adapter"))?;
    }
    let trained = net.trainable();
    if !trained.is_empty() {
        let tensors: Vec<(String, Tensor)> =
            trained.into_iter().map(|(n, t)| (n, t.detach())).collect();
        Tensor::write_safetensors(&tensors, tmp.join(WEIGHTS))?;
    }
    for (file, named) in policy_parts(tr.policy) {
        let tensors: Vec<(String, Tensor)> =
            named.into_iter().map(|(n, t)| (n, t.detach())).collect();
        Tensor::write_safetensors(&tensors, tmp.join(file))?;
    }
    tr.opt.save(&tmp.join("optimizer.safetensors"))?;
    let state = State {
        format: FORMAT,
        step: tr.step,
        rng: tr.rng,
        sampler: tr.sampler.copied(),
    };
    std::fs::write(
        tmp.join("state.json"),
        serde_json::to_string_pretty(&state)?,
    )?;
    if dir.exists() {
        std::fs::remove_dir_all(&dir)
            .with_context(|| format!("{}: cannot replace", dir.display()))?;
    }
    std::fs::rename(&tmp, &dir)
        .with_context(|| format!("{}: cannot rename into place", dir.display()))?;
    let latest_tmp = root.join("latest.tmp");
    std::fs::write(&latest_tmp, &name)?;
    std::fs::rename(&latest_tmp, root.join("latest"))?;
    Ok(dir)
}

/// The checkpoint `run_dir/checkpoints/latest` names, if any.
pub fn latest(run_dir: &Path) -> Result<Option<PathBuf>> {
    let root = run_dir.join("checkpoints");
    match std::fs::read_to_string(root.join("latest")) {
        Ok(name) => Ok(Some(root.join(name.trim()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("{}: cannot read", root.join("latest").display())),
    }
}

/// Restores a checkpoint into a policy and optimizer built the same way as
/// the ones that saved it. Values are copied into the existing tensors, so the
/// optimizer's handles on them stay valid. Returns the step, the seed
/// generator's state and the data cursor for the caller to put back.
pub fn load_parts(
    policy: &Policy,
    opt: &mut AdamW,
    dir: &Path,
) -> Result<(u64, u64, Option<Sampler>)> {
    let state_path = dir.join("state.json");
    let text = std::fs::read_to_string(&state_path)
        .with_context(|| format!("{}: cannot read", state_path.display()))?;
    let state: State = serde_json::from_str(&text)
        .with_context(|| format!("{}: malformed", state_path.display()))?;
    if state.format != FORMAT {
        bail!(
            "{}: checkpoint format {} (this build reads {FORMAT})",
            state_path.display(),
            state.format
        );
    }
    let net = &policy.model.net;
    if net.has_lora() {
        let path = dir.join("adapter").join(ADAPTER_WEIGHTS);
        copy_into(&path, &net.named_lora_parameters())?;
    }
    let trained = net.trainable();
    if !trained.is_empty() {
        copy_into(&dir.join(WEIGHTS), &trained)?;
    }
    for (file, named) in policy_parts(policy) {
        copy_into(&dir.join(file), &named)?;
    }
    opt.load(&dir.join("optimizer.safetensors"))?;
    Ok((state.step, state.rng, state.sampler))
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

/// Copies each named tensor of a safetensors file into `targets` (same names and shapes).
fn copy_into(path: &Path, targets: &[(String, Tensor)]) -> Result<()> {
    let saved: std::collections::HashMap<String, Tensor> = Tensor::read_safetensors(path)
        .map_err(|e| anyhow!("{}: cannot read: {e}", path.display()))?
        .into_iter()
        .collect();
    for (name, t) in targets {
        let src = saved
            .get(name)
            .ok_or_else(|| anyhow!("{}: tensor '{name}' is missing", path.display()))?;
        if src.size() != t.size() {
            bail!(
                "{}: tensor '{name}' has shape {:?}, expected {:?}",
                path.display(),
                src.size(),
                t.size()
            );
        }
        tch::no_grad(|| t.shallow_clone().f_copy_(src))
            .with_context(|| format!("{}: tensor '{name}'", path.display()))?;
    }
    Ok(())
}
