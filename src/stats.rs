//! Seeing what the gradients do: the norm of each named gradient ([`grad_norms`]) and statistics of
//! the total norm over training ([`GradNormStats`]).

use candle_core::{backprop::GradStore, bail, DType, Result, Tensor, Var};
use candle_nn::VarMap;

use crate::dispatch;
use crate::ops::gradients::GradientSet;
use crate::ops::norm_type::NormType;
use crate::ops::varmap::sorted_vars;

/// The norm of the gradient of every named var of `varmap`, sorted by name, so that you can see
/// which layer's gradient explodes. Vars without a gradient in `grads` are left out.
///
/// Each norm is taken over that var's gradient alone (as [`total_norm`](crate::total_norm) of one var) and read back
/// to the host as `f32`. On CUDA all of them come from one reduction over every gradient and one
/// more small launch, read in one transfer (one synchronisation), so call it for monitoring, not
/// on every step of a fast loop; gradients whose norm may need the overflow rescue (F64 gradients
/// or `p > 6`) are taken one at a time.
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use candle_nn::{linear, Module, VarBuilder, VarMap};
/// use candle_grad_clip::{grad_norms, NormType};
/// # fn main() -> candle_core::Result<()> {
/// let varmap = VarMap::new();
/// let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
/// let model = linear(3, 2, vb.pp("fc"))?;
/// let x = Tensor::ones((4, 3), DType::F32, &Device::Cpu)?;
/// let grads = model.forward(&x)?.sum_all()?.backward()?;
/// let norms = grad_norms(&varmap, &grads, NormType::L2)?;
/// assert_eq!(norms.len(), 2);
/// assert_eq!(norms[0].0, "fc.bias"); // sorted by name
/// assert_eq!(norms[0].1, 4.0 * 2f32.sqrt()); // d(sum)/d(bias) = 4 for each of 2 outputs
/// assert_eq!(norms[1].0, "fc.weight");
/// # Ok(()) }
/// ```
pub fn grad_norms(
    varmap: &VarMap,
    grads: &GradStore,
    norm_type: NormType,
) -> Result<Vec<(String, f32)>> {
    norm_type.validate()?;
    let mut named = sorted_vars(varmap, "grad_norms")?;
    named.retain(|(_, var)| grads.get(var.as_tensor()).is_some());
    let vars: Vec<Var> = named.iter().map(|(_, var)| var.clone()).collect();
    let set = GradientSet::collect(&vars, grads)?;
    let norms = dispatch::norm::tensor_norms(&set, norm_type)?;
    Ok(named.into_iter().map(|(name, _)| name).zip(norms).collect())
}

/// Total gradient norms recorded step by step, with their count, mean, standard deviation,
/// minimum, maximum and quantiles.
///
/// [`record`](Self::record) keeps the 0-d norm tensor as it is (on CUDA: no host synchronisation);
/// the values are read to the host, all in one transfer, only when a statistic is asked for, which
/// is why those methods take `&mut self`. Every recorded value is kept: 8 bytes a step once read, and until then the 0-d tensor itself (on
/// CUDA a small device allocation each), so read a statistic now and then in long runs.
///
/// Non-finite norms (NaN, ±inf: a step that blew up) are counted by [`count`](Self::count) and
/// [`nonfinite`](Self::nonfinite) but left out of every statistic, so one bad step does not turn
/// them all into NaN. The statistics fail with an error while no finite norm has been recorded.
///
/// Definitions, as numpy's defaults: [`std`](Self::std) is the population standard deviation
/// (`ddof = 0`); [`quantile`](Self::quantile)`(q)` interpolates linearly between the closest
/// ranks: with the `n` finite values sorted as `x[0] <= … <= x[n-1]` and `h = (n - 1) q`, it is
/// `x[⌊h⌋] + (h - ⌊h⌋) (x[⌊h⌋ + 1] - x[⌊h⌋])` (numpy's `method="linear"`).
///
/// ```
/// use candle_core::{Device, Tensor};
/// use candle_grad_clip::GradNormStats;
/// # fn main() -> candle_core::Result<()> {
/// let mut stats = GradNormStats::new();
/// for norm in [1f32, 2., 3., 4.] {
///     stats.record(&Tensor::new(norm, &Device::Cpu)?)?;
/// }
/// assert_eq!(stats.count(), 4);
/// assert_eq!(stats.mean()?, 2.5);
/// assert_eq!(stats.quantile(0.5)?, 2.5);
/// assert!((stats.quantile(0.9)? - 3.7).abs() < 1e-12);
/// assert_eq!((stats.min()?, stats.max()?), (1.0, 4.0));
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Default)]
pub struct GradNormStats {
    /// Recorded but not yet read.
    pending: Vec<Tensor>,
    /// Read, in recording order (non-finite ones included).
    values: Vec<f64>,
    /// The finite values, sorted; rebuilt lazily after new reads.
    sorted: Vec<f64>,
    sorted_valid: bool,
}

