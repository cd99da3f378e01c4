//! One step of [`Clipped`]: collect and check the gradients, clip them in place by the setting
//! (on this rank or across a process group), skip a non-finite step, step the inner optimizer,
//! keep the counters.

use candle_core::{backprop::GradStore, DType, Result, Tensor};
use candle_nn::Optimizer;

use super::Clipped;
use crate::clip::agc::adaptive_clip;
use crate::clip::norm::{clip_grads_with_norm_, total_norm};
use crate::clip::value::clip_grad_value_;
use crate::dist::agreement::{refuse, Agreement, Call, Field, RankError, Refusal};
use crate::dist::{self, ProcessGroup};
use crate::ops::clip::{returned_norm, DEFAULT_EPS};
use crate::ops::gradients::{check_matches_var, GradientSet};
use crate::ops::norm_type::NormType;
use crate::optim::clip_setting::{agree_on, ClipSetting};

const CALLER: &str = "Clipped::step_across";

impl<O: Optimizer> Clipped<O> {
    pub(super) fn step_with(
        &mut self,
        grads: &GradStore,
        group: Option<&dyn ProcessGroup>,
    ) -> Result<()> {
        // `GradStore` cannot be cloned or mutated through `&`, but its tensors are shared
        // handles: a new store holding the same tensors, clipped in place, clips the caller's.
        let mut view = GradStore::default();
        let mut refused = None;
        for (i, var) in self.vars.iter().enumerate() {
            if let Some(grad) = grads.get(var.as_tensor()) {
                // What the inner optimizer would refuse after we clipped: refuse it before.
                if let Err(e) = check_matches_var("Clipped::step", i, var, grad) {
                    refused = Some(e);
                    break;
                }
                view.insert(var.as_tensor(), grad.clone());
            }
        }
        // Across ranks, everything that can refuse this rank's step (the checks above, gradients
        // that cannot be written, an earlier step that failed past its collective) is decided
        // before the first collective, and travels in it (`prior`): a refused rank still takes
        // part, so that every rank fails with it. Every path below makes a collective first.
        let mut prior: Option<RankError> = None;
        if let Some(group) = group {
            prior = match (&self.diverged, refused) {
                (Some(earlier), _) => Some(RankError::new(
                    Refusal::Diverged,
                    candle_core::Error::Msg(format!(
                        "{CALLER}: rank {}: an earlier step failed on this rank after its collective ({earlier}), so its vars differ from the other ranks': restore every rank from a checkpoint; nothing was modified",
                        group.rank()
                    ))
                    .bt(),
                )),
                (None, Some(e)) => Some(RankError::new(Refusal::Gradients, e)),
                (None, None) => GradientSet::collect(&self.vars, &view)
                    .and_then(|set| set.storage_groups().map(|_| ()))
                    .err()
                    .map(|e| RankError::new(Refusal::Gradients, e)),
            };
        } else if let Some(e) = refused {
            return Err(e);
        }
        let agreement = self.agreement();
        // With skipping on, the largest |g| decides first, before anything is written (one host
        // read: whether to call the inner optimizer is decided on the host); across ranks, the
        // largest over every rank's, so that every rank skips together (its value comes back
        // from the collective on the host: nothing can fail between it and the clip's).
        let mut largest = None;
        if self.skip.skip_nonfinite {
            let (value, norm) = match group {
                Some(group) => {
                    let local = match prior.take() {
                        Some(e) => Err(e),
                        None => refuse(Refusal::Gradients, GradientSet::collect(&self.vars, &view)),
                    };
                    let (value, norm) =
                        dist::set_norm_across(CALLER, local, NormType::Inf, agreement, group)?;
                    (returned_norm(value, norm.dtype()), norm)
                }
                None => {
                    let norm = total_norm(&self.vars, &view, NormType::Inf, false)?;
                    (norm.to_dtype(DType::F64)?.to_scalar::<f64>()?, norm)
                }
            };
            if !value.is_finite() {
                self.skip.check_run("Clipped::step", self.skip_run)?;
                self.skip_run += 1;
                self.skipped += 1;
                self.last_norm = Some(norm);
                return Ok(());
            }
            largest = Some(norm);
        }
        self.clip_and_step(grads, view, group, largest, prior, agreement)
    }

