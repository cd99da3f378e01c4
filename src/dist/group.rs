//! [`ProcessGroup`]: what the norm across ranks needs of a group of processes.

use candle_core::{Device, Result};

/// A group of processes (or threads) that compute one global norm together: the two collectives
/// the norm needs, on a buffer of a few hundred bytes.
///
/// Implemented for the `mpi` crate's communicators (feature `mpi`), for cudarc's NCCL
/// communicator (feature `nccl`), and by [`LocalGroup`](crate::LocalGroup) for threads of one
/// process. Every rank must make the same calls in the same order with buffers of the same
/// length, as with any collective; the functions of this crate do so whenever every rank makes
/// the same call, and every collective of theirs has the same length. Ranks whose settings
/// differ, or one of which is refused, all return an error (the settings and the refusal travel
/// in the collective). A rank that makes no call at all leaves the others waiting: a
/// `LocalGroup` handle dropped or given a timeout fails them; under MPI, `mpirun` aborts the job
/// when a process exits; with NCCL, abort the communicator.
///
/// ```
/// use candle_grad_clip::{LocalGroup, ProcessGroup};
/// # fn main() -> candle_core::Result<()> {
/// let ranks = LocalGroup::new(3)?;
/// let sums = std::thread::scope(|s| {
///     let handles: Vec<_> = ranks
///         .iter()
///         .map(|g| {
///             s.spawn(move || -> candle_core::Result<Vec<u64>> {
///                 let mut words = [g.rank() as u64 + 1, 10];
///                 g.all_reduce_sum_u64(&mut words)?;
///                 Ok(words.to_vec())
///             })
///         })
///         .collect();
///     handles.into_iter().map(|h| h.join().unwrap()).collect::<Vec<_>>()
/// });
/// for words in sums {
///     assert_eq!(words?, [6, 30]);
/// }
/// # Ok(()) }
/// ```
pub trait ProcessGroup {
    /// This process's index in the group, `0..world_size()`.
    fn rank(&self) -> usize;
    /// The number of processes in the group.
    fn world_size(&self) -> usize;
    /// Replaces `words` on every rank with their element-wise sum over the ranks (wrapping is
    /// the caller's concern: the norm never overflows).
    fn all_reduce_sum_u64(&self, words: &mut [u64]) -> Result<()>;
    /// Replaces `words` on every rank with their element-wise maximum over the ranks.
    fn all_reduce_max_u64(&self, words: &mut [u64]) -> Result<()>;
    /// The device of the gradients this group reduces: the CPU (the default; MPI, [`LocalGroup`](crate::LocalGroup))
    /// or the CUDA device of an NCCL communicator. A rank whose gradients live elsewhere fails
    /// before sending them; a rank with no gradient gets its norm on this device.
    fn device(&self) -> Device {
        Device::Cpu
    }

    /// Marks this rank as out of step with the others: a call failed on it after its collective
    /// (a device error in the scale pass or the update), so its gradients or state may differ
    /// from the other ranks'. Every later collective of this crate's functions through this
    /// group then tells every rank, and fails on every rank. [`LocalGroup`](crate::LocalGroup) and `NcclGroup`
    /// remember it; the default forgets it (MPI's communicators: a rank that exits on the error
    /// makes `mpirun` abort the job).
    ///
    /// ```
    /// use candle_grad_clip::{LocalGroup, ProcessGroup};
    /// let group = LocalGroup::new(1)?.remove(0);
    /// assert!(!group.is_out_of_step());
    /// group.mark_out_of_step();
    /// assert!(group.is_out_of_step());
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    fn mark_out_of_step(&self) {}

    /// Whether [`mark_out_of_step`](Self::mark_out_of_step) was called on this rank's group.
    ///
    /// ```
    /// use candle_grad_clip::{LocalGroup, ProcessGroup};
    /// assert!(!LocalGroup::new(1)?[0].is_out_of_step());
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    fn is_out_of_step(&self) -> bool {
        false
    }
}
