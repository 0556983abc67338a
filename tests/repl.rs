//! `tarpo repl` driven through a pseudo-terminal (tests/drivers/repl_pty.py):
//! persistence, completion, multi-line input, errors, a runaway loop stopped
//! by the array limit, Ctrl-C, history, Ctrl-D;
//! and `m.stream` (tests/drivers/stream_pty.py): soft tokens coloured live.
mod common;
use std::path::Path;

/// Runs `tests/drivers/DRIVER tarpo ARGS...`; it must succeed and print `ok`.
fn drive(driver: &str, args: &[&Path], ok: &str) {
    let out = std::process::Command::new(common::python())
        .arg(common::root().join("tests/drivers").join(driver))
        .arg(env!("CARGO_BIN_EXE_tarpo"))
        .args(args)
        .current_dir(common::root())
        .output()
        .expect("run the pty driver");
    let (so, se) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success() && so.contains(ok), "{so}\n{se}");
}

#[test]
fn repl_through_a_pseudo_terminal() {
    let dir = common::scratch("repl");
    let history = dir.join("history");
    let _ = std::fs::remove_file(&history);
    let model = common::tiny_models().join("llama_mha_tied");
    drive("repl_pty.py", &[&model, &history], "repl: ok");
}

#[test]
fn stream_colours_the_soft_tokens_live() {
    drive("stream_pty.py", &[&common::smollm2()], "stream: ok");
}
