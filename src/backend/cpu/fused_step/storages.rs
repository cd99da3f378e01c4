//! Several storages written at once: candle's `inplace_op1`, nested, one write lock per storage.

use std::cell::RefCell;

use candle_core::{bail, CpuStorage, InplaceOp1, Layout, Result, Tensor};

/// What runs with the storages of several tensors.
pub(super) type StoragesFn<'f> = dyn FnMut(&mut [&mut CpuStorage]) -> Result<()> + 'f;

/// Runs `f` with the storages of `tensors` (distinct storages, each write-locked once) mutably,
/// in order: candle's `inplace_op1`, nested.
pub(super) fn with_storages_mut(tensors: &[&Tensor], f: &mut StoragesFn<'_>) -> Result<()> {
    nest(tensors, Vec::new(), f)
}

fn nest(rest: &[&Tensor], mut taken: Vec<&mut CpuStorage>, f: &mut StoragesFn<'_>) -> Result<()> {
    match rest.split_first() {
        None => f(&mut taken),
        Some((first, rest)) => first.inplace_op1(&Level {
            rest,
            taken: RefCell::new(Some(taken)),
            f: RefCell::new(f),
        }),
    }
}

/// One level of [`with_storages_mut`]: holds the storages taken so far while candle hands it the
/// next one.
struct Level<'r, 's, 'f> {
    rest: &'r [&'r Tensor],
    taken: RefCell<Option<Vec<&'s mut CpuStorage>>>,
    f: RefCell<&'f mut StoragesFn<'f>>,
}

impl InplaceOp1 for Level<'_, '_, '_> {
    fn name(&self) -> &'static str {
        "candle-grad-clip-fused-step"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, _: &Layout) -> Result<()> {
        let Some(taken) = self.taken.borrow_mut().take() else {
            bail!("internal error: a storage level was entered twice")
        };
        let mut taken: Vec<&mut CpuStorage> = taken;
        taken.push(storage);
        let mut f = self.f.borrow_mut();
        nest(self.rest, taken, &mut **f)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, _: &mut candle_core::CudaStorage, _: &Layout) -> Result<()> {
        bail!("internal error: the CPU step was called on CUDA storage")
    }
}
