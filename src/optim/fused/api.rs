//! [`Fused<R>`]: the public type of both fused optimizers ([`FusedAdamW`](crate::FusedAdamW) =
//! `Fused<AdamWRule>`, [`FusedSgd`](crate::FusedSgd) = `Fused<SgdRule>`), each method written
//! once over a [`FusedCore`]; the update rule ([`FusedRule`]) supplies the hyper-parameters, their
//! checks and the names of the state.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{backprop::GradStore, Result, Tensor, Var};
use candle_nn::{Optimizer, VarMap};

use super::state_dict::{StateBackup, StateValue};
use super::step::StepAcross;
use super::FusedCore;
use crate::dist::agreement::{refuse, Refusal};
use crate::dist::ProcessGroup;
use crate::io::format::Entry;
use crate::optim::clip_setting::ClipSetting;

pub(crate) mod sealed {
    use candle_core::Result;

    use crate::ops::fused_step::Rule;

    /// What an update rule supplies to [`Fused`](super::Fused) (crate-internal: the trait is
    /// sealed).
    pub trait RuleParts {
        /// The hyper-parameters (`Optimizer::Config`).
        type Params: Clone + std::fmt::Debug;
        /// The optimizer's name (a state file's kind, a checkpoint's optimizer kind).
        const NAME: &'static str;
        /// The names of each var's state tensors (PyTorch's).
        const STATE: &'static [&'static str];
        /// Whether a var's state may be absent (SGD's momentum buffer, before its first
        /// gradient).
        const OPTIONAL: bool;
        /// Refuses what PyTorch refuses, and NaN or infinite values anywhere.
        fn validate(params: &Self::Params) -> Result<()>;
        /// The step's update rule.
        fn rule(params: &Self::Params) -> Rule;
        /// The learning rate.
        fn learning_rate(params: &Self::Params) -> f64;
        /// Sets the learning rate (checked at the next step).
        fn set_learning_rate(params: &mut Self::Params, lr: f64);
    }
}

/// The update rule of a [`Fused`] optimizer: [`AdamWRule`](crate::AdamWRule) or
/// [`SgdRule`](crate::SgdRule) (sealed). Use the aliases [`FusedAdamW`](crate::FusedAdamW) and
/// [`FusedSgd`](crate::FusedSgd).
///
/// ```
/// fn learning_rate<R: candle_grad_clip::FusedRule>(opt: &candle_grad_clip::Fused<R>) -> f64 {
///     candle_nn::Optimizer::learning_rate(opt)
/// }
/// let opt = candle_grad_clip::FusedAdamW::new_lr(vec![], 0.5)?;
/// assert_eq!(learning_rate(&opt), 0.5);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub trait FusedRule: sealed::RuleParts + 'static {}

/// A fused optimizer: one pass over every parameter per step, with the clip folded in and
/// non-finite steps optionally skipped. Use it as [`FusedAdamW`](crate::FusedAdamW) or
/// [`FusedSgd`](crate::FusedSgd), whose pages describe each update; the methods below are
/// shared.
///
/// ```
/// use candle_core::{backprop::GradStore, Device, Tensor, Var};
/// use candle_nn::Optimizer;
/// use candle_grad_clip::{ClipSetting, FusedAdamW};
/// # fn main() -> candle_core::Result<()> {
/// let w = Var::new(&[1f32, 1.], &Device::Cpu)?;
/// let mut opt = FusedAdamW::new_lr(vec![w.clone()], 0.1)?.with_clip(ClipSetting::norm(1.0))?;
/// let mut grads = GradStore::default();
/// grads.insert(&w, Tensor::new(&[30f32, 40.], &Device::Cpu)?);
/// opt.step(&grads)?;
/// assert_eq!((opt.steps()?, opt.clipped_steps()?), (1, 1));
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Fused<R: FusedRule> {
    core: FusedCore,
    params: R::Params,
}

impl<R: FusedRule> Optimizer for Fused<R> {
    type Config = R::Params;

    /// The optimizer for `vars` (state matched to them by position); a bad config is an error.
    fn new(vars: Vec<Var>, params: R::Params) -> Result<Self> {
        Self::build(FusedCore::new(vars), params)
    }

