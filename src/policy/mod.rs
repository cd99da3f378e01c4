//! Clipping policies that decide the threshold from the training run itself: [`AutoClip`] (a
//! percentile of the norms seen so far) and [`ZClip`] (z-scores of an EMA, on the device).

pub(crate) mod autoclip;
pub(crate) mod zclip;

pub use autoclip::AutoClip;
pub use zclip::{ZClip, ZClipMode};
