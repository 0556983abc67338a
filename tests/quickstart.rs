//! The README's first command, end to end with fewer steps: TARPO on the
//! embedded default model raises held-out Pass@1, and the run directory holds
//! what the quickstart says it writes (metrics with eval rows, routing
//! records, checkpoint, charts).
mod common;

fn figure(out: &str, label: &str) -> f64 {
    let line = out
        .lines()
        .find(|l| l.starts_with(label))
        .unwrap_or_else(|| panic!("no `{label}` line in:\n{out}"));
    // The number, then maybe words ("0.485 (100 held-out problems x 4 samples)").
    line[label.len()..]
        .split_whitespace()
        .next()
        .unwrap_or("")
        .parse()
        .unwrap_or_else(|e| panic!("`{line}`: {e}"))
}

#[test]
fn quickstart_raises_held_out_pass_at_1() {
    let dir = common::scratch("quickstart");
    let run_dir = dir.join("run");
    // A run left by an earlier test run would send this one to run-2.
    let _ = std::fs::remove_dir_all(&run_dir);
    let stdout = common::shipped_script(
        "quickstart.rhai",
        &[
            "steps=90".into(),
            "eval_every=30".into(),
            format!("out={}", run_dir.display()),
        ],
    );
    let before = figure(&stdout, "pass@1 before:");
    let after = figure(&stdout, "pass@1 after:");
    assert!(
        (0.1..=0.6).contains(&before),
        "the default model leaves room for RL: pass@1 {before}"
    );
    assert!(
        after >= before + 0.04,
        "90 TARPO steps raise held-out pass@1 by several points: {before} -> {after}\n{stdout}"
    );
    assert!(stdout.contains("soft ratio:"), "{stdout}");

    let metrics = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap();
    let rows: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 90, "one metrics row per step");
    let evals: Vec<f64> = rows
        .iter()
        .filter_map(|r| r.get("eval_pass1").and_then(|v| v.as_f64()))
        .collect();
    assert_eq!(evals.len(), 3, "eval_every=30 logs at steps 30, 60 and 90");
    for f in [
        "metrics.parquet",
        "routing.parquet",
        "eval-before/problems.parquet",
        "eval-after/problems.parquet",
        "plots/soft_ratio.png",
        "plots/eval_pass1.png",
        "plots/pass_at_k.png",
        "plots/soft_tokens.html",
    ] {
        assert!(
            run_dir.join(f).is_file(),
            "{f} missing in the run directory"
        );
    }
    assert!(
        run_dir.join("checkpoints/step-000090").is_dir(),
        "the checkpoint at the last step"
    );
}

/// Held-out Pass@1 before and after 60 steps of `method` in
/// compare_methods.rhai (one seed), and its output.
fn short_run(method: &str, extra: &[String]) -> (f64, f64, String) {
    let dir = common::scratch(&format!("toy-{method}"));
    let _ = std::fs::remove_dir_all(&dir);
    let mut sets = vec![
        format!("methods={method}"),
        "seeds=1".into(),
        "steps=60".into(),
        format!("out={}", dir.display()),
    ];
    sets.extend_from_slice(extra);
    let stdout = common::shipped_script("compare_methods.rhai", &sets);
    let before = figure(&stdout, "pass@1 before:");
    let line = stdout
        .lines()
        .find(|l| l.starts_with(&format!("{method} seed 0: pass@1")))
        .unwrap_or_else(|| panic!("no {method} result in:\n{stdout}"));
    let after: f64 = line
        .split("-> ")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .and_then(|x| x.trim().parse().ok())
        .unwrap_or_else(|| panic!("`{line}`"));
    assert!(dir.join("zero_adv_frac.png").is_file());
    (before, after, stdout)
}

/// AAPO on the toy task: 60 steps raise held-out Pass@1, and the comparison
/// script reports the groups AAPO's margin revives.
#[test]
fn a_short_aapo_run_raises_held_out_pass_at_1() {
    let (before, after, stdout) = short_run("aapo", &[]);
    assert!(
        after >= before + 0.04,
        "60 AAPO steps raise held-out pass@1: {before} -> {after}\n{stdout}"
    );
    let revived = stdout
        .lines()
        .find(|l| l.starts_with("aapo   ") && l.matches("spread").count() == 2)
        .unwrap_or_else(|| panic!("no zero-advantage line in:\n{stdout}"));
    let frac: f64 = revived
        .split("   ")
        .nth(2)
        .and_then(|x| x.split(' ').next())
        .and_then(|x| x.parse().ok())
        .unwrap_or_else(|| panic!("`{revived}`"));
    assert!(
        frac > 0.0,
        "AAPO's margin moves some zero-advantage groups: {revived}"
    );
}

