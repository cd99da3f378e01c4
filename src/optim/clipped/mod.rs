//! [`Clipped`]: any candle optimizer, with gradient clipping before every step (the step itself
//! is in [`step`]).

use std::collections::HashSet;

use candle_core::{backprop::GradStore, Result, Tensor, Var};
use candle_nn::Optimizer;

mod step;

use super::clip_setting::ClipSetting;
use super::skip::SkipSetting;
use crate::dist::ProcessGroup;

/// The [`Optimizer::Config`] of [`Clipped`]: the inner optimizer's config and the clip setting.
///
/// ```
/// use candle_grad_clip::{ClipSetting, ClippedConfig};
/// use candle_nn::ParamsAdamW;
/// let config = ClippedConfig::new(ParamsAdamW { lr: 1e-3, ..Default::default() }, ClipSetting::norm(1.0));
/// assert_eq!(config.inner.lr, 1e-3);
/// ```
#[derive(Debug, Clone)]
pub struct ClippedConfig<C> {
    /// The inner optimizer's config (a learning rate for `SGD`, `ParamsAdamW` for `AdamW`, …).
    pub inner: C,
    /// How to clip before each step.
    pub clip: ClipSetting,
}

impl<C> ClippedConfig<C> {
    /// The inner optimizer's config with a clip setting.
    ///
    /// ```
    /// let config = candle_grad_clip::ClippedConfig::new(0.1, candle_grad_clip::ClipSetting::value(1.0));
    /// assert_eq!(config.inner, 0.1);
    /// ```
    pub fn new(inner: C, clip: ClipSetting) -> Self {
        Self { inner, clip }
    }
}

/// Any candle [`Optimizer`] with gradient clipping before every step; itself an [`Optimizer`], so
/// `opt.backward_step(&loss)` computes the gradients, clips them and steps.
///
/// Works with every implementation of `candle_nn::Optimizer`: `SGD`, `AdamW`, and those of other
/// crates such as `candle-optimisers`.
///
/// **`step` modifies the caller's gradients.** Like PyTorch's `clip_grad_norm_`, which rescales
/// `.grad` in place, [`step`](Optimizer::step) clips the gradient tensors of the wrapped vars
/// inside the `GradStore` it is given, in place, then lets the inner optimizer step on them:
/// after `opt.step(&grads)`, `grads` holds the clipped gradients (handy for logging their norm).
/// Gradients of other tensors in the store are not touched.
///
/// **What is measured.** [`last_norm`](Self::last_norm) is the norm of the gradients *before*
/// clipping, in the norm that the setting bounds: its `norm_type` for `Norm`, L2 for `AutoClip`
/// and `ZClip`, the infinity norm (largest `|g|`) for `Value`, the global L2 norm for `Agc`. It
/// stays a 0-d tensor on the gradients' device: nothing is read to the host unless you read it.
///
/// **Counting clipped steps.** A step counts as clipped when the clip changed the gradients:
/// for `Norm` and `AutoClip` when the coefficient `threshold / (norm + 1e-6)` was below 1 (a NaN
/// or infinite norm counts as clipped); for `ZClip` when its coefficient was below 1 (or NaN);
/// for `Value` when some element's magnitude exceeded `clip_value` (or was NaN); for `Agc` when
/// some unit was clipped. The count is kept lazily, as a 0-d tensor on the gradients' device
/// updated by two tiny device ops per step, so a CUDA loop never waits for it; only
/// [`clipped_steps`](Self::clipped_steps) reads it (one synchronisation). AutoClip itself reads
/// each step's norm (its percentile is computed on the host).
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use candle_nn::{linear, Module, Optimizer, VarBuilder, VarMap, SGD};
/// use candle_grad_clip::{ClipSetting, Clipped, ClippedConfig};
/// # fn main() -> candle_core::Result<()> {
/// let varmap = VarMap::new();
/// let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
/// let model = linear(4, 1, vb.pp("fc"))?;
/// let config = ClippedConfig::new(0.1, ClipSetting::norm(1.0));
/// let mut opt = Clipped::<SGD>::new(varmap.all_vars(), config)?;
///
/// let x = Tensor::ones((8, 4), DType::F32, &Device::Cpu)?;
/// let loss = (model.forward(&x)? - 100.0)?.sqr()?.mean_all()?;
/// opt.backward_step(&loss)?; // clip, then SGD
/// let norm = opt.last_norm().unwrap().to_scalar::<f32>()?;
/// assert!(norm > 1.0);
/// assert_eq!(opt.clipped_steps()?, 1);
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Clipped<O> {
    pub(super) inner: O,
    /// The vars to clip: the float vars given to `new`, each once.
    pub(super) vars: Vec<Var>,
    pub(super) clip: ClipSetting,
    /// Steps taken (skipped ones not counted).
    pub(super) steps: u64,
    pub(super) last_norm: Option<Tensor>,
    /// 0-d `U32` on the gradients' device: steps that were *not* clipped.
    pub(super) unclipped: Option<Tensor>,
    pub(super) skip: SkipSetting,
    pub(super) skipped: u64,
    /// Non-finite steps skipped in a row, up to the last step.
    pub(super) skip_run: u64,
    /// Why a step across ranks failed on this rank past its collective (the other ranks
    /// stepped): every later `step_across` is refused on every rank.
    pub(super) diverged: Option<String>,
}

