//! [`adaptive_clip_grad_`]: adaptive gradient clipping (AGC, Brock et al., 2021), unit-wise.

use candle_core::{backprop::GradStore, Result, Tensor, Var};

use crate::dispatch;
use crate::ops::agc::{self, AgcSet};

/// The default `eps` of adaptive gradient clipping (as in the paper and timm): the smallest
/// parameter norm a unit is measured against, so that zero-initialised units can still move
/// (public as `ClipSetting::AGC_DEFAULT_EPS`).
pub(crate) const AGC_DEFAULT_EPS: f64 = 1e-3;

/// Adaptive gradient clipping (AGC, Brock et al., 2021, "High-Performance Large-Scale Image
/// Recognition Without Normalization"), in place, unit by unit; returns the global L2 norm of the
/// gradients before clipping (a 0-d tensor on their device: `F64` when every gradient is `F64`,
/// else `F32`; a 0-d `F32` zero on the CPU when no var has a gradient).
///
/// A *unit* is each slice along dim 0 of a var of rank >= 2 (an output row of a `Linear` weight
/// `[out, in]`, an output channel of a conv weight `[out, in, kh, kw]`) and the whole var for rank
/// 0 or 1 (timm's convention; Optax's "every axis but the last" is the same thing for JAX's
/// `[in, out]` layout). For each unit, with norms in `f64`:
/// `max_norm = clipping * max(‖w_unit‖, eps)`, and where `‖g_unit‖ > max_norm` the unit's gradient
/// is multiplied by `max_norm / max(‖g_unit‖, 1e-6)`; other units are left bitwise untouched. A
/// unit whose parameters or gradient hold a NaN is never clipped (its comparison is false, as in
/// timm); an infinite gradient norm scales the unit by 0 (its infinities become NaN).
///
/// **Limit:** the sums of squares are `f64` with no rescue pass (unlike the global norm of
/// [`clip_grad_norm_`](crate::clip_grad_norm_)), so an `F64` unit with elements above about
/// `1e154` overflows to an infinite norm: the unit is zeroed instead of scaled down, the returned
/// norm is `inf`, and a fused optimizer with `skip_nonfinite` skips the step. F32, F16 and BF16
/// gradients cannot overflow it.
///
/// `clipping` must be finite and `> 0` (the paper uses 0.01 to 0.16 depending on batch size),
/// `eps` `>= 0` and not NaN ([`ClipSetting::AGC_DEFAULT_EPS`](crate::ClipSetting::AGC_DEFAULT_EPS) is the usual value). Vars without a gradient are
/// skipped, a var listed twice is clipped once. The gradients must have their var's dtype and
/// shape, and neither share storage with another gradient or a parameter nor be broadcast views;
/// anything refused changes nothing.
///
/// Cost: one read of every parameter and gradient and one write of the clipped units; on CUDA one
/// launch (plus one per non-contiguous gradient) and no host synchronisation. The result is
/// bitwise the same on the CPU and through the kernels.
///
/// ```
/// use candle_core::{Device, Tensor, Var, backprop::GradStore};
/// use candle_grad_clip::adaptive_clip_grad_;
/// # fn main() -> candle_core::Result<()> {
/// // A [2, 2] weight: unit 0 is the row [3, 4] (norm 5), unit 1 the row [0, 0].
/// let w = Var::new(&[[3f32, 4.], [0., 0.]], &Device::Cpu)?;
/// let mut grads = GradStore::default();
/// grads.insert(&w, Tensor::new(&[[0.3f32, 0.4], [0.0, 2.0]], &Device::Cpu)?);
/// let norm = adaptive_clip_grad_(&[w.clone()], &mut grads, 0.05, 1e-3)?;
/// assert!((norm.to_scalar::<f32>()? - (0.25f32 + 4.0).sqrt()).abs() < 1e-6);
/// let g = grads.get(&w).unwrap().to_vec2::<f32>()?;
/// // Row 0: ‖g‖ = 0.5 > 0.05 · 5 = 0.25, scaled by 0.25 / 0.5.
/// assert!((g[0][0] - 0.15).abs() < 1e-7 && (g[0][1] - 0.2).abs() < 1e-7);
/// // Row 1: zero weights, so max_norm = 0.05 · eps = 5e-5; ‖g‖ = 2 is scaled down to it.
/// assert!((g[1][1] - 5e-5).abs() < 1e-10);
/// # Ok(()) }
/// ```
pub fn adaptive_clip_grad_(
    vars: &[Var],
    grads: &mut GradStore,
    clipping: f64,
    eps: f64,
) -> Result<Tensor> {
    Ok(adaptive_clip(vars, grads, clipping, eps)?.norm)
}

/// [`adaptive_clip_grad_`], with the device-side flag "some unit was clipped" (for the step
/// counts of `Clipped`).
pub(crate) fn adaptive_clip(
    vars: &[Var],
    grads: &GradStore,
    clipping: f64,
    eps: f64,
) -> Result<agc::AgcOutcome> {
    agc::validate(clipping, eps)?;
    let set = AgcSet::collect("adaptive_clip_grad_", vars, |v| {
        grads.get(v.as_tensor()).cloned()
    })?;
    if set.is_empty() {
        let zero = Tensor::new(0f32, &candle_core::Device::Cpu)?;
        return Ok(agc::AgcOutcome {
            clipped: Tensor::new(0u32, &candle_core::Device::Cpu)?,
            norm: zero,
        });
    }
    dispatch::agc::clip(&set, clipping, eps)
}
