//! GradScaler across the ranks of a process group (sharded gradients): found-inf agreed over
//! every rank, as PyTorch's `ShardedGradScaler`, so that every rank skips the same steps and
//! backs the scale off alike.

use candle_core::{backprop::GradStore, DType, Device, Result, Tensor, Var};

use super::grads::{checked_grads, inv_scale, store_grads, unscale};
use super::{GradScaler, Stage};
use crate::amp::scaled::FusedStep;
use crate::amp::scaled::ScaledOptimizer;
use crate::dispatch;
use crate::dist::agreement::{hash_words, refuse, Agreement, Call, Field, RankError, Refusal};
use crate::dist::{max_across, ProcessGroup};
use crate::ops::gradients::GradientSet;
use crate::ops::norm_type::NormType;

const UNSCALE: &str = "GradScaler::unscale_across_";
const STEP: &str = "GradScaler::step_across";

impl GradScaler {
    /// [`unscale_`](Self::unscale_) for gradients spread over the ranks of `group` (each rank
    /// passes the vars it owns): found-inf is agreed over every rank (one small collective), as
    /// by PyTorch's `ShardedGradScaler`, so that [`step`](Self::step) skips and
    /// [`update`](Self::update) backs off alike on every rank and the scales never diverge. The
    /// unscaled gradients, found-inf and the next scale are bitwise those of one process holding
    /// every rank's gradients.
    ///
    /// Every check that can refuse this rank's call (the settings, the order of the calls, the
    /// gradients, their device) runs before the collective, and a found-inf is computed from the
    /// scaled gradients without writing them (one read); the gradients are unscaled in place only
    /// once every rank agreed. A refused rank still takes part: every rank returns an error that
    /// names it, and nothing changes on any rank. The scaler's settings and current scale travel
    /// as a fingerprint in the same collective: ranks whose scales differ (a checkpoint restored
    /// on one rank only) all fail. A device error in the unscale pass, after the collective,
    /// fails that rank alone (its gradients may be partly unscaled, its scaler is not unscaled;
    /// the other ranks' are): its next call across ranks then differs from theirs, and every
    /// rank fails there.
    ///
    /// A rank with no gradient still takes part (its found-inf is the others'); when no rank
    /// has one, nothing is recorded, as by `unscale_`.
    ///
    /// ```
    /// use candle_core::{backprop::GradStore, Device, Tensor, Var};
    /// use candle_grad_clip::{GradScaler, LocalGroup};
    /// # fn main() -> candle_core::Result<()> {
    /// // Two ranks own one gradient each; rank 1's overflowed: both skip and back off.
    /// let scales = std::thread::scope(|s| {
    ///     let handles: Vec<_> = LocalGroup::new(2)?
    ///         .into_iter()
    ///         .zip([1f32, f32::INFINITY])
    ///         .map(|(group, g)| {
    ///             s.spawn(move || -> candle_core::Result<f64> {
    ///                 let mut scaler = GradScaler::new().with_init_scale(4.0);
    ///                 let w = Var::new(&[0f32], &Device::Cpu)?;
    ///                 let mut grads = GradStore::default();
    ///                 grads.insert(&w, Tensor::new(&[g], &Device::Cpu)?);
    ///                 scaler.unscale_across_(&[w], &mut grads, &group)?;
    ///                 scaler.update()?;
    ///                 scaler.scale_value()
    ///             })
    ///         })
    ///         .collect();
    ///     handles.into_iter().map(|h| h.join().unwrap()).collect::<candle_core::Result<Vec<_>>>()
    /// })?;
    /// assert_eq!(scales, [2.0, 2.0]);
    /// # Ok(()) }
    /// ```
    pub fn unscale_across_(
        &mut self,
        vars: &[Var],
        grads: &mut GradStore,
        group: &dyn ProcessGroup,
    ) -> Result<()> {
        let targets = checked_grads(UNSCALE, vars, grads);
        self.unscale_targets_across(UNSCALE, targets, None, group)
    }