impl<O: Optimizer> Optimizer for Clipped<O> {
    type Config = ClippedConfig<O::Config>;

    fn new(vars: Vec<Var>, config: Self::Config) -> Result<Self> {
        config.clip.validate()?;
        let inner = O::new(vars.clone(), config.inner)?;
        Ok(Self::assemble(inner, vars, config.clip))
    }

    fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.step_with(grads, None)
    }

    fn learning_rate(&self) -> f64 {
        self.inner.learning_rate()
    }

    fn set_learning_rate(&mut self, lr: f64) {
        self.inner.set_learning_rate(lr)
    }
}

impl<O: Optimizer> Clipped<O> {
    /// [`step`](Optimizer::step) for a sharded model: this rank's vars, clipped with the norm
    /// over the gradients of every rank of `group` (see
    /// [`total_norm_across`](crate::total_norm_across)), so that every rank scales by the same
    /// coefficient. AutoClip's norm and history are the global L2 norm's; value clipping clamps
    /// each rank's own gradients (its `last_norm` is the global largest `|g|`).
    ///
    /// **Ranks fail together and agree.** Every check that can refuse this rank's step (its
    /// gradients, an earlier failure) runs before the step's first collective and travels in
    /// it: a refused rank still takes part, every rank returns an error that names it, and
    /// nothing changes on any rank. The settings every rank must share (the clip setting and its
    /// parameters, `skip_nonfinite`, `max_consecutive_skips`) travel as a fingerprint in the same
    /// collective; ranks that differ all fail. A failure past the step's last collective (a
    /// device error in the clip's pass, or the inner optimizer's step refusing) fails this rank
    /// alone (its gradients may be clipped, its vars unchanged; the other ranks stepped): it then
    /// refuses every later `step_across`, so every rank fails at the next step's collective.
    ///
    /// ```
    /// use candle_core::{backprop::GradStore, Device, Tensor, Var};
    /// use candle_nn::SGD;
    /// use candle_grad_clip::{ClipSetting, Clipped, ClippedConfig, LocalGroup};
    /// # fn main() -> candle_core::Result<()> {
    /// let norms = std::thread::scope(|s| {
    ///     let handles: Vec<_> = LocalGroup::new(2)?
    ///         .into_iter()
    ///         .zip([3f32, 4.])
    ///         .map(|(group, g)| {
    ///             s.spawn(move || -> candle_core::Result<f32> {
    ///                 let w = Var::new(&[0f32], &Device::Cpu)?;
    ///                 let config = ClippedConfig::new(0.1, ClipSetting::norm(1.0));
    ///                 let mut opt = <Clipped<SGD> as candle_nn::Optimizer>::new(vec![w.clone()], config)?;
    ///                 let mut grads = GradStore::default();
    ///                 grads.insert(&w, Tensor::new(&[g], &Device::Cpu)?);
    ///                 opt.step_across(&grads, &group)?;
    ///                 opt.last_norm().unwrap().to_scalar::<f32>()
    ///             })
    ///         })
    ///         .collect();
    ///     handles.into_iter().map(|h| h.join().unwrap()).collect::<candle_core::Result<Vec<_>>>()
    /// })?;
    /// assert_eq!(norms, [5.0, 5.0]);
    /// # Ok(()) }
    /// ```
    pub fn step_across(&mut self, grads: &GradStore, group: &dyn ProcessGroup) -> Result<()> {
        self.step_with(grads, Some(group))
    }
}

