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
//!
//! `pack_weights` moves a model's CPU weights into one buffer backed by
//! transparent huge pages: a decode step streams every weight once, and
//! with 4 KiB pages the hardware prefetchers stop at every page boundary
//! (measured here: a 3 x 8 row kernel streaming 538 MB reads 22 GB/s on 4 KiB
//! pages, 29 GB/s on 2 MiB ones). TARPO_HUGEPAGES=0 keeps the weights where
//! they were loaded.
use anyhow::Result;
use tch::{Device, Kind, Tensor};

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

/// Copies every CPU tensor of `ts` (f32 or bf16, contiguous) into one
/// buffer per dtype, advised to the kernel as huge pages before it is first
/// touched, and points each tensor at its place in it (`set_`: every handle
/// on the tensor sees the move). Values are unchanged.
pub fn pack_weights(ts: &[&Tensor]) -> Result<()> {
    if std::env::var("TARPO_HUGEPAGES").is_ok_and(|v| v == "0") {
        return Ok(());
    }
    let _g = tch::no_grad_guard();
    for kind in [Kind::Float, Kind::BFloat16] {
        let group: Vec<&Tensor> = (ts.iter().copied())
            .filter(|t| t.device() == Device::Cpu && t.kind() == kind && t.is_contiguous())
            .collect();
        // Each tensor starts on a 64-byte line (the kernels' loads).
        let align = 64 / kind.elt_size_in_bytes() as i64;
        let round = |n: i64| (n + align - 1) / align * align;
        let total: i64 = group.iter().map(|t| round(t.numel() as i64)).sum();
        if total == 0 {
            continue;
        }
        let flat = Tensor::f_empty([total], (kind, Device::Cpu))?;
        advise_huge(
            flat.data_ptr() as usize,
            total as usize * kind.elt_size_in_bytes(),
        );
        let mut at = 0;
        for t in group {
            let n = t.numel() as i64;
            flat.f_narrow(0, at, n)?.f_copy_(&t.f_reshape([n])?)?;
            let (size, stride) = (t.size(), t.stride());
            let _ = t
                .shallow_clone()
                .f_set_source_tensor_storage_offset_(&flat, at, size, stride)?;
            at += round(n);
        }
    }
    Ok(())
}

/// madvise(MADV_HUGEPAGE) over the whole 2 MiB pages inside [at, at + len).
#[cfg(target_os = "linux")]
fn advise_huge(at: usize, len: usize) {
    const HUGE: usize = 2 << 20;
    let start = at.div_ceil(HUGE) * HUGE;
    let end = (at + len) / HUGE * HUGE;
    if end > start {
        // SAFETY: a hint over pages of a live allocation; it changes how the
        // kernel backs them, not their contents or protection.
        unsafe {
            libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn advise_huge(_at: usize, _len: usize) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_weights_keep_their_values_and_every_handle_follows() {
        let a = Tensor::randn([3, 5], (Kind::Float, Device::Cpu));
        let b = Tensor::randn([7], (Kind::Float, Device::Cpu));
        let c = Tensor::randn([4, 2], (Kind::BFloat16, Device::Cpu));
        let (a0, b0, c0) = (a.copy(), b.copy(), c.copy());
        let held = a.shallow_clone();
        pack_weights(&[&a, &b, &c]).unwrap();
        assert!(a.equal(&a0) && b.equal(&b0) && c.equal(&c0));
        assert_eq!(
            (a.size(), b.size(), c.size()),
            (vec![3, 5], vec![7], vec![4, 2])
        );
        // One f32 buffer, each tensor on its own 64-byte line.
        assert_eq!(held.data_ptr(), a.data_ptr());
        assert_eq!(b.data_ptr() as usize - a.data_ptr() as usize, 16 * 4);
        assert!(a.is_contiguous() && b.is_contiguous() && c.is_contiguous());
        // Writes through one handle reach the others; neighbours are untouched.
        let _ = tch::no_grad(|| held.shallow_clone().fill_(2.0));
        assert_eq!(a.double_value(&[2, 4]), 2.0);
        assert!(b.equal(&b0));
    }
}
