//! Gradient accumulation: [`GradAccumulator`] sums the gradients of several micro-batches in place
//! into buffers allocated once (in F32 for half-precision gradients on request), for the clip,
//! the policies and the optimizers to see once, after the last micro-batch.
//!
//! Every pass is one multi-tensor operation (`ops::accumulate` through `dispatch::accumulate`):
//! one kernel launch on CUDA, one rayon pass on the CPU.

mod pending;

pub(crate) use pending::first_pending;

use std::collections::HashSet;

use candle_core::{backprop::GradStore, bail, DType, Device, Result, Tensor, Var};
use candle_nn::VarMap;

use crate::dispatch;
use crate::ops::accumulate::{
    buffer_dtype, check_gradient, check_var, is_float, AccumulateOp, Pair, PairSet,
};
use crate::ops::gradients::storage_key;

/// Sums the gradients of micro-batches in place into one buffer per var, allocated at the first
/// [`add`](Self::add) and never again.
///
/// - [`add`](Self::add) is bitwise candle's `acc = (acc + g)?` per var in call order, starting
///   from zeros, in the accumulation dtype (one rounding per add). A var whose gradient is
///   missing from a micro-batch counts as zero for it; a var never given a gradient since the
///   last [`zero_`](Self::zero_) has none in [`grads`](Self::grads).
/// - [`grads`](Self::grads) hands out the sums as a `GradStore` keyed by the vars, for the clip,
///   `GradScaler::unscale_` and the optimizer, once per optimizer step. With the gradients' own
///   dtype (the default) its tensors *are* the buffers: clipping them in place clips the sums.
///   With [`accumulate_in`](Self::accumulate_in)`(F32)`, F16/BF16 sums are kept in F32 and
///   rounded once to the var's dtype (into a second buffer, allocated with the first) when
///   `grads()` is called.
/// - After `grads()`, [`add`](Self::add) is refused until [`zero_`](Self::zero_): the store may
///   have been clipped, unscaled or stepped on, and forgetting `zero_` would carry this step's
///   gradient into the next one. `zero_` clears every buffer in one pass.
/// - Bad input (a gradient of another shape, dtype or device than its var, an `add` after
///   `grads()`) is an error that changes nothing. NaN and infinity are summed like any value:
///   `GradScaler` and `skip_nonfinite` see them in the sum.
/// - Between optimizer steps the accumulator is empty, so a training checkpoint needs nothing
///   from it; `TrainingCheckpoint::new` refuses vars with micro-batches added since the last
///   `grads()` or `zero_()`.
///
/// Across processes, accumulate locally and call the `*_across` functions once per optimizer
/// step, on `grads()`.
///
/// ```
/// use candle_core::{DType, Device, Tensor, Var, backprop::GradStore};
/// use candle_grad_clip::{clip_grad_norm_, GradAccumulator};
/// # fn main() -> candle_core::Result<()> {
/// let w = Var::new(&[1f32, 2.], &Device::Cpu)?;
/// let mut acc = GradAccumulator::new(&[w.clone()])?;
/// for micro in [[3f32, 0.], [1., 4.]] {
///     let mut grads = GradStore::default(); // in training: `loss.backward()?`
///     grads.insert(&w, Tensor::new(&micro, &Device::Cpu)?);
///     acc.add(&grads)?;
/// }
/// let grads = acc.grads()?;
/// assert_eq!(grads.get(&w).unwrap().to_vec1::<f32>()?, [4.0, 4.0]);
/// clip_grad_norm_(&[w.clone()], grads, 1.0)?; // once, on the sum
/// acc.zero_()?;
/// assert_eq!(acc.micro_batches(), 0);
/// # Ok(()) }
/// ```
pub struct GradAccumulator {
    vars: Vec<Var>,
    device: Device,
    /// The dtype asked for by `accumulate_in`.
    requested: Option<DType>,
    /// One per var, allocated at the first `add`.
    buffers: Option<Vec<Buffers>>,
    /// The storage keys of the buffers (to spot a store of our own buffers added back).
    buffer_keys: HashSet<usize>,
    /// Whether each var has had a gradient since the last `zero_`.
    seen: Vec<bool>,
    micro_batches: u64,
    /// What `grads` hands out; valid while `read` is set.
    store: GradStore,
    /// `grads` was called since the last `zero_` (then `add` is refused).
    read: bool,
    /// The vars are marked in `pending` (micro-batches added since the last `grads`/`zero_`).
    held: bool,
}

