//! NVRTC compilation of [`KernelSource`]s to CUBIN, and the on-disk cache of the results.
//!
//! Cache key: (source hash, target architecture, NVRTC version). The hash is FNV-1a 64 over the
//! prelude, the source and the compile options, so any edit recompiles. A cache entry is one
//! file `<name>-<arch>-nvrtc<major>.<minor>-<hash>.cubin`, written to a temporary name and
//! renamed into place (concurrent workers never see half a file). Compiling needs no GPU.

use std::ffi::{CStr, CString};
use std::path::{Path, PathBuf};

use cudarc::nvrtc::{result, sys};

use crate::cuda::CudaError;
use crate::cuda::sources::{KernelSource, PRELUDE};

/// Options every kernel is compiled with (plus `--gpu-architecture=<arch>`).
const OPTIONS: &[&str] = &["-std=c++17", "--fmad=true", "-lineinfo"];

/// The NVRTC version as (major, minor).
pub fn nvrtc_version() -> Result<(i32, i32), CudaError> {
    let (mut major, mut minor) = (0, 0);
    // SAFETY: both pointers are valid for writes; the library presence is checked by the caller
    // (`require_libraries`) before any NVRTC call.
    unsafe { sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| CudaError::Nvrtc { op: "nvrtcVersion", status: format!("{e:?}") })?;
    Ok((major, minor))
}

fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &b in *part {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h ^= 0xff; // separator, so ("ab","c") and ("a","bc") differ
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn source_hash(src: &KernelSource) -> u64 {
    let opts = OPTIONS.join(" ");
    fnv1a(&[PRELUDE.as_bytes(), src.code.as_bytes(), opts.as_bytes()])
}

/// Compiles `src` (with the prelude) for `arch` (e.g. `sm_90a`) and returns the CUBIN image.
/// Needs libnvrtc loadable (see [`crate::cuda::require_libraries`]), not a GPU.
pub fn compile_cubin(src: &KernelSource, arch: &str) -> Result<Vec<u8>, CudaError> {
    let nvrtc_err = |op: &'static str| {
        move |e: result::NvrtcError| CudaError::Nvrtc { op, status: format!("{e:?}") }
    };
    let text = CString::new(format!("{PRELUDE}\n#line 1 \"{}.cu\"\n{}", src.name, src.code))
        .map_err(|_| CudaError::Compile {
            kernel: src.name,
            arch: arch.to_string(),
            log: "source contains a NUL byte".into(),
        })?;
    let name = CString::new(format!("{}.cu", src.name)).expect("kernel names have no NUL");
    let prog =
        result::create_program(&text, Some(&name)).map_err(nvrtc_err("nvrtcCreateProgram"))?;
    let mut opts: Vec<String> = OPTIONS.iter().map(|s| s.to_string()).collect();
    opts.push(format!("--gpu-architecture={arch}"));
    // SAFETY: `prog` was just created and is destroyed exactly once below; `text` and `name`
    // outlive it.
    let compiled = unsafe { result::compile_program(prog, &opts) };
    let out = match compiled {
        Err(_) => {
            // SAFETY: as above; the log is NUL-terminated by NVRTC.
            let log = unsafe { result::get_program_log(prog) }
                .map(|raw| unsafe { CStr::from_ptr(raw.as_ptr()) }.to_string_lossy().into_owned())
                .unwrap_or_else(|e| format!("(no log: {e:?})"));
            Err(CudaError::Compile {
                kernel: src.name,
                arch: arch.to_string(),
                log: log.trim().replace('\n', " | "),
            })
        }
        Ok(()) => {
            let mut size = 0usize;
            // SAFETY: `prog` compiled successfully; the buffer has the size NVRTC reported.
            unsafe { sys::nvrtcGetCUBINSize(prog, &mut size) }
                .result()
                .map_err(nvrtc_err("nvrtcGetCUBINSize"))
                .and_then(|()| {
                    let mut cubin = vec![0u8; size];
                    unsafe { sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr().cast()) }
                        .result()
                        .map_err(nvrtc_err("nvrtcGetCUBIN"))?;
                    Ok(cubin)
                })
        }
    };
    // SAFETY: `prog` came from `create_program` and is not used after this.
    unsafe { result::destroy_program(prog) }.map_err(nvrtc_err("nvrtcDestroyProgram"))?;
    let cubin = out?;
    if cubin.is_empty() {
        return Err(CudaError::Compile {
            kernel: src.name,
            arch: arch.to_string(),
            log: "NVRTC produced an empty CUBIN (is the architecture a real sm_XX?)".into(),
        });
    }
    Ok(cubin)
}

/// On-disk CUBIN cache in a directory chosen by the caller.
#[derive(Debug, Clone)]
pub struct KernelCache {
    dir: PathBuf,
}

impl KernelCache {
    /// A cache in `dir` (created on first write).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file that holds `src` compiled for `arch` by NVRTC `version`.
    pub fn entry_path(&self, src: &KernelSource, arch: &str, version: (i32, i32)) -> PathBuf {
        self.dir.join(format!(
            "{}-{arch}-nvrtc{}.{}-{:016x}.cubin",
            src.name,
            version.0,
            version.1,
            source_hash(src)
        ))
    }

    /// The cached CUBIN, or a fresh compile that is then stored. Returns (cubin, was_cached).
    pub fn get_or_compile(
        &self,
        src: &KernelSource,
        arch: &str,
    ) -> Result<(Vec<u8>, bool), CudaError> {
        let path = self.entry_path(src, arch, nvrtc_version()?);
        match std::fs::read(&path) {
            Ok(bytes) if !bytes.is_empty() => return Ok((bytes, true)),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(CudaError::Cache { path, source }),
        }
        let cubin = compile_cubin(src, arch)?;
        let io = |source| CudaError::Cache { path: path.clone(), source };
        std::fs::create_dir_all(&self.dir).map_err(io)?;
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&tmp, &cubin)
            .map_err(|source| CudaError::Cache { path: tmp.clone(), source })?;
        std::fs::rename(&tmp, &path).map_err(io)?;
        Ok((cubin, false))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_changes_with_source_and_separates_parts() {
        let a = KernelSource { name: "a", code: "x", kernels: &[] };
        let b = KernelSource { name: "a", code: "y", kernels: &[] };
        assert_ne!(source_hash(&a), source_hash(&b));
        assert_ne!(fnv1a(&[b"ab", b"c"]), fnv1a(&[b"a", b"bc"]));
    }

    #[test]
    fn cache_path_holds_name_arch_version_and_hash() {
        let cache = KernelCache::new("/tmp/x");
        let src = KernelSource { name: "norm", code: "int x;", kernels: &[] };
        let p = cache.entry_path(&src, "sm_90a", (13, 0));
        let f = p.file_name().unwrap().to_str().unwrap();
        assert!(f.starts_with("norm-sm_90a-nvrtc13.0-"), "{f}");
        assert!(f.ends_with(".cubin"));
        assert_ne!(p, cache.entry_path(&src, "sm_90a", (13, 1)));
        assert_ne!(p, cache.entry_path(&src, "sm_100a", (13, 0)));
    }
}
