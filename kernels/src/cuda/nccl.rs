//! NCCL communicators with their raw handle kept: [`NcclComm`] (one rank, one GPU) and
//! [`NcclUniqueId`] (the 128-byte rendezvous token the control plane carries between workers).
//!
//! Collectives are issued on the device's compute stream, so they are ordered with the kernels
//! around them and need no extra events. `ncclAlltoAll` (absent from cudarc's safe `Comm`) is
//! called through `cudarc::nccl::sys`. Every rank of a communicator must call the same
//! collectives in the same order (NCCL's contract); `init_rank` blocks until all ranks join.
//! The NCCL library must be loadable (see `CudaLib::Nccl`): a `libnccl.so` on the search path.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use cudarc::nccl::{result, sys};
use half::bf16;

use crate::cuda::libs::{CudaLib, require_libraries};
use crate::cuda::{CudaDevice, CudaError};

fn nccl_err(op: &'static str) -> impl Fn(result::NcclError) -> CudaError {
    move |e| CudaError::Nccl { op, status: format!("{:?}", e.0) }
}

/// NCCL's `ncclUniqueId`: created by one rank, sent as bytes to the others.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct NcclUniqueId([u8; 128]);

impl std::fmt::Debug for NcclUniqueId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "NcclUniqueId({:02x}{:02x}{:02x}{:02x}..)",
            self.0[0], self.0[1], self.0[2], self.0[3]
        )
    }
}

impl NcclUniqueId {
    /// Length of the wire form.
    pub const LEN: usize = 128;

    /// A fresh id (rank 0 does this, then distributes [`Self::to_bytes`]).
    pub fn new() -> Result<Self, CudaError> {
        require_libraries(&[CudaLib::Nccl])?;
        let id = result::get_uniqueid().map_err(nccl_err("ncclGetUniqueId"))?;
        Ok(Self(id.internal.map(|c| c as u8)))
    }

    pub fn to_bytes(&self) -> [u8; 128] {
        self.0
    }

    /// Parses the wire form; anything but exactly 128 bytes is an error.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CudaError> {
        let arr: [u8; 128] = bytes.try_into().map_err(|_| CudaError::Nccl {
            op: "unique id",
            status: format!("expected {} bytes, got {}", Self::LEN, bytes.len()),
        })?;
        Ok(Self(arr))
    }

    fn raw(&self) -> sys::ncclUniqueId {
        sys::ncclUniqueId { internal: self.0.map(|b| b as core::ffi::c_char) }
    }
}

/// Element types NCCL moves.
pub trait NcclElem: cudarc::driver::DeviceRepr {
    const DATATYPE: sys::ncclDataType_t;
}
impl NcclElem for f32 {
    const DATATYPE: sys::ncclDataType_t = sys::ncclDataType_t::ncclFloat32;
}
impl NcclElem for bf16 {
    const DATATYPE: sys::ncclDataType_t = sys::ncclDataType_t::ncclBfloat16;
}
impl NcclElem for u8 {
    const DATATYPE: sys::ncclDataType_t = sys::ncclDataType_t::ncclUint8;
}
impl NcclElem for i32 {
    const DATATYPE: sys::ncclDataType_t = sys::ncclDataType_t::ncclInt32;
}
impl NcclElem for u64 {
    const DATATYPE: sys::ncclDataType_t = sys::ncclDataType_t::ncclUint64;
}

/// One rank of an NCCL communicator, bound to one device's stream.
#[derive(Debug)]
pub struct NcclComm {
    comm: sys::ncclComm_t,
    stream: Arc<CudaStream>,
    rank: usize,
    world: usize,
}

// SAFETY: an NCCL communicator may be used from any thread as long as calls on it are not
// concurrent; `&mut self` is not required by NCCL, but all collective methods take `&self` and
// callers issue them from the rank's one worker thread (module doc). Moving it is safe.
unsafe impl Send for NcclComm {}

impl Drop for NcclComm {
    fn drop(&mut self) {
        if self.comm.is_null() {
            return; // aborted
        }
        // SAFETY: `comm` came from ncclCommInitRank/ncclCommSplit and is destroyed once (abort
        // nulls it); errors at teardown cannot be acted on.
        unsafe {
            let _ = result::comm_destroy(self.comm);
        }
    }
}

