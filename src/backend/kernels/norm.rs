//! Norms on a kernel device: the global norm (one reduction, nothing read back), each gradient's
//! own norm (the reduction's chunk partials combined per segment, one transfer), and the chunk
//! partials themselves (for the norm across processes).

use candle_core::{DType, Result, Tensor};

use super::abi;
use super::launch::{NormAt, NormPlan};
use super::table::Base;
use super::table::{contiguous_copies, Operands, Part, Table};
use super::{launch_all, Buffer, KernelDevice, Session};
use crate::ops::gradients::GradientSet;
use crate::ops::norm_type::NormType;

/// The global norm as a 0-d tensor on the device; nothing is read back.
pub(crate) fn total_norm(
    dev: &impl KernelDevice,
    set: &GradientSet,
    norm_type: NormType,
) -> Result<Tensor> {
    dev.check_ready()?;
    let plan = NormPlan::new(norm_type, set);
    let groups = set.group_by_storage();
    let copies = contiguous_copies(set)?;
    let operands = Operands::new(set.grads(), &copies, None);
    dev.with_session(operands.tensors(), 0..0, |s, bases| {
        let mut table = Table::default();
        let (norm, _) = table.push_norm_inputs(&groups, &operands, bases);
        let out_f64 = set.norm_dtype() == DType::F64;
        let out = s.alloc(set.norm_dtype(), 1)?;
        let t = s.upload(&table.words)?;
        let scratch = s.scratch();
        launch_all(
            s,
            plan.reduce(t, norm, scratch, out.ptr, out_f64, f64::INFINITY, 0.0, None),
        )?;
        s.take_tensor(out, &[])
    })
}

/// The 0-d norm a reduction wrote to `out` (f64 when `out_f64`, else f32), as the kernels read it.
pub(super) fn out_norm(out: Buffer, out_f64: bool) -> NormAt {
    NormAt {
        ptr: out.ptr,
        dtype: if out_f64 { abi::DT_F64 } else { abi::DT_F32 },
        max_norm: f64::INFINITY,
        eps: 0.0,
    }
}

/// A 0-d norm tensor in a dtype the kernels read: a gradient dtype as it is, another float dtype
/// (F8…) converted to F32 on the device by candle.
pub(super) fn readable_norm(norm: &Tensor) -> Result<Tensor> {
    match norm.dtype() {
        DType::F32 | DType::F64 | DType::F16 | DType::BF16 => Ok(norm.clone()),
        _ => norm.to_dtype(DType::F32),
    }
}

/// The 0-d `norm`, an operand whose storage starts at `base`, as the kernels read it.
pub(super) fn norm_at(base: Base, norm: &Tensor, max_norm: f64, eps: f64) -> NormAt {
    NormAt {
        ptr: base.at(norm.layout().start_offset()),
        dtype: base.dtype,
        max_norm,
        eps,
    }
}

/// The reduction for `plan` over `set`, storing every chunk's partial too (in a buffer of at
/// least one element), then `then` with the session, the table's address, the norm inputs' part
/// of the table, the partials and each gradient's segment (`None`: empty). Only reads the
/// gradients.
fn reduce_with_partials<R>(
    dev: &impl KernelDevice,
    set: &GradientSet,
    plan: &NormPlan,
    then: impl FnOnce(&mut dyn Session, u64, Part, Buffer, &[Option<u32>]) -> Result<R>,
) -> Result<R> {
    dev.check_ready()?;
    let groups = set.group_by_storage();
    let copies = contiguous_copies(set)?;
    let operands = Operands::new(set.grads(), &copies, None);
    dev.with_session(operands.tensors(), 0..0, |s, bases| {
        let mut table = Table::default();
        let (norm, segment_of) = table.push_norm_inputs(&groups, &operands, bases);
        let out_f64 = set.norm_dtype() == DType::F64;
        let out = s.alloc(set.norm_dtype(), 1)?;
        let partials = s.alloc(DType::F64, norm.chunks.max(1) as usize)?;
        let t = s.upload(&table.words)?;
        let scratch = s.scratch();
        launch_all(
            s,
            plan.reduce(
                t,
                norm,
                scratch,
                out.ptr,
                out_f64,
                f64::INFINITY,
                0.0,
                Some(partials.ptr),
            ),
        )?;
        then(s, t, norm, partials, &segment_of)
    })
}

/// The norm of each gradient of the set on its own, read back in one transfer: the reduction of
/// the total also stores every chunk's partial, and one more launch combines them per gradient.
/// `None` when the norm may need the rescue pass (F64 gradients or `p > 6`): the caller then takes
/// the gradients one at a time.
pub(crate) fn tensor_norms(
    dev: &impl KernelDevice,
    set: &GradientSet,
    norm_type: NormType,
) -> Result<Option<Vec<f32>>> {
    let plan = NormPlan::new(norm_type, set);
    if plan.rescue {
        return Ok(None);
    }
    reduce_with_partials(dev, set, &plan, |s, t, norm, partials, segment_of| {
        if norm.segments == 0 {
            return Ok(Some(vec![0.0; segment_of.len()]));
        }
        let per_segment = s.alloc(DType::F32, norm.segments as usize)?;
        launch_all(
            s,
            [plan.segment_norms(t, norm, partials.ptr, per_segment.ptr)],
        )?;
        let values = s.read(per_segment)?;
        // An empty gradient has no segment: its norm is 0.
        Ok(Some(
            segment_of
                .iter()
                .map(|seg| seg.map_or(0.0, |k| values[k as usize] as f32))
                .collect(),
        ))
    })
}

/// Every chunk's partial of the reduction for `norm_type` (`|g|` summed, squared, to the power
/// `p`, or the largest `|g|` for `Inf`), read back in one transfer: the very values the device
/// adds into its superaccumulator (or takes the maximum of), so that an exact sum of them on the
/// host is the device's sum. For the norm across processes. The whole reduction runs (the rescue
/// launch too, a no-op unless asked for), so the scratch is left as every operation leaves it.
pub(crate) fn chunk_partials(
    dev: &impl KernelDevice,
    set: &GradientSet,
    norm_type: NormType,
) -> Result<Vec<f64>> {
    let plan = NormPlan::new(norm_type, set);
    reduce_with_partials(dev, set, &plan, |s, _, norm, partials, _| {
        let mut values = s.read(partials)?;
        values.truncate(norm.chunks as usize);
        Ok(values)
    })
}
