//! AutoClip: clip to a percentile of the gradient norms seen so far.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{backprop::GradStore, bail, DType, Device, Result, Tensor, Var};

use crate::clip::norm::{clip_grads_with_norm_, total_norm};
use crate::io::state_file::{self, StateDictReader};
use crate::ops::norm_type::NormType;
use crate::stats::quantile_linear;

/// Adaptive gradient clipping (Seetharaman, Wichern, Pardo & Le Roux, 2020, "AutoClip: Adaptive
/// Gradient Clipping for Source Separation Networks"): before each step, clip the global L2 norm
/// to the `p`-th percentile of all gradient norms seen so far, the current one included (as in
/// the paper's reference code, which appends the norm to its history and then calls
/// `np.percentile`). The paper's default is `p = 10`, which is [`AutoClip::default`].
///
/// The percentile interpolates linearly between the closest ranks, like `np.percentile` (see
/// [`GradNormStats`](crate::GradNormStats)). Non-finite norms are not added to the history; when
/// there is no finite norm at all the threshold is `+inf` (nothing is clipped, but a NaN norm
/// still turns the gradients to NaN, as [`clip_grad_norm_`](crate::clip_grad_norm_) does).
///
/// **Bounded memory.** The first `capacity` norms (default [`AutoClip::DEFAULT_CAPACITY`] =
/// 10 000, 80 KB) are kept exactly, so up to then the threshold is exactly the paper's. After
/// that the history is a uniform random sample of `capacity` of all norms seen (reservoir
/// sampling, Vitter's algorithm R, with a fixed-seed generator: runs are reproducible). The
/// threshold is then the percentile of the sample: by the Dvoretzky–Kiefer–Wolfowitz inequality,
/// with probability at least `1 - 2 exp(-2 capacity ε²)` its rank among *all* norms seen is within
/// `± ε` of `p / 100`; for the default capacity that is within ±1.4 percentage points (p = 10:
/// between the 8.6th and 11.4th percentile) with 95 % probability, however long the run.
///
/// On CUDA, [`clip_`](Self::clip_) reads each step's norm to the host (one synchronisation per
/// step): the percentile is computed on the host.
///
/// ```
/// use candle_core::{Device, Tensor, Var, backprop::GradStore};
/// use candle_grad_clip::AutoClip;
/// # fn main() -> candle_core::Result<()> {
/// let w = Var::new(&[0f32, 0.], &Device::Cpu)?;
/// let mut autoclip = AutoClip::new(50.0)?; // clip to the median of the norms seen so far
/// for g in [[3f32, 4.], [6., 8.], [30., 40.]] {
///     let mut grads = GradStore::default();
///     grads.insert(&w, Tensor::new(&g, &Device::Cpu)?);
///     let norm = autoclip.clip_(&[w.clone()], &mut grads)?; // norms 5, 10, 50
///     # let _ = norm;
/// }
/// // History {5, 10, 50}: the third step was clipped to the median, 10.
/// assert_eq!(autoclip.threshold(), Some(10.0));
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct AutoClip {
    percentile: f64,
    capacity: usize,
    /// The kept norms, sorted ascending: all of them while `seen <= capacity`, else a uniform
    /// sample of `capacity` of them.
    kept: Vec<f64>,
    /// Finite norms observed so far.
    seen: u64,
    /// SplitMix64 state for the reservoir.
    rng: u64,
}

impl Default for AutoClip {
    /// The paper's setting: the 10th percentile, with the default capacity.
    ///
    /// ```
    /// assert_eq!(candle_grad_clip::AutoClip::default().percentile(), 10.0);
    /// ```
    fn default() -> Self {
        Self::with_valid(10.0, Self::DEFAULT_CAPACITY)
    }
}

impl AutoClip {
    /// How many norms are kept exactly before the history becomes a uniform sample.
    pub const DEFAULT_CAPACITY: usize = 10_000;

    /// The largest capacity: the history keeps one `f64` per norm (128 MiB at this bound).
    ///
    /// ```
    /// use candle_grad_clip::AutoClip;
    /// assert!(AutoClip::default().with_capacity(AutoClip::MAX_CAPACITY + 1).is_err());
    /// ```
    pub const MAX_CAPACITY: usize = 1 << 24;

    const SEED: u64 = 0x5EE7_4A2A_0C11_2020;

    /// AutoClip at the `percentile`-th percentile, which must be in `(0, 100]`.
    ///
    /// ```
    /// use candle_grad_clip::AutoClip;
    /// assert!(AutoClip::new(10.0).is_ok());
    /// assert!(AutoClip::new(0.0).is_err());
    /// assert!(AutoClip::new(f64::NAN).is_err());
    /// ```
    pub fn new(percentile: f64) -> Result<Self> {
        validate_percentile(percentile)?;
        Ok(Self::with_valid(percentile, Self::DEFAULT_CAPACITY))
    }

