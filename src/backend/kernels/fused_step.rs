//! The fused optimizer step on a kernel device (`ops::fused_step`): the reduction the clip (or
//! the finite check) needs, a policy's kernel (ZClip) or AGC's pass, then `grad_clip_fused_step`
//! over every var, which reads the verdict and the step count from device memory: no host
//! synchronisation.

use candle_core::{bail, DType, Result, Tensor};

use super::agc;
use super::launch::{self, NormAt, NormPlan, Transform, Verdict};
use super::norm::{norm_at, out_norm, readable_norm};
use super::table::Base;
use super::table::{contiguous_copies, Operands, Table, UpdateEntry};
use super::zclip::zclip_step;
use super::{launch_all, Buffer, KernelDevice, Session};
use crate::ops::fused_step::{Outcome, Step, StepClip};
use crate::ops::norm_type::NormType;

/// A fused optimizer step (`ops::fused_step`): the reduction the clip (or the finite check)
/// needs, then `grad_clip_fused_step` over every var, which reads the verdict and the step count
/// from device memory: no host synchronisation.
pub(crate) fn fused_step(dev: &impl KernelDevice, step: &Step) -> Result<Outcome> {
    dev.check_ready()?;
    let set = step.grads;
    let groups = set.group_by_storage();
    let copies = contiguous_copies(set)?;
    // A norm given as a tensor (AutoClip's, or a global norm across ranks).
    let given = match &step.clip {
        StepClip::GivenNorm { norm, .. } => Some(readable_norm(norm)?),
        _ => None,
    };
    let reduce = reduction(step);
    let policy_state = match &step.clip {
        StepClip::ZClip { state, .. } => Some(state),
        _ => None,
    };
    let decides_before = given.is_some() || policy_state.is_some();
    let inv_scale = prescale(step, decides_before, &copies)?;
    let mut operands = Operands::new(
        set.grads(),
        &copies,
        given.as_ref().or(policy_state).or(inv_scale.as_ref()),
    );
    let StepOperands {
        params,
        state_buffers,
        control,
        written,
    } = StepOperands::push(step, &mut operands, inv_scale.is_some());
    dev.with_session(operands.tensors(), written, |s, bases| {
        // inv_scale, when the step is prescaled, is the extra operand.
        let inv_scale_address = match (&inv_scale, operands.extra()) {
            (Some(inv), Some(index)) => Some(bases[index].at(inv.layout().start_offset())),
            (Some(_), None) => bail!("internal error: a prescaled step without its inv_scale"),
            (None, _) => None,
        };
        let mut table = Table::default();
        let norm_part = reduce
            .as_ref()
            .map(|_| table.push_norm_inputs(&groups, &operands, bases).0);
        let entries = update_entries(step, &operands, bases, &params, &state_buffers)?;
        let update_part = table.push_updates(&entries);
        let out_f64 = set.norm_dtype() == DType::F64;
        let out = match reduce {
            Some(_) => Some(s.alloc(set.norm_dtype(), 1)?),
            None => None,
        };
        let agc_plan = match step.clip {
            StepClip::Agc { clipping, eps } => {
                Some(AgcPlan::new(s, &mut table, &entries, step, clipping, eps)?)
            }
            _ => None,
        };
        let t = s.upload(&table.words)?;
        let scratch = s.scratch();
        if let Some(agc) = &agc_plan {
            agc.launch(s, t, scratch, out_f64)?;
        }
        if let (Some((plan, max_norm, eps)), Some(out), Some(part)) = (&reduce, out, norm_part) {
            launch_all(
                s,
                plan.prescaled(inv_scale_address)
                    .reduce(t, part, scratch, out.ptr, out_f64, *max_norm, *eps, None),
            )?;
        }
        // A policy's new statistics, written by its kernel after the reduction.
        let mut policy_state = None;
        if let (StepClip::ZClip { state, params }, Some(out)) = (&step.clip, out) {
            let index = operands.extra().expect("the statistics were passed");
            let norm = out_norm(out, out_f64);
            policy_state = Some(zclip_step(s, bases[index], state, norm, scratch, params)?);
        }
        // The given norm is the extra operand.
        let given_at = match (&step.clip, &given, operands.extra()) {
            (StepClip::GivenNorm { max_norm, eps, .. }, Some(norm), Some(index)) => {
                Some(norm_at(bases[index], norm, *max_norm, *eps))
            }
            _ => None,
        };
        let (transform, verdict) = transform_and_verdict(
            &step.clip,
            out.map(|o| out_norm(o, out_f64)),
            given_at,
            &agc_plan,
            t,
        );
        let Some((start, _)) = step.control.layout().contiguous_offsets() else {
            bail!("internal error: the control words are not contiguous")
        };
        launch_all(
            s,
            [launch::fused_step(
                t,
                update_part,
                step.rule,
                transform,
                verdict,
                step.skip_nonfinite,
                scratch,
                bases[control].at(start),
                inv_scale_address,
            )],
        )?;
        let norm = outcome_norm(s, step, out, agc_plan)?;
        Ok(Outcome { norm, policy_state })
    })
}

