//! Data parallelism over PyTorch's c10d: the process's place in the job
//! (`world()`), read from torchrun's environment, and the collectives the
//! training loop needs, each bounded by a timeout.
//!
//! Without a launcher (no RANK / WORLD_SIZE) the process is alone: `world()`
//! is rank 0 of 1 and the collectives refuse with a message saying so.
mod ffi;
pub mod launch;
mod rendezvous;
pub mod wire;

use anyhow::{bail, Context, Result};
pub use ffi::Op;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use tch::{Device, Kind, Tensor};

/// Where this process sits in the job.
pub struct World {
    pub rank: usize,
    pub size: usize,
    pub local_rank: usize,
    /// The process group (None when not launched).
    group: Option<ffi::Group>,
    /// Where the collectives' buffers live (host for Gloo, the GPU for NCCL).
    device: Device,
    /// Collective timeout (for messages).
    timeout_s: f64,
    _store: Option<ffi::Store>,
}

static WORLD: OnceLock<World> = OnceLock::new();
static BYTES: AtomicU64 = AtomicU64::new(0);

/// Elements per flat bucket of an all-reduce or broadcast (25 MiB of f32, as DDP).
const BUCKET: i64 = 25 << 18;

/// Joins the job described by the environment (a no-op without a launcher).
/// Call once, before any collective.
pub fn init_from_env() -> Result<&'static World> {
    if let Some(w) = WORLD.get() {
        return Ok(w);
    }
    let w = match rendezvous::Env::read()? {
        None => World::single(),
        Some(env) => {
            let (store, group, device) = env.join()?;
            World {
                device,
                rank: env.rank,
                size: env.size,
                local_rank: env.local_rank,
                group: Some(group),
                timeout_s: env.timeout_ms as f64 / 1e3,
                _store: Some(store),
            }
        }
    };
    Ok(WORLD.get_or_init(|| w))
}

/// This process's world (rank 0 of 1 until `init_from_env` joined a job).
pub fn world() -> &'static World {
    WORLD.get_or_init(World::single)
}

/// Bytes this process has sent into all-reduces so far.
pub fn bytes_reduced() -> u64 {
    BYTES.load(Ordering::Relaxed)
}

impl World {
    fn single() -> World {
        World {
            rank: 0,
            size: 1,
            local_rank: 0,
            device: Device::Cpu,
            group: None,
            timeout_s: 0.0,
            _store: None,
        }
    }

    /// Whether this is the rank that logs, prints and writes checkpoints.
    pub fn is_main(&self) -> bool {
        self.rank == 0
    }

    pub fn launched(&self) -> bool {
        self.group.is_some()
    }

    fn group(&self, what: &str) -> Result<&ffi::Group> {
        self.group.as_ref().with_context(|| {
            format!(
                "{what}: this process is not part of a distributed launch (RANK and WORLD_SIZE are not set); \
                 start the script with `tarpo run --nproc N SCRIPT` or `torchrun --no-python --nproc-per-node N tarpo run SCRIPT`"
            )
        })
    }

    fn failed(&self, what: &str, e: anyhow::Error) -> anyhow::Error {
        e.context(format!(
            "{what} failed on rank {} of {}: a peer exited, or it did not answer within the collective timeout of {} s (TARPO_DIST_TIMEOUT)",
            self.rank, self.size, self.timeout_s
        ))
    }

    /// Reduces `ts` in place across ranks (flattened into buckets on the
    /// backend's device, so any device and float kind works).
    pub fn all_reduce(&self, what: &str, ts: &[Tensor], op: Op) -> Result<()> {
        let g = self.group(what)?;
        for bucket in buckets(ts) {
            let flat = flatten(&bucket, self.device)?;
            BYTES.fetch_add(
                (flat.numel() * flat.kind().elt_size_in_bytes()) as u64,
                Ordering::Relaxed,
            );
            g.all_reduce(std::slice::from_ref(&flat), op)
                .map_err(|e| self.failed(what, e))?;
            unflatten(&flat, &bucket)?;
        }
        Ok(())
    }

