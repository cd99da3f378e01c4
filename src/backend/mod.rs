//! Device dispatch. Every public operation is "collect and validate the gradients"
//! ([`GradientSet`]), then one of the operations here, which each back end implements:
//!
//! - [`total_norm`]: reduce all gradients to one norm;
//! - [`clip_norm`]: reduce, compute the coefficient, and scale in place only when it is below 1;
//! - [`scale_with_norm`]: scale in place by the coefficient of a norm computed earlier;
//! - [`clamp`]: clamp every element in place.
//!
//! The CPU back end ([`cpu`]) computes on the host. The CUDA back end keeps the norm and the
//! coefficient on the device and never waits for it: [`kernels`] decides what the kernels of
//! `kernels/grad_clip.cu` are asked to do, and a device runs them: a GPU (`cuda`, feature `cuda`),
//! or the host emulation of the kernels (`emulated`, feature `emulation`), which takes CPU tensors
//! while a [`KernelEmulation`](crate::KernelEmulation) is active on the calling thread.

pub(crate) mod agc;
pub(crate) mod cpu;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
#[cfg(feature = "emulation")]
pub(crate) mod emulated;
#[cfg(any(feature = "cuda", feature = "emulation"))]
pub(crate) mod kernels;
pub(crate) mod update;

use candle_core::{bail, DType, Device, Result, Tensor};

use crate::ops::gradients::GradientSet;
use crate::ops::norm_type::NormType;
use crate::policy::zclip::{self, ZClipParams};

/// An in-place element-wise update.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum ElementwiseOp {
    /// `g *= coefficient`: the product taken in `f64` with the unrounded coefficient, then
    /// rounded to the gradient's dtype.
    Scale(f64),
    /// Clamp into `[-v, v]`, `v >= 0`, the bound rounded towards zero in the gradient's dtype;
    /// NaN stays NaN.
    Clamp(f64),
}

/// The clipping coefficient `min(1, max_norm / (norm + eps))`, as in PyTorch, with the `0 / 0`
/// of `max_norm = 0`, `norm + eps = 0` defined as 0 (clip to zero). A NaN norm gives NaN, and so
/// does a negative one (not a norm: the kernels, which never read the norm back, poison the
/// gradients rather than flip their signs; the CPU refuses it before); an infinite norm gives 0,
/// except that `max_norm = inf` never clips (1). Mirrored by `clip_coefficient` in
/// `kernels/grad_clip.cu`.
pub(crate) fn clip_coefficient(norm: f64, max_norm: f64, eps: f64) -> f64 {
    if norm.is_nan() || norm < 0.0 {
        return f64::NAN;
    }
    if max_norm == f64::INFINITY {
        return 1.0;
    }
    let c = max_norm / (norm + eps);
    if c.is_nan() {
        0.0
    } else {
        c.min(1.0)
    }
}

/// Whether a coefficient calls for a write pass: below 1, or NaN (a NaN norm poisons the
/// gradients, as in PyTorch). At 1 or above nothing is written.
pub(crate) fn needs_scaling(coefficient: f64) -> bool {
    coefficient < 1.0 || coefficient.is_nan()
}

/// Settings of one norm-clipping call, validated by the caller.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ClipSettings {
    pub norm_type: NormType,
    pub max_norm: f64,
    pub eps: f64,
    pub error_if_nonfinite: bool,
}

/// The error for a non-finite norm under `error_if_nonfinite`, raised before any write.
pub(crate) fn nonfinite_error(norm: f64, norm_type: NormType) -> candle_core::Error {
    candle_core::Error::Msg(format!(
        "the total {norm_type} norm of the gradients is non-finite ({norm}), so it cannot be clipped (error_if_nonfinite is set); no gradient was modified"
    ))
    .bt()
}

/// The device that runs the multi-tensor kernels for these gradients, if any: their CUDA device,
/// or, for CPU gradients, the host emulation when it is active on this thread.
macro_rules! with_kernel_device {
    ($set:expr, |$dev:ident| $body:expr) => {
        match $set.device() {
            #[cfg(feature = "cuda")]
            Device::Cuda(cuda) => {
                let $dev = cuda::Cuda(cuda);
                Some($body)
            }
            #[cfg(feature = "emulation")]
            Device::Cpu if emulated::active() => {
                let $dev = emulated::Emulated;
                Some($body)
            }
            _ => None,
        }
    };
}

pub(crate) fn total_norm(set: &GradientSet, norm_type: NormType) -> Result<Tensor> {
    let r: Option<Result<Tensor>> =
        with_kernel_device!(set, |dev| kernels::total_norm(&dev, set, norm_type));
    if let Some(r) = r {
        return r;
    }
    match set.device() {
        Device::Cpu => cpu::norm_tensor(
            cpu::norm(set, &set.group_by_storage(), norm_type)?,
            set.norm_dtype(),
        ),
        other => unsupported(other),
    }
}