/// A var's buffers: the sum, and the var-dtype copy `grads` rounds it into when it is wider.
struct Buffers {
    sum: Tensor,
    rounded: Option<Tensor>,
}

impl GradAccumulator {
    /// An accumulator for `vars` (each listed once; repeats are ignored), which must be F32, F64,
    /// F16 or BF16 vars on one device. Allocates nothing yet.
    ///
    /// ```
    /// use candle_core::{Device, Var};
    /// let w = Var::zeros(3, candle_core::DType::F32, &Device::Cpu)?;
    /// let acc = candle_grad_clip::GradAccumulator::new(&[w])?;
    /// assert_eq!(acc.micro_batches(), 0);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn new(vars: &[Var]) -> Result<Self> {
        let device = vars.first().map_or(Device::Cpu, |v| v.device().clone());
        let mut ids = HashSet::new();
        let mut unique = Vec::with_capacity(vars.len());
        for (i, var) in vars.iter().enumerate() {
            check_var(i, var, &device)?;
            if ids.insert(var.id()) {
                unique.push(var.clone());
            }
        }
        Ok(Self {
            seen: vec![false; unique.len()],
            vars: unique,
            device,
            requested: None,
            buffers: None,
            buffer_keys: HashSet::new(),
            micro_batches: 0,
            store: GradStore::default(),
            read: false,
            held: false,
        })
    }

    /// An accumulator for every var of `varmap`, in the order of their names.
    ///
    /// ```
    /// use candle_core::{DType, Device};
    /// let varmap = candle_nn::VarMap::new();
    /// varmap.get(2, "w", candle_nn::Init::Const(0.5), DType::F32, &Device::Cpu)?;
    /// let acc = candle_grad_clip::GradAccumulator::from_varmap(&varmap)?;
    /// assert_eq!(acc.vars().len(), 1);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn from_varmap(varmap: &VarMap) -> Result<Self> {
        let data = varmap.data().lock().map_err(|_| {
            candle_core::Error::Msg("GradAccumulator: the VarMap's lock is poisoned".into())
        })?;
        let mut named: Vec<(&String, &Var)> = data.iter().collect();
        named.sort_by(|a, b| a.0.cmp(b.0));
        let vars: Vec<Var> = named.into_iter().map(|(_, v)| v.clone()).collect();
        Self::new(&vars)
    }

    /// Sums the gradients of vars narrower than `dtype` in buffers of `dtype` (F16/BF16 vars in
    /// F32 with `DType::F32`), rounded once to the var's dtype by [`grads`](Self::grads). Never
    /// narrows: vars at least as wide keep their own dtype. Only before the first `add`.
    ///
    /// ```
    /// use candle_core::{DType, Device, Var};
    /// let w = Var::zeros(3, DType::BF16, &Device::Cpu)?;
    /// let acc = candle_grad_clip::GradAccumulator::new(&[w])?.accumulate_in(DType::F32)?;
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn accumulate_in(mut self, dtype: DType) -> Result<Self> {
        if !is_float(dtype) {
            bail!("GradAccumulator::accumulate_in: {dtype:?} is not a float dtype (F32, F64, F16 or BF16)")
        }
        if self.buffers.is_some() {
            bail!("GradAccumulator::accumulate_in: the buffers were allocated by an earlier add; choose the accumulation dtype before the first add")
        }
        self.requested = Some(dtype);
        Ok(self)
    }

    /// Adds one micro-batch's gradients: `acc = (acc + g)?` for every var with a gradient in
    /// `grads`, in place, in one pass over all vars. Gradients of other vars in `grads` are
    /// ignored.
    ///
    /// Errors, changing nothing: a gradient whose dtype, shape or device is not its var's; a call
    /// after [`grads`](Self::grads) without [`zero_`](Self::zero_).
    ///
    /// ```
    /// use candle_core::{Device, Tensor, Var, backprop::GradStore};
    /// let w = Var::new(&[1f32], &Device::Cpu)?;
    /// let mut acc = candle_grad_clip::GradAccumulator::new(&[w.clone()])?;
    /// let mut grads = GradStore::default();
    /// grads.insert(&w, Tensor::new(&[0.25f32], &Device::Cpu)?);
    /// acc.add(&grads)?;
    /// acc.add(&grads)?;
    /// assert_eq!(acc.micro_batches(), 2);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn add(&mut self, grads: &GradStore) -> Result<()> {
        self.add_op(grads, AccumulateOp::Add, "GradAccumulator::add")
    }

    /// Adds `alpha` times one micro-batch's gradients: `acc + round(g · alpha)`, the product taken
    /// in `f64` and rounded once to the accumulation dtype, then the sum rounded once (not fused:
    /// for an `alpha` exact in the dtype, candle's `(acc + (g * alpha)?)?`). Errors as
    /// [`add`](Self::add), and for a non-finite `alpha`.
    ///
    /// ```
    /// use candle_core::{Device, Tensor, Var, backprop::GradStore};
    /// let w = Var::new(&[1f32], &Device::Cpu)?;
    /// let mut acc = candle_grad_clip::GradAccumulator::new(&[w.clone()])?;
    /// let mut grads = GradStore::default();
    /// grads.insert(&w, Tensor::new(&[3f32], &Device::Cpu)?);
    /// acc.add_scaled(&grads, 0.25)?; // e.g. 1 / micro-batches, for a mean
    /// assert_eq!(acc.grads()?.get(&w).unwrap().to_vec1::<f32>()?, [0.75]);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn add_scaled(&mut self, grads: &GradStore, alpha: f64) -> Result<()> {
        if !alpha.is_finite() {
            bail!("GradAccumulator::add_scaled: alpha must be finite, got {alpha}; nothing was accumulated")
        }
        self.add_op(
            grads,
            AccumulateOp::AddScaled(alpha),
            "GradAccumulator::add_scaled",
        )
    }

    /// Micro-batches added since the last [`zero_`](Self::zero_) (or since `new`).
    ///
    /// ```
    /// let acc = candle_grad_clip::GradAccumulator::new(&[])?;
    /// assert_eq!(acc.micro_batches(), 0);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn micro_batches(&self) -> u64 {
        self.micro_batches
    }

    /// The vars, in the order of `new` (repeats dropped) or of their `VarMap` names.
    ///
    /// ```
    /// let acc = candle_grad_clip::GradAccumulator::new(&[])?;
    /// assert!(acc.vars().is_empty());
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn vars(&self) -> &[Var] {
        &self.vars
    }

    /// The sums, keyed by the vars: every var that had a gradient since the last
    /// [`zero_`](Self::zero_). With the gradients' own dtype the tensors are the buffers (no
    /// copy; an in-place clip clips the sums); F16/BF16 sums kept in F32 are rounded once to the
    /// var's dtype (into buffers allocated with the first `add`) at the first call after an
    /// `add`. Further calls return the same store, as it was left. After it, [`add`](Self::add)
    /// is refused until `zero_`.
    ///
    /// ```
    /// use candle_core::{Device, Var};
    /// let w = Var::new(&[1f32], &Device::Cpu)?;
    /// let mut acc = candle_grad_clip::GradAccumulator::new(&[w.clone()])?;
    /// assert!(acc.grads()?.get(&w).is_none()); // no micro-batch yet
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn grads(&mut self) -> Result<&mut GradStore> {
        if !self.read {
            self.store = self.sums()?;
            self.read = true;
            self.release();
        }
        Ok(&mut self.store)
    }

    /// Clears every buffer in one pass (no allocation), ready for the next optimizer step:
    /// [`micro_batches`](Self::micro_batches) is 0 and no var has a gradient. Tensors taken from
    /// [`grads`](Self::grads) earlier are buffers: they read zero afterwards.
    ///
    /// ```
    /// use candle_core::{Device, Tensor, Var, backprop::GradStore};
    /// let w = Var::new(&[1f32], &Device::Cpu)?;
    /// let mut acc = candle_grad_clip::GradAccumulator::new(&[w.clone()])?;
    /// let mut grads = GradStore::default();
    /// grads.insert(&w, Tensor::new(&[2f32], &Device::Cpu)?);
    /// acc.add(&grads)?;
    /// acc.zero_()?;
    /// assert!(acc.grads()?.get(&w).is_none());
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn zero_(&mut self) -> Result<()> {
        if let Some(buffers) = &self.buffers {
            let pairs = buffers
                .iter()
                .flat_map(|b| std::iter::once(&b.sum).chain(b.rounded.as_ref()))
                .map(|t| Pair {
                    dst: t.clone(),
                    src: None,
                })
                .collect();
            let set = PairSet::new(pairs, self.device.clone());
            dispatch::accumulate::accumulate(&set, AccumulateOp::Zero)?;
        }
        self.seen.iter_mut().for_each(|s| *s = false);
        self.micro_batches = 0;
        self.store = GradStore::default();
        self.read = false;
        self.release();
        Ok(())
    }

    /// The shared body of `add` and `add_scaled`: validate everything, allocate the buffers at
    /// the first call, then one pass.
    fn add_op(&mut self, grads: &GradStore, op: AccumulateOp, call: &str) -> Result<()> {
        if self.read {
            bail!("{call}: grads() was called since the last zero_(); call zero_() after the optimizer step before adding the next micro-batch (nothing was accumulated)")
        }
        let mut found: Vec<(usize, Tensor)> = Vec::new();
        for (i, var) in self.vars.iter().enumerate() {
            if let Some(g) = grads.get(var.as_tensor()) {
                check_gradient(call, i, var, g)?;
                found.push((i, g.clone()));
            }
        }
        let buffers = match self.buffers.take() {
            Some(b) => b,
            None => {
                let b = self.allocate()?;
                self.buffer_keys = b
                    .iter()
                    .flat_map(|b| std::iter::once(&b.sum).chain(b.rounded.as_ref()))
                    .map(storage_key)
                    .collect();
                b
            }
        };
        let result = self.add_pass(&buffers, &found, op);
        self.buffers = Some(buffers);
        result?;
        for (i, _) in &found {
            self.seen[*i] = true;
        }
        self.micro_batches += 1;
        if !self.held {
            pending::hold(&self.vars);
            self.held = true;
        }
        Ok(())
    }

    fn add_pass(
        &self,
        buffers: &[Buffers],
        found: &[(usize, Tensor)],
        op: AccumulateOp,
    ) -> Result<()> {
        // A gradient that is one of our own buffers (a store from `grads()` added back) is read
        // through a copy: a pass never reads the storage it writes.
        let ours = &self.buffer_keys;
        let mut pairs = Vec::with_capacity(found.len());
        for (i, g) in found {
            let src = if ours.contains(&storage_key(g)) {
                g.copy()?
            } else {
                g.clone()
            };
            pairs.push(Pair {
                dst: buffers[*i].sum.clone(),
                src: Some(src),
            });
        }
        dispatch::accumulate::accumulate(&PairSet::new(pairs, self.device.clone()), op)
    }

    /// One zeroed buffer per var (and its rounded copy when the sum is wider than the var).
    fn allocate(&self) -> Result<Vec<Buffers>> {
        self.vars
            .iter()
            .map(|var| {
                let dtype = buffer_dtype(var.dtype(), self.requested);
                let sum = Tensor::zeros(var.shape(), dtype, &self.device)?;
                let rounded = if dtype == var.dtype() {
                    None
                } else {
                    Some(Tensor::zeros(var.shape(), var.dtype(), &self.device)?)
                };
                Ok(Buffers { sum, rounded })
            })
            .collect()
    }

    /// The store of the vars seen, rounding the wide sums first (one pass).
    fn sums(&self) -> Result<GradStore> {
        let mut store = GradStore::default();
        let Some(buffers) = &self.buffers else {
            return Ok(store);
        };
        let seen = || {
            self.vars
                .iter()
                .zip(buffers)
                .zip(&self.seen)
                .filter(|(_, &s)| s)
                .map(|(vb, _)| vb)
        };
        let pairs: Vec<Pair> = seen()
            .filter_map(|(_, b)| {
                b.rounded.as_ref().map(|r| Pair {
                    dst: r.clone(),
                    src: Some(b.sum.clone()),
                })
            })
            .collect();
        if !pairs.is_empty() {
            let set = PairSet::new(pairs, self.device.clone());
            dispatch::accumulate::accumulate(&set, AccumulateOp::Round)?;
        }
        for (var, b) in seen() {
            store.insert(
                var.as_tensor(),
                b.rounded.as_ref().unwrap_or(&b.sum).clone(),
            );
        }
        Ok(store)
    }

    fn release(&mut self) {
        if self.held {
            pending::release(&self.vars);
            self.held = false;
        }
    }
}

impl Drop for GradAccumulator {
    fn drop(&mut self) {
        self.release();
    }
}
