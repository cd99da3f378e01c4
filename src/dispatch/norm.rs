//! Norms: the global norm, each gradient's own norm, and the kernels' chunk partials (for the
//! norm across processes).
use candle_core::{DType, Device, Result, Tensor};

use super::{unsupported, with_kernel_device};
use crate::backend::cpu;
#[cfg(any(feature = "cuda", feature = "emulation"))]
use crate::backend::kernels;
use crate::ops::exact_sum::ExactSum;
use crate::ops::gradients::GradientSet;
use crate::ops::norm::{Power, Reduction};
use crate::ops::norm_type::NormType;

pub(crate) fn total_norm(set: &GradientSet, norm_type: NormType) -> Result<Tensor> {
    let r: Option<Result<Tensor>> =
        with_kernel_device!(set, |dev| kernels::norm::total_norm(&dev, set, norm_type));
    if let Some(r) = r {
        return r;
    }
    match set.device() {
        Device::Cpu => cpu::reduce::norm_tensor(
            cpu::reduce::norm(set, &set.group_by_storage(), norm_type)?,
            set.norm_dtype(),
        ),
        other => unsupported(other),
    }
}

/// The norm of each gradient of the set on its own, as `f32`, in the set's order.
pub(crate) fn tensor_norms(set: &GradientSet, norm_type: NormType) -> Result<Vec<f32>> {
    let r: Option<Result<Option<Vec<f32>>>> =
        with_kernel_device!(set, |dev| kernels::norm::tensor_norms(&dev, set, norm_type));
    if let Some(r) = r {
        if let Some(norms) = r? {
            return Ok(norms);
        }
    }
    // One gradient at a time (the CPU; or kernels whose norm may need the rescue pass).
    set.singles()
        .map(|one| {
            total_norm(&one, norm_type)?
                .to_dtype(DType::F32)?
                .to_scalar::<f32>()
        })
        .collect()
}

/// The chunk partials of the reduction for `norm_type` on the kernel device of these gradients
/// (see `kernels::norm::chunk_partials`), or `None` when no kernel device takes them (plain CPU).
#[cfg_attr(
    not(any(feature = "cuda", feature = "emulation")),
    allow(unused_variables)
)]
pub(crate) fn chunk_partials(set: &GradientSet, norm_type: NormType) -> Option<Result<Vec<f64>>> {
    with_kernel_device!(set, |dev| kernels::norm::chunk_partials(
        &dev, set, norm_type
    ))
}

/// The local reductions of a rank's gradients where they live: the chunk partials of the kernels
/// (CUDA, or the emulation when it is active), added exactly on the host, so that the first sum
/// is the device's own; the CPU back end's work items for plain CPU gradients. The rescue pass
/// (powers divided by the global largest `|g|`, which no kernel computes) runs on the CPU, on
/// host copies of the gradients.
pub(crate) struct DeviceReduction<'a> {
    pub(crate) set: &'a GradientSet,
}

impl DeviceReduction<'_> {
    /// Host copies of the gradients.
    fn on_host(&self) -> Result<GradientSet> {
        GradientSet::from_grads(
            self.set
                .grads()
                .iter()
                .map(|g| g.to_device(&Device::Cpu))
                .collect::<Result<Vec<_>>>()?,
        )
    }
}

impl Reduction for DeviceReduction<'_> {
    fn max_abs(&self) -> Result<f64> {
        match chunk_partials(self.set, NormType::Inf) {
            // The largest partial; NaN wins, as in the kernels and on the CPU.
            Some(partials) => Ok(partials?.into_iter().fold(0.0, |m: f64, x| {
                if m.is_nan() || x.is_nan() {
                    f64::NAN
                } else {
                    m.max(x)
                }
            })),
            None if matches!(self.set.device(), Device::Cpu) => cpu::reduce::max_abs_of(self.set),
            None => cpu::reduce::max_abs_of(&self.on_host()?),
        }
    }

    fn sum_powers(&self, power: Power) -> Result<ExactSum> {
        let norm_type = match power {
            Power::Abs => Some(NormType::L1),
            Power::Square => Some(NormType::L2),
            Power::Pow { p, divisor: 1.0 } => Some(NormType::P(p)),
            Power::Pow { .. } => None,
        };
        if let Some(partials) = norm_type.and_then(|n| chunk_partials(self.set, n)) {
            let mut sum = ExactSum::new();
            partials?.into_iter().for_each(|x| sum.add(x));
            return Ok(sum);
        }
        match self.set.device() {
            Device::Cpu => cpu::reduce::exact_sum_of(self.set, power),
            _ => cpu::reduce::exact_sum_of(&self.on_host()?, power),
        }
    }
}
