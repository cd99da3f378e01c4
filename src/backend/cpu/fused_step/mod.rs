//! The CPU twin of the fused optimizer step (`ops::fused_step`): the clip's norm through this
//! back end's reduction, then one pass over every var that reads the gradient, forms the clipped
//! gradient exactly as the clip's own element pass does (the same `scale` / `clamp` functions, on
//! the value read: the `GradStore` is never written), and updates the parameter and its state in
//! place.
//!
//! Arithmetic, element by element:
//! - F32 and F64 vars compute in their own type with candle's CPU op sequence, each rounding
//!   reproduced, so that a step is bitwise `candle_nn::AdamW::step` / `SGD::step`: an affine
//!   `x * c` of candle is `x * c + 0` (which turns `-0` into `+0`), a scalar add `x + c` is
//!   `x * 1 + c`;
//! - F16 and BF16 vars compute in `f32` with `f32` state, the same sequence, and round the new
//!   parameter once to their dtype;
//! - SGD with momentum or weight decay follows PyTorch's `torch.optim.SGD`, one rounding per
//!   operation, in the same compute type.
//!
//! With a `prescale` (GradScaler's one-read path, `cpu::grad_scaler`), the gradients hold scaled
//! values: the reduction unscales each element as it reads it, and the update unscales each chunk
//! of a gradient in place (written back: the store then holds unscaled gradients) just before
//! reading it from cache; a skipped step unscales them too.

//!
//! Files: this one decides the step and keeps its counters; [`var`] updates one var; [`rules`]
//! holds the rules' arithmetic; [`storages`] locks several storages for writing at once.

use std::cell::RefCell;

use candle_core::{bail, CpuStorage, DType, InplaceOp1, Layout, Result, Tensor};
use rayon::prelude::*;

use super::grad_scaler::{norm_unscaled, unscale_all_in_place};
use super::reduce::{norm, norm_tensor};
use crate::ops::clip::{clip_coefficient, needs_scaling, ElementwiseOp};
use crate::ops::fused_step::{
    Outcome, Place, Step, StepClip, Target, CLIPPED, CONTROL_WORDS, SKIPPED, STEPS,
};
use crate::ops::gradients::GradientSet;
use crate::ops::norm_type::NormType;
use crate::ops::zclip::update_on_host;
use rules::StateSlice;
use storages::with_storages_mut;
use var::{update_target, Update};

mod rules;
mod storages;
mod var;

/// Below this many elements a step runs on the calling thread. Lower than the clip's threshold:
/// an update does ten times the arithmetic of a read pass per element.
const PARALLEL_MIN_STEP_ELEMENTS: usize = 1 << 16;

/// The step's decision before the update: what to do to the gradients, whether they were
/// clipped, whether they are all finite.
struct Decision {
    transform: Option<ElementwiseOp>,
    clipped: bool,
    nonfinite: bool,
    norm: Option<Tensor>,
    policy_state: Option<Tensor>,
    /// AGC: each target's unit coefficients (`None`: the unit is untouched).
    units: Option<Vec<Vec<Option<f64>>>>,
}

fn decide(step: &Step, set: &GradientSet, prescale: Option<f32>) -> Result<Decision> {
    let groups = set.group_by_storage();
    // The norm of the gradients, or of the unscaled gradients (GradScaler's one read).
    let norm = |set: &GradientSet, groups: &_, norm_type| match prescale {
        Some(inv) => norm_unscaled(set, groups, norm_type, inv),
        None => norm(set, groups, norm_type),
    };
    Ok(match step.clip.clone() {
        StepClip::Norm {
            norm_type,
            max_norm,
            eps,
        } => {
            let n = norm(set, &groups, norm_type)?;
            let c = clip_coefficient(n, max_norm, eps);
            Decision {
                transform: needs_scaling(c).then_some(ElementwiseOp::Scale(c)),
                clipped: needs_scaling(c),
                nonfinite: !n.is_finite(),
                norm: Some(norm_tensor(n, set.norm_dtype())?),
                policy_state: None,
                units: None,
            }
        }
        StepClip::ZClip { state, params } => {
            let n = norm(set, &groups, NormType::L2)?;
            let (c, state) = update_on_host(n, set.norm_dtype(), &state, &params)?;
            Decision {
                transform: needs_scaling(c).then_some(ElementwiseOp::Scale(c)),
                clipped: needs_scaling(c),
                nonfinite: !n.is_finite(),
                norm: Some(norm_tensor(n, set.norm_dtype())?),
                policy_state: Some(state),
                units: None,
            }
        }
        StepClip::Agc { clipping, eps } => {
            let params: Vec<Tensor> = step.targets.iter().map(|t| t.param.clone()).collect();
            let (n, units) = super::agc::coefficients(&params, set.grads(), clipping, eps)?;
            let clipped = units.iter().any(|u| u.iter().any(Option::is_some));
            Decision {
                transform: None,
                clipped,
                nonfinite: !n.is_finite(),
                norm: Some(norm_tensor(n, set.norm_dtype())?),
                policy_state: None,
                units: Some(units),
            }
        }
        StepClip::Value(v) => {
            let n = norm(set, &groups, NormType::Inf)?;
            Decision {
                transform: Some(ElementwiseOp::Clamp(v)),
                // Some |g| above the bound, or NaN.
                clipped: n > v || n.is_nan(),
                nonfinite: !n.is_finite(),
                norm: Some(norm_tensor(n, set.norm_dtype())?),
                policy_state: None,
                units: None,
            }
        }
        StepClip::GivenNorm { .. } if step.prescale.is_some() => {
            bail!("internal error: a prescaled step with a given norm")
        }
        StepClip::GivenNorm {
            norm: given,
            max_norm,
            eps,
        } => {
            let n = given.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            let c = clip_coefficient(n, max_norm, eps);
            Decision {
                transform: needs_scaling(c).then_some(ElementwiseOp::Scale(c)),
                clipped: needs_scaling(c),
                nonfinite: !n.is_finite(),
                norm: None,
                policy_state: None,
                units: None,
            }
        }
        StepClip::None => Decision {
            transform: None,
            clipped: false,
            nonfinite: step.skip_nonfinite && !norm(set, &groups, NormType::Inf)?.is_finite(),
            norm: None,
            policy_state: None,
            units: None,
        },
    })
}

