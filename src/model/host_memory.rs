//! How the host allocator treats the large tensors of a training step.
//!
//! glibc serves a block above its mmap threshold (dynamic, at most 32 MB)
//! with a fresh mapping and unmaps it on free, and it hands freed heap back
//! to the OS above 128 KB. A replay's (B, T, V) logits chunks, their
//! gradients and the activations of every micro-batch are such blocks, so
//! each one faults its pages in again and the kernel zeroes them: about a
//! fifth of a LoRA GRPO step on SmolLM2-135M (benches/train_step.rs, perf:
//! `clear_page_erms` and page faults). Raising both thresholds lets the next
//! micro-batch reuse the memory the last one freed; the process keeps its
//! peak heap, as a caching allocator does. This holds for the main
//! thread's arena, where the CLI and scripts run: another thread's arena
//! maps every block over 64 MB afresh whatever the thresholds.
//!
//! Skipped where the user tunes malloc (GLIBC_TUNABLES naming malloc) or
//! asks for glibc's defaults (TARPO_MALLOC=default).

/// Blocks up to this size come from the heap, and this much free heap is kept.
const KEEP: i32 = 1 << 30;

/// Sets the thresholds once per process (on glibc; elsewhere nothing).
pub fn keep_freed_memory() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let tuned = std::env::var("GLIBC_TUNABLES").is_ok_and(|v| v.contains("malloc"));
        let default = std::env::var("TARPO_MALLOC").is_ok_and(|v| v == "default");
        if !tuned && !default {
            set_thresholds();
        }
    });
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn set_thresholds() {
    // SAFETY: mallopt only changes glibc's allocation policy; both values
    // are in its accepted range.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, KEEP);
        libc::mallopt(libc::M_TRIM_THRESHOLD, KEEP);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set_thresholds() {}
