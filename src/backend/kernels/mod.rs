//! The host side of the multi-tensor kernels in `kernels/grad_clip.cu`, for any device that runs
//! them: the real GPU through cudarc ([`cuda`](super::cuda), feature `cuda`) or the kernels compiled
//! for the CPU ([`emulated`](super::emulated), feature `emulation`).
//!
//! Everything that decides *what* the GPU does lives here and is plain Rust: the segment table
//! ([`table`]), the launches and their argument lists ([`launch`]), and the sequence of each
//! operation (the functions below). A [`KernelDevice`] only supplies memory and runs launches, so
//! the emulation exercises the very tables and launch sequences a GPU receives.
//!
//! # Launches
//! Every operation describes all gradients in one table of segments and covers them with one
//! launch, whatever their number and dtypes:
//! - norm: `grad_clip_reduce_*` (one launch; a second, `grad_clip_reduce_pow` in rescue mode, only
//!   when a sum of powers may leave the `f64` range: F64 gradients or `p > 6`, as on the CPU);
//! - scale: `grad_clip_apply`, which reads the coefficient from device memory and returns at once
//!   when it is `>= 1`;
//! - clamp: `grad_clip_apply` too;
//! - per-tensor norms (`grad_norms`): the reduction also stores each chunk's partial, and
//!   `grad_clip_segment_norms` combines them per tensor;
//! - adaptive clipping (`adaptive_clip_grad_`): `grad_clip_agc`, one warp per unit, reads the
//!   parameters and gradients once and scales the clipped units in place (plus
//!   `grad_clip_agc_strided` per non-contiguous gradient); see [`agc`];
//! - fused optimizer step (`fused_step`): the reduction the clip or the finite check needs, then
//!   `grad_clip_fused_step`; with GradScaler's prescale (the address of the `f32` `inv_scale`) both
//!   unscale each gradient element as they read it, and the step writes it back unscaled.
//!
//! So `clip_grad_norm_` is 2 launches (3 for F64 gradients or `p > 6`) and one copy of the table,
//! for 1 or 10,000 gradients. Slow paths, each an extra launch per tensor: a non-contiguous
//! gradient is read through a `.contiguous()` copy (made by candle) for the norm and written by
//! `grad_clip_apply_strided`.
//!
//! # Determinism
//! Each segment is cut into chunks of [`CHUNK`](launch::CHUNK) elements counted from its first
//! element, and one warp reduces one chunk into an `f64` partial in an order fixed by the element
//! indices only. The partials are added on the device into the superaccumulator of `exact_sum.rs`
//! with integer atomics (exact, so order-independent), and the last block rounds the sum once like
//! `ExactSum::value`. The norm is therefore bitwise the same for any grid size, block order, order
//! of `vars` and address alignment (the emulation's tests check each). It is not bitwise the CPU's
//! norm (the CPU's partials cover other element sets).

pub(crate) mod agc;
pub(crate) mod launch;
pub(crate) mod table;

use candle_core::{bail, DType, Result, Tensor};

use crate::backend::{nonfinite_error, ClipSettings};
use crate::ops::gradients::{storage_key, GradientSet};
use crate::ops::norm_type::NormType;

use crate::backend::update::{Outcome, Step, StepClip};
use crate::policy::zclip::ZClipParams;
use launch::{Coefficient, ElementOp, Launch, NormAt, NormPlan, Transform, Verdict};
use table::{contiguous_copies, Operands, Part, Table, UpdateEntry};

/// Where a tensor's storage starts on the device, and its dtype code (`launch::DT_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Base {
    pub(crate) ptr: u64,
    pub(crate) dtype: u64,
}

impl Base {
    /// Device address of the storage's element `index`.
    pub(crate) fn at(self, index: usize) -> u64 {
        self.ptr + index as u64 * launch::elem_size(self.dtype)
    }
}

/// A device buffer allocated through a [`Session`]: its address, and a handle for reading it back
/// or turning it into a tensor.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Buffer {
    pub(crate) ptr: u64,
    pub(crate) id: usize,
}

/// A device that runs the kernels.
pub(crate) trait KernelDevice {
    /// Refuses a call that the device cannot take now (CUDA: under graph capture). Called first,
    /// before any work for the call is enqueued.
    fn check_ready(&self) -> Result<()>;

