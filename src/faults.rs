//! Fault injection for the crash and numerical-fault tests.
//!
//! `TARPO_FAULTS` lists `ACTION@POINT:N` entries, comma-separated. The N-th
//! time this process passes POINT, ACTION happens: `kill` sends SIGKILL to
//! the process (a crash at exactly that place), `nan` makes the value the
//! point guards non-finite. Unset (always, outside tests), a hook costs one
//! load of a `OnceLock`.
//!
//! Points: `rollout.step` (a decode step), `replay.backward` (a replay
//! micro-batch's backward), `optimizer.step` (between parameter updates),
//! `checkpoint.file` (a checkpoint file written, before the next),
//! `checkpoint.rename` (a checkpoint in place, `latest` not yet moved),
//! `metrics.append` (half of a metrics.jsonl line written), `file.rename`
//! (an atomically written file complete under its temporary name);
//! `nan` at `loss` (a replay loss chunk: its gradients too) and `grad.GROUP` (the
//! gradients of optimizer group GROUP, e.g. `grad.router`, at a step).
use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

#[derive(Debug, Clone, PartialEq)]
struct Fault {
    kill: bool,
    point: String,
    at: u64,
}

struct Faults {
    list: Vec<Fault>,
    hits: Mutex<HashMap<String, u64>>,
}

fn faults() -> Option<&'static Faults> {
    static FAULTS: OnceLock<Option<Faults>> = OnceLock::new();
    FAULTS
        .get_or_init(|| {
            let spec = std::env::var("TARPO_FAULTS").ok()?;
            match parse(&spec) {
                Ok(list) => Some(Faults {
                    list,
                    hits: Mutex::new(HashMap::new()),
                }),
                Err(e) => {
                    // A test hook set wrong: stop before anything runs on a
                    // plan the test did not mean.
                    eprintln!("error: TARPO_FAULTS: {e}");
                    std::process::exit(2);
                }
            }
        })
        .as_ref()
}

fn parse(spec: &str) -> Result<Vec<Fault>, String> {
    let entry = |e: &str| -> Option<Fault> {
        let (action, rest) = e.split_once('@')?;
        let (point, at) = rest.rsplit_once(':')?;
        let kill = match action {
            "kill" => true,
            "nan" => false,
            _ => return None,
        };
        let at = at.parse().ok().filter(|&n| n >= 1)?;
        Some(Fault {
            kill,
            point: point.to_string(),
            at,
        })
    };
    (spec.split(',').map(str::trim).filter(|e| !e.is_empty()))
        .map(|e| {
            entry(e).ok_or_else(|| format!("{e:?}: expected kill@POINT:N or nan@POINT:N (N >= 1)"))
        })
        .collect()
}

/// Counts a pass of `point`; true when a fault of this kind is due now.
fn due(point: &str, kill: bool) -> bool {
    let Some(f) = faults() else {
        return false;
    };
    if !f.list.iter().any(|x| x.point == point && x.kill == kill) {
        return false;
    }
    let mut hits = f.hits.lock().unwrap_or_else(|e| e.into_inner());
    let n = hits.entry(format!("{kill}{point}")).or_insert(0);
    *n += 1;
    let n = *n;
    f.list
        .iter()
        .any(|x| x.point == point && x.kill == kill && x.at == n)
}

/// A crash point: SIGKILL here when `TARPO_FAULTS` says so.
pub fn point(name: &str) {
    if due(name, true) {
        // SAFETY: kill(2) on our own pid; SIGKILL cannot be caught.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
}

/// Whether the value guarded by `name` should be made non-finite now.
pub fn nan(name: &str) -> bool {
    due(name, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_parse_and_bad_ones_are_named() {
        let got = parse("kill@checkpoint.file:3, nan@grad.router:2").unwrap();
        assert_eq!(
            got,
            vec![
                Fault {
                    kill: true,
                    point: "checkpoint.file".into(),
                    at: 3
                },
                Fault {
                    kill: false,
                    point: "grad.router".into(),
                    at: 2
                },
            ]
        );
        for bad in ["kill@x", "stop@x:1", "nan@x:0", "kill@x:y"] {
            let e = parse(bad).unwrap_err();
            assert!(e.contains(bad), "{e}");
        }
    }
}