impl<O: Optimizer> Clipped<O> {
    /// Wraps an optimizer built elsewhere (e.g. `AdamW::new_lr`); `vars` are the vars to clip,
    /// normally the ones the optimizer was built with. The setting is checked first.
    ///
    /// ```
    /// use candle_core::{Device, Var};
    /// use candle_nn::AdamW;
    /// use candle_grad_clip::{ClipSetting, Clipped};
    /// # fn main() -> candle_core::Result<()> {
    /// let w = Var::zeros(3, candle_core::DType::F32, &Device::Cpu)?;
    /// let adamw = AdamW::new_lr(vec![w.clone()], 1e-3)?;
    /// let opt = Clipped::from_optimizer(adamw, vec![w], ClipSetting::norm(1.0))?;
    /// assert_eq!(opt.steps()?, 0);
    /// assert!(Clipped::from_optimizer(AdamW::new_lr(vec![], 1e-3)?, vec![], ClipSetting::norm(-1.0)).is_err());
    /// # Ok(()) }
    /// ```
    pub fn from_optimizer(inner: O, vars: Vec<Var>, clip: ClipSetting) -> Result<Self> {
        clip.validate()?;
        Ok(Self::assemble(inner, vars, clip))
    }
}

impl<O> Clipped<O> {
    fn assemble(inner: O, vars: Vec<Var>, clip: ClipSetting) -> Self {
        // Like candle's optimizers, skip non-float vars; list each var once.
        let mut seen = HashSet::new();
        let vars = vars
            .into_iter()
            .filter(|var| var.dtype().is_float() && seen.insert(var.id()))
            .collect();
        Self {
            inner,
            vars,
            clip,
            steps: 0,
            last_norm: None,
            unclipped: None,
            skip: SkipSetting::default(),
            skipped: 0,
            skip_run: 0,
            diverged: None,
        }
    }

    /// Sets whether to skip steps whose gradients are not all finite (some NaN or ±inf; off by
    /// default): the inner optimizer is not called, nothing is clipped or changed, and the step is counted by
    /// [`skipped_steps`](Self::skipped_steps) (not by [`steps`](Self::steps)); `last_norm` is then
    /// the largest `|g|` (NaN or inf). Optax's `apply_if_finite`. Deciding whether to call the
    /// inner optimizer is a host decision: with skipping on, each step reads one number back (on
    /// CUDA, one synchronisation) after one extra read pass over the gradients.
    ///
    /// ```
    /// use candle_core::{Device, Tensor, Var, backprop::GradStore};
    /// use candle_nn::{Optimizer, SGD};
    /// use candle_grad_clip::{ClipSetting, Clipped, ClippedConfig};
    /// # fn main() -> candle_core::Result<()> {
    /// let w = Var::new(&[1f32, 1.], &Device::Cpu)?;
    /// let config = ClippedConfig::new(0.1, ClipSetting::norm(1.0));
    /// let mut opt = Clipped::<SGD>::new(vec![w.clone()], config)?.with_skip_nonfinite(true);
    /// let mut grads = GradStore::default();
    /// grads.insert(&w, Tensor::new(&[f32::NAN, 1.], &Device::Cpu)?);
    /// opt.step(&grads)?;
    /// assert_eq!(w.to_vec1::<f32>()?, [1.0, 1.0]); // untouched
    /// assert_eq!((opt.steps()?, opt.skipped_steps()?), (0, 1));
    /// assert!(opt.last_step_skipped()?);
    /// # Ok(()) }
    /// ```
    pub fn with_skip_nonfinite(mut self, skip: bool) -> Self {
        self.skip.skip_nonfinite = skip;
        self
    }