    /// One fused step (see the type's documentation). A learning rate made invalid by
    /// [`set_learning_rate`](Optimizer::set_learning_rate) is refused here, and nothing changes.
    fn step(&mut self, grads: &GradStore) -> Result<()> {
        R::validate(&self.params)?;
        self.core.step(grads, R::rule(&self.params), None)
    }

    fn learning_rate(&self) -> f64 {
        R::learning_rate(&self.params)
    }

    fn set_learning_rate(&mut self, lr: f64) {
        R::set_learning_rate(&mut self.params, lr)
    }
}

impl<R: FusedRule> Fused<R> {
    fn build(core: Result<FusedCore>, params: R::Params) -> Result<Self> {
        R::validate(&params)?;
        let mut core = core?;
        core.init_state(R::rule(&params))?;
        Ok(Self { core, params })
    }

    /// The optimizer for every var of `varmap`, ordered by name, its state keyed by name: the
    /// way to save in one process and resume in another (`varmap.all_vars()` comes in a
    /// `HashMap`'s order, which differs between processes).
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
    /// # Ok(()) }
    /// ```
    pub fn from_varmap(varmap: &VarMap, params: R::Params) -> Result<Self> {
        Self::build(FusedCore::from_varmap(varmap), params)
    }

    /// The optimizer for named vars (in the order given), its state keyed by name, as
    /// [`from_varmap`](Self::from_varmap) keys it: a state file or checkpoint then finds each
    /// var's state by name, whatever order another process lists them in. A name given twice,
    /// or a var given under two names, is an error.
    ///
    /// ```
    /// use candle_core::{DType, Device, Var};
    /// use candle_grad_clip::{FusedSgd, ParamsSgd};
    /// # fn main() -> candle_core::Result<()> {
    /// let w = Var::zeros(3, DType::F32, &Device::Cpu)?;
    /// let b = Var::zeros(3, DType::F32, &Device::Cpu)?;
    /// let opt = FusedSgd::new_named(
    ///     vec![("w".to_string(), w), ("b".to_string(), b)],
    ///     ParamsSgd::default(),
    /// )?;
    /// assert_eq!(opt.vars().len(), 2);
    /// # Ok(()) }
    /// ```
    pub fn new_named(vars: Vec<(String, Var)>, params: R::Params) -> Result<Self> {
        Self::build(FusedCore::new_named(vars), params)
    }

