//! `host_memory::keep_freed_memory` on the main thread (glibc's main arena,
//! where the CLI and scripts allocate): a freed large block is reused without
//! faulting its pages in again. No libtest harness: its tests run on other
//! threads, whose arenas always map large blocks afresh.

/// Minor page faults of this thread so far.
fn faults() -> i64 {
    // SAFETY: getrusage fills the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut u) }, 0);
    u.ru_minflt
}

/// Allocates `bytes`, writes one byte per page, frees; returns the faults.
fn touch(bytes: usize) -> i64 {
    let before = faults();
    let mut v: Vec<u8> = Vec::with_capacity(bytes);
    let p = v.as_mut_ptr();
    for i in (0..bytes).step_by(4096) {
        // SAFETY: i < capacity.
        unsafe { p.add(i).write_volatile(1) };
    }
    drop(v);
    faults() - before
}

fn main() {
    for var in ["GLIBC_TUNABLES", "TARPO_MALLOC"] {
        assert!(
            std::env::var_os(var).is_none(),
            "host_memory test: unset {var} (it measures glibc's defaults, then tarpo's setting)"
        );
    }
    let bytes = 96 << 20; // above glibc's largest dynamic mmap threshold (32 MB)
    let pages = (bytes / 4096) as i64;
    // glibc's defaults: every use maps and faults all pages afresh.
    let (a, b) = (touch(bytes), touch(bytes));
    assert!(
        a > pages / 2 && b > pages / 2,
        "defaults: {a} and {b} of {pages} pages faulted"
    );
    tarpo::model::host_memory::keep_freed_memory();
    let first = touch(bytes);
    let again = touch(bytes);
    assert!(
        again < pages / 100,
        "kept: the reuse faulted {again} of {pages} pages (the first use {first})"
    );
    println!(
        "host_memory: defaults faulted {a}, {b}; kept {first}, then {again} of {pages} pages: ok"
    );
}
