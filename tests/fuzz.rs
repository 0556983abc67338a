//! Property-based mutation fuzzing of every parser of user data: config.json,
//! safetensors checkpoints and their shard index, tokenizer.json, data set
//! JSONL, optimizer state files, PEFT adapters (config and weights) and the
//! option maps of Rhai scripts.
//!
//! Each target starts from valid inputs (the tiny fixture models, a saved
//! AdamW state, a saved adapter, option maps built from the primitives'
//! tables) plus every file under `tests/fuzz_corpus/<target>/` (regressions
//! and extra seeds, replayed first), and runs seeded mutations of them:
//! byte flips, inserted/deleted bytes, truncation, duplicated chunks, splices
//! of two inputs, and structure-aware edits of JSON (values of another type,
//! extreme numbers, long strings, deep nesting, deleted or duplicated keys,
//! empty containers) and of safetensors files (the header length, dtypes,
//! shapes whose element count overflows, overlapping or out-of-range
//! offsets). Every execution must not panic, and every rejection must be one
//! line (`{e:#}`) naming the file (for option maps: the primitive) and the
//! place (key, line, byte offset or tensor name).
//!
//! A failing input is written to `tests/fuzz_corpus/<target>/crash-<hash>.<ext>`
//! (a panic) or `msg-<hash>.<ext>` (a bad message), and the test fails. A
//! process abort (libtorch) cannot be caught: the input being run is always
//! in the target's scratch file, and the next run files it as a crasher.
//!
//! `TARPO_FUZZ_EXECS` (mutated executions per target, default 2000),
//! `TARPO_FUZZ_SEED` (default 1) and `TARPO_FUZZ_TARGETS` (comma-separated
//! names, default all) set the campaign, e.g.
//! `TARPO_FUZZ_EXECS=20000 TARPO_FUZZ_SEED=7 cargo test --release --test fuzz -- --nocapture`.
mod common;
use serde_json::{json, Map as JMap, Value};
use std::cell::{Cell, RefCell};
use std::collections::BTreeSet;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tarpo::model::lora::{ADAPTER_CONFIG, ADAPTER_WEIGHTS};
use tarpo::model::{Llama, LoraConfig, Model, ModelConfig, Step, Tokenizer, Weights};
use tarpo::rl::dataset::Dataset;
use tarpo::rl::optim::{AdamW, AdamWConfig, ParamGroup, Schedule, ScheduleKind};
use tarpo::script::opts::{Def, Opts, Ty};
use tch::{Device, Kind, Tensor};

const DEFAULT_EXECS: usize = 2000;
const DEFAULT_SEED: u64 = 1;
/// An execution slower than this is a failure (inputs are capped to keep
/// one execution in milliseconds).
const SLOW: Duration = Duration::from_secs(5);
/// Longest accepted error message (values echoed in it are shortened).
const MAX_MESSAGE: usize = 1500;

// ---------------------------------------------------------------- harness

/// SplitMix64: small, seeded, reproducible.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed)
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

fn fnv(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
    }
    h
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
        Err(_) => default,
    }
}

thread_local! {
    static FUZZING: Cell<bool> = const { Cell::new(false) };
    static LAST_PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// While a thread fuzzes, panics in it are recorded instead of printed; other
/// threads (and this one afterwards) keep the previous hook.
fn install_quiet_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if FUZZING.with(Cell::get) {
                LAST_PANIC.with(|p| *p.borrow_mut() = Some(info.to_string()));
            } else {
                previous(info);
            }
        }));
    });
}

/// How the structure-aware mutations see a target's input.
#[derive(Clone, Copy, PartialEq)]
enum Format {
    Json,
    Jsonl,
    Safetensors,
    /// Safetensors whose `__metadata__` holds JSON (the optimizer state).
    SafetensorsMeta,
    Rhai,
}

/// What one execution gave: accepted, or the error messages to check.
/// `Skip` is an input the target does not apply to (a Rhai text that is not
/// an option map).
enum Outcome {
    Accepted,
    Rejected(Vec<String>),
    /// Accepted by some of the parsers an input goes through (an option map
    /// by one primitive), rejected by others with these messages.
    Partly(Vec<String>),
    Skip,
}

struct Target {
    name: &'static str,
    ext: &'static str,
    format: Format,
    max_len: usize,
    /// Where each input is written before it is parsed.
    input: PathBuf,
    /// A rejection must name one of these (file paths, or primitives).
    names: Vec<String>,
    /// ... and contain one of these (the place).
    places: Vec<&'static str>,
    seeds: Vec<Vec<u8>>,
    run: Parser,
}

/// A target's parser under test: the input's bytes to what it made of them.
type Parser = Box<dyn FnMut(&[u8]) -> Outcome>;

fn corpus_dir(target: &str) -> PathBuf {
    common::root().join("tests/fuzz_corpus").join(target)
}

fn corpus_files(target: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(corpus_dir(target))
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    files.retain(|p| p.is_file());
    files.sort();
    files
}

/// The first property a message breaks, if any.
fn bad_message(t: &Target, msg: &str) -> Option<String> {
    if msg.contains('\n') || msg.contains('\r') {
        return Some("the error is not one line".into());
    }
    if !t.names.iter().any(|n| msg.contains(n.as_str())) {
        return Some(format!("the error names none of {:?}", t.names));
    }
    if !t.places.iter().any(|p| msg.contains(p)) {
        return Some(format!(
            "the error names no place (none of {:?} in it)",
            t.places
        ));
    }
    if msg.chars().count() > MAX_MESSAGE + t.names.iter().map(|n| n.len()).sum::<usize>() {
        return Some(format!(
            "the error is {} characters long",
            msg.chars().count()
        ));
    }
    None
}

struct Failure {
    what: String,
    file: PathBuf,
}

struct Stats {
    execs: usize,
    replayed: usize,
    rejected: usize,
    accepted: usize,
    skipped: usize,
    failures: Vec<Failure>,
}

fn short(s: &str) -> String {
    let mut out: String = s.chars().take(600).collect();
    if out.len() < s.len() {
        out += "...";
    }
    out
}

enum Got {
    Partly,
    Other,
}

/// Runs one input; `Err` describes a property it breaks.
fn exec(t: &mut Target, input: &[u8], stats: &mut Stats) -> Result<bool, (String, &'static str)> {
    LAST_PANIC.with(|p| p.borrow_mut().take());
    let start = Instant::now();
    // Quiet only while the parser runs: a panic of the harness itself shows.
    FUZZING.with(|f| f.set(true));
    let result = panic::catch_unwind(AssertUnwindSafe(|| (t.run)(input)));
    FUZZING.with(|f| f.set(false));
    let took = start.elapsed();
    let outcome = match result {
        Ok(o) => o,
        Err(payload) => {
            let msg = LAST_PANIC
                .with(|p| p.borrow_mut().take())
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".into());
            return Err((format!("panic: {msg}"), "crash"));
        }
    };
    if took > SLOW {
        return Err((format!("one execution took {took:?}"), "slow"));
    }
    let outcome_kind = match &outcome {
        Outcome::Partly(_) => Got::Partly,
        _ => Got::Other,
    };
    match outcome {
        Outcome::Accepted => {
            stats.accepted += 1;
            Ok(true)
        }
        Outcome::Skip => {
            stats.skipped += 1;
            Ok(false)
        }
        Outcome::Rejected(msgs) | Outcome::Partly(msgs) => {
            let partly = matches!(outcome_kind, Got::Partly);
            if partly {
                stats.accepted += 1;
            } else {
                stats.rejected += 1;
            }
            for m in &msgs {
                if let Some(why) = bad_message(t, m) {
                    return Err((format!("{why}: {}", short(m)), "msg"));
                }
            }
            Ok(partly)
        }
    }
}

/// The part of a failure that must stay the same while shrinking: its kind
/// and the start of its description (not the numbers in it).
fn same_failure(a: &str, b: &str) -> bool {
    let key = |s: &str| -> String { s.chars().take(40).filter(|c| !c.is_ascii_digit()).collect() };
    key(a) == key(b)
}

