//! Adaptive gradient clipping (AGC, Brock et al., 2021), unit-wise: the operation as the back ends
//! see it.
//!
//! A *unit* of a var is each slice along dim 0 when the var has rank >= 2 (an output row of a
//! `Linear` weight `[out, in]`, an output channel of a conv weight), the whole var when its rank is
//! 0 or 1 (timm's convention). For each unit, with norms in `f64`:
//! `max_norm = clipping * max(||w_unit||, eps)`; when `||g_unit|| > max_norm` the unit's gradient
//! is multiplied by `max_norm / max(||g_unit||, 1e-6)` (each element's product taken in `f64` and
//! rounded once to its dtype), else it is left bitwise untouched. A NaN in a unit's parameters
//! makes its `max_norm` NaN, and a NaN gradient norm compares false: such units are never clipped
//! (as in timm, where `NaN > x` is false).
//!
//! **Summation order** (shared by the CPU twin and the kernel, so that they agree bitwise): the
//! sums of squares of a unit are taken in [`LANES`] lanes, element `i` of the unit going to lane
//! `i % 32`, each lane adding `x * x` (one rounding each) in element order, then the lanes combined
//! by the fixed tree `lane[l] += lane[l + w]` for `w = 16, 8, 4, 2, 1` (a warp's shuffle-down
//! reduction). The global L2 norm is the exact ([`ExactSum`](crate::ops::exact_sum::ExactSum)) sum of
//! the units' gradient sums, rounded once, then its square root.

use candle_core::{bail, DType, Device, Result, Tensor, Var};

use crate::ops::gradients::{check_matches_var, repeats_elements, storage_key};

/// Lanes of a unit's sums: a warp.
pub(crate) const LANES: usize = 32;
/// The floor of a gradient norm in the clip coefficient (timm's `clamp(min=1e-6)`).
pub(crate) const GRAD_NORM_FLOOR: f64 = 1e-6;

/// The gradients one AGC call works on, validated: each with its var's parameter tensor, same
/// dtype and shape, all on one device, no gradient sharing storage with another gradient or with
/// a parameter of the set.
pub(crate) struct AgcSet {
    pub(crate) params: Vec<Tensor>,
    pub(crate) grads: Vec<Tensor>,
    device: Device,
}

/// Units of a tensor of `dims`: (number of units, elements per unit); `(0, 0)` when empty.
pub(crate) fn units_of(dims: &[usize]) -> (usize, usize) {
    let n: usize = dims.iter().product();
    if n == 0 {
        return (0, 0);
    }
    match dims {
        [rows, ..] if dims.len() >= 2 => (*rows, n / rows),
        _ => (1, n),
    }
}

