//! A few helper threads that wait for work by spinning, then park.
//!
//! A decode step calls the small-batch matmul ~200 times with short libtorch
//! ops in between. Rayon's workers fall asleep in those gaps, and waking them
//! (a futex and a reschedule) cost about as much as the matmul itself. These
//! helpers spin for `SPIN` after each job before they park, so the calls of
//! one step find them awake. The calling thread takes part 0 of every job.
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long an idle helper spins before it parks.
const SPIN: Duration = Duration::from_micros(400);

type Job = dyn Fn(usize) + Sync;

struct Shared {
    /// Bumped once per job; a helper runs each epoch once.
    epoch: AtomicU64,
    /// The current job (a borrowed closure, valid until `pending` is 0).
    job: Mutex<Option<&'static Job>>,
    /// Helpers still running the current job.
    pending: AtomicUsize,
    parked: Mutex<usize>,
    wake: Condvar,
}

pub struct SpinPool {
    shared: Arc<Shared>,
    helpers: usize,
    /// One job at a time; a caller that finds it busy runs its job alone.
    busy: Mutex<()>,
}

impl SpinPool {
    /// The process's pool: one helper per core beyond the first.
    pub fn global() -> &'static SpinPool {
        static POOL: OnceLock<SpinPool> = OnceLock::new();
        POOL.get_or_init(|| {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            SpinPool::new(cores.saturating_sub(1))
        })
    }

    fn new(helpers: usize) -> SpinPool {
        let shared = Arc::new(Shared {
            epoch: AtomicU64::new(0),
            job: Mutex::new(None),
            pending: AtomicUsize::new(0),
            parked: Mutex::new(0),
            wake: Condvar::new(),
        });
        for part in 1..=helpers {
            let s = shared.clone();
            std::thread::Builder::new()
                .name(format!("tarpo-spin-{part}"))
                .spawn(move || helper(&s, part))
                .expect("spawning a matmul helper thread");
        }
        SpinPool {
            shared,
            helpers,
            busy: Mutex::new(()),
        }
    }

    /// Parts a job is split into when the pool is free.
    pub fn parts(&self) -> usize {
        self.helpers + 1
    }

    /// Runs `f(part)` for every part in 0..parts() (part 0 on this thread)
    /// and returns when all are done; `f(0)` alone if another job is running.
    fn run(&self, f: &(dyn Fn(usize, usize) + Sync)) {
        let Ok(_busy) = self.busy.try_lock() else {
            return f(0, 1);
        };
        let parts = self.parts();
        let job = move |p: usize| f(p, parts);
        // SAFETY: the helpers drop the reference before `pending` reaches 0,
        // and this function waits for that before `job` goes out of scope.
        let job =
            unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync + '_), &'static Job>(&job) };
        *self.shared.job.lock().unwrap_or_else(|e| e.into_inner()) = Some(job);
        self.shared.pending.store(self.helpers, Ordering::Release);
        self.shared.epoch.fetch_add(1, Ordering::AcqRel);
        if *self.shared.parked.lock().unwrap_or_else(|e| e.into_inner()) > 0 {
            self.shared.wake.notify_all();
        }
        job(0);
        while self.shared.pending.load(Ordering::Acquire) > 0 {
            std::hint::spin_loop();
        }
        *self.shared.job.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Runs `f` on every part with one shared supply of the ranges of
    /// 0..total, `chunk` at a time: a part that starts late or runs slow
    /// takes fewer. Returns when all ranges are done.
    pub fn share(&self, total: usize, chunk: usize, f: &(dyn Fn(Chunks) + Sync)) {
        let next = AtomicUsize::new(0);
        self.run(&|_, _| {
            f(Chunks {
                next: &next,
                total,
                chunk,
            })
        });
    }
}

/// The ranges one part takes from `SpinPool::share`'s supply.
pub struct Chunks<'a> {
    next: &'a AtomicUsize,
    total: usize,
    chunk: usize,
}

impl Iterator for Chunks<'_> {
    type Item = std::ops::Range<usize>;

    fn next(&mut self) -> Option<Self::Item> {
        let lo = self.next.fetch_add(self.chunk, Ordering::Relaxed);
        (lo < self.total).then(|| lo..(lo + self.chunk).min(self.total))
    }
}

/// An f32 output the parts of a job write at once, each its own elements.
pub struct SharedOut(*mut f32);
// SAFETY: writers promise disjoint elements (`write`), and the job that owns
// the buffer outlives them (`run` returns after every part).
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// # Safety
    /// `at` points at a buffer of f32 that outlives the job.
    pub unsafe fn new(at: *mut f32) -> SharedOut {
        SharedOut(at)
    }

    /// Writes `vals` at element `at`.
    /// # Safety
    /// `at..at + vals.len()` is inside the buffer and no other part writes it.
    pub unsafe fn write(&self, at: usize, vals: &[f32]) {
        unsafe { std::ptr::copy_nonoverlapping(vals.as_ptr(), self.0.add(at), vals.len()) }
    }
}

fn helper(s: &Shared, part: usize) {
    let mut seen = 0;
    loop {
        let mut since = Instant::now();
        let mut spins = 0u32;
        let epoch = loop {
            let e = s.epoch.load(Ordering::Acquire);
            if e != seen {
                break e;
            }
            spins = spins.wrapping_add(1);
            // Reading the clock costs more than a spin: look every 64th.
            if !spins.is_multiple_of(64) || since.elapsed() < SPIN {
                std::hint::spin_loop();
                continue;
            }
            let mut parked = s.parked.lock().unwrap_or_else(|e| e.into_inner());
            *parked += 1;
            while s.epoch.load(Ordering::Acquire) == seen {
                parked = s.wake.wait(parked).unwrap_or_else(|e| e.into_inner());
            }
            *parked -= 1;
            since = Instant::now();
        };
        seen = epoch;
        let job = *s.job.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(job) = job {
            job(part);
        }
        s.pending.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_ranges_cover_the_total_once() {
        let pool = SpinPool::new(3);
        for (total, chunk) in [(1000, 96), (7, 1), (5, 10), (0, 4)] {
            let hits: Vec<AtomicUsize> = (0..total).map(|_| AtomicUsize::new(0)).collect();
            pool.share(total, chunk, &|chunks| {
                for r in chunks {
                    assert!(r.len() <= chunk && r.end <= total, "{r:?}");
                    r.for_each(|i| _ = hits[i].fetch_add(1, Ordering::Relaxed));
                }
            });
            assert!(
                hits.iter().all(|h| h.load(Ordering::Relaxed) == 1),
                "{total}/{chunk}"
            );
        }
    }

    #[test]
    fn every_part_runs_once_per_job() {
        let pool = SpinPool::new(3);
        for round in 0..200 {
            let hits: Vec<AtomicUsize> = (0..4).map(|_| AtomicUsize::new(0)).collect();
            pool.run(&|p, n| {
                assert_eq!(n, 4);
                hits[p].fetch_add(1, Ordering::Relaxed);
            });
            let got: Vec<usize> = hits.iter().map(|h| h.load(Ordering::Relaxed)).collect();
            assert_eq!(got, vec![1; 4], "round {round}");
            if round % 50 == 0 {
                std::thread::sleep(SPIN * 3); // helpers park, then must wake
            }
        }
    }
}