    /// The hyper-parameters.
    ///
    /// ```
    /// let opt = candle_grad_clip::FusedAdamW::new_lr(vec![], 0.5)?;
    /// assert_eq!(opt.params().lr, 0.5);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn params(&self) -> &R::Params {
        &self.params
    }

    /// Changes the hyper-parameters from the next step on; a bad config is refused and the old
    /// one kept.
    ///
    /// ```
    /// use candle_nn::Optimizer;
    /// use candle_grad_clip::{FusedSgd, ParamsSgd};
    /// let mut opt = FusedSgd::new(vec![], ParamsSgd::default())?;
    /// assert!(opt.set_params(ParamsSgd { lr: -1.0, ..Default::default() }).is_err());
    /// opt.set_params(ParamsSgd { lr: 0.5, ..Default::default() })?;
    /// assert_eq!(opt.learning_rate(), 0.5);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn set_params(&mut self, params: R::Params) -> Result<()> {
        R::validate(&params)?;
        self.params = params;
        Ok(())
    }

    /// Folds clipping into every step (checked now, as [`Clipped`](crate::Clipped) checks it).
    ///
    /// ```
    /// use candle_grad_clip::{ClipSetting, FusedAdamW};
    /// let opt = FusedAdamW::new_lr(vec![], 1e-3)?.with_clip(ClipSetting::value(0.5))?;
    /// assert!(opt.clip_setting().is_some());
    /// assert!(FusedAdamW::new_lr(vec![], 1e-3)?.with_clip(ClipSetting::norm(-1.0)).is_err());
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn with_clip(mut self, clip: ClipSetting) -> Result<Self> {
        self.core.set_clip(clip)?;
        Ok(self)
    }

    /// Replaces the clip setting (checked as [`with_clip`](Self::with_clip) checks it; an
    /// invalid one is an error and changes nothing), e.g. to restore an AutoClip or ZClip with
    /// its state.
    ///
    /// ```
    /// use candle_grad_clip::{ClipSetting, FusedSgd};
    /// let mut opt = FusedSgd::new_named(vec![], Default::default())?.with_clip(ClipSetting::value(0.5))?;
    /// assert!(opt.set_clip_setting(ClipSetting::norm(-1.0)).is_err());
    /// assert!(matches!(opt.clip_setting(), Some(ClipSetting::Value { .. })));
    /// opt.set_clip_setting(ClipSetting::norm(1.0))?;
    /// assert!(matches!(opt.clip_setting(), Some(ClipSetting::Norm(_))));
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn set_clip_setting(&mut self, clip: ClipSetting) -> Result<()> {
        self.core.set_clip(clip)
    }

    /// The clip setting (for AutoClip and ZClip, with their current state), if any: ZClip's
    /// statistics for a checkpoint are `clip_setting()` →
    /// [`ZClip::state_dict`](crate::ZClip::state_dict).
    ///
    /// ```
    /// assert!(candle_grad_clip::FusedAdamW::new_lr(vec![], 1e-3)?.clip_setting().is_none());
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn clip_setting(&self) -> Option<&ClipSetting> {
        self.core.clip()
    }

    /// Sets whether to skip steps whose gradients are not all finite (see the type's
    /// documentation); off by default.
    ///
    /// ```
    /// let opt = candle_grad_clip::FusedAdamW::new_lr(vec![], 1e-3)?.with_skip_nonfinite(true);
    /// assert!(opt.skip_nonfinite());
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn with_skip_nonfinite(mut self, skip: bool) -> Self {
        self.core.set_skip_nonfinite(skip);
        self
    }

    /// Whether non-finite steps are skipped.
    ///
    /// ```
    /// assert!(!candle_grad_clip::FusedAdamW::new_lr(vec![], 1e-3)?.skip_nonfinite());
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn skip_nonfinite(&self) -> bool {
        self.core.skip.skip_nonfinite
    }

    /// With [`with_skip_nonfinite`](Self::with_skip_nonfinite): skip at most `limit` non-finite
    /// steps in a row; the next non-finite one in the run returns an error saying that the
    /// training is broken, and changes nothing. A finite step starts the count again. Without a
    /// limit a step reads nothing back; with one, each step reads the skipped-step count (one
    /// transfer; on CUDA, one synchronisation). A state loaded with `load_state_dict` starts a
    /// new run.
    ///
    /// ```
    /// use candle_core::{backprop::GradStore, DType, Device, Tensor, Var};
    /// use candle_nn::Optimizer;
    /// # fn main() -> candle_core::Result<()> {
    /// let w = Var::zeros(2, DType::F32, &Device::Cpu)?;
    /// let mut opt = candle_grad_clip::FusedAdamW::new_lr(vec![w.clone()], 1e-3)?
    ///     .with_skip_nonfinite(true)
    ///     .with_max_consecutive_skips(1);
    /// let mut grads = GradStore::default();
    /// grads.insert(&w, Tensor::new(&[f32::NAN, 0.0], &Device::Cpu)?);
    /// opt.step(&grads)?; // skipped
    /// assert!(opt.step(&grads).is_err()); // the second in a row
    /// assert_eq!((opt.skipped_steps()?, opt.consecutive_skips()?), (1, 1));
    /// # Ok(()) }
    /// ```
    pub fn with_max_consecutive_skips(mut self, limit: usize) -> Self {
        self.core.set_max_consecutive_skips(limit);
        self
    }

    /// The limit on non-finite steps skipped in a row, if any.
    ///
    /// ```
    /// let opt = candle_grad_clip::FusedSgd::new_named(vec![], Default::default())?;
    /// assert_eq!(opt.max_consecutive_skips(), None);
    /// assert_eq!(opt.with_max_consecutive_skips(3).max_consecutive_skips(), Some(3));
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn max_consecutive_skips(&self) -> Option<usize> {
        self.core.skip.max_consecutive_skips
    }

    /// The norm of the last step's gradients before clipping, in the norm the setting bounds
    /// (the largest `|g|` for value clipping, L2 for AutoClip and for AGC), as a 0-d tensor on
    /// their device; `None` without a clip or before the first step.
    ///
    /// ```
    /// assert!(candle_grad_clip::FusedAdamW::new_lr(vec![], 1e-3)?.last_norm().is_none());
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn last_norm(&self) -> Option<&Tensor> {
        self.core.last_norm()
    }

    /// Steps taken (skipped ones not counted). Reads the device (one synchronisation on CUDA).
    ///
    /// ```
    /// assert_eq!(candle_grad_clip::FusedAdamW::new_lr(vec![], 1e-3)?.steps()?, 0);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn steps(&self) -> Result<u64> {
        self.core.steps()
    }

    /// Steps whose gradients the clip changed (a NaN or infinite norm counts; for AGC, steps
    /// where some unit was clipped; skipped steps do not). Reads the device (one
    /// synchronisation on CUDA).
    ///
    /// ```
    /// assert_eq!(candle_grad_clip::FusedAdamW::new_lr(vec![], 1e-3)?.clipped_steps()?, 0);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn clipped_steps(&self) -> Result<u64> {
        self.core.clipped_steps()
    }

    /// Steps skipped because a gradient was not finite. Reads the device (one synchronisation
    /// on CUDA).
    ///
    /// ```
    /// assert_eq!(candle_grad_clip::FusedAdamW::new_lr(vec![], 1e-3)?.skipped_steps()?, 0);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn skipped_steps(&self) -> Result<u64> {
        self.core.skipped_steps()
    }

    /// The non-finite steps skipped in a row up to the last step (0 when the last step ran):
    /// what a loop reacts to, e.g. by lowering the learning rate. Reads the device (one
    /// synchronisation on CUDA).
    ///
    /// ```
    /// assert_eq!(candle_grad_clip::FusedAdamW::new_lr(vec![], 1e-3)?.consecutive_skips()?, 0);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn consecutive_skips(&self) -> Result<u64> {
        self.core.consecutive_skips()
    }

    /// Whether the last step was skipped (`false` before the first step). Reads the device (one
    /// synchronisation on CUDA).
    ///
    /// ```
    /// assert!(!candle_grad_clip::FusedAdamW::new_lr(vec![], 1e-3)?.last_step_skipped()?);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn last_step_skipped(&self) -> Result<bool> {
        Ok(self.core.consecutive_skips()? > 0)
    }

    /// The vars it updates (the float vars given at construction, each once, in order).
    ///
    /// ```
    /// use candle_core::{DType, Device, Var};
    /// let w = Var::zeros(2, DType::F32, &Device::Cpu)?;
    /// let opt = candle_grad_clip::FusedAdamW::new_lr(vec![w.clone(), w], 1e-3)?;
    /// assert_eq!(opt.vars().len(), 1);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn vars(&self) -> &[Var] {
        self.core.vars()
    }

    /// The state, as copies (each of its var's elements only): `step`, `clipped_steps`,
    /// `skipped_steps` (0-d `I64`), and per var `<key>.<name>` for each state tensor (AdamW:
    /// `exp_avg` and `exp_avg_sq`; SGD: `momentum_buffer`, once momentum is on and the var has
    /// had a gradient), F32, or F64 for F64 vars. `<key>` is the var's position in the list given
    /// to [`new`](Optimizer::new), or its name with [`from_varmap`](Self::from_varmap) and
    /// [`new_named`](Self::new_named). The settings (learning rate and the rest, the clip) are
    /// not state.
    ///
    /// ```
    /// use candle_core::{DType, Device, Var};
    /// let w = Var::zeros(2, DType::F32, &Device::Cpu)?;
    /// let state = candle_grad_clip::FusedAdamW::new_lr(vec![w], 1e-3)?.state_dict()?;
    /// assert_eq!(state["step"].to_scalar::<i64>()?, 0);
    /// assert_eq!(state["0.exp_avg"].dims(), [2]);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn state_dict(&self) -> Result<HashMap<String, Tensor>> {
        self.core.state_dict(R::STATE, R::OPTIONAL)
    }

    /// Loads a state from [`state_dict`](Self::state_dict) of an optimizer over vars of the
    /// same shapes and dtypes; a mismatch (count, shape, dtype, a missing or unknown entry) or
    /// a value the update cannot take (a step count past `i32::MAX - 1`, a negative counter, a
    /// non-finite value, a negative second moment) is an error and nothing changes.
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor, Var};
    /// use candle_grad_clip::FusedAdamW;
    /// let w = Var::zeros(2, DType::F32, &Device::Cpu)?;
    /// let mut state = FusedAdamW::new_lr(vec![w.clone()], 1e-3)?.state_dict()?;
    /// let mut other = FusedAdamW::new_lr(vec![w], 1e-3)?;
    /// other.load_state_dict(&state)?;
    /// state.insert("1.unknown".into(), Tensor::zeros(2, DType::F32, &Device::Cpu)?);
    /// assert!(other.load_state_dict(&state).is_err());
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn load_state_dict(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        self.core.load_state_dict(state, R::STATE, R::OPTIONAL)
    }

    /// Saves [`state_dict`](Self::state_dict) as a safetensors file, atomically, with the
    /// SHA-256 of every tensor and of its header (each state buffer is read to the host once).
    ///
    /// ```no_run
    /// let opt = candle_grad_clip::FusedAdamW::new_lr(vec![], 1e-3)?;
    /// opt.save_state("optimizer.safetensors")?;
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn save_state(&self, path: impl AsRef<Path>) -> Result<()> {
        self.core
            .save_state(path.as_ref(), R::NAME, R::STATE, R::OPTIONAL)
    }

    /// Loads a state saved by [`save_state`](Self::save_state), as
    /// [`load_state_dict`](Self::load_state_dict), after verifying the file: a damaged file (a
    /// digest that does not match), one without digests, or another optimizer's is an error.
    /// An optimizer built with `new` knows its vars by position only: it refuses a file when
    /// two of its vars share a shape and the dtype of their state (F16, BF16 and F32 vars all
    /// keep F32 state: another process may list them in the other order); build it with
    /// [`from_varmap`](Self::from_varmap) or [`new_named`](Self::new_named) instead.
    ///
    /// ```no_run
    /// let mut opt = candle_grad_clip::FusedAdamW::new_lr(vec![], 1e-3)?;
    /// opt.load_state("optimizer.safetensors")?;
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn load_state(&mut self, path: impl AsRef<Path>) -> Result<()> {
        self.core
            .load_state(path.as_ref(), R::NAME, R::STATE, R::OPTIONAL)
    }

    /// One step of a sharded model: this rank's vars, with the clip's norm taken over the
    /// gradients of every rank of `group` (see [`total_norm_across`](crate::total_norm_across)),
    /// so every rank scales by the same coefficient; AutoClip's norm and history are the global
    /// L2 norm's; ZClip runs on the global L2 norm (its statistics updated on the host, where
    /// that norm is); AGC is unit-wise (each rank clips its own units; `last_norm` is the global
    /// L2 norm); and `skip_nonfinite` without a clip skips on every rank when any rank's
    /// gradients are not finite. Value clipping is element-wise (each rank clamps its own
    /// gradients); with `skip_nonfinite` the largest `|g|` over every rank decides the skip (so
    /// every rank skips together) and is `last_norm`; with AGC the global L2 norm decides it.
    ///
    /// **Ranks fail together and agree.** Every step makes one collective (the clip's norm, or a
    /// small one when the step needs no norm), and every check that can refuse this rank's step
    /// runs before it: its parameters (a learning rate made invalid by `set_learning_rate`), its
    /// gradients, an earlier failure. A refused rank still takes part, so every rank returns an
    /// error that names it and nothing changes on any rank. The settings every rank must share
    /// (the optimizer, the clip setting and its parameters, `skip_nonfinite`,
    /// `max_consecutive_skips`) travel as a fingerprint in the same collective: ranks that
    /// differ all fail, naming the first rank and setting that differ from rank 0's. A device
    /// error in the update, after the collective, fails that rank alone (its vars and state may
    /// be partly updated; the others stepped): its optimizer then refuses every later
    /// `step_across`, so every rank fails at the next step's collective.
    ///
    /// ```
    /// use candle_core::{backprop::GradStore, Device, Tensor, Var};
    /// use candle_grad_clip::{ClipSetting, FusedAdamW, LocalGroup};
    /// # fn main() -> candle_core::Result<()> {
    /// let norms = std::thread::scope(|s| {
    ///     let handles: Vec<_> = LocalGroup::new(2)?
    ///         .into_iter()
    ///         .zip([3f32, 4.])
    ///         .map(|(group, g)| {
    ///             s.spawn(move || -> candle_core::Result<f32> {
    ///                 let w = Var::new(&[0f32], &Device::Cpu)?;
    ///                 let mut opt = FusedAdamW::new_lr(vec![w.clone()], 1e-3)?
    ///                     .with_clip(ClipSetting::norm(1.0))?;
    ///                 let mut grads = GradStore::default();
    ///                 grads.insert(&w, Tensor::new(&[g], &Device::Cpu)?);
    ///                 opt.step_across(&grads, &group)?;
    ///                 opt.last_norm().unwrap().to_scalar::<f32>()
    ///             })
    ///         })
    ///         .collect();
    ///     handles.into_iter().map(|h| h.join().unwrap()).collect::<candle_core::Result<Vec<_>>>()
    /// })?;
    /// assert_eq!(norms, [5.0, 5.0]); // the norm of both ranks' gradients, on both
    /// # Ok(()) }
    /// ```
    pub fn step_across(&mut self, grads: &GradStore, group: &dyn ProcessGroup) -> Result<()> {
        // Invalid parameters refuse this rank inside the step's collective, so that every rank
        // fails with it.
        let refused = refuse(Refusal::Optimizer, R::validate(&self.params)).err();
        let across = StepAcross { group, refused };
        self.core.step(grads, R::rule(&self.params), Some(across))
    }

    /// A step with non-finite steps skipped on the device whatever
    /// [`skip_nonfinite`](Self::skip_nonfinite) says ([`GradScaler`](crate::GradScaler)'s step).
    /// With `prescale`, the step unscales the gradients itself (see `FusedCore`).
    pub(crate) fn step_skipping_nonfinite(
        &mut self,
        grads: &GradStore,
        prescale: Option<&Tensor>,
    ) -> Result<()> {
        R::validate(&self.params)?;
        self.core
            .step_skipping_nonfinite(grads, R::rule(&self.params), prescale)
    }

    /// [`step_skipping_nonfinite`](Self::step_skipping_nonfinite) across the ranks of `group`
    /// ([`GradScaler::step_across`](crate::GradScaler::step_across)): invalid parameters refuse
    /// this rank in the step's collective, so every rank fails.
    pub(crate) fn step_skipping_nonfinite_across(
        &mut self,
        grads: &GradStore,
        group: &dyn ProcessGroup,
    ) -> Result<()> {
        let refused = refuse(Refusal::Optimizer, R::validate(&self.params)).err();
        self.core.step_skipping_nonfinite_across(
            grads,
            R::rule(&self.params),
            StepAcross { group, refused },
        )
    }

    /// The core's device and clip, for GradScaler's choice of path.
    pub(crate) fn core(&self) -> &FusedCore {
        &self.core
    }

    /// A step skipped without running, counted in `skipped_steps` (GradScaler's step after an
    /// `unscale_` that found a non-finite gradient).
    pub(crate) fn record_skip(&mut self) -> Result<()> {
        self.core.record_skip()
    }

    /// The state as host entries, var `i`'s under `keys[i]` (a checkpoint's).
    pub(crate) fn state_entries(&self, keys: &[String]) -> Result<BTreeMap<String, Entry>> {
        self.core.state_entries(R::STATE, R::OPTIONAL, keys)
    }

    /// Loads a state, var `i`'s under `keys[i]` (a checkpoint's); the old state comes back, for
    /// [`put_back`](Self::put_back).
    pub(crate) fn load_state_values(
        &mut self,
        values: &HashMap<&str, StateValue<'_>>,
        keys: &[String],
    ) -> Result<StateBackup> {
        self.core
            .load_state_values(values, R::STATE, R::OPTIONAL, keys)
    }

    /// Puts back the state [`load_state_values`](Self::load_state_values) replaced.
    pub(crate) fn put_back(&mut self, backup: StateBackup) -> Result<()> {
        self.core.put_back(backup)
    }
}
