//! The synthetic task from the command line: `tarpo data arith` regenerates
//! the shipped split byte for byte, every answer and worked step is checked by
//! an independent computation from the question text (tests/oracle/arith_check.py),
//! the difficulty knobs take effect, and bad knobs are clear errors.
mod common;
use std::path::Path;

fn data(args: &[&str]) -> std::process::Output {
    common::tarpo()
        .arg("data")
        .arg("arith")
        .args(args)
        .output()
        .unwrap()
}

fn check(path: &Path) -> String {
    common::run_python("arith_check.py", &[path.to_str().unwrap()])
}

#[test]
fn the_shipped_split_is_regenerated_identically_and_checks_out() {
    let out = common::scratch("data-arith");
    let o = data(&[out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for f in ["arith_train.jsonl", "arith_test.jsonl"] {
        let made = std::fs::read(out.join(f)).unwrap();
        let shipped = std::fs::read(common::root().join("datasets").join(f)).unwrap();
        assert!(
            made == shipped,
            "datasets/{f} differs from `tarpo data arith datasets/`"
        );
        let ok = check(&out.join(f));
        let want = if f.contains("train") {
            "2000 problems ok"
        } else {
            "200 problems ok"
        };
        assert_eq!(ok.trim(), want);
    }
    let train = std::fs::read_to_string(out.join("arith_train.jsonl")).unwrap();
    let test = std::fs::read_to_string(out.join("arith_test.jsonl")).unwrap();
    let seen: std::collections::HashSet<&str> = train.lines().collect();
    assert!(
        test.lines().all(|l| !seen.contains(l)),
        "a held-out problem is in train"
    );
}

#[test]
fn the_knobs_change_the_problems() {
    let out = common::scratch("data-arith-knobs");
    let f = out.join("hard.jsonl");
    let o = data(&[
        f.to_str().unwrap(),
        "--n",
        "300",
        "--seed",
        "9",
        "--min-steps",
        "4",
        "--max-steps",
        "5",
        "--distractors",
        "3",
        "--max-operand",
        "50",
        "--max-value",
        "500",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(check(&f).trim(), "300 problems ok");
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(&f)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(rows
        .iter()
        .all(|r| (4..=5).contains(&r["steps"].as_i64().unwrap())));
    assert!(rows
        .iter()
        .any(|r| r["answer"].as_str().unwrap().parse::<i64>().unwrap() > 99));
    let distractors =
        |r: &serde_json::Value| r["prompt"].as_str().unwrap().matches(" has ").count() - 1;
    assert!(rows.iter().any(|r| distractors(r) == 3));
    let e = String::from_utf8_lossy(
        &data(&[f.to_str().unwrap(), "--min-steps", "3", "--max-steps", "2"]).stderr,
    )
    .to_string();
    assert!(e.contains("1 <= min_steps <= max_steps"), "{e}");
}
