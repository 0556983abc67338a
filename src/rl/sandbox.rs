//! Running model-written Python where it cannot hurt: a separate process in
//! its own session, with CPU-time, memory, file-size, open-file and process
//! limits, a wall-clock timeout, bounded captured output, its own temporary
//! directory as working directory and HOME, and the whole process group
//! killed at the end. Started as root (containers, CI), it also gets its own
//! network namespace (no network at all) and drops to user `nobody`, so it
//! can write only its directory and cannot signal the workbench.
//!
//! `score_code` wraps a HumanEval-style check around a completion: the code
//! passes only if `check(entry_point)` returns and a line with a per-call
//! nonce is printed after it, so exiting early with status 0 fails.
use anyhow::{Context, Result};
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The limits of one run.
#[derive(Debug, Clone)]
pub struct Limits {
    pub cpu_seconds: u64,
    pub wall: Duration,
    pub memory_bytes: u64,
    /// Captured bytes per stream; more kills the process.
    pub output_bytes: usize,
    pub file_bytes: u64,
    pub processes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            cpu_seconds: 5,
            wall: Duration::from_secs(10),
            memory_bytes: 1 << 30,
            output_bytes: 64 << 10,
            file_bytes: 16 << 20,
            processes: 32,
        }
    }
}

/// How a run ended.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Exit status (None: killed by a signal).
    pub status: Option<i32>,
    pub timed_out: bool,
    pub output_overflow: bool,
    pub stdout: String,
    pub stderr: String,
}

/// The interpreter: `TARPO_PYTHON`, else the system's `/usr/bin/python3`
/// (user `nobody` cannot enter a virtualenv under /root), else `python3`.
pub fn python() -> PathBuf {
    if let Ok(p) = std::env::var("TARPO_PYTHON") {
        return p.into();
    }
    let system = Path::new("/usr/bin/python3");
    if system.exists() {
        system.into()
    } else {
        "python3".into()
    }
}

