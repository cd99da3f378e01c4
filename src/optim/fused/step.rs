//! One fused optimizer step: collect and check the gradients, decide the clip (on this rank or
//! across a process group), run the fused update (`dispatch::fused_step`), keep the counters.

use candle_core::{backprop::GradStore, bail, DType, Result, Tensor, Var};

use super::{FusedCore, CALLER};
use crate::dispatch;
use crate::dist;
use crate::dist::agreement::{refuse, Agreement, Call, Field, RankError, Refusal};
use crate::dist::ProcessGroup;
use crate::ops::clip::{nonfinite_error, returned_norm};
use crate::ops::fault;
use crate::ops::fused_step::{Rule, Step, StepClip, Target};
use crate::ops::gradients::{check_matches_var, storage_key, GradientSet};
use crate::ops::norm_type::NormType;
use crate::optim::clip_setting::{agree_on, prescale_supports, ClipSetting};
use crate::optim::decide::{GivenNorm, PolicyStep};

/// A step across the ranks of `group`; `refused`: the error that refused this rank before the
/// step (its optimizer's parameters). The rank still takes part in the step's collective, so
/// that every rank fails with it.
pub(crate) struct StepAcross<'a> {
    pub(crate) group: &'a dyn ProcessGroup,
    pub(crate) refused: Option<RankError>,
}

impl FusedCore {
    /// One step: collect and check the gradients, decide the clip, run the fused update.
    /// Nothing changes when it fails. Across ranks (`across`), the norm of the clip (and the
    /// finite check of `skip_nonfinite`) is the one over every rank's gradients, and every step
    /// makes one collective that carries this rank's refusal and its settings' fingerprint (see
    /// `step_across`). With `max_consecutive_skips`, one host read of the skip count after the
    /// step; a skip beyond the limit is undone (a skipped step changed only the counters and the
    /// clip's bookkeeping) and reported.
    pub(crate) fn step(
        &mut self,
        grads: &GradStore,
        rule: Rule,
        across: Option<StepAcross<'_>>,
    ) -> Result<()> {
        self.step_limited(grads, rule, None, across)
    }

    /// [`step`](Self::step) with GradScaler's `prescale` (see `ops::fused_step::Step`),
    /// `max_consecutive_skips` enforced, and the run of skips noted.
    fn step_limited(
        &mut self,
        grads: &GradStore,
        rule: Rule,
        prescale: Option<&Tensor>,
        across: Option<StepAcross<'_>>,
    ) -> Result<()> {
        let before = self.skipped_steps_on_device();
        self.step_within_limit(grads, rule, prescale, across)?;
        self.note_run(&before?)
    }

    /// [`step_limited`](Self::step_limited) but for the run of skips.
    fn step_within_limit(
        &mut self,
        grads: &GradStore,
        rule: Rule,
        prescale: Option<&Tensor>,
        across: Option<StepAcross<'_>>,
    ) -> Result<()> {
        let Some(limit) = self.skip.limit() else {
            self.skip_run = None;
            return self.step_with(grads, rule, prescale, across);
        };
        let prepared = self.skip_run_so_far().and_then(|run| {
            let saved = (
                self.control.copy()?,
                self.clip.clone(),
                self.last_norm.clone(),
            );
            Ok((run, saved))
        });
        let (((skipped_before, run), saved), is_across) = match (prepared, across) {
            (Ok(prepared), across) => {
                let is_across = across.is_some();
                self.step_with(grads, rule, prescale, across)?;
                (prepared, is_across)
            }
            // Across ranks this rank still takes part in the step's collective (and fails).
            (Err(e), Some(mut across)) => {
                across
                    .refused
                    .get_or_insert(RankError::new(Refusal::Reduction, e));
                return self.step_with(grads, rule, prescale, Some(across));
            }
            (Err(e), None) => return Err(e),
        };
        let skipped = match self.skipped_steps() {
            Ok(skipped) => skipped,
            Err(e) => {
                if is_across {
                    self.diverge(&e);
                }
                return Err(e);
            }
        };
        if skipped == skipped_before {
            self.skip_run = Some((skipped, 0));
            return Ok(());
        }
        if run >= limit {
            // (Every rank skipped alike, so every rank refuses alike.)
            (self.control, self.clip, self.last_norm) = saved;
            self.skip_run = Some((skipped_before, run));
            return self.skip.check_run(CALLER, run);
        }
        self.skip_run = Some((skipped, run + 1));
        Ok(())
    }

    /// Marks this optimizer as out of step with the other ranks after `e` failed its update
    /// past the collective: every later `step_across` fails on every rank.
    fn diverge(&mut self, e: &candle_core::Error) {
        self.diverged.get_or_insert_with(|| e.to_string());
    }