    /// The settings every rank's step must agree on.
    fn agreement(&self) -> Agreement {
        self.skip
            .agree_on(agree_on(
                Some(&self.clip),
                Agreement::new(Call::ClippedStep),
            ))
            .set(Field::Optimizer, 3)
    }

    /// Clips `view` by the setting (across ranks: after the clip's collective, which carries
    /// `prior`) and steps the inner optimizer.
    fn clip_and_step(
        &mut self,
        grads: &GradStore,
        mut view: GradStore,
        group: Option<&dyn ProcessGroup>,
        largest: Option<Tensor>,
        mut prior: Option<RankError>,
        agreement: Agreement,
    ) -> Result<()> {
        // Whether this rank is past the step's last collective (set by each path once its
        // collective returned): across ranks, a failure from then on is this rank's alone.
        let mut past_collective = false;
        // The policies' state changes with the clip; put it back if the inner step fails.
        let saved_clip = matches!(self.clip, ClipSetting::AutoClip(_) | ClipSetting::ZClip(_))
            .then(|| self.clip.clone());
        let vars = &self.vars;
        let clipped = (|| -> Result<(Tensor, Tensor)> {
            Ok(match &mut self.clip {
                ClipSetting::Norm(clip) => {
                    let norm = match group {
                        Some(group) => {
                            // The norm's collective, then the scale pass (past it).
                            let plan = dist::plan_clip_across(
                                vars,
                                &[],
                                &view,
                                clip.settings(),
                                Ok(()),
                                agreement,
                                prior.take(),
                                group,
                            )?;
                            past_collective = true;
                            plan.apply()?
                        }
                        None => clip.clip_(vars, &mut view)?,
                    };
                    let not_clipped = not_clipped_by_norm(&norm, clip.max_norm(), clip.eps())?;
                    (norm, not_clipped)
                }
                ClipSetting::Value { clip_value } => {
                    let norm = match (largest, group) {
                        (Some(norm), _) => norm,
                        (None, Some(group)) => dist::vars_norm_across(
                            CALLER,
                            vars,
                            &view,
                            NormType::Inf,
                            agreement,
                            prior.take(),
                            group,
                        )?,
                        (None, None) => total_norm(vars, &view, NormType::Inf, false)?,
                    };
                    past_collective = true;
                    clip_grad_value_(vars, &mut view, *clip_value)?;
                    let not_clipped = not_clipped_by_norm(&norm, *clip_value, 0.0)?;
                    (norm, not_clipped)
                }
                ClipSetting::AutoClip(autoclip) => {
                    let (norm, threshold) = match group {
                        Some(group) => {
                            // As `AutoClip::clip_`, with the global norm.
                            let norm = dist::vars_norm_across(
                                CALLER,
                                vars,
                                &view,
                                NormType::L2,
                                agreement,
                                prior.take(),
                                group,
                            )?;
                            past_collective = true;
                            let value = norm.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                            let threshold = autoclip.threshold_with(value);
                            clip_grads_with_norm_(vars, &mut view, threshold, &norm)?;
                            autoclip.record(value);
                            (norm, threshold)
                        }
                        None => autoclip.clip_with_threshold_(vars, &mut view)?,
                    };
                    let not_clipped = not_clipped_by_norm(&norm, threshold, DEFAULT_EPS)?;
                    (norm, not_clipped)
                }
                ClipSetting::ZClip(zclip) => {
                    // A step without gradients leaves ZClip alone (and is not clipped).
                    let any = self.vars.iter().any(|v| view.get(v.as_tensor()).is_some());
                    match group {
                        Some(group) => {
                            // ZClip on the global norm: its statistics updated on the host (the norm
                            // across ranks is read there anyway), the coefficient applied as a
                            // given norm.
                            // The exact global norm (not its F32 rounding): ZClip's input rule
                            // (`zclip::input`) needs it, as in one process.
                            let local = match prior.take() {
                                Some(e) => Err(e),
                                None => {
                                    refuse(Refusal::Gradients, GradientSet::collect(vars, &view))
                                }
                            };
                            let (value, norm) = dist::set_norm_across(
                                CALLER,
                                local,
                                NormType::L2,
                                agreement,
                                group,
                            )?;
                            past_collective = true;
                            let (given, max_norm, eps) =
                                zclip.step_for_norm(value, norm.dtype(), norm.device())?;
                            let c = zclip.last_coefficient()?.unwrap_or(1.0);
                            if any {
                                let given =
                                    Tensor::new(given, norm.device())?.to_dtype(DType::F64)?;
                                crate::clip::norm::scale_with_given_norm(
                                    vars, &mut view, max_norm, eps, &given,
                                )?;
                            }
                            let not_clipped = Tensor::new(u8::from(c >= 1.0), norm.device())?;
                            (norm, not_clipped)
                        }
                        None => {
                            let norm = zclip.clip_(vars, &mut view)?;
                            // Not clipped iff the coefficient was 1 (false for NaN), on the device.
                            let not_clipped = match zclip.last_coefficient_tensor()? {
                                Some(c) if any => c.ge(1.0)?,
                                _ => Tensor::new(1u8, norm.device())?,
                            };
                            (norm, not_clipped)
                        }
                    }
                }
                ClipSetting::Agc { clipping, eps } => {
                    // Unit-wise: each rank clips its own units; across ranks `last_norm` is the
                    // global L2 norm before clipping.
                    let global = match group {
                        Some(group) => {
                            let norm = dist::vars_norm_across(
                                CALLER,
                                vars,
                                &view,
                                NormType::L2,
                                agreement,
                                prior.take(),
                                group,
                            )?;
                            past_collective = true;
                            Some(norm)
                        }
                        None => None,
                    };
                    let outcome = adaptive_clip(vars, &view, *clipping, *eps)?;
                    // Not clipped iff no unit was, on the device.
                    let clipped = outcome.clipped;
                    (
                        global.unwrap_or(outcome.norm),
                        clipped.eq(&clipped.zeros_like()?)?,
                    )
                }
            })
        })();
        // A failed clip leaves the policies as they were (nothing was written then either).
        let (norm, not_clipped) = match clipped {
            Ok(done) => done,
            Err(e) => {
                if let Some(clip) = saved_clip {
                    self.clip = clip;
                }
                self.diverge_if(group.filter(|_| past_collective), &e);
                return Err(e);
            }
        };
        if let Err(e) = self.inner.step(grads) {
            if let Some(clip) = saved_clip {
                self.clip = clip;
            }
            self.diverge_if(group, &e);
            return Err(e);
        }
        self.count(not_clipped)?;
        self.steps += 1;
        self.skip_run = 0;
        self.last_norm = Some(norm);
        Ok(())
    }
}

