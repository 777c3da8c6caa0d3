//! Compiles every CUDA C++ kernel source for sm_90a with NVRTC — no GPU needed — so C++ errors
//! surface here and in CI, before any GPU run.
//!
//! NVRTC comes from the pip wheel `nvidia-cuda-nvrtc==13.0.88` (the GPU machine's version). The
//! library directory is, in order: `FATHOM_NVRTC_LIB_DIR`; `~/.cache/fathom/nvrtc/nvidia/cu13/lib`
//! (where `scripts/deps.sh` installs it); else the loader's search path (the GPU runner's
//! `LD_LIBRARY_PATH`). No NVRTC at all is a failure with the install command, not a skip.

mod cuda_common;

use std::path::PathBuf;

use fathom_kernels::cuda::sources::{self, KernelSource};
use fathom_kernels::cuda::{CudaError, CudaLib, KernelCache, compile_cubin, nvrtc_version};

const INSTALL: &str = "python3 -m pip install --target ~/.cache/fathom/nvrtc nvidia-cuda-nvrtc==13.0.88 \
                       (or run scripts/deps.sh)";

fn nvrtc_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("FATHOM_NVRTC_LIB_DIR") {
        return Some(PathBuf::from(d));
    }
    let home = std::env::var_os("HOME")?;
    let d = PathBuf::from(home).join(".cache/fathom/nvrtc/nvidia/cu13/lib");
    d.is_dir().then_some(d)
}

/// Loads NVRTC or panics with the install instructions. Returns the preloaded handles.
fn load_nvrtc() -> fathom_kernels::cuda::PreloadedLibraries {
    let dirs: Vec<PathBuf> = nvrtc_dir().into_iter().collect();
    let libs = fathom_kernels::cuda::preload_libraries(&dirs)
        .unwrap_or_else(|e| panic!("NVRTC directory unusable: {e}; install with: {INSTALL}"));
    if !CudaLib::Nvrtc.is_present() {
        panic!(
            "libnvrtc not found (looked in {dirs:?} and the loader's search path); install it \
             with: {INSTALL}"
        );
    }
    libs
}

#[test]
fn every_kernel_source_compiles_for_sm90a() {
    let _libs = load_nvrtc();
    let version = nvrtc_version().expect("nvrtcVersion");
    assert!(version.0 >= 12, "NVRTC {version:?} is too old for sm_90a FP8 conversions");
    assert!(!sources::ALL.is_empty());
    for src in sources::ALL {
        let cubin = compile_cubin(src, "sm_90a").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(&cubin[..4], b"\x7fELF", "{}: NVRTC output is not an ELF CUBIN", src.name);
        for k in src.kernels {
            // Kernel names appear verbatim in the CUBIN's symbol table (extern "C").
            assert!(
                cubin.windows(k.len()).any(|w| w == k.as_bytes()),
                "{}: kernel {k} missing from the CUBIN",
                src.name
            );
        }
    }
}

#[test]
fn a_cuda_error_is_reported_with_the_compiler_log() {
    let _libs = load_nvrtc();
    let bad = KernelSource {
        name: "broken",
        code: "extern \"C\" __global__ void k(float* p) { p[0] = undefined_name; }",
        kernels: &["k"],
    };
    match compile_cubin(&bad, "sm_90a") {
        Err(CudaError::Compile { kernel, arch, log }) => {
            assert_eq!(kernel, "broken");
            assert_eq!(arch, "sm_90a");
            assert!(log.contains("undefined_name"), "log: {log}");
            assert!(log.contains("broken.cu"), "log should name the source file: {log}");
        }
        other => panic!("expected a compile error, got {other:?}"),
    }
}

#[test]
fn the_cache_stores_and_reuses_cubins() {
    let _libs = load_nvrtc();
    let dir = tempfile::tempdir().unwrap();
    let cache = KernelCache::new(dir.path().join("kernels"));
    let (first, cached) = cache.get_or_compile(&sources::NORM, "sm_90a").unwrap();
    assert!(!cached);
    let path = cache.entry_path(&sources::NORM, "sm_90a", nvrtc_version().unwrap());
    assert_eq!(std::fs::read(&path).unwrap(), first);
    let (second, cached) = cache.get_or_compile(&sources::NORM, "sm_90a").unwrap();
    assert!(cached);
    assert_eq!(first, second);
    // A different architecture is a different entry.
    let (_, cached) = cache.get_or_compile(&sources::NORM, "sm_89").unwrap();
    assert!(!cached);
}
