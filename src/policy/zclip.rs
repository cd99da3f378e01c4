//! ZClip: z-score adaptive clipping (Kumar, Owen, Roy Chowdhury & Güra, 2025, "ZClip: Adaptive
//! Spike Mitigation for LLM Pre-Training").
//!
//! The statistics live in one small `F64` tensor on the gradients' device (see [`word`]), updated
//! by `grad_clip_zclip` in `kernels/grad_clip.cu` on CUDA and under the emulation, and by
//! [`update`] (its CPU twin, the reference) on the CPU: the same operations in the same order, so
//! the two agree bitwise.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{backprop::GradStore, bail, DType, Device, Result, Tensor, Var};

use crate::dispatch;
use crate::io::state_file::{self, StateDictReader};
use crate::ops::gradients::GradientSet;
use crate::ops::zclip::{input, update_on_host, word, ZClipParams, ZCLIP_EPS};

/// What ZClip clips a spike to (the reference's `clip_option`).
///
/// ```
/// use candle_grad_clip::{ZClip, ZClipMode};
/// let zclip = ZClip::new().with_mode(ZClipMode::Mean);
/// assert_eq!(zclip.mode(), ZClipMode::Mean);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ZClipMode {
    /// `μ + z_thr·σ / (z / z_thr)`: the larger the spike, the harder it is clipped (the default).
    #[default]
    AdaptiveScaling,
    /// The EMA mean `μ`.
    Mean,
}

/// [`ZClip`]'s statistics of the global norm after its warm-up
/// ([`ZClip::statistics`]).
///
/// ```
/// let stats = candle_grad_clip::ZClipStatistics { mean: 2.0, std: 1.0 };
/// assert_eq!(stats.mean + 2.5 * stats.std, 4.5); // the norm a z threshold of 2.5 starts at
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ZClipStatistics {
    /// The EMA mean μ of the norm.
    pub mean: f64,
    /// The EMA standard deviation σ of the norm (the square root of its EMA variance).
    pub std: f64,
}

/// ZClip, z-score adaptive gradient clipping (Kumar et al., 2025): an EMA of the global L2 norm
/// and of its variance detects spikes, and a spike is clipped towards the mean, the harder the
/// larger it is.
///
/// The order of each step, as the paper's reference implementation (`zclip.py`) does it, with
/// `n` the global L2 norm before clipping:
/// 1. **Warm-up.** The first `warmup_steps` (25) finite norms are collected and not ZClip-clipped;
///    only `max_grad_norm` applies, with [`clip_grad_norm_`](crate::clip_grad_norm_)'s coefficient
///    `min(1, max_grad_norm / (n + 1e-6))`. After the last of them, their mean and population
///    variance initialise `μ` and `σ²`.
/// 2. **Detection.** `σ = sqrt(σ²)`, `z = (n − μ) / (σ + 1e-6)`. If `z > z_threshold` (2.5) the
///    threshold is `μ + z_threshold·σ / (z / z_threshold)` ([`ZClipMode::AdaptiveScaling`]) or `μ`
///    ([`ZClipMode::Mean`]); otherwise there is none.
/// 3. **Clipping.** The effective threshold is the ZClip threshold (or `n`), capped by
///    `max_grad_norm` when set (off by default). If `n` exceeds it, the gradients are multiplied by
///    `effective / (n + 1e-6)`; otherwise they are left bitwise untouched.
/// 4. **Statistics.** With `x` the ZClip threshold when there was one, else `n` (never the
///    `max_grad_norm`-capped value): first `μ ← α·μ + (1−α)·x`, then `σ² ← α·σ² + (1−α)·(x − μ)²`
///    with the new `μ` (α = 0.97).
///
/// A NaN or infinite norm neither enters the statistics nor counts as a warm-up step; the
/// gradients then behave as under `clip_grad_norm_` with `max_grad_norm` (or no bound): NaN
/// poisons them, unless the optimizer skips non-finite steps.
///
/// **On the device.** The statistics are a small `F64` tensor on the gradients' device, updated
/// by one single-thread kernel between the norm's reduction and the scaling pass; nothing is read
/// back to the host (on CUDA, a ZClip step has no host synchronisation). Reading them
/// ([`statistics`](Self::statistics), [`state_dict`](Self::state_dict)) is one transfer.
///
/// Use it as a [`ClipSetting`](crate::ClipSetting) of [`Clipped`](crate::Clipped),
/// [`FusedAdamW`](crate::FusedAdamW) or [`FusedSgd`](crate::FusedSgd), or directly with
/// [`clip_`](Self::clip_):
///
/// ```
/// use candle_core::{Device, Tensor, Var, backprop::GradStore};
/// use candle_grad_clip::ZClip;
/// # fn main() -> candle_core::Result<()> {
/// let w = Var::new(&[0f32, 0.], &Device::Cpu)?;
/// let mut zclip = ZClip::new().with_warmup_steps(3);
/// for (i, scale) in [1.0f32, 1.1, 0.9, 1.0, 100.0].into_iter().enumerate() {
///     let mut grads = GradStore::default();
///     grads.insert(&w, Tensor::new(&[3f32 * scale, 4. * scale], &Device::Cpu)?);
///     let norm = zclip.clip_(&[w.clone()], &mut grads)?.to_scalar::<f32>()?;
///     let after = grads.get(&w).unwrap().sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
///     if i < 4 {
///         assert_eq!(after, norm); // warm-up, then an ordinary norm: untouched
///     } else {
///         assert!(norm > 499.0 && after < 10.0); // the spike is clipped near the mean (5)
///     }
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct ZClip {
    alpha: f64,
    z_threshold: f64,
    warmup_steps: usize,
    mode: ZClipMode,
    max_grad_norm: Option<f64>,
    /// The statistics ([`word`] layout), created at the first step on the gradients' device.
    /// Replaced, never written in place, by each step: a clone keeps its own statistics.
    state: Option<Tensor>,
}

