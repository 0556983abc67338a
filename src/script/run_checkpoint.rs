//! A run's checkpoints in scripts: `save_checkpoint` and `resume`, which
//! restores the newest intact checkpoint and rewinds the run's metrics and
//! token files to its step.
use super::bind_run::{RunHandle, RunState};
use super::types::*;
use crate::analysis::{frame, tensorboard};
use crate::rl::checkpoint;
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::cell::RefMut;
use std::io::Write;
use std::path::{Path, PathBuf};

/// `m`'s optimizer (checked: `what` names the caller), its parameter groups
/// brought up to what the policy has now (a router attached after it).
fn synced_optimizer<'a>(
    o: &'a OptimizerHandle,
    m: &Backbone,
    what: &str,
) -> Result<RefMut<'a, OptimizerState>> {
    let mut opt = o.0.borrow_mut();
    if !opt.backbone.same(m) {
        bail!("{what}: the optimizer belongs to another backbone");
    }
    super::bind_train::sync_params(&mut opt, &m.0.borrow().policy)?;
    Ok(opt)
}

/// Writes `RUN/checkpoints/step-N/` (adapter, router, gate, optimizer,
/// rollout seed generator, data cursor); returns its path.
pub(super) fn save_checkpoint(
    r: &RunHandle,
    m: &Backbone,
    o: &OptimizerHandle,
    d: Option<&DatasetHandle>,
) -> Result<String> {
    let opt = synced_optimizer(o, m, "save_checkpoint")?;
    let st = m.0.borrow();
    let sampler = d.map(|d| *d.sampler.borrow());
    let run = r.0.borrow();
    let taken = opt.adamw.step_count() + opt.adamw.skipped_steps();
    let parts = checkpoint::Parts {
        policy: &st.policy,
        opt: &opt.adamw,
        step: opt.adamw.step_count(),
        // A run that logs no rows counts its optimizer steps.
        run_step: if run.rows.is_empty() {
            taken
        } else {
            run.last_step()
        },
        rng: st.rng.state,
        sampler: sampler.as_ref(),
    };
    let w = crate::dist::world();
    let dir = if run.writer {
        checkpoint::save_parts(&parts, &run.dir)?
    } else {
        checkpoint::step_dir(&run.dir, taken)
    };
    if w.launched() {
        // Every rank returns once the checkpoint is complete on disk.
        w.barrier("save_checkpoint")?;
    }
    Ok(dir.display().to_string())
}

/// Restores the run's newest intact checkpoint (a damaged one is reported
/// by file and skipped) into a backbone, optimizer and data set built as
/// before, brings the run directory back to that step (metrics rows, token
/// and sample records of later steps and what a crash left half-written are
/// removed: they will be redone, identically), and returns the run's step
/// to continue from (0: none).
pub(super) fn resume(
    r: &RunHandle,
    m: &Backbone,
    o: &OptimizerHandle,
    d: Option<&DatasetHandle>,
) -> Result<i64> {
    let mut run = r.0.borrow_mut();
    if run.writer {
        checkpoint::clear_partial(&run.dir)?;
    }
    let (found, skipped) = checkpoint::newest_intact(&run.dir)?;
    for s in &skipped {
        eprintln!("warning: skipped a damaged checkpoint: {s}");
    }
    let step = match found {
        Some(dir) => {
            let step = restore(&dir, m, o, d)?;
            if run.writer {
                checkpoint::point_latest(&dir)?;
            }
            eprintln!("resumed from {} (step {step})", dir.display());
            step
        }
        None => 0,
    };
    let keep = |row: &serde_json::Map<String, Value>| {
        row.get("step")
            .and_then(Value::as_u64)
            .is_none_or(|s| s <= step)
    };
    run.rows.retain(keep);
    if run.writer {
        rewind_files(&run, step).with_context(|| {
            format!(
                "{}: cannot rewind the run to step {step}",
                run.dir.display()
            )
        })?;
        // A new events file that tells TensorBoard to forget the redone steps.
        let mut events = tensorboard::EventWriter::create(&run.dir)?;
        events.restart(step as i64 + 1)?;
        run.events = Some(events);
    }
    Ok(step as i64)
}

/// Loads checkpoint `dir` into the backbone, optimizer and data cursor;
/// returns its run step.
fn restore(
    dir: &Path,
    m: &Backbone,
    o: &OptimizerHandle,
    d: Option<&DatasetHandle>,
) -> Result<u64> {
    let mut opt = synced_optimizer(o, m, "resume")?;
    let mut st = m.0.borrow_mut();
    let got = checkpoint::load_parts(&st.policy, &mut opt.adamw, dir)?;
    st.rng.state = got.rng;
    match (d, got.sampler) {
        (Some(d), Some(s)) => *d.sampler.borrow_mut() = s,
        (Some(_), None) => bail!(
            "resume: {} has no data cursor (saved without the data set)",
            dir.display()
        ),
        _ => {}
    }
    Ok(got.run_step)
}

/// The run directory's files as they were at run step `step`: metrics.jsonl
/// and metrics.parquet hold the kept rows, token and sample records of
/// later steps are gone, and so are temporary files a crash left.
fn rewind_files(run: &RunState, step: u64) -> Result<()> {
    let text: String = run
        .rows
        .iter()
        .map(|row| serde_json::to_string(row).map(|l| l + "\n"))
        .collect::<Result<_, _>>()?;
    crate::fsio::remove_temp_files(&run.dir)?;
    frame::write_atomic(&run.dir.join("metrics.jsonl"), |f| {
        Ok(f.write_all(text.as_bytes())?)
    })?;
    let parquet = run.dir.join("metrics.parquet");
    if run.rows.is_empty() {
        if parquet.exists() {
            std::fs::remove_file(&parquet)
                .with_context(|| format!("{}: cannot remove", parquet.display()))?;
        }
    } else {
        frame::write_parquet(&mut frame::frame_from_rows(&run.rows)?, &parquet)?;
    }
    for kind in ["tokens", "samples"] {
        let dir = run.dir.join(kind);
        crate::fsio::remove_temp_files(&dir)?;
        for (n, path) in step_files(&dir) {
            if n > step {
                std::fs::remove_file(&path)
                    .with_context(|| format!("{}: cannot remove", path.display()))?;
            }
        }
    }
    Ok(())
}

/// The `step-N.parquet` files of a records directory, with their N.
fn step_files(dir: &Path) -> Vec<(u64, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let n = name
                .strip_prefix("step-")?
                .strip_suffix(".parquet")?
                .parse()
                .ok()?;
            Some((n, e.path()))
        })
        .collect()
}
