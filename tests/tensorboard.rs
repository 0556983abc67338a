//! TensorBoard event files of a run: rows logged by a Rhai script through the
//! `tarpo` binary, read back by TensorBoard's own reader
//! (tests/oracle/tensorboard_read.py), plus the encoding's building blocks.
mod common;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tarpo::analysis::tensorboard::{crc32c, masked_crc32c, record, scalars_event};

#[test]
fn crc32c_and_records_match_known_values() {
    assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    assert_eq!(crc32c(b""), 0);
    // TFRecord's mask, values from TensorBoard's own masked_crc32c.
    assert_eq!(masked_crc32c(b""), 0xa282_ead8);
    assert_eq!(masked_crc32c(b"123456789"), 0xc78a_b0e5);
    let r = record(b"abc");
    assert_eq!(r.len(), 3 + 16);
    assert_eq!(&r[..8], &3u64.to_le_bytes());
    assert_eq!(&r[8..12], &masked_crc32c(&3u64.to_le_bytes()).to_le_bytes());
    assert_eq!(&r[12..15], b"abc");
    assert_eq!(&r[15..], &masked_crc32c(b"abc").to_le_bytes());
}

#[test]
fn scalar_event_is_encoded_byte_for_byte() {
    // wall_time 0.0, step 300, one value "a" = 1.0f32 (0x3f800000).
    let ev = scalars_event(0.0, 300, &[("a".into(), 1.0)]);
    let mut want = vec![0x09, 0, 0, 0, 0, 0, 0, 0, 0]; // 1: wall_time, fixed64
    want.extend_from_slice(&[0x10, 0xac, 0x02]); // 2: step, varint 300
    want.extend_from_slice(&[0x2a, 0x0a, 0x0a, 0x08]); // 5: Summary { 1: Value
    want.extend_from_slice(&[0x0a, 0x01, b'a']); // tag "a"
    want.extend_from_slice(&[0x15, 0x00, 0x00, 0x80, 0x3f]); // simple_value 1.0 }
    assert_eq!(ev, want);
}

/// Writes `body` to DIR/NAME and runs it with `--set out=RUN`.
fn run_script(dir: &Path, name: &str, body: &str, run: &Path) {
    let script = dir.join(name);
    std::fs::write(&script, body).unwrap();
    let o = common::tarpo()
        .arg("run")
        .arg(&script)
        .args(["--set", &format!("out={}", run.display())])
        .output()
        .expect("run tarpo");
    assert!(
        o.status.success(),
        "{name}: {}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

fn event_files(run: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(run)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            name.starts_with("events.out.tfevents.") && name.ends_with(".tarpo")
        })
        .collect();
    files.sort();
    files
}

/// TensorBoard's curves: tag -> (step, value) sorted by step, non-finite
/// values decoded from the reader's "nan"/"inf"/"-inf".
fn read_curves(run: &Path) -> BTreeMap<String, Vec<(i64, f64)>> {
    let out = common::run_python("tensorboard_read.py", &[run.to_str().unwrap()]);
    let raw: BTreeMap<String, Vec<(i64, serde_json::Value)>> =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    raw.into_iter()
        .map(|(tag, points)| {
            let mut points: Vec<(i64, f64)> = points
                .into_iter()
                .map(|(step, v)| {
                    let v = match v.as_str() {
                        Some(s) => s.parse::<f64>().unwrap(),
                        None => v.as_f64().unwrap(),
                    };
                    (step, v)
                })
                .collect();
            points.sort_by_key(|p| p.0);
            (tag, points)
        })
        .collect()
}

/// The value TensorBoard should show for `x`: its f32, widened back.
fn f32_of(x: f64) -> f64 {
    x as f32 as f64
}

