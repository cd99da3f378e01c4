//! [`Clipped`]: any candle optimizer, with gradient clipping before every step.

use std::collections::HashSet;

use candle_core::{backprop::GradStore, bail, DType, Result, Tensor, Var};
use candle_nn::Optimizer;

use crate::gradients::check_matches_var;
use crate::policy::autoclip::{self, AutoClip};
use crate::{
    clip_grad_value_, clip_grads_with_norm_, total_norm, total_norm_across, ClipGradNorm, NormType,
    ProcessGroup, DEFAULT_EPS,
};

/// How [`Clipped`] clips the gradients before each step.
///
/// ```
/// use candle_grad_clip::{AutoClip, ClipSetting, NormType};
/// let by_norm = ClipSetting::norm(1.0); // global L2 norm at most 1
/// let by_inf_norm = ClipSetting::Norm { max_norm: 0.5, norm_type: NormType::Inf };
/// let by_value = ClipSetting::value(0.1); // every element in [-0.1, 0.1]
/// let adaptive = ClipSetting::AutoClip(AutoClip::default()); // 10th percentile of the history
/// assert!(ClipSetting::norm(-1.0).validate().is_err());
/// # let _ = (by_norm, by_inf_norm, by_value, adaptive);
/// ```
#[derive(Debug, Clone)]
pub enum ClipSetting {
    /// Scale all gradients together so that their global norm is at most `max_norm`, as
    /// [`ClipGradNorm`] does (with its default `eps = 1e-6`).
    Norm {
        /// Largest allowed global norm, `>= 0` (`f64::INFINITY` never clips).
        max_norm: f64,
        /// The norm to measure and bound.
        norm_type: NormType,
    },
    /// Clamp every gradient element into `[-clip_value, clip_value]`, as [`clip_grad_value_`].
    Value {
        /// The bound, `>= 0`.
        clip_value: f64,
    },
    /// Clip the global L2 norm to a percentile of the norms seen so far (see [`AutoClip`]).
    AutoClip(AutoClip),
}

impl ClipSetting {
    /// Global L2-norm clipping to `max_norm`.
    ///
    /// ```
    /// use candle_grad_clip::{ClipSetting, NormType};
    /// assert!(matches!(
    ///     ClipSetting::norm(1.0),
    ///     ClipSetting::Norm { max_norm, norm_type: NormType::L2 } if max_norm == 1.0
    /// ));
    /// ```
    pub fn norm(max_norm: f64) -> Self {
        ClipSetting::Norm {
            max_norm,
            norm_type: NormType::L2,
        }
    }

    /// Value clipping to `[-clip_value, clip_value]`.
    ///
    /// ```
    /// assert!(candle_grad_clip::ClipSetting::value(0.5).validate().is_ok());
    /// ```
    pub fn value(clip_value: f64) -> Self {
        ClipSetting::Value { clip_value }
    }