impl NcclComm {
    /// Joins communicator `id` as `rank` of `world` on `dev` (blocks until every rank joined).
    pub fn init_rank(
        dev: &CudaDevice,
        id: &NcclUniqueId,
        rank: usize,
        world: usize,
    ) -> Result<Self, CudaError> {
        require_libraries(&[CudaLib::Nccl])?;
        if rank >= world {
            return Err(CudaError::Nccl {
                op: "ncclCommInitRank",
                status: format!("rank {rank} >= world {world}"),
            });
        }
        dev.context().bind_to_thread().map_err(CudaError::driver("cuCtxSetCurrent"))?;
        let mut comm: sys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: `comm` is a valid out-pointer; the device's context is current on this thread.
        unsafe { result::comm_init_rank(&mut comm, world as i32, id.raw(), rank as i32) }
            .map_err(nccl_err("ncclCommInitRank"))?;
        Ok(Self { comm, stream: dev.stream().clone(), rank, world })
    }

    /// The raw handle, for NCCL calls this wrapper does not cover.
    pub fn raw(&self) -> sys::ncclComm_t {
        self.comm
    }

    fn live(&self, op: &'static str) -> Result<(), CudaError> {
        if self.comm.is_null() {
            return Err(CudaError::Nccl { op, status: "communicator was aborted".into() });
        }
        Ok(())
    }

    /// `ncclCommSplit`: every rank calls it; ranks with the same `color` (≥ 0) form a new
    /// communicator ordered by `key`; `color = None` gives `None` (NCCL_SPLIT_NOCOLOR).
    pub fn split(&self, color: Option<usize>, key: usize) -> Result<Option<Self>, CudaError> {
        const OP: &str = "ncclCommSplit";
        self.live(OP)?;
        let color = match color {
            Some(c) => i32::try_from(c)
                .map_err(|_| CudaError::Nccl { op: OP, status: format!("color {c} > i32") })?,
            None => -1, // NCCL_SPLIT_NOCOLOR
        };
        let mut new: sys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: `self.comm` is live; `new` is a valid out-pointer; a null config means defaults.
        unsafe { sys::ncclCommSplit(self.comm, color, key as i32, &mut new, std::ptr::null_mut()) }
            .result()
            .map_err(nccl_err(OP))?;
        if new.is_null() {
            return Ok(None);
        }
        let (mut rank, mut world) = (0i32, 0i32);
        // SAFETY: `new` is a live communicator just created; out-pointers are valid.
        unsafe {
            sys::ncclCommUserRank(new, &mut rank).result().map_err(nccl_err("ncclCommUserRank"))?;
            sys::ncclCommCount(new, &mut world).result().map_err(nccl_err("ncclCommCount"))?;
        }
        Ok(Some(Self {
            comm: new,
            stream: self.stream.clone(),
            rank: rank as usize,
            world: world as usize,
        }))
    }

    /// `ncclCommAbort`: ends every operation in flight on this communicator (a peer never came)
    /// and frees it; every later call returns an error.
    pub fn abort(&mut self) {
        if self.comm.is_null() {
            return;
        }
        // SAFETY: `comm` is live and is not used after this (nulled below).
        unsafe {
            let _ = sys::ncclCommAbort(self.comm);
        }
        self.comm = std::ptr::null_mut();
    }