    /// The settings every rank's step must agree on.
    fn agreement(&self, rule: Rule) -> Agreement {
        let optimizer = match rule {
            Rule::AdamW { .. } => 1,
            Rule::Sgd { .. } => 2,
        };
        self.skip
            .agree_on(agree_on(
                self.clip.as_ref(),
                Agreement::new(Call::FusedStep),
            ))
            .set(Field::Optimizer, optimizer)
    }

    /// The step's one collective across ranks: the global norm it needs (see
    /// [`across_norm_type`](Self::across_norm_type)), or none but the agreement. `prepared` and
    /// `collected` are this rank's preparations; a failure of either (or `across.refused`, or an
    /// earlier step that failed past its collective) refuses this rank in the collective, so that
    /// every rank fails with it.
    fn step_collective(
        &self,
        across: StepAcross<'_>,
        prepared: Result<()>,
        collected: &Result<GradientSet>,
        rule: Rule,
    ) -> Result<Option<(f64, Tensor)>> {
        let group = across.group;
        let local = (|| {
            if let Some(e) = across.refused {
                return Err(e);
            }
            if let Some(earlier) = &self.diverged {
                return Err(RankError::new(
                    Refusal::Diverged,
                    candle_core::Error::Msg(format!(
                        "step_across: rank {}: an earlier step failed on this rank after its collective ({earlier}), so its vars and state differ from the other ranks': restore every rank from a checkpoint (new optimizers); nothing was modified",
                        group.rank()
                    ))
                    .bt(),
                ));
            }
            refuse(Refusal::Reduction, prepared)?;
            match collected {
                Ok(set) => refuse(
                    Refusal::Gradients,
                    GradientSet::from_grads(set.grads().to_vec()),
                ),
                Err(e) => Err(RankError::new(
                    Refusal::Gradients,
                    candle_core::Error::Msg(e.to_string()),
                )),
            }
        })();
        let agreement = self.agreement(rule);
        match self.across_norm_type() {
            Some(norm_type) => Ok(Some(dist::set_norm_across(
                "step_across",
                local,
                norm_type,
                agreement,
                group,
            )?)),
            None => {
                dist::agree_across("step_across", local.map(|_| ()), agreement, group)?;
                Ok(None)
            }
        }
    }

    /// One step, with GradScaler's `prescale`, on this rank or across ranks.
    fn step_with(
        &mut self,
        grads: &GradStore,
        rule: Rule,
        prescale: Option<&Tensor>,
        across: Option<StepAcross<'_>>,
    ) -> Result<()> {
        let prepared = self.ensure_state(rule.state_count());
        let mut targets = Vec::with_capacity(self.vars.len());
        let mut step_grads = Vec::with_capacity(self.vars.len());
        let collected = (|| {
            for (i, var) in self.vars.iter().enumerate() {
                let Some(grad) = grads.get(var.as_tensor()) else {
                    continue;
                };
                check_gradient(i, var, grad)?;
                targets.push(Target {
                    param: var.as_tensor().clone(),
                    index: i,
                });
                step_grads.push(grad.clone());
            }
            GradientSet::from_grads(step_grads)
        })();
        let Some(across) = across else {
            prepared?;
            return self.finish_step(collected?, targets, rule, prescale, None);
        };
        // Across ranks: the step's collective first (a rank refused by its parameters, its
        // state or its gradients still takes part, so that every rank fails with it).
        let group = across.group;
        let global_norm = self.step_collective(across, prepared, &collected, rule)?;
        // Past the collective, a failure is this rank's alone: the other ranks step. This rank's
        // vars and state are then out of step with theirs, and every later `step_across` fails on
        // every rank (at its collective).
        // Every rank has the same global norm: with `error_if_nonfinite` every rank fails alike,
        // before any update, so none is out of step.
        if let (Some(ClipSetting::Norm(clip)), Some((value, norm))) = (&self.clip, &global_norm) {
            let value = returned_norm(*value, norm.dtype());
            if clip.error_if_nonfinite() && !value.is_finite() {
                return Err(nonfinite_error(value, clip.norm_type()));
            }
        }
        let result = collected.and_then(|set| {
            fault::check("update")?;
            self.finish_step(set, targets, rule, prescale, global_norm)
        });
        if let Err(e) = &result {
            self.diverge(e);
            group.mark_out_of_step();
        }
        result
    }

