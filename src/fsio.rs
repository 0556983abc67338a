//! Files that survive a crash: whole files written under a temporary name,
//! synced and renamed into place (then the directory synced), and appended
//! lines that never stay half-written after an error. A kill at any moment
//! leaves either the old file or the new one, plus at worst a temporary
//! sibling that `remove_temp_files` clears.
use anyhow::{anyhow, Context, Result};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Marks the temporary siblings of `temp_sibling` (and nothing else).
const TEMP_MARK: &str = ".tmp-";

/// Writes `path` through a temporary file in the same directory, synced and
/// renamed into place once complete, so a reader never sees half a file and
/// a crash keeps the old one.
pub fn write_atomic(path: &Path, write: impl FnOnce(&mut File) -> Result<()>) -> Result<()> {
    let tmp = temp_sibling(path)?;
    let mut file = File::create(&tmp).with_context(|| {
        format!(
            "{}: cannot write (creating {})",
            path.display(),
            tmp.display()
        )
    })?;
    let written = write(&mut file).and_then(|()| Ok(file.sync_all()?));
    drop(file);
    let done = written.and_then(|()| {
        crate::faults::point("file.rename");
        std::fs::rename(&tmp, path)?;
        sync_dir(parent(path))
    });
    if done.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    done.with_context(|| format!("{}: cannot write", path.display()))
}

/// `dir/.name.tmp-PID-N.ext` beside `path` (its parent directories created),
/// unique per process and call; the extension is kept because some writers
/// pick the format from it.
pub fn temp_sibling(path: &Path) -> Result<PathBuf> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| anyhow!("{}: not a file path", path.display()))?;
    let dir = parent(path);
    std::fs::create_dir_all(dir)
        .with_context(|| format!("{}: cannot create the directory", dir.display()))?;
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map_or(String::new(), |e| format!(".{e}"));
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    Ok(dir.join(format!(".{name}{TEMP_MARK}{}-{n}{ext}", std::process::id())))
}

/// Whether `path` is a temporary sibling left by `write_atomic`.
pub fn is_temp(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with('.') && n.contains(TEMP_MARK))
}

/// Removes the temporary siblings a crash left in `dir` (not recursive).
pub fn remove_temp_files(dir: &Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for e in entries.flatten() {
        let p = e.path();
        if is_temp(&p) {
            std::fs::remove_file(&p).with_context(|| format!("{}: cannot remove", p.display()))?;
        }
    }
    Ok(())
}

/// The directory holding `path` ("." for a bare name).
fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// Makes a directory's entries (new, renamed, removed files) durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("{}: cannot sync the directory", dir.display()))
}

/// Makes a file another writer made durable.
pub fn sync_file(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("{}: cannot sync", path.display()))
}

/// Appends `line` and a newline to `path` (created if missing) and syncs it.
/// On an error (a full disk) the file is cut back to where it was, so it
/// never ends in half a line.
pub fn append_line(path: &Path, line: &str) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("{}: cannot open", path.display()))?;
    let before = f
        .metadata()
        .with_context(|| format!("{}: cannot stat", path.display()))?
        .len();
    let text = format!("{line}\n");
    let (head, tail) = text.as_bytes().split_at(text.len() / 2);
    let written = f
        .write_all(head)
        .map(|()| crate::faults::point("metrics.append"))
        .and_then(|()| f.write_all(tail))
        .and_then(|()| f.sync_data());
    if let Err(e) = written {
        let _ = f.set_len(before);
        return Err(e).with_context(|| format!("{}: cannot write", path.display()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_siblings_are_recognised_and_cleared() {
        let dir = std::env::temp_dir().join(format!("tarpo-fsio-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let target = dir.join("step-000001.parquet");
        let tmp = temp_sibling(&target).unwrap();
        std::fs::write(&tmp, b"half").unwrap();
        assert!(is_temp(&tmp) && !is_temp(&target));
        write_atomic(&target, |f| Ok(f.write_all(b"whole")?)).unwrap();
        append_line(&dir.join("m.jsonl"), "{\"a\": 1}").unwrap();
        remove_temp_files(&dir).unwrap();
        let mut left: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["m.jsonl", "step-000001.parquet"]);
        assert_eq!(std::fs::read(&target).unwrap(), b"whole");
        assert_eq!(
            std::fs::read_to_string(dir.join("m.jsonl")).unwrap(),
            "{\"a\": 1}\n"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