    /// Waits until this rank's stream has finished everything queued so far, or `deadline`
    /// passes (then `Ok(false)`; the work stays queued). Polls `cuStreamQuery`.
    pub fn wait_until(&self, deadline: std::time::Instant) -> Result<bool, CudaError> {
        use cudarc::driver::sys as dsys;
        let mut spin = 0u32;
        loop {
            // SAFETY: the stream handle is live for the lifetime of `self.stream`.
            let r = unsafe { dsys::cuStreamQuery(self.stream.cu_stream()) };
            match r {
                dsys::cudaError_enum::CUDA_SUCCESS => return Ok(true),
                dsys::cudaError_enum::CUDA_ERROR_NOT_READY => {}
                other => {
                    return Err(CudaError::Nccl {
                        op: "cuStreamQuery",
                        status: format!("{other:?}"),
                    });
                }
            }
            if std::time::Instant::now() >= deadline {
                return Ok(false);
            }
            spin += 1;
            if spin > 64 {
                std::thread::sleep(std::time::Duration::from_micros(50));
            }
        }
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world(&self) -> usize {
        self.world
    }

    fn cu_stream(&self) -> sys::cudaStream_t {
        self.stream.cu_stream() as sys::cudaStream_t
    }

    /// Element-wise sum over ranks: `recv = Σ_rank send` (same length on every rank).
    pub fn all_reduce_sum<T: NcclElem>(
        &self,
        send: &CudaSlice<T>,
        recv: &mut CudaSlice<T>,
    ) -> Result<(), CudaError> {
        if send.len() != recv.len() {
            return Err(CudaError::shape(
                "all_reduce_sum",
                format!("send {} vs recv {}", send.len(), recv.len()),
            ));
        }
        self.live("nccl")?;
        let (s, _gs) = send.device_ptr(&self.stream);
        let (r, _gr) = recv.device_ptr_mut(&self.stream);
        // SAFETY: both buffers hold `len` elements of T on this rank's device.
        unsafe {
            result::all_reduce(
                s as *const _,
                r as *mut _,
                send.len(),
                T::DATATYPE,
                sys::ncclRedOp_t::ncclSum,
                self.comm,
                self.cu_stream(),
            )
        }
        .map_err(nccl_err("ncclAllReduce"))?;
        Ok(())
    }

    /// All-to-all: `send` is `world` chunks of `send.len()/world` elements, chunk j goes to rank
    /// j; `recv` chunk j comes from rank j.
    pub fn all_to_all<T: NcclElem>(
        &self,
        send: &CudaSlice<T>,
        recv: &mut CudaSlice<T>,
    ) -> Result<(), CudaError> {
        if send.len() != recv.len() || send.len() % self.world != 0 {
            return Err(CudaError::shape(
                "all_to_all",
                format!(
                    "send {} and recv {} must be equal multiples of world {}",
                    send.len(),
                    recv.len(),
                    self.world
                ),
            ));
        }
        let count = send.len() / self.world;
        self.live("nccl")?;
        let (s, _gs) = send.device_ptr(&self.stream);
        let (r, _gr) = recv.device_ptr_mut(&self.stream);
        // SAFETY: both buffers hold world × count elements on this rank's device.
        unsafe {
            sys::ncclAlltoAll(
                s as *const _,
                r as *mut _,
                count,
                T::DATATYPE,
                self.comm,
                self.cu_stream(),
            )
        }
        .result()
        .map_err(nccl_err("ncclAlltoAll"))?;
        Ok(())
    }

    /// All-gather: `recv` (world × send.len()) holds every rank's `send`, in rank order.
    pub fn all_gather<T: NcclElem>(
        &self,
        send: &CudaSlice<T>,
        recv: &mut CudaSlice<T>,
    ) -> Result<(), CudaError> {
        if recv.len() != send.len() * self.world {
            return Err(CudaError::shape(
                "all_gather",
                format!("recv {} != world × send {}", recv.len(), send.len()),
            ));
        }
        self.live("nccl")?;
        let (s, _gs) = send.device_ptr(&self.stream);
        let (r, _gr) = recv.device_ptr_mut(&self.stream);
        // SAFETY: send holds len elements, recv world × len, on this rank's device.
        unsafe {
            result::all_gather(
                s as *const _,
                r as *mut _,
                send.len(),
                T::DATATYPE,
                self.comm,
                self.cu_stream(),
            )
        }
        .map_err(nccl_err("ncclAllGather"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_id_bytes_round_trip_and_length_is_checked() {
        let mut b = [0u8; 128];
        b.iter_mut().enumerate().for_each(|(i, v)| *v = (i * 7) as u8);
        let id = NcclUniqueId::from_bytes(&b).unwrap();
        assert_eq!(id.to_bytes(), b);
        assert_eq!(NcclUniqueId::from_bytes(&id.raw().internal.map(|c| c as u8)).unwrap(), id);
        let e = NcclUniqueId::from_bytes(&b[..127]).unwrap_err().to_string();
        assert!(e.contains("expected 128 bytes, got 127"), "{e}");
    }
}
