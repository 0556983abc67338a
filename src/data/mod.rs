//! Data sets the workbench makes or converts: the synthetic arithmetic task
//! and the benchmarks of `sources`, written as `{"prompt", "answer", ...}`
//! JSONL rows (what `rl::dataset` loads).
pub mod arith;
pub mod gsm_helpers;
pub mod gsm_symbolic;
pub mod pyexpr;
pub mod sources;

use anyhow::{Context, Result};
use serde::Serialize;
use std::io::Write;
use std::path::Path;

/// Writes `rows` as JSONL to `path` (parent directories created), atomically.
pub fn write_jsonl<T: Serialize>(path: &Path, rows: &[T]) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("{}: cannot create", dir.display()))?;
    }
    let tmp = path.with_extension(format!("jsonl.tmp{}", std::process::id()));
    let mut f = std::io::BufWriter::new(
        std::fs::File::create(&tmp).with_context(|| format!("{}: cannot write", tmp.display()))?,
    );
    for r in rows {
        serde_json::to_writer(&mut f, r)?;
        f.write_all(b"\n")?;
    }
    f.into_inner()
        .map_err(|e| e.into_error())
        .with_context(|| format!("{}: cannot write", tmp.display()))?
        .sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("{}: cannot write", path.display()))
}