impl Default for ZClip {
    /// [`ZClip::new`].
    ///
    /// ```
    /// assert_eq!(candle_grad_clip::ZClip::default().warmup_steps(), 25);
    /// ```
    fn default() -> Self {
        Self::new()
    }
}

impl ZClip {
    /// The most warm-up steps a ZClip takes: its statistics keep one `f64` per warm-up norm (8
    /// MiB at this bound; the paper uses 25).
    ///
    /// ```
    /// use candle_grad_clip::ZClip;
    /// assert!(ZClip::new().with_warmup_steps(ZClip::MAX_WARMUP_STEPS).validate().is_ok());
    /// assert!(ZClip::new().with_warmup_steps(ZClip::MAX_WARMUP_STEPS + 1).validate().is_err());
    /// ```
    pub const MAX_WARMUP_STEPS: usize = 1 << 20;

    /// The reference's defaults: α = 0.97, z threshold 2.5, 25 warm-up steps,
    /// [`ZClipMode::AdaptiveScaling`], no `max_grad_norm`.
    ///
    /// ```
    /// let zclip = candle_grad_clip::ZClip::new();
    /// assert_eq!((zclip.alpha(), zclip.z_threshold(), zclip.warmup_steps()), (0.97, 2.5, 25));
    /// assert_eq!(zclip.max_grad_norm(), None);
    /// ```
    pub fn new() -> Self {
        Self {
            alpha: 0.97,
            z_threshold: 2.5,
            warmup_steps: 25,
            mode: ZClipMode::AdaptiveScaling,
            max_grad_norm: None,
            state: None,
        }
    }

    /// Sets the EMA factor α, in `(0, 1)` (checked on use, as every setting).
    ///
    /// ```
    /// assert_eq!(candle_grad_clip::ZClip::new().with_alpha(0.9).alpha(), 0.9);
    /// ```
    pub fn with_alpha(mut self, alpha: f64) -> Self {
        self.alpha = alpha;
        self
    }

