//! [`FusedAdamW`]: candle's `AdamW`, bitwise, as one fused pass over all parameters, with the clip
//! folded in.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{backprop::GradStore, bail, Result, Tensor, Var};
use candle_nn::{Optimizer, ParamsAdamW, VarMap};

use super::fused::FusedCore;
use crate::backend::update::Rule;
use crate::ClipSetting;

/// Names of the state tensors of each var (PyTorch's).
const STATE: [&str; 2] = ["exp_avg", "exp_avg_sq"];

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
/// **Clipping.** [`with_clip`](Self::with_clip) takes every [`ClipSetting`]. The step then reads
/// the gradients once for the norm (as `clip_grad_norm_` does), and the update multiplies each
/// gradient by the coefficient as it reads it, formed exactly as `clip_grad_norm_` forms it, so the
/// result is bitwise `clip_grad_norm_` (or `clip_grad_value_`, or AutoClip) followed by
/// `candle_nn::AdamW::step`. Unlike [`Clipped`](crate::Clipped), **the `GradStore` is not
/// written**: the gradients keep their values. On CUDA nothing waits for the device, except for
/// AutoClip (whose percentile is computed on the host).
///
/// **Skipping.** With [`skip_nonfinite(true)`](Self::skip_nonfinite), a step whose gradients
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
#[derive(Debug)]
pub struct FusedAdamW {
    core: FusedCore,
    params: ParamsAdamW,
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

impl Optimizer for FusedAdamW {
    type Config = ParamsAdamW;

    /// The optimizer for `vars` (state matched to them by position), with candle's
    /// `ParamsAdamW`; a bad config is an error.
    fn new(vars: Vec<Var>, params: ParamsAdamW) -> Result<Self> {
        validate(&params)?;
        let mut core = FusedCore::new(vars)?;
        core.init_state(rule(&params))?;
        Ok(Self { core, params })
    }

    /// One fused step (see the type's documentation). A learning rate made invalid by
    /// [`set_learning_rate`](Optimizer::set_learning_rate) is refused here, and nothing changes.
    fn step(&mut self, grads: &GradStore) -> Result<()> {
        validate(&self.params)?;
        self.core.step(grads, rule(&self.params))
    }

    fn learning_rate(&self) -> f64 {
        self.params.lr
    }

    fn set_learning_rate(&mut self, lr: f64) {
        self.params.lr = lr;
    }
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
    /// The optimizer for every var of `varmap`, ordered by name, its state keyed by name: the way
    /// to save in one process and resume in another (`varmap.all_vars()` comes in a `HashMap`'s
    /// order, which differs between processes).
    ///
    /// ```
    /// use candle_core::{DType, Device};
    /// use candle_nn::{ParamsAdamW, VarBuilder, VarMap};
    /// # fn main() -> candle_core::Result<()> {
    /// let varmap = VarMap::new();
    /// let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    /// vb.get(3, "b")?;
    /// vb.get(2, "a")?;
    /// let opt = candle_grad_clip::FusedAdamW::from_varmap(&varmap, ParamsAdamW::default())?;
    /// assert_eq!(opt.vars()[0].dims(), [2]); // "a" first
    /// assert!(opt.state_dict()?.contains_key("a.exp_avg"));
    /// # Ok(()) }
    /// ```
    pub fn from_varmap(varmap: &VarMap, params: ParamsAdamW) -> Result<Self> {
        validate(&params)?;
        let mut core = FusedCore::from_varmap(varmap)?;
        core.init_state(rule(&params))?;
        Ok(Self { core, params })
    }

    /// The hyper-parameters.
    ///
    /// ```
    /// use candle_nn::{Optimizer, ParamsAdamW};
    /// let opt = candle_grad_clip::FusedAdamW::new(vec![], ParamsAdamW::default())?;
    /// assert_eq!(opt.params().beta1, 0.9);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn params(&self) -> &ParamsAdamW {
        &self.params
    }

