//! [`ClipSetting`]: how an optimizer ([`Clipped`](crate::Clipped), [`FusedAdamW`](crate::FusedAdamW),
//! [`FusedSgd`](crate::FusedSgd)) clips the gradients before each step.

use candle_core::{bail, Result};

use crate::clip::agc::AGC_DEFAULT_EPS;
use crate::clip::norm::ClipGradNorm;
use crate::dist::agreement::{hash_words, Agreement, Field};
use crate::policy::autoclip::{self, AutoClip};
use crate::policy::zclip::{ZClip, ZClipMode};

/// How an optimizer clips the gradients before each step: [`Clipped`](crate::Clipped),
/// the fused optimizers' [`with_clip`](crate::FusedAdamW::with_clip), and a training
/// checkpoint's [`with_clip`](crate::TrainingCheckpoint::with_clip).
///
/// ```
/// use candle_grad_clip::{AutoClip, ClipGradNorm, ClipSetting, NormType};
/// let by_norm = ClipSetting::norm(1.0); // global L2 norm at most 1
/// let by_inf_norm = ClipSetting::Norm(ClipGradNorm::new(0.5).with_norm_type(NormType::Inf));
/// let by_value = ClipSetting::value(0.1); // every element in [-0.1, 0.1]
/// let adaptive = ClipSetting::AutoClip(AutoClip::default()); // 10th percentile of the history
/// let spikes = ClipSetting::ZClip(candle_grad_clip::ZClip::new()); // z-scores of an EMA
/// let unit_wise = ClipSetting::agc(0.01); // each unit's ‖g‖ at most 0.01 · max(‖w‖, 1e-3)
/// assert!(ClipSetting::norm(-1.0).validate().is_err());
/// # let _ = (by_norm, by_inf_norm, by_value, adaptive, spikes, unit_wise);
/// ```
#[derive(Debug, Clone)]
pub enum ClipSetting {
    /// Scale all gradients together so that their global norm is at most `max_norm`, exactly as
    /// [`ClipGradNorm::clip_`] does with the same settings (norm type, `eps`,
    /// `error_if_nonfinite`: a non-finite norm is then an error and nothing is stepped).
    Norm(ClipGradNorm),
    /// Clamp every gradient element into `[-clip_value, clip_value]`, as [`clip_grad_value_`](crate::clip_grad_value_).
    Value {
        /// The bound, `>= 0`.
        clip_value: f64,
    },
    /// Clip the global L2 norm to a percentile of the norms seen so far (see [`AutoClip`]).
    AutoClip(AutoClip),
    /// Clip spikes of the global L2 norm detected by their z-score against an EMA (see
    /// [`ZClip`]); its statistics stay on the device.
    ZClip(ZClip),
    /// Adaptive gradient clipping, unit-wise, as [`adaptive_clip_grad_`](crate::adaptive_clip_grad_):
    /// each unit's gradient norm is bounded by `clipping * max(‖w_unit‖, eps)` (a unit: a slice
    /// along dim 0 of a var of rank >= 2, a whole var of rank <= 1). `last_norm` is the global L2
    /// norm of the gradients before clipping; a step counts as clipped when some unit was (a unit
    /// whose norm is NaN is not clipped, so a NaN gradient alone does not count).
    Agc {
        /// The ratio of gradient norm to parameter norm allowed per unit, finite and `> 0`.
        clipping: f64,
        /// The smallest parameter norm a unit is measured against, `>= 0` (usually 1e-3).
        eps: f64,
    },
}

impl ClipSetting {
    /// The default `eps` of adaptive gradient clipping (as in the paper and timm): the smallest
    /// parameter norm a unit is measured against, so that zero-initialised units can still move.
    ///
    /// ```
    /// assert_eq!(candle_grad_clip::ClipSetting::AGC_DEFAULT_EPS, 1e-3);
    /// ```
    pub const AGC_DEFAULT_EPS: f64 = AGC_DEFAULT_EPS;

    /// Global L2-norm clipping to `max_norm`, with [`ClipGradNorm`]'s defaults: the short form
    /// of `ClipSetting::Norm(ClipGradNorm::new(max_norm))`.
    ///
    /// ```
    /// use candle_grad_clip::{ClipGradNorm, ClipSetting};
    /// assert!(matches!(
    ///     ClipSetting::norm(1.0),
    ///     ClipSetting::Norm(clip) if clip == ClipGradNorm::new(1.0)
    /// ));
    /// ```
    pub fn norm(max_norm: f64) -> Self {
        ClipSetting::Norm(ClipGradNorm::new(max_norm))
    }

