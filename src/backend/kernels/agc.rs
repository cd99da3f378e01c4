//! Adaptive gradient clipping on a kernel device: one `grad_clip_agc` launch over a table of one
//! `AgcSegment` per var (8 words: parameter, gradient, unit length, units, first unit, dtype,
//! write, reserved), plus one `grad_clip_agc_strided` per non-contiguous gradient. The fused
//! optimizers run `grad_clip_agc` without writes and let the step read each unit's coefficient
//! from the table's `AgcUnits` (the coefficient buffer's address, then per update segment its
//! unit length and first unit).

use candle_core::{DType, Result, Tensor};

use super::abi::MAX_RANK;
use super::launch;
use super::table::Base;
use super::table::{StridedTarget, Table};
use super::{launch_all, Buffer, KernelDevice, Session};
use crate::ops::agc::{units_of, AgcOutcome, AgcSet};

/// Words per `AgcSegment`.
const AGC_SEGMENT_WORDS: usize = 8;

/// One var for the AGC table.
pub(crate) struct AgcEntry {
    /// Device address of the parameter's first element (a contiguous view).
    pub(crate) param: u64,
    /// Of the gradient's (contiguous: itself or a copy).
    pub(crate) grad: u64,
    pub(crate) dims: Vec<usize>,
    pub(crate) dtype: u64,
    /// Scale its clipped units in place.
    pub(crate) write: bool,
}

/// The AGC segments in a table.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AgcPart {
    first_word: usize,
    pub(crate) segments: u32,
    pub(crate) units: u64,
}

impl AgcPart {
    pub(crate) fn segments_ptr(self, table: u64) -> u64 {
        table + (self.first_word * 8) as u64
    }
}

/// Appends one `AgcSegment` per entry with units (empty vars are left out); returns the part and
/// each entry's first unit.
pub(crate) fn push_segments(table: &mut Table, entries: &[AgcEntry]) -> (AgcPart, Vec<u64>) {
    let first_word = table.words.len();
    let (mut segments, mut units) = (0u32, 0u64);
    let mut starts = Vec::with_capacity(entries.len());
    for e in entries {
        starts.push(units);
        let (n, len) = units_of(&e.dims);
        if n == 0 {
            continue;
        }
        table.words.extend_from_slice(&[
            e.param,
            e.grad,
            len as u64,
            n as u64,
            units,
            e.dtype,
            e.write as u64,
            0,
        ]);
        debug_assert_eq!(
            table.words.len(),
            first_word + (segments as usize + 1) * AGC_SEGMENT_WORDS
        );
        segments += 1;
        units += n as u64;
    }
    (
        AgcPart {
            first_word,
            segments,
            units,
        },
        starts,
    )
}

/// Appends the `AgcUnits` the fused step reads: the coefficient buffer's address, then for each
/// entry (one per update segment, in order) its unit length (1 for an empty var) and first unit.
/// Returns its offset in words.
pub(crate) fn push_units(
    table: &mut Table,
    coefs: u64,
    entries: &[AgcEntry],
    starts: &[u64],
) -> usize {
    let offset = table.words.len();
    table.words.push(coefs);
    for (e, &start) in entries.iter().zip(starts) {
        let (_, len) = units_of(&e.dims);
        table.words.extend_from_slice(&[len.max(1) as u64, start]);
    }
    offset
}

/// A contiguous copy of every non-contiguous, non-empty tensor (for reading).
fn copies(tensors: &[Tensor]) -> Result<Vec<Option<Tensor>>> {
    tensors
        .iter()
        .map(|t| {
            if t.layout().contiguous_offsets().is_some() || t.elem_count() == 0 {
                Ok(None)
            } else {
                t.contiguous().map(Some)
            }
        })
        .collect()
}

/// Device address of a contiguous tensor's first element.
fn start(base: Base, t: &Tensor) -> u64 {
    base.at(t.layout().start_offset())
}