/// RLTT (exit_pdf weighting) on the looped default model: 60 steps raise
/// held-out Pass@1.
#[test]
fn a_short_rltt_run_raises_held_out_pass_at_1() {
    let model = common::root().join("assets/looped-model");
    let (before, after, stdout) =
        short_run("rltt-exit_pdf", &[format!("model={}", model.display())]);
    assert!(
        after >= before + 0.04,
        "60 RLTT steps raise held-out pass@1 on the looped model: {before} -> {after}\n{stdout}"
    );
}

/// The other shipped scripts, on the default model with tiny counts.
#[test]
fn the_shipped_scripts_run_on_the_default_model() {
    let dir = common::empty_scratch("shipped-scripts");
    let run = common::shipped_script;
    let d = |name: &str| dir.join(name).display().to_string();
    let out = run(
        "compare_methods.rhai",
        &[
            "steps=2".into(),
            "seeds=2".into(),
            "held=4".into(),
            "prompts=2".into(),
            format!("out={}", d("compare")),
        ],
    );
    for method in ["tarpo", "grpo", "hrpo"] {
        let row = out
            .lines()
            .find(|l| l.starts_with(&format!("{method}   ")))
            .unwrap_or_else(|| panic!("no summary row for {method}:\n{out}"));
        let per_seed = row.split('[').nth(1).unwrap();
        assert_eq!(per_seed.matches(',').count(), 1, "two seeds: {row}");
        assert!(
            std::path::Path::new(&d(&format!("compare/{method}-seed1/metrics.jsonl"))).is_file()
        );
    }
    assert!(dir.join("compare/soft_ratio.png").is_file());

    let out = run(
        "compare_offline.rhai",
        &[
            "seeds=2".into(),
            "prompts=4".into(),
            "group=4".into(),
            "held=4".into(),
            "epochs=1".into(),
            format!("out={}", d("offline")),
        ],
    );
    let table = std::fs::read_to_string(dir.join("offline/summary.csv")).unwrap();
    assert_eq!(
        table.lines().count(),
        1 + 4 * 2,
        "a row per method and seed:\n{table}"
    );
    for method in ["rpo", "sft", "kto", "dro"] {
        assert!(
            out.contains(&format!("\n{method}   ")),
            "no summary row for {method}:\n{out}"
        );
        let m =
            std::fs::read_to_string(d(&format!("offline/{method}-seed1/metrics.jsonl"))).unwrap();
        // Step 0 (the held-out loss before) and the 2 steps of one epoch of 16 rows.
        assert_eq!(m.lines().count(), 3, "{method}: {m}");
    }
    assert!(dir.join("offline/val_rpo_loss.png").is_file());

    let out = run("explore_routing.rhai", &[format!("out={}", d("explore"))]);
    assert!(out.contains("soft_rate"), "{out}");
    assert!(dir.join("explore/p_soft.png").is_file());

    let out = run(
        "custom_method.rhai",
        &["steps=2".into(), format!("out={}", d("custom"))],
    );
    assert!(dir.join("custom/metrics.jsonl").is_file(), "{out}");

    let out = run(
        "counterfactual.rhai",
        &[
            "problems=1".into(),
            "group=2".into(),
            format!("out={}", d("cf")),
        ],
    );
    let changed: usize = out
        .lines()
        .find_map(|l| l.strip_suffix(" decisions changed"))
        .unwrap_or_else(|| panic!("no count of changed decisions:\n{out}"))
        .parse()
        .unwrap();
    let table = std::fs::read_to_string(dir.join("cf/by_class.csv")).unwrap();
    let counted: usize = table
        .lines()
        .skip(1)
        .map(|l| l.split(',').nth(2).unwrap().parse::<usize>().unwrap())
        .sum();
    assert!(changed > 0 && counted == changed, "{table}\n{out}");
    for chart in [
        "answer_changed_by_class.png",
        "answer_changed_by_position.svg",
    ] {
        assert!(dir.join("cf").join(chart).is_file(), "{chart}");
    }
}
