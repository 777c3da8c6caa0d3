//! Finding the CUDA shared libraries before cudarc does.
//!
//! cudarc dlopens each library by name on first use and panics when none of its candidate names
//! loads. [`require_libraries`] probes them first and turns absence into
//! [`CudaError::LibraryMissing`]. [`preload_libraries`] loads libraries by full path from
//! directories the caller names: once an object with a given soname is loaded, the dynamic
//! loader hands it to cudarc's later dlopen by soname, so no `LD_LIBRARY_PATH` is needed for
//! them. (NCCL is the exception: its soname `libnccl.so.2` is not among cudarc's candidates, so
//! a directory holding a `libnccl.so` symlink must be on the search path.)

use std::path::{Path, PathBuf};

use crate::cuda::CudaError;

/// The CUDA libraries Fathom loads at run time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CudaLib {
    /// libcuda (the driver).
    Driver,
    /// libnvrtc (run-time compiler).
    Nvrtc,
    /// libcublas.
    Cublas,
    /// libcublasLt.
    CublasLt,
    /// libnccl.
    Nccl,
}

impl CudaLib {
    /// Short name as cudarc searches for it.
    pub fn name(self) -> &'static str {
        match self {
            CudaLib::Driver => "cuda",
            CudaLib::Nvrtc => "nvrtc",
            CudaLib::Cublas => "cublas",
            CudaLib::CublasLt => "cublasLt",
            CudaLib::Nccl => "nccl",
        }
    }

    fn hint(self) -> &'static str {
        match self {
            CudaLib::Driver => "no NVIDIA driver on this machine (libcuda.so.1)",
            CudaLib::Nvrtc => {
                "install it (pip install nvidia-cuda-nvrtc==13.0.88) and pass its nvidia/cu13/lib \
                 directory as a library directory"
            }
            CudaLib::Cublas | CudaLib::CublasLt => {
                "install it (pip install nvidia-cublas) and pass its nvidia/cu13/lib directory as \
                 a library directory"
            }
            CudaLib::Nccl => {
                "put a directory holding a libnccl.so symlink to nvidia/nccl/lib/libnccl.so.2 \
                 first on LD_LIBRARY_PATH"
            }
        }
    }

    /// Whether cudarc can load this library now.
    pub fn is_present(self) -> bool {
        // SAFETY: each probe only dlopens candidate names and closes them again; loading these
        // NVIDIA libraries runs no initialisers with preconditions.
        unsafe {
            match self {
                CudaLib::Driver => cudarc::driver::sys::is_culib_present(),
                CudaLib::Nvrtc => cudarc::nvrtc::sys::is_culib_present(),
                CudaLib::Cublas => cudarc::cublas::sys::is_culib_present(),
                CudaLib::CublasLt => cudarc::cublaslt::sys::is_culib_present(),
                CudaLib::Nccl => cudarc::nccl::sys::is_culib_present(),
            }
        }
    }
}

/// Fails with the first of `libs` that cannot be loaded.
pub fn require_libraries(libs: &[CudaLib]) -> Result<(), CudaError> {
    for &lib in libs {
        if !lib.is_present() {
            let names = cudarc::get_lib_name_candidates(lib.name());
            let shown: Vec<&str> = names.iter().take(2).map(String::as_str).collect();
            return Err(CudaError::LibraryMissing {
                lib: lib.name(),
                candidates: format!("tried {}, ...", shown.join(", ")),
                hint: lib.hint(),
            });
        }
    }
    Ok(())
}

/// Libraries loaded by full path; keep this alive while the process uses CUDA (cudarc takes its
/// own reference on first use, after which dropping this is harmless).
#[derive(Debug, Default)]
pub struct PreloadedLibraries {
    libs: Vec<(PathBuf, libloading::Library)>,
}

impl PreloadedLibraries {
    /// Paths of the libraries that were loaded, in load order.
    pub fn paths(&self) -> impl Iterator<Item = &Path> {
        self.libs.iter().map(|(p, _)| p.as_path())
    }
}

/// File-name prefixes loaded from each directory, in dependency order (NVRTC needs its builtins;
/// cuBLAS needs cuBLASLt).
const PRELOAD_ORDER: &[&str] =
    &["libnvrtc-builtins.so", "libnvrtc.so", "libcublasLt.so", "libcublas.so", "libnccl.so"];

/// Loads every known CUDA library found in `dirs` by full path (see the module doc). A directory
/// that does not exist is an error; a directory that lacks some library is not.
pub fn preload_libraries(dirs: &[PathBuf]) -> Result<PreloadedLibraries, CudaError> {
    let mut out = PreloadedLibraries::default();
    for dir in dirs {
        let entries = std::fs::read_dir(dir).map_err(|e| CudaError::LibraryLoad {
            path: dir.clone(),
            reason: format!("not a readable directory ({e})"),
        })?;
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        names.sort();
        for prefix in PRELOAD_ORDER {
            // The versioned file (libnvrtc.so.13), not the `.alt` variants.
            let Some(name) = names.iter().find(|n| {
                n.starts_with(prefix) && !n.contains(".alt.") && n[prefix.len()..].starts_with('.')
            }) else {
                continue;
            };
            let path = dir.join(name);
            // SAFETY: loading an NVIDIA CUDA library runs only its own initialisers, which have
            // no preconditions on the caller.
            let lib = unsafe { libloading::Library::new(&path) }.map_err(|e| {
                CudaError::LibraryLoad { path: path.clone(), reason: e.to_string() }
            })?;
            out.libs.push((path, lib));
        }
    }
    Ok(out)
}
