//! [`ProcessGroup`] for the `mpi` crate's intra-communicators (feature `mpi`).
//!
//! The collectives are `MPI_Allreduce` on `MPI_UINT64_T` with `MPI_SUM` and `MPI_MAX`, called
//! through `mpi::ffi` so that a failure code becomes a `candle_core::Error` naming the rank and
//! the collective. Under MPI's default error handler (`MPI_ERRORS_ARE_FATAL`) a failing collective
//! aborts the job before returning; set `MPI_ERRORS_RETURN` on the communicator to get the error.
//!
//! **A rank that crashes** (or exits, with an error, without `MPI_Finalize`) makes `mpirun`
//! abort the whole job: Open MPI and MPICH's Hydra kill the other ranks, which would otherwise
//! wait in their next collective forever. No error this crate detects leads there: a rank
//! refused by its settings, its gradients or a failing reduction still joins the collective
//! (its refusal travels in it), so every rank returns an error and the program decides what to
//! do. A rank that returns early without joining (an error of the caller's own code) leaves the
//! others waiting until it exits and the job is aborted.

use std::os::raw::{c_char, c_int};

use candle_core::{bail, Result};
use mpi::ffi;
use mpi::raw::AsRaw;
use mpi::topology::{CartesianCommunicator, Communicator, SimpleCommunicator};

use super::ProcessGroup;

/// `MPI_Allreduce` of `words` in place (through a copy of the send buffer: 696 bytes at most).
fn all_reduce<C: Communicator + AsRaw<Raw = ffi::MPI_Comm>>(
    comm: &C,
    words: &mut [u64],
    sum: bool,
) -> Result<()> {
    let name = if sum {
        "all_reduce_sum_u64"
    } else {
        "all_reduce_max_u64"
    };
    let Ok(count) = c_int::try_from(words.len()) else {
        bail!(
            "MPI rank {}: {name}: {} words do not fit MPI's int count",
            comm.rank(),
            words.len()
        )
    };
    let send = words.to_vec();
    // SAFETY: `send` and `words` are distinct buffers of `count` u64 each, alive for the call,
    // which is blocking; MPI_UINT64_T is the MPI type of u64; the op and communicator handles come
    // from the mpi crate (its predefined ops, and a live communicator borrowed for the call).
    let code = unsafe {
        let op = if sum { ffi::RSMPI_SUM } else { ffi::RSMPI_MAX };
        ffi::MPI_Allreduce(
            send.as_ptr().cast(),
            words.as_mut_ptr().cast(),
            count,
            ffi::RSMPI_UINT64_T,
            op,
            comm.as_raw(),
        )
    };
    if code != ffi::MPI_SUCCESS as c_int {
        bail!(
            "MPI rank {} of {}: {name} (MPI_Allreduce of {} words) failed with code {code}: {}",
            comm.rank(),
            comm.size(),
            words.len(),
            error_string(code)
        )
    }
    Ok(())
}

/// MPI's message for an error code.
fn error_string(code: c_int) -> String {
    let mut buffer = vec![0 as c_char; ffi::MPI_MAX_ERROR_STRING as usize + 1];
    let mut len: c_int = 0;
    // SAFETY: the buffer holds MPI_MAX_ERROR_STRING characters, as MPI_Error_string requires, and
    // `len` receives the length it wrote (at most that).
    let ok = unsafe { ffi::MPI_Error_string(code, buffer.as_mut_ptr(), &mut len) };
    if ok != ffi::MPI_SUCCESS as c_int {
        return "unknown MPI error".to_string();
    }
    let bytes: Vec<u8> = buffer[..len.clamp(0, buffer.len() as c_int) as usize]
        .iter()
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

macro_rules! mpi_group {
    ($ty:ty, $doc:literal) => {
        #[doc = $doc]
        ///
        /// ```no_run
        /// use mpi::traits::Communicator;
        /// use candle_grad_clip::ProcessGroup;
        /// let universe = mpi::initialize().unwrap();
        /// let world = universe.world();
        /// assert_eq!(ProcessGroup::world_size(&world), world.size() as usize);
        /// let mut words = [1u64];
        /// world.all_reduce_sum_u64(&mut words).unwrap();
        /// assert_eq!(words[0], world.size() as u64);
        /// ```
        impl ProcessGroup for $ty {
            fn rank(&self) -> usize {
                Communicator::rank(self) as usize
            }
            fn world_size(&self) -> usize {
                Communicator::size(self) as usize
            }
            fn all_reduce_sum_u64(&self, words: &mut [u64]) -> Result<()> {
                all_reduce(self, words, true)
            }
            fn all_reduce_max_u64(&self, words: &mut [u64]) -> Result<()> {
                all_reduce(self, words, false)
            }
        }
    };
}

mpi_group!(
    SimpleCommunicator,
    "An MPI communicator (`universe.world()`, or one split from it) as a process group of CPU gradients."
);
mpi_group!(
    CartesianCommunicator,
    "An MPI Cartesian communicator as a process group of CPU gradients."
);
