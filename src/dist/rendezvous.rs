//! Joining a job: torchrun's environment, the TCPStore at MASTER_ADDR, a
//! check that every process agrees on WORLD_SIZE, then the Gloo group. Each
//! wait has a deadline, so a wrong variable fails in seconds, naming it.
use super::ffi::{Group, Store};
use anyhow::{bail, Context, Result};
use std::time::{Duration, Instant};
use tch::Device;

enum Backend {
    Gloo,
    Nccl,
}

/// What torchrun (or `tarpo run --nproc`) puts in the environment.
pub struct Env {
    pub rank: usize,
    pub size: usize,
    pub local_rank: usize,
    addr: String,
    port: u16,
    /// torchrun's agent already serves the store (rank 0 only connects).
    agent_store: bool,
    /// Rank 0's store socket, already listening (from `tarpo run --nproc`).
    listen_fd: Option<i32>,
    /// Keys of this attempt (torchrun restarts a failed job under a new count).
    prefix: String,
    init_ms: i64,
    pub timeout_ms: i64,
}

/// The variable through which `tarpo run --nproc` hands rank 0 its socket.
pub const STORE_FD: &str = "TARPO_STORE_FD";

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn parse<T: std::str::FromStr>(name: &str, v: &str, what: &str) -> Result<T> {
    v.trim()
        .parse()
        .map_err(|_| anyhow::anyhow!("{name}={v:?} is not {what}"))
}

fn seconds(name: &str, default: f64) -> Result<i64> {
    let s = match var(name) {
        Some(v) => parse::<f64>(name, &v, "a number of seconds")?,
        None => default,
    };
    if !(s > 0.0 && s.is_finite()) {
        bail!("{name}={s} must be a positive number of seconds");
    }
    Ok((s * 1e3) as i64)
}

/// The inherited listening socket named by TARPO_STORE_FD, checked to be
/// bound to `port` (a stale variable must not hand the store another file).
fn listen_fd(port: u16) -> Result<Option<i32>> {
    let Some(v) = var(STORE_FD) else {
        return Ok(None);
    };
    let fd: i32 = parse(STORE_FD, &v, "a file descriptor")?;
    // SAFETY: getsockname writes at most `len` bytes into `addr`.
    let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    let rc =
        unsafe { libc::getsockname(fd, (&mut addr as *mut libc::sockaddr_in).cast(), &mut len) };
    let bound = rc == 0
        && i32::from(addr.sin_family) == libc::AF_INET
        && u16::from_be(addr.sin_port) == port;
    if !bound {
        bail!("{STORE_FD}={fd} is not a socket bound to MASTER_PORT={port} (tarpo run --nproc sets it for rank 0; unset it)");
    }
    Ok(Some(fd))
}

impl Env {
    /// None when no launcher set RANK / WORLD_SIZE.
    pub fn read() -> Result<Option<Env>> {
        let (rank, size) = match (var("RANK"), var("WORLD_SIZE")) {
            (None, None) => return Ok(None),
            (Some(_), None) => bail!(
                "RANK is set but WORLD_SIZE is not: a distributed launch sets both (torchrun does)"
            ),
            (None, Some(_)) => bail!(
                "WORLD_SIZE is set but RANK is not: a distributed launch sets both (torchrun does)"
            ),
            (Some(r), Some(w)) => (r, w),
        };
        let size: usize = parse("WORLD_SIZE", &size, "a process count")?;
        let rank: usize = parse("RANK", &rank, "a rank (0, 1, ...)")?;
        if size == 0 {
            bail!("WORLD_SIZE=0: a job has at least one process");
        }
        if rank >= size {
            bail!(
                "RANK={rank} is not below WORLD_SIZE={size} (ranks are 0..{})",
                size - 1
            );
        }
        let local_rank = match var("LOCAL_RANK") {
            Some(v) => parse("LOCAL_RANK", &v, "a rank on this node")?,
            None => 0,
        };
        let addr = var("MASTER_ADDR").context(
            "MASTER_ADDR is not set: the address of rank 0's machine (torchrun sets it)",
        )?;
        let port = var("MASTER_PORT").context(
            "MASTER_PORT is not set: the rendezvous port on MASTER_ADDR (torchrun sets it)",
        )?;
        let port: u16 = parse("MASTER_PORT", &port, "a TCP port")?;
        let agent_store =
            var("TORCHELASTIC_USE_AGENT_STORE").is_some_and(|v| v.eq_ignore_ascii_case("true"));
        // Rank 0 serves the store, unless torchrun's agent does.
        let listen_fd = if rank == 0 && !agent_store {
            listen_fd(port)?
        } else {
            None
        };
        let restart = var("TORCHELASTIC_RESTART_COUNT").unwrap_or_else(|| "0".into());
        Ok(Some(Env {
            rank,
            size,
            local_rank,
            addr,
            port,
            agent_store,
            listen_fd,
            prefix: format!("tarpo/{restart}/"),
            init_ms: seconds("TARPO_DIST_INIT_TIMEOUT", 60.0)?,
            timeout_ms: seconds("TARPO_DIST_TIMEOUT", 300.0)?,
        }))
    }

