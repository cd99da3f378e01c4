//! Gradient accumulation on the CPU (`ops::accumulate`): one pass over every (buffer, source)
//! pair, in place in the buffers, through one `inplace_op1` per buffer; in parallel over the pairs
//! and over chunks of [`CHUNK`] elements of a large pair when the pass is large.

use candle_core::{bail, CpuStorage, InplaceOp1, Layout, Result, Tensor};
use rayon::prelude::*;

use super::{Data, CHUNK, PARALLEL_MIN_ELEMENTS};
use crate::ops::accumulate::{accumulate, AccumulateOp, Pair, PairSet};
use crate::ops::element::Element;
use crate::ops::layout_runs::for_each_run;

multiversion! {
    /// One contiguous run of a pass: `dst[i] = accumulate(dst[i], src[i], op)`.
    fn run_slice<A: Element, G: Element>(dst: &mut [A], src: &[G], op: AccumulateOp) => run_slice_generic, run_slice_avx2
}

#[inline(always)]
fn run_slice_generic<A: Element, G: Element>(dst: &mut [A], src: &[G], op: AccumulateOp) {
    // F32 into F32: the `f32` sum itself, bitwise the f64 sum rounded once (the f64 sum of two
    // floats rounds innocuously), which vectorises.
    if let (AccumulateOp::Add, Some(s)) = (op, G::as_f32_slice(src)) {
        if let Some(d) = A::as_f32_slice_mut(dst) {
            d.iter_mut().zip(s).for_each(|(a, g)| *a += *g);
            return;
        }
    }
    dst.iter_mut()
        .zip(src)
        .for_each(|(a, g)| *a = accumulate(*a, *g, op));
}

/// Runs `op` over every pair of `set`, in place in the buffers.
pub(crate) fn run(set: &PairSet, op: AccumulateOp) -> Result<()> {
    let parallel = set.elements() >= PARALLEL_MIN_ELEMENTS && rayon::current_num_threads() > 1;
    let one = |pair: &Pair| -> Result<()> {
        if pair.dst.elem_count() == 0 {
            return Ok(());
        }
        pair.dst.inplace_op1(&PairPass {
            src: pair.src.as_ref(),
            op,
            parallel,
        })
    };
    if parallel {
        // Small pairs in batches: a task per pair would cost more than the pair.
        set.pairs().par_iter().with_min_len(16).try_for_each(one)
    } else {
        set.pairs().iter().try_for_each(one)
    }
}

/// The `InplaceOp1` that updates one buffer from its source.
struct PairPass<'a> {
    src: Option<&'a Tensor>,
    op: AccumulateOp,
    parallel: bool,
}

impl InplaceOp1 for PairPass<'_> {
    fn name(&self) -> &'static str {
        "candle-grad-clip-accumulate"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            bail!("internal error: an accumulation buffer is not contiguous")
        };
        match storage {
            CpuStorage::F32(v) => self.typed(&mut v[start..end]),
            CpuStorage::F64(v) => self.typed(&mut v[start..end]),
            CpuStorage::F16(v) => self.typed(&mut v[start..end]),
            CpuStorage::BF16(v) => self.typed(&mut v[start..end]),
            _ => bail!("gradient accumulation writes F32, F64, F16 and BF16 buffers only"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, _: &mut candle_core::CudaStorage, _: &Layout) -> Result<()> {
        bail!("internal error: the CPU accumulation pass was called on CUDA storage")
    }
}

impl PairPass<'_> {
    fn typed<A: Element>(&self, dst: &mut [A]) -> Result<()> {
        let Some(src) = self.src else {
            // Zero: no source (any element type will do for the call).
            let zero: [A; 0] = [];
            self.contiguous(dst, &zero, true);
            return Ok(());
        };
        let (storage, layout) = src.storage_and_layout();
        let data = Data::of(&storage)?;
        dispatch!(data, xs => self.read_source(dst, xs, layout));
        Ok(())
    }

    fn read_source<A: Element, G: Element>(&self, dst: &mut [A], src: &[G], layout: &Layout) {
        if let Some((start, end)) = layout.contiguous_offsets() {
            self.contiguous(dst, &src[start..end], false);
            return;
        }
        // A strided view: its runs in logical order fill the buffer in order.
        let mut at = 0;
        for_each_run(layout, |start, len| {
            run_slice(&mut dst[at..at + len], &src[start..start + len], self.op);
            at += len;
        });
    }

    /// `dst` from the equally long `src` (ignored, and empty, when `zero`), in chunks across
    /// threads when the pass is parallel.
    fn contiguous<A: Element, G: Element>(&self, dst: &mut [A], src: &[G], zero: bool) {
        let op = self.op;
        let chunk = |d: &mut [A], s: &[G]| {
            if zero {
                d.fill(A::from_f64(0.0));
            } else {
                run_slice(d, s, op);
            }
        };
        if self.parallel && dst.len() > CHUNK {
            if zero {
                dst.par_chunks_mut(CHUNK).for_each(|d| chunk(d, &[]));
            } else {
                dst.par_chunks_mut(CHUNK)
                    .zip(src.par_chunks(CHUNK))
                    .for_each(|(d, s)| chunk(d, s));
            }
        } else {
            chunk(dst, src);
        }
    }
}