    /// Sets the z-score above which a norm is a spike, `> 0`.
    ///
    /// ```
    /// assert_eq!(candle_grad_clip::ZClip::new().with_z_threshold(3.0).z_threshold(), 3.0);
    /// ```
    pub fn with_z_threshold(mut self, z_threshold: f64) -> Self {
        self.z_threshold = z_threshold;
        self
    }

    /// Sets how many finite norms initialise the statistics, in
    /// `1..=`[`MAX_WARMUP_STEPS`](Self::MAX_WARMUP_STEPS). Setting it starts the statistics
    /// afresh.
    ///
    /// ```
    /// assert_eq!(candle_grad_clip::ZClip::new().with_warmup_steps(10).warmup_steps(), 10);
    /// ```
    pub fn with_warmup_steps(mut self, warmup_steps: usize) -> Self {
        self.warmup_steps = warmup_steps;
        self.state = None;
        self
    }

    /// Sets what a spike is clipped to.
    ///
    /// ```
    /// use candle_grad_clip::{ZClip, ZClipMode};
    /// assert_eq!(ZClip::new().with_mode(ZClipMode::Mean).mode(), ZClipMode::Mean);
    /// ```
    pub fn with_mode(mut self, mode: ZClipMode) -> Self {
        self.mode = mode;
        self
    }

    /// Sets a fixed bound on the norm after ZClip (and during the warm-up), `>= 0`; off by
    /// default.
    ///
    /// ```
    /// let zclip = candle_grad_clip::ZClip::new().with_max_grad_norm(1.0);
    /// assert_eq!(zclip.max_grad_norm(), Some(1.0));
    /// ```
    pub fn with_max_grad_norm(mut self, max_grad_norm: f64) -> Self {
        self.max_grad_norm = Some(max_grad_norm);
        self
    }

    /// The EMA factor α.
    ///
    /// ```
    /// assert_eq!(candle_grad_clip::ZClip::new().alpha(), 0.97);
    /// ```
    pub fn alpha(&self) -> f64 {
        self.alpha
    }

    /// The z-score threshold.
    ///
    /// ```
    /// assert_eq!(candle_grad_clip::ZClip::new().z_threshold(), 2.5);
    /// ```
    pub fn z_threshold(&self) -> f64 {
        self.z_threshold
    }

    /// The number of warm-up steps.
    ///
    /// ```
    /// assert_eq!(candle_grad_clip::ZClip::new().warmup_steps(), 25);
    /// ```
    pub fn warmup_steps(&self) -> usize {
        self.warmup_steps
    }

    /// What a spike is clipped to.
    ///
    /// ```
    /// use candle_grad_clip::{ZClip, ZClipMode};
    /// assert_eq!(ZClip::new().mode(), ZClipMode::AdaptiveScaling);
    /// ```
    pub fn mode(&self) -> ZClipMode {
        self.mode
    }

    /// `max_grad_norm`, if set.
    ///
    /// ```
    /// assert_eq!(candle_grad_clip::ZClip::new().max_grad_norm(), None);
    /// ```
    pub fn max_grad_norm(&self) -> Option<f64> {
        self.max_grad_norm
    }

