//! The segment table: every gradient (or the part of a storage that must be written) as one entry
//! `(device address, length, first chunk, dtype)` of the kernels' `Segment` array.

use candle_core::{Layout, Result, Tensor};

use crate::ops::gradients::{GradientSet, StorageGroups};
use crate::ops::layout_runs::union_of_runs;

use super::abi;
use super::abi::{CHUNK, MAX_RANK, SEGMENT_WORDS};

/// Where a tensor's storage starts on the device, and its dtype code (`abi::DT_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Base {
    pub(crate) ptr: u64,
    pub(crate) dtype: u64,
}

impl Base {
    /// Device address of the storage's element `index`.
    pub(crate) fn at(self, index: usize) -> u64 {
        self.ptr + index as u64 * abi::elem_size(self.dtype)
    }
}

/// The tensors a call hands to the device, in one list: the gradients, then the contiguous
/// copies made for the norm (one per non-contiguous gradient), then an extra tensor (the norm
/// given to `clip_grads_with_norm_`). Bases are resolved in this order.
pub(crate) struct Operands<'t> {
    grads: &'t [Tensor],
    /// Index into `all` of each gradient's contiguous copy.
    copy_of: Vec<Option<usize>>,
    all: Vec<&'t Tensor>,
    extra: Option<usize>,
}

impl<'t> Operands<'t> {
    pub(crate) fn new(
        grads: &'t [Tensor],
        copies: &'t [Option<Tensor>],
        extra: Option<&'t Tensor>,
    ) -> Self {
        let mut all: Vec<&Tensor> = grads.iter().collect();
        let copy_of = copies
            .iter()
            .map(|c| {
                c.as_ref().map(|c| {
                    all.push(c);
                    all.len() - 1
                })
            })
            .collect();
        let extra = extra.map(|t| {
            all.push(t);
            all.len() - 1
        });
        Self {
            grads,
            copy_of,
            all,
            extra,
        }
    }

    pub(crate) fn tensors(&self) -> &[&'t Tensor] {
        &self.all
    }

    /// Index of the extra tensor in [`tensors`](Self::tensors).
    pub(crate) fn extra(&self) -> Option<usize> {
        self.extra
    }

    /// Adds a tensor after the others; its index in [`tensors`](Self::tensors).
    pub(crate) fn push(&mut self, tensor: &'t Tensor) -> usize {
        self.all.push(tensor);
        self.all.len() - 1
    }

    /// Index of gradient `i`'s contiguous view: its copy, or itself.
    pub(crate) fn grad_view(&self, i: usize) -> usize {
        self.copy_of[i].unwrap_or(i)
    }

    /// How many of the tensors are gradients (they come first).
    pub(crate) fn gradient_count(&self) -> usize {
        self.grads.len()
    }
}

/// A contiguous copy of every non-contiguous, non-empty gradient (the slow path of the norm), made
/// by candle on the gradients' device before anything is locked.
pub(crate) fn contiguous_copies(set: &GradientSet) -> Result<Vec<Option<Tensor>>> {
    set.grads()
        .iter()
        .map(|g| {
            if g.layout().contiguous_offsets().is_some() || g.elem_count() == 0 {
                Ok(None)
            } else {
                g.contiguous().map(Some)
            }
        })
        .collect()
}

/// The table: a flat array of `Segment`s in two parts (sent once when they are equal).
#[derive(Default)]
pub(crate) struct Table {
    pub(crate) words: Vec<u64>,
}

/// One part of the table: a run of entries whose chunk indices start at 0.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Part {
    /// Offset of the first entry, in words.
    pub(crate) first_word: usize,
    pub(crate) segments: u32,
    pub(crate) chunks: u64,
}

impl Part {
    /// Device address of the part's first entry, in a table copied to `table`.
    pub(crate) fn segments_ptr(self, table: u64) -> u64 {
        table + (self.first_word * 8) as u64
    }
}

impl Table {
    fn start_part(&self) -> Part {
        Part {
            first_word: self.words.len(),
            ..Part::default()
        }
    }

    fn push(&mut self, part: Part, ptr: u64, len: u64, dtype: u64) -> Part {
        if len == 0 {
            return part;
        }
        self.words
            .extend_from_slice(&[ptr, len, part.chunks, dtype]);
        Part {
            first_word: part.first_word,
            segments: part.segments + 1,
            chunks: part.chunks + len.div_ceil(CHUNK),
        }
    }

    /// The norm's inputs: every gradient view (aliases count as often as they are listed),
    /// through its contiguous copy when it is not contiguous. Gradients are taken in storage
    /// order, the order [`push_write_targets`](Self::push_write_targets) uses, so that the two
    /// parts coincide (one table) in the common case; the norm does not depend on the order.
    ///
    /// Returns the part and, for each gradient, its segment in the part (`None` for an empty one).
    /// `groups` are the gradients' storage groups.
    pub(crate) fn push_norm_inputs(
        &mut self,
        groups: &StorageGroups,
        operands: &Operands<'_>,
        bases: &[Base],
    ) -> (Part, Vec<Option<u32>>) {
        let mut part = self.start_part();
        let mut segment_of = vec![None; operands.gradient_count()];
        for group in groups.iter() {
            for &i in group {
                let index = operands.grad_view(i);
                let tensor = operands.all[index];
                if let Some((start, end)) = tensor.layout().contiguous_offsets() {
                    let base = bases[index];
                    let before = part.segments;
                    part = self.push(part, base.at(start), (end - start) as u64, base.dtype);
                    if part.segments > before {
                        segment_of[i] = Some(before);
                    }
                }
            }
        }
        (part, segment_of)
    }

