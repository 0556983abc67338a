//! Frames as files: parquet and CSV, each written through a temporary
//! sibling renamed into place (`fsio`), so a reader never sees half a file.
use anyhow::{anyhow, bail, Context, Result};
use polars::prelude::*;
use std::fs::File;
use std::path::Path;

pub(crate) use crate::fsio::{temp_sibling, write_atomic};

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
