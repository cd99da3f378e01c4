//! The clipping thresholds that the training run itself decides: ZClip (z-scores of an EMA of the
//! norms, updated on the device) and AutoClip (a percentile of the norms seen so far).
//! (`GradScaler`, the other policy of the crate, has its own target: `tests/grad_scaler`.)

#[path = "../common/mod.rs"]
mod common;

mod autoclip;
mod zclip;
