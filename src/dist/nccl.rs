//! [`ProcessGroup`] for cudarc's NCCL communicator (feature `nccl`).
//!
//! The buffer of the norm (696 bytes at most) is copied to the device on the communicator's
//! stream, all-reduced there with `ncclUint64` and `ncclSum` / `ncclMax`, and copied back (which
//! waits for the stream): a host round trip of a few hundred bytes per collective.
//!
//! **A rank that crashes** leaves the others blocked in `ncclAllReduce`: NCCL has no timeout of
//! its own, and their streams never complete. The application must abort the communicator
//! (`ncclCommAbort`, from a watchdog thread, as PyTorch's NCCL watchdog does; or set
//! `NCCL_ASYNC_ERROR_HANDLING`-style handling in its own launcher), after which the others'
//! collectives fail with an error. No error this crate detects leads there: a refused rank
//! still joins the collective (its refusal travels in it), so every rank returns an error.

use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, ReduceOp};
use candle_core::{bail, Device, Result};

use super::ProcessGroup;

/// An NCCL communicator with the candle device whose gradients it reduces (the device of the
/// communicator's stream).
///
/// ```no_run
/// use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id};
/// use candle_core::Device;
/// use candle_grad_clip::NcclGroup;
/// # fn main() -> candle_core::Result<()> {
/// let device = Device::new_cuda(0)?;
/// let stream = device.as_cuda_device()?.cuda_stream();
/// let comm = Comm::from_rank(stream, 0, 1, Id::new().unwrap()).unwrap();
/// let group = NcclGroup::new(comm, device)?;
/// # let _ = group;
/// # Ok(()) }
/// ```
pub struct NcclGroup {
    comm: Comm,
    device: Device,
    /// A call failed on this rank after its collective (see `ProcessGroup::mark_out_of_step`).
    out_of_step: std::sync::atomic::AtomicBool,
}

impl NcclGroup {
    /// `comm` with `device`, the CUDA device of its stream (checked by ordinal). Pass the very
    /// `Device` the gradients live on (a clone of it): candle tells devices apart by identity, and
    /// gradients on another `Device` value are refused before any communication.
    pub fn new(comm: Comm, device: Device) -> Result<Self> {
        match device.location() {
            candle_core::DeviceLocation::Cuda { gpu_id } if gpu_id == comm.ordinal() => {}
            other => bail!(
                "NcclGroup::new: the communicator of rank {} runs on CUDA device {} but the device given is {other:?}",
                comm.rank(),
                comm.ordinal()
            ),
        }
        Ok(Self {
            comm,
            device,
            out_of_step: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// The communicator.
    pub fn comm(&self) -> &Comm {
        &self.comm
    }

    fn all_reduce(&self, name: &str, words: &mut [u64], op: ReduceOp) -> Result<()> {
        let stream = self.comm.stream();
        let len = words.len();
        let fail = |what: &str, e: &dyn std::fmt::Debug| -> candle_core::Error {
            candle_core::Error::Msg(format!(
                "NCCL rank {} of {}: {name} of {} words: {what} failed: {e:?}",
                self.comm.rank(),
                self.comm.world_size(),
                len
            ))
            .bt()
        };
        let mut buffer = stream
            .clone_htod(&*words)
            .map_err(|e| fail("the copy to the device", &e))?;
        self.comm
            .all_reduce_in_place(&mut buffer, &op)
            .map_err(|e| fail("ncclAllReduce", &e))?;
        stream
            .memcpy_dtoh(&buffer, words)
            .map_err(|e| fail("the copy to the host", &e))?;
        stream
            .synchronize()
            .map_err(|e| fail("the stream synchronisation", &e))?;
        Ok(())
    }
}

impl ProcessGroup for NcclGroup {
    fn rank(&self) -> usize {
        self.comm.rank()
    }

    fn world_size(&self) -> usize {
        self.comm.world_size()
    }

    fn all_reduce_sum_u64(&self, words: &mut [u64]) -> Result<()> {
        self.all_reduce("all_reduce_sum_u64", words, ReduceOp::Sum)
    }

    fn all_reduce_max_u64(&self, words: &mut [u64]) -> Result<()> {
        self.all_reduce("all_reduce_max_u64", words, ReduceOp::Max)
    }

    fn device(&self) -> Device {
        self.device.clone()
    }

    fn mark_out_of_step(&self) {
        self.out_of_step
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    fn is_out_of_step(&self) -> bool {
        self.out_of_step.load(std::sync::atomic::Ordering::SeqCst)
    }
}
