//! The fused optimizers against candle's own (`candle_nn::AdamW`, `candle_nn::SGD`: bitwise, step
//! after step), against clip-then-step (bitwise), against PyTorch's SGD algorithm (exact values
//! worked out by hand, and an f64 transcription), and their state, skipping and refusals.
//!
//! By concern: [`references`] (candle's optimizers, PyTorch's SGD), [`folded_clip`], [`skipping`]
//! non-finite steps, [`state`] (save, load, resume), [`refusals`] and odd inputs.

mod folded_clip;
mod references;
mod refusals;
mod skipping;
mod state;

use std::collections::HashMap;

use crate::common::{
    assert_same, bits, signed_values, state_bits, store_bits, tensor, twin_grads, twin_vars, vals,
    vars_bits,
};
use candle_core::{backprop::GradStore, DType, Device, Result, Tensor, Var};
use candle_grad_clip::{
    clip_grad_norm_, clip_grad_value_, AutoClip, ClipSetting, Clipped, ClippedConfig, FusedAdamW,
    FusedSgd, NormType, ParamsSgd,
};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, SGD};
use rand::{rngs::StdRng, SeedableRng};

/// Shapes of a small model: matrices, vectors, a scalar-like var, an odd length.
const SHAPES: [&[usize]; 6] = [&[7, 5], &[5], &[1], &[3, 4, 2], &[1027], &[64, 33]];

/// Probability that a var is left without a gradient in a step that skips some
/// (`common::twin_grads`).
const SKIP: f64 = 0.2;

fn adamw_configs() -> Vec<ParamsAdamW> {
    vec![
        ParamsAdamW::default(),
        ParamsAdamW {
            lr: 0.1,
            beta1: 0.5,
            beta2: 0.75,
            eps: 1e-3,
            weight_decay: 0.0,
        },
        ParamsAdamW {
            lr: 3e-4,
            beta1: 0.0,
            beta2: 0.99,
            eps: 1e-12,
            weight_decay: 0.3,
        },
    ]
}