impl GradNormStats {
    /// An empty record.
    ///
    /// ```
    /// let stats = candle_grad_clip::GradNormStats::new();
    /// assert_eq!(stats.count(), 0);
    /// ```
    pub fn new() -> Self {
        Self::default()
    }

    /// Records one total norm: a 0-d float tensor such as [`clip_grad_norm_`](crate::clip_grad_norm_)
    /// or [`Clipped::last_norm`](crate::Clipped::last_norm) return. Reads nothing; anything else is
    /// refused and nothing is recorded.
    ///
    /// ```
    /// use candle_core::{Device, Tensor};
    /// let mut stats = candle_grad_clip::GradNormStats::new();
    /// stats.record(&Tensor::new(3f32, &Device::Cpu)?)?;
    /// assert!(stats.record(&Tensor::new(&[1f32, 2.], &Device::Cpu)?).is_err());
    /// assert_eq!(stats.count(), 1);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn record(&mut self, norm: &Tensor) -> Result<()> {
        if norm.rank() != 0 {
            bail!(
                "GradNormStats::record: expected a 0-d norm tensor, got shape {:?}",
                norm.dims()
            )
        }
        if !norm.dtype().is_float() {
            bail!(
                "GradNormStats::record: expected a float norm tensor, got {:?}",
                norm.dtype()
            )
        }
        self.pending.push(norm.clone());
        Ok(())
    }

    /// How many norms were recorded (finite or not). Reads nothing.
    ///
    /// ```
    /// assert_eq!(candle_grad_clip::GradNormStats::new().count(), 0);
    /// ```
    pub fn count(&self) -> u64 {
        (self.values.len() + self.pending.len()) as u64
    }

    /// How many recorded norms are NaN or infinite.
    ///
    /// ```
    /// use candle_core::{Device, Tensor};
    /// let mut stats = candle_grad_clip::GradNormStats::new();
    /// stats.record(&Tensor::new(f32::NAN, &Device::Cpu)?)?;
    /// stats.record(&Tensor::new(2f32, &Device::Cpu)?)?;
    /// assert_eq!(stats.nonfinite()?, 1);
    /// assert_eq!(stats.mean()?, 2.0);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn nonfinite(&mut self) -> Result<u64> {
        self.read_pending()?;
        Ok(self.values.iter().filter(|v| !v.is_finite()).count() as u64)
    }

    /// All recorded norms in recording order, read to the host (non-finite ones included).
    ///
    /// ```
    /// use candle_core::{Device, Tensor};
    /// let mut stats = candle_grad_clip::GradNormStats::new();
    /// stats.record(&Tensor::new(0.5f64, &Device::Cpu)?)?;
    /// assert_eq!(stats.values()?, [0.5]);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn values(&mut self) -> Result<&[f64]> {
        self.read_pending()?;
        Ok(&self.values)
    }

    /// Mean of the finite norms.
    ///
    /// ```
    /// use candle_core::{Device, Tensor};
    /// let mut stats = candle_grad_clip::GradNormStats::new();
    /// assert!(stats.mean().is_err()); // nothing recorded yet
    /// stats.record(&Tensor::new(4f32, &Device::Cpu)?)?;
    /// assert_eq!(stats.mean()?, 4.0);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn mean(&mut self) -> Result<f64> {
        let sorted = self.sorted()?;
        Ok(mean_of(sorted))
    }

    /// Population standard deviation (`ddof = 0`) of the finite norms.
    ///
    /// ```
    /// use candle_core::{Device, Tensor};
    /// let mut stats = candle_grad_clip::GradNormStats::new();
    /// for norm in [1f32, 3.] { stats.record(&Tensor::new(norm, &Device::Cpu)?)?; }
    /// assert_eq!(stats.std()?, 1.0);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn std(&mut self) -> Result<f64> {
        let sorted = self.sorted()?;
        let mean = mean_of(sorted);
        let var = sorted.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / sorted.len() as f64;
        Ok(var.sqrt())
    }

    /// Smallest finite norm.
    ///
    /// ```
    /// use candle_core::{Device, Tensor};
    /// let mut stats = candle_grad_clip::GradNormStats::new();
    /// for norm in [3f32, 1.] { stats.record(&Tensor::new(norm, &Device::Cpu)?)?; }
    /// assert_eq!(stats.min()?, 1.0);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn min(&mut self) -> Result<f64> {
        Ok(self.sorted()?[0])
    }

    /// Largest finite norm.
    ///
    /// ```
    /// use candle_core::{Device, Tensor};
    /// let mut stats = candle_grad_clip::GradNormStats::new();
    /// for norm in [3f32, 1.] { stats.record(&Tensor::new(norm, &Device::Cpu)?)?; }
    /// assert_eq!(stats.max()?, 3.0);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn max(&mut self) -> Result<f64> {
        let sorted = self.sorted()?;
        Ok(sorted[sorted.len() - 1])
    }

    /// The `q`-quantile of the finite norms, `q` in `[0, 1]`, by linear interpolation between the
    /// closest ranks (numpy's default; see the type's documentation).
    ///
    /// ```
    /// use candle_core::{Device, Tensor};
    /// let mut stats = candle_grad_clip::GradNormStats::new();
    /// for norm in [10f32, 20., 30.] { stats.record(&Tensor::new(norm, &Device::Cpu)?)?; }
    /// assert_eq!(stats.quantile(0.25)?, 15.0);
    /// assert!(stats.quantile(1.5).is_err());
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn quantile(&mut self, q: f64) -> Result<f64> {
        if !(0.0..=1.0).contains(&q) {
            bail!("GradNormStats::quantile: q must be in [0, 1], got {q}")
        }
        let sorted = self.sorted()?;
        Ok(quantile_linear(sorted.len(), q, |i| sorted[i]))
    }

    /// A starting value for `max_norm`: the mean of the recorded finite norms.
    ///
    /// The usual recipe: train for a while (a few hundred steps, or an epoch) *without* clipping,
    /// record every total norm, and clip at about their average, so that ordinary steps pass
    /// untouched and only the outliers are scaled down. Its limits: the mean is pulled up by the
    /// very spikes it is meant to catch (look at [`quantile`](Self::quantile)`(0.5)` too when the
    /// run had spikes); gradient norms drift during training (usually down), so a value measured
    /// early clips less and less later; and it is a scale, not an optimum — tune from there, or
    /// let [`AutoClip`](crate::AutoClip) follow the drift.
    ///
    /// ```
    /// use candle_core::{Device, Tensor};
    /// let mut stats = candle_grad_clip::GradNormStats::new();
    /// for norm in [0.8f32, 1.0, 1.2] { stats.record(&Tensor::new(norm, &Device::Cpu)?)?; }
    /// assert!((stats.suggest_max_norm()? - 1.0).abs() < 1e-6);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn suggest_max_norm(&mut self) -> Result<f64> {
        self.mean()
    }

    /// Reads every pending tensor to the host: one transfer when they share a device and dtype.
    fn read_pending(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let first = &self.pending[0];
        let uniform = self
            .pending
            .iter()
            .all(|t| t.device().same_device(first.device()) && t.dtype() == first.dtype());
        let read: Vec<f64> = if uniform {
            Tensor::stack(&self.pending, 0)?
                .to_dtype(DType::F64)?
                .to_vec1::<f64>()?
        } else {
            self.pending
                .iter()
                .map(|t| t.to_dtype(DType::F64)?.to_scalar::<f64>())
                .collect::<Result<_>>()?
        };
        // Only now that every read succeeded does the state change.
        self.pending.clear();
        self.values.extend(read);
        self.sorted_valid = false;
        Ok(())
    }

    fn sorted(&mut self) -> Result<&[f64]> {
        self.read_pending()?;
        if !self.sorted_valid {
            self.sorted.clear();
            self.sorted
                .extend(self.values.iter().copied().filter(|v| v.is_finite()));
            self.sorted.sort_by(f64::total_cmp);
            self.sorted_valid = true;
        }
        if self.sorted.is_empty() {
            bail!(
                "GradNormStats: no finite norm recorded yet ({} recorded)",
                self.values.len()
            )
        }
        Ok(&self.sorted)
    }
}

fn mean_of(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len() as f64
}

/// The `q`-quantile (`q` in `[0, 1]`) of `n >= 1` sorted values given by `at(i)`, interpolating
/// linearly between the closest ranks (numpy's default `method="linear"`).
pub(crate) fn quantile_linear(n: usize, q: f64, at: impl Fn(usize) -> f64) -> f64 {
    debug_assert!(n >= 1);
    let h = (n - 1) as f64 * q;
    let lo = (h.floor() as usize).min(n - 1);
    let hi = (lo + 1).min(n - 1);
    let (a, b) = (at(lo), at(hi));
    let frac = h - lo as f64;
    if frac == 0.0 {
        a
    } else {
        a + frac * (b - a)
    }
}
