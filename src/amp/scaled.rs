//! [`ScaledOptimizer`]: how [`GradScaler`](crate::GradScaler) tells a fused optimizer (or a
//! wrapper around one) from any other, through a trait rather than a downcast.

use candle_core::{backprop::GradStore, Device, Result, Tensor, Var};
use candle_nn::Optimizer;

use crate::dist::ProcessGroup;
use crate::optim::clip_setting::ClipSetting;
use crate::optim::clipped::Clipped;
use crate::optim::fused::api::{Fused, FusedRule};

/// What [`GradScaler::step`](crate::GradScaler::step) needs of a fused optimizer.
pub(crate) trait FusedStep {
    fn vars(&self) -> &[Var];
    fn device(&self) -> &Device;
    fn clip(&self) -> Option<&ClipSetting>;
    fn has_skip_limit(&self) -> bool;
    fn skipped_steps_on_device(&self) -> Result<Tensor>;
    fn step_skipping(&mut self, grads: &GradStore, prescale: Option<&Tensor>) -> Result<()>;
    fn step_skipping_across(&mut self, grads: &GradStore, group: &dyn ProcessGroup) -> Result<()>;
    fn record_skip(&mut self) -> Result<()>;
}

impl<R: FusedRule> FusedStep for Fused<R> {
    fn vars(&self) -> &[Var] {
        self.core().vars()
    }
    fn device(&self) -> &Device {
        self.core().device()
    }
    fn clip(&self) -> Option<&ClipSetting> {
        self.core().clip()
    }
    fn has_skip_limit(&self) -> bool {
        self.core().has_skip_limit()
    }
    fn skipped_steps_on_device(&self) -> Result<Tensor> {
        self.core().skipped_steps_on_device()
    }
    fn step_skipping(&mut self, grads: &GradStore, prescale: Option<&Tensor>) -> Result<()> {
        self.step_skipping_nonfinite(grads, prescale)
    }
    fn step_skipping_across(&mut self, grads: &GradStore, group: &dyn ProcessGroup) -> Result<()> {
        self.step_skipping_nonfinite_across(grads, group)
    }
    fn record_skip(&mut self) -> Result<()> {
        Fused::record_skip(self)
    }
}

/// An optimizer [`GradScaler::step`](crate::GradScaler::step) and
/// [`GradScaler::step_across`](crate::GradScaler::step_across) drive: implemented for
/// candle's `SGD` and `AdamW`, for [`Clipped`](crate::Clipped), and for the fused optimizers,
/// which take the scaler's fused path (the gradients unscaled as the step reads them, found-inf
/// decided on the device). Any other optimizer implements it with an empty `impl` (the plain
/// path: one host read of found-inf per step, and `step` called only when the gradients are
/// finite); one from another crate through a newtype. A newtype around a fused optimizer
/// forwards [`fused`](Self::fused) to keep the fused path.
///
/// ```
/// use candle_core::{backprop::GradStore, Result, Var};
/// use candle_nn::Optimizer;
/// use candle_grad_clip::{FusedAdamW, FusedHandle, GradScaler, ScaledOptimizer};
///
/// /// A user's wrapper around a fused optimizer (say, with a learning-rate schedule).
/// struct Scheduled(FusedAdamW);
///
/// impl Optimizer for Scheduled {
///     type Config = candle_nn::ParamsAdamW;
///     fn new(vars: Vec<Var>, config: Self::Config) -> Result<Self> {
///         Ok(Self(FusedAdamW::new(vars, config)?))
///     }
///     fn step(&mut self, grads: &GradStore) -> Result<()> {
///         self.0.step(grads)
///     }
///     fn learning_rate(&self) -> f64 {
///         self.0.learning_rate()
///     }
///     fn set_learning_rate(&mut self, lr: f64) {
///         self.0.set_learning_rate(lr)
///     }
/// }
///
/// impl ScaledOptimizer for Scheduled {
///     fn fused(&mut self) -> Option<FusedHandle<'_>> {
///         self.0.fused() // the scaler's fused path, as for FusedAdamW itself
///     }
/// }
/// # fn main() -> Result<()> {
/// let w = Var::new(&[1f32, 2.0], &candle_core::Device::Cpu)?;
/// let mut opt = Scheduled::new(vec![w.clone()], Default::default())?;
/// let mut scaler = GradScaler::new();
/// let grads = scaler.scale(&w.as_tensor().sum_all()?)?.backward()?;
/// scaler.step(&mut opt, &grads)?;
/// scaler.update()?;
/// assert_eq!(opt.0.steps()?, 1);
/// # Ok(()) }
/// ```
pub trait ScaledOptimizer: Optimizer {
    /// The fused optimizer this one is or wraps, for the scaler's fused path; `None` (the
    /// default) for the plain path.
    ///
    /// ```
    /// use candle_nn::Optimizer;
    /// use candle_grad_clip::ScaledOptimizer;
    /// let mut sgd = candle_nn::SGD::new(vec![], 0.1)?;
    /// assert!(sgd.fused().is_none());
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    fn fused(&mut self) -> Option<FusedHandle<'_>> {
        None
    }
}

/// A fused optimizer lent to a [`GradScaler`](crate::GradScaler) ([`ScaledOptimizer::fused`]);
/// opaque.
///
/// ```
/// use candle_grad_clip::ScaledOptimizer;
/// let mut opt = candle_grad_clip::FusedSgd::new_named(vec![], Default::default())?;
/// assert!(opt.fused().is_some());
/// # Ok::<(), candle_core::Error>(())
/// ```
pub struct FusedHandle<'a>(pub(crate) &'a mut dyn FusedStep);

impl std::fmt::Debug for FusedHandle<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FusedHandle")
            .field("vars", &self.0.vars().len())
            .finish()
    }
}

impl<R: FusedRule> ScaledOptimizer for Fused<R> {
    fn fused(&mut self) -> Option<FusedHandle<'_>> {
        Some(FusedHandle(self))
    }
}

impl ScaledOptimizer for candle_nn::SGD {}

impl ScaledOptimizer for candle_nn::AdamW {}

impl<O: Optimizer> ScaledOptimizer for Clipped<O> {}
