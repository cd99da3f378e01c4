//! The norm across ranks, with threads as ranks (`LocalGroup`): bitwise the one-process norm and
//! clipped gradients for 1 to 4 ranks, every dtype and norm, several splits (see `dist_cases`),
//! also with the scale pass in the emulated kernels; an independent f64 reference; errors that
//! name the rank and the collective; a refusing rank fails every rank and nothing is modified.
//!
//! By concern: [`across_ranks`] (the results, bitwise the one-process ones), [`failures`]
//! (refusals, panics, mismatched calls, transport errors), [`fail_together`] (a rank refused or
//! failing anywhere before or between collectives fails every rank; a failure past the collective
//! fails every rank at the next step), [`agreement`] (ranks whose settings differ are refused;
//! skips decided over every rank), [`local_group`] (a handle is a rank; timeouts; a dropped
//! handle) and [`grad_scaler`] (found-inf agreed over the ranks). Here the helpers they share,
//! and the cases ([`dist_cases`]) that the MPI driver (`tests/mpi_driver`) runs too.
//!
//! A test of a case that used to hang runs its ranks through [`on_ranks_within`]: a rank still
//! running after the limit fails the test instead of hanging the suite.

#[path = "../common/mod.rs"]
mod common;
mod dist_cases;

mod across_ranks;
mod agreement;
mod fail_together;
mod failures;
mod grad_scaler;
mod local_group;

use candle_core::{backprop::GradStore, DType, Device, Result, Tensor, Var};
use candle_grad_clip::{
    clip_grad_norm_across_, total_norm_across, BlockOrder, ClipGradNorm, KernelEmulation,
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

/// How long a test waits for ranks that should all return quickly.
const HANG: std::time::Duration = std::time::Duration::from_secs(20);

/// Runs `f` on every rank of a `LocalGroup` of `world` threads and waits at most `limit` for all
/// of them; the results in rank order. A rank still running then fails the test, naming it (its
/// thread is left blocked and the suite goes on), instead of hanging the suite; a rank that
/// panics fails the test too.
fn on_ranks_within<T: Send + 'static>(
    world: usize,
    limit: std::time::Duration,
    f: impl Fn(&LocalGroup) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let f = std::sync::Arc::new(f);
    let (tx, rx) = std::sync::mpsc::channel();
    for g in LocalGroup::new(world).expect("a group") {
        let (f, tx) = (f.clone(), tx.clone());
        std::thread::spawn(move || {
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&g)));
            let _ = tx.send((g.rank(), result));
        });
    }
    drop(tx);
    let deadline = std::time::Instant::now() + limit;
    let mut results: Vec<Option<T>> = (0..world).map(|_| None).collect();
    for _ in 0..world {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok((rank, Ok(value))) => results[rank] = Some(value),
            Ok((rank, Err(panic))) => {
                let message = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                panic!("rank {rank} panicked: {message}")
            }
            Err(_) => {
                let hung: Vec<usize> = (0..world).filter(|&r| results[r].is_none()).collect();
                panic!("ranks {hung:?} still running after {limit:?}: they hang")
            }
        }
    }
    results
        .into_iter()
        .map(|r| r.expect("every rank answered"))
        .collect()
}

fn one_var(values: &[f32]) -> Result<(Var, GradStore)> {
    let w = Var::zeros(values.len(), DType::F32, &Device::Cpu)?;
    let mut grads = GradStore::default();
    grads.insert(&w, Tensor::new(values, &Device::Cpu)?);
    Ok((w, grads))
}
