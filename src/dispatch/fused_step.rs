//! The fused optimizer step (`ops::fused_step`) on its parameters' device: the multi-tensor
//! update kernel, or the CPU twin.
use candle_core::{bail, Device, Result};

use crate::backend::cpu;
#[cfg(any(feature = "cuda", feature = "emulation"))]
use crate::backend::kernels;
use crate::ops::fused_step::{Outcome, Step};

/// Whether a step with a [`Step::prescale`] can run on `device`: the CPU twin and the kernels
/// (CUDA, and the host emulation of the kernels on the CPU).
pub(crate) fn runs_prescaled(device: &Device) -> bool {
    device.is_cpu() || device.is_cuda()
}

/// Whether work on `device` runs on the CPU twin: the CPU, unless the kernel emulation is active.
pub(crate) fn runs_cpu_twin(device: &Device) -> bool {
    #[cfg(feature = "emulation")]
    if crate::backend::emulated::active() {
        return false;
    }
    device.is_cpu()
}

/// Runs a step on its parameters' device.
pub(crate) fn fused_step(step: &Step) -> Result<Outcome> {
    let device = step.control.device();
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = device {
        return kernels::fused_step::fused_step(&crate::backend::cuda::Cuda(cuda), step);
    }
    #[cfg(feature = "emulation")]
    if device.is_cpu() && crate::backend::emulated::active() {
        return kernels::fused_step::fused_step(&crate::backend::emulated::device::Emulated, step);
    }
    if step.prescale.is_some() && !runs_prescaled(device) {
        bail!("internal error: a prescaled step on a device without prescaled passes")
    }
    match device {
        Device::Cpu => cpu::fused_step::step(step),
        other => bail!(
            "fused optimizer steps run on the CPU and on CUDA (with the `cuda` feature); got {:?}",
            other.location()
        ),
    }
}
