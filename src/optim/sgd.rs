//! [`FusedSgd`]: PyTorch's `torch.optim.SGD` (momentum, dampening, Nesterov, weight decay) as one
//! fused pass over all parameters, with the clip folded in; bitwise candle's `SGD` when momentum
//! and weight decay are off.

use candle_core::{bail, Result};

use super::fused::api::{sealed::RuleParts, Fused, FusedRule};
use crate::ops::fused_step::Rule;

/// The hyper-parameters of [`FusedSgd`], with `torch.optim.SGD`'s meaning and defaults (`lr`
/// 1e-3, everything else off).
///
/// ```
/// let p = candle_grad_clip::ParamsSgd::default();
/// assert_eq!((p.lr, p.momentum, p.dampening, p.weight_decay, p.nesterov), (1e-3, 0.0, 0.0, 0.0, false));
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct ParamsSgd {
    /// Learning rate, `>= 0`.
    pub lr: f64,
    /// Momentum factor `μ`, `>= 0` (0: no momentum buffer).
    pub momentum: f64,
    /// Dampening of the gradient's share of the momentum: `b = μ·b + (1 − dampening)·g`.
    pub dampening: f64,
    /// L2 penalty added to the gradient: `g + weight_decay·p`, `>= 0`.
    pub weight_decay: f64,
    /// Nesterov momentum: the step uses `g + μ·b` (needs momentum and no dampening).
    pub nesterov: bool,
}

impl Default for ParamsSgd {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            momentum: 0.0,
            dampening: 0.0,
            weight_decay: 0.0,
            nesterov: false,
        }
    }
}

/// Stochastic gradient descent with PyTorch's `torch.optim.SGD` semantics, as one fused pass over
/// every parameter, with gradient clipping folded into it and non-finite steps optionally skipped.
///
/// Per var, with `g` the (clipped) gradient: `d = g + weight_decay·p` (when weight decay is on);
/// with momentum `μ`, the var's buffer is `b = d` at its first gradient, then
/// `b = μ·b + (1 − dampening)·d`, and `d = d + μ·b` (Nesterov) or `d = b`; finally `p = p − lr·d`.
/// Each operation is rounded once in the compute type (F32 or F64 vars: their own; F16/BF16: `f32`,
/// with an `f32` buffer). With momentum and weight decay off it is `p − lr·g` exactly as candle's
/// `SGD::step` computes it: **bitwise `candle_nn::SGD`** (F32, F64).
///
/// Clipping, skipping, state and counters work as for [`FusedAdamW`](crate::FusedAdamW): the
/// clip is folded into the update (bitwise `clip_grad_norm_` then the unfused step), the
/// `GradStore` is never written, and on CUDA nothing waits for the device (but for AutoClip).
///
/// ```
/// use candle_core::{backprop::GradStore, Device, Tensor, Var};
/// use candle_nn::Optimizer;
/// use candle_grad_clip::{FusedSgd, ParamsSgd};
/// # fn main() -> candle_core::Result<()> {
/// let w = Var::new(&[1f32, 1.], &Device::Cpu)?;
/// let params = ParamsSgd { lr: 0.5, momentum: 0.9, ..Default::default() };
/// let mut opt = FusedSgd::new(vec![w.clone()], params)?;
/// let mut grads = GradStore::default();
/// grads.insert(&w, Tensor::new(&[1f32, -1.], &Device::Cpu)?);
/// opt.step(&grads)?; // b = g, p = p - 0.5 b
/// opt.step(&grads)?; // b = 0.9 b + g = 1.9 g, p = p - 0.95 g
/// assert_eq!(w.to_vec1::<f32>()?, [1.0 - 0.5 - 0.95, 1.0 + 0.5 + 0.95]);
/// # Ok(()) }
/// ```
pub type FusedSgd = Fused<SgdRule>;

/// The update rule of [`FusedSgd`]: PyTorch's `torch.optim.SGD` (the `R` of [`Fused`]).
///
/// ```
/// let opt: candle_grad_clip::Fused<candle_grad_clip::SgdRule> =
///     candle_grad_clip::FusedSgd::new_named(vec![], Default::default())?;
/// assert!(opt.vars().is_empty());
/// # Ok::<(), candle_core::Error>(())
/// ```
#[derive(Debug, Clone, Copy)]
pub struct SgdRule;

impl FusedRule for SgdRule {}

impl RuleParts for SgdRule {
    type Params = ParamsSgd;
    const NAME: &'static str = "FusedSgd";
    const STATE: &'static [&'static str] = &["momentum_buffer"];
    const OPTIONAL: bool = true;

    fn validate(params: &ParamsSgd) -> Result<()> {
        validate(params)
    }

    fn rule(params: &ParamsSgd) -> Rule {
        rule(params)
    }

    fn learning_rate(params: &ParamsSgd) -> f64 {
        params.lr
    }

    fn set_learning_rate(params: &mut ParamsSgd, lr: f64) {
        params.lr = lr;
    }
}

/// Refuses what `torch.optim.SGD` refuses, and NaN or infinite values anywhere.
fn validate(p: &ParamsSgd) -> Result<()> {
    let finite = [p.lr, p.momentum, p.dampening, p.weight_decay]
        .iter()
        .all(|v| v.is_finite());
    if !finite {
        bail!("ParamsSgd: every value must be finite, got {p:?}")
    }
    if p.lr < 0.0 {
        bail!("ParamsSgd: invalid learning rate {} (must be >= 0)", p.lr)
    }
    if p.momentum < 0.0 {
        bail!("ParamsSgd: invalid momentum {} (must be >= 0)", p.momentum)
    }
    if p.weight_decay < 0.0 {
        bail!(
            "ParamsSgd: invalid weight_decay {} (must be >= 0)",
            p.weight_decay
        )
    }
    if p.nesterov && (p.momentum <= 0.0 || p.dampening != 0.0) {
        bail!(
            "ParamsSgd: Nesterov momentum requires a momentum and zero dampening (momentum {}, dampening {})",
            p.momentum,
            p.dampening
        )
    }
    Ok(())
}

fn rule(p: &ParamsSgd) -> Rule {
    Rule::Sgd {
        lr: p.lr,
        momentum: p.momentum,
        dampening: p.dampening,
        weight_decay: p.weight_decay,
        nesterov: p.nesterov,
    }
}