    /// The step past the collection (and the collective, across ranks, whose global norm is
    /// `global_norm`): decide the clip and run the fused update.
    fn finish_step(
        &mut self,
        set: GradientSet,
        targets: Vec<Target>,
        rule: Rule,
        prescale: Option<&Tensor>,
        global_norm: Option<(f64, Tensor)>,
    ) -> Result<()> {
        self.refuse_nonfinite_norm(&set, global_norm.as_ref())?;
        // Value clipping and AGC across ranks with skipping on: the global norm (the largest |g|,
        // or the L2 norm, non-finite exactly when a gradient is) decides the skip (known on the
        // host: the collective returned it), so every rank skips together. (The other clips
        // decide from the global norm in the step itself.)
        if let (Some(ClipSetting::Value { .. } | ClipSetting::Agc { .. }), Some((value, norm))) =
            (&self.clip, &global_norm)
        {
            if self.skip.skip_nonfinite && !value.is_finite() {
                self.bump_skipped()?;
                self.last_norm = Some(norm.clone());
                return Ok(());
            }
        }
        let mut policy = PolicyStep::begin(self.clip.as_ref());
        let planned = self.plan_clip(&set, global_norm.as_ref(), &mut policy);
        let outcome = planned.and_then(|(clip, measured)| {
            let outcome = dispatch::fused_step::fused_step(&Step {
                targets,
                grads: &set,
                rule,
                clip,
                skip_nonfinite: self.skip.skip_nonfinite,
                prescale,
                control: &self.control,
                state: &self.state,
            })?;
            Ok((outcome, measured))
        });
        let (outcome, measured) = match outcome {
            Ok(done) => done,
            Err(e) => {
                policy.roll_back(self.clip.as_mut());
                return Err(e);
            }
        };
        policy.commit(self.clip.as_mut());
        self.last_norm = match measured {
            Some(norm) => Some(norm),
            // Across ranks, the clip's norm is the global one (GivenNorm reports none; AGC's
            // own pass measures only this rank's gradients).
            None if global_norm.is_some() && self.clip.is_some() => {
                global_norm.map(|(_, norm)| norm)
            }
            None => outcome.norm,
        };
        if let (Some(ClipSetting::ZClip(zclip)), Some(state)) =
            (&mut self.clip, outcome.policy_state)
        {
            zclip.set_state(state);
        }
        Ok(())
    }

    /// `error_if_nonfinite`: a non-finite norm is an error before anything changes (one host
    /// read; on this rank, one more read pass for the norm).
    fn refuse_nonfinite_norm(
        &self,
        set: &GradientSet,
        global_norm: Option<&(f64, Tensor)>,
    ) -> Result<()> {
        let Some(ClipSetting::Norm(clip)) = &self.clip else {
            return Ok(());
        };
        if !clip.error_if_nonfinite() {
            return Ok(());
        }
        let value = match global_norm {
            Some((value, norm)) => returned_norm(*value, norm.dtype()),
            None => dispatch::norm::total_norm(set, clip.norm_type())?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?,
        };
        if !value.is_finite() {
            return Err(nonfinite_error(value, clip.norm_type()));
        }
        Ok(())
    }

    /// The clip of this step, decided from the setting: across ranks (`global_norm`), the
    /// settings that bound a global norm become a given-norm clip
    /// ([`PolicyStep::given_norm`]); on one rank AutoClip measures the norm first (returned as
    /// the step's `last_norm`), and the others are folded into the update.
    fn plan_clip(
        &mut self,
        set: &GradientSet,
        global_norm: Option<&(f64, Tensor)>,
        policy: &mut PolicyStep,
    ) -> Result<(StepClip, Option<Tensor>)> {
        let device = self.device.clone();
        if let Some((value, norm)) = global_norm {
            let given = match &mut self.clip {
                // skip_nonfinite without a clip: the global max |g| decides; a finite one gives
                // the coefficient 1 (no write), a non-finite one skips the step on every rank.
                None => Some(GivenNorm {
                    norm: *value,
                    max_norm: f64::INFINITY,
                    eps: 0.0,
                }),
                Some(clip) => policy.given_norm(clip, *value, norm.dtype(), &device)?,
            };
            if let Some(given) = given {
                let clip = StepClip::GivenNorm {
                    norm: Tensor::new(given.norm, &device)?,
                    max_norm: given.max_norm,
                    eps: given.eps,
                };
                return Ok((clip, None));
            }
        }
        Ok(match &mut self.clip {
            None => (StepClip::None, None),
            Some(ClipSetting::Norm(clip)) => (
                StepClip::Norm {
                    norm_type: clip.norm_type(),
                    max_norm: clip.max_norm(),
                    eps: clip.eps(),
                },
                None,
            ),
            Some(ClipSetting::Value { clip_value }) => (StepClip::Value(*clip_value), None),
            // A step without gradients leaves the statistics alone.
            Some(ClipSetting::ZClip(_)) if set.grads().is_empty() => (StepClip::None, None),
            Some(ClipSetting::ZClip(zclip)) => (
                StepClip::ZClip {
                    state: zclip.state_on(&device)?,
                    params: zclip.params(),
                },
                None,
            ),
            Some(ClipSetting::Agc { clipping, eps }) => (
                StepClip::Agc {
                    clipping: *clipping,
                    eps: *eps,
                },
                None,
            ),
            Some(clip @ ClipSetting::AutoClip(_)) => {
                // Its percentile is a host computation: the norm is read back first.
                let norm = dispatch::norm::total_norm(set, NormType::L2)?;
                let value = norm.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                let Some(given) = policy.given_norm(clip, value, norm.dtype(), &device)? else {
                    bail!("internal error: AutoClip without its threshold")
                };
                let clip = StepClip::GivenNorm {
                    norm: norm.clone(),
                    max_norm: given.max_norm,
                    eps: given.eps,
                };
                (clip, Some(norm))
            }
        })
    }