    /// The same AutoClip keeping at most `capacity` (`1..=`[`MAX_CAPACITY`](Self::MAX_CAPACITY))
    /// norms. Only before the first norm is
    /// observed; afterwards, and for `capacity = 0`, it is refused and nothing changes.
    ///
    /// ```
    /// use candle_grad_clip::AutoClip;
    /// let autoclip = AutoClip::new(10.0)?.with_capacity(1024)?;
    /// assert_eq!(autoclip.capacity(), 1024);
    /// assert!(AutoClip::default().with_capacity(0).is_err());
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn with_capacity(self, capacity: usize) -> Result<Self> {
        if capacity == 0 {
            bail!("AutoClip: capacity must be at least 1")
        }
        if capacity > Self::MAX_CAPACITY {
            bail!(
                "AutoClip: capacity must be at most {} (one f64 of history per norm), got {capacity}",
                Self::MAX_CAPACITY
            )
        }
        if self.seen > 0 {
            bail!(
                "AutoClip: the capacity can only be set before the first norm is observed ({} observed)",
                self.seen
            )
        }
        Ok(Self { capacity, ..self })
    }

    fn with_valid(percentile: f64, capacity: usize) -> Self {
        Self {
            percentile,
            capacity,
            kept: Vec::new(),
            seen: 0,
            rng: Self::SEED,
        }
    }