    /// Locks the storages of `tensors` (each storage once) so that they can be neither freed nor
    /// replaced, and runs `f` with the base of each tensor's storage (in the order of `tensors`)
    /// and a session for the table, buffers and launches. The launches may write the storages of
    /// the tensors in `writable` (the gradients; a step's parameters and state), no other (the emulation copies those back,
    /// and checks that nothing else was written). When `f` fails the emulation discards every
    /// write; on a GPU, launches enqueued before the failure stand (the operations check what
    /// can fail, like `error_if_nonfinite`, before their first writing launch).
    fn with_session<R>(
        &self,
        tensors: &[&Tensor],
        writable: std::ops::Range<usize>,
        f: impl FnOnce(&mut dyn Session, &[Base]) -> Result<R>,
    ) -> Result<R>;
}

/// What the operations need from a device while its storages are locked.
pub(crate) trait Session {
    /// Copies the table to the device (without waiting for it); its device address.
    fn upload(&mut self, words: &[u64]) -> Result<u64>;
    /// Device address of the kernels' `Scratch` for this thread: zero (but for the last scale and
    /// coefficient) between calls.
    fn scratch(&self) -> u64;
    /// A new, uninitialised device buffer of `len` elements of `dtype` (F32 or F64).
    fn alloc(&mut self, dtype: DType, len: usize) -> Result<Buffer>;
    /// Enqueues a kernel launch.
    ///
    /// # Safety
    /// Every device address among the arguments must be one this session handed out (a base of
    /// the locked tensors plus an offset inside the tensor's view, the table, a buffer, the
    /// scratch), used by the kernel only as its parameter documents: the launches of
    /// [`launch`] built from this session's table do that.
    unsafe fn launch(&mut self, launch: &Launch) -> Result<()>;
    /// The buffer's values, read back to the host (waits for the device).
    fn read(&mut self, buffer: Buffer) -> Result<Vec<f64>>;
    /// The buffer as a tensor of `shape` on the gradients' device; the buffer is consumed.
    fn take_tensor(&mut self, buffer: Buffer, shape: &[usize]) -> Result<Tensor>;
}

/// Enqueues launches built by [`launch`] from this session's table, buffers and scratch.
fn launch_all(s: &mut dyn Session, launches: impl IntoIterator<Item = Launch>) -> Result<()> {
    // SAFETY: every launch passed here comes from `launch.rs` (`NormPlan::reduce`,
    // `NormPlan::segment_norms`, `ElementOp::apply`, `ElementOp::apply_strided`,
    // `StepPlan::update`, `launch::agc`, `launch::agc_strided`) with the addresses of this session: the table it uploaded (whose
    // segments are views of the locked tensors, built from their layouts), its buffers (sized for
    // what the kernel writes) and its scratch.
    launches
        .into_iter()
        .try_for_each(|l| unsafe { s.launch(&l) })
}

/// The global norm as a 0-d tensor on the device; nothing is read back.
pub(crate) fn total_norm(
    dev: &impl KernelDevice,
    set: &GradientSet,
    norm_type: NormType,
) -> Result<Tensor> {
    dev.check_ready()?;
    let plan = NormPlan::new(norm_type, set);
    let groups = set.group_by_storage();
    let copies = contiguous_copies(set)?;
    let operands = Operands::new(set.grads(), &copies, None);
    dev.with_session(operands.tensors(), 0..0, |s, bases| {
        let mut table = Table::default();
        let (norm, _) = table.push_norm_inputs(&groups, &operands, bases);
        let out_f64 = set.norm_dtype() == DType::F64;
        let out = s.alloc(set.norm_dtype(), 1)?;
        let t = s.upload(&table.words)?;
        let scratch = s.scratch();
        launch_all(
            s,
            plan.reduce(t, norm, scratch, out.ptr, out_f64, f64::INFINITY, 0.0, None),
        )?;
        s.take_tensor(out, &[])
    })
}

/// Reduce, then scale in place by the coefficient the reduction left on the device.
pub(crate) fn clip_norm(
    dev: &impl KernelDevice,
    set: &GradientSet,
    settings: ClipSettings,
) -> Result<Tensor> {
    let plan = NormPlan::new(settings.norm_type, set);
    let (norm, ()) = reduce_then_scale(
        dev,
        set,
        &plan,
        (settings.max_norm, settings.eps),
        None,
        |s, reduced| {
            if settings.error_if_nonfinite {
                // The one documented host synchronisation: the norm must be known before any
                // write.
                let norm = s.read(reduced.out)?[0];
                if !norm.is_finite() {
                    return Err(nonfinite_error(norm, settings.norm_type));
                }
            }
            Ok(())
        },
    )?;
    Ok(norm)
}

/// The 0-d norm a reduction wrote to `out` (f64 when `out_f64`, else f32), as the kernels read it.
fn out_norm(out: Buffer, out_f64: bool) -> NormAt {
    NormAt {
        ptr: out.ptr,
        dtype: if out_f64 {
            launch::DT_F64
        } else {
            launch::DT_F32
        },
        max_norm: f64::INFINITY,
        eps: 0.0,
    }
}