/// Where a step's operands are, after the gradients (and the norm or state the clip reads): the
/// parameters, the state buffers the rule uses (per slot and state class), the control words,
/// and the range the step writes.
struct StepOperands {
    params: Vec<usize>,
    state_buffers: Vec<[Option<usize>; 2]>,
    control: usize,
    written: std::ops::Range<usize>,
}

impl StepOperands {
    /// Pushes them onto `operands`; a `prescaled` step writes the gradients back, so they are
    /// writable too.
    fn push<'a>(step: &'a Step<'a>, operands: &mut Operands<'a>, prescaled: bool) -> Self {
        let first_written = if prescaled {
            0
        } else {
            operands.tensors().len()
        };
        let params = step
            .targets
            .iter()
            .map(|t| operands.push(&t.param))
            .collect();
        let count = step.rule.state_count();
        let state_buffers = step.state.buffers[..count]
            .iter()
            .map(|slot| [0, 1].map(|class| slot[class].as_ref().map(|t| operands.push(t))))
            .collect();
        let control = operands.push(step.control);
        Self {
            params,
            state_buffers,
            control,
            written: first_written..operands.tensors().len(),
        }
    }
}

/// The norm a step reports: the reduction's (norm and value clipping, ZClip), AGC's global
/// norm (zero without units), none otherwise.
fn outcome_norm(
    s: &mut dyn Session,
    step: &Step,
    out: Option<Buffer>,
    agc: Option<AgcPlan>,
) -> Result<Option<Tensor>> {
    Ok(match (&step.clip, out, agc) {
        (StepClip::Norm { .. } | StepClip::Value(_) | StepClip::ZClip { .. }, Some(out), _) => {
            Some(s.take_tensor(out, &[])?)
        }
        (_, _, Some(agc)) if agc.part.segments == 0 => Some(Tensor::zeros(
            (),
            step.grads.norm_dtype(),
            step.control.device(),
        )?),
        (_, _, Some(agc)) => Some(s.take_tensor(agc.norm, &[])?),
        _ => None,
    })
}

/// The reduction a step needs, with the clip's `max_norm` and `eps`: the clip's norm, ZClip's
/// L2 norm, the largest |g| for value clipping (to count clipped steps) or for the finite check
/// alone; none when the norm is given or AGC measures its units.
fn reduction(step: &Step) -> Option<(NormPlan, f64, f64)> {
    let set = step.grads;
    match step.clip {
        StepClip::Norm {
            norm_type,
            max_norm,
            eps,
        } => Some((NormPlan::new(norm_type, set), max_norm, eps)),
        StepClip::ZClip { .. } => Some((NormPlan::new(NormType::L2, set), f64::INFINITY, 0.0)),
        StepClip::Value(_) => Some((NormPlan::new(NormType::Inf, set), f64::INFINITY, 0.0)),
        StepClip::None if step.skip_nonfinite => {
            Some((NormPlan::new(NormType::Inf, set), f64::INFINITY, 0.0))
        }
        _ => None,
    }
}

/// GradScaler's one-read path: the 0-d F32 inv_scale, read by the kernels from device memory
/// (never by the host). The gradients are written too (unscaled), so they must be contiguous,
/// and no clip may decide from them before the step (`decides_before`).
fn prescale(
    step: &Step,
    decides_before: bool,
    copies: &[Option<Tensor>],
) -> Result<Option<Tensor>> {
    let Some(inv) = step.prescale else {
        return Ok(None);
    };
    if decides_before {
        bail!("internal error: a prescaled step with a clip that decides before the step")
    }
    if copies.iter().any(Option::is_some) {
        bail!("internal error: a prescaled step with a non-contiguous gradient")
    }
    Ok(Some(if inv.dtype() == DType::F32 {
        inv.clone()
    } else {
        inv.to_dtype(DType::F32)?
    }))
}