impl AgcSet {
    /// The `(param, grad)` pairs of `vars` that have a gradient (each var once), validated. `what`
    /// names the caller in errors. Reads no data.
    pub(crate) fn collect(
        what: &str,
        vars: &[Var],
        lookup: impl Fn(&Var) -> Option<Tensor>,
    ) -> Result<Self> {
        let mut seen = std::collections::HashSet::new();
        let mut params = Vec::new();
        let mut grads: Vec<Tensor> = Vec::new();
        for (i, var) in vars.iter().enumerate() {
            if !seen.insert(var.id()) {
                continue;
            }
            let Some(grad) = lookup(var) else { continue };
            check_matches_var(what, i, var, &grad)?;
            match grad.dtype() {
                DType::F32 | DType::F64 | DType::F16 | DType::BF16 => {}
                other => bail!(
                    "{what}: the gradient of var #{i} has dtype {other:?}; adaptive gradient clipping supports F32, F64, F16 and BF16; nothing was modified"
                ),
            }
            if let Some(first) = grads.first() {
                if !first.device().same_device(grad.device()) {
                    bail!(
                        "{what}: gradients are on different devices: {:?} and {:?} (var #{i}); nothing was modified",
                        first.device().location(),
                        grad.device().location()
                    )
                }
            }
            if !var.device().same_device(grad.device()) {
                bail!(
                    "{what}: the gradient of var #{i} is on {:?} but the var on {:?}; nothing was modified",
                    grad.device().location(),
                    var.device().location()
                )
            }
            if grad.elem_count() > 0 && repeats_elements(&grad) {
                bail!(
                    "{what}: the gradient of var #{i} (shape {:?}, stride {:?}) is a broadcast view that repeats elements; it cannot be modified in place, store a contiguous gradient instead; nothing was modified",
                    grad.dims(),
                    grad.stride()
                )
            }
            params.push(var.as_tensor().clone());
            grads.push(grad);
        }
        // A gradient that shares its storage with another gradient or a parameter would be read
        // while it is written.
        let param_keys: Vec<usize> = params.iter().map(storage_key).collect();
        let mut grad_keys: Vec<(usize, usize)> = grads
            .iter()
            .enumerate()
            .filter(|(_, g)| g.elem_count() > 0)
            .map(|(k, g)| (storage_key(g), k))
            .collect();
        grad_keys.sort_unstable();
        for pair in grad_keys.windows(2) {
            if pair[0].0 == pair[1].0 {
                bail!("{what}: two gradients (of vars with shapes {:?} and {:?}) share one storage; adaptive clipping needs each gradient in a storage of its own; nothing was modified", params[pair[0].1].dims(), params[pair[1].1].dims())
            }
        }
        for &(key, k) in &grad_keys {
            if param_keys.contains(&key) {
                bail!("{what}: the gradient of the var of shape {:?} shares storage with a parameter; nothing was modified", params[k].dims())
            }
        }
        let device = grads.first().map_or(Device::Cpu, |g| g.device().clone());
        Ok(Self {
            params,
            grads,
            device,
        })
    }

    pub(crate) fn device(&self) -> &Device {
        &self.device
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.grads.is_empty()
    }

    /// The dtype of the returned norm: `F64` when every gradient is `F64`, else `F32`.
    pub(crate) fn norm_dtype(&self) -> DType {
        if !self.grads.is_empty() && self.grads.iter().all(|g| g.dtype() == DType::F64) {
            DType::F64
        } else {
            DType::F32
        }
    }
}

/// Validates AGC's settings (the error names the setting).
pub(crate) fn validate(clipping: f64, eps: f64) -> Result<()> {
    if !(clipping.is_finite() && clipping > 0.0) {
        bail!("adaptive gradient clipping: clipping must be finite and > 0, got {clipping}")
    }
    if eps.is_nan() || eps < 0.0 {
        bail!("adaptive gradient clipping: eps must be >= 0 (not NaN), got {eps}")
    }
    Ok(())
}

/// A unit's clip, from its sums of squares: `Some(coefficient)` when it is clipped. Mirrored by
/// `agc_coefficient` in `kernels/grad_clip.cu`.
#[inline]
pub(crate) fn unit_coefficient(
    param_sq: f64,
    grad_sq: f64,
    clipping: f64,
    eps: f64,
) -> Option<f64> {
    let w = param_sq.sqrt();
    let g = grad_sq.sqrt();
    // max(w, eps), NaN propagating (torch's clamp).
    let floor = if w.is_nan() || w > eps { w } else { eps };
    let max_norm = clipping * floor;
    if g > max_norm {
        let denominator = if g > GRAD_NORM_FLOOR {
            g
        } else {
            GRAD_NORM_FLOOR
        };
        Some(max_norm / denominator)
    } else {
        None
    }
}

/// What one AGC call measured.
pub(crate) struct AgcOutcome {
    /// The global L2 norm of the gradients before clipping, a 0-d tensor on their device.
    pub(crate) norm: Tensor,
    /// A 0-d `U32` on the device: 1 when some unit was clipped.
    pub(crate) clipped: Tensor,
}