    /// Whether non-finite steps are skipped.
    ///
    /// ```
    /// use candle_nn::{Optimizer, SGD};
    /// use candle_grad_clip::{ClipSetting, Clipped, ClippedConfig};
    /// let opt = Clipped::<SGD>::new(vec![], ClippedConfig::new(0.1, ClipSetting::norm(1.0)))?;
    /// assert!(!opt.skip_nonfinite());
    /// assert!(opt.with_skip_nonfinite(true).skip_nonfinite());
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn skip_nonfinite(&self) -> bool {
        self.skip.skip_nonfinite
    }

    /// With [`with_skip_nonfinite`](Self::with_skip_nonfinite): skip at most `limit` non-finite steps in a
    /// row; the next non-finite one in the run is an error saying that the training is broken,
    /// and changes nothing. A finite step starts the count again.
    ///
    /// ```
    /// use candle_core::{Device, Tensor, Var, backprop::GradStore};
    /// use candle_nn::{Optimizer, SGD};
    /// use candle_grad_clip::{ClipSetting, Clipped, ClippedConfig};
    /// # fn main() -> candle_core::Result<()> {
    /// let w = Var::new(&[1f32], &Device::Cpu)?;
    /// let config = ClippedConfig::new(0.1, ClipSetting::norm(1.0));
    /// let mut opt = Clipped::<SGD>::new(vec![w.clone()], config)?
    ///     .with_skip_nonfinite(true)
    ///     .with_max_consecutive_skips(2);
    /// let mut grads = GradStore::default();
    /// grads.insert(&w, Tensor::new(&[f32::INFINITY], &Device::Cpu)?);
    /// opt.step(&grads)?;
    /// opt.step(&grads)?;
    /// assert!(opt.step(&grads).is_err()); // the third in a row
    /// assert_eq!((opt.skipped_steps()?, opt.consecutive_skips()?), (2, 2));
    /// # Ok(()) }
    /// ```
    pub fn with_max_consecutive_skips(mut self, limit: usize) -> Self {
        self.skip.max_consecutive_skips = Some(limit);
        self
    }