    fn at(&self) -> String {
        format!("MASTER_ADDR={} MASTER_PORT={}", self.addr, self.port)
    }

    /// Connects, checks the job's shape, and makes the Gloo group.
    pub fn join(&self) -> Result<(Store, Group, Device)> {
        let secs = self.init_ms as f64 / 1e3;
        let server = self.rank == 0 && !self.agent_store;
        let store = Store::connect(&self.addr, self.port, server, self.listen_fd, self.init_ms).map_err(|e| {
            e.context(format!(
                "rank {}: cannot reach the rendezvous store at {} within {secs} s (TARPO_DIST_INIT_TIMEOUT): is MASTER_ADDR rank 0's address, and MASTER_PORT free there?",
                self.rank,
                self.at()
            ))
        })?;
        self.check_shape(&store)?;
        // Peers listen on loopback when the job is on one machine.
        let local = ["127.0.0.1", "localhost", "::1"].contains(&self.addr.as_str());
        let host = var("TARPO_GLOO_HOST").unwrap_or_else(|| {
            if local {
                self.addr.clone()
            } else {
                String::new()
            }
        });
        let (group, device) = match self.backend()? {
            Backend::Gloo => (
                Group::gloo(&store, &host, self.rank, self.size, self.timeout_ms),
                Device::Cpu,
            ),
            Backend::Nccl => (
                Group::nccl(&store, self.rank, self.size, self.timeout_ms),
                Device::Cuda(self.local_rank),
            ),
        };
        let group = group.map_err(|e| {
            e.context(format!(
                "rank {}: the process group did not form",
                self.rank
            ))
        })?;
        Ok((store, group, device))
    }

    /// TARPO_DIST_BACKEND: `nccl` on this rank's GPU, `gloo` (host buffers:
    /// any device), or `auto` (default): NCCL when built and a GPU is there.
    fn backend(&self) -> Result<Backend> {
        let gpu = tch::Cuda::device_count() as usize > self.local_rank;
        let v = var("TARPO_DIST_BACKEND").unwrap_or_else(|| "auto".into());
        Ok(match v.as_str() {
            "gloo" => Backend::Gloo,
            "nccl" if !gpu => bail!(
                "TARPO_DIST_BACKEND=nccl: no CUDA device {} on this machine (LOCAL_RANK={}); use gloo",
                self.local_rank, self.local_rank
            ),
            "nccl" => Backend::Nccl,
            "auto" if gpu && cfg!(tarpo_nccl) => Backend::Nccl,
            "auto" => Backend::Gloo,
            _ => bail!("TARPO_DIST_BACKEND={v:?} is not gloo, nccl or auto"),
        })
    }

    /// Every rank registers once with its WORLD_SIZE; waits until WORLD_SIZE
    /// have, failing at once when two disagree or a rank is taken twice.
    fn check_shape(&self, store: &Store) -> Result<()> {
        let key = |k: &str| format!("{}{k}", self.prefix);
        let taken = store.add(&key(&format!("rank/{}", self.rank)), 1)?;
        if taken > 1 {
            bail!(
                "RANK={} is used by another process of this job (each process needs its own RANK)",
                self.rank
            );
        }
        // One counter, so a reader never sees half a registration: the low
        // 20 bits count processes, the rest sum their WORLD_SIZEs.
        const LOW: i64 = 1 << 20;
        store.add(&key("joined"), 1 + LOW * self.size as i64)?;
        let deadline = Instant::now() + Duration::from_millis(self.init_ms as u64);
        let lost = |e: anyhow::Error| {
            e.context(format!(
                "rank {}: lost the rendezvous store at {} while waiting for WORLD_SIZE={} processes (rank 0 gave up: is WORLD_SIZE right?)",
                self.rank,
                self.at(),
                self.size
            ))
        };
        loop {
            let v = store.add(&key("joined"), 0).map_err(lost)?;
            let (joined, sizes) = (v % LOW, v / LOW);
            if sizes != joined * self.size as i64 {
                bail!(
                    "the processes disagree on WORLD_SIZE: this one (RANK={}) has WORLD_SIZE={}, the {joined} joined so far sum to {sizes}",
                    self.rank, self.size
                );
            }
            if joined > self.size as i64 {
                bail!(
                    "{joined} processes joined the rendezvous at {}, more than WORLD_SIZE={}",
                    self.at(),
                    self.size
                );
            }
            if joined == self.size as i64 {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "only {joined} of WORLD_SIZE={} processes joined the rendezvous at {} within {} s (TARPO_DIST_INIT_TIMEOUT): is WORLD_SIZE right, and did every rank start?",
                    self.size,
                    self.at(),
                    self.init_ms as f64 / 1e3
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