/// One table entry per var of the step: the addresses of its parameter, gradient (view) and
/// state, from the session's `bases`.
fn update_entries(
    step: &Step,
    operands: &Operands,
    bases: &[Base],
    params: &[usize],
    state_buffers: &[[Option<usize>; 2]],
) -> Result<Vec<UpdateEntry>> {
    let address = |index: usize, tensor: &Tensor| -> Result<u64> {
        let Some((start, _)) = tensor.layout().contiguous_offsets() else {
            bail!("internal error: a fused step operand is not contiguous")
        };
        Ok(bases[index].at(start))
    };
    let mut entries = Vec::with_capacity(step.targets.len());
    for (i, target) in step.targets.iter().enumerate() {
        let view = operands.grad_view(i);
        let place = step.state.places[target.index];
        let mut state = [0u64; 2];
        for (slot, buffers) in state_buffers.iter().enumerate() {
            if let Some(index) = buffers[place.class] {
                // A state buffer is a whole 1-D storage: the var's state starts at its offset.
                state[slot] = bases[index].at(place.offset);
            }
        }
        entries.push(UpdateEntry {
            param: address(params[i], &target.param)?,
            grad: address(view, operands.tensors()[view])?,
            state,
            len: target.param.elem_count() as u64,
            dtype: bases[params[i]].dtype,
            var: target.index as u64,
        });
    }
    Ok(entries)
}

/// How the update transforms each gradient and where it reads the step's verdict: `out`, the
/// reduction's norm; `given`, a given norm; AGC's units in the table at `t`.
fn transform_and_verdict(
    clip: &StepClip,
    out: Option<NormAt>,
    given: Option<NormAt>,
    agc: &Option<AgcPlan>,
    t: u64,
) -> (Transform, Verdict) {
    let out_verdict = |max_norm: f64, eps: f64| match out {
        Some(out) => Verdict::Norm(NormAt {
            max_norm,
            eps,
            ..out
        }),
        None => Verdict::None,
    };
    match clip {
        StepClip::Norm { .. } | StepClip::ZClip { .. } => (Transform::Scale, Verdict::Scratch),
        StepClip::Value(v) => (Transform::Clamp(*v), out_verdict(*v, 0.0)),
        StepClip::GivenNorm { .. } => match given {
            Some(at) => (Transform::Scale, Verdict::Norm(at)),
            None => (Transform::Scale, Verdict::None),
        },
        StepClip::None => (Transform::None, out_verdict(f64::INFINITY, 0.0)),
        StepClip::Agc { .. } => match agc {
            Some(agc) if agc.part.segments > 0 => {
                (Transform::Agc(t + (agc.units * 8) as u64), Verdict::Scratch)
            }
            _ => (Transform::None, Verdict::None),
        },
    }
}

/// AGC in a fused step: its table part, the coefficient buffer, the units the update reads and
/// the buffer of the global norm.
struct AgcPlan {
    part: agc::AgcPart,
    coefs: Buffer,
    /// The table word where the units start.
    units: usize,
    norm: Buffer,
    clipping: f64,
    eps: f64,
}

impl AgcPlan {
    fn new(
        s: &mut dyn Session,
        table: &mut Table,
        entries: &[UpdateEntry],
        step: &Step,
        clipping: f64,
        eps: f64,
    ) -> Result<Self> {
        let agc_entries: Vec<agc::AgcEntry> = entries
            .iter()
            .zip(&step.targets)
            .map(|(e, target)| agc::AgcEntry {
                param: e.param,
                grad: e.grad,
                dims: target.param.dims().to_vec(),
                dtype: e.dtype,
                write: false,
            })
            .collect();
        let (part, starts) = agc::push_segments(table, &agc_entries);
        let coefs = s.alloc(DType::F64, (part.units as usize).max(1))?;
        let units = agc::push_units(table, coefs.ptr, &agc_entries, &starts);
        let norm = s.alloc(step.grads.norm_dtype(), 1)?;
        Ok(Self {
            part,
            coefs,
            units,
            norm,
            clipping,
            eps,
        })
    }

    /// Measures every unit (and the global norm) before the update.
    fn launch(&self, s: &mut dyn Session, t: u64, scratch: u64, out_f64: bool) -> Result<()> {
        if self.part.segments == 0 {
            return Ok(());
        }
        launch_all(
            s,
            [launch::agc(
                self.part.segments_ptr(t),
                self.part.segments,
                self.part.units,
                self.clipping,
                self.eps,
                scratch,
                self.norm.ptr,
                out_f64,
                self.coefs.ptr,
                0,
            )],
        )
    }
}
