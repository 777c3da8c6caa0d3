//! [`CudaDevice`]: one GPU, its compute stream and its compiled kernels.
//!
//! Opening a device: preload the libraries from the caller's directories, probe every library
//! cudarc will touch, check the ordinal against the driver's device count, create the primary
//! context and one non-blocking stream, compile (or load from the cache) every kernel source for
//! the device's architecture. Each failure is one [`CudaError`] line.
//!
//! cudarc's per-buffer event tracking is switched off: all work of a device goes to its one
//! stream in issue order; code that adds another stream (NCCL) orders it with explicit events.

use std::path::PathBuf;
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DeviceRepr, ValidAsZeroBits};

use crate::cuda::libs::{CudaLib, PreloadedLibraries, preload_libraries, require_libraries};
use crate::cuda::{CudaError, KernelCache, Ops};

/// How to open a device. Built by the binary's `main` (from flags or its environment).
#[derive(Debug, Clone, Default)]
pub struct DeviceOptions {
    /// Device ordinal (as the driver numbers them).
    pub ordinal: usize,
    /// Directories whose CUDA libraries (libnvrtc, libcublas, libcublasLt, ...) are loaded by
    /// full path before anything else; empty means the loader's search path only.
    pub lib_dirs: Vec<PathBuf>,
    /// Directory of the NVRTC CUBIN cache; `None` compiles at every start.
    pub kernel_cache: Option<PathBuf>,
}

/// What the driver says about the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    /// Compute capability (major, minor).
    pub compute_capability: (i32, i32),
    /// NVRTC target, e.g. `sm_90a` on Hopper (arch-specific features: wgmma, setmaxnreg).
    pub arch: String,
    pub multiprocessors: i32,
    pub total_memory: usize,
}

/// The NVRTC target for a compute capability: the arch-specific `a` variant where one exists.
pub fn arch_for(cc: (i32, i32)) -> String {
    match cc {
        (9, 0) | (10, 0) | (10, 3) | (12, 0) => format!("sm_{}{}a", cc.0, cc.1),
        _ => format!("sm_{}{}", cc.0, cc.1),
    }
}

/// An open GPU: context, compute stream, kernels.
#[derive(Debug)]
pub struct CudaDevice {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    info: DeviceInfo,
    ops: Ops,
    _libs: PreloadedLibraries,
}

impl CudaDevice {
    /// Number of devices the driver reports; `Ok(0)` where there is a driver but no GPU, an
    /// error where there is no driver.
    pub fn count(lib_dirs: &[PathBuf]) -> Result<usize, CudaError> {
        let _libs = preload_libraries(lib_dirs)?;
        require_libraries(&[CudaLib::Driver])?;
        match CudaContext::device_count() {
            Ok(n) => Ok(n.max(0) as usize),
            Err(e) if e.0 == cudarc::driver::sys::CUresult::CUDA_ERROR_NO_DEVICE => Ok(0),
            Err(e) => Err(CudaError::Driver { op: "cuDeviceGetCount", source: e }),
        }
    }

    /// Opens device `opts.ordinal` (see the module doc).
    pub fn open(opts: &DeviceOptions) -> Result<Self, CudaError> {
        let libs = preload_libraries(&opts.lib_dirs)?;
        require_libraries(&[CudaLib::Driver, CudaLib::Nvrtc, CudaLib::Cublas, CudaLib::CublasLt])?;
        let count = Self::count(&[])?;
        if opts.ordinal >= count {
            return Err(CudaError::NoDevice { ordinal: opts.ordinal, count });
        }
        let ctx = CudaContext::new(opts.ordinal).map_err(CudaError::driver("cuCtxCreate"))?;
        // SAFETY: event tracking is off before any buffer exists; every buffer of this device is
        // used on `stream` only (module doc), so no cross-stream ordering is lost.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(CudaError::driver("cuStreamCreate"))?;
        let cc = ctx.compute_capability().map_err(CudaError::driver("cuDeviceGetAttribute"))?;
        let multiprocessors = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .map_err(CudaError::driver("cuDeviceGetAttribute"))?;
        let info = DeviceInfo {
            ordinal: opts.ordinal,
            name: ctx.name().map_err(CudaError::driver("cuDeviceGetName"))?,
            compute_capability: cc,
            arch: arch_for(cc),
            multiprocessors,
            total_memory: ctx.total_mem().map_err(CudaError::driver("cuDeviceTotalMem"))?,
        };
        let cache = opts.kernel_cache.as_ref().map(KernelCache::new);
        let ops = Ops::load(&ctx, &stream, &info.arch, cache.as_ref())?;
        Ok(Self { ctx, stream, info, ops, _libs: libs })
    }

    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The stream all of this device's work is issued on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The compiled kernels.
    pub fn ops(&self) -> &Ops {
        &self.ops
    }

    /// Copies `host` into a new device buffer.
    pub fn upload<T: DeviceRepr>(&self, host: &[T]) -> Result<CudaSlice<T>, CudaError> {
        self.stream.clone_htod(host).map_err(CudaError::driver("cuMemcpyHtoD"))
    }

    /// Copies a device buffer back (waits for the stream).
    pub fn download<T: DeviceRepr + Default + Clone>(
        &self,
        dev: &CudaSlice<T>,
    ) -> Result<Vec<T>, CudaError> {
        self.stream.clone_dtoh(dev).map_err(CudaError::driver("cuMemcpyDtoH"))
    }

    /// A zero-filled device buffer of `len` elements.
    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(
        &self,
        len: usize,
    ) -> Result<CudaSlice<T>, CudaError> {
        self.stream.alloc_zeros(len).map_err(CudaError::driver("cuMemAlloc"))
    }

    /// Waits until all issued work is done; surfaces asynchronous kernel faults.
    pub fn synchronize(&self) -> Result<(), CudaError> {
        self.stream.synchronize().map_err(CudaError::driver("cuStreamSynchronize"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hopper_gets_the_arch_specific_target() {
        assert_eq!(arch_for((9, 0)), "sm_90a");
        assert_eq!(arch_for((8, 9)), "sm_89");
    }
}
