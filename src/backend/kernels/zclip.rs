//! ZClip on a kernel device: the L2 reduction, `grad_clip_zclip` (ZClip's step, `ops::zclip`) on
//! the statistics, then the scaling pass by the coefficient it left in the scratch. No host
//! synchronisation.

use candle_core::{bail, DType, Result, Tensor};

use super::clip::reduce_then_scale;
use super::launch::{self, NormAt, NormPlan};
use super::norm::out_norm;
use super::table::Base;
use super::{launch_all, KernelDevice, Session};
use crate::ops::gradients::GradientSet;
use crate::ops::norm_type::NormType;
use crate::ops::zclip::ZClipParams;

/// ZClip (`policy::zclip`): reduce the L2 norm, run the ZClip step on the statistics `state` (a
/// 1-D `F64` tensor, only read) into a new buffer, then scale in place by the coefficient it left
/// in the scratch. Three launches (and the strided ones), one table, no host synchronisation.
pub(crate) fn clip_zclip(
    dev: &impl KernelDevice,
    set: &GradientSet,
    state: &Tensor,
    params: &ZClipParams,
) -> Result<(Tensor, Tensor)> {
    let plan = NormPlan::new(NormType::L2, set);
    reduce_then_scale(
        dev,
        set,
        &plan,
        (f64::INFINITY, 0.0),
        Some(state),
        |s, reduced| {
            let Some(base) = reduced.extra else {
                bail!("internal error: ZClip's statistics were not passed to the session")
            };
            let norm = out_norm(reduced.out, reduced.out_f64);
            zclip_step(s, base, state, norm, reduced.scratch, params)
        },
    )
}

/// Enqueues `grad_clip_zclip` for the norm at `norm`: the statistics `state` (an operand whose
/// storage starts at `base`, only read) updated into a new buffer, returned as a tensor; the
/// coefficient goes to the scratch for the pass that follows.
pub(super) fn zclip_step(
    s: &mut dyn Session,
    base: Base,
    state: &Tensor,
    norm: NormAt,
    scratch: u64,
    params: &ZClipParams,
) -> Result<Tensor> {
    let words = state.elem_count();
    let state_out = s.alloc(DType::F64, words)?;
    launch_all(
        s,
        [launch::zclip(
            base.at(state.layout().start_offset()),
            state_out.ptr,
            words,
            norm,
            scratch,
            params,
        )],
    )?;
    s.take_tensor(state_out, &[words])
}
