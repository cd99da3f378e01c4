//! Policies decided by the training run itself: clipping thresholds ([`AutoClip`], a percentile
//! of the norms seen so far; [`ZClip`], z-scores of an EMA, on the device) and dynamic loss
//! scaling ([`GradScaler`]).

pub(crate) mod autoclip;
pub(crate) mod grad_scaler;
pub(crate) mod zclip;

pub use autoclip::AutoClip;
#[doc(hidden)]
pub use grad_scaler::__unscaled_norm_cpu;
pub use grad_scaler::GradScaler;
pub use zclip::{ZClip, ZClipMode};