    /// Every rank's `ts` become rank `root`'s.
    pub fn broadcast(&self, what: &str, ts: &[Tensor], root: usize) -> Result<()> {
        let g = self.group(what)?;
        for bucket in buckets(ts) {
            let flat = flatten(&bucket, self.device)?;
            g.broadcast(&flat, root).map_err(|e| self.failed(what, e))?;
            unflatten(&flat, &bucket)?;
        }
        Ok(())
    }

    /// Sums (or max / min) of a few numbers across ranks.
    pub fn reduce_f64(&self, what: &str, xs: &mut [f64], op: Op) -> Result<()> {
        let t = Tensor::from_slice(xs);
        self.all_reduce(what, std::slice::from_ref(&t), op)?;
        t.f_copy_data(xs, xs.len())?;
        Ok(())
    }

    /// Every rank's bytes, in rank order.
    pub fn all_gather_bytes(&self, what: &str, data: &[u8]) -> Result<Vec<Vec<u8>>> {
        let g = self.group(what)?;
        let gather = |t: &Tensor| -> Result<Vec<Tensor>> {
            let t = t.f_to_device(self.device)?;
            let outs: Vec<Tensor> = (0..self.size).map(|_| t.empty_like()).collect();
            g.all_gather(&t, &outs).map_err(|e| self.failed(what, e))?;
            outs.iter()
                .map(|o| Ok(o.f_to_device(Device::Cpu)?))
                .collect()
        };
        let lens = gather(&Tensor::from_slice(&[data.len() as i64]))?;
        let lens: Vec<usize> = lens.iter().map(|t| t.int64_value(&[0]) as usize).collect();
        let max = lens.iter().copied().max().unwrap_or(0).max(1);
        let mut padded = data.to_vec();
        padded.resize(max, 0);
        let parts = gather(&Tensor::from_slice(&padded))?;
        let mut out = Vec::with_capacity(self.size);
        for (t, n) in parts.iter().zip(lens) {
            let mut v = vec![0u8; max];
            t.f_copy_data(&mut v, max)?;
            v.truncate(n);
            out.push(v);
        }
        Ok(out)
    }

    pub fn barrier(&self, what: &str) -> Result<()> {
        let g = self.group(what)?;
        g.barrier().map_err(|e| self.failed(what, e))
    }
}

/// Consecutive runs of tensors of one kind, each at most BUCKET elements
/// (a larger tensor is a bucket of its own).
fn buckets(ts: &[Tensor]) -> Vec<Vec<Tensor>> {
    let mut out: Vec<Vec<Tensor>> = Vec::new();
    let mut size = 0;
    for t in ts {
        let n = t.numel() as i64;
        let fits = out
            .last()
            .is_some_and(|b| b[0].kind() == t.kind() && size + n <= BUCKET);
        if !fits {
            out.push(Vec::new());
            size = 0;
        }
        out.last_mut().unwrap().push(t.shallow_clone());
        size += n;
    }
    out
}

/// One contiguous host buffer holding the bucket's values.
fn flatten(bucket: &[Tensor], device: Device) -> Result<Tensor> {
    let views: Vec<Tensor> = bucket
        .iter()
        .map(|t| t.reshape([-1]).to_device(device))
        .collect();
    let kind = bucket.first().map_or(Kind::Float, |t| t.kind());
    Ok(Tensor::f_cat(&views, 0)?.f_to_kind(kind)?.contiguous())
}

/// Writes the reduced buffer back into the bucket's tensors.
fn unflatten(flat: &Tensor, bucket: &[Tensor]) -> Result<()> {
    let mut at = 0;
    for t in bucket {
        let n = t.numel() as i64;
        let part = flat.f_narrow(0, at, n)?.f_view(t.size().as_slice())?;
        let mut t = t.shallow_clone();
        t.f_copy_(&part.f_to_device(t.device())?)?;
        at += n;
    }
    if at != flat.numel() as i64 {
        bail!(
            "internal: bucket of {} elements, tensors of {at}",
            flat.numel()
        );
    }
    Ok(())
}