/// ZClip (`policy::zclip`): reduce the L2 norm, run the ZClip step on the statistics `state` (a
/// 1-D `F64` tensor, only read) into a new buffer, then scale in place by the coefficient it left
/// in the scratch. Three launches (and the strided ones), one table, no host synchronisation.
pub(crate) fn clip_zclip(
    dev: &impl KernelDevice,
    set: &GradientSet,
    state: &Tensor,
    params: &ZClipParams,
) -> Result<(Tensor, Tensor)> {
    let plan = NormPlan::new(NormType::L2, set);
    reduce_then_scale(
        dev,
        set,
        &plan,
        (f64::INFINITY, 0.0),
        Some(state),
        |s, reduced| {
            let Some(base) = reduced.extra else {
                bail!("internal error: ZClip's statistics were not passed to the session")
            };
            let norm = out_norm(reduced.out, reduced.out_f64);
            zclip_step(s, base, state, norm, reduced.scratch, params)
        },
    )
}

/// Enqueues `grad_clip_zclip` for the norm at `norm`: the statistics `state` (an operand whose
/// storage starts at `base`, only read) updated into a new buffer, returned as a tensor; the
/// coefficient goes to the scratch for the pass that follows.
fn zclip_step(
    s: &mut dyn Session,
    base: Base,
    state: &Tensor,
    norm: NormAt,
    scratch: u64,
    params: &ZClipParams,
) -> Result<Tensor> {
    let words = state.elem_count();
    let state_out = s.alloc(DType::F64, words)?;
    launch_all(
        s,
        [launch::zclip(
            base.at(state.layout().start_offset()),
            state_out.ptr,
            words,
            norm,
            scratch,
            params,
        )],
    )?;
    s.take_tensor(state_out, &[words])
}

/// What [`reduce_then_scale`] hands to the work between the reduction and the scaling pass.
struct Reduced {
    /// The norm's buffer (f64 when `out_f64`, else f32).
    out: Buffer,
    out_f64: bool,
    /// The scratch, holding the reduction's coefficient (which the work may replace).
    scratch: u64,
    /// The base of the session's extra operand, when one was passed.
    extra: Option<Base>,
}

/// The shared sequence of the clips that scale by a coefficient of the global norm: reduce
/// (`plan`, the coefficient `min(1, max_norm / (norm + eps))` of `bounds` to the scratch), run
/// `between` (a policy's kernel that replaces the coefficient, a check that refuses before any
/// write), then scale every gradient in place by the scratch's coefficient. Gradients that cannot
/// be written are refused before anything is enqueued. Returns the norm (0-d) and what `between`
/// returned.
fn reduce_then_scale<R>(
    dev: &impl KernelDevice,
    set: &GradientSet,
    plan: &NormPlan,
    bounds: (f64, f64),
    extra: Option<&Tensor>,
    between: impl FnOnce(&mut dyn Session, &Reduced) -> Result<R>,
) -> Result<(Tensor, R)> {
    dev.check_ready()?;
    let groups = set.storage_groups()?;
    let copies = contiguous_copies(set)?;
    let operands = Operands::new(set.grads(), &copies, extra);
    dev.with_session(
        operands.tensors(),
        0..operands.gradient_count(),
        |s, bases| {
            let mut table = Table::default();
            let (norm, _) = table.push_norm_inputs(&groups, &operands, bases);
            let (write, strided) =
                table.push_write_targets(set.grads(), &groups, bases, Some(norm));
            let out_f64 = set.norm_dtype() == DType::F64;
            let out = s.alloc(set.norm_dtype(), 1)?;
            let t = s.upload(&table.words)?;
            let scratch = s.scratch();
            let (max_norm, eps) = bounds;
            launch_all(
                s,
                plan.reduce(t, norm, scratch, out.ptr, out_f64, max_norm, eps, None),
            )?;
            let reduced = Reduced {
                out,
                out_f64,
                scratch,
                extra: operands.extra().map(|i| bases[i]),
            };
            let done = between(s, &reduced)?;
            let op = ElementOp::Scale(Coefficient::Scratch(scratch));
            launch_all(s, op.apply(t, write))?;
            launch_all(s, strided.iter().map(|target| op.apply_strided(target)))?;
            Ok((s.take_tensor(out, &[])?, done))
        },
    )
}