    /// The norm a step across ranks needs from the group: the clip's norm (AutoClip, ZClip and
    /// AGC, for `last_norm`: L2), or for `skip_nonfinite` without a clip the largest `|g|`; none
    /// for value clipping (element-wise: each rank clamps and checks its own gradients).
    fn across_norm_type(&self) -> Option<NormType> {
        match &self.clip {
            Some(ClipSetting::Norm(clip)) => Some(clip.norm_type()),
            Some(ClipSetting::AutoClip(_) | ClipSetting::ZClip(_) | ClipSetting::Agc { .. }) => {
                Some(NormType::L2)
            }
            // Element-wise; with skipping on, the global largest |g| decides the skip.
            Some(ClipSetting::Value { .. }) if self.skip.skip_nonfinite => Some(NormType::Inf),
            Some(ClipSetting::Value { .. }) => None,
            None if self.skip.skip_nonfinite => Some(NormType::Inf),
            None => None,
        }
    }

    /// [`step`](Self::step) with non-finite steps skipped whatever the setting: the step of
    /// [`GradScaler`](crate::GradScaler), whose found-inf the fused step decides on the device.
    /// With `prescale` (`inv_scale`, 0-d F32 on the device), the gradients are still scaled: the
    /// step unscales them as it reads them and writes them back unscaled (GradScaler's one-read
    /// path; only where `dispatch::fused_step::runs_prescaled`, with a clip that
    /// `prescale_supports`: not AutoClip, ZClip or AGC, which decide from the gradients before
    /// the step).
    pub(crate) fn step_skipping_nonfinite(
        &mut self,
        grads: &GradStore,
        rule: Rule,
        prescale: Option<&Tensor>,
    ) -> Result<()> {
        if prescale.is_some() && !prescale_supports(self.clip.as_ref()) {
            bail!("internal error: a prescaled step with a clip that decides before the step")
        }
        let setting = std::mem::replace(&mut self.skip.skip_nonfinite, true);
        let result = self.step_limited(grads, rule, prescale, None);
        self.skip.skip_nonfinite = setting;
        result
    }

    /// [`step_skipping_nonfinite`](Self::step_skipping_nonfinite) across the ranks of `group`
    /// (no prescale), `across.refused` refusing this rank: [`GradScaler::step_across`](crate::GradScaler::step_across) after a
    /// found-inf agreed over every rank.
    pub(crate) fn step_skipping_nonfinite_across(
        &mut self,
        grads: &GradStore,
        rule: Rule,
        across: StepAcross<'_>,
    ) -> Result<()> {
        let setting = std::mem::replace(&mut self.skip.skip_nonfinite, true);
        let result = self.step_limited(grads, rule, None, Some(across));
        self.skip.skip_nonfinite = setting;
        result
    }
}

/// A gradient the fused step can use for var #`i`: same dtype, shape and device, and not sharing
/// the var's storage (the step writes the var while it reads the gradient).
fn check_gradient(i: usize, var: &Var, grad: &Tensor) -> Result<()> {
    check_matches_var("fused optimizer step", i, var, grad)?;
    if !grad.device().same_device(var.device()) {
        bail!(
            "fused optimizer step: the gradient of var #{i} is on {:?} but the var on {:?}; nothing was modified",
            grad.device().location(),
            var.device().location()
        )
    }
    if storage_key(grad) == storage_key(var.as_tensor()) {
        bail!("fused optimizer step: the gradient of var #{i} shares the var's storage; nothing was modified")
    }
    Ok(())
}
