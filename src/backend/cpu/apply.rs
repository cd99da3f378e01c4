//! The CPU's in-place element-wise passes (scale, clamp): one `inplace_op1` per storage, so that
//! every element is written exactly once even when gradients alias, in parallel for large sets.

use candle_core::{bail, CpuStorage, InplaceOp1, Layout, Result, Tensor};
use rayon::prelude::*;

use super::{CHUNK, PARALLEL_MIN_ELEMENTS};
use crate::ops::clip::ElementwiseOp;
use crate::ops::element::{clamp, round_toward_zero, scale, Element};
use crate::ops::gradients::{repeats_elements, GradientSet, StorageGroups};
use crate::ops::layout_runs::{for_each_run, union_of_runs};

multiversion! {
    /// Applies an element kernel to a slice in place.
    fn run_kernel<T: Element>(kernel: ElementKernel<T>, xs: &mut [T]) => run_kernel_generic, run_kernel_avx2
}

/// Applies `op` in place to every element of every gradient, each element exactly once; `groups`
/// are the set's [`storage_groups`](GradientSet::storage_groups).
pub(crate) fn apply_in_place(
    set: &GradientSet,
    groups: &StorageGroups,
    op: ElementwiseOp,
) -> Result<()> {
    let grads = set.grads();
    let elements: usize = grads.iter().map(|g| g.elem_count()).sum();
    let parallel = elements >= PARALLEL_MIN_ELEMENTS && rayon::current_num_threads() > 1;
    let run_group = |group: &[usize]| -> Result<()> {
        // `storage_groups` guarantees a member that candle accepts as an in-place destination
        // when the group has elements at all.
        let writable = |i: usize| grads[i].elem_count() > 0 && !repeats_elements(&grads[i]);
        let Some(&dst) = group.iter().find(|&&i| writable(i)) else {
            return Ok(());
        };
        grads[dst].inplace_op1(&InPlace {
            op,
            grads,
            group,
            parallel,
        })
    };
    if parallel {
        let groups: Vec<&[usize]> = groups.iter().collect();
        groups.into_par_iter().try_for_each(run_group)
    } else {
        groups.iter().try_for_each(run_group)
    }
}

/// The `InplaceOp1` that writes one storage: `op` on the union of the elements of the views
/// `grads[i]` for `i` in `group`, which all live in that storage.
struct InPlace<'a> {
    op: ElementwiseOp,
    grads: &'a [Tensor],
    group: &'a [usize],
    parallel: bool,
}

impl InplaceOp1 for InPlace<'_> {
    fn name(&self) -> &'static str {
        "candle-grad-clip-elementwise"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, _layout: &Layout) -> Result<()> {
        match storage {
            CpuStorage::F32(v) => self.apply(v),
            CpuStorage::F64(v) => self.apply(v),
            CpuStorage::F16(v) => self.apply(v),
            CpuStorage::BF16(v) => self.apply(v),
            _ => bail!("gradient clipping can only write F32, F64, F16 and BF16 storage"),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, _: &mut candle_core::CudaStorage, _: &Layout) -> Result<()> {
        bail!("internal error: the CPU in-place pass was called on CUDA storage")
    }
}

impl InPlace<'_> {
    fn apply<T: Element>(&self, data: &mut [T]) {
        let kernel = ElementKernel::<T>::new(self.op);
        if let [i] = self.group {
            let view = self.grads[*i].layout();
            if let Some((start, end)) = view.contiguous_offsets() {
                let xs = &mut data[start..end];
                if self.parallel && xs.len() > CHUNK {
                    xs.par_chunks_mut(CHUNK).for_each(|c| kernel.run(c));
                } else {
                    kernel.run(xs);
                }
                return;
            }
            if !view.has_internal_overlap() {
                for_each_run(view, |start, len| kernel.run(&mut data[start..start + len]));
                return;
            }
        }
        // Aliasing views, or a view that repeats elements: write the union of their runs once.
        let views = self.group.iter().map(|&i| self.grads[i].layout());
        for (s, e) in union_of_runs(views) {
            kernel.run(&mut data[s..e]);
        }
    }
}

/// [`ElementwiseOp`] with its constants converted once for element type `T`.
#[derive(Clone, Copy)]
pub(super) enum ElementKernel<T> {
    Scale(f64),
    Clamp { bound: f64, lo: T, hi: T },
}

impl<T: Element> ElementKernel<T> {
    pub(super) fn new(op: ElementwiseOp) -> Self {
        match op {
            ElementwiseOp::Scale(c) => ElementKernel::Scale(c),
            ElementwiseOp::Clamp(v) => {
                let hi = round_toward_zero::<T>(v);
                ElementKernel::Clamp {
                    bound: hi.to_f64(),
                    lo: T::from_f64(-hi.to_f64()),
                    hi,
                }
            }
        }
    }

    fn run(&self, xs: &mut [T]) {
        run_kernel(*self, xs)
    }
}

#[inline(always)]
fn run_kernel_generic<T: Element>(kernel: ElementKernel<T>, xs: &mut [T]) {
    match kernel {
        ElementKernel::Scale(c) => xs.iter_mut().for_each(|x| *x = scale(*x, c)),
        ElementKernel::Clamp { bound, lo, hi } => {
            xs.iter_mut().for_each(|x| *x = clamp(*x, bound, lo, hi))
        }
    }
}
