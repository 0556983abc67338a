//! Safe handles over csrc/c10d_shim.cpp (PyTorch's TCPStore and Gloo process
//! group). Every call returns c10d's message as an error; none can throw.
use anyhow::{bail, Result};
use std::ffi::{c_char, CStr, CString};
use tch::Tensor;
use torch_sys::C_tensor;

#[repr(C)]
struct RawStore {
    _p: [u8; 0],
}
#[repr(C)]
struct RawPg {
    _p: [u8; 0],
}

extern "C" {
    fn tarpo_store_new(
        host: *const c_char,
        port: u16,
        server: bool,
        listen_fd: i32,
        timeout_ms: i64,
        err: *mut c_char,
        len: usize,
    ) -> *mut RawStore;
    fn tarpo_store_free(s: *mut RawStore);
    fn tarpo_store_add(
        s: *mut RawStore,
        key: *const c_char,
        delta: i64,
        out: *mut i64,
        err: *mut c_char,
        len: usize,
    ) -> i32;
    fn tarpo_pg_gloo(
        s: *mut RawStore,
        hostname: *const c_char,
        rank: i32,
        size: i32,
        timeout_ms: i64,
        err: *mut c_char,
        len: usize,
    ) -> *mut RawPg;
    #[cfg(tarpo_nccl)]
    fn tarpo_pg_nccl(
        s: *mut RawStore,
        rank: i32,
        size: i32,
        timeout_ms: i64,
        err: *mut c_char,
        len: usize,
    ) -> *mut RawPg;
    fn tarpo_pg_free(pg: *mut RawPg);
    fn tarpo_pg_allreduce(
        pg: *mut RawPg,
        ts: *const *mut C_tensor,
        n: usize,
        op: i32,
        err: *mut c_char,
        len: usize,
    ) -> i32;
    fn tarpo_pg_broadcast(
        pg: *mut RawPg,
        t: *mut C_tensor,
        root: i32,
        err: *mut c_char,
        len: usize,
    ) -> i32;
    fn tarpo_pg_allgather(
        pg: *mut RawPg,
        input: *mut C_tensor,
        outs: *const *mut C_tensor,
        n: usize,
        err: *mut c_char,
        len: usize,
    ) -> i32;
    fn tarpo_pg_barrier(pg: *mut RawPg, err: *mut c_char, len: usize) -> i32;
}

/// Room for c10d's message.
struct ErrBuf([c_char; 2048]);

impl ErrBuf {
    fn new() -> Self {
        ErrBuf([0; 2048])
    }
    fn ptr(&mut self) -> *mut c_char {
        self.0.as_mut_ptr()
    }
    fn text(&self) -> String {
        // SAFETY: the shim NUL-terminates within the buffer (it is zeroed).
        unsafe { CStr::from_ptr(self.0.as_ptr()) }
            .to_string_lossy()
            .into_owned()
    }
    fn check(&self, rc: i32) -> Result<()> {
        if rc != 0 {
            bail!("{}", self.text());
        }
        Ok(())
    }
}

fn cstr(s: &str) -> Result<CString> {
    Ok(CString::new(s)?)
}

/// The rendezvous key-value store (rank 0 serves it).
pub struct Store(*mut RawStore);

// SAFETY: c10d's TCPStore is used from one thread at a time here, and is
// itself safe to call from several.
unsafe impl Send for Store {}
unsafe impl Sync for Store {}

impl Store {
    /// `listen_fd`: the server's socket, already bound and listening.
    pub fn connect(
        host: &str,
        port: u16,
        server: bool,
        listen_fd: Option<i32>,
        timeout_ms: i64,
    ) -> Result<Store> {
        let mut e = ErrBuf::new();
        let h = cstr(host)?;
        // SAFETY: valid C strings and buffer; the shim returns null on error.
        let p = unsafe {
            tarpo_store_new(
                h.as_ptr(),
                port,
                server,
                listen_fd.unwrap_or(-1),
                timeout_ms,
                e.ptr(),
                2048,
            )
        };
        if p.is_null() {
            bail!("{}", e.text());
        }
        Ok(Store(p))
    }