/// A smaller input failing the same way: chunks removed, largest first
/// (a crasher kept in the corpus should not be a copy of a whole checkpoint).
fn shrink(t: &mut Target, input: &[u8], kind: &str, what: &str) -> Vec<u8> {
    let mut best = input.to_vec();
    let mut scratch = Stats {
        execs: 0,
        replayed: 0,
        rejected: 0,
        accepted: 0,
        skipped: 0,
        failures: Vec::new(),
    };
    let mut budget = 1500;
    let mut chunk = best.len() / 2;
    while chunk >= 1 && budget > 0 {
        let mut at = 0;
        while at < best.len() && budget > 0 {
            let end = (at + chunk).min(best.len());
            let mut candidate = best[..at].to_vec();
            candidate.extend_from_slice(&best[end..]);
            budget -= 1;
            match exec(t, &candidate, &mut scratch) {
                Err((w, k)) if k == kind && same_failure(&w, what) => best = candidate,
                _ => at += chunk,
            }
        }
        chunk /= 2;
    }
    best
}

/// What an input does, for minimizing corpus files: accepted, skipped,
/// panicked, or its first message without the file names and numbers.
fn signature(t: &mut Target, input: &[u8]) -> String {
    FUZZING.with(|f| f.set(true));
    let result = panic::catch_unwind(AssertUnwindSafe(|| (t.run)(input)));
    FUZZING.with(|f| f.set(false));
    match result {
        Err(_) => "panic".into(),
        Ok(Outcome::Accepted) => "accepted".into(),
        Ok(Outcome::Skip) => "skip".into(),
        Ok(Outcome::Rejected(m)) | Ok(Outcome::Partly(m)) => {
            let mut first = m.first().cloned().unwrap_or_default();
            for n in &t.names {
                first = first.replace(n.as_str(), "");
            }
            first
                .chars()
                .filter(|c| !c.is_ascii_digit())
                .take(60)
                .collect()
        }
    }
}

/// `TARPO_FUZZ_MINIMIZE=1`: corpus files over 8 KiB are cut down to inputs
/// that do the same (same signature), and renamed by their new hash.
fn minimize_corpus(t: &mut Target) {
    for file in corpus_files(t.name) {
        let input = std::fs::read(&file).unwrap();
        if input.len() <= 8 << 10 {
            continue;
        }
        let want = signature(t, &input);
        let mut best = input.clone();
        let mut budget = 3000;
        let mut chunk = best.len() / 2;
        while chunk >= 1 && budget > 0 {
            let mut at = 0;
            while at < best.len() && budget > 0 {
                let end = (at + chunk).min(best.len());
                let mut candidate = best[..at].to_vec();
                candidate.extend_from_slice(&best[end..]);
                budget -= 1;
                if signature(t, &candidate) == want {
                    best = candidate;
                } else {
                    at += chunk;
                }
            }
            chunk /= 2;
        }
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let prefix = name.split('-').next().unwrap_or("crash").to_string();
        std::fs::remove_file(&file).unwrap();
        let new = save_failure(t, &prefix, &best);
        println!(
            "minimized {} ({} bytes) -> {} ({} bytes): {want}",
            file.display(),
            input.len(),
            new.display(),
            best.len()
        );
    }
}

/// Marks a target as running: if the process dies mid-execution (an abort in
/// C++), the next run finds the marker and files the last input.
fn marker(t: &Target) -> PathBuf {
    common::scratch("fuzz").join(format!("{}.running", t.name))
}

fn save_failure(t: &Target, kind: &str, input: &[u8]) -> PathBuf {
    let dir = corpus_dir(t.name);
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join(format!("{kind}-{:016x}.{}", fnv(input), t.ext));
    std::fs::write(&file, input).unwrap();
    file
}

fn fuzz(mut t: Target) {
    if let Ok(only) = std::env::var("TARPO_FUZZ_TARGETS") {
        if !only.split(',').any(|n| n.trim() == t.name) {
            return;
        }
    }
    let execs: usize = env_or("TARPO_FUZZ_EXECS", DEFAULT_EXECS);
    let seed: u64 = env_or("TARPO_FUZZ_SEED", DEFAULT_SEED);
    let started = Instant::now();
    let mut stats = Stats {
        execs: 0,
        replayed: 0,
        rejected: 0,
        accepted: 0,
        skipped: 0,
        failures: Vec::new(),
    };
    let mark = marker(&t);
    if mark.exists() {
        if let Ok(input) = std::fs::read(&t.input) {
            let file = save_failure(&t, "crash", &input);
            stats.failures.push(Failure {
                what: "the previous run died (abort?) while running this input".into(),
                file,
            });
        }
    }
    std::fs::write(&mark, t.input.display().to_string()).unwrap();

    install_quiet_hook();
    if std::env::var("TARPO_FUZZ_MINIMIZE").is_ok_and(|v| v == "1") {
        minimize_corpus(&mut t);
    }
    // Regressions first, then the seeds themselves.
    let mut pool: Vec<Vec<u8>> = Vec::new();
    let mut known = BTreeSet::new();
    for file in corpus_files(t.name) {
        let input = std::fs::read(&file).unwrap();
        stats.replayed += 1;
        if let Err((what, _)) = exec(&mut t, &input, &mut stats) {
            stats.failures.push(Failure { what, file });
        }
        known.insert(fnv(&input));
        pool.push(input);
    }
    let seeds = std::mem::take(&mut t.seeds);
    for input in seeds {
        stats.replayed += 1;
        if let Err((what, kind)) = exec(&mut t, &input, &mut stats) {
            let file = save_failure(&t, kind, &input);
            stats.failures.push(Failure { what, file });
        }
        pool.push(input);
    }
    let base = pool.len();
    let mut rng = Rng::new(seed ^ fnv(t.name.as_bytes()));
    let mut input = Vec::new();
    for _ in 0..execs {
        mutate(&mut rng, &pool, t.format, t.max_len, &mut input);
        stats.execs += 1;
        match exec(&mut t, &input, &mut stats) {
            Ok(accepted) => {
                // Accepted mutants become parents: deeper structure survives.
                if accepted && !known.contains(&fnv(&input)) {
                    known.insert(fnv(&input));
                    if pool.len() < base + 64 {
                        pool.push(input.clone());
                    } else {
                        let i = base + rng.below(64);
                        pool[i] = input.clone();
                    }
                }
            }
            Err((what, kind)) => {
                let h = fnv(&input);
                if known.insert(h) {
                    let small = shrink(&mut t, &input, kind, &what);
                    let file = save_failure(&t, kind, &small);
                    stats.failures.push(Failure { what, file });
                }
                if stats.failures.len() >= 20 {
                    break;
                }
            }
        }
    }
    let _ = std::fs::remove_file(&mark);
    println!(
        "fuzz {:<16} seed {seed}: {} executions (+{} replayed), rejected {}, accepted {}, skipped {}, crashers {}, {:.1} s",
        t.name,
        stats.execs,
        stats.replayed,
        stats.rejected,
        stats.accepted,
        stats.skipped,
        stats.failures.len(),
        started.elapsed().as_secs_f64()
    );
    if !stats.failures.is_empty() {
        let list: Vec<String> = stats
            .failures
            .iter()
            .map(|f| {
                format!(
                    "  {}\n    {}",
                    f.file.display(),
                    f.what.chars().take(300).collect::<String>()
                )
            })
            .collect();
        panic!(
            "fuzz {}: {} failing inputs (kept in the corpus):\n{}",
            t.name,
            stats.failures.len(),
            list.join("\n")
        );
    }
}

// ---------------------------------------------------------------- mutations

const INTERESTING_BYTES: &[u8] = &[
    0, 1, 0x7f, 0x80, 0xff, 0xfe, 0xc0, 0xed, b'"', b'\\', b'{', b'}', b'[', b']', b',', b':',
    b'\n', b'\r', b' ', b'0', b'9', b'-', b'e', b'.', b'#',
];

fn mutate(rng: &mut Rng, pool: &[Vec<u8>], format: Format, max_len: usize, out: &mut Vec<u8>) {
    out.clear();
    let parent: &Vec<u8> = rng.pick(pool);
    out.extend_from_slice(parent);
    let rounds = 1 + rng.below(3);
    for _ in 0..rounds {
        let r = rng.below(100);
        if r < 10 {
            let other = rng.pick(pool).clone();
            splice(rng, out, &other);
        } else if r < 55 {
            let done = match format {
                Format::Json => mutate_json_text(rng, out),
                Format::Jsonl => mutate_jsonl(rng, out),
                Format::Safetensors => mutate_safetensors(rng, out, false),
                Format::SafetensorsMeta => mutate_safetensors(rng, out, true),
                Format::Rhai => {
                    *out = random_rhai_map(rng).into_bytes();
                    true
                }
            };
            if !done {
                mutate_bytes(rng, out, format);
            }
        } else {
            mutate_bytes(rng, out, format);
        }
    }
    out.truncate(max_len);
}

