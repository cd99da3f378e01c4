//! Norm and value clipping in place: reduce, then scale by the coefficient when it calls for a
//! write; scale by a norm computed earlier; clamp.
use candle_core::{bail, DType, Device, Result, Tensor};

use super::{unsupported, with_kernel_device};
use crate::backend::cpu;
#[cfg(any(feature = "cuda", feature = "emulation"))]
use crate::backend::kernels;
use crate::ops::clip::{
    clip_coefficient, needs_scaling, nonfinite_error, returned_norm, ClipSettings, ElementwiseOp,
};
use crate::ops::gradients::GradientSet;

pub(crate) fn clip_norm(set: &GradientSet, settings: ClipSettings) -> Result<Tensor> {
    let r: Option<Result<Tensor>> =
        with_kernel_device!(set, |dev| kernels::clip::clip_norm(&dev, set, settings));
    if let Some(r) = r {
        return r;
    }
    match set.device() {
        Device::Cpu => {
            // Gradients that cannot be written are refused whether or not this call clips, as on
            // CUDA.
            let groups = set.storage_groups()?;
            let norm = cpu::reduce::norm(set, &groups, settings.norm_type)?;
            // Finite as returned: an F32 norm tensor overflows above f32::MAX.
            let returned = returned_norm(norm, set.norm_dtype());
            if settings.error_if_nonfinite && !returned.is_finite() {
                return Err(nonfinite_error(returned, settings.norm_type));
            }
            let coefficient = clip_coefficient(norm, settings.max_norm, settings.eps);
            if needs_scaling(coefficient) {
                cpu::apply::apply_in_place(set, &groups, ElementwiseOp::Scale(coefficient))?;
            }
            cpu::reduce::norm_tensor(norm, set.norm_dtype())
        }
        other => unsupported(other),
    }
}

pub(crate) fn scale_with_norm(
    set: &GradientSet,
    max_norm: f64,
    eps: f64,
    total_norm: &Tensor,
) -> Result<()> {
    let r: Option<Result<()>> = with_kernel_device!(set, |dev| kernels::clip::scale_with_norm(
        &dev, set, max_norm, eps, total_norm
    ));
    if let Some(r) = r {
        return r;
    }
    match set.device() {
        Device::Cpu => {
            let groups = set.storage_groups()?;
            let norm = total_norm.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            if norm < 0.0 {
                bail!("clip_grads_with_norm_: total_norm must be >= 0 (a norm), got {norm}; no gradient was modified")
            }
            let coefficient = clip_coefficient(norm, max_norm, eps);
            if needs_scaling(coefficient) {
                cpu::apply::apply_in_place(set, &groups, ElementwiseOp::Scale(coefficient))?;
            }
            Ok(())
        }
        other => unsupported(other),
    }
}

pub(crate) fn clamp(set: &GradientSet, clip_value: f64) -> Result<()> {
    let r: Option<Result<()>> =
        with_kernel_device!(set, |dev| kernels::clip::clamp(&dev, set, clip_value));
    if let Some(r) = r {
        return r;
    }
    match set.device() {
        Device::Cpu => cpu::apply::apply_in_place(
            set,
            &set.storage_groups()?,
            ElementwiseOp::Clamp(clip_value),
        ),
        other => unsupported(other),
    }
}
