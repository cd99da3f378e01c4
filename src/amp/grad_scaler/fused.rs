//! GradScaler with the fused optimizers: the one-read path (the step unscales each gradient as it
//! reads it; found-inf is whether the step was skipped, on the device), or `unscale_` then the
//! step.

use std::collections::HashSet;

use candle_core::{backprop::GradStore, bail, DType, Result, Tensor};

use super::grads::{checked_grads, inv_scale};
use super::{GradScaler, Stage};
use crate::amp::scaled::FusedStep;
use crate::dispatch;
use crate::ops::gradients::storage_key;
use crate::optim::clip_setting::prescale_supports;

impl GradScaler {
    /// `step` with a fused optimizer (see [`step`](Self::step)).
    pub(super) fn step_fused(&mut self, opt: &mut dyn FusedStep, grads: &GradStore) -> Result<()> {
        match self.stage {
            Stage::Ready => {
                let targets = checked_grads("GradScaler::step", opt.vars(), grads)?;
                if targets.is_empty() {
                    bail!("GradScaler::step: no inf checks were recorded for this optimizer: none of its vars has a gradient in the store; nothing was changed")
                }
                let device = opt.device().clone();
                let distinct = targets
                    .iter()
                    .map(storage_key)
                    .collect::<HashSet<_>>()
                    .len()
                    == targets.len();
                let one_read = dispatch::fused_step::runs_prescaled(&device)
                    && distinct
                    && prescale_supports(opt.clip())
                    && !opt.has_skip_limit();
                if one_read {
                    // inv_scale stays on the device: the kernels read it there (the CPU twin
                    // reads it, which costs nothing there).
                    let state = self.state_on(&device)?;
                    let inv = inv_scale(&state.scale)?;
                    let before = opt.skipped_steps_on_device()?;
                    // Without a skip limit, a failed step changes nothing (the gradients stay
                    // scaled, the scaler ready).
                    opt.step_skipping(grads, Some(&inv))?;
                    self.record_fused(&before, &opt.skipped_steps_on_device()?)?;
                } else {
                    self.unscale_targets(targets)?;
                    // From here on a failed step (max_consecutive_skips) leaves the scaler
                    // unscaled with found-inf recorded: `update` works, and a retry of `step`
                    // reads found-inf instead of unscaling again.
                    self.stage = Stage::Unscaled;
                    opt.step_skipping(grads, None)?;
                }
            }
            Stage::Unscaled => {
                // After `unscale_`: every gradient the step reads must have been unscaled.
                for (i, var) in opt.vars().iter().enumerate() {
                    if let Some(grad) = grads.get(var.as_tensor()) {
                        if !self.unscaled.contains(&storage_key(grad)) {
                            bail!("GradScaler::step: the gradient of the optimizer's var #{i} was not unscaled: unscale_ was called without it (pass all the optimizer's vars to unscale_), or the gradient was replaced in the store after unscale_ (modify it in place, as the crate's clips do); nothing was changed")
                        }
                    }
                }
                if !self.has_found_inf() {
                    bail!("GradScaler::step: no inf checks were recorded for this optimizer: unscale_ found no gradient; nothing was changed")
                }
                // Found-inf as unscale_ recorded it (the gradients may have been clipped since):
                // one host read, as PyTorch's step after unscale_.
                if self.found_inf_on_host()? {
                    opt.record_skip()?;
                } else {
                    opt.step_skipping(grads, None)?;
                }
            }
            Stage::Stepped => {
                bail!("GradScaler::step has already been called since the last update()")
            }
        }
        self.stage = Stage::Stepped;
        Ok(())
    }

    /// After a fused step on the one-read path: found-inf is whether the step was skipped, the
    /// skipped-step counts after minus before (1-element `I64` tensors), computed on the device
    /// (no host read); the gradients are unscaled.
    fn record_fused(&mut self, skipped_before: &Tensor, skipped_after: &Tensor) -> Result<()> {
        let Some(state) = self.state.as_mut() else {
            bail!("internal error: GradScaler has no state after a prescaled step")
        };
        let found = (skipped_after - skipped_before)?
            .to_dtype(DType::F32)?
            .squeeze(0)?;
        state.found_inf = Some(found);
        Ok(())
    }
}
