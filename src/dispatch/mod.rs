//! Dispatch: the one place that picks the back end for a set of gradients. Every public
//! operation is "collect and validate the gradients" (`ops::gradients::GradientSet`), then one of
//! the functions here, which runs it on the back end of the gradients' device:
//!
//! - the multi-tensor kernels (`backend::kernels`, the plan) on a [`KernelDevice`]: a GPU
//!   (`backend::cuda`, feature `cuda`), or the host emulation of the kernels
//!   (`backend::emulated`, feature `emulation`), which takes CPU tensors while a
//!   `KernelEmulation` is active on the calling thread;
//! - otherwise the CPU back end (`backend::cpu`), for CPU gradients.
//!
//! Files by operation: [`norm`] (norms, per-tensor norms, the reductions the norm across
//! processes combines), [`clip`] (norm and value clipping), [`zclip`], [`agc`],
//! [`fused_step`], [`grad_scaler`] (GradScaler's unscale and one-read reduction on the CPU) and
//! [`accumulate`] (gradient accumulation).
//!
//! [`KernelDevice`]: crate::backend::kernels::KernelDevice

use candle_core::{bail, Device, Result};

pub(crate) mod accumulate;
pub(crate) mod agc;
pub(crate) mod clip;
pub(crate) mod fused_step;
pub(crate) mod grad_scaler;
pub(crate) mod norm;
pub(crate) mod zclip;

/// The device that runs the multi-tensor kernels for these gradients, if any: their CUDA device,
/// or, for CPU gradients, the host emulation when it is active on this thread.
macro_rules! with_kernel_device {
    ($set:expr, |$dev:ident| $body:expr) => {
        match $set.device() {
            #[cfg(feature = "cuda")]
            Device::Cuda(cuda) => {
                let $dev = crate::backend::cuda::Cuda(cuda);
                Some($body)
            }
            #[cfg(feature = "emulation")]
            Device::Cpu if crate::backend::emulated::active() => {
                let $dev = crate::backend::emulated::device::Emulated;
                Some($body)
            }
            _ => None,
        }
    };
}
pub(crate) use with_kernel_device;

pub(crate) fn unsupported<T>(device: &Device) -> Result<T> {
    bail!(
        "gradient clipping supports CPU and CUDA gradients (CUDA with the `cuda` feature); got gradients on {:?}",
        device.location()
    )
}