    pub fn add(&self, key: &str, delta: i64) -> Result<i64> {
        let (mut e, k, mut out) = (ErrBuf::new(), cstr(key)?, 0i64);
        // SAFETY: live store, valid key and out pointer.
        let rc = unsafe { tarpo_store_add(self.0, k.as_ptr(), delta, &mut out, e.ptr(), 2048) };
        e.check(rc)?;
        Ok(out)
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        // SAFETY: created by tarpo_store_new, freed once.
        unsafe { tarpo_store_free(self.0) }
    }
}

/// A c10d process group.
pub struct Group(*mut RawPg);

// SAFETY: c10d backends are thread-safe; tarpo calls them from one thread.
unsafe impl Send for Group {}
unsafe impl Sync for Group {}

/// Reductions of `all_reduce`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Sum = 0,
    Max = 1,
    Min = 2,
}

impl Group {
    /// Gloo over the store; `hostname` is the address this rank listens on.
    pub fn gloo(
        store: &Store,
        hostname: &str,
        rank: usize,
        size: usize,
        timeout_ms: i64,
    ) -> Result<Group> {
        let (mut e, h) = (ErrBuf::new(), cstr(hostname)?);
        // SAFETY: live store, valid string and buffer; null on error.
        let p = unsafe {
            tarpo_pg_gloo(
                store.0,
                h.as_ptr(),
                rank as i32,
                size as i32,
                timeout_ms,
                e.ptr(),
                2048,
            )
        };
        if p.is_null() {
            bail!("{}", e.text());
        }
        Ok(Group(p))
    }

    /// NCCL (CUDA tensors only), when this build has it.
    pub fn nccl(store: &Store, rank: usize, size: usize, timeout_ms: i64) -> Result<Group> {
        #[cfg(tarpo_nccl)]
        {
            let mut e = ErrBuf::new();
            // SAFETY: live store and buffer; null on error.
            let p = unsafe {
                tarpo_pg_nccl(store.0, rank as i32, size as i32, timeout_ms, e.ptr(), 2048)
            };
            if p.is_null() {
                bail!("{}", e.text());
            }
            Ok(Group(p))
        }
        #[cfg(not(tarpo_nccl))]
        {
            let _ = (store, rank, size, timeout_ms);
            bail!("this tarpo was built without NCCL (build.rs compiles it when torch has CUDA and the nvidia-nccl and CUDA header wheels of requirements.txt are installed)")
        }
    }

    /// In place, on contiguous dense tensors of one device.
    pub fn all_reduce(&self, ts: &[Tensor], op: Op) -> Result<()> {
        let mut e = ErrBuf::new();
        let ptrs: Vec<*mut C_tensor> = ts.iter().map(|t| t.as_ptr() as *mut C_tensor).collect();
        // SAFETY: the tensors outlive the call; c10d writes into their storage.
        let rc = unsafe {
            tarpo_pg_allreduce(self.0, ptrs.as_ptr(), ptrs.len(), op as i32, e.ptr(), 2048)
        };
        e.check(rc)
    }

    pub fn broadcast(&self, t: &Tensor, root: usize) -> Result<()> {
        let mut e = ErrBuf::new();
        // SAFETY: as in all_reduce.
        let rc = unsafe {
            tarpo_pg_broadcast(
                self.0,
                t.as_ptr() as *mut C_tensor,
                root as i32,
                e.ptr(),
                2048,
            )
        };
        e.check(rc)
    }

    /// `outs[r]` receives rank r's `input` (all shaped alike).
    pub fn all_gather(&self, input: &Tensor, outs: &[Tensor]) -> Result<()> {
        let mut e = ErrBuf::new();
        let ptrs: Vec<*mut C_tensor> = outs.iter().map(|t| t.as_ptr() as *mut C_tensor).collect();
        // SAFETY: as in all_reduce.
        let rc = unsafe {
            tarpo_pg_allgather(
                self.0,
                input.as_ptr() as *mut C_tensor,
                ptrs.as_ptr(),
                ptrs.len(),
                e.ptr(),
                2048,
            )
        };
        e.check(rc)
    }

    pub fn barrier(&self) -> Result<()> {
        let mut e = ErrBuf::new();
        // SAFETY: live group.
        let rc = unsafe { tarpo_pg_barrier(self.0, e.ptr(), 2048) };
        e.check(rc)
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        // SAFETY: created by tarpo_pg_gloo, freed once.
        unsafe { tarpo_pg_free(self.0) }
    }
}
