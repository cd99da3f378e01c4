//! The norm across ranks, with threads as ranks (`LocalGroup`): bitwise the one-process norm and
//! clipped gradients for 1 to 4 ranks, every dtype and norm, several splits (see
//! `dist_cases`); errors that name the rank and the collective; a failing rank fails them all.

mod dist_cases;

use candle_core::{backprop::GradStore, DType, Device, Result, Tensor, Var};
use candle_grad_clip::{
    clip_grad_norm_across, total_norm_across, ClipGradNorm, LocalGroup, NormType, ProcessGroup,
};

/// Runs `f` on every rank of a `LocalGroup` of `world` threads; the results in rank order.
fn on_ranks<T: Send>(world: usize, f: impl Fn(&LocalGroup) -> T + Sync) -> Vec<T> {
    let ranks = LocalGroup::new(world).expect("a group");
    std::thread::scope(|s| {
        let f = &f;
        let handles: Vec<_> = ranks.iter().map(|g| s.spawn(move || f(g))).collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a rank panicked"))
            .collect()
    })
}

#[test]
fn every_rank_gets_the_one_process_bits_for_every_split_dtype_and_norm() {
    let cases = dist_cases::all_cases();
    for world in 1..=4 {
        let counts = on_ranks(world, |g| dist_cases::run_cases(g, &cases));
        assert!(counts.iter().all(|&c| c == cases.len()));
    }
}
