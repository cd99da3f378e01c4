//! The host side of the multi-tensor kernels in `kernels/grad_clip.cu`, for any device that runs
//! them: the real GPU through cudarc ([`cuda`](super::cuda), feature `cuda`) or the kernels compiled
//! for the CPU ([`emulated`](super::emulated), feature `emulation`).
//!
//! Everything that decides *what* the GPU does lives here and is plain Rust: the segment table
//! ([`table`]), the launches and their argument lists ([`launch`]), and the sequence of each
//! operation, a file per operation: [`norm`], [`clip`], [`zclip`], [`agc`], [`fused_step`]. A
//! [`KernelDevice`] only supplies memory and runs launches, so the emulation exercises the very
//! tables and launch sequences a GPU receives.
//!
//! # Launches
//! Every operation describes all gradients in one table of segments and covers them with one
//! launch, whatever their number and dtypes:
//! - norm: `grad_clip_reduce_*` (one launch; a second, `grad_clip_reduce_pow` in rescue mode, only
//!   when a sum of powers may leave the `f64` range: F64 gradients or `p > 6`, as on the CPU);
//! - scale: `grad_clip_apply`, which reads the coefficient from device memory and returns at once
//!   when it is `>= 1`;
//! - clamp: `grad_clip_apply` too;
//! - per-tensor norms (`grad_norms`): the reduction also stores each chunk's partial, and
//!   `grad_clip_segment_norms` combines them per tensor;
//! - adaptive clipping (`adaptive_clip_grad_`): `grad_clip_agc`, one warp per unit, reads the
//!   parameters and gradients once and scales the clipped units in place (plus
//!   `grad_clip_agc_strided` per non-contiguous gradient); see [`agc`];
//! - fused optimizer step (`fused_step`): the reduction the clip or the finite check needs, then
//!   `grad_clip_fused_step`; with GradScaler's prescale (the address of the `f32` `inv_scale`) both
//!   unscale each gradient element as they read it, and the step writes it back unscaled;
//! - gradient accumulation (`GradAccumulator`): `grad_clip_accumulate`, one launch over every
//!   (buffer, gradient) pair: add, add scaled, round a wide buffer to the var's dtype, or clear;
//!   see [`accumulate`].
//!
//! So `clip_grad_norm_` is 2 launches (3 for F64 gradients or `p > 6`) and one copy of the table,
//! for 1 or 10,000 gradients. Slow paths, each an extra launch per tensor: a non-contiguous
//! gradient is read through a `.contiguous()` copy (made by candle) for the norm and written by
//! `grad_clip_apply_strided`.
//!
//! # Determinism
//! Each segment is cut into chunks of [`CHUNK`](abi::CHUNK) elements counted from its first
//! element, and one warp reduces one chunk into an `f64` partial in an order fixed by the element
//! indices only. The partials are added on the device into the superaccumulator of
//! `ops/exact_sum.rs` with integer atomics (exact, so order-independent), and the last block
//! rounds the sum once like `ExactSum::value`. The norm is therefore bitwise the same for any grid size, block order, order
//! of `vars` and address alignment (the emulation's tests check each). It is not bitwise the CPU's
//! norm (the CPU's partials cover other element sets).

pub(crate) mod abi;
pub(crate) mod accumulate;
pub(crate) mod agc;
pub(crate) mod clip;
pub(crate) mod fused_step;
pub(crate) mod launch;
pub(crate) mod norm;
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) mod recently_used;
pub(crate) mod table;
pub(crate) mod zclip;

use candle_core::{DType, Result, Tensor};

use launch::Launch;
use table::Base;

/// A device buffer allocated through a [`Session`]: its address, and a handle for reading it back
/// or turning it into a tensor.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Buffer {
    pub(crate) ptr: u64,
    pub(crate) id: usize,
}

/// A device that runs the kernels.
pub(crate) trait KernelDevice {
    /// Refuses a call that the device cannot take now (CUDA: under graph capture). Called first,
    /// before any work for the call is enqueued.
    fn check_ready(&self) -> Result<()>;

    /// Locks the storages of `tensors` (each storage once) so that they can be neither freed nor
    /// replaced, and runs `f` with the base of each tensor's storage (in the order of `tensors`)
    /// and a session for the table, buffers and launches. The launches may write the storages of
    /// the tensors in `writable` (the gradients; a step's parameters and state), no other (the emulation copies those back,
    /// and checks that nothing else was written). When `f` fails the emulation discards every
    /// write; on a GPU, launches enqueued before the failure stand (the operations check what
    /// can fail, like `error_if_nonfinite`, before their first writing launch).
    fn with_session<R>(
        &self,
        tensors: &[&Tensor],
        writable: std::ops::Range<usize>,
        f: impl FnOnce(&mut dyn Session, &[Base]) -> Result<R>,
    ) -> Result<R>;
}

/// What the operations need from a device while its storages are locked.
pub(crate) trait Session {
    /// Copies the table to the device (without waiting for it); its device address.
    fn upload(&mut self, words: &[u64]) -> Result<u64>;
    /// Device address of the kernels' `Scratch` for this thread: zero (but for the last scale and
    /// coefficient) between calls.
    fn scratch(&self) -> u64;
    /// A new, uninitialised device buffer of `len` elements of `dtype` (F32 or F64).
    fn alloc(&mut self, dtype: DType, len: usize) -> Result<Buffer>;
    /// Enqueues a kernel launch.
    ///
    /// # Safety
    /// Every device address among the arguments must be one this session handed out (a base of
    /// the locked tensors plus an offset inside the tensor's view, the table, a buffer, the
    /// scratch), used by the kernel only as its parameter documents: the launches of
    /// [`launch`] built from this session's table do that.
    unsafe fn launch(&mut self, launch: &Launch) -> Result<()>;
    /// The buffer's values, read back to the host (waits for the device).
    fn read(&mut self, buffer: Buffer) -> Result<Vec<f64>>;
    /// The buffer as a tensor of `shape` on the gradients' device; the buffer is consumed.
    fn take_tensor(&mut self, buffer: Buffer, shape: &[usize]) -> Result<Tensor>;
}

/// Enqueues launches built by [`launch`] from this session's table, buffers and scratch.
fn launch_all(s: &mut dyn Session, launches: impl IntoIterator<Item = Launch>) -> Result<()> {
    // SAFETY: every launch passed here is built by `launch.rs` (`NormPlan::reduce`,
    // `NormPlan::segment_norms`, `ElementOp::apply`, `ElementOp::apply_strided`,
    // `ElementOp::apply_all`, `launch::fused_step`, `launch::zclip`, `launch::agc`,
    // `launch::agc_strided`, `launch::accumulate`) from the addresses of this session: the table it uploaded (whose
    // segments are views of the locked tensors, built from their layouts), its buffers (sized
    // for what the kernel writes) and its scratch.
    launches
        .into_iter()
        .try_for_each(|l| unsafe { s.launch(&l) })
}
