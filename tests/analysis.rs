//! The analysis of runs from the outside: `tarpo analyze` on real run
//! directories (every chart a valid PNG and SVG that changes with the data
//! and names its title), the records read back by Python polars, SQL from a
//! script against a hand computation, and the report in a real browser.
mod common;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Each chart of `tarpo analyze` and the title its SVG must show.
const CHARTS: [(&str, &str); 10] = [
    ("soft_ratio", "soft ratio"),
    ("completion_length", "completion length over steps"),
    ("eval_pass1", "held-out Pass@1 during training"),
    (
        "p_soft_histogram",
        "router p_soft at the first and the last step",
    ),
    ("soft_by_position", "soft fraction by position"),
    ("soft_tokens_most", "tokens most often routed soft"),
    ("soft_tokens_least", "tokens least often routed soft"),
    ("soft_by_class", "soft rate by token class over steps"),
    ("soft_text", "completions at step 5"),
    ("pass_at_k", "Pass@k"),
];

/// Two small runs of real rollouts (different seeds and router inits),
/// made once: (run directory, generated tokens per step as the script saw them).
fn runs() -> &'static [(PathBuf, Vec<i64>); 2] {
    static RUNS: OnceLock<[(PathBuf, Vec<i64>); 2]> = OnceLock::new();
    RUNS.get_or_init(|| {
        let dir = common::empty_scratch("analysis-runs");
        let make = |seed: u64, init_soft: f64| {
            let run = dir.join(format!("run{seed}"));
            let out = common::shipped_script(
                "../tests/scripts/analysis_run.rhai",
                &[
                    format!("out={}", run.display()),
                    format!("seed={seed}"),
                    format!("init_soft={init_soft}"),
                    "steps=5".into(),
                ],
            );
            let tokens = out
                .lines()
                .filter_map(|l| l.strip_prefix("generated: "))
                .map(|n| n.trim().parse().unwrap())
                .collect();
            (run, tokens)
        };
        [make(0, 0.3), make(1, 0.6)]
    })
}