/// A prefix of one input and a suffix of another.
fn splice(rng: &mut Rng, a: &mut Vec<u8>, b: &[u8]) {
    let i = rng.below(a.len() + 1);
    let j = rng.below(b.len() + 1);
    a.truncate(i);
    a.extend_from_slice(&b[j..]);
}

/// Where byte edits land: mostly in a safetensors header (the data section
/// is just numbers).
fn position(rng: &mut Rng, data: &[u8], format: Format) -> usize {
    if matches!(format, Format::Safetensors | Format::SafetensorsMeta)
        && data.len() > 8
        && rng.chance(80)
    {
        let n = u64::from_le_bytes(data[..8].try_into().unwrap());
        let end = (n as usize).saturating_add(8).min(data.len());
        return rng.below(end + 1).min(data.len());
    }
    rng.below(data.len() + 1)
}

fn mutate_bytes(rng: &mut Rng, d: &mut Vec<u8>, format: Format) {
    let n = d.len();
    match rng.below(9) {
        0 if n > 0 => {
            let i = position(rng, d, format).min(n - 1);
            d[i] ^= 1 << rng.below(8);
        }
        1 if n > 0 => {
            let i = position(rng, d, format).min(n - 1);
            d[i] = *rng.pick(INTERESTING_BYTES);
        }
        2 => {
            let i = position(rng, d, format);
            let k = 1 + rng.below(16);
            let bytes: Vec<u8> = (0..k)
                .map(|_| {
                    if rng.chance(50) {
                        *rng.pick(INTERESTING_BYTES)
                    } else {
                        rng.next() as u8
                    }
                })
                .collect();
            d.splice(i..i, bytes);
        }
        3 if n > 0 => {
            let i = position(rng, d, format).min(n - 1);
            let k = (1 + rng.below(32)).min(n - i);
            d.drain(i..i + k);
        }
        4 => {
            let i = position(rng, d, format);
            d.truncate(i);
        }
        5 if n > 0 => {
            // Duplicate a chunk somewhere else.
            let i = rng.below(n);
            let k = (1 + rng.below(64)).min(n - i);
            let chunk = d[i..i + k].to_vec();
            let at = position(rng, d, format);
            d.splice(at..at, chunk);
        }
        6 => replace_number(rng, d),
        7 if n > 0 => {
            // Overwrite a run with one byte.
            let i = position(rng, d, format).min(n - 1);
            let k = (1 + rng.below(8)).min(n - i);
            let b = *rng.pick(INTERESTING_BYTES);
            d[i..i + k].fill(b);
        }
        _ => {
            if n > 0 {
                let i = position(rng, d, format).min(n - 1);
                d[i] = d[i].wrapping_add(1 + rng.below(3) as u8);
            }
        }
    }
}

const NUMBER_TEXTS: &[&str] = &[
    "0",
    "-1",
    "1e400",
    "-1e400",
    "99999999999999999999999",
    "-9223372036854775809",
    "18446744073709551616",
    "9223372036854775807",
    "4294967296",
    "0.5",
    "-0",
    "1e-400",
    "NaN",
    "Infinity",
    "0x10",
    "1.",
    ".5",
    "01",
];

/// Replaces a run of digits with an extreme number text.
fn replace_number(rng: &mut Rng, d: &mut Vec<u8>) {
    let digits: Vec<usize> = (0..d.len()).filter(|&i| d[i].is_ascii_digit()).collect();
    if digits.is_empty() {
        return;
    }
    let start = *rng.pick(&digits);
    let mut end = start;
    while end < d.len() && (d[end].is_ascii_digit() || d[end] == b'.') {
        end += 1;
    }
    let text = rng.pick(NUMBER_TEXTS).as_bytes().to_vec();
    d.splice(start..end, text);
}

fn interesting_number(rng: &mut Rng) -> Value {
    match rng.below(22) {
        0 => json!(0),
        1 => json!(-1),
        2 => json!(1),
        3 => json!(2),
        4 => json!(i64::MAX),
        5 => json!(i64::MIN),
        6 => json!(u64::MAX),
        7 => json!(1u64 << 63),
        8 => json!(1u64 << 32),
        9 => json!(65537),
        10 => json!(0.5),
        11 => json!(-0.0),
        12 => json!(1e300),
        13 => json!(-1e300),
        14 => json!(1e-320),
        15 => json!(3.0),
        16 => json!(1e19),
        17 => json!(-7),
        18 => json!(7),
        19 => json!(1e9),
        20 => json!(2147483648u64),
        _ => json!(rng.next() as i64 >> rng.below(64)),
    }
}

fn interesting_string(rng: &mut Rng, dict: &[String]) -> String {
    match rng.below(16) {
        0 => String::new(),
        1 => "NaN".into(),
        2 => "-Infinity".into(),
        3 => "1e999".into(),
        4 => "a\nb\r\nc".into(),
        5 => "\u{0}\u{1b}[31m\u{202e}".into(),
        6 => "é🙂\u{fffd}".into(),
        7 => "x".repeat(1 + rng.below(70_000)),
        8 => "../../../etc/passwd".into(),
        9 => "/dev/null".into(),
        10 => ".".into(),
        11 => "\"quoted'\\".into(),
        12 => "12".into(),
        13 | 14 if !dict.is_empty() => rng.pick(dict).clone(),
        _ => {
            let k = 1 + rng.below(12);
            (0..k)
                .map(|_| (b'a' + rng.below(26) as u8) as char)
                .collect()
        }
    }
}

fn random_value(rng: &mut Rng, dict: &[String], depth: usize) -> Value {
    match rng.below(if depth > 2 { 5 } else { 8 }) {
        0 => Value::Null,
        1 => Value::Bool(rng.chance(50)),
        2 | 3 => interesting_number(rng),
        4 => Value::String(interesting_string(rng, dict)),
        5 => Value::Array(
            (0..rng.below(4))
                .map(|_| random_value(rng, dict, depth + 1))
                .collect(),
        ),
        6 if rng.chance(20) => json!((0..rng.below(5000) as i64).collect::<Vec<_>>()),
        _ => Value::Object(
            (0..rng.below(4))
                .map(|_| {
                    (
                        interesting_string(rng, dict),
                        random_value(rng, dict, depth + 1),
                    )
                })
                .collect(),
        ),
    }
}