/// The norm of each gradient of the set on its own, as `f32`, in the set's order.
pub(crate) fn tensor_norms(set: &GradientSet, norm_type: NormType) -> Result<Vec<f32>> {
    let r: Option<Result<Option<Vec<f32>>>> =
        with_kernel_device!(set, |dev| kernels::tensor_norms(&dev, set, norm_type));
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
/// (see `kernels::chunk_partials`), or `None` when no kernel device takes them (plain CPU).
#[cfg_attr(
    not(any(feature = "cuda", feature = "emulation")),
    allow(unused_variables)
)]
pub(crate) fn chunk_partials(set: &GradientSet, norm_type: NormType) -> Option<Result<Vec<f64>>> {
    with_kernel_device!(set, |dev| kernels::chunk_partials(&dev, set, norm_type))
}

pub(crate) fn clip_norm(set: &GradientSet, settings: ClipSettings) -> Result<Tensor> {
    let r: Option<Result<Tensor>> =
        with_kernel_device!(set, |dev| kernels::clip_norm(&dev, set, settings));
    if let Some(r) = r {
        return r;
    }
    match set.device() {
        Device::Cpu => {
            // Gradients that cannot be written are refused whether or not this call clips, as on
            // CUDA.
            let groups = set.storage_groups()?;
            let norm = cpu::norm(set, &groups, settings.norm_type)?;
            // Finite as returned: an F32 norm tensor overflows above f32::MAX.
            let returned = returned_norm(norm, set.norm_dtype());
            if settings.error_if_nonfinite && !returned.is_finite() {
                return Err(nonfinite_error(returned, settings.norm_type));
            }
            let coefficient = clip_coefficient(norm, settings.max_norm, settings.eps);
            if needs_scaling(coefficient) {
                cpu::apply_in_place(set, &groups, ElementwiseOp::Scale(coefficient))?;
            }
            cpu::norm_tensor(norm, set.norm_dtype())
        }
        other => unsupported(other),
    }
}

/// The norm as the caller receives it (rounded to the norm tensor's dtype), as `f64`: what the
/// policies that read a norm (ZClip) take, on every back end.
pub(crate) fn returned_norm(norm: f64, dtype: DType) -> f64 {
    if dtype == DType::F64 {
        norm
    } else {
        norm as f32 as f64
    }
}

/// One ZClip step on the host: the statistics `state` (a 1-D `F64` CPU tensor) updated for the
/// exact `norm` of gradients whose norm dtype is `dtype`; the coefficient and the new statistics.
pub(crate) fn zclip_on_host(
    norm: f64,
    dtype: DType,
    state: &Tensor,
    params: &ZClipParams,
) -> Result<(f64, Tensor)> {
    let mut words = state.to_vec1::<f64>()?;
    let c = zclip::update(&mut words, zclip::input(norm, dtype), params);
    Ok((c, Tensor::new(words, state.device())?))
}

/// ZClip: the global L2 norm, the ZClip step on the statistics `state` (a 1-D `F64` tensor on the
/// gradients' device), and the scaling by its coefficient in place. Returns the norm and the new
/// statistics (`state` itself is not written).
pub(crate) fn clip_zclip(
    set: &GradientSet,
    state: &Tensor,
    params: &ZClipParams,
) -> Result<(Tensor, Tensor)> {
    if !state.device().same_device(set.device()) {
        bail!(
            "ZClip: its statistics are on {:?} but the gradients on {:?}",
            state.device().location(),
            set.device().location()
        )
    }
    let r: Option<Result<(Tensor, Tensor)>> =
        with_kernel_device!(set, |dev| kernels::clip_zclip(&dev, set, state, params));
    if let Some(r) = r {
        return r;
    }
    match set.device() {
        Device::Cpu => {
            let groups = set.storage_groups()?;
            let norm = cpu::norm(set, &groups, NormType::L2)?;
            let (c, state) = zclip_on_host(norm, set.norm_dtype(), state, params)?;
            if needs_scaling(c) {
                cpu::apply_in_place(set, &groups, ElementwiseOp::Scale(c))?;
            }
            Ok((cpu::norm_tensor(norm, set.norm_dtype())?, state))
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
    let r: Option<Result<()>> = with_kernel_device!(set, |dev| kernels::scale_with_norm(
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
                cpu::apply_in_place(set, &groups, ElementwiseOp::Scale(coefficient))?;
            }
            Ok(())
        }
        other => unsupported(other),
    }
}

pub(crate) fn clamp(set: &GradientSet, clip_value: f64) -> Result<()> {
    let r: Option<Result<()>> =
        with_kernel_device!(set, |dev| kernels::clamp(&dev, set, clip_value));
    if let Some(r) = r {
        return r;
    }
    match set.device() {
        Device::Cpu => cpu::apply_in_place(
            set,
            &set.storage_groups()?,
            ElementwiseOp::Clamp(clip_value),
        ),
        other => unsupported(other),
    }
}

fn unsupported<T>(device: &Device) -> Result<T> {
    bail!(
        "gradient clipping supports CPU and CUDA gradients (CUDA with the `cuda` feature); got gradients on {:?}",
        device.location()
    )
}