    /// Checks the settings: α in `(0, 1)`, `z_threshold > 0`, `warmup_steps` in
    /// `1..=`[`MAX_WARMUP_STEPS`](Self::MAX_WARMUP_STEPS), `max_grad_norm >= 0`, nothing NaN.
    /// The error names the setting.
    ///
    /// ```
    /// use candle_grad_clip::ZClip;
    /// assert!(ZClip::new().validate().is_ok());
    /// assert!(ZClip::new().with_alpha(1.0).validate().is_err());
    /// assert!(ZClip::new().with_z_threshold(f64::NAN).validate().is_err());
    /// assert!(ZClip::new().with_max_grad_norm(-1.0).validate().is_err());
    /// ```
    pub fn validate(&self) -> Result<()> {
        if !(self.alpha > 0.0 && self.alpha < 1.0) {
            bail!("ZClip: alpha must be in (0, 1), got {}", self.alpha)
        }
        if self.z_threshold.is_nan() || self.z_threshold <= 0.0 {
            bail!(
                "ZClip: z_threshold must be > 0 (and not NaN), got {}",
                self.z_threshold
            )
        }
        if self.warmup_steps == 0 {
            bail!("ZClip: warmup_steps must be at least 1 (the statistics start from the warm-up norms)")
        }
        if self.warmup_steps > Self::MAX_WARMUP_STEPS {
            bail!(
                "ZClip: warmup_steps must be at most {} (one f64 of state per warm-up norm), got {}",
                Self::MAX_WARMUP_STEPS,
                self.warmup_steps
            )
        }
        if let Some(m) = self.max_grad_norm {
            if m.is_nan() || m < 0.0 {
                bail!("ZClip: max_grad_norm must be >= 0 (and not NaN), got {m}")
            }
        }
        Ok(())
    }

    pub(crate) fn params(&self) -> ZClipParams {
        ZClipParams {
            alpha: self.alpha,
            z_threshold: self.z_threshold,
            mean_mode: self.mode == ZClipMode::Mean,
            max_grad_norm: self.max_grad_norm.unwrap_or(f64::INFINITY),
        }
    }

    /// The statistics tensor on `device` (created, or moved there once).
    pub(crate) fn state_on(&self, device: &Device) -> Result<Tensor> {
        match &self.state {
            Some(s) if s.device().same_device(device) => Ok(s.clone()),
            Some(s) => s.to_device(device),
            None => {
                self.validate()?;
                Tensor::zeros(word::HEADER + self.warmup_steps, DType::F64, device)
            }
        }
    }

    /// Takes the statistics a step computed.
    pub(crate) fn set_state(&mut self, state: Tensor) {
        self.state = Some(state);
    }

    /// ZClip's step for a norm measured elsewhere (the exact global norm across ranks, of norm
    /// dtype `dtype`): the statistics are read to the host (one transfer), updated by the CPU
    /// twin and put back on `device`. Returns the clip as the `(norm, max_norm, eps)` of
    /// `clip_grads_with_norm_` whose coefficient is ZClip's: `(1, c, 0)` for a finite norm
    /// (`min(1, c / 1) = c`), `(norm, max_grad_norm or inf, 1e-6)` for a non-finite one (as
    /// `clip_grad_norm_` treats it).
    pub(crate) fn step_for_norm(
        &mut self,
        norm: f64,
        dtype: DType,
        device: &Device,
    ) -> Result<(f64, f64, f64)> {
        let state = self.state_on(device)?.to_device(&Device::Cpu)?;
        let (c, state) = update_on_host(norm, dtype, &state, &self.params())?;
        self.state = Some(state.to_device(device)?);
        let input = input(norm, dtype);
        Ok(if input.is_finite() {
            (1.0, c, 0.0)
        } else {
            (input, self.params().max_grad_norm, ZCLIP_EPS)
        })
    }

    /// The statistics as the host sees them (one transfer), `None` before the first step.
    fn words(&self) -> Result<Option<Vec<f64>>> {
        match &self.state {
            Some(s) => Ok(Some(s.to_device(&Device::Cpu)?.to_vec1::<f64>()?)),
            None => Ok(None),
        }
    }

