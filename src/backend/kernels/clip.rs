//! Norm and value clipping on a kernel device: reduce, then scale in place by the coefficient
//! the reduction left on the device (the work between, a policy's kernel or a check, is the
//! caller's); scale by a norm given on the device; clamp.

use candle_core::{bail, DType, Result, Tensor};

use super::launch::{Coefficient, ElementOp, NormPlan};
use super::norm::{norm_at, readable_norm};
use super::table::Base;
use super::table::{contiguous_copies, Operands, Table};
use super::{launch_all, Buffer, KernelDevice, Session};
use crate::ops::clip::{nonfinite_error, ClipSettings};
use crate::ops::gradients::{storage_key, GradientSet};

/// Reduce, then scale in place by the coefficient the reduction left on the device.
pub(crate) fn clip_norm(
    dev: &impl KernelDevice,
    set: &GradientSet,
    settings: ClipSettings,
) -> Result<Tensor> {
    let plan = NormPlan::new(settings.norm_type, set);
    let (norm, ()) = reduce_then_scale(
        dev,
        set,
        &plan,
        (settings.max_norm, settings.eps),
        None,
        |s, reduced| {
            if settings.error_if_nonfinite {
                // The one documented host synchronisation: the norm must be known before any
                // write.
                let norm = s.read(reduced.out)?[0];
                if !norm.is_finite() {
                    return Err(nonfinite_error(norm, settings.norm_type));
                }
            }
            Ok(())
        },
    )?;
    Ok(norm)
}

/// What [`reduce_then_scale`] hands to the work between the reduction and the scaling pass.
pub(super) struct Reduced {
    /// The norm's buffer (f64 when `out_f64`, else f32).
    pub(super) out: Buffer,
    pub(super) out_f64: bool,
    /// The scratch, holding the reduction's coefficient (which the work may replace).
    pub(super) scratch: u64,
    /// The base of the session's extra operand, when one was passed.
    pub(super) extra: Option<Base>,
}

/// The shared sequence of the clips that scale by a coefficient of the global norm: reduce
/// (`plan`, the coefficient `min(1, max_norm / (norm + eps))` of `bounds` to the scratch), run
/// `between` (a policy's kernel that replaces the coefficient, a check that refuses before any
/// write), then scale every gradient in place by the scratch's coefficient. Gradients that cannot
/// be written are refused before anything is enqueued. Returns the norm (0-d) and what `between`
/// returned.
pub(super) fn reduce_then_scale<R>(
    dev: &impl KernelDevice,
    set: &GradientSet,
    plan: &NormPlan,
    bounds: (f64, f64),
    extra: Option<&Tensor>,
    between: impl FnOnce(&mut dyn Session, &Reduced) -> Result<R>,
) -> Result<(Tensor, R)> {
    dev.check_ready()?;
    let groups = set.storage_groups()?;
    let copies = contiguous_copies(set)?;
    let operands = Operands::new(set.grads(), &copies, extra);
    dev.with_session(
        operands.tensors(),
        0..operands.gradient_count(),
        |s, bases| {
            let mut table = Table::default();
            let (norm, _) = table.push_norm_inputs(&groups, &operands, bases);
            let (write, strided) =
                table.push_write_targets(set.grads(), &groups, bases, Some(norm));
            let out_f64 = set.norm_dtype() == DType::F64;
            let out = s.alloc(set.norm_dtype(), 1)?;
            let t = s.upload(&table.words)?;
            let scratch = s.scratch();
            let (max_norm, eps) = bounds;
            launch_all(
                s,
                plan.reduce(t, norm, scratch, out.ptr, out_f64, max_norm, eps, None),
            )?;
            let reduced = Reduced {
                out,
                out_f64,
                scratch,
                extra: operands.extra().map(|i| bases[i]),
            };
            let done = between(s, &reduced)?;
            let op = ElementOp::Scale(Coefficient::Scratch(scratch));
            launch_all(s, op.apply_all(t, write, &strided))?;
            Ok((s.take_tensor(out, &[])?, done))
        },
    )
}

/// Scale in place by `min(1, max_norm / (total_norm + eps))`, computed by the scale kernel from the
/// 0-d `total_norm` on the device (a negative or NaN `total_norm` makes the gradients NaN: it is
/// never read back).
pub(crate) fn scale_with_norm(
    dev: &impl KernelDevice,
    set: &GradientSet,
    max_norm: f64,
    eps: f64,
    total_norm: &Tensor,
) -> Result<()> {
    dev.check_ready()?;
    let groups = set.storage_groups()?;
    let norm = readable_norm(total_norm)?;
    if !norm.device().same_device(set.device()) {
        bail!("clip_grads_with_norm_: total_norm must be on the gradients' device")
    }
    // The scale kernel reads the norm while it writes the gradients: never from their storage.
    let norm_key = storage_key(&norm);
    let norm = if set.grads().iter().any(|g| storage_key(g) == norm_key) {
        // The norm's element only (`copy` would clone the whole gradient storage under it).
        norm.force_contiguous()?
    } else {
        norm
    };
    let operands = Operands::new(set.grads(), &[], Some(&norm));
    dev.with_session(
        operands.tensors(),
        0..operands.gradient_count(),
        |s, bases| {
            let mut table = Table::default();
            let (write, strided) = table.push_write_targets(set.grads(), &groups, bases, None);
            let index = operands.extra().expect("the norm was passed");
            let op = ElementOp::Scale(Coefficient::Norm(norm_at(
                bases[index],
                &norm,
                max_norm,
                eps,
            )));
            let t = s.upload(&table.words)?;
            launch_all(s, op.apply_all(t, write, &strided))
        },
    )
}

/// Clamp every element into `[-clip_value, clip_value]` in place (bound rounded towards zero in
/// each gradient's dtype; NaN stays NaN), one launch.
pub(crate) fn clamp(dev: &impl KernelDevice, set: &GradientSet, clip_value: f64) -> Result<()> {
    dev.check_ready()?;
    let groups = set.storage_groups()?;
    let operands = Operands::new(set.grads(), &[], None);
    dev.with_session(
        operands.tensors(),
        0..operands.gradient_count(),
        |s, bases| {
            let mut table = Table::default();
            let (write, strided) = table.push_write_targets(set.grads(), &groups, bases, None);
            let op = ElementOp::Clamp(clip_value);
            let t = s.upload(&table.words)?;
            launch_all(s, op.apply_all(t, write, &strided))
        },
    )
}
