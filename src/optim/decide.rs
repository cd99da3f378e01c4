//! Turning a [`ClipSetting`] into a clip, the part [`Clipped`](crate::Clipped) and the fused
//! optimizers share: with the global norm known on the host (across ranks, where the collective
//! returns it; AutoClip, whose percentile is a host computation), a setting that clips by a
//! global norm is decided as a *given-norm* clip (the norm the coefficient is formed from, the
//! threshold and `eps`), the policies' state moving with it; and the policies' state is put back
//! when the step fails ([`PolicyStep`]).

use candle_core::{DType, Device, Result};

use super::clip_setting::ClipSetting;
use crate::ops::clip::{returned_norm, DEFAULT_EPS};

/// A clip by `min(1, max_norm / (norm + eps))` with the norm given.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct GivenNorm {
    /// The norm the coefficient is formed from.
    pub(crate) norm: f64,
    pub(crate) max_norm: f64,
    pub(crate) eps: f64,
}

/// A step's hold on its policy's state: ZClip's setting as it was before the step (its
/// statistics move with the clip), and the norm AutoClip adds to its history once the step
/// succeeded.
#[derive(Debug)]
pub(crate) struct PolicyStep {
    saved: Option<ClipSetting>,
    record: Option<f64>,
}

impl PolicyStep {
    /// Before a step with `clip`. Only ZClip's statistics move before the step succeeded
    /// (AutoClip records at [`commit`](Self::commit)), so only ZClip is copied.
    pub(crate) fn begin(clip: Option<&ClipSetting>) -> Self {
        Self {
            saved: clip.filter(|c| matches!(c, ClipSetting::ZClip(_))).cloned(),
            record: None,
        }
    }

    /// The clip of a setting that bounds a global norm (`Norm`, `AutoClip`, `ZClip`; `None` for
    /// `Value` and `Agc`), given that norm: `value`, exact, of returned dtype `dtype`, on
    /// `device`. `Norm` scales by the exact norm; AutoClip takes it as returned (rounded to its
    /// dtype, as in one process) and compares it with its percentile (recorded at
    /// [`commit`](Self::commit)); ZClip's statistics advance (one host read of them).
    pub(crate) fn given_norm(
        &mut self,
        clip: &mut ClipSetting,
        value: f64,
        dtype: DType,
        device: &Device,
    ) -> Result<Option<GivenNorm>> {
        Ok(match clip {
            ClipSetting::Norm(norm_clip) => Some(GivenNorm {
                norm: value,
                max_norm: norm_clip.max_norm(),
                eps: norm_clip.eps(),
            }),
            ClipSetting::AutoClip(autoclip) => {
                let norm = returned_norm(value, dtype);
                self.record = Some(norm);
                Some(GivenNorm {
                    norm,
                    max_norm: autoclip.threshold_with(norm),
                    eps: DEFAULT_EPS,
                })
            }
            ClipSetting::ZClip(zclip) => {
                let (norm, max_norm, eps) = zclip.step_for_norm(value, dtype, device)?;
                Some(GivenNorm {
                    norm,
                    max_norm,
                    eps,
                })
            }
            ClipSetting::Value { .. } | ClipSetting::Agc { .. } => None,
        })
    }

    /// The step succeeded: AutoClip records its norm.
    pub(crate) fn commit(self, clip: Option<&mut ClipSetting>) {
        if let (Some(norm), Some(ClipSetting::AutoClip(autoclip))) = (self.record, clip) {
            autoclip.record(norm);
        }
    }

    /// The step failed: the policy's state as it was before it.
    pub(crate) fn roll_back(self, clip: Option<&mut ClipSetting>) {
        if let (Some(saved), Some(clip)) = (self.saved, clip) {
            *clip = saved;
        }
    }
}