    /// Checks the setting: `max_norm` and `clip_value` must be `>= 0` (not NaN), the norm type
    /// valid, the AutoClip percentile in `(0, 100]`.
    ///
    /// ```
    /// use candle_grad_clip::{ClipSetting, NormType};
    /// assert!(ClipSetting::value(f64::NAN).validate().is_err());
    /// let bad_p = ClipSetting::Norm { max_norm: 1.0, norm_type: NormType::P(0.0) };
    /// assert!(bad_p.validate().is_err());
    /// ```
    pub fn validate(&self) -> Result<()> {
        match self {
            ClipSetting::Norm {
                max_norm,
                norm_type,
            } => ClipGradNorm::new(*max_norm)
                .norm_type(*norm_type)
                .validate(),
            ClipSetting::Value { clip_value } => {
                if clip_value.is_nan() || *clip_value < 0.0 {
                    bail!("clip_value must be >= 0, got {clip_value}")
                }
                Ok(())
            }
            ClipSetting::AutoClip(autoclip) => autoclip::validate_percentile(autoclip.percentile()),
        }
    }
}

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
/// clipping, in the norm that the setting bounds: its `norm_type` for `Norm`, L2 for `AutoClip`,
/// the infinity norm (largest `|g|`) for `Value`. It stays a 0-d tensor on the gradients' device:
/// nothing is read to the host unless you read it.
///
/// **Counting clipped steps.** A step counts as clipped when the clip changed the gradients:
/// for `Norm` and `AutoClip` when the coefficient `threshold / (norm + 1e-6)` was below 1 (a NaN
/// or infinite norm counts as clipped); for `Value` when some element's magnitude exceeded
/// `clip_value` (or was NaN). The count is kept lazily, as a 0-d tensor on the gradients' device
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
    inner: O,
    /// The vars to clip: the float vars given to `new`, each once.
    vars: Vec<Var>,
    clip: ClipSetting,
    steps: usize,
    last_norm: Option<Tensor>,
    /// 0-d `U32` on the gradients' device: steps that were *not* clipped.
    unclipped: Option<Tensor>,
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
    /// each rank's own gradients (its `last_norm` is the global largest `|g|`). Every rank must
    /// step together with the same setting.
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

    fn step_with(&mut self, grads: &GradStore, group: Option<&dyn ProcessGroup>) -> Result<()> {
        // `GradStore` cannot be cloned or mutated through `&`, but its tensors are shared
        // handles: a new store holding the same tensors, clipped in place, clips the caller's.
        let mut view = GradStore::default();
        for (i, var) in self.vars.iter().enumerate() {
            if let Some(grad) = grads.get(var.as_tensor()) {
                // What the inner optimizer would refuse after we clipped: refuse it before
                // (across ranks, after telling the other ranks, which fail with it).
                if let Err(e) = check_matches_var("Clipped::step", i, var, grad) {
                    if let Some(group) = group {
                        let norm_type = match &self.clip {
                            ClipSetting::Norm { norm_type, .. } => *norm_type,
                            ClipSetting::Value { .. } => NormType::Inf,
                            ClipSetting::AutoClip(_) => NormType::L2,
                        };
                        crate::dist::set_norm_across("step_across", Err(e), norm_type, group)?;
                        return unreachable_failure();
                    }
                    return Err(e);
                }
                view.insert(var.as_tensor(), grad.clone());
            }
        }
        // AutoClip's history changes with the clip; put it back if the inner step fails.
        let saved_clip = matches!(self.clip, ClipSetting::AutoClip(_)).then(|| self.clip.clone());
        let (norm, threshold, eps) = match &mut self.clip {
            ClipSetting::Norm {
                max_norm,
                norm_type,
            } => {
                let clip = ClipGradNorm::new(*max_norm).norm_type(*norm_type);
                let norm = match group {
                    Some(group) => clip.clip_across_(&self.vars, &mut view, group)?,
                    None => clip.clip_(&self.vars, &mut view)?,
                };
                (norm, *max_norm, DEFAULT_EPS)
            }
            ClipSetting::Value { clip_value } => {
                let norm = match group {
                    Some(group) => total_norm_across(&self.vars, &view, NormType::Inf, group)?,
                    None => total_norm(&self.vars, &view, NormType::Inf)?,
                };
                clip_grad_value_(&self.vars, &mut view, *clip_value)?;
                (norm, *clip_value, 0.0)
            }
            ClipSetting::AutoClip(autoclip) => match group {
                Some(group) => {
                    // As `AutoClip::clip_`, with the global norm.
                    let norm = total_norm_across(&self.vars, &view, NormType::L2, group)?;
                    let value = norm.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                    let threshold = autoclip.threshold_with(value);
                    clip_grads_with_norm_(&self.vars, &mut view, threshold, &norm)?;
                    autoclip.record(value);
                    (norm, threshold, DEFAULT_EPS)
                }
                None => {
                    let (norm, threshold) = autoclip.clip_with_threshold_(&self.vars, &mut view)?;
                    (norm, threshold, DEFAULT_EPS)
                }
            },
        };
        if let Err(e) = self.inner.step(grads) {
            if let Some(clip) = saved_clip {
                self.clip = clip;
            }
            return Err(e);
        }
        self.count(&norm, threshold, eps)?;
        self.steps += 1;
        self.last_norm = Some(norm);
        Ok(())
    }
}

/// `dist::set_norm_across` always fails for a rank that reports a failure.
fn unreachable_failure() -> Result<()> {
    bail!("internal error: a refused rank's collective did not fail")
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
    /// assert_eq!(opt.steps(), 0);
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
        }
    }

    /// Adds this step to the lazy count of unclipped steps, on the norm's device.
    fn count(&mut self, norm: &Tensor, threshold: f64, eps: f64) -> Result<()> {
        let device = match &self.unclipped {
            Some(count) => count.device().clone(),
            None => norm.device().clone(),
        };
        let norm = norm.to_device(&device)?.to_dtype(DType::F64)?;
        let not_clipped = if threshold == f64::INFINITY {
            // An infinite threshold never clips; only a NaN norm (NaN coefficient) writes.
            norm.eq(&norm)?
        } else {
            // Not clipped iff norm + eps - threshold <= 0 (false for NaN, and for inf - inf).
            let margin = norm.affine(1.0, eps - threshold)?;
            margin.le(&margin.zeros_like()?)?
        }
        .to_dtype(DType::U32)?;
        self.unclipped = Some(match &self.unclipped {
            Some(count) => (count + not_clipped)?,
            None => not_clipped,
        });
        Ok(())
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

    /// How many steps were taken.
    ///
    /// ```
    /// use candle_nn::{Optimizer, SGD};
    /// use candle_grad_clip::{ClipSetting, Clipped, ClippedConfig};
    /// let opt = Clipped::<SGD>::new(vec![], ClippedConfig::new(0.1, ClipSetting::norm(1.0)))?;
    /// assert_eq!(opt.steps(), 0);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn steps(&self) -> usize {
        self.steps
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
    /// assert_eq!((opt.steps(), opt.clipped_steps()?), (2, 1));
    /// # Ok(()) }
    /// ```
    pub fn clipped_steps(&self) -> Result<usize> {
        let unclipped = match &self.unclipped {
            Some(count) => count.to_scalar::<u32>()? as usize,
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
    /// assert!(matches!(opt.clip_setting(), ClipSetting::Norm { max_norm, .. } if *max_norm == 2.0));
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
