//! [`FusedSgd`]: PyTorch's `torch.optim.SGD` (momentum, dampening, Nesterov, weight decay) as one
//! fused pass over all parameters, with the clip folded in; bitwise candle's `SGD` when momentum
//! and weight decay are off.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{backprop::GradStore, bail, Result, Tensor, Var};
use candle_nn::{Optimizer, VarMap};

use super::fused::FusedCore;
use crate::backend::update::Rule;
use crate::ClipSetting;

/// Name of the state tensor of each var (PyTorch's); it exists once momentum is on and the var has
/// had a gradient.
const STATE: [&str; 1] = ["momentum_buffer"];

/// The hyper-parameters of [`FusedSgd`], with `torch.optim.SGD`'s meaning.
///
/// ```
/// let p = candle_grad_clip::ParamsSgd::default();
/// assert_eq!((p.lr, p.momentum, p.dampening, p.weight_decay, p.nesterov), (0.01, 0.0, 0.0, 0.0, false));
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
            lr: 0.01,
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
#[derive(Debug)]
pub struct FusedSgd {
    core: FusedCore,
    params: ParamsSgd,
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

impl Optimizer for FusedSgd {
    type Config = ParamsSgd;

    /// The optimizer for `vars` (state matched to them by position); a bad config is an error.
    fn new(vars: Vec<Var>, params: ParamsSgd) -> Result<Self> {
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

fn rule(p: &ParamsSgd) -> Rule {
    Rule::Sgd {
        lr: p.lr,
        momentum: p.momentum,
        dampening: p.dampening,
        weight_decay: p.weight_decay,
        nesterov: p.nesterov,
    }
}

impl FusedSgd {
    /// The optimizer for every var of `varmap`, ordered by name, its state keyed by name: the way
    /// to save in one process and resume in another (`varmap.all_vars()` comes in a `HashMap`'s
    /// order, which differs between processes).
    ///
    /// ```
    /// use candle_core::{DType, Device};
    /// use candle_nn::{VarBuilder, VarMap};
    /// use candle_grad_clip::ParamsSgd;
    /// # fn main() -> candle_core::Result<()> {
    /// let varmap = VarMap::new();
    /// let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    /// vb.get(3, "b")?;
    /// vb.get(2, "a")?;
    /// let opt = candle_grad_clip::FusedSgd::from_varmap(&varmap, ParamsSgd::default())?;
    /// assert_eq!(opt.vars()[0].dims(), [2]); // "a" first
    /// assert!(opt.state_dict()?.contains_key("step"));
    /// # Ok(()) }
    /// ```
    pub fn from_varmap(varmap: &VarMap, params: ParamsSgd) -> Result<Self> {
        validate(&params)?;
        let mut core = FusedCore::from_varmap(varmap)?;
        core.init_state(rule(&params))?;
        Ok(Self { core, params })
    }

    /// The hyper-parameters.
    ///
    /// ```
    /// use candle_nn::Optimizer;
    /// use candle_grad_clip::ParamsSgd;
    /// let opt = candle_grad_clip::FusedSgd::new(vec![], ParamsSgd::default())?;
    /// assert_eq!(opt.params().lr, 0.01);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn params(&self) -> &ParamsSgd {
        &self.params
    }

    /// Changes the hyper-parameters from the next step on; a bad config is refused and the old one
    /// kept.
    ///
    /// ```
    /// use candle_nn::Optimizer;
    /// use candle_grad_clip::ParamsSgd;
    /// let mut opt = candle_grad_clip::FusedSgd::new(vec![], ParamsSgd::default())?;
    /// assert!(opt.set_params(ParamsSgd { nesterov: true, ..Default::default() }).is_err());
    /// opt.set_params(ParamsSgd { lr: 0.1, ..Default::default() })?;
    /// assert_eq!(opt.learning_rate(), 0.1);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn set_params(&mut self, params: ParamsSgd) -> Result<()> {
        validate(&params)?;
        self.params = params;
        Ok(())
    }

    /// Folds clipping into every step (validated as [`Clipped`](crate::Clipped) validates it).
    ///
    /// ```
    /// use candle_nn::Optimizer;
    /// use candle_grad_clip::{ClipSetting, FusedSgd, ParamsSgd};
    /// let opt = FusedSgd::new(vec![], ParamsSgd::default())?.with_clip(ClipSetting::value(0.5))?;
    /// assert!(opt.clip_setting().is_some());
    /// assert!(FusedSgd::new(vec![], ParamsSgd::default())?.with_clip(ClipSetting::norm(-1.0)).is_err());
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn with_clip(mut self, clip: ClipSetting) -> Result<Self> {
        self.core.set_clip(clip)?;
        Ok(self)
    }

    /// Whether to skip steps whose gradients are not all finite (see the type's documentation).
    ///
    /// ```
    /// use candle_nn::Optimizer;
    /// use candle_grad_clip::ParamsSgd;
    /// let opt = candle_grad_clip::FusedSgd::new(vec![], ParamsSgd::default())?.skip_nonfinite(true);
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
    /// use candle_nn::Optimizer;
    /// use candle_grad_clip::ParamsSgd;
    /// assert!(candle_grad_clip::FusedSgd::new(vec![], ParamsSgd::default())?.clip_setting().is_none());
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
    /// use candle_nn::Optimizer;
    /// use candle_grad_clip::ParamsSgd;
    /// assert!(candle_grad_clip::FusedSgd::new(vec![], ParamsSgd::default())?.last_norm().is_none());
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn last_norm(&self) -> Option<&Tensor> {
        self.core.last_norm()
    }

