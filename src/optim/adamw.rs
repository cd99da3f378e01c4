//! [`FusedAdamW`]: candle's `AdamW`, bitwise, as one fused pass over all parameters, with the clip
//! folded in.

use candle_core::{bail, Result, Var};
use candle_nn::{Optimizer, ParamsAdamW};

use super::fused::api::{sealed::RuleParts, Fused, FusedRule};
use crate::ops::fused_step::Rule;

/// `candle_nn::AdamW` as one fused pass over every parameter, with gradient clipping folded into
/// it and non-finite steps optionally skipped.
///
/// **Drop-in.** `Config = candle_nn::ParamsAdamW`, and for F32 and F64 vars every step is
/// *bitwise* `candle_nn::AdamW::step` on the same device (candle's own sequence of roundings,
/// signed zeros included). F16 and BF16 vars are computed in `f32` with `f32` moments (8 bytes of
/// state per parameter, as for F32 vars; candle keeps them in the var's dtype), and each new
/// parameter is rounded once to its dtype: a step is then closer to the exact step than candle's.
/// Where candle's `AdamW::step` runs about a dozen tensor ops per var, each allocating a
/// full-size tensor, this is one read of each gradient and one read-write of each parameter and
/// moment: on the CPU one rayon-parallel pass, on CUDA one launch for all vars.
///
/// **Clipping.** [`with_clip`](Self::with_clip) takes every [`ClipSetting`](crate::ClipSetting). The step then reads
/// the gradients once for the norm (as `clip_grad_norm_` does), and the update multiplies each
/// gradient by the coefficient as it reads it, formed exactly as `clip_grad_norm_` forms it, so the
/// result is bitwise `clip_grad_norm_` (or `clip_grad_value_`, or AutoClip) followed by
/// `candle_nn::AdamW::step`. With [`ClipSetting::Agc`](crate::ClipSetting::Agc) the first read measures every unit of
/// the parameters and gradients (one launch on CUDA) and the update scales each element by its
/// unit's coefficient: bitwise [`adaptive_clip_grad_`](crate::adaptive_clip_grad_) then the
/// unclipped step. Unlike [`Clipped`](crate::Clipped), **the `GradStore` is not
/// written**: the gradients keep their values. On CUDA nothing waits for the device, except for
/// AutoClip (whose percentile is computed on the host).
///
/// **Skipping.** With [`with_skip_nonfinite(true)`](Self::with_skip_nonfinite), a step whose gradients
/// hold a NaN or an infinity leaves the parameters, the moments and the step count bitwise
/// unchanged and is counted by [`skipped_steps`](Self::skipped_steps) (not by
/// [`clipped_steps`](Self::clipped_steps)); on CUDA the update kernel reads the verdict from
/// device memory, with no host synchronisation. Without a clip, the check costs one read of the
/// gradients. (A norm that overflows although every element is finite, e.g. F64 gradients near
/// `f64::MAX`, counts as non-finite.)
///
/// Vars without a gradient are left as they are (their moments too), non-float vars are left out,
/// and a var listed twice is updated once. The vars must be on one device.
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use candle_nn::{linear, Module, Optimizer, ParamsAdamW, VarBuilder, VarMap};
/// use candle_grad_clip::{ClipSetting, FusedAdamW};
/// # fn main() -> candle_core::Result<()> {
/// let varmap = VarMap::new();
/// let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
/// let model = linear(4, 1, vb.pp("fc"))?;
/// let params = ParamsAdamW { lr: 1e-2, ..Default::default() };
/// let mut opt = FusedAdamW::from_varmap(&varmap, params)?.with_clip(ClipSetting::norm(1.0))?;
/// let x = Tensor::ones((8, 4), DType::F32, &Device::Cpu)?;
/// let loss = (model.forward(&x)? - 100.0)?.sqr()?.mean_all()?;
/// opt.backward_step(&loss)?; // one norm pass, one fused update; the gradients are not written
/// assert_eq!(opt.clipped_steps()?, 1);
/// assert!(opt.last_norm().unwrap().to_scalar::<f32>()? > 1.0);
/// # Ok(()) }
/// ```
pub type FusedAdamW = Fused<AdamWRule>;

/// The update rule of [`FusedAdamW`]: candle's `AdamW` (the `R` of [`Fused`]).
///
/// ```
/// let opt: candle_grad_clip::Fused<candle_grad_clip::AdamWRule> =
///     candle_grad_clip::FusedAdamW::new_named(vec![], Default::default())?;
/// assert!(opt.vars().is_empty());
/// # Ok::<(), candle_core::Error>(())
/// ```
#[derive(Debug, Clone, Copy)]
pub struct AdamWRule;

impl FusedRule for AdamWRule {}

impl RuleParts for AdamWRule {
    type Params = ParamsAdamW;
    const NAME: &'static str = "FusedAdamW";
    const STATE: &'static [&'static str] = &["exp_avg", "exp_avg_sq"];
    const OPTIONAL: bool = false;

    fn validate(params: &ParamsAdamW) -> Result<()> {
        validate(params)
    }

    fn rule(params: &ParamsAdamW) -> Rule {
        rule(params)
    }

    fn learning_rate(params: &ParamsAdamW) -> f64 {
        params.lr
    }

    fn set_learning_rate(params: &mut ParamsAdamW, lr: f64) {
        params.lr = lr;
    }
}

/// Refuses what `torch.optim.AdamW` refuses, and NaN or infinite values anywhere.
fn validate(p: &ParamsAdamW) -> Result<()> {
    let finite = [p.lr, p.beta1, p.beta2, p.eps, p.weight_decay]
        .iter()
        .all(|v| v.is_finite());
    if !finite {
        bail!("ParamsAdamW: every value must be finite, got {p:?}")
    }
    if p.lr < 0.0 {
        bail!("ParamsAdamW: invalid learning rate {} (must be >= 0)", p.lr)
    }
    for (name, beta) in [("beta1", p.beta1), ("beta2", p.beta2)] {
        if !(0.0..1.0).contains(&beta) {
            bail!("ParamsAdamW: invalid {name} {beta} (must be in [0, 1))")
        }
    }
    if p.eps <= 0.0 {
        bail!("ParamsAdamW: invalid eps {} (must be > 0)", p.eps)
    }
    if p.weight_decay < 0.0 {
        bail!(
            "ParamsAdamW: invalid weight_decay {} (must be >= 0)",
            p.weight_decay
        )
    }
    Ok(())
}

fn rule(p: &ParamsAdamW) -> Rule {
    Rule::AdamW {
        lr: p.lr,
        beta1: p.beta1,
        beta2: p.beta2,
        eps: p.eps,
        weight_decay: p.weight_decay,
    }
}

impl FusedAdamW {
    /// The optimizer for `vars` with `ParamsAdamW::default()` but the learning rate, as
    /// `candle_nn::AdamW::new_lr`.
    ///
    /// ```
    /// use candle_core::{DType, Device, Var};
    /// let w = Var::zeros(3, DType::F32, &Device::Cpu)?;
    /// let opt = candle_grad_clip::FusedAdamW::new_lr(vec![w], 0.5)?;
    /// assert_eq!(opt.params().lr, 0.5);
    /// assert_eq!(opt.params().beta1, candle_nn::ParamsAdamW::default().beta1);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn new_lr(vars: Vec<Var>, learning_rate: f64) -> Result<Self> {
        let params = ParamsAdamW {
            lr: learning_rate,
            ..ParamsAdamW::default()
        };
        <Self as Optimizer>::new(vars, params)
    }
}
