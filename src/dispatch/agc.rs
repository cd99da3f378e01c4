//! Adaptive gradient clipping, unit-wise: on the kernels (one launch) or the CPU twin.
use candle_core::{bail, Device, Result, Tensor};

use crate::backend::cpu;
#[cfg(any(feature = "cuda", feature = "emulation"))]
use crate::backend::kernels;
use crate::ops::agc::{AgcOutcome, AgcSet};

/// Clips the gradients of the set in place, unit by unit.
pub(crate) fn clip(set: &AgcSet, clipping: f64, eps: f64) -> Result<AgcOutcome> {
    match set.device() {
        #[cfg(feature = "cuda")]
        Device::Cuda(cuda) => {
            return kernels::agc::clip(&crate::backend::cuda::Cuda(cuda), set, clipping, eps)
        }
        #[cfg(feature = "emulation")]
        Device::Cpu if crate::backend::emulated::active() => {
            return kernels::agc::clip(&crate::backend::emulated::device::Emulated, set, clipping, eps)
        }
        Device::Cpu => {}
        other => bail!(
            "adaptive gradient clipping supports CPU and CUDA gradients (CUDA with the `cuda` feature); got gradients on {:?}",
            other.location()
        ),
    }
    let (norm, coefficients) = cpu::agc::coefficients(&set.params, &set.grads, clipping, eps)?;
    let clipped = coefficients.iter().any(|c| c.iter().any(Option::is_some));
    cpu::agc::scale_units(&set.grads, &coefficients)?;
    Ok(AgcOutcome {
        norm: cpu::reduce::norm_tensor(norm, set.norm_dtype())?,
        clipped: Tensor::new(clipped as u32, &Device::Cpu)?,
    })
}
