//! The gradients GradScaler takes (checked before anything is read), their unscaling with
//! candle's ops as PyTorch computes it, and found-inf.

use std::collections::HashSet;

use candle_core::{backprop::GradStore, bail, DType, Result, Tensor, Var};

use crate::dispatch;
use crate::ops::gradients::{storage_key, GradientSet};
use crate::ops::norm_type::NormType;

/// The gradients of `vars` (vars without one left out), checked for unscaling: F32, F64 or
/// BF16, contiguous, on one device. Reads no data.
/// `caller` names the public method in the errors.
pub(super) fn checked_grads(caller: &str, vars: &[Var], grads: &GradStore) -> Result<Vec<Tensor>> {
    let mut targets: Vec<Tensor> = Vec::with_capacity(vars.len());
    for (i, var) in vars.iter().enumerate() {
        let Some(grad) = grads.get(var.as_tensor()) else {
            continue;
        };
        match grad.dtype() {
                DType::F32 | DType::F64 | DType::BF16 => {}
                DType::F16 => bail!(
                    "{caller}: the gradient of var #{i} is F16; GradScaler expects F32 (master) gradients, as PyTorch's: keep the vars in F32 and run the forward pass in F16 (cast the vars to F16 inside it), so that backward() gives F32 gradients to the vars; nothing was modified"
                ),
                other => bail!(
                    "{caller}: the gradient of var #{i} is {other:?}, not a float dtype; nothing was modified"
                ),
            }
        if !grad.is_contiguous() {
            bail!(
                    "{caller}: the gradient of var #{i} (shape {:?}) is not contiguous; it is written in place; nothing was modified",
                    grad.dims()
                )
        }
        if let Some(first) = targets.first() {
            if !grad.device().same_device(first.device()) {
                bail!(
                        "{caller}: the gradient of var #{i} is on {:?}, the first one on {:?}; nothing was modified",
                        grad.device().location(),
                        first.device().location()
                    )
            }
        }
        targets.push(grad.clone());
    }
    Ok(targets)
}

/// Every gradient of the store (F32, F64, BF16), each storage view once, for
/// [`GradScaler::step`] with an optimizer whose vars are unknown. An F16 one is an error: it may
/// be a var's (to be unscaled and checked) or an F16 intermediate's (to be left alone), which the
/// store cannot tell; so is a non-contiguous one (it is unscaled in place).
pub(super) fn store_grads(grads: &GradStore) -> Result<Vec<Tensor>> {
    let mut seen = HashSet::new();
    let mut targets: Vec<Tensor> = Vec::new();
    for id in grads.get_ids() {
        let Some(grad) = grads.get_id(*id) else {
            continue;
        };
        match grad.dtype() {
            DType::F32 | DType::F64 | DType::BF16 => {}
            DType::F16 => bail!(
                "GradScaler::step: the store holds an F16 gradient (shape {:?}) and the optimizer's vars are unknown: it may be a var's or an intermediate's of an F16 forward pass; call unscale_(&vars, &mut grads) with the optimizer's vars first; nothing was modified",
                grad.dims()
            ),
            _ => continue,
        }
        let layout = grad.layout();
        let view = (
            storage_key(grad),
            layout.start_offset(),
            layout.dims().to_vec(),
            layout.stride().to_vec(),
        );
        if !seen.insert(view) {
            continue;
        }
        if !grad.is_contiguous() {
            bail!(
                "GradScaler::step: a gradient in the store (shape {:?}) is not contiguous and cannot be unscaled in place; call unscale_(&vars, &mut grads) with the optimizer's vars first; nothing was modified",
                grad.dims()
            )
        }
        if let Some(first) = targets.first() {
            if !grad.device().same_device(first.device()) {
                bail!("GradScaler::step: the store holds gradients on two devices; call unscale_(&vars, &mut grads) with the optimizer's vars first; nothing was modified")
            }
        }
        targets.push(grad.clone());
    }
    Ok(targets)
}

/// Found-inf (0-d F32, 1 or 0) of unscaled gradients, on their device: the largest `|u|`
/// propagates NaN; `x * 0` is 0 when x is finite and NaN otherwise.
pub(super) fn found_inf_of(unscaled: &[Tensor]) -> Result<Tensor> {
    let max_abs =
        dispatch::norm::total_norm(&GradientSet::from_grads(unscaled.to_vec())?, NormType::Inf)?;
    let zero_if_finite = max_abs.affine(0.0, 0.0)?;
    zero_if_finite.ne(&zero_if_finite)?.to_dtype(DType::F32)
}

/// PyTorch's `inv_scale = (f32)(1 / (f64)scale)`, on the scale's device.
pub(super) fn inv_scale(scale: &Tensor) -> Result<Tensor> {
    scale.to_dtype(DType::F64)?.recip()?.to_dtype(DType::F32)
}

/// `g * inv_scale` as PyTorch computes it: F32 in `f32`, F64 in `f64` (the scale widened
/// exactly), BF16 in `f32` then rounded to BF16.
pub(super) fn unscale(g: &Tensor, inv_scale: &Tensor) -> Result<Tensor> {
    match g.dtype() {
        DType::F32 => g.broadcast_mul(inv_scale),
        DType::F64 => g.broadcast_mul(&inv_scale.to_dtype(DType::F64)?),
        _ => g
            .to_dtype(DType::F32)?
            .broadcast_mul(inv_scale)?
            .to_dtype(g.dtype()),
    }
}