/// Scale in place by `min(1, max_norm / (total_norm + eps))`, computed by the scale kernel from the
/// 0-d `total_norm` on the device (a negative or NaN `total_norm` makes the gradients NaN: it is
/// never read back).
pub(crate) fn scale_with_norm(
    dev: &impl KernelDevice,
    set: &GradientSet,
    max_norm: f64,
    eps: f64,
    total_norm: &Tensor,
) -> Result<()> {
    dev.check_ready()?;
    let groups = set.storage_groups()?;
    let norm = readable_norm(total_norm)?;
    if !norm.device().same_device(set.device()) {
        bail!("clip_grads_with_norm_: total_norm must be on the gradients' device")
    }
    // The scale kernel reads the norm while it writes the gradients: never from their storage.
    let norm_key = storage_key(&norm);
    let norm = if set.grads().iter().any(|g| storage_key(g) == norm_key) {
        norm.copy()?
    } else {
        norm
    };
    let operands = Operands::new(set.grads(), &[], Some(&norm));
    dev.with_session(
        operands.tensors(),
        0..operands.gradient_count(),
        |s, bases| {
            let mut table = Table::default();
            let (write, strided) = table.push_write_targets(set.grads(), &groups, bases, None);
            let index = operands.extra().expect("the norm was passed");
            let op = ElementOp::Scale(Coefficient::Norm(norm_at(
                bases[index],
                &norm,
                max_norm,
                eps,
            )));
            let t = s.upload(&table.words)?;
            launch_all(s, op.apply(t, write))?;
            launch_all(s, strided.iter().map(|target| op.apply_strided(target)))
        },
    )
}

/// A 0-d norm tensor in a dtype the kernels read: a gradient dtype as it is, another float dtype
/// (F8…) converted to F32 on the device by candle.
fn readable_norm(norm: &Tensor) -> Result<Tensor> {
    match norm.dtype() {
        DType::F32 | DType::F64 | DType::F16 | DType::BF16 => Ok(norm.clone()),
        _ => norm.to_dtype(DType::F32),
    }
}

/// The 0-d `norm`, an operand whose storage starts at `base`, as the kernels read it.
fn norm_at(base: Base, norm: &Tensor, max_norm: f64, eps: f64) -> NormAt {
    NormAt {
        ptr: base.at(norm.layout().start_offset()),
        dtype: base.dtype,
        max_norm,
        eps,
    }
}

/// Clamp every element into `[-clip_value, clip_value]` in place (bound rounded towards zero in
/// each gradient's dtype; NaN stays NaN), one launch.
pub(crate) fn clamp(dev: &impl KernelDevice, set: &GradientSet, clip_value: f64) -> Result<()> {
    dev.check_ready()?;
    let groups = set.storage_groups()?;
    let operands = Operands::new(set.grads(), &[], None);
    dev.with_session(
        operands.tensors(),
        0..operands.gradient_count(),
        |s, bases| {
            let mut table = Table::default();
            let (write, strided) = table.push_write_targets(set.grads(), &groups, bases, None);
            let op = ElementOp::Clamp(clip_value);
            let t = s.upload(&table.words)?;
            launch_all(s, op.apply(t, write))?;
            launch_all(s, strided.iter().map(|target| op.apply_strided(target)))
        },
    )
}

/// The reduction for `plan` over `set`, storing every chunk's partial too (in a buffer of at
/// least one element), then `then` with the session, the table's address, the norm inputs' part
/// of the table, the partials and each gradient's segment (`None`: empty). Only reads the
/// gradients.
fn reduce_with_partials<R>(
    dev: &impl KernelDevice,
    set: &GradientSet,
    plan: &NormPlan,
    then: impl FnOnce(&mut dyn Session, u64, Part, Buffer, &[Option<u32>]) -> Result<R>,
) -> Result<R> {
    dev.check_ready()?;
    let groups = set.group_by_storage();
    let copies = contiguous_copies(set)?;
    let operands = Operands::new(set.grads(), &copies, None);
    dev.with_session(operands.tensors(), 0..0, |s, bases| {
        let mut table = Table::default();
        let (norm, segment_of) = table.push_norm_inputs(&groups, &operands, bases);
        let out_f64 = set.norm_dtype() == DType::F64;
        let out = s.alloc(set.norm_dtype(), 1)?;
        let partials = s.alloc(DType::F64, norm.chunks.max(1) as usize)?;
        let t = s.upload(&table.words)?;
        let scratch = s.scratch();
        launch_all(
            s,
            plan.reduce(
                t,
                norm,
                scratch,
                out.ptr,
                out_f64,
                f64::INFINITY,
                0.0,
                Some(partials.ptr),
            ),
        )?;
        then(s, t, norm, partials, &segment_of)
    })
}

