//! TensorBoard event files for a run's metric rows, so `tensorboard --logdir
//! runs/` shows each run's curves.
//!
//! Written by hand rather than through a protobuf crate: an events file is a
//! sequence of TFRecord records, each one serialized `Event` message, and the
//! three messages needed (Event, Summary, Summary.Value) take a few lines of
//! protobuf encoding. Layout of a record:
//! `u64 length (LE) | masked crc32c(length) | data | masked crc32c(data)`.
use anyhow::{Context, Result};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// Appends events to one `events.out.tfevents.*` file of a run directory.
pub struct EventWriter {
    path: PathBuf,
    file: File,
}

impl EventWriter {
    /// Opens `DIR/events.out.tfevents.{secs}.{host}.{pid}.tarpo` and writes
    /// the header event. A name already taken (same second, same process)
    /// is appended to instead: TensorBoard reads it the same.
    pub fn create(dir: &Path) -> Result<Self> {
        let path = dir.join(file_name());
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("{}: cannot open", path.display()))?;
        let len = file
            .metadata()
            .with_context(|| format!("{}: cannot stat", path.display()))?
            .len();
        let mut w = Self { path, file };
        if len == 0 {
            w.write_record(&header_event(wall_time()))?;
        }
        Ok(w)
    }

    /// One event at `step` with a scalar per (tag, value), stored as f32
    /// (TensorBoard's simple_value); NaN and infinities are kept.
    pub fn scalars(&mut self, step: i64, values: &[(String, f64)]) -> Result<()> {
        self.write_record(&scalars_event(wall_time(), step, values))
    }

    /// A SessionLog START at `step`: TensorBoard drops the events of earlier
    /// files at this step and later, which a resumed run logs again.
    pub fn restart(&mut self, step: i64) -> Result<()> {
        self.write_record(&restart_event(wall_time(), step))
    }

    /// Writes a whole record in one call, unbuffered, so a TensorBoard
    /// watching a live run never waits on a flush.
    fn write_record(&mut self, data: &[u8]) -> Result<()> {
        self.file
            .write_all(&record(data))
            .with_context(|| format!("{}: cannot write", self.path.display()))
    }
}

fn file_name() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!(
        "events.out.tfevents.{secs}.{}.{}.tarpo",
        hostname(),
        std::process::id()
    )
}

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty() && !s.contains('/'))
        .unwrap_or_else(|| "localhost".into())
}

fn wall_time() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

// --- TFRecord framing ---

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), as TFRecord uses.
pub fn crc32c(data: &[u8]) -> u32 {
    !data.iter().fold(!0u32, |crc, &b| {
        CRC_TABLE[((crc ^ b as u32) & 0xff) as usize] ^ (crc >> 8)
    })
}

static CRC_TABLE: [u32; 256] = crc_table();

const fn crc_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0x82F6_3B78
            } else {
                c >> 1
            };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
}

/// TFRecord stores CRCs rotated and offset, so that a CRC of data that
/// itself holds CRCs stays well distributed.
pub fn masked_crc32c(data: &[u8]) -> u32 {
    let crc = crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One TFRecord: length, its CRC, the data, its CRC.
pub fn record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc32c(data).to_le_bytes());
    out
}

// --- protobuf encoding of tensorflow.Event ---
//
// Event: 1 wall_time (double), 2 step (int64), 3 file_version (string),
// 5 summary (Summary). Summary: 1 value (repeated Value).
// Summary.Value: 1 tag (string), 2 simple_value (float).

const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LEN: u8 = 2;
const FIXED32: u8 = 5;

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn key(out: &mut Vec<u8>, field: u32, wire: u8) {
    varint(out, (field << 3 | wire as u32) as u64);
}

fn len_field(out: &mut Vec<u8>, field: u32, data: &[u8]) {
    key(out, field, LEN);
    varint(out, data.len() as u64);
    out.extend_from_slice(data);
}

/// The first event of every file: TensorBoard reads the format version here.
fn header_event(wall_time: f64) -> Vec<u8> {
    let mut ev = Vec::new();
    key(&mut ev, 1, FIXED64);
    ev.extend_from_slice(&wall_time.to_le_bytes());
    len_field(&mut ev, 3, b"brain.Event:2");
    ev
}

/// An Event holding one Summary.Value per (tag, value).
pub fn scalars_event(wall_time: f64, step: i64, values: &[(String, f64)]) -> Vec<u8> {
    let mut summary = Vec::new();
    for (tag, v) in values {
        let mut value = Vec::new();
        len_field(&mut value, 1, tag.as_bytes());
        key(&mut value, 2, FIXED32);
        value.extend_from_slice(&(*v as f32).to_le_bytes());
        len_field(&mut summary, 1, &value);
    }
    let mut ev = Vec::new();
    key(&mut ev, 1, FIXED64);
    ev.extend_from_slice(&wall_time.to_le_bytes());
    key(&mut ev, 2, VARINT);
    // Negative int64s are ten-byte varints of their two's complement.
    varint(&mut ev, step as u64);
    len_field(&mut ev, 5, &summary);
    ev
}

/// An Event holding a SessionLog { status: START } at `step`.
pub fn restart_event(wall_time: f64, step: i64) -> Vec<u8> {
    let mut ev = Vec::new();
    key(&mut ev, 1, FIXED64);
    ev.extend_from_slice(&wall_time.to_le_bytes());
    key(&mut ev, 2, VARINT);
    varint(&mut ev, step as u64);
    // session_log (field 7) = SessionLog { status (1): START (1) }
    len_field(&mut ev, 7, &[0x08, 0x01]);
    ev
}