impl<O> Clipped<O> {
    /// Across ranks (`group`), after a failure past the step's collective on this rank alone
    /// (the other ranks stepped): every later `step_across` is refused on every rank.
    fn diverge_if(&mut self, group: Option<&dyn ProcessGroup>, e: &candle_core::Error) {
        if let Some(group) = group {
            self.diverged
                .get_or_insert_with(|| format!("rank {}: {e}", group.rank()));
            group.mark_out_of_step();
        }
    }

    /// Adds this step to the lazy count of unclipped steps, on the count's device.
    fn count(&mut self, not_clipped: Tensor) -> Result<()> {
        let not_clipped = match &self.unclipped {
            Some(count) => not_clipped.to_device(count.device())?,
            None => not_clipped,
        }
        .to_dtype(DType::U32)?;
        self.unclipped = Some(match &self.unclipped {
            Some(count) => (count + not_clipped)?,
            None => not_clipped,
        });
        Ok(())
    }
}

/// Whether a step with this `norm` was left unclipped by `threshold` (a 0-d `U8` on the norm's
/// device): `norm + eps - threshold <= 0`, false for NaN and for `inf - inf`; an infinite
/// threshold never clips, so only a NaN norm (NaN coefficient) counts as clipped then.
fn not_clipped_by_norm(norm: &Tensor, threshold: f64, eps: f64) -> Result<Tensor> {
    let norm = norm.to_dtype(DType::F64)?;
    if threshold == f64::INFINITY {
        norm.eq(&norm)
    } else {
        let margin = norm.affine(1.0, eps - threshold)?;
        margin.le(&margin.zeros_like()?)
    }
}
