//! Norm clipping: [`total_norm`], [`clip_grad_norm_`], [`clip_grads_with_norm_`] and the
//! [`ClipGradNorm`] builder (its methods across processes are in `clip::across`).

use candle_core::{backprop::GradStore, bail, Result, Tensor, Var};

use crate::dispatch;
use crate::ops::clip::{nonfinite_error, ClipSettings, DEFAULT_EPS};
use crate::ops::gradients::GradientSet;
use crate::ops::norm_type::NormType;

/// The norm of all gradients of `vars` viewed as one vector, without modifying them.
///
/// Vars without a gradient in `grads` are skipped. Returns a 0-d tensor on the gradients'
/// device: `F64` when every gradient is `F64`, else `F32`; a 0-d `F32` zero on the CPU when no
/// var has a gradient. Accumulates in `f64`, bitwise the same whatever the order of `vars`.
/// With `error_if_nonfinite` (PyTorch's `get_total_norm`), a NaN or infinite norm is an error
/// (one host read of the norm).
///
/// ```
/// use candle_core::{Device, Tensor, Var, backprop::GradStore};
/// use candle_grad_clip::{total_norm, NormType};
/// # fn main() -> candle_core::Result<()> {
/// let w = Var::new(&[0f32, 0.], &Device::Cpu)?;
/// let mut grads = GradStore::default();
/// grads.insert(&w, Tensor::new(&[3f32, 4.], &Device::Cpu)?);
/// let norm = total_norm(&[w.clone()], &grads, NormType::L2, false)?;
/// assert_eq!(norm.to_scalar::<f32>()?, 5.0);
/// grads.insert(&w, Tensor::new(&[f32::NAN, 4.], &Device::Cpu)?);
/// assert!(total_norm(&[w], &grads, NormType::L2, true).is_err());
/// # Ok(()) }
/// ```
pub fn total_norm(
    vars: &[Var],
    grads: &GradStore,
    norm_type: NormType,
    error_if_nonfinite: bool,
) -> Result<Tensor> {
    norm_type.validate()?;
    let set = GradientSet::collect(vars, grads)?;
    let norm = dispatch::norm::total_norm(&set, norm_type)?;
    if error_if_nonfinite {
        let value = norm.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
        if !value.is_finite() {
            return Err(nonfinite_error(value, norm_type));
        }
    }
    Ok(norm)
}

/// Rescales the gradients of `vars` in place so that their global L2 norm is at most `max_norm`,
/// and returns the norm before clipping (see [`total_norm`] for its dtype and device).
///
/// The same as `ClipGradNorm::new(max_norm).clip_(vars, grads)`; use [`ClipGradNorm`] for the
/// other norms, `eps` and `error_if_nonfinite`. The gradients are multiplied by
/// `min(1, max_norm / (norm + 1e-6))` and are not touched at all when that is 1.
///
/// ```
/// use candle_core::{Device, Tensor, Var, backprop::GradStore};
/// use candle_grad_clip::clip_grad_norm_;
/// # fn main() -> candle_core::Result<()> {
/// let w = Var::new(&[0f32, 0.], &Device::Cpu)?;
/// let mut grads = GradStore::default();
/// grads.insert(&w, Tensor::new(&[30f32, 40.], &Device::Cpu)?);
/// let norm = clip_grad_norm_(&[w.clone()], &mut grads, 1.0)?;
/// assert_eq!(norm.to_scalar::<f32>()?, 50.0);
/// let g = grads.get(&w).unwrap().to_vec1::<f32>()?;
/// assert!((g[0] - 0.6).abs() < 1e-6 && (g[1] - 0.8).abs() < 1e-6);
/// # Ok(()) }
/// ```
pub fn clip_grad_norm_(vars: &[Var], grads: &mut GradStore, max_norm: f64) -> Result<Tensor> {
    ClipGradNorm::new(max_norm).clip_(vars, grads)
}

