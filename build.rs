//! Link libtorch so the binary runs without LD_LIBRARY_PATH and keeps CUDA.
//!
//! torch-sys finds libtorch through the Python on PATH (LIBTORCH_USE_PYTORCH=1)
//! or LIBTORCH. We add an rpath to that lib directory, and `--no-as-needed` so the
//! linker keeps libtorch_cuda even though no symbol of it is referenced directly
//! (without it CUDA silently disappears from the binary).
use std::path::{Path, PathBuf};
use std::process::Command;

fn torch_lib_dir() -> Option<PathBuf> {
    if let Ok(dir) = std::env::var("LIBTORCH") {
        return Some(PathBuf::from(dir).join("lib"));
    }
    let python = std::env::var("PYTHON_SYS_EXECUTABLE").unwrap_or_else(|_| "python3".into());
    let out = Command::new(python)
        .args([
            "-c",
            "import torch, os; print(os.path.dirname(torch.__file__))",
        ])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let dir = String::from_utf8(out.stdout).ok()?;
    Some(PathBuf::from(dir.trim()).join("lib"))
}

/// csrc/c10d_shim.cpp against the torch headers beside `lib` (the wheel's
/// include/), with csrc/gloo_decls standing in for gloo's headers, which the
/// wheel does not ship (csrc/gloo_decls/README.md); and csrc/c10d_nccl.cpp
/// when torch has CUDA and the NCCL and CUDA headers are installed.
fn build_c10d_shim(lib: &Path) {
    let include = lib.parent().expect("torch lib dir").join("include");
    println!("cargo:rerun-if-changed=csrc");
    println!("cargo::rustc-check-cfg=cfg(tarpo_nccl)");
    let mut b = cc::Build::new();
    if let Some(cuda) = nccl_includes(lib) {
        b.file("csrc/c10d_nccl.cpp").define("USE_C10D_NCCL", None);
        for dir in cuda {
            b.include(dir);
        }
        println!("cargo:rustc-cfg=tarpo_nccl");
    }
    b.cpp(true)
        .std("c++17")
        .file("csrc/c10d_shim.cpp")
        .include("csrc/gloo_decls")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .define("USE_C10D_GLOO", None)
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .warnings(false)
        .compile("tarpo_c10d");
}

/// The include directories of the nvidia-* wheels beside a CUDA build of
/// torch, when they hold all that ProcessGroupNCCL.hpp needs (nvidia-nccl,
/// -cuda-runtime, -cuda-crt, -cuda-cccl).
fn nccl_includes(lib: &Path) -> Option<Vec<PathBuf>> {
    if !lib.join("libtorch_cuda.so").exists() {
        return None;
    }
    let nvidia = lib.parent()?.parent()?.join("nvidia");
    let dirs: Vec<PathBuf> = std::fs::read_dir(nvidia)
        .ok()?
        .filter_map(|e| Some(e.ok()?.path().join("include")))
        .filter(|d| d.is_dir())
        .collect();
    let has = |f: &str| dirs.iter().any(|d| d.join(f).exists());
    [
        "nccl.h",
        "cuda_runtime_api.h",
        "crt/host_config.h",
        "nv/target",
    ]
    .iter()
    .all(|f| has(f))
    .then_some(dirs)
}

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=LIBTORCH_USE_PYTORCH");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
    let lib = torch_lib_dir().expect(
        "cannot find libtorch: set LIBTORCH, or LIBTORCH_USE_PYTORCH=1 with the venv's python first on PATH",
    );
    build_c10d_shim(&lib);
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,-ltorch_cuda");
    }
}