/// The norm of each gradient of the set on its own, read back in one transfer: the reduction of
/// the total also stores every chunk's partial, and one more launch combines them per gradient.
/// `None` when the norm may need the rescue pass (F64 gradients or `p > 6`): the caller then takes
/// the gradients one at a time.
pub(crate) fn tensor_norms(
    dev: &impl KernelDevice,
    set: &GradientSet,
    norm_type: NormType,
) -> Result<Option<Vec<f32>>> {
    let plan = NormPlan::new(norm_type, set);
    if plan.rescue {
        return Ok(None);
    }
    reduce_with_partials(dev, set, &plan, |s, t, norm, partials, segment_of| {
        if norm.segments == 0 {
            return Ok(Some(vec![0.0; segment_of.len()]));
        }
        let per_segment = s.alloc(DType::F32, norm.segments as usize)?;
        launch_all(
            s,
            [plan.segment_norms(t, norm, partials.ptr, per_segment.ptr)],
        )?;
        let values = s.read(per_segment)?;
        // An empty gradient has no segment: its norm is 0.
        Ok(Some(
            segment_of
                .iter()
                .map(|seg| seg.map_or(0.0, |k| values[k as usize] as f32))
                .collect(),
        ))
    })
}

/// Every chunk's partial of the reduction for `norm_type` (`|g|` summed, squared, to the power
/// `p`, or the largest `|g|` for `Inf`), read back in one transfer: the very values the device
/// adds into its superaccumulator (or takes the maximum of), so that an exact sum of them on the
/// host is the device's sum. For the norm across processes. The whole reduction runs (the rescue
/// launch too, a no-op unless asked for), so the scratch is left as every operation leaves it.
pub(crate) fn chunk_partials(
    dev: &impl KernelDevice,
    set: &GradientSet,
    norm_type: NormType,
) -> Result<Vec<f64>> {
    let plan = NormPlan::new(norm_type, set);
    reduce_with_partials(dev, set, &plan, |s, _, norm, partials, _| {
        let mut values = s.read(partials)?;
        values.truncate(norm.chunks as usize);
        Ok(values)
    })
}

/// A fused optimizer step (`backend::update`): the reduction the clip (or the finite check)
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

/// A small map that keeps only the `capacity` most recently used entries: per-thread device state
/// (CUDA scratch, pinned staging) for the devices a thread used last, so that a program creating
/// devices in a loop does not keep every old device's buffers alive.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) struct RecentlyUsed<K, V> {
    /// Most recently used last.
    entries: Vec<(K, V)>,
    capacity: usize,
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
impl<K: PartialEq, V> RecentlyUsed<K, V> {
    pub(crate) const fn new(capacity: usize) -> Self {
        Self {
            entries: Vec::new(),
            capacity,
        }
    }

    /// The entry for `key`, made with `make` when absent (evicting the least recently used one
    /// beyond the capacity); it becomes the most recently used.
    pub(crate) fn get_or_try_insert(
        &mut self,
        key: K,
        make: impl FnOnce() -> Result<V>,
    ) -> Result<&mut V> {
        match self.entries.iter().position(|(k, _)| *k == key) {
            Some(i) => {
                let entry = self.entries.remove(i);
                self.entries.push(entry);
            }
            None => {
                let value = make()?;
                if self.entries.len() >= self.capacity.max(1) {
                    self.entries.remove(0);
                }
                self.entries.push((key, value));
            }
        }
        Ok(&mut self.entries.last_mut().expect("just pushed").1)
    }

    #[cfg(test)]
    fn keys(&self) -> Vec<&K> {
        self.entries.iter().map(|(k, _)| k).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recently_used_keeps_the_last_entries() {
        let mut cache = RecentlyUsed::new(2);
        *cache.get_or_try_insert(1, || Ok(10)).unwrap() += 1;
        cache.get_or_try_insert(2, || Ok(20)).unwrap();
        // 1 is used again: 2 becomes the oldest and is evicted by 3.
        assert_eq!(*cache.get_or_try_insert(1, || Ok(0)).unwrap(), 11);
        cache.get_or_try_insert(3, || Ok(30)).unwrap();
        assert_eq!(cache.keys(), vec![&1, &3]);
        // A failing constructor inserts nothing.
        assert!(cache
            .get_or_try_insert(4, || Err(candle_core::Error::Msg("no".into())))
            .is_err());
        assert_eq!(cache.keys(), vec![&1, &3]);
        // Re-created after eviction.
        assert_eq!(*cache.get_or_try_insert(2, || Ok(21)).unwrap(), 21);
        assert_eq!(cache.keys(), vec![&3, &2]);
    }
}