    /// [`step`](Self::step) across the ranks of `group`: without an earlier
    /// [`unscale_across_`](Self::unscale_across_), the gradients are unscaled with found-inf
    /// agreed over every rank (the optimizer's vars for [`FusedAdamW`](crate::FusedAdamW) and [`FusedSgd`](crate::FusedSgd); every
    /// gradient of the store for another optimizer, as `step`); then every rank skips alike, or
    /// steps: a fused optimizer through its `step_across` (its clip on the norm over every
    /// rank, its skip decided over every rank), another optimizer through its `step`. At most
    /// once between two [`update`](Self::update) calls; a rank that calls it out of order is
    /// refused in the collective, so every rank fails.
    ///
    /// (For [`Clipped`](crate::Clipped), whose clip across ranks needs its own `step_across`,
    /// call [`unscale_across_`](Self::unscale_across_), then `step_across` of the optimizer
    /// unless the scaler found an overflow: see [`found_inf`](Self::found_inf).)
    ///
    /// ```
    /// use candle_core::{backprop::GradStore, Device, Tensor, Var};
    /// use candle_nn::{Optimizer, ParamsAdamW};
    /// use candle_grad_clip::{ClipSetting, FusedAdamW, GradScaler, LocalGroup};
    /// # fn main() -> candle_core::Result<()> {
    /// let skipped = std::thread::scope(|s| {
    ///     let handles: Vec<_> = LocalGroup::new(2)?
    ///         .into_iter()
    ///         .zip([1f32, f32::NAN])
    ///         .map(|(group, g)| {
    ///             s.spawn(move || -> candle_core::Result<u64> {
    ///                 let w = Var::new(&[0f32], &Device::Cpu)?;
    ///                 let mut opt = FusedAdamW::new(vec![w.clone()], ParamsAdamW::default())?
    ///                     .with_clip(ClipSetting::norm(1.0))?;
    ///                 let mut scaler = GradScaler::new();
    ///                 let mut grads = GradStore::default();
    ///                 grads.insert(&w, Tensor::new(&[g], &Device::Cpu)?);
    ///                 scaler.step_across(&mut opt, &grads, &group)?;
    ///                 scaler.update()?;
    ///                 opt.skipped_steps()
    ///             })
    ///         })
    ///         .collect();
    ///     handles.into_iter().map(|h| h.join().unwrap()).collect::<candle_core::Result<Vec<_>>>()
    /// })?;
    /// assert_eq!(skipped, [1, 1]); // rank 1's NaN skips the step on both ranks
    /// # Ok(()) }
    /// ```
    pub fn step_across<O: ScaledOptimizer>(
        &mut self,
        opt: &mut O,
        grads: &GradStore,
        group: &dyn ProcessGroup,
    ) -> Result<()> {
        if let Some(fused) = opt.fused() {
            return self.step_fused_across(fused.0, grads, group);
        }
        if self.stage != Stage::Unscaled {
            // The optimizer's vars are unknown: every gradient of the store, as `step`.
            self.unscale_targets_across(STEP, store_grads(grads), self.out_of_order(), group)?;
        }
        if !self.found_inf_agreed()? {
            opt.step(grads)?;
        }
        self.stage = Stage::Stepped;
        Ok(())
    }

    /// Whether the last [`unscale_`](Self::unscale_) or
    /// [`unscale_across_`](Self::unscale_across_) found a NaN or an infinity (across ranks: on
    /// any rank), read on the host (one synchronisation on CUDA); `None` when nothing was
    /// recorded since the last [`update`](Self::update).
    ///
    /// ```
    /// use candle_core::{Device, Var};
    /// let mut scaler = candle_grad_clip::GradScaler::new();
    /// assert_eq!(scaler.found_inf()?, None);
    /// let w = Var::new(&[1f32], &Device::Cpu)?;
    /// let mut grads = scaler.scale(&w.as_tensor().sum_all()?)?.backward()?;
    /// scaler.unscale_(&[w], &mut grads)?;
    /// assert_eq!(scaler.found_inf()?, Some(false));
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn found_inf(&self) -> Result<Option<bool>> {
        if !self.has_found_inf() {
            return Ok(None);
        }
        self.found_inf_on_host().map(Some)
    }

    /// `step_across` with a fused optimizer.
    fn step_fused_across(
        &mut self,
        opt: &mut dyn FusedStep,
        grads: &GradStore,
        group: &dyn ProcessGroup,
    ) -> Result<()> {
        if self.stage != Stage::Unscaled {
            let targets = checked_grads(STEP, opt.vars(), grads);
            self.unscale_targets_across(STEP, targets, self.out_of_order(), group)?;
        }
        // Found-inf is every rank's: every rank records the skip, or every rank steps (the
        // step's own collective then carries its refusals and settings).
        if self.found_inf_agreed()? {
            opt.record_skip()?;
        } else {
            opt.step_skipping_across(grads, group)?;
        }
        self.stage = Stage::Stepped;
        Ok(())
    }

    /// Found-inf as every rank agreed on it (on the host: nothing to read, nothing that can fail
    /// on one rank only). An error on every rank alike when no rank had a gradient, or when the
    /// gradients were unscaled by a local `unscale_` (whose found-inf is this rank's alone).
    fn found_inf_agreed(&self) -> Result<bool> {
        match self.agreed_found_inf {
            Some(found) => Ok(found),
            None if self.has_found_inf() => candle_core::bail!(
                "{STEP}: the gradients were unscaled by unscale_, whose found-inf is this rank's alone: call unscale_across_ (or nothing) before step_across; nothing was changed"
            ),
            None => candle_core::bail!(
                "{STEP}: no inf checks were recorded for this optimizer: no rank has a gradient of its vars; nothing was changed"
            ),
        }
    }

