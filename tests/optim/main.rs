//! The optimizers and the training loop: the fused optimizers (`FusedAdamW`, `FusedSgd`) against
//! candle's and PyTorch's, `Clipped` around candle's optimizers, skipping non-finite steps,
//! per-tensor norms and norm statistics, and a short run of the `exploding_rnn` example.

#[path = "../common/mod.rs"]
mod common;

mod conventions;
mod fused;
mod skip_nonfinite;
mod training;
