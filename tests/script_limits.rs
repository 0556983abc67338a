//! Resource limits of scripts (`tarpo run`/`tarpo repl` `--max-array`,
//! `--max-map`, `--max-string`, `--max-call-depth`, `--max-operations`):
//! runaway code fails fast with an error naming the limit and its flag,
//! memory stays bounded, each flag reaches the engine (also in the children
//! of `--nproc`), Ctrl-C still stops a loop under an operations limit, and a
//! session stays usable after hitting a limit.
use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use tarpo::script::{Limits, Session};

fn tarpo() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tarpo"))
}

/// What a finished `tarpo run` left: status, output, time and peak memory.
struct Ran {
    ok: bool,
    stdout: String,
    stderr: String,
    secs: f64,
    /// VmHWM (peak resident set) in MB, read from /proc while it ran.
    peak_mb: f64,
}

/// The resident-set peak so far of a running process, in MB.
fn vm_hwm_mb(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Peak memory of `tarpo run -e 1`: loading libtorch and the workbench.
fn baseline_mb() -> f64 {
    static B: OnceLock<f64> = OnceLock::new();
    *B.get_or_init(|| run(&["-e", "1"]).peak_mb)
}

/// How far above the baseline a runaway may go.
const MARGIN_MB: f64 = 400.0;

fn run(args: &[&str]) -> Ran {
    watch(args, None)
}

/// `tarpo run ARGS`, stopped (and the test failed) after 120 s or, with a
/// `cap`, once its memory passes it: a broken limit must fail the test,
/// not take the machine's memory.
fn watch(args: &[&str], cap_mb: Option<f64>) -> Ran {
    let mut child = tarpo()
        .arg("run")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start tarpo");
    let pid = child.id();
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let so = drain(Box::new(child.stdout.take().unwrap()));
    let se = drain(Box::new(child.stderr.take().unwrap()));
    let t = Instant::now();
    let mut peak = 0.0f64;
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait for tarpo") {
            break st;
        }
        if let Some(m) = vm_hwm_mb(pid) {
            peak = peak.max(m);
        }
        if t.elapsed() > Duration::from_secs(120) || cap_mb.is_some_and(|c| peak > c) {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "tarpo run {args:?} stopped after {:.1} s at {peak:.0} MB: no limit held",
                t.elapsed().as_secs_f64()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ran {
        ok: status.success(),
        stdout: so.join().unwrap(),
        stderr: se.join().unwrap(),
        secs: t.elapsed().as_secs_f64(),
        peak_mb: peak,
    }
}

/// Runaway `code` under the default limits: fails with `message`, in under
/// 30 s, within MARGIN_MB of the baseline's memory.
fn stops(code: &str, message: &str) {
    let base = baseline_mb();
    let r = watch(&["-e", code], Some(base + 5.0 * MARGIN_MB));
    assert!(!r.ok, "{code} succeeded:\n{}{}", r.stdout, r.stderr);
    assert!(
        r.stderr.contains(message),
        "{code}: expected {message:?}, got:\n{}",
        r.stderr
    );
    assert!(r.secs < 30.0, "{code}: took {:.1} s to fail", r.secs);
    assert!(
        r.peak_mb < base + MARGIN_MB,
        "{code}: peak {:.0} MB, baseline {base:.0} MB",
        r.peak_mb
    );
}

#[test]
fn a_runaway_array_stops_at_the_default_limit() {
    stops(
        "let a = []; loop { a.push(1) }",
        "error: <-e>:1:22: array grew past 100000 elements (the limit; raise it with --max-array N, 0 for none)",
    );
}

#[test]
fn a_runaway_map_stops_at_the_default_limit() {
    // `m[key] = v` adding a key is not measured by rhai itself.
    stops(
        r#"let m = #{}; let i = 0; loop { m["k" + i] = i; i += 1 }"#,
        "error: <-e>:1:32: map grew past 1000000 entries (the limit; raise it with --max-map N, 0 for none)",
    );
}

#[test]
fn a_runaway_string_stops_at_the_default_limit() {
    stops(
        r#"let s = "x"; loop { s += s }"#,
        "error: <-e>:1:23: string grew past 16777216 bytes (the limit; raise it with --max-string BYTES, 0 for none)",
    );
}

#[test]
fn unbounded_recursion_stops_at_the_default_call_depth() {
    stops(
        "fn f(x) { f(x + 1) } f(0)",
        "function calls nested deeper than 256 (the limit; raise it with --max-call-depth N, 0 for none)",
    );
    // Recursion well inside the limit still works.
    let r = run(&[
        "-e",
        "fn f(n) { if n == 0 { 0 } else { 1 + f(n - 1) } } f(200)",
    ]);
    assert!(r.ok && r.stdout.trim() == "200", "{}{}", r.stdout, r.stderr);
    // An error deep in a recursion shows the repeated call once, counted.
    let r = run(&[
        "-e",
        r#"fn f(x) { if x > 200 { throw "deep" } f(x + 1) } f(0)"#,
    ]);
    assert_eq!(
        r.stderr.trim(),
        "error: <-e>:1:24: deep\n  in f(), called at <-e>:1:39 (201 times)\n  in f(), called at <-e>:1:50"
    );
    // Mutual recursion: the 10 innermost and 10 outermost calls.
    let r = run(&[
        "-e",
        "fn f(x) { if x > 30 { throw \"deep\" } g(x + 1) } fn g(x) { f(x) } f(0)",
    ]);
    assert!(
        !r.ok && r.stderr.contains("\n  ... 43 more calls\n"),
        "{}",
        r.stderr
    );
    assert_eq!(r.stderr.trim().lines().count(), 22, "{}", r.stderr);
}

/// `tarpo run FLAGS -e CODE` fails with `message` (or succeeds printing `out`).
fn fails(flags: &[&str], code: &str, message: &str) {
    let mut args = flags.to_vec();
    args.extend(["-e", code]);
    let r = run(&args);
    assert!(
        !r.ok && r.stderr.contains(message),
        "{args:?}: expected {message:?}, got:\n{}{}",
        r.stdout,
        r.stderr
    );
}

fn prints(flags: &[&str], code: &str, out: &str) {
    let mut args = flags.to_vec();
    args.extend(["-e", code]);
    let r = run(&args);
    assert!(
        r.ok && r.stdout.trim() == out,
        "{args:?}: expected {out:?}, got:\n{}{}",
        r.stdout,
        r.stderr
    );
}

#[test]
fn each_flag_reaches_the_engine() {
    let push = |n: usize| format!("let a = []; for i in 0..{n} {{ a.push(i) }} a.len()");
    prints(&["--max-array", "10"], &push(10), "10");
    fails(
        &["--max-array", "10"],
        &push(11),
        "array grew past 10 elements (the limit; raise it with --max-array N, 0 for none)",
    );
    // Nested arrays count: 3 arrays of 4 are 15 elements.
    fails(
        &["--max-array", "14"],
        "let a = []; for i in 0..3 { a.push([1, 2, 3, 4]) }",
        "array grew past 14 elements",
    );
    let keys = |n: usize| format!(r#"let m = #{{}}; for i in 0..{n} {{ m["k" + i] = i }} m.len()"#);
    prints(&["--max-map", "5"], &keys(5), "5");
    fails(
        &["--max-map", "5"],
        &keys(6),
        "map grew past 5 entries (the limit; raise it with --max-map N, 0 for none)",
    );
    let chars = |n: usize| format!(r#"let s = ""; for i in 0..{n} {{ s += "x" }} s.len()"#);
    prints(&["--max-string", "100"], &chars(100), "100");
    fails(
        &["--max-string", "100"],
        &chars(101),
        "string grew past 100 bytes (the limit; raise it with --max-string BYTES, 0 for none)",
    );
    let depth =
        |n: usize| format!("fn f(n) {{ if n == 0 {{ 0 }} else {{ 1 + f(n - 1) }} }} f({n})");
    prints(&["--max-call-depth", "10"], &depth(5), "5");
    fails(
        &["--max-call-depth", "10"],
        &depth(50),
        "function calls nested deeper than 10 (the limit; raise it with --max-call-depth N, 0 for none)",
    );
    fails(
        &["--max-operations", "1000"],
        "let x = 0; loop { x += 1 }",
        "ran more than 1000 operations (the limit; raise it with --max-operations N, 0 for none)",
    );
    prints(
        &["--max-operations", "1000"],
        "let x = 0; for i in 0..10 { x += i } x",
        "45",
    );
}

#[test]
fn zero_lifts_a_limit() {
    let pad = "let a = []; a.pad(2000000, 0); for i in 0..2000000 { a[i] = i } print(a.len())";
    fails(&[], pad, "array grew past 100000 elements");
    prints(&["--max-array", "0"], pad, "2000000");
    // With no size limit at all rhai stops measuring: 2,000,000 pushes take
    // about a second (under a size limit each push measures the array).
    let t = Instant::now();
    prints(
        &["--max-array", "0", "--max-map", "0", "--max-string", "0"],
        "let a = []; for i in 0..2000000 { a.push(i) } print(a.len())",
        "2000000",
    );
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
    prints(
        &["--max-call-depth", "0"],
        "fn f(n) { if n == 0 { 0 } else { 1 + f(n - 1) } } f(300)",
        "300",
    );
}

#[test]
fn nproc_children_get_the_limits() {
    let code = |n: usize| format!("let a = []; for i in 0..{n} {{ a.push(i) }} print(a.len())");
    prints(&["--nproc", "2", "--max-array", "10"], &code(10), "10");
    fails(
        &["--nproc", "2", "--max-array=10"],
        &code(11),
        "array grew past 10 elements",
    );
}

#[test]
fn ctrl_c_stops_a_loop_under_an_operations_limit() {
    let mut child = tarpo()
        .args(["run", "--max-operations", "1000000000000", "-e"])
        .arg(r#"print("started"); let x = 0; loop { x += 1 }"#)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start tarpo");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "started");
    std::thread::sleep(Duration::from_millis(300));
    let killed = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let t = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            panic!("Ctrl-C did not stop the loop");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(!child.wait().unwrap().success());
    assert!(
        err.contains("<-e>:1:") && err.contains("interrupted"),
        "{err}"
    );
}

#[test]
fn a_session_stays_usable_after_a_limit() {
    let limits = Limits {
        array: 1000,
        map: 1000,
        ..Limits::DEFAULT
    };
    let mut s = Session::with_limits(rhai::Map::new(), limits);
    let int = |r: Result<rhai::Dynamic, String>| r.unwrap().as_int().unwrap();
    let _ = s
        .eval("let x = 40; fn twice(v) { v * 2 }", "<repl>")
        .expect("definitions");
    let e = s
        .eval("let a = []; loop { a.push(1) }", "<repl>")
        .unwrap_err();
    assert_eq!(
        e,
        "<repl>:1:22: array grew past 1000 elements (the limit; raise it with --max-array N, 0 for none)"
    );
    assert_eq!(int(s.eval("twice(x) + 2", "<repl>")), 82);
    assert_eq!(int(s.eval("let y = 1; y + x", "<repl>")), 41);
    // The runaway map: reported, then it can still be read and replaced.
    let e = s
        .eval(
            r#"let m = #{}; let i = 0; loop { m["k" + i] = i; i += 1 }"#,
            "<repl>",
        )
        .unwrap_err();
    assert!(e.contains("map grew past 1000 entries"), "{e}");
    assert_eq!(int(s.eval(r#"m["k7"]"#, "<repl>")), 7);
    assert_eq!(int(s.eval(r#"m = #{a: 1}; m.len()"#, "<repl>")), 1);
    // Growing it past the limit again fails again.
    let e = s
        .eval(r#"for i in 0..2000 { m["k" + i] = i }"#, "<repl>")
        .unwrap_err();
    assert!(e.contains("map grew past 1000 entries"), "{e}");
    assert_eq!(int(s.eval("x", "<repl>")), 40);
    assert_eq!(s.limits(), &limits);
    // The default session keeps the defaults.
    assert_eq!(Session::new(rhai::Map::new()).limits(), &Limits::DEFAULT);
}
