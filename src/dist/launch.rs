//! `tarpo run --nproc N`: what `torchrun --no-python --nproc-per-node N tarpo
//! run ...` does on one machine. N copies of this command, each with RANK,
//! WORLD_SIZE, LOCAL_RANK and MASTER_ADDR/PORT (loopback, a free port); when
//! one fails the others get a grace period to report, then are stopped.
//!
//! The launcher binds the rendezvous port itself and hands the listening
//! socket to rank 0 (TARPO_STORE_FD), so no other job can take the port
//! between its choice and rank 0's start (a probed-then-released port can).
use anyhow::{bail, Context, Result};
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// How long the other ranks may take to exit after one failed (they see the
/// lost peer at their next collective).
const GRACE: Duration = Duration::from_secs(15);

/// Runs the job; returns the exit code (the first failing rank's, or 0).
pub fn local(n: usize, threads: Option<i32>) -> Result<i32> {
    if n == 0 {
        bail!("--nproc 0: a job has at least one process");
    }
    if std::env::var("RANK").is_ok() {
        bail!("--nproc inside a distributed launch (RANK is set): let the launcher start the processes");
    }
    let exe = std::env::current_exe().context("cannot find the tarpo executable")?;
    let args = child_args();
    let listener =
        TcpListener::bind("127.0.0.1:0").context("cannot open a rendezvous port on loopback")?;
    let port = listener.local_addr()?.port();
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    let per = threads.unwrap_or_else(|| (cores / n).max(1) as i32);
    let mut kids: Vec<Child> = Vec::with_capacity(n);
    for rank in 0..n {
        let mut cmd = Command::new(&exe);
        if rank == 0 {
            inherit(&mut cmd, &listener);
        }
        let child = cmd
            .arg("--threads")
            .arg(per.to_string())
            .args(&args)
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("WORLD_SIZE", n.to_string())
            .env("LOCAL_WORLD_SIZE", n.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .spawn()
            .with_context(|| format!("cannot start rank {rank}"));
        match child {
            Ok(c) => kids.push(c),
            Err(e) => {
                stop(&mut kids);
                return Err(e);
            }
        }
    }
    wait_all(kids)
}

/// This command's arguments without `--nproc N` and `--threads T` (given
/// to every child explicitly).
fn child_args() -> Vec<String> {
    let mut out = Vec::new();
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        if a == "--nproc" || a == "--threads" {
            it.next();
        } else if !(a.starts_with("--nproc=") || a.starts_with("--threads=")) {
            out.push(a);
        }
    }
    out
}

/// Rank 0 keeps `listener` open across exec and learns its number.
fn inherit(cmd: &mut Command, listener: &TcpListener) {
    use std::os::unix::process::CommandExt;
    let fd = listener.as_raw_fd();
    cmd.env(super::rendezvous::STORE_FD, fd.to_string());
    // SAFETY: only fcntl (async-signal-safe) between fork and exec, on an fd
    // the parent keeps open until the children have exited.
    unsafe {
        cmd.pre_exec(move || {
            if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

fn wait_all(mut kids: Vec<Child>) -> Result<i32> {
    let mut codes: Vec<Option<i32>> = vec![None; kids.len()];
    let mut failed_at: Option<Instant> = None;
    let mut first_failure = 0;
    loop {
        for (rank, k) in kids.iter_mut().enumerate() {
            if codes[rank].is_some() {
                continue;
            }
            if let Some(status) = k.try_wait()? {
                let code = status.code().unwrap_or(1);
                codes[rank] = Some(code);
                if code != 0 && failed_at.is_none() {
                    eprintln!("tarpo run --nproc: rank {rank} exited with status {code}");
                    failed_at = Some(Instant::now());
                    first_failure = code;
                }
            }
        }
        if codes.iter().all(Option::is_some) {
            return Ok(first_failure);
        }
        if failed_at.is_some_and(|t| t.elapsed() > GRACE) {
            eprintln!(
                "tarpo run --nproc: stopping the ranks still running {} s after the failure",
                GRACE.as_secs()
            );
            stop(&mut kids);
            return Ok(first_failure);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn stop(kids: &mut [Child]) {
    for k in kids.iter_mut() {
        let _ = k.kill();
        let _ = k.wait();
    }
}