/// JSON pointers of every node.
fn pointers(v: &Value, at: String, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, c) in m {
                pointers(
                    c,
                    format!("{at}/{}", k.replace('~', "~0").replace('/', "~1")),
                    out,
                );
            }
        }
        Value::Array(a) => {
            for (i, c) in a.iter().enumerate() {
                pointers(c, format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
    out.push(at);
}

fn keys(v: &Value, out: &mut BTreeSet<String>) {
    match v {
        Value::Object(m) => {
            for (k, c) in m {
                out.insert(k.clone());
                keys(c, out);
            }
        }
        Value::Array(a) => a.iter().for_each(|c| keys(c, out)),
        _ => {}
    }
}

/// A misspelling of a key.
fn typo(rng: &mut Rng, k: &str) -> String {
    let mut c: Vec<char> = k.chars().collect();
    if c.is_empty() {
        return "x".into();
    }
    let i = rng.below(c.len());
    match rng.below(3) {
        0 => {
            c.remove(i);
        }
        1 => c.insert(i, 'x'),
        _ => {
            let j = (i + 1).min(c.len() - 1);
            c.swap(i, j)
        }
    }
    c.into_iter().collect()
}

/// One structure-aware edit of a JSON value. Returns the index (pre-order)
/// of an object to write with a duplicated key, if that was the edit.
fn mutate_value(rng: &mut Rng, root: &mut Value) -> Option<usize> {
    let mut dict = BTreeSet::new();
    keys(root, &mut dict);
    let mut dict: Vec<String> = dict.into_iter().collect();
    if dict.is_empty() {
        dict.push("weight_map".into());
    }
    let mut ptrs = Vec::new();
    pointers(root, String::new(), &mut ptrs);
    let ptr = rng.pick(&ptrs).clone();
    let node = root.pointer_mut(&ptr)?;
    match rng.below(12) {
        0 | 1 => *node = random_value(rng, &dict, 0),
        2 | 3 => *node = interesting_number(rng),
        4 => *node = Value::String(interesting_string(rng, &dict)),
        5 => {
            // Deep nesting around the node.
            let depth = 1 + rng.below(300);
            let mut v = node.take();
            for i in 0..depth {
                v = if i % 2 == 0 {
                    Value::Array(vec![v])
                } else {
                    json!({ "k": v })
                };
            }
            *node = v;
        }
        6 => match node {
            Value::Object(m) if !m.is_empty() => {
                let k = m.keys().nth(rng.below(m.len())).unwrap().clone();
                m.remove(&k);
            }
            Value::Array(a) if !a.is_empty() => {
                a.remove(rng.below(a.len()));
            }
            _ => *node = Value::Null,
        },
        7 => match node {
            Value::Object(m) => m.clear(),
            Value::Array(a) => a.clear(),
            _ => *node = json!([]),
        },
        8 => match node {
            Value::Object(m) if !m.is_empty() => {
                // Rename a key (a typo, or another key of the file).
                let k = m.keys().nth(rng.below(m.len())).unwrap().clone();
                let v = m.remove(&k).unwrap();
                let nk = if rng.chance(50) {
                    typo(rng, &k)
                } else {
                    rng.pick(&dict).clone()
                };
                m.insert(nk, v);
            }
            Value::Array(a) if !a.is_empty() => {
                let i = rng.below(a.len());
                let v = a[i].clone();
                a.insert(rng.below(a.len() + 1), v);
            }
            _ => *node = json!({}),
        },
        9 => match node {
            Value::Object(m) => {
                let k = rng.pick(&dict).clone();
                let v = random_value(rng, &dict, 1);
                m.insert(k, v);
            }
            Value::Array(a) => {
                let v = random_value(rng, &dict, 1);
                a.push(v);
            }
            _ => *node = Value::Bool(true),
        },
        10 => {
            // Another node's value here.
            let other = rng.pick(&ptrs).clone();
            let v = root.pointer(&other).cloned().unwrap_or(Value::Null);
            if let Some(n) = root.pointer_mut(&ptr) {
                *n = v;
            }
        }
        _ => {
            let mut objects = 0;
            count_objects(root, &mut objects);
            if objects > 0 {
                return Some(rng.below(objects));
            }
        }
    }
    None
}

fn count_objects(v: &Value, n: &mut usize) {
    match v {
        Value::Object(m) => {
            *n += 1;
            m.values().for_each(|c| count_objects(c, n));
        }
        Value::Array(a) => a.iter().for_each(|c| count_objects(c, n)),
        _ => {}
    }
}

/// Compact JSON; the object numbered `dup` (pre-order) gets its first key twice.
fn write_json(v: &Value, dup: Option<usize>, counter: &mut usize, out: &mut String) {
    match v {
        Value::Object(m) => {
            let me = *counter;
            *counter += 1;
            out.push('{');
            let mut first = true;
            for (k, c) in m {
                if !first {
                    out.push(',');
                }
                first = false;
                out.push_str(&serde_json::to_string(k).unwrap());
                out.push(':');
                write_json(c, dup, counter, out);
            }
            if dup == Some(me) {
                if let Some((k, _)) = m.iter().next() {
                    out.push(',');
                    out.push_str(&serde_json::to_string(k).unwrap());
                    out.push_str(":\"duplicate\"");
                }
            }
            out.push('}');
        }
        Value::Array(a) => {
            out.push('[');
            for (i, c) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_json(c, dup, counter, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

fn json_text(rng: &mut Rng, v: &Value, dup: Option<usize>) -> String {
    if dup.is_none() && rng.chance(30) {
        return serde_json::to_string_pretty(v).unwrap();
    }
    let mut s = String::new();
    write_json(v, dup, &mut 0, &mut s);
    s
}

fn mutate_json_text(rng: &mut Rng, d: &mut Vec<u8>) -> bool {
    let Ok(mut v) = serde_json::from_slice::<Value>(d) else {
        return false;
    };
    let dup = mutate_value(rng, &mut v);
    *d = json_text(rng, &v, dup).into_bytes();
    true
}

fn mutate_jsonl(rng: &mut Rng, d: &mut Vec<u8>) -> bool {
    let text = String::from_utf8_lossy(d).into_owned();
    let mut lines: Vec<String> = text.split('\n').map(str::to_string).collect();
    let i = rng.below(lines.len());
    match rng.below(8) {
        0..=3 => {
            let Ok(mut v) = serde_json::from_str::<Value>(&lines[i]) else {
                return false;
            };
            let dup = mutate_value(rng, &mut v);
            lines[i] = json_text(rng, &v, dup).replace('\n', " ");
        }
        4 => lines.insert(
            i,
            rng.pick(&["", "  ", "\t", "\r", "null", "[]", "\"s\"", "{}", "1"])
                .to_string(),
        ),
        5 => {
            let l = lines[i].clone();
            lines.insert(i, l);
        }
        6 => {
            // CRLF endings, or a byte-order mark.
            if rng.chance(50) {
                return {
                    *d = lines.join("\r\n").into_bytes();
                    true
                };
            }
            lines[0].insert(0, '\u{feff}');
        }
        _ => {
            lines.remove(i);
        }
    }
    *d = lines.join("\n").into_bytes();
    true
}

/// A safetensors file's JSON header and data section.
fn st_split(b: &[u8]) -> Option<(JMap<String, Value>, Vec<u8>)> {
    let n = usize::try_from(u64::from_le_bytes(b.get(..8)?.try_into().ok()?)).ok()?;
    let end = n.checked_add(8)?;
    let v: Value = serde_json::from_slice(b.get(8..end)?).ok()?;
    Some((v.as_object()?.clone(), b[end..].to_vec()))
}

fn st_join(header: &str, data: &[u8]) -> Vec<u8> {
    let mut h = header.as_bytes().to_vec();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(data);
    out
}

const DTYPES: &[&str] = &[
    "F32", "F16", "BF16", "F64", "I64", "I32", "I16", "I8", "U8", "BOOL", "U16", "U32", "U64",
    "F8_E4M3", "F8_E5M2", "F6_E2M3", "F4", "E8M0", "C64", "XX", "",
];

fn interesting_shape(rng: &mut Rng, shape: &[Value]) -> Value {
    match rng.below(14) {
        0 => json!([]),
        1 => json!([0]),
        2 => json!([1u64 << 32, 1u64 << 32]),
        3 => json!([u64::MAX]),
        4 => json!([1u64 << 63]),
        5 => json!([1u64 << 63, 0]),
        6 => json!([-1]),
        7 => json!([1.5]),
        8 => json!(["a"]),
        9 => json!([1u64 << 21, 1u64 << 21, 1u64 << 21]),
        10 => json!([(1u64 << 62) + 1, 4]),
        11 => {
            let mut s = shape.to_vec();
            s.reverse();
            Value::Array(s)
        }
        12 => {
            let mut s = shape.to_vec();
            s.push(json!(1));
            Value::Array(s)
        }
        _ => {
            let mut s = shape.to_vec();
            if !s.is_empty() {
                let i = rng.below(s.len());
                s[i] = json!(s[i].as_u64().unwrap_or(1) + 1);
            }
            Value::Array(s)
        }
    }
}

fn mutate_safetensors(rng: &mut Rng, d: &mut Vec<u8>, meta_json: bool) -> bool {
    let Some((mut header, mut data)) = st_split(d) else {
        return false;
    };
    let names: Vec<String> = header
        .keys()
        .filter(|k| *k != "__metadata__")
        .cloned()
        .collect();
    let mut length = None;
    match rng.below(if meta_json { 10 } else { 8 }) {
        0 => {
            // The 8-byte header length: 0, huge, past the end, off by one.
            let real = serde_json::to_string(&header).unwrap().len() as u64;
            length = Some(match rng.below(6) {
                0 => 0,
                1 => u64::MAX,
                2 => 1 << 40,
                3 => d.len() as u64 + rng.below(100) as u64,
                4 => real.saturating_sub(1 + rng.below(4) as u64),
                _ => 100_000_001,
            });
        }
        1..=3 if !names.is_empty() => {
            let name = rng.pick(&names).clone();
            let entry = header.get_mut(&name).unwrap();
            let Some(obj) = entry.as_object_mut() else {
                return false;
            };
            match rng.below(7) {
                0 => {
                    obj.insert("dtype".into(), json!(*rng.pick(DTYPES)));
                }
                1 | 2 => {
                    let shape = obj
                        .get("shape")
                        .and_then(Value::as_array)
                        .cloned()
                        .unwrap_or_default();
                    obj.insert("shape".into(), interesting_shape(rng, &shape));
                }
                3 | 4 => {
                    let (s, e) = match obj.get("data_offsets").and_then(Value::as_array) {
                        Some(a) if a.len() == 2 => {
                            (a[0].as_u64().unwrap_or(0), a[1].as_u64().unwrap_or(0))
                        }
                        _ => (0, 0),
                    };
                    let len = data.len() as u64;
                    let off = match rng.below(8) {
                        0 => json!([e, s]),
                        1 => json!([s.saturating_sub(4), e]),
                        2 => json!([s, len + 1 + rng.below(64) as u64]),
                        3 => json!([0, u64::MAX]),
                        4 => json!([s + 1, e + 1]),
                        5 => json!([s]),
                        6 => json!([s, e, e]),
                        _ => json!([u64::MAX - 1, u64::MAX]),
                    };
                    obj.insert("data_offsets".into(), off);
                }
                5 => {
                    let k = *rng.pick(&["dtype", "shape", "data_offsets"]);
                    obj.remove(k);
                }
                _ => {
                    // Rename the tensor (onto another's name, or a weird one).
                    let v = header.remove(&name).unwrap();
                    let new = if rng.chance(50) {
                        rng.pick(&names).clone()
                    } else {
                        interesting_string(rng, &names)
                    };
                    header.insert(new, v);
                }
            }
        }
        4 if !names.is_empty() => {
            header.remove(rng.pick(&names).as_str());
        }
        5 => {
            // The data section: truncated, extended, or values changed.
            match rng.below(3) {
                0 => {
                    let k = rng.below(data.len() + 1);
                    data.truncate(k);
                }
                1 => data.extend((0..1 + rng.below(64)).map(|_| rng.next() as u8)),
                _ => {
                    for _ in 0..8 {
                        if !data.is_empty() {
                            let i = rng.below(data.len());
                            data[i] = 0xff;
                        }
                    }
                }
            }
        }
        8 | 9 => {
            // The JSON inside the metadata (the optimizer's scalars).
            let Some(meta) = header
                .get_mut("__metadata__")
                .and_then(Value::as_object_mut)
            else {
                return false;
            };
            let Some(key) = meta.keys().next().cloned() else {
                return false;
            };
            let Some(text) = meta.get(&key).and_then(Value::as_str) else {
                return false;
            };
            let Ok(mut inner) = serde_json::from_str::<Value>(text) else {
                return false;
            };
            let dup = mutate_value(rng, &mut inner);
            let t = json_text(rng, &inner, dup);
            meta.insert(key, Value::String(t));
        }
        _ => {
            let mut v = Value::Object(header);
            let dup = mutate_value(rng, &mut v);
            let text = json_text(rng, &v, dup);
            *d = st_join(&text, &data);
            return true;
        }
    }
    let text = serde_json::to_string(&Value::Object(header)).unwrap();
    *d = st_join(&text, &data);
    if let Some(n) = length {
        d[..8].copy_from_slice(&n.to_le_bytes());
    }
    true
}

// ---------------------------------------------------------------- option maps

/// Every option name of every primitive.
fn option_names() -> Vec<&'static str> {
    let mut names: BTreeSet<&str> = BTreeSet::new();
    for p in tarpo::script::help::PRIMITIVES {
        for o in p.opts {
            names.insert(o.name);
        }
    }
    names.into_iter().collect()
}

fn rhai_string(s: &str) -> String {
    // Rhai escapes are JSON's (\n, \", \\, \u{...} aside).
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\x{:02x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn random_rhai_value(rng: &mut Rng, depth: usize) -> String {
    match rng.below(if depth > 1 { 13 } else { 16 }) {
        0 => "()".into(),
        1 => "true".into(),
        2 => "false".into(),
        3 => rng
            .pick(&[
                "0",
                "1",
                "-1",
                "8",
                "9223372036854775807",
                "-9223372036854775807 - 1",
                "1000000000000",
            ])
            .to_string(),
        4 => rng
            .pick(&[
                "0.0",
                "0.5",
                "-1.5",
                "1e300",
                "1e-300",
                "(0.0 / 0.0)",
                "(1.0 / 0.0)",
                "(-1.0 / 0.0)",
                "-0.0",
            ])
            .to_string(),
        5 => rhai_string(&interesting_string(rng, &[])),
        6 => {
            let s: &&str = rng.pick(&["k3", "grpo", "hard", "soft", "none", "cosine", "mean"]);
            rhai_string(s)
        }
        7 => "'x'".into(),
        8 => "Fn(\"print\")".into(),
        9 => "|x| x + 1".into(),
        10 => "[]".into(),
        11 => "#{}".into(),
        12 => "blob(3)".into(),
        13 => format!(
            "[{}]",
            (0..1 + rng.below(3))
                .map(|_| random_rhai_value(rng, depth + 1))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        _ => random_rhai_map_at(rng, depth + 1),
    }
}

fn random_rhai_map_at(rng: &mut Rng, depth: usize) -> String {
    let names = option_names();
    let n = rng.below(6);
    let mut entries = Vec::new();
    for _ in 0..n {
        let key = match rng.below(10) {
            0..=5 => rng.pick(&names).to_string(),
            6 | 7 => {
                let k: &&str = rng.pick(&names);
                typo(rng, k)
            }
            _ => interesting_string(rng, &[]).chars().take(200).collect(),
        };
        let key = if key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && key.starts_with(|c: char| c.is_ascii_alphabetic())
            && rng.chance(70)
        {
            key
        } else {
            rhai_string(&key)
        };
        entries.push(format!("{key}: {}", random_rhai_value(rng, depth)));
    }
    format!("#{{{}}}", entries.join(", "))
}

fn random_rhai_map(rng: &mut Rng) -> String {
    random_rhai_map_at(rng, 0)
}

/// A valid option map of a primitive (its defaults, required ones filled).
fn default_map_text(opts: &[tarpo::script::opts::Opt]) -> String {
    let entries: Vec<String> = opts
        .iter()
        .map(|o| {
            let v = match o.def {
                Def::Int(i) => i.to_string(),
                Def::Float(f) => format!("{f:?}"),
                Def::Bool(b) => b.to_string(),
                Def::Str(s) => rhai_string(s),
                Def::Required(t) | Def::Unset(t) => match t {
                    Ty::Int => "4".into(),
                    Ty::Float => "0.5".into(),
                    Ty::Bool => "true".into(),
                    Ty::Str => "\"x\"".into(),
                    Ty::Map => "#{}".into(),
                    Ty::Array => "[]".into(),
                    Ty::Any => "()".into(),
                },
            };
            format!("{}: {v}", o.name)
        })
        .collect();
    format!("#{{{}}}", entries.join(", "))
}

/// Runs `Opts::check` of every primitive and every typed getter on `map`;
/// true when some primitive accepts it whole.
fn check_all_primitives(map: &rhai::Map, errors: &mut Vec<String>) -> bool {
    let mut some = false;
    use tarpo::script::help::PRIMITIVES;
    for p in PRIMITIVES.iter().filter(|p| !p.opts.is_empty()) {
        let o = match Opts::check(p.name, p.opts, map.clone()) {
            Ok(o) => o,
            Err(e) => {
                errors.push(format!("{e:#}"));
                continue;
            }
        };
        let before = errors.len();
        let mut push = |r: anyhow::Result<()>| {
            if let Err(e) = r {
                errors.push(format!("{e:#}"));
            }
        };
        for opt in p.opts {
            let n = opt.name;
            match opt.def {
                Def::Int(_) | Def::Required(Ty::Int) => {
                    push(o.int(n).map(drop));
                    push(o.usize(n).map(drop));
                    push(o.positive(n).map(drop));
                }
                Def::Float(_) | Def::Required(Ty::Float) => {
                    push(o.float(n).map(drop));
                    push(o.finite(n).map(drop));
                }
                Def::Bool(_) | Def::Required(Ty::Bool) => push(o.bool(n).map(drop)),
                Def::Str(_) | Def::Required(Ty::Str) => {
                    push(o.str(n).map(drop));
                    push(o.choice(n, &["k3", "grpo"]).map(drop));
                }
                Def::Unset(Ty::Int) => push(o.opt_int(n).map(drop)),
                Def::Unset(Ty::Float) => push(o.opt_float(n).map(drop)),
                Def::Unset(Ty::Bool) => push(o.opt_bool(n).map(drop)),
                Def::Unset(Ty::Str) => push(o.opt_str(n).map(drop)),
                _ => {
                    let _ = o.map(n);
                    let _ = o.raw(n);
                }
            }
        }
        some |= errors.len() == before;
    }
    some
}

// ---------------------------------------------------------------- fixtures

fn fixture_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = common::TINY_NAMES
        .iter()
        .map(|n| common::tiny_models().join(n))
        .collect();
    dirs.push(common::root().join("assets/default-model"));
    dirs.push(common::root().join("assets/looped-model"));
    dirs
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn write(path: &Path, data: &[u8]) {
    std::fs::write(path, data).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

fn err_text(e: &anyhow::Error) -> String {
    format!("{e:#}")
}

/// A short forward through a loaded network (a loaded file must be usable).
fn smoke_forward(net: &Llama) {
    let ids = Tensor::from_slice(&[1i64, 2, 3]).unsqueeze(0);
    let valid = Tensor::ones([1, 3], (Kind::Bool, Device::Cpu));
    if let Ok(x) = net.embed(&ids) {
        if let Ok(step) = Step::full(&valid) {
            if let Ok(h) = net.forward(&x, &step, None) {
                let _ = net.logits(&h);
            }
        }
    }
}

const JSON_PLACES: &[&str] = &["key `", "line ", "byte ", "column "];
const ST_PLACES: &[&str] = &["tensor '", "byte ", "header", "data section", "metadata"];

// ---------------------------------------------------------------- targets

#[test]
fn config_json() {
    tch::set_num_threads(1);
    let dir = common::empty_scratch("fuzz/config");
    let input = dir.join("config.json");
    let models: Vec<(ModelConfig, Weights)> = fixture_dirs()
        .iter()
        .map(|d| {
            (
                ModelConfig::load(d).unwrap(),
                Weights::open(d, Device::Cpu, Kind::Float).unwrap(),
            )
        })
        .collect();
    let seeds = fixture_dirs()
        .iter()
        .map(|d| read(&d.join("config.json")))
        .collect();
    let file = input.clone();
    fuzz(Target {
        name: "config",
        ext: "json",
        format: Format::Json,
        max_len: 256 << 10,
        names: vec![input.display().to_string()],
        places: JSON_PLACES.to_vec(),
        input,
        seeds,
        run: Box::new(move |bytes| {
            write(&file, bytes);
            match ModelConfig::load(file.parent().unwrap()) {
                Err(e) => Outcome::Rejected(vec![err_text(&e)]),
                Ok(cfg) => {
                    // An accepted config must be safe to build a network
                    // from: checked against the weights, it loads or fails.
                    for (_, w) in &models {
                        if let Ok(net) = Llama::load(cfg.clone(), w) {
                            smoke_forward(&net);
                        }
                    }
                    Outcome::Accepted
                }
            }
        }),
    });
}

/// Loads every tensor a checkpoint's header lists, and tries each fixture
/// config on it.
fn use_weights(
    w: &Weights,
    header: Option<&JMap<String, Value>>,
    cfgs: &[ModelConfig],
) -> Vec<String> {
    let mut errors = Vec::new();
    let _ = w.summary();
    for name in w.names() {
        let shape: Vec<i64> = header
            .and_then(|h| h.get(&name))
            .and_then(|e| e.get("shape"))
            .and_then(Value::as_array)
            .map(|a| a.iter().map(|d| d.as_u64().unwrap_or(0) as i64).collect())
            .unwrap_or_default();
        if let Err(e) = w.get_as(&name, &shape, Kind::Float) {
            errors.push(err_text(&e));
        }
    }
    if errors.is_empty() {
        for cfg in cfgs {
            if let Ok(net) = Llama::load(cfg.clone(), w) {
                smoke_forward(&net);
            }
        }
    }
    errors
}

#[test]
fn safetensors_weights() {
    tch::set_num_threads(1);
    let dir = common::empty_scratch("fuzz/weights");
    let input = dir.join("model.safetensors");
    let cfgs: Vec<ModelConfig> = fixture_dirs()
        .iter()
        .map(|d| ModelConfig::load(d).unwrap())
        .collect();
    let seeds = common::TINY_NAMES
        .iter()
        .map(|n| read(&common::tiny_models().join(n).join("model.safetensors")))
        .collect();
    let file = input.clone();
    fuzz(Target {
        name: "weights",
        ext: "safetensors",
        format: Format::Safetensors,
        max_len: 2 << 20,
        names: vec![input.display().to_string()],
        places: ST_PLACES.to_vec(),
        input,
        seeds,
        run: Box::new(move |bytes| {
            write(&file, bytes);
            let header = st_split(bytes).map(|(h, _)| h);
            match Weights::open(file.parent().unwrap(), Device::Cpu, Kind::Float) {
                Err(e) => Outcome::Rejected(vec![err_text(&e)]),
                Ok(w) => {
                    let errors = use_weights(&w, header.as_ref(), &cfgs);
                    if errors.is_empty() {
                        Outcome::Accepted
                    } else {
                        Outcome::Rejected(errors)
                    }
                }
            }
        }),
    });
}

#[test]
fn shard_index() {
    tch::set_num_threads(1);
    let dir = common::empty_scratch("fuzz/shard_index");
    let src = common::tiny_models().join("llama_mha_tied");
    let cfg = ModelConfig::load(&src).unwrap();
    let tensors = Tensor::read_safetensors(src.join("model.safetensors")).unwrap();
    let (a, b): (Vec<_>, Vec<_>) = tensors
        .into_iter()
        .enumerate()
        .partition(|(i, _)| i % 2 == 0);
    let strip =
        |v: Vec<(usize, (String, Tensor))>| v.into_iter().map(|(_, x)| x).collect::<Vec<_>>();
    let (a, b) = (strip(a), strip(b));
    let (fa, fb) = (
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    );
    Tensor::write_safetensors(&a, dir.join(fa)).unwrap();
    Tensor::write_safetensors(&b, dir.join(fb)).unwrap();
    let mut map = JMap::new();
    for (n, _) in &a {
        map.insert(n.clone(), fa.into());
    }
    for (n, _) in &b {
        map.insert(n.clone(), fb.into());
    }
    let index = json!({"metadata": {"total_size": 1234}, "weight_map": map});
    let seeds = vec![
        serde_json::to_vec_pretty(&index).unwrap(),
        serde_json::to_vec(&json!({"weight_map": {"model.embed_tokens.weight": fa}})).unwrap(),
    ];
    let input = dir.join("model.safetensors.index.json");
    let file = input.clone();
    fuzz(Target {
        name: "shard_index",
        ext: "json",
        format: Format::Json,
        max_len: 256 << 10,
        names: vec![
            input.display().to_string(),
            dir.join(fa).display().to_string(),
            dir.join(fb).display().to_string(),
        ],
        places: ["key `", "line ", "byte ", "tensor '"].to_vec(),
        input,
        seeds,
        run: Box::new(move |bytes| {
            write(&file, bytes);
            match Weights::open(file.parent().unwrap(), Device::Cpu, Kind::Float) {
                Err(e) => Outcome::Rejected(vec![err_text(&e)]),
                Ok(w) => {
                    match Llama::load(cfg.clone(), &w) {
                        Ok(net) => smoke_forward(&net),
                        Err(e) => return Outcome::Rejected(vec![err_text(&e)]),
                    }
                    Outcome::Accepted
                }
            }
        }),
    });
}

#[test]
fn tokenizer_json() {
    tch::set_num_threads(1);
    let dir = common::empty_scratch("fuzz/tokenizer");
    let input = dir.join("tokenizer.json");
    let mut seeds: Vec<Vec<u8>> = Vec::new();
    for d in fixture_dirs() {
        let t = read(&d.join("tokenizer.json"));
        if !seeds.contains(&t) {
            seeds.push(t);
        }
    }
    let file = input.clone();
    fuzz(Target {
        name: "tokenizer",
        ext: "json",
        format: Format::Json,
        max_len: 512 << 10,
        names: vec![input.display().to_string()],
        places: JSON_PLACES.to_vec(),
        input,
        seeds,
        run: Box::new(move |bytes| {
            write(&file, bytes);
            match Tokenizer::load(file.parent().unwrap()) {
                Err(e) => Outcome::Rejected(vec![err_text(&e)]),
                Ok(tok) => {
                    // A loaded tokenizer must encode and decode without panicking.
                    if let Ok(ids) = tok.encode("The quick brown fox: 12 + 30 = 42. é🙂", true) {
                        let _ = tok.decode(&ids, false);
                    }
                    let _ = tok.decode(&[0, 1, 2, 300, 100_000, -1], true);
                    let _ = tok.eos_id();
                    Outcome::Accepted
                }
            }
        }),
    });
}

#[test]
fn dataset_jsonl() {
    let dir = common::empty_scratch("fuzz/dataset");
    let input = dir.join("data.jsonl");
    let train = std::fs::read_to_string(common::root().join("datasets/arith_train.jsonl")).unwrap();
    let head: String = train.lines().take(6).map(|l| format!("{l}\n")).collect();
    let seeds = vec![
        head.into_bytes(),
        b"{\"prompt\": \"1+1?\", \"answer\": 2}\n\n{\"prompt\": \"caf\\u00e9 \xf0\x9f\x99\x82\", \"answer\": \"x\", \"test\": [1, {\"a\": null}]}\r\n".to_vec(),
    ];
    let file = input.clone();
    fuzz(Target {
        name: "dataset",
        ext: "jsonl",
        format: Format::Jsonl,
        max_len: 256 << 10,
        names: vec![input.display().to_string()],
        places: ["jsonl:", "line ", "byte ", "no rows"].to_vec(),
        input,
        seeds,
        run: Box::new(move |bytes| {
            write(&file, bytes);
            match Dataset::load(&file) {
                Err(e) => Outcome::Rejected(vec![err_text(&e)]),
                Ok(_) => Outcome::Accepted,
            }
        }),
    });
}

fn optim_params() -> Vec<Tensor> {
    let p = |v: &[f32], s: &[i64]| Tensor::from_slice(v).reshape(s).set_requires_grad(true);
    vec![
        p(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3]),
        p(&[-1.0, 0.5], &[2]),
        p(&[0.25], &[1]),
    ]
}

fn optimizer(params: &[Tensor]) -> AdamW {
    AdamW::new(
        vec![
            ParamGroup::new(
                "backbone",
                vec![params[0].shallow_clone(), params[1].shallow_clone()],
                1e-2,
                0.1,
            ),
            ParamGroup::new("router_bias", vec![params[2].shallow_clone()], 3e-2, 0.0),
        ],
        AdamWConfig {
            schedule: Schedule::new(ScheduleKind::Cosine, 2, 8, 0.1).unwrap(),
            ..Default::default()
        },
    )
    .unwrap()
}

/// One optimizer step with fixed gradients.
fn optim_step(opt: &mut AdamW, params: &[Tensor], upto: usize) -> anyhow::Result<()> {
    opt.zero_grad()?;
    let mut loss = Tensor::zeros([], (Kind::Float, Device::Cpu));
    for (i, p) in params.iter().enumerate().take(upto) {
        loss += (p * (i as f64 + 0.5)).sum(Kind::Float);
    }
    loss.backward();
    opt.step()?;
    Ok(())
}

#[test]
fn optimizer_state() {
    tch::set_num_threads(1);
    let dir = common::empty_scratch("fuzz/optim_state");
    let input = dir.join("optim.safetensors");
    let mut seeds = Vec::new();
    for (steps, upto) in [(3, 3), (1, 2), (0, 0)] {
        let params = optim_params();
        let mut opt = optimizer(&params);
        for _ in 0..steps {
            optim_step(&mut opt, &params, upto).unwrap();
        }
        let seed = dir.join(format!("seed-{steps}.safetensors"));
        opt.save(&seed).unwrap();
        seeds.push(read(&seed));
    }
    let file = input.clone();
    fuzz(Target {
        name: "optim_state",
        ext: "safetensors",
        format: Format::SafetensorsMeta,
        max_len: 64 << 10,
        names: vec![input.display().to_string()],
        places: [
            "tensor ",
            "byte ",
            "header",
            "data section",
            "metadata",
            "group ",
            "key `",
        ]
        .to_vec(),
        input,
        seeds,
        run: Box::new(move |bytes| {
            write(&file, bytes);
            let params = optim_params();
            let mut opt = optimizer(&params);
            match opt.load(&file) {
                Err(e) => Outcome::Rejected(vec![err_text(&e)]),
                Ok(()) => {
                    // The restored state must be usable.
                    let _ = optim_step(&mut opt, &params, 3);
                    Outcome::Accepted
                }
            }
        }),
    });
}

/// A tiny model with a saved rank-4 adapter on every target, and the files of
/// a rank-2 adapter on two targets.
fn adapter_fixture(dir: &Path) -> (Model, PathBuf, PathBuf) {
    let mut m = Model::load(
        &common::tiny_models().join("llama_gqa_llama3_bias"),
        Device::Cpu,
        Kind::Float,
    )
    .unwrap();
    let full = dir.join("seed-full");
    let small = dir.join("seed-small");
    m.net.attach_lora(&LoraConfig::new(4, 8.0)).unwrap();
    {
        let _g = tch::no_grad_guard();
        for mut p in m.net.lora_parameters() {
            let r = p.randn_like() * 0.1;
            p.copy_(&r);
        }
    }
    m.save_lora(&full).unwrap();
    let cfg = LoraConfig {
        targets: vec!["q_proj".into(), "v_proj".into()],
        ..LoraConfig::new(2, 16.0)
    };
    m.net.attach_lora(&cfg).unwrap();
    m.save_lora(&small).unwrap();
    (m, full, small)
}

#[test]
fn adapter_config() {
    tch::set_num_threads(1);
    let dir = common::empty_scratch("fuzz/adapter_config");
    let (mut m, full, small) = adapter_fixture(&dir);
    let work = dir.join("adapter");
    std::fs::create_dir_all(&work).unwrap();
    std::fs::copy(full.join(ADAPTER_WEIGHTS), work.join(ADAPTER_WEIGHTS)).unwrap();
    let seeds = vec![
        read(&full.join(ADAPTER_CONFIG)),
        read(&small.join(ADAPTER_CONFIG)),
    ];
    let input = work.join(ADAPTER_CONFIG);
    let file = input.clone();
    fuzz(Target {
        name: "adapter_config",
        ext: "json",
        format: Format::Json,
        max_len: 256 << 10,
        names: vec![
            input.display().to_string(),
            work.join(ADAPTER_WEIGHTS).display().to_string(),
        ],
        places: ["key '", "key `", "line ", "byte ", "tensor '"].to_vec(),
        input,
        seeds,
        run: Box::new(move |bytes| {
            write(&file, bytes);
            match m.load_lora(file.parent().unwrap()) {
                Err(e) => Outcome::Rejected(vec![err_text(&e)]),
                Ok(()) => {
                    smoke_forward(&m.net);
                    Outcome::Accepted
                }
            }
        }),
    });
}

#[test]
fn adapter_weights() {
    tch::set_num_threads(1);
    let dir = common::empty_scratch("fuzz/adapter_weights");
    let (mut m, full, small) = adapter_fixture(&dir);
    let work = dir.join("adapter");
    std::fs::create_dir_all(&work).unwrap();
    std::fs::copy(full.join(ADAPTER_CONFIG), work.join(ADAPTER_CONFIG)).unwrap();
    let seeds = vec![
        read(&full.join(ADAPTER_WEIGHTS)),
        read(&small.join(ADAPTER_WEIGHTS)),
    ];
    let input = work.join(ADAPTER_WEIGHTS);
    let file = input.clone();
    fuzz(Target {
        name: "adapter_weights",
        ext: "safetensors",
        format: Format::Safetensors,
        max_len: 1 << 20,
        names: vec![input.display().to_string()],
        places: ST_PLACES.to_vec(),
        input,
        seeds,
        run: Box::new(move |bytes| {
            write(&file, bytes);
            match m.load_lora(file.parent().unwrap()) {
                Err(e) => Outcome::Rejected(vec![err_text(&e)]),
                Ok(()) => {
                    smoke_forward(&m.net);
                    Outcome::Accepted
                }
            }
        }),
    });
}

/// A plain engine that turns a Rhai text into a value: no workbench
/// functions, bounded work and sizes.
fn rhai_parser() -> rhai::Engine {
    let mut parser = rhai::Engine::new();
    parser.set_max_operations(50_000);
    parser.set_max_string_size(1 << 20);
    parser.set_max_array_size(10_000);
    parser.set_max_map_size(10_000);
    parser.set_max_expr_depths(64, 32);
    parser.on_print(|_| {});
    parser.on_debug(|_, _, _| {});
    parser
}

/// Option maps: each primitive's defaults (required options filled).
fn option_seeds() -> Vec<Vec<u8>> {
    tarpo::script::help::PRIMITIVES
        .iter()
        .filter(|p| !p.opts.is_empty())
        .map(|p| default_map_text(p.opts).into_bytes())
        .collect()
}

fn primitive_names() -> Vec<String> {
    let mut names: Vec<String> = tarpo::script::help::PRIMITIVES
        .iter()
        .map(|p| format!("{}: ", p.name))
        .collect();
    names.push("fuzz: ".into());
    names
}

#[test]
fn option_maps() {
    let dir = common::empty_scratch("fuzz/opts");
    let input = dir.join("opts.rhai");
    let parser = rhai_parser();
    let file = input.clone();
    fuzz(Target {
        name: "opts",
        ext: "rhai",
        format: Format::Rhai,
        max_len: 64 << 10,
        names: primitive_names(),
        places: ["option `"].to_vec(),
        input,
        seeds: option_seeds(),
        run: Box::new(move |bytes| {
            write(&file, bytes);
            let Ok(text) = std::str::from_utf8(bytes) else {
                return Outcome::Skip;
            };
            let Ok(map) = parser.eval::<rhai::Map>(text) else {
                return Outcome::Skip;
            };
            let mut errors = Vec::new();
            let accepted = check_all_primitives(&map, &mut errors);
            match (accepted, errors.is_empty()) {
                (_, true) => Outcome::Accepted,
                (true, false) => Outcome::Partly(errors),
                (false, false) => Outcome::Rejected(errors),
            }
        }),
    });
}

/// The stdlib's `check_options(name, opts, defaults)`, through the
/// workbench engine (read-only use: a fixed call on maps in a scope).
#[test]
fn check_options() {
    use tarpo::script::help::PRIMITIVES;
    let dir = common::empty_scratch("fuzz/check_options");
    let input = dir.join("opts.rhai");
    let parser = rhai_parser();
    let engine = tarpo::script::engine();
    let defaults: Vec<(&str, rhai::Map)> = PRIMITIVES
        .iter()
        .filter(|p| !p.opts.is_empty())
        .map(|p| {
            let m = parser
                .eval::<rhai::Map>(&default_map_text(p.opts))
                .unwrap_or_else(|e| panic!("{}: {e}", p.name));
            (p.name, m)
        })
        .collect();
    let file = input.clone();
    fuzz(Target {
        name: "check_options",
        ext: "rhai",
        format: Format::Rhai,
        max_len: 64 << 10,
        names: primitive_names(),
        places: ["option `"].to_vec(),
        input,
        seeds: option_seeds(),
        run: Box::new(move |bytes| {
            write(&file, bytes);
            let Ok(text) = std::str::from_utf8(bytes) else {
                return Outcome::Skip;
            };
            let Ok(map) = parser.eval::<rhai::Map>(text) else {
                return Outcome::Skip;
            };
            let mut errors = Vec::new();
            // Both ways round: the input as the options, and as the defaults.
            let h = fnv(bytes) as usize;
            for k in 0..2 {
                let (name, d) = &defaults[(h + k * 7) % defaults.len()];
                for (opts, defs) in [(map.clone(), d.clone()), (d.clone(), map.clone())] {
                    let mut scope = rhai::Scope::new();
                    scope.push("o", opts);
                    scope.push("d", defs);
                    scope.push(
                        "n",
                        if k == 0 {
                            name.to_string()
                        } else {
                            "fuzz".into()
                        },
                    );
                    if let Err(e) =
                        engine.eval_with_scope::<rhai::Map>(&mut scope, "check_options(n, o, d)")
                    {
                        // The message of the native function's error.
                        let msg = match *e {
                            rhai::EvalAltResult::ErrorRuntime(ref v, _) => v.to_string(),
                            rhai::EvalAltResult::ErrorInFunctionCall(_, _, ref inner, _) => {
                                match **inner {
                                    rhai::EvalAltResult::ErrorRuntime(ref v, _) => v.to_string(),
                                    ref other => other.to_string(),
                                }
                            }
                            ref other => other.to_string(),
                        };
                        errors.push(msg);
                    }
                }
            }
            match errors.len() {
                0 => Outcome::Accepted,
                4 => Outcome::Rejected(errors),
                _ => Outcome::Partly(errors),
            }
        }),
    });
}

/// A fully trainable tiny model with a router and its optimizer, and a
/// checkpoint of it after one step in `dir` (returned).
fn checkpoint_fixture(dir: &Path) -> (tarpo::rl::policy::Policy, AdamW, PathBuf) {
    use tarpo::policy::Router;
    use tarpo::rl::checkpoint::{save_parts, Parts};
    use tarpo::rl::policy::{param_groups, Policy};
    let m = Model::load(
        &common::tiny_models().join("llama_mha_tied"),
        Device::Cpu,
        Kind::Float,
    )
    .unwrap();
    m.net.set_trainable(&["*".into()]).unwrap();
    let router = Router::new(m.net.cfg.hidden_size, 0.3, 1.0, 8, Device::Cpu).unwrap();
    let mut policy = Policy::new(m);
    policy.freeze_reference().unwrap();
    policy.router_ref = Some(router.frozen_copy().unwrap());
    policy.router = Some(router);
    let opt = AdamW::new(
        param_groups(&policy, 1e-2, 1e-2, 0.1),
        AdamWConfig::default(),
    )
    .unwrap();
    let sampler = tarpo::rl::dataset::Sampler::new(3);
    let parts = Parts {
        policy: &policy,
        opt: &opt,
        step: 0,
        run_step: 4,
        rng: 77,
        sampler: Some(&sampler),
    };
    let ckpt = save_parts(&parts, dir).unwrap();
    (policy, opt, ckpt)
}

const CKPT_PLACES: &[&str] = &[
    "line ",
    "column ",
    "bytes",
    "checksum",
    "missing",
    "lists ",
    "not in manifest.json",
    "format",
    "tensor '",
];

/// A checkpoint's manifest.json (the rest of the checkpoint intact): the
/// load verifies it and then loads, or refuses naming the file and place.
#[test]
fn checkpoint_manifest() {
    tch::set_num_threads(1);
    let dir = common::empty_scratch("fuzz/ckpt_manifest");
    let (policy, mut opt, ckpt) = checkpoint_fixture(&dir);
    let input = ckpt.join("manifest.json");
    let seeds = vec![read(&input)];
    let file = input.clone();
    fuzz(Target {
        name: "ckpt_manifest",
        ext: "json",
        format: Format::Json,
        max_len: 64 << 10,
        names: vec![ckpt.display().to_string()],
        places: CKPT_PLACES.to_vec(),
        input,
        seeds,
        run: Box::new(move |bytes| {
            write(&file, bytes);
            let dir = file.parent().unwrap();
            match tarpo::rl::checkpoint::load_parts(&policy, &mut opt, dir) {
                Err(e) => Outcome::Rejected(vec![err_text(&e)]),
                Ok(_) => Outcome::Accepted,
            }
        }),
    });
}

/// A checkpoint's state.json, with a manifest that matches it (so the
/// parser, not the checksum, meets each input).
#[test]
fn checkpoint_state() {
    use sha2::{Digest, Sha256};
    tch::set_num_threads(1);
    let dir = common::empty_scratch("fuzz/ckpt_state");
    let (policy, mut opt, ckpt) = checkpoint_fixture(&dir);
    let input = ckpt.join("state.json");
    let seeds = vec![read(&input)];
    let manifest: Value = serde_json::from_slice(&read(&ckpt.join("manifest.json"))).unwrap();
    let file = input.clone();
    fuzz(Target {
        name: "ckpt_state",
        ext: "json",
        format: Format::Json,
        max_len: 64 << 10,
        names: vec![input.display().to_string()],
        places: CKPT_PLACES.to_vec(),
        input,
        seeds,
        run: Box::new(move |bytes| {
            write(&file, bytes);
            let dir = file.parent().unwrap();
            let mut m = manifest.clone();
            let sum: String = Sha256::digest(bytes)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            m["files"]["state.json"] = json!({"bytes": bytes.len(), "sha256": sum});
            write(&dir.join("manifest.json"), m.to_string().as_bytes());
            match tarpo::rl::checkpoint::load_parts(&policy, &mut opt, dir) {
                Err(e) => Outcome::Rejected(vec![err_text(&e)]),
                Ok(got) => {
                    // What an accepted state restores is what it says.
                    let _ = (got.step, got.run_step, got.rng, got.sampler);
                    Outcome::Accepted
                }
            }
        }),
    });
}