fn analyze(run: &Path, out: &Path) -> String {
    let o = common::tarpo()
        .current_dir(common::root())
        .args([
            "analyze",
            run.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ])
        .args(["--set", "min_count=3"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        o.status.success(),
        "tarpo analyze: {stdout}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    stdout
}

/// (width, height, RGB pixels) of a PNG.
fn pixels(path: &Path) -> (u32, u32, Vec<[u8; 3]>) {
    let file = std::fs::File::open(path).unwrap_or_else(|_| panic!("{} missing", path.display()));
    let mut reader = png::Decoder::new(std::io::BufReader::new(file))
        .read_info()
        .unwrap_or_else(|e| panic!("{} is not a valid PNG: {e}", path.display()));
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    let step = match info.color_type {
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        other => panic!("{}: unexpected colour type {other:?}", path.display()),
    };
    let px = buf[..info.buffer_size()]
        .chunks(step)
        .map(|c| [c[0], c[1], c[2]])
        .collect();
    (info.width, info.height, px)
}

fn non_white(px: &[[u8; 3]]) -> usize {
    px.iter().filter(|p| **p != [255, 255, 255]).count()
}

#[test]
fn analyze_draws_every_chart_from_the_data() {
    let [(a, _), (b, _)] = runs();
    let scratch = common::empty_scratch("analysis-out");
    let (out_a, out_b) = (scratch.join("a"), scratch.join("b"));
    let said = analyze(a, &out_a);
    assert!(
        said.contains("charts (PNG and SVG) and report.html"),
        "{said}"
    );
    analyze(b, &out_b);
    for (name, title) in CHARTS {
        let (wa, ha, pa) = pixels(&out_a.join(format!("{name}.png")));
        let (wb, hb, pb) = pixels(&out_b.join(format!("{name}.png")));
        // Not a blank canvas: axes, labels and data cover part of it.
        let inked = non_white(&pa);
        assert!(
            inked * 100 > pa.len(),
            "{name}.png: only {inked} of {} pixels drawn",
            pa.len()
        );
        assert!(
            (wa, ha) != (wb, hb) || pa != pb,
            "{name}.png is the same picture for two different runs"
        );
        let svg = std::fs::read_to_string(out_a.join(format!("{name}.svg"))).unwrap();
        assert!(svg.starts_with("<svg"), "{name}.svg is not an SVG");
        assert!(svg.contains(title), "{name}.svg lacks its title {title:?}");
    }
    let report = std::fs::read_to_string(out_a.join("report.html")).unwrap();
    for (_, title) in CHARTS {
        assert!(
            report.contains(title),
            "report.html lacks the chart {title:?}"
        );
    }
    assert!(
        report.contains("analysis test"),
        "report.html lacks the config"
    );
    assert!(
        report.contains("summary (over logged steps)") && report.contains("<td>soft_ratio</td>")
    );
    assert!(
        report.contains("class=\"soft\""),
        "report.html highlights no soft token"
    );
    let page = std::fs::read_to_string(out_a.join("soft_text.html")).unwrap();
    assert!(
        page.contains("prompt: ") && page.contains("reference answer: "),
        "{page:.600}"
    );
}

/// Python polars' reading of a parquet file.
fn polars_read(path: &Path) -> Value {
    let out = common::run_python("polars_read.py", &[path.to_str().unwrap()]);
    serde_json::from_str(&out).unwrap()
}

/// The routing frame's columns and their types (DESIGN.md "Records").
const ROUTING_SCHEMA: [(&str, &str); 16] = [
    ("run", "String"),
    ("step", "Int64"),
    ("prompt_id", "Int64"),
    ("sample_id", "Int64"),
    ("position", "Int64"),
    ("token_id", "Int64"),
    ("token", "String"),
    ("token_class", "String"),
    ("mode", "String"),
    ("forced", "Boolean"),
    ("p_soft", "Float64"),
    ("logp", "Float64"),
    ("entropy", "Float64"),
    ("topk_entropy", "Float64"),
    ("reward", "Float64"),
    ("advantage", "Float64"),
];

#[test]
fn token_records_read_back_in_python_polars() {
    let (run, generated) = &runs()[0];
    assert_eq!(generated.len(), 5, "the script reports each step's tokens");
    for (step, &n) in generated.iter().enumerate() {
        // Run steps count from 1.
        let file = run.join(format!("tokens/step-{:06}.parquet", step + 1));
        let py = polars_read(&file);
        assert_eq!(
            py["height"].as_i64(),
            Some(n),
            "step {step}: one row per generated token"
        );
        let schema: Vec<(String, String)> = py["schema"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| (c[0].as_str().unwrap().into(), c[1].as_str().unwrap().into()))
            .collect();
        let want: Vec<(String, String)> = ROUTING_SCHEMA
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        assert_eq!(schema, want, "step {step}");
        // Every value as the workbench itself reads it.
        let df = tarpo::analysis::frame::read_parquet(&file).unwrap();
        for (name, ty) in ROUTING_SCHEMA {
            let py_col = py["columns"][name].as_array().unwrap();
            let ours: Vec<Value> = match ty {
                "String" | "Boolean" => tarpo::analysis::frame::column_strings(&df, name)
                    .unwrap()
                    .into_iter()
                    .map(|v| v.map_or(Value::Null, Value::from))
                    .collect(),
                _ => tarpo::analysis::frame::column_f64(&df, name)
                    .unwrap()
                    .into_iter()
                    .map(|v| v.map_or(Value::Null, Value::from))
                    .collect(),
            };
            for (i, (p, o)) in py_col.iter().zip(&ours).enumerate() {
                let same = match (p, o) {
                    (Value::String(s), Value::Number(x)) => {
                        s.parse::<f64>().unwrap() == x.as_f64().unwrap()
                    }
                    (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
                    (Value::Bool(a), Value::String(b)) => a.to_string() == *b,
                    (a, b) => a == b,
                };
                assert!(same, "step {step} {name}[{i}]: polars read {p}, tarpo {o}");
            }
            assert_eq!(py_col.len(), ours.len(), "{name}");
        }
    }
    let samples = polars_read(&run.join("samples/step-000001.parquet"));
    let total: i64 = samples["columns"]["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .sum();
    assert_eq!(total, generated[0], "samples count the same tokens");
    assert_eq!(samples["height"].as_i64(), Some(6), "2 prompts x group 3");
}

#[test]
fn sql_from_a_script_matches_a_hand_computation() {
    let code = r#"
let f = to_frame([
    #{g: "a", x: 1.5, n: 2}, #{g: "b", x: -2.0, n: 5}, #{g: "a", x: 4.0, n: 1},
    #{g: "c", x: 0.25, n: 3}, #{g: "b", x: 3.0, n: 5}, #{g: "a", x: 0.5, n: 7},
]);
let s = f.sql("SELECT g, sum(x) AS total, avg(x) AS mean, sum(n * x) AS weighted, count(*) AS rows FROM frame WHERE n < 7 GROUP BY g ORDER BY g");
for c in ["g", "total", "mean", "weighted", "rows"] { print(`${c}=${s.column(c)}`); }
"#;
    let o = common::tarpo().args(["run", "-e", code]).output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let got: BTreeMap<&str, &str> = out.lines().filter_map(|l| l.split_once('=')).collect();
    // n < 7 drops (a, 0.5); a: 1.5 + 4.0, b: -2.0 + 3.0, c: 0.25.
    assert_eq!(got["g"], r#"["a", "b", "c"]"#);
    assert_eq!(got["total"], "[5.5, 1.0, 0.25]");
    assert_eq!(got["mean"], "[2.75, 0.5, 0.25]");
    assert_eq!(got["weighted"], "[7.0, 5.0, 0.75]"); // 2*1.5 + 1*4.0; 5*(-2) + 5*3; 3*0.25
    assert_eq!(got["rows"], "[2.0, 2.0, 1.0]");
}

/// Debian's chromium, which the setup installs for this test.
fn chromium() -> PathBuf {
    let p = PathBuf::from("/usr/bin/chromium");
    assert!(
        p.exists(),
        "{} missing: ./dev.sh setup installs Debian's chromium",
        p.display()
    );
    p
}

#[test]
fn report_renders_its_highlights_in_headless_chromium() {
    let (run, _) = &runs()[0];
    let out = common::empty_scratch("analysis-browser");
    analyze(run, &out);
    let shot = out.join("shot.png");
    let page = format!("file://{}", out.join("soft_text.html").display());
    let o = std::process::Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
        ])
        .args([
            "--enable-logging=stderr",
            "--v=0",
            "--window-size=1000,1400",
        ])
        .arg(format!("--user-data-dir={}", out.join("profile").display()))
        .arg(format!("--screenshot={}", shot.display()))
        .arg(&page)
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "chromium failed: {log}");
    let console: Vec<&str> = log.lines().filter(|l| l.contains("CONSOLE")).collect();
    assert!(console.is_empty(), "console messages: {console:#?}");
    let (_, _, px) = pixels(&shot);
    // The soft highlight is #ffb347.
    let near = |p: &[u8; 3]| {
        p.iter()
            .zip([0xff, 0xb3, 0x47])
            .all(|(&a, b): (&u8, i32)| (a as i32 - b).abs() <= 3)
    };
    let orange = px.iter().filter(|p| near(p)).count();
    assert!(
        orange > 200,
        "the screenshot shows {orange} pixels of the highlight colour"
    );
}