    /// Clips the gradients of `vars` in place (see the type's documentation) and returns their
    /// global L2 norm before clipping, as a 0-d tensor on their device. On CUDA nothing is read
    /// back. Settings are checked first; on an error nothing changes. A call without any gradient
    /// changes nothing (and returns a 0 norm).
    ///
    /// ```
    /// use candle_core::{Device, Tensor, Var, backprop::GradStore};
    /// # fn main() -> candle_core::Result<()> {
    /// let w = Var::new(&[0f32, 0.], &Device::Cpu)?;
    /// let mut grads = GradStore::default();
    /// grads.insert(&w, Tensor::new(&[30f32, 40.], &Device::Cpu)?);
    /// // During the warm-up only max_grad_norm clips.
    /// let mut zclip = candle_grad_clip::ZClip::new().with_max_grad_norm(5.0);
    /// assert_eq!(zclip.clip_(&[w.clone()], &mut grads)?.to_scalar::<f32>()?, 50.0);
    /// let g = grads.get(&w).unwrap().to_vec1::<f32>()?;
    /// assert!((g[0] - 3.0).abs() < 1e-5 && (g[1] - 4.0).abs() < 1e-5);
    /// # Ok(()) }
    /// ```
    pub fn clip_(&mut self, vars: &[Var], grads: &mut GradStore) -> Result<Tensor> {
        self.validate()?;
        let set = GradientSet::collect(vars, grads)?;
        if set.grads().is_empty() {
            return Tensor::new(0f32, &Device::Cpu);
        }
        let state = self.state_on(set.device())?;
        let (norm, state) = dispatch::zclip::clip_zclip(&set, &state, &self.params())?;
        self.state = Some(state);
        Ok(norm)
    }

    /// The current statistics (the EMA mean μ and standard deviation σ of the norm) after the
    /// warm-up, `None` before (or before the first step). Reads the device (one transfer).
    ///
    /// ```
    /// use candle_core::{Device, Tensor, Var, backprop::GradStore};
    /// # fn main() -> candle_core::Result<()> {
    /// let w = Var::new(&[0f64], &Device::Cpu)?;
    /// let mut zclip = candle_grad_clip::ZClip::new().with_warmup_steps(2);
    /// for g in [1.0f64, 3.0] {
    ///     let mut grads = GradStore::default();
    ///     grads.insert(&w, Tensor::new(&[g], &Device::Cpu)?);
    ///     zclip.clip_(&[w.clone()], &mut grads)?;
    /// }
    /// let stats = zclip.statistics()?.unwrap();
    /// assert_eq!((stats.mean, stats.std), (2.0, 1.0)); // mean 2, population std 1
    /// # Ok(()) }
    /// ```
    pub fn statistics(&self) -> Result<Option<ZClipStatistics>> {
        Ok(self.words()?.and_then(|w| {
            (w[word::READY] != 0.0).then(|| ZClipStatistics {
                mean: w[word::MEAN],
                std: w[word::VAR].sqrt(),
            })
        }))
    }

