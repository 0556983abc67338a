//! Frames as files: parquet and CSV, each written through a temporary
//! sibling renamed into place, so a reader never sees half a file.
use anyhow::{anyhow, bail, Context, Result};
use polars::prelude::*;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Writes `path` through a temporary file in the same directory, renamed into
/// place once complete, so a reader never sees a half-written file.
pub(crate) fn write_atomic(path: &Path, write: impl FnOnce(&mut File) -> Result<()>) -> Result<()> {
    let tmp = temp_sibling(path)?;
    let mut file =
        File::create(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
    let written = write(&mut file).and_then(|()| Ok(file.sync_all()?));
    drop(file);
    let done = written.and_then(|()| Ok(std::fs::rename(&tmp, path)?));
    if done.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    done.with_context(|| format!("{}: cannot write", path.display()))
}

/// `dir/.name.tmp-PID-N.ext` beside `path` (its parent directories created),
/// unique per process and call; the extension is kept because some writers
/// pick the format from it.
pub(crate) fn temp_sibling(path: &Path) -> Result<PathBuf> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| anyhow!("{}: not a file path", path.display()))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir)
        .with_context(|| format!("{}: cannot create the directory", dir.display()))?;
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map_or(String::new(), |e| format!(".{e}"));
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    Ok(dir.join(format!(".{name}.tmp-{}-{n}{ext}", std::process::id())))
}

pub fn write_parquet(df: &mut DataFrame, path: &Path) -> Result<()> {
    write_atomic(path, |f| {
        ParquetWriter::new(f).finish(df)?;
        Ok(())
    })
}

pub fn read_parquet(path: &Path) -> Result<DataFrame> {
    let file = File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    ParquetReader::new(file)
        .finish()
        .map_err(|e| anyhow!("{}: cannot read as parquet: {e}", path.display()))
}

/// CSV with a header row; nulls are empty fields.
pub fn write_csv(df: &mut DataFrame, path: &Path) -> Result<()> {
    write_atomic(path, |f| {
        CsvWriter::new(f).include_header(true).finish(df)?;
        Ok(())
    })
}

/// CSV with a header row. Column types are inferred from every row (not the
/// first 100, Polars' default), so a float late in an integer column is kept.
pub fn read_csv(path: &Path) -> Result<DataFrame> {
    if !path.is_file() {
        bail!("{}: no such file", path.display());
    }
    CsvReadOptions::default()
        .with_has_header(true)
        .with_infer_schema_length(None)
        .try_into_reader_with_file_path(Some(path.into()))
        .and_then(|r| r.finish())
        .map_err(|e| anyhow!("{}: cannot read as CSV: {e}", path.display()))
}