/// Runs the step on the CPU.
pub(crate) fn step(step: &Step) -> Result<Outcome> {
    let prescale = step.inv_scale_on_host()?;
    let decision = decide(step, step.grads, prescale)?;
    let mut control = step.control.to_vec1::<i64>()?;
    if step.skip_nonfinite && decision.nonfinite {
        control[SKIPPED] += 1;
        // The store holds unscaled gradients after a skipped step too.
        if let Some(inv) = prescale {
            unscale_all_in_place(step.grads.grads(), inv)?;
        }
    } else {
        let t = control[STEPS] + 1;
        let elements: usize = step.targets.iter().map(|t| t.param.elem_count()).sum();
        let parallel = elements >= PARALLEL_MIN_STEP_ELEMENTS && rayon::current_num_threads() > 1;
        // Every state buffer the rule uses, locked once for the whole step.
        let count = step.rule.state_count();
        let buffers: Vec<(usize, usize, &Tensor)> = step.state.buffers[..count]
            .iter()
            .enumerate()
            .flat_map(|(slot, b)| {
                b.iter()
                    .enumerate()
                    .filter_map(move |(class, t)| t.as_ref().map(|t| (slot, class, t)))
            })
            .collect();
        let tensors: Vec<&Tensor> = buffers.iter().map(|(_, _, t)| *t).collect();
        with_storages_mut(&tensors, &mut |storages: &mut [&mut CpuStorage]| {
            // Each target's slices of the state buffers (disjoint: the vars' places).
            let mut slices: Vec<[Option<StateSlice<'_>>; 2]> =
                step.targets.iter().map(|_| [None, None]).collect();
            for ((slot, class, _), storage) in buffers.iter().zip(storages.iter_mut()) {
                let places = step
                    .targets
                    .iter()
                    .enumerate()
                    .map(|(k, t)| (k, step.state.places[t.index]))
                    .filter(|(_, p)| p.class == *class);
                match &mut **storage {
                    CpuStorage::F32(v) => {
                        for (k, s) in split_places(v, places)? {
                            slices[k][*slot] = Some(StateSlice::F32(s));
                        }
                    }
                    CpuStorage::F64(v) => {
                        for (k, s) in split_places(v, places)? {
                            slices[k][*slot] = Some(StateSlice::F64(s));
                        }
                    }
                    _ => bail!("internal error: optimizer state is not F32 or F64"),
                }
            }
            let run = |(((target, grad), state), units): (((&Target, &Tensor), _), _)| {
                let has_state = control[CONTROL_WORDS + target.index] != 0;
                let job = Update {
                    state: RefCell::new(Some(state)),
                    rule: step.rule,
                    t,
                    has_state,
                    transform: decision.transform,
                    unscale: prescale,
                    parallel,
                    units,
                };
                update_target(target, grad, &job)
            };
            let grads = step.grads.grads();
            let units: Vec<Option<&[Option<f64>]>> = match &decision.units {
                Some(units) => units.iter().map(|u| Some(u.as_slice())).collect(),
                None => vec![None; step.targets.len()],
            };
            if parallel {
                (step.targets.par_iter().zip(grads))
                    .zip(slices)
                    .zip(units)
                    .try_for_each(run)
            } else {
                (step.targets.iter().zip(grads))
                    .zip(slices)
                    .zip(units)
                    .try_for_each(run)
            }
        })?;
        control[STEPS] = t;
        control[CLIPPED] += decision.clipped as i64;
        if count > 0 {
            for target in &step.targets {
                control[CONTROL_WORDS + target.index] = 1;
            }
        }
    }
    step.control.inplace_op1(&WriteControl(&control))?;
    Ok(Outcome {
        norm: decision.norm,
        policy_state: decision.policy_state,
    })
}

/// `data` cut at the given places (ascending, disjoint): each target's slice, by target index.
fn split_places<C>(
    mut data: &mut [C],
    places: impl Iterator<Item = (usize, Place)>,
) -> Result<Vec<(usize, &mut [C])>> {
    let mut consumed = 0;
    let mut out = Vec::new();
    for (k, place) in places {
        if place.offset < consumed || place.offset + place.len - consumed > data.len() {
            bail!("internal error: optimizer state places out of order or out of bounds")
        }
        let (_, rest) = std::mem::take(&mut data).split_at_mut(place.offset - consumed);
        let (mine, rest) = rest.split_at_mut(place.len);
        out.push((k, mine));
        data = rest;
        consumed = place.offset + place.len;
    }
    Ok(out)
}

/// Replaces the control tensor's values.
struct WriteControl<'a>(&'a [i64]);

impl InplaceOp1 for WriteControl<'_> {
    fn name(&self) -> &'static str {
        "candle-grad-clip-control"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, _: &Layout) -> Result<()> {
        match storage {
            CpuStorage::I64(v) if v.len() == self.0.len() => {
                v.copy_from_slice(self.0);
                Ok(())
            }
            _ => {
                bail!("internal error: the control tensor is not an I64 vector of the right length")
            }
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, _: &mut candle_core::CudaStorage, _: &Layout) -> Result<()> {
        bail!("internal error: the CPU step was called on CUDA storage")
    }
}
