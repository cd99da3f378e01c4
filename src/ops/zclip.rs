//! ZClip's step, as every back end defines it (Kumar, Owen, Roy Chowdhury & Güra, 2025, "ZClip:
//! Adaptive Spike Mitigation for LLM Pre-Training"): the layout of its statistics tensor
//! ([`word`]), its constants ([`ZClipParams`]) and [`update`], the CPU twin that is the
//! reference: `grad_clip_zclip` in `kernels/grad_clip.cu` performs the same operations in the
//! same order, so the two agree bitwise. The public type is `policy::zclip::ZClip`.

use candle_core::{DType, Result, Tensor};

use crate::ops::clip::{clip_coefficient, returned_norm, DEFAULT_EPS};

/// The layout of the statistics tensor (`F64`): five header words, then the warm-up buffer.
pub(crate) mod word {
    /// 1 once the warm-up is over and the EMAs are initialised.
    pub(crate) const READY: usize = 0;
    /// Finite norms collected during the warm-up.
    pub(crate) const COLLECTED: usize = 1;
    /// The EMA of the norm, μ.
    pub(crate) const MEAN: usize = 2;
    /// The EMA of the variance, σ².
    pub(crate) const VAR: usize = 3;
    /// The coefficient of the last step (1 when the gradients were left untouched).
    pub(crate) const LAST_COEFFICIENT: usize = 4;
    /// First word of the warm-up buffer (`warmup_steps` words).
    pub(crate) const HEADER: usize = 5;
}

/// The constants of [`update`], as the kernel takes them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct ZClipParams {
    pub(crate) alpha: f64,
    pub(crate) z_threshold: f64,
    pub(crate) mean_mode: bool,
    /// `+inf` when off.
    pub(crate) max_grad_norm: f64,
}

/// The ε of the z-score and of the clip coefficient, as in the reference (and `clip_grad_norm_`).
pub(crate) const ZCLIP_EPS: f64 = DEFAULT_EPS;

/// The norm ZClip takes for a reduction's exact `norm` (in `f64`) of gradients whose norm tensor
/// has `dtype`: the norm as returned (rounded to `dtype`, as the reference's `.item()` of a float32
/// norm), except that a norm of finite gradients that overflows an F32 norm tensor is taken as
/// `f32::MAX` (a spike, clipped) rather than as a non-finite step. Mirrored in `grad_clip_zclip`.
pub(crate) fn input(norm: f64, dtype: DType) -> f64 {
    let returned = returned_norm(norm, dtype);
    if returned.is_infinite() && norm.is_finite() {
        f32::MAX as f64
    } else {
        returned
    }
}

/// One ZClip step on `state` (the layout of [`word`]) for the global L2 `norm`: updates the
/// statistics and returns the coefficient to multiply the gradients by (1: leave them untouched;
/// NaN poisons them, as `clip_grad_norm_`). Mirrored by `grad_clip_zclip` in `kernels/grad_clip.cu`:
/// every operation there is one IEEE operation of the same operands, in this order.
pub(crate) fn update(state: &mut [f64], norm: f64, p: &ZClipParams) -> f64 {
    use word::*;
    let warmup = state.len() - HEADER;
    let coefficient = if !norm.is_finite() {
        // Neither enters the statistics nor counts as a warm-up step.
        clip_coefficient(norm, p.max_grad_norm, ZCLIP_EPS)
    } else if state[READY] == 0.0 {
        let k = state[COLLECTED] as usize;
        state[HEADER + k] = norm;
        state[COLLECTED] = (k + 1) as f64;
        if k + 1 >= warmup {
            let buffer = &state[HEADER..];
            let mut sum = 0.0;
            for &x in buffer {
                sum += x;
            }
            let mean = sum / warmup as f64;
            let mut squares = 0.0;
            for &x in buffer {
                let d = x - mean;
                squares += d * d;
            }
            state[MEAN] = mean;
            state[VAR] = squares / warmup as f64;
            state[READY] = 1.0;
        }
        // Only `max_grad_norm` applies, with `clip_grad_norm_`'s coefficient.
        clip_coefficient(norm, p.max_grad_norm, ZCLIP_EPS)
    } else {
        let mean = state[MEAN];
        let std = state[VAR].sqrt();
        let z = (norm - mean) / (std + ZCLIP_EPS);
        // The ZClip threshold when the norm is a spike, else the norm itself: what the
        // statistics take (never the `max_grad_norm`-capped value).
        let x = if z > p.z_threshold {
            if p.mean_mode {
                mean
            } else {
                mean + (p.z_threshold * std) / (z / p.z_threshold)
            }
        } else {
            norm
        };
        let effective = if p.max_grad_norm < x {
            p.max_grad_norm
        } else {
            x
        };
        let one_minus_alpha = 1.0 - p.alpha;
        let mean = p.alpha * mean + one_minus_alpha * x;
        let d = x - mean;
        state[MEAN] = mean;
        state[VAR] = p.alpha * state[VAR] + one_minus_alpha * (d * d);
        if norm > effective {
            effective / (norm + ZCLIP_EPS)
        } else {
            1.0
        }
    };
    state[LAST_COEFFICIENT] = coefficient;
    coefficient
}

/// One ZClip step on the host: the statistics `state` (a 1-D `F64` CPU tensor) updated for the
/// exact `norm` of gradients whose norm dtype is `dtype`; the coefficient and the new statistics.
pub(crate) fn update_on_host(
    norm: f64,
    dtype: DType,
    state: &Tensor,
    params: &ZClipParams,
) -> Result<(f64, Tensor)> {
    let mut words = state.to_vec1::<f64>()?;
    let c = update(&mut words, input(norm, dtype), params);
    Ok((c, Tensor::new(words, state.device())?))
}
