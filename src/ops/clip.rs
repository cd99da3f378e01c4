//! Norm and value clipping as every back end defines them: the coefficient of a norm, when it
//! calls for a write, the element-wise operation that applies it, and the checks of a clip call.

use candle_core::DType;

use crate::ops::norm_type::NormType;

/// Default `eps` added to the norm before dividing, as in PyTorch (public as
/// `ClipGradNorm::DEFAULT_EPS`).
pub(crate) const DEFAULT_EPS: f64 = 1e-6;

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

/// The norm as the caller receives it (rounded to the norm tensor's dtype), as `f64`: what the
/// policies that read a norm (ZClip) take, on every back end.
pub(crate) fn returned_norm(norm: f64, dtype: DType) -> f64 {
    if dtype == DType::F64 {
        norm
    } else {
        norm as f32 as f64
    }
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