    /// The elements every gradient's storage group must have written, exactly once each:
    /// a single contiguous view becomes one segment; a single strided view is returned for the
    /// strided kernel (or, above [`MAX_RANK`] dimensions, becomes its runs); views that share a
    /// storage become the union of their runs, merged into disjoint segments.
    ///
    /// When the write part equals the norm part `norm` (every gradient contiguous, none aliasing),
    /// it is not added again: the returned part is `norm`.
    pub(crate) fn push_write_targets(
        &mut self,
        grads: &[Tensor],
        groups: &StorageGroups,
        bases: &[Base],
        norm: Option<Part>,
    ) -> (Part, Vec<StridedTarget>) {
        let mut part = self.start_part();
        let mut strided = Vec::new();
        for group in groups.iter() {
            let base = bases[group[0]];
            if let [i] = group {
                let layout = grads[*i].layout();
                if layout.shape().elem_count() == 0 {
                    continue;
                }
                if let Some((start, end)) = layout.contiguous_offsets() {
                    part = self.push(part, base.at(start), (end - start) as u64, base.dtype);
                    continue;
                }
                // `storage_groups` guarantees a lone view does not repeat elements.
                if let Some(target) = StridedTarget::new(layout, base) {
                    strided.push(target);
                    continue;
                }
            }
            for (s, e) in union_of_runs(group.iter().map(|&i| grads[i].layout())) {
                part = self.push(part, base.at(s), (e - s) as u64, base.dtype);
            }
        }
        if let Some(norm) = norm {
            let words = |p: Part| p.first_word..p.first_word + p.segments as usize * SEGMENT_WORDS;
            if norm.segments > 0 && self.words[words(norm)] == self.words[words(part)] {
                self.words.truncate(part.first_word);
                return (norm, strided);
            }
        }
        (part, strided)
    }
}

/// One non-contiguous view without repeated elements, for `grad_clip_apply_strided`.
#[derive(Debug, Clone)]
pub(crate) struct StridedTarget {
    pub(crate) ptr: u64,
    pub(crate) dtype: u64,
    pub(crate) elements: u64,
    pub(crate) rank: u32,
    /// Dims then strides (the kernel's `StridedView`), coalesced, size-1 dims dropped.
    pub(crate) view: [u64; 2 * MAX_RANK],
}

impl StridedTarget {
    pub(crate) fn new(layout: &Layout, base: Base) -> Option<Self> {
        let mut dims: Vec<u64> = Vec::new();
        let mut strides: Vec<u64> = Vec::new();
        for (&d, &s) in layout.dims().iter().zip(layout.stride()) {
            if d == 1 {
                continue;
            }
            let (d, s) = (d as u64, s as u64);
            match (dims.last_mut(), strides.last_mut()) {
                // The outer dim steps over exactly the inner one: one dim.
                (Some(ld), Some(ls)) if *ls == s * d => {
                    *ld *= d;
                    *ls = s;
                }
                _ => {
                    dims.push(d);
                    strides.push(s);
                }
            }
        }
        if dims.len() > MAX_RANK {
            return None;
        }
        let mut view = [0u64; 2 * MAX_RANK];
        view[..dims.len()].copy_from_slice(&dims);
        view[MAX_RANK..MAX_RANK + strides.len()].copy_from_slice(&strides);
        Some(Self {
            ptr: base.at(layout.start_offset()),
            dtype: base.dtype,
            elements: layout.shape().elem_count() as u64,
            rank: dims.len() as u32,
            view,
        })
    }
}

/// One var of a fused step, resolved to device addresses.
pub(crate) struct UpdateEntry {
    pub(crate) param: u64,
    pub(crate) grad: u64,
    pub(crate) state: [u64; 2],
    pub(crate) len: u64,
    pub(crate) dtype: u64,
    pub(crate) var: u64,
}

impl Table {
    /// The update part: one `UpdateSegment` (8 words) per var, empty vars included (for their
    /// flags).
    pub(crate) fn push_updates(&mut self, entries: &[UpdateEntry]) -> Part {
        let mut part = self.start_part();
        for e in entries {
            self.words.extend_from_slice(&[
                e.param,
                e.grad,
                e.state[0],
                e.state[1],
                e.len,
                part.chunks,
                e.dtype,
                e.var,
            ]);
            part.segments += 1;
            part.chunks += e.len.div_ceil(CHUNK);
        }
        part
    }
}

/// One (buffer, source) pair of an accumulation pass, resolved to device addresses (`src` 0 for
/// a pass without a source).
pub(crate) struct PairEntry {
    pub(crate) dst: u64,
    pub(crate) src: u64,
    pub(crate) len: u64,
    pub(crate) dst_dtype: u64,
    pub(crate) src_dtype: u64,
}

impl Table {
    /// The pair part: one `PairSegment` (6 words) per non-empty pair.
    pub(crate) fn push_pairs(&mut self, entries: &[PairEntry]) -> Part {
        let mut part = self.start_part();
        for e in entries.iter().filter(|e| e.len > 0) {
            self.words.extend_from_slice(&[
                e.dst,
                e.src,
                e.len,
                part.chunks,
                e.dst_dtype,
                e.src_dtype,
            ]);
            part.segments += 1;
            part.chunks += e.len.div_ceil(CHUNK);
        }
        part
    }
}
