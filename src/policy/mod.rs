//! Clipping policies that decide the threshold from the training run itself: [`AutoClip`].

pub(crate) mod autoclip;

pub use autoclip::AutoClip;