fn assert_curve(curves: &BTreeMap<String, Vec<(i64, f64)>>, tag: &str, want: &[(i64, f64)]) {
    let got = &curves[tag];
    let same = got.len() == want.len()
        && got.iter().zip(want).all(|(g, w)| {
            let v = f32_of(w.1);
            g.0 == w.0 && (g.1 == v || (g.1.is_nan() && v.is_nan()))
        });
    assert!(same, "{tag}: TensorBoard read {got:?}, logged {want:?}");
}

#[test]
fn run_rows_reach_tensorboard() {
    let dir = common::empty_scratch("tensorboard");
    let run = dir.join("run");

    // Step 1 by default, then explicit steps with a gap; an int value, a
    // NaN, a float too large for f32 (inf), and values TensorBoard cannot
    // plot (string, bool), which are left out.
    run_script(
        &dir,
        "first.rhai",
        r#"
let run = new_run(args.out, #{quiet: true});
run.log(#{loss: 0.1, reward: -2.5, note: "hello", flag: true});
run.log(#{loss: 0.001, reward: 3, step: 2, odd: 0.0 / 0.0});
run.log(#{loss: -0.75, reward: 0.1, step: 10, odd: 1e300});
"#,
        &run,
    );
    assert_eq!(event_files(&run).len(), 1, "one events file per run handle");
    // Reopened later: a second events file, holding only the new row.
    run_script(
        &dir,
        "again.rhai",
        r#"
let run = load_run(args.out);
run.log(#{loss: 7.5, step: 20, note: "resumed"});
"#,
        &run,
    );
    assert_eq!(
        event_files(&run).len(),
        2,
        "a reopened run starts a new file"
    );

    let curves = read_curves(&run);
    let tags: Vec<&str> = curves.keys().map(String::as_str).collect();
    assert_eq!(tags, ["loss", "odd", "reward", "time_s"]);
    assert_curve(
        &curves,
        "loss",
        &[(1, 0.1), (2, 0.001), (10, -0.75), (20, 7.5)],
    );
    assert_curve(&curves, "reward", &[(1, -2.5), (2, 3.0), (10, 0.1)]);
    assert_curve(&curves, "odd", &[(2, f64::NAN), (10, f64::INFINITY)]);
    let time = &curves["time_s"];
    let steps: Vec<i64> = time.iter().map(|p| p.0).collect();
    assert_eq!(steps, [1, 2, 10, 20]);
    assert!(
        time.iter()
            .all(|p| p.1.is_finite() && p.1 >= 0.0 && p.1 < 600.0),
        "time_s: {time:?}"
    );
}

#[test]
fn a_resumed_run_shows_each_step_once() {
    let dir = common::empty_scratch("tensorboard-resume");
    let run = dir.join("run");
    // Steps 1-4, a checkpoint at step 2; then a second process resumes there
    // and logs steps 3 and 4 again with other values.
    run_script(
        &dir,
        "first.rhai",
        r#"
let m = load_backbone(default_model());
let opt = optimizer(m, #{schedule: "constant"});
let run = new_run(args.out, #{quiet: true});
let rows = [#{prompt: "1 + 1 =", solution: " 2"}];
for s in 1..=4 {
    opt.step(sft_loss(m, rows));
    run.log(#{loss: s.to_float()});
    if s == 2 { save_checkpoint(run, m, opt); }
}
"#,
        &run,
    );
    run_script(
        &dir,
        "resume.rhai",
        r#"
let m = load_backbone(default_model());
let opt = optimizer(m, #{schedule: "constant"});
let run = load_run(args.out);
if resume(run, m, opt) != 2 { throw "resumed at the wrong step"; }
let rows = [#{prompt: "1 + 1 =", solution: " 2"}];
for s in 3..=4 { opt.step(sft_loss(m, rows)); run.log(#{loss: 10.0 + s}); }
"#,
        &run,
    );
    assert_eq!(event_files(&run).len(), 2);
    let curves = read_curves(&run);
    assert_curve(&curves, "loss", &[(1, 1.0), (2, 2.0), (3, 13.0), (4, 14.0)]);
}