/// Scales the gradients of `vars` in place by `min(1, max_norm / (total_norm + 1e-6))`, with a
/// norm computed earlier by [`total_norm`] (for example over several models, or all-reduced
/// across devices). `total_norm` must be a 0-d float tensor on the gradients' device.
///
/// ```
/// use candle_core::{Device, Tensor, Var, backprop::GradStore};
/// use candle_grad_clip::{clip_grads_with_norm_, total_norm, NormType};
/// # fn main() -> candle_core::Result<()> {
/// let w = Var::new(&[0f32, 0.], &Device::Cpu)?;
/// let mut grads = GradStore::default();
/// grads.insert(&w, Tensor::new(&[3f32, 4.], &Device::Cpu)?);
/// let vars = [w.clone()];
/// let norm = total_norm(&vars, &grads, NormType::L2, false)?;
/// clip_grads_with_norm_(&vars, &mut grads, 2.5, &norm)?;
/// let g = grads.get(&w).unwrap().to_vec1::<f32>()?;
/// assert!((g[0] - 1.5).abs() < 1e-5);
/// # Ok(()) }
/// ```
pub fn clip_grads_with_norm_(
    vars: &[Var],
    grads: &mut GradStore,
    max_norm: f64,
    total_norm: &Tensor,
) -> Result<()> {
    ClipGradNorm::new(max_norm).clip_grads_with_norm_(vars, grads, total_norm)
}

/// [`clip_grads_with_norm_`] with any `eps`, unchecked (for the policies that express their
/// coefficient as a given norm: ZClip across ranks).
pub(crate) fn scale_with_given_norm(
    vars: &[Var],
    grads: &mut GradStore,
    max_norm: f64,
    eps: f64,
    total_norm: &Tensor,
) -> Result<()> {
    let set = GradientSet::collect(vars, grads)?;
    if set.grads().is_empty() {
        return Ok(());
    }
    dispatch::clip::scale_with_norm(&set, max_norm, eps, total_norm)
}

/// Global-norm clipping with every option, builder style.
///
/// Defaults: `NormType::L2`, `eps = 1e-6`, `error_if_nonfinite = false` (PyTorch's defaults).
///
/// ```
/// use candle_core::{Device, Tensor, Var, backprop::GradStore};
/// use candle_grad_clip::{ClipGradNorm, NormType};
/// # fn main() -> candle_core::Result<()> {
/// let w = Var::new(&[0f32, 0.], &Device::Cpu)?;
/// let mut grads = GradStore::default();
/// grads.insert(&w, Tensor::new(&[-8f32, 2.], &Device::Cpu)?);
/// let norm = ClipGradNorm::new(4.0)
///     .with_norm_type(NormType::Inf)
///     .with_error_if_nonfinite(true)
///     .with_eps(0.0)
///     .clip_(&[w.clone()], &mut grads)?;
/// assert_eq!(norm.to_scalar::<f32>()?, 8.0);
/// assert_eq!(grads.get(&w).unwrap().to_vec1::<f32>()?, [-4.0, 1.0]);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClipGradNorm {
    max_norm: f64,
    norm_type: NormType,
    error_if_nonfinite: bool,
    eps: f64,
}

impl ClipGradNorm {
    /// The default `eps` added to the norm before dividing, as in PyTorch.
    ///
    /// ```
    /// assert_eq!(candle_grad_clip::ClipGradNorm::DEFAULT_EPS, 1e-6);
    /// ```
    pub const DEFAULT_EPS: f64 = DEFAULT_EPS;

    /// Clipping to a global norm of at most `max_norm` (checked when clipping: it must be `>= 0`).
    ///
    /// ```
    /// let clip = candle_grad_clip::ClipGradNorm::new(1.0);
    /// assert_eq!(clip.max_norm(), 1.0);
    /// ```
    pub fn new(max_norm: f64) -> Self {
        Self {
            max_norm,
            norm_type: NormType::L2,
            error_if_nonfinite: false,
            eps: DEFAULT_EPS,
        }
    }

    /// The norm to measure and bound (default `L2`).
    ///
    /// ```
    /// use candle_grad_clip::{ClipGradNorm, NormType};
    /// assert!(ClipGradNorm::new(1.0).with_norm_type(NormType::P(0.0)).validate().is_err());
    /// ```
    pub fn with_norm_type(mut self, norm_type: NormType) -> Self {
        self.norm_type = norm_type;
        self
    }