    /// The limit on non-finite steps skipped in a row, if any.
    ///
    /// ```
    /// use candle_nn::{Optimizer, SGD};
    /// use candle_grad_clip::{ClipSetting, Clipped, ClippedConfig};
    /// let opt = Clipped::<SGD>::new(vec![], ClippedConfig::new(0.1, ClipSetting::norm(1.0)))?;
    /// assert_eq!(opt.max_consecutive_skips(), None);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn max_consecutive_skips(&self) -> Option<usize> {
        self.skip.max_consecutive_skips
    }

    /// The non-finite steps skipped in a row up to the last step (0 when the last step ran):
    /// what a loop reacts to, e.g. by lowering the learning rate. A `Result` as on the fused
    /// optimizers (which keep it on the device); here it is known on the host.
    ///
    /// ```
    /// use candle_nn::{Optimizer, SGD};
    /// use candle_grad_clip::{ClipSetting, Clipped, ClippedConfig};
    /// let opt = Clipped::<SGD>::new(vec![], ClippedConfig::new(0.1, ClipSetting::norm(1.0)))?;
    /// assert_eq!(opt.consecutive_skips()?, 0);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn consecutive_skips(&self) -> Result<u64> {
        Ok(self.skip_run)
    }

    /// Whether the last step was skipped (`false` before the first step).
    ///
    /// ```
    /// use candle_nn::{Optimizer, SGD};
    /// use candle_grad_clip::{ClipSetting, Clipped, ClippedConfig};
    /// let opt = Clipped::<SGD>::new(vec![], ClippedConfig::new(0.1, ClipSetting::norm(1.0)))?;
    /// assert!(!opt.last_step_skipped()?);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn last_step_skipped(&self) -> Result<bool> {
        Ok(self.skip_run > 0)
    }

    /// Steps skipped because a gradient was not finite (see
    /// [`with_skip_nonfinite`](Self::with_skip_nonfinite)). A `Result` as on the fused
    /// optimizers, whose counters live on the device.
    ///
    /// ```
    /// use candle_nn::{Optimizer, SGD};
    /// use candle_grad_clip::{ClipSetting, Clipped, ClippedConfig};
    /// let opt = Clipped::<SGD>::new(vec![], ClippedConfig::new(0.1, ClipSetting::norm(1.0)))?;
    /// assert_eq!(opt.skipped_steps()?, 0);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn skipped_steps(&self) -> Result<u64> {
        Ok(self.skipped)
    }

    /// The norm of the last step's gradients before clipping, as a 0-d tensor on their device
    /// (`None` before the first step). Which norm: see the type's documentation.
    ///
    /// ```
    /// use candle_core::{Device, Tensor, Var, backprop::GradStore};
    /// use candle_nn::{Optimizer, SGD};
    /// use candle_grad_clip::{ClipSetting, Clipped, ClippedConfig};
    /// # fn main() -> candle_core::Result<()> {
    /// let w = Var::new(&[0f32, 0.], &Device::Cpu)?;
    /// let mut opt = Clipped::<SGD>::new(vec![w.clone()], ClippedConfig::new(1.0, ClipSetting::norm(1.0)))?;
    /// assert!(opt.last_norm().is_none());
    /// let mut grads = GradStore::default();
    /// grads.insert(&w, Tensor::new(&[3f32, 4.], &Device::Cpu)?);
    /// opt.step(&grads)?;
    /// assert_eq!(opt.last_norm().unwrap().to_scalar::<f32>()?, 5.0);
    /// // The caller's gradients were clipped in place, and SGD stepped on them.
    /// let g = grads.get(&w).unwrap().to_vec1::<f32>()?;
    /// assert!((g[0] - 0.6).abs() < 1e-6);
    /// assert!((w.to_vec1::<f32>()?[0] + 0.6).abs() < 1e-6);
    /// # Ok(()) }
    /// ```
    pub fn last_norm(&self) -> Option<&Tensor> {
        self.last_norm.as_ref()
    }

    /// How many steps were taken (skipped ones not counted). A `Result` as on the fused
    /// optimizers, whose counters live on the device.
    ///
    /// ```
    /// use candle_nn::{Optimizer, SGD};
    /// use candle_grad_clip::{ClipSetting, Clipped, ClippedConfig};
    /// let opt = Clipped::<SGD>::new(vec![], ClippedConfig::new(0.1, ClipSetting::norm(1.0)))?;
    /// assert_eq!(opt.steps()?, 0);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn steps(&self) -> Result<u64> {
        Ok(self.steps)
    }

    /// How many steps were clipped (see the type's documentation for the definition). Reads the
    /// lazily kept count: on CUDA, one host synchronisation.
    ///
    /// ```
    /// use candle_core::{Device, Tensor, Var, backprop::GradStore};
    /// use candle_nn::{Optimizer, SGD};
    /// use candle_grad_clip::{ClipSetting, Clipped, ClippedConfig};
    /// # fn main() -> candle_core::Result<()> {
    /// let w = Var::new(&[0f32, 0.], &Device::Cpu)?;
    /// let mut opt = Clipped::<SGD>::new(vec![w.clone()], ClippedConfig::new(0.1, ClipSetting::value(1.0)))?;
    /// for g in [[0.5f32, -0.5], [3., 0.]] {
    ///     let mut grads = GradStore::default();
    ///     grads.insert(&w, Tensor::new(&g, &Device::Cpu)?);
    ///     opt.step(&grads)?;
    /// }
    /// assert_eq!((opt.steps()?, opt.clipped_steps()?), (2, 1));
    /// # Ok(()) }
    /// ```
    pub fn clipped_steps(&self) -> Result<u64> {
        let unclipped = match &self.unclipped {
            Some(count) => u64::from(count.to_scalar::<u32>()?),
            None => 0,
        };
        Ok(self.steps.saturating_sub(unclipped))
    }

    /// The clip setting (for `AutoClip`, with its current history).
    ///
    /// ```
    /// use candle_nn::{Optimizer, SGD};
    /// use candle_grad_clip::{ClipSetting, Clipped, ClippedConfig};
    /// let opt = Clipped::<SGD>::new(vec![], ClippedConfig::new(0.1, ClipSetting::value(2.0)))?;
    /// assert!(matches!(opt.clip_setting(), ClipSetting::Value { clip_value } if *clip_value == 2.0));
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn clip_setting(&self) -> &ClipSetting {
        &self.clip
    }

    /// Changes the clip setting from the next step on (e.g. to a threshold chosen with
    /// [`GradNormStats::suggest_max_norm`](crate::GradNormStats::suggest_max_norm)). An invalid
    /// setting is refused and the old one kept. The step count and clip count go on.
    ///
    /// ```
    /// use candle_nn::{Optimizer, SGD};
    /// use candle_grad_clip::{ClipSetting, Clipped, ClippedConfig};
    /// let mut opt = Clipped::<SGD>::new(vec![], ClippedConfig::new(0.1, ClipSetting::norm(f64::INFINITY)))?;
    /// opt.set_clip_setting(ClipSetting::norm(2.0))?;
    /// assert!(opt.set_clip_setting(ClipSetting::norm(f64::NAN)).is_err());
    /// assert!(matches!(opt.clip_setting(), ClipSetting::Norm(clip) if clip.max_norm() == 2.0));
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn set_clip_setting(&mut self, clip: ClipSetting) -> Result<()> {
        clip.validate()?;
        self.clip = clip;
        Ok(())
    }

    /// The vars that are clipped (the float vars given at construction, each once).
    ///
    /// ```
    /// use candle_core::{DType, Device, Var};
    /// use candle_nn::{Optimizer, SGD};
    /// use candle_grad_clip::{ClipSetting, Clipped, ClippedConfig};
    /// let w = Var::zeros(2, DType::F32, &Device::Cpu)?;
    /// let opt = Clipped::<SGD>::new(vec![w.clone(), w], ClippedConfig::new(0.1, ClipSetting::norm(1.0)))?;
    /// assert_eq!(opt.vars().len(), 1);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn vars(&self) -> &[Var] {
        &self.vars
    }

    /// The inner optimizer.
    ///
    /// ```
    /// use candle_nn::{Optimizer, SGD};
    /// use candle_grad_clip::{ClipSetting, Clipped, ClippedConfig};
    /// let opt = Clipped::<SGD>::new(vec![], ClippedConfig::new(0.1, ClipSetting::norm(1.0)))?;
    /// assert_eq!(opt.inner().learning_rate(), 0.1);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn inner(&self) -> &O {
        &self.inner
    }

    /// The inner optimizer, mutably (e.g. to change AdamW's params).
    ///
    /// ```
    /// use candle_nn::{Optimizer, SGD};
    /// use candle_grad_clip::{ClipSetting, Clipped, ClippedConfig};
    /// let mut opt = Clipped::<SGD>::new(vec![], ClippedConfig::new(0.1, ClipSetting::norm(1.0)))?;
    /// opt.inner_mut().set_learning_rate(0.01);
    /// assert_eq!(opt.learning_rate(), 0.01);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn inner_mut(&mut self) -> &mut O {
        &mut self.inner
    }

    /// Unwraps the inner optimizer.
    ///
    /// ```
    /// use candle_nn::{Optimizer, SGD};
    /// use candle_grad_clip::{ClipSetting, Clipped, ClippedConfig};
    /// let opt = Clipped::<SGD>::new(vec![], ClippedConfig::new(0.1, ClipSetting::norm(1.0)))?;
    /// let sgd: SGD = opt.into_inner();
    /// assert_eq!(sgd.learning_rate(), 0.1);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn into_inner(self) -> O {
        self.inner
    }
}
