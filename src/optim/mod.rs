//! Optimizers: [`Clipped`] (any candle optimizer, clipping before each step).

mod clipped;

pub use clipped::{ClipSetting, Clipped, ClippedConfig};
