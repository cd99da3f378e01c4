//! Gradient accumulation (`ops::accumulate`) on the buffers' device: one multi-tensor kernel
//! launch (CUDA, or the host emulation of the kernels), or the CPU twin's one rayon pass.
use candle_core::{Device, Result};

use super::unsupported;
use crate::backend::cpu;
#[cfg(any(feature = "cuda", feature = "emulation"))]
use crate::backend::kernels;
use crate::ops::accumulate::{AccumulateOp, PairSet};

/// Runs `op` over every pair of `set`, in place in the buffers.
pub(crate) fn accumulate(set: &PairSet, op: AccumulateOp) -> Result<()> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = set.device() {
        return kernels::accumulate::accumulate(&crate::backend::cuda::Cuda(cuda), set, op);
    }
    #[cfg(feature = "emulation")]
    if set.device().is_cpu() && crate::backend::emulated::active() {
        return kernels::accumulate::accumulate(
            &crate::backend::emulated::device::Emulated,
            set,
            op,
        );
    }
    match set.device() {
        Device::Cpu => cpu::accumulate::run(set, op),
        other => unsupported(other),
    }
}