    /// Steps taken (skipped ones not counted). Reads the device
    /// (one synchronisation on CUDA).
    ///
    /// ```
    /// use candle_nn::Optimizer;
    /// use candle_grad_clip::ParamsSgd;
    /// assert_eq!(candle_grad_clip::FusedSgd::new(vec![], ParamsSgd::default())?.steps()?, 0);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn steps(&self) -> Result<usize> {
        self.core.steps()
    }

    /// Steps whose gradients the clip changed (a NaN or infinite norm counts; skipped steps do
    /// not). Reads the device (one synchronisation on CUDA).
    ///
    /// ```
    /// use candle_nn::Optimizer;
    /// use candle_grad_clip::ParamsSgd;
    /// assert_eq!(candle_grad_clip::FusedSgd::new(vec![], ParamsSgd::default())?.clipped_steps()?, 0);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn clipped_steps(&self) -> Result<usize> {
        self.core.clipped_steps()
    }

    /// Steps skipped because a gradient was not finite. Reads the device (one synchronisation on
    /// CUDA).
    ///
    /// ```
    /// use candle_nn::Optimizer;
    /// use candle_grad_clip::ParamsSgd;
    /// assert_eq!(candle_grad_clip::FusedSgd::new(vec![], ParamsSgd::default())?.skipped_steps()?, 0);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn skipped_steps(&self) -> Result<usize> {
        self.core.skipped_steps()
    }

    /// The vars it updates (the float vars given at construction, each once, in order).
    ///
    /// ```
    /// use candle_core::{DType, Device, Var};
    /// use candle_nn::Optimizer;
    /// use candle_grad_clip::ParamsSgd;
    /// let w = Var::zeros(2, DType::F32, &Device::Cpu)?;
    /// let opt = candle_grad_clip::FusedSgd::new(vec![w.clone(), w], ParamsSgd::default())?;
    /// assert_eq!(opt.vars().len(), 1);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn vars(&self) -> &[Var] {
        self.core.vars()
    }

    /// The state, as copies: `step`, `clipped_steps`, `skipped_steps` (0-d `I64`), and per var
    /// whose buffer exists `<key>.momentum_buffer` (F32, or F64 for F64 vars), `<key>` the var's
    /// position in the list given to [`new`](Optimizer::new), or its name with
    /// [`from_varmap`](Self::from_varmap). The settings (learning rate, momentum, clip) are not
    /// state.
    ///
    /// ```
    /// use candle_core::{DType, Device, Var};
    /// use candle_nn::Optimizer;
    /// use candle_grad_clip::ParamsSgd;
    /// let w = Var::zeros(2, DType::F32, &Device::Cpu)?;
    /// let state = candle_grad_clip::FusedSgd::new(vec![w], ParamsSgd::default())?.state_dict()?;
    /// assert_eq!(state.len(), 3); // no momentum: counters only
    /// assert_eq!(state["step"].to_scalar::<i64>()?, 0);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn state_dict(&self) -> Result<HashMap<String, Tensor>> {
        self.core.state_dict(&STATE, true)
    }

    /// Loads a state from [`state_dict`](Self::state_dict) of an optimizer over vars of the same
    /// shapes and dtypes; a mismatch (count, shape, dtype, a missing or unknown entry) is an error
    /// and nothing changes.
    ///
    /// ```
    /// use candle_core::{DType, Device, Var};
    /// use candle_nn::Optimizer;
    /// use candle_grad_clip::ParamsSgd;
    /// use candle_grad_clip::FusedSgd;
    /// let w = Var::zeros(2, DType::F32, &Device::Cpu)?;
    /// let mut state = FusedSgd::new(vec![w.clone()], ParamsSgd::default())?.state_dict()?;
    /// let mut other = FusedSgd::new(vec![w], ParamsSgd::default())?;
    /// other.load_state_dict(&state)?;
    /// state.insert("0.momentum_buffer".into(), candle_core::Tensor::zeros(3, DType::F32, &Device::Cpu)?);
    /// assert!(other.load_state_dict(&state).is_err()); // wrong shape
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn load_state_dict(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        self.core.load_state_dict(state, &STATE, true)
    }

    /// Saves [`state_dict`](Self::state_dict) as a safetensors file.
    ///
    /// ```no_run
    /// use candle_nn::Optimizer;
    /// use candle_grad_clip::ParamsSgd;
    /// let opt = candle_grad_clip::FusedSgd::new(vec![], ParamsSgd::default())?;
    /// opt.save_state("sgd.safetensors")?;
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn save_state(&self, path: impl AsRef<Path>) -> Result<()> {
        self.core.save_state(path.as_ref(), &STATE, true)
    }

    /// Loads a state saved by [`save_state`](Self::save_state), as
    /// [`load_state_dict`](Self::load_state_dict).
    ///
    /// ```no_run
    /// use candle_nn::Optimizer;
    /// use candle_grad_clip::ParamsSgd;
    /// let mut opt = candle_grad_clip::FusedSgd::new(vec![], ParamsSgd::default())?;
    /// opt.load_state("sgd.safetensors")?;
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn load_state(&mut self, path: impl AsRef<Path>) -> Result<()> {
        self.core.load_state(path.as_ref(), &STATE, true)
    }
}
