//! One step of [`Clipped`]: collect and check the gradients, clip them in place by the setting
//! (on this rank or across a process group), skip a non-finite step, step the inner optimizer,
//! keep the counters.

use candle_core::{backprop::GradStore, bail, DType, Result, Tensor};
use candle_nn::Optimizer;

use super::Clipped;
use crate::clip::agc::adaptive_clip;
use crate::clip::norm::{clip_grads_with_norm_, scale_with_given_norm, total_norm};
use crate::clip::value::clip_grad_value_;
use crate::dist::agreement::{refuse, Agreement, Call, Field, RankError, Refusal};
use crate::dist::{self, ProcessGroup};
use crate::ops::clip::returned_norm;
use crate::ops::gradients::{check_matches_var, GradientSet};
use crate::ops::norm_type::NormType;
use crate::optim::clip_setting::{agree_on, ClipSetting};
use crate::optim::decide::PolicyStep;

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
    /// `prior`) and steps the inner optimizer; a failure leaves the policies as they were.
    fn clip_and_step(
        &mut self,
        grads: &GradStore,
        mut view: GradStore,
        group: Option<&dyn ProcessGroup>,
        largest: Option<Tensor>,
        prior: Option<RankError>,
        agreement: Agreement,
    ) -> Result<()> {
        let mut policy = PolicyStep::begin(Some(&self.clip));
        // Whether this rank is past the step's last collective: across ranks, a failure from
        // then on is this rank's alone.
        let mut past_collective = false;
        let clipped = match group {
            Some(group) => {
                let across = Across {
                    group,
                    prior,
                    agreement,
                    past_collective: &mut past_collective,
                };
                self.clip_across(&mut view, largest, across, &mut policy)
            }
            None => self.clip_here(&mut view, largest, &mut policy),
        };
        let (norm, not_clipped) = match clipped {
            Ok(done) => done,
            Err(e) => {
                policy.roll_back(Some(&mut self.clip));
                self.diverge_if(group.filter(|_| past_collective), &e);
                return Err(e);
            }
        };
        if let Err(e) = self.inner.step(grads) {
            policy.roll_back(Some(&mut self.clip));
            self.diverge_if(group, &e);
            return Err(e);
        }
        policy.commit(Some(&mut self.clip));
        self.count(not_clipped)?;
        self.steps += 1;
        self.skip_run = 0;
        self.last_norm = Some(norm);
        Ok(())
    }

    /// Clips `view` in place on this process; returns the norm before clipping and whether the
    /// step was left unclipped (0-d `U8`, on the device). `largest`: the largest `|g|`, when
    /// skipping measured it.
    fn clip_here(
        &mut self,
        view: &mut GradStore,
        largest: Option<Tensor>,
        policy: &mut PolicyStep,
    ) -> Result<(Tensor, Tensor)> {
        if let ClipSetting::AutoClip(_) = self.clip {
            // As `AutoClip::clip_`, its history recorded only once the step succeeded.
            let norm = total_norm(&self.vars, view, NormType::L2, false)?;
            let value = norm.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            let Some(given) =
                policy.given_norm(&mut self.clip, value, norm.dtype(), norm.device())?
            else {
                bail!("internal error: AutoClip without its threshold")
            };
            clip_grads_with_norm_(&self.vars, view, given.max_norm, &norm)?;
            let not_clipped = not_clipped_by_norm(&norm, given.max_norm, given.eps)?;
            return Ok((norm, not_clipped));
        }
        let vars = &self.vars;
        Ok(match &mut self.clip {
            ClipSetting::Norm(clip) => {
                let norm = clip.clip_(vars, view)?;
                let not_clipped = not_clipped_by_norm(&norm, clip.max_norm(), clip.eps())?;
                (norm, not_clipped)
            }
            ClipSetting::Value { clip_value } => {
                let norm = match largest {
                    Some(norm) => norm,
                    None => total_norm(vars, view, NormType::Inf, false)?,
                };
                clip_grad_value_(vars, view, *clip_value)?;
                let not_clipped = not_clipped_by_norm(&norm, *clip_value, 0.0)?;
                (norm, not_clipped)
            }
            ClipSetting::AutoClip(_) => bail!("internal error: AutoClip is clipped above"),
            ClipSetting::ZClip(zclip) => {
                // A step without gradients leaves ZClip alone (and is not clipped).
                let any = vars.iter().any(|v| view.get(v.as_tensor()).is_some());
                let norm = zclip.clip_(vars, view)?;
                // Not clipped iff the coefficient was 1 (false for NaN), on the device.
                let not_clipped = match zclip.last_coefficient_tensor()? {
                    Some(c) if any => c.ge(1.0)?,
                    _ => Tensor::new(1u8, norm.device())?,
                };
                (norm, not_clipped)
            }
            ClipSetting::Agc { clipping, eps } => {
                let outcome = adaptive_clip(vars, view, *clipping, *eps)?;
                let not_clipped = outcome.clipped.eq(&outcome.clipped.zeros_like()?)?;
                (outcome.norm, not_clipped)
            }
        })
    }

    /// [`clip_here`](Self::clip_here) across the ranks of `across.group`: the norm (or the
    /// largest `|g|`) over every rank from the step's collective, which carries `across.prior`;
    /// the policies decide from it as one process would ([`PolicyStep::given_norm`]).
    fn clip_across(
        &mut self,
        view: &mut GradStore,
        largest: Option<Tensor>,
        across: Across<'_, '_>,
        policy: &mut PolicyStep,
    ) -> Result<(Tensor, Tensor)> {
        let Across {
            group,
            mut prior,
            agreement,
            past_collective,
        } = across;
        let vars = &self.vars;
        if let ClipSetting::Norm(clip) = &self.clip {
            // The norm's collective, then the scale pass (past it).
            let plan = dist::plan_clip_across(
                vars,
                &[],
                view,
                clip.settings(),
                Ok(()),
                agreement,
                prior.take(),
                group,
            )?;
            *past_collective = true;
            let norm = plan.apply()?;
            let not_clipped = not_clipped_by_norm(&norm, clip.max_norm(), clip.eps())?;
            return Ok((norm, not_clipped));
        }
        if let (ClipSetting::Value { clip_value }, Some(norm)) = (&self.clip, largest) {
            // Skipping already took the global largest |g| (its collective).
            *past_collective = true;
            clip_grad_value_(vars, view, *clip_value)?;
            let not_clipped = not_clipped_by_norm(&norm, *clip_value, 0.0)?;
            return Ok((norm, not_clipped));
        }
        // One collective for the global norm: the largest |g| for value clipping, else L2 (the
        // exact value: ZClip's input rule needs it, as in one process).
        let norm_type = match self.clip {
            ClipSetting::Value { .. } => NormType::Inf,
            _ => NormType::L2,
        };
        let local = match prior.take() {
            Some(e) => Err(e),
            None => refuse(Refusal::Gradients, GradientSet::collect(vars, view)),
        };
        let (value, norm) = dist::set_norm_across(CALLER, local, norm_type, agreement, group)?;
        *past_collective = true;
        let given = policy.given_norm(&mut self.clip, value, norm.dtype(), norm.device())?;
        let not_clipped = match (&self.clip, given) {
            (ClipSetting::Value { clip_value }, _) => {
                clip_grad_value_(vars, view, *clip_value)?;
                not_clipped_by_norm(&norm, *clip_value, 0.0)?
            }
            (ClipSetting::Agc { clipping, eps }, _) => {
                // Unit-wise: each rank clips its own units; `last_norm` is the global L2 norm.
                let clipped = adaptive_clip(vars, view, *clipping, *eps)?.clipped;
                clipped.eq(&clipped.zeros_like()?)?
            }
            (clip, Some(given)) => {
                // A step without gradients leaves them alone (and ZClip's is not clipped).
                if vars.iter().any(|v| view.get(v.as_tensor()).is_some()) {
                    let at = Tensor::new(given.norm, norm.device())?;
                    scale_with_given_norm(vars, view, given.max_norm, given.eps, &at)?;
                }
                match clip {
                    ClipSetting::ZClip(zclip) => {
                        let c = zclip.last_coefficient()?.unwrap_or(1.0);
                        Tensor::new(u8::from(c >= 1.0), norm.device())?
                    }
                    _ => not_clipped_by_norm(&norm, given.max_norm, given.eps)?,
                }
            }
            (_, None) => bail!("internal error: a norm clip across ranks without its decision"),
        };
        Ok((norm, not_clipped))
    }
}

/// A step across ranks: its group, the error that refused this rank before the step's
/// collective (it still takes part), the settings' fingerprint, and where to note that the
/// collective returned.
struct Across<'g, 'p> {
    group: &'g dyn ProcessGroup,
    prior: Option<RankError>,
    agreement: Agreement,
    past_collective: &'p mut bool,
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
