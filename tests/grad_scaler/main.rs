//! `GradScaler` against PyTorch's `torch.amp.GradScaler`: the scale sequence step by step (values
//! recorded from PyTorch 2.15 itself by `scripts/grad_scaler_pytorch.py`, a sequence worked out by
//! hand from PyTorch's rules, and a scalar transcription of PyTorch's `_amp_update_scale_cpu_kernel`
//! and of `GradScaler._unscale_grads_` for random sequences),
//! the unscaled gradients bit for bit, the state machine's errors, the skip of non-finite steps
//! (fused on the device, and with any other optimizer), the resume from a state dict, and the
//! fused path against unscale + clip + candle's optimizer.
//!
//! By concern: [`pytorch`] (the scale sequence against PyTorch), [`unscale`], [`state`] (the state
//! machine, its errors, the state dict), [`steps`] (skipped steps, the fused and one-read paths on
//! the CPU), [`emulated`] (the kernels under the host emulation). Here the transcription of
//! PyTorch's scaler and the helpers the modules share.

#[path = "../common/mod.rs"]
mod common;

mod emulated;
mod pytorch;
mod state;
mod steps;
mod unscale;

use std::slice::from_ref;

use candle_core::{backprop::GradStore, DType, Device, Result, Tensor, Var};
use candle_grad_clip::{
    clip_grad_norm_, clip_grad_value_, ClipSetting, FusedAdamW, FusedSgd, GradScaler,
    KernelEmulation, ParamsSgd,
};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, SGD};
use half::bf16;
use rand::{rngs::StdRng, Rng, SeedableRng};

use common::{bits, vars_bits, ORDERS};

/// PyTorch's scaler, transcribed: the scale an `f32`, `inv_scale = (float)(1 / (double)scale)`
/// (`GradScaler.unscale_`), and `_amp_update_scale_cpu_kernel`'s update.
#[derive(Debug, Clone)]
struct TorchScaler {
    scale: f32,
    tracker: i64,
    growth: f64,
    backoff: f64,
    interval: i64,
}

impl TorchScaler {
    fn new(init: f64, growth: f64, backoff: f64, interval: i64) -> Self {
        Self {
            scale: init as f32,
            tracker: 0,
            growth,
            backoff,
            interval,
        }
    }

    fn inv_scale(&self) -> f32 {
        (1.0 / self.scale as f64) as f32
    }

    fn update(&mut self, found_inf: bool) {
        if found_inf {
            self.scale = (self.scale as f64 * self.backoff) as f32;
            self.tracker = 0;
        } else {
            let successful = self.tracker + 1;
            if successful == self.interval {
                let new_scale = (self.scale as f64 * self.growth) as f32;
                if new_scale.is_finite() {
                    self.scale = new_scale;
                }
                self.tracker = 0;
            } else {
                self.tracker = successful;
            }
        }
    }

    /// One unscaled element of `dtype` (given as `f64`), as PyTorch's unscale kernel computes it.
    fn unscale(&self, dtype: DType, g: f64) -> f64 {
        let inv = self.inv_scale();
        match dtype {
            DType::F32 => (g as f32 * inv) as f64,
            DType::F64 => g * inv as f64,
            // Reduced types: opmath f32, then rounded to nearest even.
            DType::BF16 => bf16::from_f32(bf16::from_f64(g).to_f32() * inv).to_f64(),
            other => panic!("no unscale for {other:?}"),
        }
    }
}

fn sgd_lr(lr: f64) -> ParamsSgd {
    ParamsSgd {
        lr,
        ..Default::default()
    }
}

fn tracker(scaler: &GradScaler) -> Result<i64> {
    scaler.state_dict()?["growth_tracker"].to_scalar::<i64>()
}

fn scale_bits(scaler: &GradScaler) -> Result<u32> {
    Ok(scaler.state_dict()?["scale"].to_scalar::<f32>()?.to_bits())
}

/// A store holding `values[i]` (shaped like var `i`, of `dtype`) as the gradient of var `i`.
fn store(vars: &[Var], values: &[Vec<f64>], dtype: DType) -> Result<GradStore> {
    let mut grads = GradStore::default();
    for (v, vals) in vars.iter().zip(values) {
        let t = Tensor::from_vec(vals.clone(), v.shape(), &Device::Cpu)?.to_dtype(dtype)?;
        grads.insert(v, t);
    }
    Ok(grads)
}

fn f32_vars(shapes: &[&[usize]], rng: &mut StdRng) -> Result<Vec<Var>> {
    shapes
        .iter()
        .map(|s| {
            let n: usize = s.iter().product();
            let vals: Vec<f32> = (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect();
            Var::from_tensor(&Tensor::from_vec(vals, s.to_vec(), &Device::Cpu)?)
        })
        .collect()
}

/// Scaled gradient values for `vars` (about `scale` in magnitude), with a NaN, +inf or -inf
/// planted when `poison` is 1, 2 or 3.
fn scaled_values(vars: &[Var], scale: f64, poison: u8, rng: &mut StdRng) -> Vec<Vec<f64>> {
    let mut values: Vec<Vec<f64>> = vars
        .iter()
        .map(|v| {
            (0..v.elem_count())
                .map(|_| rng.gen_range(-1.0..1.0) * scale)
                .collect()
        })
        .collect();
    let bad = [f64::NAN, f64::INFINITY, f64::NEG_INFINITY];
    if poison > 0 {
        let nonempty: Vec<usize> = (0..values.len())
            .filter(|&i| !values[i].is_empty())
            .collect();
        let i = nonempty[rng.gen_range(0..nonempty.len())];
        let j = rng.gen_range(0..values[i].len());
        values[i][j] = bad[(poison - 1) as usize];
    }
    values
}
