//! [`GradScaler`]: dynamic loss scaling for mixed-precision training, PyTorch's
//! `torch.amp.GradScaler`, with its state on the gradients' device.

use std::collections::HashSet;

use candle_core::{backprop::GradStore, bail, DType, Device, Result, Tensor, Var};

mod across;
mod fused;
mod grads;
mod state_dict;

use crate::amp::scaled::ScaledOptimizer;
use crate::dispatch;
use crate::ops::gradients::{storage_key, GradientSet};
use crate::ops::norm_type::NormType;
use grads::{checked_grads, found_inf_of, inv_scale, store_grads, unscale};

/// Keys of the state dict.
pub(super) const KEY_SCALE: &str = "scale";
pub(super) const KEY_GROWTH_TRACKER: &str = "growth_tracker";

/// Dynamic loss scaling, as PyTorch's `torch.amp.GradScaler`: multiply the loss by a large factor
/// before `backward()` so that small gradients of a reduced-precision (F16) forward pass do not
/// flush to zero, divide the gradients by it before the optimizer step, skip the steps whose
/// gradients overflowed, and adapt the factor: halve it after an overflow, double it after
/// `growth_interval` clean steps in a row.
///
/// **Where the state lives.** The scale (F32), the growth tracker and the found-inf flag of the
/// step are small tensors on the gradients' device, updated there by candle tensor ops (the same
/// code on every back end): nothing is read back to the host, except
/// - [`scale_value`](Self::scale_value) and the state dict, when asked;
/// - one read of found-inf per [`step`](Self::step) with an optimizer other than
///   [`FusedAdamW`](crate::FusedAdamW) and [`FusedSgd`](crate::FusedSgd) (it decides on the host whether to call the optimizer),
///   and per `step` after an explicit [`unscale_`](Self::unscale_) with any optimizer (as
///   PyTorch's step, which reads the found-inf `unscale_` recorded: the gradients may have been
///   clipped since, so the step cannot decide from them again).
///
/// With [`FusedAdamW`](crate::FusedAdamW) and [`FusedSgd`](crate::FusedSgd) the skip happens on the device: the fused step runs with
/// its non-finite skip on (whatever [`skip_nonfinite`](crate::FusedAdamW::skip_nonfinite) says), which
/// leaves the parameters, the moments and the step count bitwise unchanged when a gradient is not
/// finite and counts the step in [`skipped_steps`](crate::FusedAdamW::skipped_steps).
///
/// **Passes over the gradients.** [`step`](Self::step) with a fused optimizer and no
/// [`unscale_`](Self::unscale_) before it reads the scaled gradients once for the clip's norm and
/// the finite check (each element unscaled as it is read), then once more in the update, which
/// unscales each element, writes it back and steps with it: bitwise `unscale_` then `step`, one
/// read of the gradients fewer. On CUDA (and under the kernel emulation) these are the reduction
/// kernel and the fused-step kernel, two launches: `inv_scale` is computed on the device and read
/// by the kernels from device memory, and found-inf is the fused step's skipped-step count after
/// minus before, as tensor ops: no host read. (Not with AutoClip, ZClip or AGC, which decide from
/// the gradients before the step, nor when gradients share a storage, nor when the optimizer has
/// a [`max_consecutive_skips`](crate::FusedAdamW::max_consecutive_skips), whose refused skip must leave
/// the scaler consistent: then the gradients are unscaled first.) `unscale_` itself is one read
/// and one write of each element on the CPU; on CUDA (and under the kernel emulation) it is
/// candle tensor ops (each gradient's product into a new tensor, copied back into the gradient
/// before the next one is computed; all of them first when gradients share a storage) and a
/// finite check: the same values, more traffic.
///
/// **Order of a step**, as PyTorch's: `scale(&loss)?.backward()`, optionally
/// [`unscale_`](Self::unscale_) (to clip or inspect the true gradients), [`step`](Self::step),
/// [`update`](Self::update). Calling them out of order is an error: `unscale_` twice before
/// `update`, `unscale_` after `step`, `step` twice before `update`, `update` before any of
/// `unscale_` / `step`. One optimizer per scaler between two `update` calls. As PyTorch's "no
/// inf checks were recorded": `step` with a fused optimizer none of whose vars has a gradient
/// is an error (nothing changes; `update` after it is an error too), and an `unscale_` that
/// found no gradient records nothing (the following `step` and `update` are errors; that
/// `update` leaves the scale as it was and the scaler ready for the next step).
///
/// **Arithmetic** (PyTorch's): the scale is an `f32`; `inv_scale = (f32)(1 / (f64)scale)`; each
/// F32 gradient becomes `g * inv_scale` in `f32` (F64: in `f64`; BF16: in `f32`, then rounded to
/// BF16). Found-inf is set when an *unscaled* gradient is NaN or infinite. PyTorch checks the
/// scaled values instead; the two differ only when the scale is below 1 and a finite scaled
/// gradient overflows once divided by it: here that step is skipped (its gradients are infinite),
/// PyTorch would step with infinite gradients.
///
/// **Gradients.** Like PyTorch it expects F32 (master) gradients: F16 gradients are refused (see
/// [`unscale_`](Self::unscale_)); BF16 and F64 ones are accepted. The gradients are written in
/// place (every tensor holding them sees the unscaled values); they must be contiguous, as
/// `backward()` makes them.
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use candle_nn::{linear, Module, Optimizer, ParamsAdamW, VarBuilder, VarMap};
/// use candle_grad_clip::{ClipSetting, FusedAdamW, GradScaler};
/// # fn main() -> candle_core::Result<()> {
/// let varmap = VarMap::new();
/// let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
/// let model = linear(4, 1, vb.pp("fc"))?;
/// let mut opt = FusedAdamW::from_varmap(&varmap, ParamsAdamW::default())?
///     .with_clip(ClipSetting::norm(1.0))?;
/// let mut scaler = GradScaler::new().with_growth_interval(100);
///
/// let x = Tensor::ones((8, 4), DType::F32, &Device::Cpu)?;
/// let loss = (model.forward(&x)? - 10.0)?.sqr()?.mean_all()?;
/// let grads = scaler.scale(&loss)?.backward()?;
/// scaler.step(&mut opt, &grads)?; // unscales, then the fused step (skipped on the device on overflow)
/// scaler.update()?;
/// assert_eq!(scaler.scale_value()?, 65536.0);
/// assert_eq!(opt.steps()?, 1);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct GradScaler {
    init_scale: f64,
    growth_factor: f64,
    backoff_factor: f64,
    growth_interval: usize,
    /// Created at the first use (or by loading a state), on the gradients' device.
    state: Option<ScalerState>,
    stage: Stage,
    /// The storages of the gradients unscaled since the last `update` (`storage_key`), for
    /// `step`'s check that a fused optimizer's gradients were all unscaled.
    unscaled: HashSet<usize>,
    /// Found-inf agreed over every rank by the last `unscale_across_` (known on the host from
    /// its collective); `None` after a local `unscale_`, and before any.
    agreed_found_inf: Option<bool>,
}

