//! Clipping policies decided by the training run itself: [`autoclip`] (AutoClip: a percentile of
//! the norms seen so far) and [`zclip`] (ZClip: z-scores of an EMA of the norm, kept on the
//! device). An optimizer takes either as a `ClipSetting`.

pub(crate) mod autoclip;
pub(crate) mod zclip;
