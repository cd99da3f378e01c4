//! ZClip (`ZClip`, `ClipSetting::ZClip`) against an independent transcription of the paper's
//! reference implementation (`zclip.py`: a Python list for the warm-up, `mean`/`var` floats), on
//! recorded norm sequences with spikes, NaN and infinite steps; the kernel (`grad_clip_zclip`)
//! under the host emulation against the CPU path, bitwise; `Clipped` and the fused optimizers with
//! ZClip against `ZClip::clip_` followed by the unclipped step; checkpoints.
//!
//! Here the transcription and the recorded sequences that its modules share.

mod kernel;
mod optimizers;
mod state;
mod transcription;

use crate::common::{assert_same, bits, kernels, state_bits, vars_bits, ORDERS};
use candle_core::{backprop::GradStore, DType, Device, Result, Tensor, Var};
use candle_grad_clip::{
    ClipSetting, Clipped, ClippedConfig, FusedAdamW, FusedSgd, KernelEmulation, ParamsSgd, ZClip,
    ZClipMode,
};
use candle_nn::{Optimizer, ParamsAdamW, SGD};
use rand::{rngs::StdRng, Rng, SeedableRng};

/// The reference, transcribed from `zclip.py` (the `zscore` mode with its two `clip_option`s and
/// the optional `max_grad_norm`) in the order. `step` takes the norm and returns the
/// factor the gradients are multiplied by (`None`: untouched).
struct Reference {
    alpha: f64,
    z_thresh: f64,
    warmup_steps: usize,
    mean_mode: bool,
    max_grad_norm: Option<f64>,
    buffer: Vec<f64>,
    stats: Option<(f64, f64)>,
}

impl Reference {
    fn new(z: &ZClip) -> Self {
        Self {
            alpha: z.alpha(),
            z_thresh: z.z_threshold(),
            warmup_steps: z.warmup_steps(),
            mean_mode: z.mode() == ZClipMode::Mean,
            max_grad_norm: z.max_grad_norm(),
            buffer: Vec::new(),
            stats: None,
        }
    }

    /// `torch.nn.utils.clip_grad_norm_`'s factor (its `clip_coef_clamped`), `None` when 1.
    fn clip_grad_norm(max_norm: Option<f64>, total: f64) -> Option<f64> {
        let max_norm = max_norm?;
        let coef = max_norm / (total + 1e-6);
        if total.is_nan() {
            return Some(f64::NAN);
        }
        (coef < 1.0).then_some(coef)
    }

    fn step(&mut self, total_norm: f64) -> Option<f64> {
        if !total_norm.is_finite() {
            // Not a statistic; the gradients as under clip_grad_norm_ (an infinite norm with no
            // bound is left alone, as our clip_grad_norm_(inf) leaves it).
            return Self::clip_grad_norm(self.max_grad_norm, total_norm);
        }
        let Some((mean, var)) = self.stats else {
            self.buffer.push(total_norm);
            if self.buffer.len() >= self.warmup_steps {
                let n = self.buffer.len() as f64;
                let mut s = 0.0;
                for x in &self.buffer {
                    s += x;
                }
                let mean = s / n;
                let mut v = 0.0;
                for x in &self.buffer {
                    v += (x - mean) * (x - mean);
                }
                self.stats = Some((mean, v / n));
                self.buffer.clear();
            }
            return Self::clip_grad_norm(self.max_grad_norm, total_norm);
        };
        let std = var.sqrt();
        let z = (total_norm - mean) / (std + 1e-6);
        let clip_val = if z > self.z_thresh {
            if self.mean_mode {
                Some(mean)
            } else {
                let eta = z / self.z_thresh;
                Some(mean + (self.z_thresh * std) / eta)
            }
        } else {
            None
        };
        // _apply_clipping: the adaptive value (or the norm), capped by max_grad_norm.
        let adaptive = clip_val.unwrap_or(total_norm);
        let effective = match self.max_grad_norm {
            Some(m) if m < adaptive => m,
            _ => adaptive,
        };
        let factor = (total_norm > effective).then(|| effective / (total_norm + 1e-6));
        // _update_ema with the ZClip value (never the capped one).
        let g = clip_val.unwrap_or(total_norm);
        let new_mean = self.alpha * mean + (1.0 - self.alpha) * g;
        let new_var = self.alpha * var + (1.0 - self.alpha) * ((g - new_mean) * (g - new_mean));
        self.stats = Some((new_mean, new_var));
        factor
    }
}

/// A norm sequence: a noisy plateau, spikes of 3x to 1000x, NaN and infinite steps (also during
/// the warm-up), and a slow drift.
fn sequence(rng: &mut StdRng, len: usize) -> Vec<f64> {
    (0..len)
        .map(|i| {
            let base = 2.0 + 0.002 * i as f64 + rng.gen_range(-0.3..0.3);
            match rng.gen_range(0..40) {
                0 => f64::NAN,
                1 => f64::INFINITY,
                2 | 3 => base * [3.0, 10.0, 1000.0][rng.gen_range(0..3)],
                _ => base,
            }
        })
        .collect()
}

fn settings() -> Vec<ZClip> {
    vec![
        ZClip::new(),
        ZClip::new().with_mode(ZClipMode::Mean).with_warmup_steps(5),
        ZClip::new()
            .with_alpha(0.9)
            .with_z_threshold(1.5)
            .with_warmup_steps(3),
        ZClip::new().with_warmup_steps(1).with_max_grad_norm(2.5),
        ZClip::new().with_warmup_steps(4).with_max_grad_norm(0.0),
        ZClip::new().with_warmup_steps(7).with_max_grad_norm(1e9),
    ]
}

/// One F64 element whose gradient is the norm itself (sign alternating): the global L2 norm is
/// exactly `|g|` on every back end, so each step of the sequence feeds the exact recorded norm.
fn one_element_step(zclip: &mut ZClip, w: &Var, g: f64) -> Result<(f64, f64)> {
    let mut grads = GradStore::default();
    grads.insert(w, Tensor::new(&[g], &Device::Cpu)?);
    let norm = zclip
        .clip_(std::slice::from_ref(w), &mut grads)?
        .to_scalar::<f64>()?;
    let after = grads.get(w).expect("gradient").to_vec1::<f64>()?[0];
    Ok((norm, after))
}