    /// When set, a NaN or infinite total norm is an error and no gradient is modified. On CUDA
    /// this costs one host synchronisation to read the norm.
    ///
    /// ```
    /// use candle_core::{Device, Tensor, Var, backprop::GradStore};
    /// use candle_grad_clip::ClipGradNorm;
    /// # fn main() -> candle_core::Result<()> {
    /// let w = Var::new(&[0f32], &Device::Cpu)?;
    /// let mut grads = GradStore::default();
    /// grads.insert(&w, Tensor::new(&[f32::NAN], &Device::Cpu)?);
    /// let err = ClipGradNorm::new(1.0).with_error_if_nonfinite(true).clip_(&[w], &mut grads);
    /// assert!(err.is_err());
    /// # Ok(()) }
    /// ```
    pub fn with_error_if_nonfinite(mut self, error_if_nonfinite: bool) -> Self {
        self.error_if_nonfinite = error_if_nonfinite;
        self
    }

    /// Added to the norm before dividing (default `1e-6`); must be finite and `>= 0`.
    ///
    /// ```
    /// use candle_grad_clip::ClipGradNorm;
    /// assert!(ClipGradNorm::new(1.0).with_eps(0.0).validate().is_ok());
    /// assert!(ClipGradNorm::new(1.0).with_eps(-1.0).validate().is_err());
    /// ```
    pub fn with_eps(mut self, eps: f64) -> Self {
        self.eps = eps;
        self
    }

    /// The maximum norm.
    ///
    /// ```
    /// assert_eq!(candle_grad_clip::ClipGradNorm::new(0.5).max_norm(), 0.5);
    /// ```
    pub fn max_norm(&self) -> f64 {
        self.max_norm
    }

    /// The norm measured and bounded.
    ///
    /// ```
    /// use candle_grad_clip::{ClipGradNorm, NormType};
    /// assert_eq!(ClipGradNorm::new(1.0).norm_type(), NormType::L2);
    /// assert_eq!(ClipGradNorm::new(1.0).with_norm_type(NormType::Inf).norm_type(), NormType::Inf);
    /// ```
    pub fn norm_type(&self) -> NormType {
        self.norm_type
    }

    /// Whether a non-finite total norm is an error.
    ///
    /// ```
    /// let clip = candle_grad_clip::ClipGradNorm::new(1.0);
    /// assert!(!clip.error_if_nonfinite());
    /// assert!(clip.with_error_if_nonfinite(true).error_if_nonfinite());
    /// ```
    pub fn error_if_nonfinite(&self) -> bool {
        self.error_if_nonfinite
    }

    /// The `eps` added to the norm before dividing.
    ///
    /// ```
    /// use candle_grad_clip::ClipGradNorm;
    /// assert_eq!(ClipGradNorm::new(1.0).eps(), ClipGradNorm::DEFAULT_EPS);
    /// assert_eq!(ClipGradNorm::new(1.0).with_eps(0.0).eps(), 0.0);
    /// ```
    pub fn eps(&self) -> f64 {
        self.eps
    }

    /// Checks every setting; `clip_` calls this before touching anything.
    ///
    /// ```
    /// use candle_grad_clip::ClipGradNorm;
    /// assert!(ClipGradNorm::new(f64::NAN).validate().is_err());
    /// assert!(ClipGradNorm::new(-1.0).validate().is_err());
    /// ```
    pub fn validate(&self) -> Result<()> {
        validate_max_norm(self.max_norm)?;
        validate_eps(self.eps)?;
        self.norm_type.validate()
    }

