//! Counterfactual routing (`counterfactual(ro, opts)`) on fixed rollouts of
//! the default model: greedy flips against transformers decoding the same
//! mixture input by hand, sampled flips that keep the prefix and the seed
//! stream, the modes' bookkeeping, and the errors.
mod common;
use serde_json::Value;
use std::path::Path;

fn run(out: &Path, sets: &[&str]) -> String {
    let mut all = vec![format!("out={}", out.display())];
    all.extend(sets.iter().map(|s| s.to_string()));
    common::shipped_script("../tests/scripts/counterfactual.rhai", &all)
}

/// (completion, position, mode_before, mode_after, completion_after, answer_after) rows.
type Row = (usize, usize, String, String, String, Option<String>);

fn rows(out: &Path, group: usize) -> Vec<Row> {
    let df = tarpo::analysis::frame::read_parquet(&out.join("cf.parquet")).unwrap();
    let f = |c: &str| tarpo::analysis::frame::column_f64(&df, c).unwrap();
    let s = |c: &str| tarpo::analysis::frame::column_strings(&df, c).unwrap();
    let (p, smp, pos) = (f("prompt_id"), f("sample_id"), f("position"));
    let (mb, ma, text, ans) = (
        s("mode_before"),
        s("mode_after"),
        s("completion_after"),
        s("answer_after"),
    );
    (0..df.height())
        .map(|k| {
            (
                p[k].unwrap() as usize * group + smp[k].unwrap() as usize,
                pos[k].unwrap() as usize,
                mb[k].clone().unwrap(),
                ma[k].clone().unwrap(),
                text[k].clone().unwrap(),
                ans[k].clone(),
            )
        })
        .collect()
}

fn rollout(out: &Path) -> Vec<Value> {
    std::fs::read_to_string(out.join("rollout.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The free (not forced) decisions of completion `i` as (position, mode).
fn free(ro: &[Value], i: usize) -> Vec<(usize, String)> {
    let modes = ro[i]["modes"].as_array().unwrap();
    let forced = ro[i]["forced"].as_array().unwrap();
    (0..modes.len())
        .filter(|&j| !forced[j].as_bool().unwrap())
        .map(|j| (j, modes[j].as_str().unwrap().to_string()))
        .collect()
}

#[test]
fn greedy_flips_match_transformers() {
    let out = common::empty_scratch("cf-greedy");
    // A router that (practically) never goes soft: every decision is hard,
    // and a flip makes exactly one input soft.
    let said = run(
        &out,
        &["init_soft=1e-7", "group=1", "temperature=0.0", "mode=flip"],
    );
    assert!(said.contains("changes checked"), "{said}");
    let ro = rollout(&out);
    let got = rows(&out, 1);
    let free_total: usize = (0..ro.len()).map(|i| free(&ro, i).len()).sum();
    assert_eq!(got.len(), free_total, "every free decision flipped once");
    let flips: Vec<(usize, usize)> = got.iter().map(|r| (r.0, r.1)).collect();
    for r in &got {
        assert_eq!((r.2.as_str(), r.3.as_str()), ("hard", "soft"));
    }
    let model = common::root().join("assets/default-model");
    let oracle = common::run_python(
        "counterfactual_oracle.py",
        &[
            model.to_str().unwrap(),
            out.join("rollout.jsonl").to_str().unwrap(),
            &serde_json::to_string(&flips).unwrap(),
            "80",
            "10",
        ],
    );
    let want: Vec<String> = serde_json::from_str(&oracle).unwrap();
    let mut changed = 0;
    for (r, w) in got.iter().zip(&want) {
        assert_eq!(&r.4, w, "completion {} flipped at {}", r.0, r.1);
        let answer = w
            .split("####")
            .nth(1)
            .and_then(|a| a.split_whitespace().next());
        let parsed = answer
            .and_then(|a| a.parse::<f64>().ok())
            .map(|v| format!("{v}"));
        assert_eq!(
            r.5, parsed,
            "answer of completion {} flipped at {}",
            r.0, r.1
        );
        changed += (w != ro[r.0]["text"].as_str().unwrap()) as usize;
    }
    assert!(
        changed > 0,
        "no flip changed any completion: the check would not see a wrong mixture"
    );
}

#[test]
fn sampled_flips_keep_the_prefix_and_count_every_free_decision() {
    let out = common::empty_scratch("cf-sampled");
    let mut counts = Vec::new();
    for mode in ["flip", "hard", "soft"] {
        let dir = out.join(mode);
        // The script checks each prefix, the answers before, and determinism.
        let said = run(
            &dir,
            &[
                "init_soft=0.3",
                "group=2",
                "temperature=1.0",
                &format!("mode={mode}"),
            ],
        );
        assert!(said.contains("changes checked"), "{said}");
        let ro = rollout(&dir);
        let got = rows(&dir, 2);
        let mut want: Vec<(usize, usize, String)> = Vec::new();
        for i in 0..ro.len() {
            for (p, m) in free(&ro, i) {
                let new = if m == "soft" { "hard" } else { "soft" };
                if mode == "flip" || mode == new {
                    want.push((i, p, m));
                }
            }
        }
        let mut seen: Vec<(usize, usize, String)> =
            got.iter().map(|r| (r.0, r.1, r.2.clone())).collect();
        seen.sort();
        want.sort();
        assert_eq!(
            seen, want,
            "mode {mode}: one row per free decision that changes"
        );
        counts.push(got.len());
    }
    assert_eq!(counts[0], counts[1] + counts[2], "flip = to hard + to soft");
    assert!(counts[1] > 0 && counts[2] > 0, "{counts:?}");
}

#[test]
fn counterfactual_errors_name_the_cause() {
    let code = r#"
let m = load_backbone(default_model(), #{seed: 0});
let ds = load_dataset("datasets/arith_test.jsonl");
let plain = rollout_group(m, ds.rows(0, 1), #{group: 2, max_new: 8, seed: 1});
try { counterfactual(plain); } catch (e) { print(`no router: ${e}`); }
attach_router(m, #{init_soft: 0.3});
let ro = rollout_group(m, ds.rows(0, 1), #{group: 2, max_new: 8, seed: 1});
try { counterfactual(ro, #{mode: "sideways"}); } catch (e) { print(`bad mode: ${e}`); }
try { counterfactual(ro.select([0]), #{}); } catch (e) { print(`selection: ${e}`); }
try { counterfactual(ro, #{rows: [5]}); } catch (e) { print(`bad row: ${e}`); }
let rw = reward(ro, "gsm8k");
let opt = optimizer(m, #{lr: 0.5, router_lr: 0.5, warmup: 0.0, schedule: "constant"});
opt.step(tarpo_loss(m, ro, [1.0, -1.0], #{lambda: 1.0}));
try { counterfactual(ro); } catch (e) { print(`trained: ${e}`); }
"#;
    let o = common::tarpo()
        .current_dir(common::root())
        .args(["run", "-e", code])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    for want in [
        "no router: ",
        "bad mode: ",
        "\"sideways\" must be \"flip\", \"hard\" or \"soft\"",
        "selection: ",
        "cannot be re-run as it was made",
        "bad row: ",
        "row 5 is out of range",
        "trained: ",
        "did not reproduce",
    ] {
        assert!(out.contains(want), "missing {want:?} in:\n{out}");
    }
}
