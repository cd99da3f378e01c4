//! Clipping policies that decide the threshold from the training run itself: [`AutoClip`]; dynamic loss scaling ([`GradScaler`]).

pub(crate) mod autoclip;
pub(crate) mod grad_scaler;

pub use autoclip::AutoClip;
#[doc(hidden)]
pub use grad_scaler::__unscaled_norm_cpu;
pub use grad_scaler::GradScaler;