    /// The percentile `p` in `(0, 100]`.
    ///
    /// ```
    /// assert_eq!(candle_grad_clip::AutoClip::new(25.0)?.percentile(), 25.0);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn percentile(&self) -> f64 {
        self.percentile
    }

    /// The most norms kept in memory.
    ///
    /// ```
    /// use candle_grad_clip::AutoClip;
    /// assert_eq!(AutoClip::default().capacity(), AutoClip::DEFAULT_CAPACITY);
    /// ```
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// How many finite norms were observed so far (kept or not).
    ///
    /// ```
    /// let mut autoclip = candle_grad_clip::AutoClip::default();
    /// autoclip.observe(1.0);
    /// autoclip.observe(f64::NAN); // not counted
    /// assert_eq!(autoclip.observed(), 1);
    /// ```
    pub fn observed(&self) -> u64 {
        self.seen
    }

    /// The current threshold: the percentile of the history, or `None` before any finite norm.
    ///
    /// ```
    /// let mut autoclip = candle_grad_clip::AutoClip::new(100.0)?;
    /// assert_eq!(autoclip.threshold(), None);
    /// autoclip.observe(2.0);
    /// autoclip.observe(7.0);
    /// assert_eq!(autoclip.threshold(), Some(7.0));
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn threshold(&self) -> Option<f64> {
        if self.kept.is_empty() {
            return None;
        }
        let q = self.percentile / 100.0;
        Some(quantile_linear(self.kept.len(), q, |i| self.kept[i]))
    }

    /// Adds `norm` to the history and returns the threshold to clip it to: the percentile of the
    /// history including `norm`. This is the bookkeeping of [`clip_`](Self::clip_) without the
    /// gradients, for custom loops and tests.
    ///
    /// ```
    /// let mut autoclip = candle_grad_clip::AutoClip::new(50.0)?;
    /// assert_eq!(autoclip.observe(4.0), 4.0); // history {4}
    /// assert_eq!(autoclip.observe(2.0), 3.0); // history {2, 4}: median 3
    /// assert_eq!(autoclip.observe(9.0), 4.0); // history {2, 4, 9}
    /// autoclip.observe(-1.0); // not a norm: ignored, like NaN and infinities
    /// assert_eq!(autoclip.observed(), 3);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn observe(&mut self, norm: f64) -> f64 {
        let threshold = self.threshold_with(norm);
        self.record(norm);
        threshold
    }

    /// Clips the gradients of `vars` in place to the current threshold (the history includes
    /// this step's L2 norm) and returns their L2 norm before clipping, as a 0-d tensor. The
    /// history changes only when clipping succeeded.
    ///
    /// ```
    /// use candle_core::{Device, Tensor, Var, backprop::GradStore};
    /// # fn main() -> candle_core::Result<()> {
    /// let w = Var::new(&[0f32, 0.], &Device::Cpu)?;
    /// let mut grads = GradStore::default();
    /// grads.insert(&w, Tensor::new(&[3f32, 4.], &Device::Cpu)?);
    /// let mut autoclip = candle_grad_clip::AutoClip::default();
    /// // The first norm is its own percentile: the coefficient is 5 / (5 + 1e-6), a scaling by
    /// // 1 - 2e-7 (the `eps` of `clip_grad_norm_`; a norm equal to its threshold is "clipped").
    /// let norm = autoclip.clip_(&[w.clone()], &mut grads)?;
    /// assert_eq!(norm.to_scalar::<f32>()?, 5.0);
    /// // Each element is its product with that coefficient, rounded to f32: one or two ulps below
    /// // 3 and 4, so the clip is visible (a tolerance of 1e-5 could not tell).
    /// let c = 5.0 / (5.0 + 1e-6);
    /// let g = grads.get(&w).unwrap().to_vec1::<f32>()?;
    /// assert_eq!(g, [(3.0 * c) as f32, (4.0 * c) as f32]);
    /// assert!(g[0] < 3.0 && g[1] < 4.0);
    /// # Ok(()) }
    /// ```
    pub fn clip_(&mut self, vars: &[Var], grads: &mut GradStore) -> Result<Tensor> {
        Ok(self.clip_with_threshold_(vars, grads)?.0)
    }

    /// [`clip_`](Self::clip_), also returning the threshold used.
    pub(crate) fn clip_with_threshold_(
        &mut self,
        vars: &[Var],
        grads: &mut GradStore,
    ) -> Result<(Tensor, f64)> {
        let norm = total_norm(vars, grads, NormType::L2, false)?;
        let value = norm.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let threshold = self.threshold_with(value);
        clip_grads_with_norm_(vars, grads, threshold, &norm)?;
        self.record(value);
        Ok((norm, threshold))
    }

    /// The percentile of the history with `norm` added (when finite), without changing anything;
    /// `+inf` when there is no finite norm at all.
    pub(crate) fn threshold_with(&self, norm: f64) -> f64 {
        let q = self.percentile / 100.0;
        if !is_usable(norm) {
            return self.threshold().unwrap_or(f64::INFINITY);
        }
        // The sorted history with `norm` inserted at `pos`, read without copying it.
        let pos = self.kept.partition_point(|&x| x < norm);
        let at = |i: usize| match i.cmp(&pos) {
            std::cmp::Ordering::Less => self.kept[i],
            std::cmp::Ordering::Equal => norm,
            std::cmp::Ordering::Greater => self.kept[i - 1],
        };
        quantile_linear(self.kept.len() + 1, q, at)
    }

    pub(crate) fn record(&mut self, norm: f64) {
        if !is_usable(norm) {
            return;
        }
        self.seen += 1;
        if self.kept.len() < self.capacity {
            let pos = self.kept.partition_point(|&x| x < norm);
            self.kept.insert(pos, norm);
            return;
        }
        // Algorithm R: the new norm replaces a uniformly chosen member with probability
        // capacity / seen. The slot labels are arbitrary, so the members' sorted positions serve.
        let j = self.next_below(self.seen);
        if let Ok(j) = usize::try_from(j) {
            if j < self.capacity {
                self.kept.remove(j);
                let pos = self.kept.partition_point(|&x| x < norm);
                self.kept.insert(pos, norm);
            }
        }
    }

    /// The state a bitwise resume needs, as CPU tensors: `kept_norms` (1-D `F64`, the kept
    /// history, ascending), `observed` (0-d `I64`, the finite norms seen so far) and `rng_state`
    /// (0-d `I64`, the reservoir generator's state, its bits as an `i64`). The settings
    /// (percentile, capacity) are not state.
    ///
    /// ```
    /// let mut autoclip = candle_grad_clip::AutoClip::default();
    /// autoclip.observe(3.0);
    /// let state = autoclip.state_dict()?;
    /// assert_eq!(state["kept_norms"].to_vec1::<f64>()?, [3.0]);
    /// assert_eq!(state["observed"].to_scalar::<i64>()?, 1);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn state_dict(&self) -> Result<HashMap<String, Tensor>> {
        let cpu = &Device::Cpu;
        let observed = i64::try_from(self.seen).map_err(|_| {
            candle_core::Error::Msg(format!(
                "AutoClip::state_dict: {} norms observed do not fit an i64",
                self.seen
            ))
        })?;
        Ok(HashMap::from([
            (
                "kept_norms".to_string(),
                Tensor::new(self.kept.as_slice(), cpu)?,
            ),
            ("observed".to_string(), Tensor::new(observed, cpu)?),
            (
                "rng_state".to_string(),
                Tensor::new(i64::from_ne_bytes(self.rng.to_ne_bytes()), cpu)?,
            ),
        ]))
    }

    /// Loads a state from [`state_dict`](Self::state_dict), checked whole first: an entry
    /// missing, unknown, of the wrong dtype or rank, norms that are not finite, negative or not
    /// ascending, more norms than `capacity`, or a count that does not match them (the kept norms
    /// are all of them until `capacity` is reached) is an error, and nothing changes.
    ///
    /// ```
    /// use candle_grad_clip::AutoClip;
    /// let mut first = AutoClip::new(50.0)?;
    /// for norm in [4.0, 2.0, 9.0] {
    ///     first.observe(norm);
    /// }
    /// let mut state = first.state_dict()?;
    /// let mut resumed = AutoClip::new(50.0)?;
    /// resumed.load_state_dict(&state)?;
    /// assert_eq!(resumed.threshold(), Some(4.0));
    /// assert_eq!(resumed.observe(1.0), first.observe(1.0));
    /// state.remove("observed");
    /// assert!(AutoClip::default().load_state_dict(&state).is_err());
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn load_state_dict(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        let reader = StateDictReader {
            dict: state,
            caller: "AutoClip::load_state_dict",
        };
        let kept = reader.get("kept_norms", DType::F64, 1)?.to_vec1::<f64>()?;
        let observed = reader.get("observed", DType::I64, 0)?.to_scalar::<i64>()?;
        let rng = reader.get("rng_state", DType::I64, 0)?.to_scalar::<i64>()?;
        reader.refuse_unknown(&["kept_norms", "observed", "rng_state"])?;
        if let Some(bad) = kept.iter().find(|&&x| !is_usable(x)) {
            bail!("AutoClip::load_state_dict: `kept_norms` holds {bad}, not a norm; nothing was loaded")
        }
        if kept.windows(2).any(|w| w[0] > w[1]) {
            bail!("AutoClip::load_state_dict: `kept_norms` is not ascending; nothing was loaded")
        }
        let Ok(seen) = u64::try_from(observed) else {
            bail!("AutoClip::load_state_dict: `observed` is negative ({observed}); nothing was loaded")
        };
        if kept.len() > self.capacity {
            bail!(
                "AutoClip::load_state_dict: {} kept norms do not fit capacity = {}; nothing was loaded",
                kept.len(),
                self.capacity
            )
        }
        if seen < kept.len() as u64 || (kept.len() < self.capacity && seen != kept.len() as u64) {
            bail!(
                "AutoClip::load_state_dict: {} kept norms do not match {seen} observed with capacity = {}; nothing was loaded",
                kept.len(),
                self.capacity
            )
        }
        self.kept = kept;
        self.seen = seen;
        self.rng = u64::from_ne_bytes(rng.to_ne_bytes());
        Ok(())
    }

    /// Saves [`state_dict`](Self::state_dict) as a safetensors file, atomically, with the
    /// SHA-256 of every tensor and of its header.
    ///
    /// ```
    /// use candle_grad_clip::AutoClip;
    /// let path = std::env::temp_dir().join(format!("doc-autoclip-{}.safetensors", std::process::id()));
    /// let mut autoclip = AutoClip::new(50.0)?;
    /// autoclip.observe(2.0);
    /// autoclip.save_state(&path)?;
    /// let mut resumed = AutoClip::new(50.0)?;
    /// resumed.load_state(&path)?;
    /// assert_eq!(resumed.observed(), 1);
    /// # std::fs::remove_file(&path)?;
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn save_state(&self, path: impl AsRef<Path>) -> Result<()> {
        state_file::save(&self.state_dict()?, "AutoClip", path.as_ref())
    }

    /// Loads a state saved by [`save_state`](Self::save_state), as
    /// [`load_state_dict`](Self::load_state_dict), after verifying the file: a damaged file, one
    /// without digests or one of another kind is an error and nothing changes.
    ///
    /// ```no_run
    /// let mut autoclip = candle_grad_clip::AutoClip::new(10.0)?;
    /// autoclip.load_state("autoclip.safetensors")?;
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn load_state(&mut self, path: impl AsRef<Path>) -> Result<()> {
        let dict = state_file::load(path.as_ref(), "AutoClip")?;
        self.load_state_dict(&dict)
    }

    /// Uniform in `[0, n)` (SplitMix64, then Lemire's multiply-shift; bias below `n / 2^64`).
    fn next_below(&mut self, n: u64) -> u64 {
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        ((u128::from(z) * u128::from(n)) >> 64) as u64
    }
}

pub(crate) fn validate_percentile(percentile: f64) -> Result<()> {
    if !(percentile > 0.0 && percentile <= 100.0) {
        bail!("AutoClip: percentile must be in (0, 100], got {percentile}")
    }
    Ok(())
}

/// Whether a value can enter the history: a norm is finite and never negative. NaN, infinite and
/// negative values are ignored (a negative one would make every later threshold invalid).
fn is_usable(norm: f64) -> bool {
    norm.is_finite() && norm >= 0.0
}