    /// Changes the hyper-parameters from the next step on; a bad config is refused and the old one
    /// kept (candle's `AdamW::set_params` takes anything).
    ///
    /// ```
    /// use candle_nn::{Optimizer, ParamsAdamW};
    /// let mut opt = candle_grad_clip::FusedAdamW::new(vec![], ParamsAdamW::default())?;
    /// assert!(opt.set_params(ParamsAdamW { beta1: 1.0, ..Default::default() }).is_err());
    /// opt.set_params(ParamsAdamW { lr: 0.1, ..Default::default() })?;
    /// assert_eq!(opt.learning_rate(), 0.1);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn set_params(&mut self, params: ParamsAdamW) -> Result<()> {
        validate(&params)?;
        self.params = params;
        Ok(())
    }

    /// Folds clipping into every step (validated as [`Clipped`](crate::Clipped) validates it).
    ///
    /// ```
    /// use candle_nn::{Optimizer, ParamsAdamW};
    /// use candle_grad_clip::{ClipSetting, FusedAdamW};
    /// let opt = FusedAdamW::new(vec![], ParamsAdamW::default())?.with_clip(ClipSetting::value(0.5))?;
    /// assert!(opt.clip_setting().is_some());
    /// assert!(FusedAdamW::new(vec![], ParamsAdamW::default())?.with_clip(ClipSetting::norm(-1.0)).is_err());
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn with_clip(mut self, clip: ClipSetting) -> Result<Self> {
        self.core.set_clip(clip)?;
        Ok(self)
    }

    /// Whether to skip steps whose gradients are not all finite (see the type's documentation).
    ///
    /// ```
    /// use candle_nn::{Optimizer, ParamsAdamW};
    /// let opt = candle_grad_clip::FusedAdamW::new(vec![], ParamsAdamW::default())?.skip_nonfinite(true);
    /// assert_eq!(opt.skipped_steps()?, 0);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn skip_nonfinite(mut self, skip: bool) -> Self {
        self.core.set_skip_nonfinite(skip);
        self
    }

    /// The clip setting (for AutoClip, with its current history), if any.
    ///
    /// ```
    /// use candle_nn::{Optimizer, ParamsAdamW};
    /// assert!(candle_grad_clip::FusedAdamW::new(vec![], ParamsAdamW::default())?.clip_setting().is_none());
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn clip_setting(&self) -> Option<&ClipSetting> {
        self.core.clip()
    }

    /// The norm of the last step's gradients before clipping, in the norm the setting bounds (the
    /// largest `|g|` for value clipping, L2 for AutoClip), as a 0-d tensor on their device; `None`
    /// without a clip or before the first step.
    ///
    /// ```
    /// use candle_nn::{Optimizer, ParamsAdamW};
    /// assert!(candle_grad_clip::FusedAdamW::new(vec![], ParamsAdamW::default())?.last_norm().is_none());
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn last_norm(&self) -> Option<&Tensor> {
        self.core.last_norm()
    }

    /// Steps taken (skipped ones not counted): the `t` of the bias corrections. Reads the device
    /// (one synchronisation on CUDA).
    ///
    /// ```
    /// use candle_nn::{Optimizer, ParamsAdamW};
    /// assert_eq!(candle_grad_clip::FusedAdamW::new(vec![], ParamsAdamW::default())?.steps()?, 0);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn steps(&self) -> Result<usize> {
        self.core.steps()
    }

    /// Steps whose gradients the clip changed (a NaN or infinite norm counts; skipped steps do
    /// not). Reads the device (one synchronisation on CUDA).
    ///
    /// ```
    /// use candle_nn::{Optimizer, ParamsAdamW};
    /// assert_eq!(candle_grad_clip::FusedAdamW::new(vec![], ParamsAdamW::default())?.clipped_steps()?, 0);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn clipped_steps(&self) -> Result<usize> {
        self.core.clipped_steps()
    }

    /// Steps skipped because a gradient was not finite. Reads the device (one synchronisation on
    /// CUDA).
    ///
    /// ```
    /// use candle_nn::{Optimizer, ParamsAdamW};
    /// assert_eq!(candle_grad_clip::FusedAdamW::new(vec![], ParamsAdamW::default())?.skipped_steps()?, 0);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn skipped_steps(&self) -> Result<usize> {
        self.core.skipped_steps()
    }

    /// The vars it updates (the float vars given at construction, each once, in order).
    ///
    /// ```
    /// use candle_core::{DType, Device, Var};
    /// use candle_nn::{Optimizer, ParamsAdamW};
    /// let w = Var::zeros(2, DType::F32, &Device::Cpu)?;
    /// let opt = candle_grad_clip::FusedAdamW::new(vec![w.clone(), w], ParamsAdamW::default())?;
    /// assert_eq!(opt.vars().len(), 1);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn vars(&self) -> &[Var] {
        self.core.vars()
    }

    /// The state, as copies: `step`, `clipped_steps`, `skipped_steps` (0-d `I64`), and per var
    /// `<key>.exp_avg` and `<key>.exp_avg_sq` (F32, or F64 for F64 vars), `<key>` the var's
    /// position in the list given to [`new`](Optimizer::new), or its name with
    /// [`from_varmap`](Self::from_varmap). The settings (learning rate, betas, clip) are not state.
    ///
    /// ```
    /// use candle_core::{DType, Device, Var};
    /// use candle_nn::{Optimizer, ParamsAdamW};
    /// let w = Var::zeros(2, DType::F32, &Device::Cpu)?;
    /// let state = candle_grad_clip::FusedAdamW::new(vec![w], ParamsAdamW::default())?.state_dict()?;
    /// assert_eq!(state.len(), 5);
    /// assert_eq!(state["0.exp_avg"].dims(), [2]);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn state_dict(&self) -> Result<HashMap<String, Tensor>> {
        self.core.state_dict(&STATE, false)
    }

    /// Loads a state from [`state_dict`](Self::state_dict) of an optimizer over vars of the same
    /// shapes and dtypes; a mismatch (count, shape, dtype, a missing or unknown entry) is an error
    /// and nothing changes.
    ///
    /// ```
    /// use candle_core::{DType, Device, Var};
    /// use candle_nn::{Optimizer, ParamsAdamW};
    /// use candle_grad_clip::FusedAdamW;
    /// let w = Var::zeros(2, DType::F32, &Device::Cpu)?;
    /// let state = FusedAdamW::new(vec![w.clone()], ParamsAdamW::default())?.state_dict()?;
    /// let mut other = FusedAdamW::new(vec![w], ParamsAdamW::default())?;
    /// other.load_state_dict(&state)?;
    /// let v = Var::zeros(3, DType::F32, &Device::Cpu)?;
    /// assert!(FusedAdamW::new(vec![v], ParamsAdamW::default())?.load_state_dict(&state).is_err());
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn load_state_dict(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        self.core.load_state_dict(state, &STATE, false)
    }

    /// Saves [`state_dict`](Self::state_dict) as a safetensors file.
    ///
    /// ```no_run
    /// use candle_nn::{Optimizer, ParamsAdamW};
    /// let opt = candle_grad_clip::FusedAdamW::new(vec![], ParamsAdamW::default())?;
    /// opt.save_state("adamw.safetensors")?;
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn save_state(&self, path: impl AsRef<Path>) -> Result<()> {
        self.core.save_state(path.as_ref(), &STATE, false)
    }

    /// Loads a state saved by [`save_state`](Self::save_state), as
    /// [`load_state_dict`](Self::load_state_dict).
    ///
    /// ```no_run
    /// use candle_nn::{Optimizer, ParamsAdamW};
    /// let mut opt = candle_grad_clip::FusedAdamW::new(vec![], ParamsAdamW::default())?;
    /// opt.load_state("adamw.safetensors")?;
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn load_state(&mut self, path: impl AsRef<Path>) -> Result<()> {
        self.core.load_state(path.as_ref(), &STATE, false)
    }
}