    /// The coefficient the last step multiplied the gradients by (1 when they were left
    /// untouched), `None` before the first step. Reads the device (one transfer).
    ///
    /// ```
    /// assert_eq!(candle_grad_clip::ZClip::new().last_coefficient()?, None);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn last_coefficient(&self) -> Result<Option<f64>> {
        Ok(self.words()?.map(|w| w[word::LAST_COEFFICIENT]))
    }

    /// The last coefficient as a 0-d `F64` tensor on the device (for lazy clip counts).
    pub(crate) fn last_coefficient_tensor(&self) -> Result<Option<Tensor>> {
        self.state
            .as_ref()
            .map(|s| s.narrow(0, word::LAST_COEFFICIENT, 1)?.squeeze(0))
            .transpose()
    }

    /// The state a bitwise resume needs, as CPU tensors: `ready` (0-d `U8`: the warm-up is over),
    /// `mean` and `var` (0-d `F64`: μ and σ²), `warmup_norms` (1-D `F64`: the norms collected so
    /// far in the warm-up). The settings are not state. Reads the device (one transfer).
    ///
    /// ```
    /// let state = candle_grad_clip::ZClip::new().state_dict()?;
    /// assert_eq!(state["warmup_norms"].dims(), [0]);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn state_dict(&self) -> Result<HashMap<String, Tensor>> {
        let w = match self.words()? {
            Some(w) => w,
            None => {
                self.validate()?;
                vec![0.0; word::HEADER + self.warmup_steps]
            }
        };
        let collected = if w[word::READY] != 0.0 {
            0
        } else {
            w[word::COLLECTED] as usize
        };
        let cpu = &Device::Cpu;
        let mut dict = HashMap::new();
        dict.insert(
            "ready".to_string(),
            Tensor::new(u8::from(w[word::READY] != 0.0), cpu)?,
        );
        dict.insert("mean".to_string(), Tensor::new(w[word::MEAN], cpu)?);
        dict.insert("var".to_string(), Tensor::new(w[word::VAR], cpu)?);
        dict.insert(
            "warmup_norms".to_string(),
            Tensor::new(&w[word::HEADER..word::HEADER + collected], cpu)?,
        );
        Ok(dict)
    }

    /// Loads a state from [`state_dict`](Self::state_dict), checked whole first: an entry missing,
    /// unknown, of the wrong dtype or shape, or more warm-up norms than `warmup_steps`, is an error
    /// and nothing changes.
    ///
    /// ```
    /// use candle_grad_clip::ZClip;
    /// let mut state = ZClip::new().state_dict()?;
    /// let mut zclip = ZClip::new();
    /// zclip.load_state_dict(&state)?;
    /// state.remove("mean");
    /// assert!(zclip.load_state_dict(&state).is_err());
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn load_state_dict(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        self.validate()?;
        let reader = StateDictReader {
            dict: state,
            caller: "ZClip::load_state_dict",
        };
        let ready = reader.get("ready", DType::U8, 0)?.to_scalar::<u8>()? != 0;
        let mean = reader.get("mean", DType::F64, 0)?.to_scalar::<f64>()?;
        let var = reader.get("var", DType::F64, 0)?.to_scalar::<f64>()?;
        let norms = reader
            .get("warmup_norms", DType::F64, 1)?
            .to_vec1::<f64>()?;
        reader.refuse_unknown(&["ready", "mean", "var", "warmup_norms"])?;
        if norms.len() >= self.warmup_steps || (ready && !norms.is_empty()) {
            bail!(
                "ZClip::load_state_dict: {} warm-up norms{} do not fit warmup_steps = {}; nothing was loaded",
                norms.len(),
                if ready { " after the warm-up" } else { "" },
                self.warmup_steps
            )
        }
        if norms.iter().any(|x| !x.is_finite())
            || !mean.is_finite()
            || !var.is_finite()
            || var < 0.0
        {
            bail!("ZClip::load_state_dict: the statistics are not finite; nothing was loaded")
        }
        let mut w = vec![0.0; word::HEADER + self.warmup_steps];
        w[word::READY] = f64::from(u8::from(ready));
        w[word::COLLECTED] = if ready {
            self.warmup_steps as f64
        } else {
            norms.len() as f64
        };
        w[word::MEAN] = mean;
        w[word::VAR] = var;
        w[word::LAST_COEFFICIENT] = 1.0;
        w[word::HEADER..word::HEADER + norms.len()].copy_from_slice(&norms);
        let device = self
            .state
            .as_ref()
            .map_or(Device::Cpu, |s| s.device().clone());
        self.state = Some(Tensor::new(w, &device)?);
        Ok(())
    }

    /// Saves [`state_dict`](Self::state_dict) as a safetensors file, atomically, with the SHA-256
    /// of every tensor and of its header.
    ///
    /// ```no_run
    /// candle_grad_clip::ZClip::new().save_state("zclip.safetensors")?;
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn save_state(&self, path: impl AsRef<Path>) -> Result<()> {
        state_file::save(&self.state_dict()?, "ZClip", path.as_ref())
    }

    /// Loads a state saved by [`save_state`](Self::save_state), as
    /// [`load_state_dict`](Self::load_state_dict), after verifying the file: a damaged file
    /// (a digest that does not match), one without digests or one of another kind is an error.
    ///
    /// ```no_run
    /// let mut zclip = candle_grad_clip::ZClip::new();
    /// zclip.load_state("zclip.safetensors")?;
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn load_state(&mut self, path: impl AsRef<Path>) -> Result<()> {
        let dict = state_file::load(path.as_ref(), "ZClip")?;
        self.load_state_dict(&dict)
    }
}
