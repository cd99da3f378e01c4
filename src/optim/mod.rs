//! Optimizers: [`Clipped`] (any candle optimizer, clipping before each step), and the fused
//! optimizers [`FusedAdamW`] and [`FusedSgd`] (one pass over all parameters, the clip folded in).
//! A new fused optimizer is an update rule (`ops::fused_step::Rule`, with its CPU twin in
//! `backend/cpu/fused_step/` and its kernel in `kernels/grad_clip.cu`) and a thin type over
//! `fused::FusedCore`.

pub(crate) mod adamw;
pub(crate) mod clip_setting;
pub(crate) mod clipped;
pub(crate) mod decide;
pub(crate) mod fused;
pub(crate) mod sgd;
pub(crate) mod skip;
