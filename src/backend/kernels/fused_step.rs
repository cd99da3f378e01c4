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
use super::{launch_all, KernelDevice};
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
    // A norm given as a tensor (AutoClip's).
    let given = match step.clip {
        StepClip::GivenNorm { norm, .. } => Some(readable_norm(norm)?),
        _ => None,
    };
    // The reduction the step needs: the clip's norm, the largest |g| for value clipping (to count
    // clipped steps) or for the finite check alone.
    let reduce = match step.clip {
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
    };
    let policy_state = match step.clip {
        StepClip::ZClip { state, .. } => Some(state),
        _ => None,
    };
    // GradScaler's one-read path: the 0-d F32 inv_scale, read by the kernels from device memory
    // (never by the host); the gradients are written too (unscaled), so they must be contiguous.
    let inv_scale = match step.prescale {
        Some(inv) => {
            if given.is_some() || policy_state.is_some() {
                bail!("internal error: a prescaled step with a clip that decides before the step")
            }
            if copies.iter().any(Option::is_some) {
                bail!("internal error: a prescaled step with a non-contiguous gradient")
            }
            Some(if inv.dtype() == DType::F32 {
                inv.clone()
            } else {
                inv.to_dtype(DType::F32)?
            })
        }
        None => None,
    };
    let mut operands = Operands::new(
        set.grads(),
        &copies,
        given.as_ref().or(policy_state).or(inv_scale.as_ref()),
    );
    // The prescaled step writes the gradients back: they are writable too.
    let first_written = match inv_scale {
        Some(_) => 0,
        None => operands.tensors().len(),
    };
    let params: Vec<usize> = step
        .targets
        .iter()
        .map(|t| operands.push(&t.param))
        .collect();
    // The state buffers the rule uses: operand index per slot and state dtype.
    let count = step.rule.state_count();
    let state_buffers: Vec<[Option<usize>; 2]> = step.state.buffers[..count]
        .iter()
        .map(|slot| [0, 1].map(|class| slot[class].as_ref().map(|t| operands.push(t))))
        .collect();
    let control = operands.push(step.control);
    let written = first_written..operands.tensors().len();
    let address = |bases: &[Base], index: usize, tensor: &Tensor| -> Result<u64> {
        let Some((start, _)) = tensor.layout().contiguous_offsets() else {
            bail!("internal error: a fused step operand is not contiguous")
        };
        Ok(bases[index].at(start))
    };
    dev.with_session(operands.tensors(), written, |s, bases| {
        let inv_scale_address = match &inv_scale {
            Some(inv) => {
                let index = operands.extra().expect("inv_scale was passed");
                Some(bases[index].at(inv.layout().start_offset()))
            }
            None => None,
        };
        let mut table = Table::default();
        let norm_part = reduce
            .as_ref()
            .map(|_| table.push_norm_inputs(&groups, &operands, bases).0);
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
                param: address(bases, params[i], &target.param)?,
                grad: address(bases, view, operands.tensors()[view])?,
                state,
                len: target.param.elem_count() as u64,
                dtype: bases[params[i]].dtype,
                var: target.index as u64,
            });
        }
        let update_part = table.push_updates(&entries);
        let out_f64 = set.norm_dtype() == DType::F64;
        let out = match reduce {
            Some(_) => Some(s.alloc(set.norm_dtype(), 1)?),
            None => None,
        };
        // AGC: its table part, the coefficient buffer, and the units the step reads.
        let agc_plan = match step.clip {
            StepClip::Agc { clipping, eps } => {
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
                let (part, starts) = agc::push_segments(&mut table, &agc_entries);
                let coefs = s.alloc(DType::F64, (part.units as usize).max(1))?;
                let units = agc::push_units(&mut table, coefs.ptr, &agc_entries, &starts);
                let norm = s.alloc(set.norm_dtype(), 1)?;
                Some((part, coefs, units, norm, clipping, eps))
            }
            _ => None,
        };
        let t = s.upload(&table.words)?;
        let scratch = s.scratch();
        if let Some((part, coefs, _, norm, clipping, eps)) = &agc_plan {
            if part.segments > 0 {
                launch_all(
                    s,
                    [launch::agc(
                        part.segments_ptr(t),
                        part.segments,
                        part.units,
                        *clipping,
                        *eps,
                        scratch,
                        norm.ptr,
                        out_f64,
                        coefs.ptr,
                        0,
                    )],
                )?;
            }
        }
        if let (Some((plan, max_norm, eps)), Some(out), Some(part)) = (&reduce, out, norm_part) {
            launch_all(
                s,
                plan.prescaled(inv_scale_address)
                    .reduce(t, part, scratch, out.ptr, out_f64, *max_norm, *eps, None),
            )?;
        }
        let out_verdict = |max_norm: f64, eps: f64| match out {
            Some(out) => Verdict::Norm(NormAt {
                max_norm,
                eps,
                ..out_norm(out, out_f64)
            }),
            None => Verdict::None,
        };
        // A policy's new statistics, written by its kernel after the reduction.
        let mut policy_state = None;
        if let (StepClip::ZClip { state, params }, Some(out)) = (step.clip, out) {
            let index = operands.extra().expect("the statistics were passed");
            let norm = out_norm(out, out_f64);
            policy_state = Some(zclip_step(s, bases[index], state, norm, scratch, &params)?);
        }
        let (transform, verdict) = match step.clip {
            StepClip::Norm { .. } | StepClip::ZClip { .. } => (Transform::Scale, Verdict::Scratch),
            StepClip::Value(v) => (Transform::Clamp(v), out_verdict(v, 0.0)),
            StepClip::GivenNorm { max_norm, eps, .. } => {
                let index = operands.extra().expect("the given norm was passed");
                let norm = given.as_ref().expect("the given norm");
                let verdict = Verdict::Norm(norm_at(bases[index], norm, max_norm, eps));
                (Transform::Scale, verdict)
            }
            StepClip::None => (Transform::None, out_verdict(f64::INFINITY, 0.0)),
            StepClip::Agc { .. } => match &agc_plan {
                Some((part, _, units, _, _, _)) if part.segments > 0 => {
                    (Transform::Agc(t + (*units * 8) as u64), Verdict::Scratch)
                }
                _ => (Transform::None, Verdict::None),
            },
        };
        let control_address = address(bases, control, step.control)?;
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
                control_address,
                inv_scale_address,
            )],
        )?;
        let norm = match (step.clip, out) {
            (StepClip::Norm { .. } | StepClip::Value(_) | StepClip::ZClip { .. }, Some(out)) => {
                Some(s.take_tensor(out, &[])?)
            }
            _ => None,
        };
        let norm = match agc_plan {
            Some((part, _, _, _, _, _)) if part.segments == 0 => {
                Some(Tensor::zeros((), set.norm_dtype(), step.control.device())?)
            }
            Some((_, _, _, out, _, _)) => Some(s.take_tensor(out, &[])?),
            None => norm,
        };
        Ok(Outcome { norm, policy_state })
    })
}