/// Clips the set in place (`adaptive_clip_grad_` on a kernel device); no host synchronisation.
pub(crate) fn clip(
    dev: &impl KernelDevice,
    set: &AgcSet,
    clipping: f64,
    eps: f64,
) -> Result<AgcOutcome> {
    dev.check_ready()?;
    let grads = &set.grads;
    let n = grads.len();
    let grad_copies = copies(grads)?;
    let param_copies = copies(&set.params)?;
    check_strided(grads)?;
    // Operands: the gradients (written), the parameters' contiguous views, the gradients' copies.
    let mut tensors: Vec<&Tensor> = grads.iter().collect();
    let param_index: Vec<usize> = set
        .params
        .iter()
        .zip(&param_copies)
        .map(|(p, c)| {
            tensors.push(c.as_ref().unwrap_or(p));
            tensors.len() - 1
        })
        .collect();
    let grad_index: Vec<usize> = grad_copies
        .iter()
        .enumerate()
        .map(|(k, c)| match c {
            Some(c) => {
                tensors.push(c);
                tensors.len() - 1
            }
            None => k,
        })
        .collect();
    let device = set.device().clone();
    let out_dtype = set.norm_dtype();
    dev.with_session(&tensors, 0..n, |s, bases| {
        let entries: Vec<AgcEntry> = (0..n)
            .map(|k| AgcEntry {
                param: start(bases[param_index[k]], tensors[param_index[k]]),
                grad: start(bases[grad_index[k]], tensors[grad_index[k]]),
                dims: grads[k].dims().to_vec(),
                dtype: bases[k].dtype,
                write: grad_copies[k].is_none(),
            })
            .collect();
        let mut table = Table::default();
        let (part, starts) = push_segments(&mut table, &entries);
        if part.segments == 0 {
            return Ok(AgcOutcome {
                norm: Tensor::zeros((), out_dtype, &device)?,
                clipped: Tensor::zeros((), DType::U32, &device)?,
            });
        }
        let strided = grad_copies.iter().any(Option::is_some);
        let coefs = if strided {
            Some(s.alloc(DType::F64, part.units as usize)?)
        } else {
            None
        };
        let out = s.alloc(out_dtype, 1)?;
        let clipped = s.alloc(DType::F32, 1)?;
        let t = s.upload(&table.words)?;
        let scratch = s.scratch();
        launch_all(
            s,
            [launch::agc(
                part.segments_ptr(t),
                part.segments,
                part.units,
                clipping,
                eps,
                scratch,
                out.ptr,
                out_dtype == DType::F64,
                coefs.map_or(0, |c| c.ptr),
                clipped.ptr,
            )],
        )?;
        if let Some(coefs) = coefs {
            write_strided(s, grads, &grad_copies, bases, coefs, &starts)?;
        }
        let norm = s.take_tensor(out, &[])?;
        let clipped = s.take_tensor(clipped, &[])?.to_dtype(DType::U32)?;
        Ok(AgcOutcome { norm, clipped })
    })
}

/// Refuses, before anything is enqueued, a strided gradient view the strided kernel cannot take.
fn check_strided(grads: &[Tensor]) -> Result<()> {
    for g in grads {
        if g.elem_count() > 0
            && g.layout().contiguous_offsets().is_none()
            && StridedTarget::new(g.layout(), Base { ptr: 0, dtype: 0 }).is_none()
        {
            candle_core::bail!(
                "adaptive_clip_grad_: a non-contiguous gradient of shape {:?} (stride {:?}) has more than {MAX_RANK} dimensions after merging; make it contiguous; nothing was modified",
                g.dims(),
                g.stride()
            )
        }
    }
    Ok(())
}

/// Scales each strided gradient (one measured through its contiguous copy) in place by its
/// units' coefficients (`coefs`, unit `starts[k]` first for gradient `k`).
fn write_strided(
    s: &mut dyn Session,
    grads: &[Tensor],
    grad_copies: &[Option<Tensor>],
    bases: &[Base],
    coefs: Buffer,
    starts: &[u64],
) -> Result<()> {
    let mut launches = Vec::new();
    for (k, grad) in grads.iter().enumerate() {
        if grad_copies[k].is_none() {
            continue;
        }
        let Some(target) = StridedTarget::new(grad.layout(), bases[k]) else {
            candle_core::bail!("internal error: a strided AGC target was not checked")
        };
        let (_, unit_len) = units_of(grad.dims());
        launches.push(launch::agc_strided(
            &target,
            unit_len as u64,
            coefs.ptr + starts[k] * 8,
        ));
    }
    launch_all(s, launches)
}
