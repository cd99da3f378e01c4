//! ZClip: the global L2 norm, ZClip's step on its statistics, the scaling by its coefficient.
use candle_core::{bail, Device, Result, Tensor};

use super::{unsupported, with_kernel_device};
use crate::backend::cpu;
#[cfg(any(feature = "cuda", feature = "emulation"))]
use crate::backend::kernels;
use crate::ops::clip::{needs_scaling, ElementwiseOp};
use crate::ops::gradients::GradientSet;
use crate::ops::norm_type::NormType;
use crate::ops::zclip::{update_on_host, ZClipParams};

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
        with_kernel_device!(set, |dev| kernels::zclip::clip_zclip(
            &dev, set, state, params
        ));
    if let Some(r) = r {
        return r;
    }
    match set.device() {
        Device::Cpu => {
            let groups = set.storage_groups()?;
            let norm = cpu::reduce::norm(set, &groups, NormType::L2)?;
            let (c, state) = update_on_host(norm, set.norm_dtype(), state, params)?;
            if needs_scaling(c) {
                cpu::apply::apply_in_place(set, &groups, ElementwiseOp::Scale(c))?;
            }
            Ok((cpu::reduce::norm_tensor(norm, set.norm_dtype())?, state))
        }
        other => unsupported(other),
    }
}
