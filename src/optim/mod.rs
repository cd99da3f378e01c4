//! Optimizers: [`Clipped`] (any candle optimizer, clipping before each step), and the fused
//! optimizers [`FusedAdamW`] and [`FusedSgd`] (one pass over all parameters, the clip folded in).
//! A new fused optimizer is an update [`Rule`](crate::backend::update::Rule) (with its CPU twin in
//! `backend/cpu/update.rs` and its kernel in `kernels/`) and a thin type over `fused::FusedCore`.

mod adamw;
mod clipped;
mod fused;
mod sgd;

pub use adamw::FusedAdamW;
pub use clipped::{ClipSetting, Clipped, ClippedConfig};
pub(crate) use fused::prescale_supports;
pub use sgd::{FusedSgd, ParamsSgd};