    /// Value clipping to `[-clip_value, clip_value]`.
    ///
    /// ```
    /// assert!(candle_grad_clip::ClipSetting::value(0.5).validate().is_ok());
    /// ```
    pub fn value(clip_value: f64) -> Self {
        ClipSetting::Value { clip_value }
    }

    /// Adaptive gradient clipping with ratio `clipping` and the default `eps`
    /// ([`ClipSetting::AGC_DEFAULT_EPS`], 1e-3).
    ///
    /// ```
    /// use candle_grad_clip::ClipSetting;
    /// assert!(matches!(
    ///     ClipSetting::agc(0.01),
    ///     ClipSetting::Agc { clipping, eps } if clipping == 0.01 && eps == 1e-3
    /// ));
    /// ```
    pub fn agc(clipping: f64) -> Self {
        ClipSetting::Agc {
            clipping,
            eps: AGC_DEFAULT_EPS,
        }
    }

    /// Checks the setting: `max_norm` and `clip_value` must be `>= 0` (not NaN), the norm type
    /// valid, the AutoClip percentile in `(0, 100]`, the ZClip settings as [`ZClip::validate`]
    /// checks them, AGC's `clipping` finite and `> 0` and its `eps` `>= 0` (not NaN).
    ///
    /// ```
    /// use candle_grad_clip::{ClipGradNorm, ClipSetting, NormType};
    /// assert!(ClipSetting::value(f64::NAN).validate().is_err());
    /// let bad_p = ClipSetting::Norm(ClipGradNorm::new(1.0).with_norm_type(NormType::P(0.0)));
    /// assert!(bad_p.validate().is_err());
    /// assert!(ClipSetting::agc(0.0).validate().is_err());
    /// assert!(ClipSetting::Agc { clipping: 0.01, eps: f64::NAN }.validate().is_err());
    /// ```
    pub fn validate(&self) -> Result<()> {
        match self {
            ClipSetting::Norm(clip) => clip.validate(),
            ClipSetting::Value { clip_value } => {
                if clip_value.is_nan() || *clip_value < 0.0 {
                    bail!("clip_value must be >= 0, got {clip_value}")
                }
                Ok(())
            }
            ClipSetting::AutoClip(autoclip) => autoclip::validate_percentile(autoclip.percentile()),
            ClipSetting::ZClip(zclip) => zclip.validate(),
            ClipSetting::Agc { clipping, eps } => crate::ops::agc::validate(*clipping, *eps),
        }
    }
}

/// Whether GradScaler's one-read path (the gradients unscaled as the step reads them) can run with
/// this clip: not with those that decide from the gradients before the step (AutoClip's host
/// percentile, ZClip's statistics, AGC's per-unit pass), which then see unscaled gradients only
/// if `unscale_` ran first.
pub(crate) fn prescale_supports(clip: Option<&ClipSetting>) -> bool {
    !matches!(
        clip,
        Some(ClipSetting::AutoClip(_) | ClipSetting::ZClip(_) | ClipSetting::Agc { .. })
    )
}

/// `agreement` with the fields of `clip` (none: no clip), for the fingerprint that every rank of
/// a step across ranks must share.
pub(crate) fn agree_on(clip: Option<&ClipSetting>, agreement: Agreement) -> Agreement {
    match clip {
        None => agreement.set(Field::Clip, 0),
        Some(ClipSetting::Norm(clip)) => agreement
            .set(Field::Clip, 1)
            .set_norm_type(clip.norm_type())
            .set_f64(Field::MaxNorm, clip.max_norm())
            .set_f64(Field::Eps, clip.eps())
            .set_bool(Field::ErrorIfNonfinite, clip.error_if_nonfinite()),
        Some(ClipSetting::Value { clip_value }) => agreement
            .set(Field::Clip, 2)
            .set_f64(Field::ClipParameter, *clip_value),
        Some(ClipSetting::AutoClip(autoclip)) => agreement
            .set(Field::Clip, 3)
            .set_f64(Field::ClipParameter, autoclip.percentile()),
        Some(ClipSetting::ZClip(zclip)) => agreement
            .set(Field::Clip, 4)
            .set_f64(Field::ClipParameter, zclip.z_threshold())
            .set(
                Field::ClipParameters,
                hash_words(&[
                    zclip.alpha().to_bits(),
                    zclip.warmup_steps() as u64,
                    matches!(zclip.mode(), ZClipMode::Mean) as u64,
                    zclip.max_grad_norm().map_or(u64::MAX, f64::to_bits),
                ]),
            ),
        Some(ClipSetting::Agc { clipping, eps }) => agreement
            .set(Field::Clip, 5)
            .set_f64(Field::ClipParameter, *clipping)
            .set(Field::ClipParameters, hash_words(&[eps.to_bits()])),
    }
}
