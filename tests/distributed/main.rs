//! The norm across ranks, with threads as ranks (`LocalGroup`): bitwise the one-process norm and
//! clipped gradients for 1 to 4 ranks, every dtype and norm, several splits (see `dist_cases`),
//! also with the scale pass in the emulated kernels; an independent f64 reference; errors that
//! name the rank and the collective; a refusing rank fails every rank and nothing is modified.
//!
//! By concern: [`across_ranks`] (the results, bitwise the one-process ones) and [`failures`]
//! (refusals, panics, mismatched calls, transport errors). Here the helpers they share, and the
//! cases ([`dist_cases`]) that the MPI driver (`tests/mpi_driver`) runs too.

#[path = "../common/mod.rs"]
mod common;
mod dist_cases;

mod across_ranks;
mod failures;

use candle_core::{backprop::GradStore, DType, Device, Result, Tensor, Var};
use candle_grad_clip::{
    clip_grad_norm_across, total_norm_across, BlockOrder, ClipGradNorm, KernelEmulation,
    LocalGroup, NormType, ProcessGroup,
};
use rand::{rngs::StdRng, SeedableRng};

/// Runs `f` on every rank of a `LocalGroup` of `world` threads; the results in rank order.
fn on_ranks<T: Send>(world: usize, f: impl Fn(&LocalGroup) -> T + Sync) -> Vec<T> {
    let ranks = LocalGroup::new(world).expect("a group");
    std::thread::scope(|s| {
        let f = &f;
        // Each rank owns its handle: a rank that panics drops it as it unwinds, which fails the
        // others' collectives instead of leaving them waiting (`LocalGroup`'s Drop).
        let handles: Vec<_> = ranks.into_iter().map(|g| s.spawn(move || f(&g))).collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a rank panicked"))
            .collect()
    })
}

fn one_var(values: &[f32]) -> Result<(Var, GradStore)> {
    let w = Var::zeros(values.len(), DType::F32, &Device::Cpu)?;
    let mut grads = GradStore::default();
    grads.insert(&w, Tensor::new(values, &Device::Cpu)?);
    Ok((w, grads))
}
