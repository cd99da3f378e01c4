//! A clip setting in a checkpoint: its canonical description (what must match on loading) and
//! the state of the policies that have one (AutoClip, ZClip).

use std::collections::HashMap;

use candle_core::{bail, Result, Tensor};

use crate::optim::clip_setting::ClipSetting;

/// The setting as a canonical string: the kind and every parameter (floats in Rust's
/// round-trip `Debug` form), never its state.
pub(crate) fn describe(clip: Option<&ClipSetting>) -> String {
    match clip {
        None => "none".to_string(),
        Some(ClipSetting::Norm(clip)) => format!(
            "norm(max_norm={:?}, norm_type={:?}, eps={:?}, error_if_nonfinite={})",
            clip.max_norm(),
            clip.norm_type(),
            clip.eps(),
            clip.error_if_nonfinite()
        ),
        Some(ClipSetting::Value { clip_value }) => format!("value(clip_value={clip_value:?})"),
        Some(ClipSetting::AutoClip(a)) => format!(
            "autoclip(percentile={:?}, capacity={})",
            a.percentile(),
            a.capacity()
        ),
        Some(ClipSetting::ZClip(z)) => format!(
            "zclip(alpha={:?}, z_threshold={:?}, warmup_steps={}, mode={:?}, max_grad_norm={:?})",
            z.alpha(),
            z.z_threshold(),
            z.warmup_steps(),
            z.mode(),
            z.max_grad_norm()
        ),
        Some(ClipSetting::Agc { clipping, eps }) => {
            format!("agc(clipping={clipping:?}, eps={eps:?})")
        }
    }
}

/// Whether a setting of this [`describe`] description has a state (AutoClip, ZClip).
pub(crate) fn has_state(description: &str) -> bool {
    description.starts_with("autoclip(") || description.starts_with("zclip(")
}

/// The policy's state (empty for the settings without one).
pub(crate) fn state(clip: Option<&ClipSetting>) -> Result<HashMap<String, Tensor>> {
    match clip {
        Some(ClipSetting::AutoClip(a)) => a.state_dict(),
        Some(ClipSetting::ZClip(z)) => z.state_dict(),
        _ => Ok(HashMap::new()),
    }
}

/// A copy of `clip` with `state` loaded (checked whole; `clip` itself is not changed). A
/// setting without state takes an empty one.
pub(crate) fn with_state(
    clip: &ClipSetting,
    state: &HashMap<String, Tensor>,
) -> Result<ClipSetting> {
    let mut clip = clip.clone();
    match &mut clip {
        ClipSetting::AutoClip(a) => a.load_state_dict(state)?,
        ClipSetting::ZClip(z) => z.load_state_dict(state)?,
        _ => {
            if let Some(extra) = state.keys().next() {
                bail!("unexpected clip state `{extra}` for a setting without state")
            }
        }
    }
    Ok(clip)
}