/// Where the scaler is in a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Since the last `update` (or the start): neither `unscale_` nor `step`.
    Ready,
    /// The gradients were unscaled, no step yet.
    Unscaled,
    /// A step was taken (or skipped).
    Stepped,
}

/// The device-resident state.
#[derive(Debug, Clone)]
struct ScalerState {
    /// F32, 0-d.
    scale: Tensor,
    /// F64, 0-d: the clean steps in a row since the last change of the scale (an integer, exact
    /// in `f64` up to 2^53).
    growth_tracker: Tensor,
    /// F32, 0-d: 1 when the unscaled gradients of this step held a NaN or an infinity, else 0;
    /// `None` before the step's unscale.
    found_inf: Option<Tensor>,
}

impl ScalerState {
    fn device(&self) -> &Device {
        self.scale.device()
    }

    fn to_device(&self, device: &Device) -> Result<Self> {
        Ok(Self {
            scale: self.scale.to_device(device)?,
            growth_tracker: self.growth_tracker.to_device(device)?,
            found_inf: match &self.found_inf {
                Some(t) => Some(t.to_device(device)?),
                None => None,
            },
        })
    }
}

impl Default for GradScaler {
    fn default() -> Self {
        Self::new()
    }
}

impl GradScaler {
    /// PyTorch's defaults: initial scale 2^16, growth factor 2, backoff factor 0.5, growth
    /// interval 2000.
    ///
    /// ```
    /// let scaler = candle_grad_clip::GradScaler::new();
    /// assert_eq!(scaler.scale_value()?, 65536.0);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn new() -> Self {
        Self {
            init_scale: 65536.0,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 2000,
            state: None,
            stage: Stage::Ready,
            unscaled: HashSet::new(),
            agreed_found_inf: None,
        }
    }

    /// The scale before the first update, `> 0` and finite as an `f32` (checked at the first
    /// call that uses it).
    ///
    /// ```
    /// use candle_grad_clip::GradScaler;
    /// assert_eq!(GradScaler::new().with_init_scale(1024.0).scale_value()?, 1024.0);
    /// assert!(GradScaler::new().with_init_scale(0.0).scale_value().is_err());
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn with_init_scale(mut self, init_scale: f64) -> Self {
        self.init_scale = init_scale;
        self
    }

    /// The factor the scale is multiplied by after `growth_interval` clean steps in a row, `> 1`
    /// and finite (checked at the first call that uses it).
    ///
    /// ```
    /// use candle_grad_clip::GradScaler;
    /// let err = GradScaler::new().with_growth_factor(1.0).scale_value().unwrap_err();
    /// assert!(err.to_string().contains("growth_factor"));
    /// ```
    pub fn with_growth_factor(mut self, growth_factor: f64) -> Self {
        self.growth_factor = growth_factor;
        self
    }

    /// The factor the scale is multiplied by after a step with a non-finite gradient, in
    /// `(0, 1)` (checked at the first call that uses it).
    ///
    /// ```
    /// use candle_grad_clip::GradScaler;
    /// let err = GradScaler::new().with_backoff_factor(1.0).scale_value().unwrap_err();
    /// assert!(err.to_string().contains("backoff_factor"));
    /// ```
    pub fn with_backoff_factor(mut self, backoff_factor: f64) -> Self {
        self.backoff_factor = backoff_factor;
        self
    }

    /// How many clean steps in a row grow the scale, `>= 1` (checked at the first call that uses
    /// it).
    ///
    /// ```
    /// use candle_grad_clip::GradScaler;
    /// let err = GradScaler::new().with_growth_interval(0).scale_value().unwrap_err();
    /// assert!(err.to_string().contains("growth_interval"));
    /// ```
    pub fn with_growth_interval(mut self, growth_interval: usize) -> Self {
        self.growth_interval = growth_interval;
        self
    }

    /// The initial scale.
    ///
    /// ```
    /// assert_eq!(candle_grad_clip::GradScaler::new().init_scale(), 65536.0);
    /// ```
    pub fn init_scale(&self) -> f64 {
        self.init_scale
    }

    /// The growth factor.
    ///
    /// ```
    /// assert_eq!(candle_grad_clip::GradScaler::new().growth_factor(), 2.0);
    /// ```
    pub fn growth_factor(&self) -> f64 {
        self.growth_factor
    }

    /// The backoff factor.
    ///
    /// ```
    /// assert_eq!(candle_grad_clip::GradScaler::new().backoff_factor(), 0.5);
    /// ```
    pub fn backoff_factor(&self) -> f64 {
        self.backoff_factor
    }

    /// The growth interval.
    ///
    /// ```
    /// assert_eq!(candle_grad_clip::GradScaler::new().growth_interval(), 2000);
    /// ```
    pub fn growth_interval(&self) -> usize {
        self.growth_interval
    }

    /// Checks the settings, naming the first bad one; every call that uses them runs it first.
    ///
    /// ```
    /// use candle_grad_clip::GradScaler;
    /// assert!(GradScaler::new().validate().is_ok());
    /// assert!(GradScaler::new().with_backoff_factor(2.0).validate().is_err());
    /// ```
    pub fn validate(&self) -> Result<()> {
        let init = self.init_scale as f32;
        if !(init.is_finite() && init > 0.0) || self.init_scale.is_nan() {
            bail!(
                "GradScaler: init_scale must be > 0 and finite as an f32, got {}",
                self.init_scale
            )
        }
        if !(self.growth_factor.is_finite() && self.growth_factor > 1.0) {
            bail!(
                "GradScaler: growth_factor must be > 1 and finite, got {}",
                self.growth_factor
            )
        }
        if !(self.backoff_factor > 0.0 && self.backoff_factor < 1.0) {
            bail!(
                "GradScaler: backoff_factor must be in (0, 1), got {}",
                self.backoff_factor
            )
        }
        if self.growth_interval == 0 || self.growth_interval as u64 > 1 << 53 {
            bail!(
                "GradScaler: growth_interval must be in [1, 2^53], got {}",
                self.growth_interval
            )
        }
        Ok(())
    }

    /// The state on `device`: created from the settings at the first use, moved when it lives
    /// on another device (a state loaded before the first use is on the CPU).
    fn state_on(&mut self, device: &Device) -> Result<&mut ScalerState> {
        let state = match self.state.take() {
            None => self.fresh_state(device)?,
            Some(s) if s.device().same_device(device) => s,
            Some(s) => s.to_device(device)?,
        };
        Ok(self.state.insert(state))
    }

    fn fresh_state(&self, device: &Device) -> Result<ScalerState> {
        Ok(ScalerState {
            scale: Tensor::new(self.init_scale as f32, device)?,
            growth_tracker: Tensor::new(0f64, device)?,
            found_inf: None,
        })
    }

    /// The scale as a 0-d F32 tensor on `device` (not stored: `scale` takes `&self`).
    fn scale_tensor(&self, device: &Device) -> Result<Tensor> {
        match &self.state {
            Some(s) => s.scale.to_device(device),
            None => Tensor::new(self.init_scale as f32, device),
        }
    }

    /// `loss × scale`, differentiable with respect to `loss`. An F16, BF16 or F32 loss is
    /// computed in F32 (so the default 2^16 cannot overflow F16's range in the loss itself); an
    /// F64 loss in F64. The scale stays on the device.
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor, Var};
    /// let scaler = candle_grad_clip::GradScaler::new().with_init_scale(8.0);
    /// let w = Var::new(&[1f32, 2.0], &Device::Cpu)?;
    /// let loss = w.as_tensor().to_dtype(DType::F16)?.sum_all()?; // an F16 loss
    /// let scaled = scaler.scale(&loss)?;
    /// assert_eq!(scaled.dtype(), DType::F32);
    /// assert_eq!(scaled.to_scalar::<f32>()?, 24.0);
    /// let grads = scaled.backward()?;
    /// assert_eq!(grads.get(&w).unwrap().to_vec1::<f32>()?, [8.0, 8.0]);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn scale(&self, loss: &Tensor) -> Result<Tensor> {
        self.validate()?;
        let loss = match loss.dtype() {
            DType::F64 | DType::F32 => loss.clone(),
            DType::F16 | DType::BF16 => loss.to_dtype(DType::F32)?,
            other => bail!("GradScaler::scale: the loss must be a float tensor, got {other:?}"),
        };
        let scale = self.scale_tensor(loss.device())?.to_dtype(loss.dtype())?;
        loss.broadcast_mul(&scale)
    }

    /// Divides the gradients of `vars` by the scale, in place, and records on the device whether
    /// any unscaled value is NaN or infinite (the step then skips). Call it before clipping or
    /// inspecting the gradients; [`step`](Self::step) then does not unscale again. At most once
    /// between two [`update`](Self::update) calls, and not after `step`.
    ///
    /// Vars without a gradient are left out. The gradients must be F32 (master gradients of F32
    /// vars), F64 or BF16: F16 gradients are refused, as by PyTorch (mixed precision keeps the
    /// vars in F32 and runs the forward pass in F16, casting the vars inside it; the gradients of
    /// the vars are then F32). Nothing changes when it fails.
    ///
    /// ```
    /// use candle_core::{DType, Device, Var};
    /// let mut scaler = candle_grad_clip::GradScaler::new().with_init_scale(4.0);
    /// let w = Var::new(&[1f32, 2.0], &Device::Cpu)?;
    /// let mut grads = scaler.scale(&w.as_tensor().sum_all()?)?.backward()?;
    /// scaler.unscale_(&[w.clone()], &mut grads)?;
    /// assert_eq!(grads.get(&w).unwrap().to_vec1::<f32>()?, [1.0, 1.0]);
    /// assert!(scaler.unscale_(&[w], &mut grads).is_err()); // twice before update
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn unscale_(&mut self, vars: &[Var], grads: &mut GradStore) -> Result<()> {
        self.validate()?;
        match self.stage {
            Stage::Ready => {}
            Stage::Unscaled => bail!(
                "GradScaler::unscale_ has already been called since the last update(); the gradients are unscaled"
            ),
            Stage::Stepped => bail!(
                "GradScaler::unscale_ is being called after step(); call update() first (then scale the next loss)"
            ),
        }
        let targets = checked_grads("GradScaler::unscale_", vars, grads)?;
        self.unscale_targets(targets)?;
        self.stage = Stage::Unscaled;
        Ok(())
    }

    /// Unscales `targets` (checked: contiguous, F32/F64/BF16, one device) in place, records
    /// found-inf and their storages. With no targets nothing is recorded (PyTorch's "no inf
    /// checks": the following `step` or `update` is an error).
    fn unscale_targets(&mut self, targets: Vec<Tensor>) -> Result<()> {
        self.agreed_found_inf = None;
        let Some(first) = targets.first() else {
            return Ok(());
        };
        let device = first.device().clone();
        let keys: Vec<usize> = targets.iter().map(storage_key).collect();
        let distinct = keys.iter().collect::<HashSet<_>>().len() == keys.len();
        let state = self.state_on(&device)?;
        let inv_scale = inv_scale(&state.scale)?;
        if distinct {
            // The CPU twin: one read and one write of each element, in place.
            if let Some(found) = dispatch::grad_scaler::unscale_in_place(&targets, &inv_scale)? {
                state.found_inf = Some(Tensor::new(found as u8 as f32, &device)?);
                self.unscaled.extend(keys);
                return Ok(());
            }
            // Elsewhere, candle's ops: each gradient unscaled and written back before the next
            // one is computed (one gradient's worth of extra memory at a time), then the finite
            // check over the written values, which are the unscaled ones.
            for g in targets.iter().filter(|g| g.elem_count() > 0) {
                let u = unscale(g, &inv_scale)?;
                g.flatten_all()?.slice_set(&u.flatten_all()?, 0, 0)?;
            }
            state.found_inf = Some(found_inf_of(&targets)?);
            self.unscaled.extend(keys);
            return Ok(());
        }
        // Gradients sharing a storage: every value computed from the scaled gradients before the
        // first write, so that each is unscaled once.
        let unscaled: Vec<Tensor> = targets
            .iter()
            .map(|g| unscale(g, &inv_scale))
            .collect::<Result<_>>()?;
        let found_inf = found_inf_of(&unscaled)?;
        for (g, u) in targets.iter().zip(&unscaled) {
            if g.elem_count() > 0 {
                g.flatten_all()?.slice_set(&u.flatten_all()?, 0, 0)?;
            }
        }
        state.found_inf = Some(found_inf);
        self.unscaled.extend(keys);
        Ok(())
    }

    /// Unscales the gradients if [`unscale_`](Self::unscale_) was not called (the store then
    /// holds unscaled gradients), and takes the optimizer's step unless found-inf.
    ///
    /// The fused path is taken for an optimizer whose [`ScaledOptimizer::fused`] lends a fused
    /// optimizer: [`FusedAdamW`](crate::FusedAdamW), [`FusedSgd`](crate::FusedSgd), and a
    /// wrapper of either that forwards `fused()`.
    ///
    /// - [`FusedAdamW`](crate::FusedAdamW) and [`FusedSgd`](crate::FusedSgd) without an earlier `unscale_`: their vars' gradients
    ///   are unscaled, and the fused step runs with its non-finite skip on: the decision is taken
    ///   on the device, with no host read. A skipped step is counted in their `skipped_steps()`.
    ///   The unscale is folded into the step's passes (see the type's documentation).
    ///   None of their vars having a gradient is an error, and nothing changes. When the step
    ///   fails after the unscale (a skip beyond `max_consecutive_skips`), the scaler stays
    ///   unscaled with found-inf recorded: [`update`](Self::update) backs off, and a retry of
    ///   `step` does not unscale again.
    /// - [`FusedAdamW`](crate::FusedAdamW) and [`FusedSgd`](crate::FusedSgd) after [`unscale_`](Self::unscale_): each of their vars'
    ///   gradients must have been unscaled by it, in their storage (an error otherwise, nothing
    ///   changed: a gradient replaced in the store after `unscale_` is refused too); the
    ///   found-inf it recorded decides, read on the host (one synchronisation on CUDA, as
    ///   PyTorch's `step`): when set, the step is not taken and is counted in `skipped_steps()`
    ///   (and towards `max_consecutive_skips`).
    /// - Any other optimizer (its `fused()` is `None`): one host read of found-inf per step (one synchronisation on CUDA),
    ///   and `opt.step` is called only when the gradients are finite. A candle `Optimizer` does
    ///   not expose its vars, so without an earlier [`unscale_`](Self::unscale_) every gradient
    ///   in the store is unscaled and checked (those of the intermediate tensors of the graph
    ///   too: `backward()` keeps them; harmless, but more work, and a non-finite intermediate
    ///   gradient skips the step). A store holding an F16 gradient is refused (an F16 forward
    ///   pass leaves F16 intermediates' gradients the scaler cannot tell from an F16 var's):
    ///   call `unscale_(&vars, &mut grads)` first, which unscales just the vars' gradients.
    ///
    /// At most once between two [`update`](Self::update) calls.
    ///
    /// ```
    /// use candle_core::{DType, Device, Var};
    /// use candle_nn::{Optimizer, SGD};
    /// let mut scaler = candle_grad_clip::GradScaler::new();
    /// let w = Var::new(&[1f32, 2.0], &Device::Cpu)?;
    /// let mut opt = SGD::new(vec![w.clone()], 0.5)?;
    /// let mut grads = scaler.scale(&w.as_tensor().sum_all()?)?.backward()?;
    /// scaler.step(&mut opt, &grads)?; // unscales the store's gradients, then steps
    /// assert_eq!(grads.get(&w).unwrap().to_vec1::<f32>()?, [1.0, 1.0]);
    /// scaler.update()?;
    /// assert_eq!(w.to_vec1::<f32>()?, [0.5, 1.5]);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn step<O: ScaledOptimizer>(&mut self, opt: &mut O, grads: &GradStore) -> Result<()> {
        self.validate()?;
        if self.stage == Stage::Stepped {
            bail!("GradScaler::step has already been called since the last update()")
        }
        if let Some(fused) = opt.fused() {
            return self.step_fused(fused.0, grads);
        }
        if self.stage == Stage::Ready {
            // The optimizer's vars are unknown: unscale every gradient of the store (refused
            // when one is F16: see above).
            let targets = store_grads(grads)?;
            if targets.is_empty() {
                bail!("GradScaler::step: no inf checks were recorded for this optimizer: the store holds no gradient; nothing was changed")
            }
            self.unscale_targets(targets)?;
            self.stage = Stage::Unscaled;
        }
        if !self.has_found_inf() {
            bail!("GradScaler::step: no inf checks were recorded for this optimizer: unscale_ found no gradient; nothing was changed")
        }
        // The one documented host read of the path.
        if !self.found_inf_on_host()? {
            opt.step(grads)?;
        }
        self.stage = Stage::Stepped;
        Ok(())
    }

    /// Whether found-inf was recorded since the last update.
    fn has_found_inf(&self) -> bool {
        self.state.as_ref().is_some_and(|s| s.found_inf.is_some())
    }

    fn found_inf_on_host(&self) -> Result<bool> {
        match self.state.as_ref().and_then(|s| s.found_inf.as_ref()) {
            Some(f) => Ok(f.to_dtype(DType::F32)?.to_scalar::<f32>()? != 0.0),
            None => bail!("internal error: GradScaler has no found-inf after unscaling"),
        }
    }

    /// Adapts the scale to this step, on the device, as PyTorch's `_amp_update_scale_`: after a
    /// non-finite step the scale is multiplied by `backoff_factor` and the tracker reset; after a
    /// clean one the tracker counts it, and at `growth_interval` the scale is multiplied by
    /// `growth_factor` (only if the result is finite in `f32`: the scale never exceeds
    /// `f32::MAX`) and the tracker reset. Each product is computed in `f64` and rounded to `f32`.
    /// An error before any [`unscale_`](Self::unscale_) or [`step`](Self::step) since the last
    /// update.
    ///
    /// ```
    /// let mut scaler = candle_grad_clip::GradScaler::new();
    /// assert!(scaler.update().is_err()); // no step recorded
    /// ```
    pub fn update(&mut self) -> Result<()> {
        self.validate()?;
        if self.stage == Stage::Ready {
            bail!("GradScaler::update: no inf checks were recorded prior to update (call step, or unscale_, first)")
        }
        let Some(found_inf) = self.state.as_ref().and_then(|s| s.found_inf.as_ref()) else {
            // `unscale_` found no gradient: the step is dropped, the scale kept.
            self.stage = Stage::Ready;
            self.unscaled.clear();
            self.agreed_found_inf = None;
            bail!("GradScaler::update: no inf checks were recorded prior to update (unscale_ found no gradient); the scale is unchanged and the scaler ready for the next step")
        };
        let found_inf = found_inf.clone();
        let Some(state) = self.state.as_mut() else {
            bail!("internal error: GradScaler has no state after a step")
        };
        let device = state.device().clone();
        let scale64 = state.scale.to_dtype(DType::F64)?;
        let backed_off = scale64
            .affine(self.backoff_factor, 0.0)?
            .to_dtype(DType::F32)?;
        let grown = scale64
            .affine(self.growth_factor, 0.0)?
            .to_dtype(DType::F32)?;
        // The constants, each made on the device (no transfer).
        let f32_max = Tensor::full(f32::MAX, (), &device)?;
        let interval = Tensor::full(self.growth_interval as f64, (), &device)?;
        let zero = Tensor::zeros((), DType::F64, &device)?;
        let successful = state.growth_tracker.affine(1.0, 1.0)?;
        let at_interval = successful.eq(&interval)?;
        // NaN compares false: `|grown| <= f32::MAX` is "finite".
        let grown_finite = grown.abs()?.le(&f32_max)?;
        let clean_scale = at_interval
            .mul(&grown_finite)?
            .where_cond(&grown, &state.scale)?;
        let clean_tracker = at_interval.where_cond(&zero, &successful)?;
        let found = found_inf.ne(&Tensor::zeros((), DType::F32, &device)?)?;
        let scale = found.where_cond(&backed_off, &clean_scale)?;
        let growth_tracker = found.where_cond(&zero, &clean_tracker)?;
        state.scale = scale;
        state.growth_tracker = growth_tracker;
        state.found_inf = None;
        self.stage = Stage::Ready;
        self.unscaled.clear();
        self.agreed_found_inf = None;
        Ok(())
    }

    /// Whether a step is in progress: `unscale_` or `step` was called since the last `update`.
    pub(crate) fn step_in_progress(&self) -> bool {
        self.stage != Stage::Ready
    }

    /// The current scale, read back (one transfer on CUDA); the initial scale before the first
    /// use.
    ///
    /// ```
    /// assert_eq!(candle_grad_clip::GradScaler::new().with_init_scale(2.0).scale_value()?, 2.0);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn scale_value(&self) -> Result<f64> {
        self.validate()?;
        match &self.state {
            Some(s) => Ok(s.scale.to_scalar::<f32>()? as f64),
            None => Ok(self.init_scale as f32 as f64),
        }
    }
}

/// Not part of the API (hidden; may change at any time): the reduction of [`GradScaler`]'s
/// one-read path on the CPU, alone: the norm of the gradients of `vars`, each element multiplied
/// by `inv_scale` and rounded as [`GradScaler::unscale_`] rounds it as it is read, nothing
/// written (a NaN or infinite result is found-inf). For `benches/scaler_ratios.rs`, which
/// compares it with the plain norm pass.
#[doc(hidden)]
pub fn __unscaled_norm_cpu(
    vars: &[Var],
    grads: &GradStore,
    inv_scale: f32,
    norm_type: NormType,
) -> Result<f64> {
    let set = GradientSet::collect(vars, grads)?;
    if !set.device().is_cpu() {
        bail!("__unscaled_norm_cpu: CPU gradients only")
    }
    dispatch::grad_scaler::norm_unscaled_on_cpu(&set, norm_type, inv_scale)
}