    /// Clips the gradients of `vars` in place and returns their norm before clipping.
    ///
    /// ```
    /// use candle_core::{Device, Tensor, Var, backprop::GradStore};
    /// use candle_grad_clip::{ClipGradNorm, NormType};
    /// # fn main() -> candle_core::Result<()> {
    /// let w = Var::new(&[0f32, 0.], &Device::Cpu)?;
    /// let mut grads = GradStore::default();
    /// grads.insert(&w, Tensor::new(&[3f32, -4.], &Device::Cpu)?);
    /// let norm = ClipGradNorm::new(3.5).with_norm_type(NormType::L1).clip_(&[w.clone()], &mut grads)?;
    /// assert_eq!(norm.to_scalar::<f32>()?, 7.0);
    /// let g = grads.get(&w).unwrap().to_vec1::<f32>()?;
    /// assert!((g[0] - 1.5).abs() < 1e-5 && (g[1] + 2.0).abs() < 1e-5);
    /// # Ok(()) }
    /// ```
    pub fn clip_(&self, vars: &[Var], grads: &mut GradStore) -> Result<Tensor> {
        self.validate()?;
        let set = GradientSet::collect(vars, grads)?;
        if set.grads().is_empty() {
            return Tensor::new(0f32, &candle_core::Device::Cpu);
        }
        dispatch::clip::clip_norm(&set, self.settings())
    }

    /// [`clip_grads_with_norm_`](crate::clip_grads_with_norm_) with this clip's `max_norm` and
    /// `eps`: scales the gradients of `vars` in place by `min(1, max_norm / (total_norm + eps))`,
    /// with a norm computed before (by [`total_norm`](crate::total_norm), possibly across
    /// devices); with `error_if_nonfinite`, a non-finite `total_norm` is an error (one host read).
    /// The norm type is not used: `total_norm` was already measured.
    ///
    /// ```
    /// use candle_core::{Device, Tensor, Var, backprop::GradStore};
    /// use candle_grad_clip::{total_norm, ClipGradNorm, NormType};
    /// # fn main() -> candle_core::Result<()> {
    /// let w = Var::new(&[0f32, 0.], &Device::Cpu)?;
    /// let mut grads = GradStore::default();
    /// grads.insert(&w, Tensor::new(&[3f32, 4.], &Device::Cpu)?);
    /// let vars = [w.clone()];
    /// let norm = total_norm(&vars, &grads, NormType::L2, false)?;
    /// ClipGradNorm::new(2.5).with_eps(0.0).clip_grads_with_norm_(&vars, &mut grads, &norm)?;
    /// assert_eq!(grads.get(&w).unwrap().to_vec1::<f32>()?, [1.5, 2.0]);
    /// # Ok(()) }
    /// ```
    pub fn clip_grads_with_norm_(
        &self,
        vars: &[Var],
        grads: &mut GradStore,
        total_norm: &Tensor,
    ) -> Result<()> {
        self.validate()?;
        if total_norm.rank() != 0 {
            bail!(
                "clip_grads_with_norm_: total_norm must be a 0-d tensor (as returned by total_norm), got shape {:?}",
                total_norm.dims()
            )
        }
        if !total_norm.dtype().is_float() {
            bail!(
                "clip_grads_with_norm_: total_norm must be a float tensor, got {:?}",
                total_norm.dtype()
            )
        }
        let set = GradientSet::collect(vars, grads)?;
        if set.grads().is_empty() {
            return Ok(());
        }
        if !total_norm.device().same_device(set.device()) {
            bail!(
                "clip_grads_with_norm_: total_norm is on {:?} but the gradients are on {:?}",
                total_norm.device().location(),
                set.device().location()
            )
        }
        if self.error_if_nonfinite {
            let value = total_norm
                .to_dtype(candle_core::DType::F64)?
                .to_scalar::<f64>()?;
            if !value.is_finite() {
                return Err(nonfinite_error(value, self.norm_type));
            }
        }
        dispatch::clip::scale_with_norm(&set, self.max_norm, self.eps, total_norm)
    }

    /// The settings as the back ends take them (not validated).
    pub(crate) fn settings(&self) -> ClipSettings {
        ClipSettings {
            norm_type: self.norm_type,
            max_norm: self.max_norm,
            eps: self.eps,
            error_if_nonfinite: self.error_if_nonfinite,
        }
    }
}

fn validate_max_norm(max_norm: f64) -> Result<()> {
    if max_norm.is_nan() || max_norm < 0.0 {
        bail!("max_norm must be >= 0, got {max_norm}")
    }
    Ok(())
}

fn validate_eps(eps: f64) -> Result<()> {
    if !(eps.is_finite() && eps >= 0.0) {
        bail!("eps must be finite and >= 0, got {eps}")
    }
    Ok(())
}