    /// The refusal of a `step_across` after `step` (the order of the calls).
    fn out_of_order(&self) -> Option<RankError> {
        (self.stage == Stage::Stepped).then(|| {
            RankError::new(
                Refusal::Sequence,
                candle_core::Error::Msg(format!(
                    "{STEP} has already been called since the last update()"
                ))
                .bt(),
            )
        })
    }

    /// Unscales `targets` (checked) with found-inf agreed over the ranks of `group`; `prior`
    /// refuses this rank before anything (it still takes part).
    fn unscale_targets_across(
        &mut self,
        caller: &'static str,
        targets: Result<Vec<Tensor>>,
        prior: Option<RankError>,
        group: &dyn ProcessGroup,
    ) -> Result<()> {
        let local = (|| {
            if let Some(e) = prior {
                return Err(e);
            }
            refuse(Refusal::Settings, self.validate())?;
            let sequence = match self.stage {
                Stage::Ready => Ok(()),
                Stage::Unscaled => Err(candle_core::Error::Msg(format!(
                    "{caller}: unscale has already been called since the last update(); the gradients are unscaled"
                ))),
                Stage::Stepped => Err(candle_core::Error::Msg(format!(
                    "{caller}: unscale is being called after step(); call update() first (then scale the next loss)"
                ))),
            };
            refuse(Refusal::Sequence, sequence)?;
            let targets = refuse(Refusal::Gradients, targets)?;
            let device = group.device();
            if let Some(first) = targets.first() {
                if !first.device().same_device(&device) {
                    return Err(RankError::new(
                        Refusal::Device,
                        candle_core::Error::Msg(format!(
                            "{caller}: rank {} of {}: the gradients are on {:?} but the process group reduces gradients on {:?}; nothing was modified",
                            group.rank(),
                            group.world_size(),
                            first.device().location(),
                            device.location()
                        )),
                    ));
                }
            }
            let found = refuse(Refusal::Reduction, self.found_inf_read_only(&targets))?;
            Ok((targets, found))
        })();
        let agreement = self.agreement();
        let (local, targets) = match local {
            Ok((targets, found)) => (
                Ok([u64::from(found), u64::from(!targets.is_empty())]),
                targets,
            ),
            Err(e) => (Err(e), Vec::new()),
        };
        let [found, any] = max_across(caller, local, agreement, group)?;
        if any == 0 {
            // No rank has a gradient: nothing recorded, as `unscale_` with none.
            self.agreed_found_inf = None;
            self.stage = Stage::Unscaled;
            return Ok(());
        }
        // Every rank agreed: unscale this rank's gradients in place, and record the global
        // found-inf (also on a rank without gradients, on the group's device).
        let device = targets
            .first()
            .map_or_else(|| group.device(), |t| t.device().clone());
        if !targets.is_empty() {
            // Past the collective: a failure leaves this rank's gradients partly unscaled, so
            // its next collective through `group` fails on every rank.
            self.unscale_targets(targets)
                .inspect_err(|_| group.mark_out_of_step())?;
        }
        let state = self.state_on(&device)?;
        state.found_inf = Some(Tensor::new(found as u8 as f32, &device)?);
        self.agreed_found_inf = Some(found != 0);
        self.stage = Stage::Unscaled;
        Ok(())
    }

    /// The settings every rank's scaler must share, with its current scale.
    fn agreement(&self) -> Agreement {
        let scale = self.scale_value().unwrap_or(f64::NAN);
        Agreement::new(Call::ScalerUnscale)
            .set_f64(Field::Scale, scale)
            .set(
                Field::ScalerSettings,
                hash_words(&[
                    self.growth_factor.to_bits(),
                    self.backoff_factor.to_bits(),
                    self.growth_interval as u64,
                ]),
            )
    }

    /// Whether any of `targets` is NaN or infinite once unscaled, without writing them: on the
    /// CPU the unscaled largest `|g|` of the one-read path; elsewhere each gradient unscaled with
    /// candle's ops into a temporary, one at a time.
    fn found_inf_read_only(&self, targets: &[Tensor]) -> Result<bool> {
        let Some(first) = targets.first() else {
            return Ok(false);
        };
        let device: Device = first.device().clone();
        let inv = inv_scale(&self.scale_tensor(&device)?)?;
        if device.is_cpu() {
            let inv = inv.to_dtype(DType::F32)?.to_scalar::<f32>()?;
            let set = GradientSet::from_grads(targets.to_vec())?;
            let largest = dispatch::grad_scaler::norm_unscaled_on_cpu(&set, NormType::Inf, inv)?;
            return Ok(!largest.is_finite());
        }
        let mut found = Tensor::zeros((), DType::F32, &device)?;
        for g in targets.iter().filter(|g| g.elem_count() > 0) {
            let u = unscale(g, &inv)?;
            found = found.maximum(&super::grads::found_inf_of(&[u])?)?;
        }
        Ok(found.to_scalar::<f32>()? != 0.0)
    }
}
