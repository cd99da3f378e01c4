//! GradScaler's passes outside a fused step: `unscale_` in one read and one write of each element
//! where the CPU twin runs, and the one-read reduction alone.

use candle_core::{DType, Result, Tensor};

use super::fused_step::runs_cpu_twin;
use crate::backend::cpu;
use crate::ops::gradients::GradientSet;
use crate::ops::norm_type::NormType;

/// `GradScaler::unscale_` of `grads` (contiguous, sharing no storage, on one device) by the 0-d
/// `F32` `inv_scale`, where the CPU twin runs: every gradient unscaled in place in one read and
/// one write of each element, and whether any unscaled value is NaN or infinite. `None` on the
/// other back ends (the caller uses candle's ops there).
pub(crate) fn unscale_in_place(grads: &[Tensor], inv_scale: &Tensor) -> Result<Option<bool>> {
    match grads.first() {
        Some(first) if runs_cpu_twin(first.device()) => {
            // On the CPU reading the scale costs no synchronisation.
            let inv = inv_scale.to_dtype(DType::F32)?.to_scalar::<f32>()?;
            cpu::grad_scaler::unscale_all_in_place(grads, inv).map(Some)
        }
        _ => Ok(None),
    }
}

/// The norm of CPU gradients each multiplied by `inv_scale` as it is read (GradScaler's one-read
/// reduction), nothing written.
pub(crate) fn norm_unscaled_on_cpu(
    set: &GradientSet,
    norm_type: NormType,
    inv_scale: f32,
) -> Result<f64> {
    cpu::grad_scaler::norm_unscaled(set, &set.group_by_storage(), norm_type, inv_scale)
}