/// A fresh private directory for one run.
fn scratch_dir() -> Result<PathBuf> {
    use std::sync::atomic::AtomicU64;
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("tarpo-sandbox-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    Ok(dir)
}

/// Runs `program` (Python source) under `limits`.
pub fn run_python(program: &str, limits: &Limits) -> Result<Outcome> {
    let dir = scratch_dir()?;
    let result = run_in(&dir, program, limits);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn run_in(dir: &Path, program: &str, limits: &Limits) -> Result<Outcome> {
    let file = dir.join("main.py");
    std::fs::write(&file, program).with_context(|| format!("{}: cannot write", file.display()))?;
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        // `nobody` must own its directory to write there.
        let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())?;
        unsafe { libc::chown(c.as_ptr(), NOBODY, NOBODY) };
    }
    let mut cmd = Command::new(python());
    cmd.arg("-I").arg("-B").arg("main.py").current_dir(dir);
    cmd.env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("HOME", dir)
        .env("TMPDIR", dir);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let l = limits.clone();
    // Only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || confine(&l, root));
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start {}", python().display()))?;
    let pgid = child.id() as i32;
    let cap = limits.output_bytes;
    let out = Capture::start(child.stdout.take().context("no stdout pipe")?, cap);
    let err = Capture::start(child.stderr.take().context("no stderr pipe")?, cap);
    let start = Instant::now();
    let mut timed_out = false;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        let overflow = out.overflowed() || err.overflowed();
        if start.elapsed() > limits.wall || overflow {
            timed_out = !overflow;
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
            break child.wait()?;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    // Whatever it left behind in its group goes too.
    unsafe { libc::kill(-pgid, libc::SIGKILL) };
    let (o1, o2) = (out.overflowed(), err.overflowed());
    let (stdout, stderr) = (out.finish(), err.finish());
    Ok(Outcome {
        status: status.code(),
        timed_out,
        output_overflow: o1 || o2,
        stdout,
        stderr,
    })
}

const NOBODY: u32 = 65534;

/// In the child, before exec: own session, limits, no network, no root.
fn confine(l: &Limits, root: bool) -> std::io::Result<()> {
    let check = |r: i32| {
        if r == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    unsafe {
        check(if libc::setsid() < 0 { -1 } else { 0 })?;
        let lim = |res, v: u64| {
            let r = libc::rlimit {
                rlim_cur: v,
                rlim_max: v,
            };
            libc::setrlimit(res, &r)
        };
        check(lim(libc::RLIMIT_CPU, l.cpu_seconds))?;
        check(lim(libc::RLIMIT_AS, l.memory_bytes))?;
        check(lim(libc::RLIMIT_FSIZE, l.file_bytes))?;
        check(lim(libc::RLIMIT_NOFILE, 64))?;
        check(lim(libc::RLIMIT_CORE, 0))?;
        if root {
            check(libc::unshare(libc::CLONE_NEWNET))?;
            check(libc::setgroups(0, std::ptr::null()))?;
            check(libc::setgid(NOBODY))?;
            check(libc::setuid(NOBODY))?;
        }
        // After the uid change: the count is of nobody's processes.
        check(lim(libc::RLIMIT_NPROC, l.processes))?;
    }
    Ok(())
}

/// A stream read to its end on its own thread, keeping the first `cap`
/// bytes and noting whether there were more.
struct Capture {
    thread: std::thread::JoinHandle<Vec<u8>>,
    overflow: Arc<AtomicBool>,
}

impl Capture {
    fn start(mut s: impl Read + Send + 'static, cap: usize) -> Capture {
        let overflow = Arc::new(AtomicBool::new(false));
        let flag = overflow.clone();
        let thread = std::thread::spawn(move || {
            let mut kept = Vec::new();
            let mut buf = [0u8; 8192];
            while let Ok(n @ 1..) = s.read(&mut buf) {
                let room = cap.saturating_sub(kept.len());
                kept.extend_from_slice(&buf[..n.min(room)]);
                if n > room {
                    flag.store(true, Ordering::Relaxed);
                }
            }
            kept
        });
        Capture { thread, overflow }
    }

    fn overflowed(&self) -> bool {
        self.overflow.load(Ordering::Relaxed)
    }

    fn finish(self) -> String {
        String::from_utf8_lossy(&self.thread.join().unwrap_or_default()).to_string()
    }
}

/// The function body a completion continues the prompt with: everything up
/// to the first line that starts at column 0 (a model that goes on to write
/// the next function or a usage example has finished the body, as the
/// stop sequences of the Codex evaluation assume).
pub fn code_body(completion: &str) -> &str {
    let mut at = 0;
    for line in completion.split_inclusive('\n') {
        if at > 0 && line.starts_with(|c: char| !c.is_whitespace()) {
            break;
        }
        at += line.len();
    }
    &completion[..at]
}

/// 1.0 when `prompt + code_body(completion)`, then `test`, then
/// `check(entry_point)` run to the end within `limits`, else 0.0.
pub fn score_code(
    prompt: &str,
    completion: &str,
    test: &str,
    entry_point: &str,
    limits: &Limits,
) -> Result<f64> {
    let nonce = format!("{:016x}", crate::rng::Rng::new(nonce_seed()).next_u64());
    let completion = code_body(completion);
    let program = format!(
        "{GUARD}\n{prompt}{completion}\n\n{test}\n\ncheck({entry_point})\nprint('tarpo-pass-{nonce}')\n"
    );
    let o = run_python(&program, limits)?;
    let passed = o.status == Some(0)
        && !o.output_overflow
        && o.stdout.lines().any(|l| l == format!("tarpo-pass-{nonce}"));
    Ok(if passed { 1.0 } else { 0.0 })
}

/// A Python audit hook (PEP 578, not removable from Python) run before the
/// model's code: no writing, renaming or deleting outside the working
/// directory, no new processes, no signals, no sockets, no native libraries.
/// The OS limits above stay the backstop.
const GUARD: &str = r#"import sys as _tarpo_sys, os as _tarpo_os
def _tarpo_guard(event, args, _cwd=_tarpo_os.getcwd() + "/", _real=_tarpo_os.path.realpath):
    def inside(p):
        return isinstance(p, int) or _real(_tarpo_os.fsdecode(p)).startswith(_cwd)
    if event == "open":
        path, mode, flags = args
        writes = any(c in (mode or "") for c in "wax+") or (isinstance(flags, int) and flags & 0o1103)
        if writes and not inside(path):
            raise PermissionError("sandbox: no writing outside the working directory")
    elif event in ("os.remove", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.link", "os.symlink", "os.truncate", "shutil.rmtree", "os.utime"):
        if not inside(args[0]):
            raise PermissionError("sandbox: " + event + " outside the working directory")
    elif event in ("os.rename", "shutil.move", "shutil.copyfile"):
        if not (inside(args[0]) and inside(args[1])):
            raise PermissionError("sandbox: " + event + " outside the working directory")
    elif event.split(".")[0] in ("socket", "subprocess", "ctypes", "winreg") and event != "socket.gethostname" or event in (
            "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.system", "os.exec", "os.kill", "os.killpg", "signal.pthread_kill", "os.startfile", "pty.spawn"):
        raise PermissionError("sandbox: " + event + " is not allowed")
_tarpo_sys.addaudithook(_tarpo_guard)
del _tarpo_guard
"#;

fn nonce_seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ (std::process::id() as u64) << 32
}
