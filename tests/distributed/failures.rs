//! Failures across ranks: a refusing rank fails every rank (and every clipped step across) and
//! nothing is modified; a panicking rank fails the others instead of hanging; mismatched calls and
//! transport errors are errors that name the rank and the collective.

use super::*;
use candle_grad_clip::ClipGradNorm;

#[test]
fn a_refusing_rank_fails_every_rank_and_nothing_is_modified() {
    let results = on_ranks(3, |g| -> (String, Vec<f32>) {
        let w = Var::zeros(4, DType::F32, &Device::Cpu).expect("var");
        let grad = if g.rank() == 1 {
            // A broadcast view: cannot be written in place, refused before any communication.
            Tensor::new(&[50f32], &Device::Cpu)
                .and_then(|t| t.broadcast_as(4))
                .expect("broadcast")
        } else {
            Tensor::new(&[50f32; 4], &Device::Cpu).expect("tensor")
        };
        let mut grads = GradStore::default();
        grads.insert(&w, grad);
        let err = clip_grad_norm_across_(std::slice::from_ref(&w), &mut grads, 1.0, g)
            .expect_err("every rank fails");
        let after = grads
            .get(&w)
            .expect("grad")
            .to_vec1::<f32>()
            .expect("values");
        (err.to_string(), after)
    });
    for (rank, (message, after)) in results.iter().enumerate() {
        assert_eq!(after, &[50f32; 4], "rank {rank} was modified");
        if rank == 1 {
            assert!(message.contains("broadcast"), "rank 1: {message}");
        } else {
            assert!(
                message.contains(&format!("rank {rank}"))
                    && message.contains("1 of 3 ranks refused")
                    && message.contains("all_reduce_sum_u64"),
                "rank {rank}: {message}"
            );
        }
    }
}

/// `Clipped::step_across` with `skip_nonfinite` (whose first collective is the max |g|) and each
/// clip setting: a rank whose gradient is refused (a broadcast view, which cannot be written)
/// joins that same collective, so every rank fails with "refused" (not a mismatch), and no rank
/// changes its var, its gradient or its counts.
#[test]
fn a_refusing_rank_fails_every_clipped_step_across() {
    use candle_grad_clip::{AutoClip, ClipSetting, Clipped, ZClip};
    use candle_nn::{Optimizer, SGD};
    for skip in [true, false] {
        for clip in [
            ClipSetting::norm(1.0),
            ClipSetting::value(0.5),
            ClipSetting::AutoClip(AutoClip::default()),
            ClipSetting::ZClip(ZClip::new()),
            ClipSetting::agc(0.01),
        ] {
            let what = format!("skip {skip} {clip:?}");
            let results = on_ranks(2, |g| -> (String, Vec<f32>, Vec<f32>, u64) {
                let w = Var::zeros(4, DType::F32, &Device::Cpu).expect("var");
                let grad = if g.rank() == 1 {
                    Tensor::new(&[50f32], &Device::Cpu)
                        .and_then(|t| t.broadcast_as(4))
                        .expect("broadcast")
                } else {
                    Tensor::new(&[50f32; 4], &Device::Cpu).expect("tensor")
                };
                let mut grads = GradStore::default();
                grads.insert(&w, grad);
                let mut opt = Clipped::from_optimizer(
                    SGD::new(vec![w.clone()], 0.1).expect("sgd"),
                    vec![w.clone()],
                    clip.clone(),
                )
                .expect("clipped")
                .with_skip_nonfinite(skip);
                let err = opt.step_across(&grads, g).expect_err("every rank fails");
                let after = grads
                    .get(&w)
                    .expect("grad")
                    .to_vec1::<f32>()
                    .expect("values");
                let var = w.to_vec1::<f32>().expect("var");
                (
                    err.to_string(),
                    after,
                    var,
                    opt.steps().expect("steps") + opt.skipped_steps().expect("skipped"),
                )
            });
            for (rank, (message, after, var, counted)) in results.iter().enumerate() {
                assert_eq!(
                    after, &[50f32; 4],
                    "{what}: rank {rank}'s gradient was modified"
                );
                assert_eq!(var, &[0f32; 4], "{what}: rank {rank}'s var was modified");
                assert_eq!(*counted, 0, "{what}: rank {rank} counted a step");
                if rank == 0 {
                    assert!(message.contains("of 2 ranks refused"), "{what}: {message}");
                }
            }
        }
    }
}

/// A rank whose thread panics (a failing assertion in a test) breaks its `LocalGroup`: the other
/// ranks' collectives fail, naming it, instead of waiting for it forever.
#[test]
fn a_panicking_rank_fails_the_others_instead_of_hanging() {
    use candle_grad_clip::ProcessGroup;
    let ranks = LocalGroup::new(3).expect("group");
    let results: Vec<std::thread::Result<candle_core::Result<()>>> = std::thread::scope(|s| {
        let handles: Vec<_> = ranks
            .into_iter()
            .map(|g| {
                s.spawn(move || -> candle_core::Result<()> {
                    if g.rank() == 2 {
                        panic!("rank 2 fails its assertion");
                    }
                    let mut words = [1u64];
                    g.all_reduce_sum_u64(&mut words)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join()).collect()
    });
    assert!(results[2].is_err(), "rank 2 panicked");
    for r in &results[..2] {
        let message = r
            .as_ref()
            .expect("no panic")
            .as_ref()
            .expect_err("the collective fails")
            .to_string();
        assert!(message.contains("rank 2 panicked"), "{message}");
    }
}

#[test]
fn mismatched_calls_are_errors_that_name_ranks_and_collectives() {
    // Rank 0 asks for the Inf norm (max collective), rank 1 for L2 (sum): both fail, no hang.
    let results = on_ranks(2, |g| {
        let (w, grads) = one_var(&[1.0, 2.0]).expect("grads");
        let norm_type = if g.rank() == 0 {
            NormType::Inf
        } else {
            NormType::L2
        };
        total_norm_across(&[w], &grads, norm_type, g).map(|_| ())
    });
    for (rank, r) in results.into_iter().enumerate() {
        let message = r.expect_err("a mismatch").to_string();
        assert!(
            message.contains(&format!("rank {rank}"))
                && message.contains("all_reduce_max_u64")
                && message.contains("all_reduce_sum_u64"),
            "rank {rank}: {message}"
        );
    }
}

/// A group whose transport always fails, or that reports an impossible size.
struct Broken {
    world: usize,
}

impl ProcessGroup for Broken {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn all_reduce_sum_u64(&self, _: &mut [u64]) -> Result<()> {
        candle_core::bail!("link down")
    }
    fn all_reduce_max_u64(&self, _: &mut [u64]) -> Result<()> {
        candle_core::bail!("link down")
    }
}

#[test]
fn transport_errors_name_the_rank_and_the_collective_and_modify_nothing() -> Result<()> {
    let (w, mut grads) = one_var(&[30.0, 40.0])?;
    let vars = [w.clone()];
    let broken = Broken { world: 2 };
    let message = common::err_msg(
        clip_grad_norm_across_(&vars, &mut grads, 1.0, &broken),
        "broken transport",
    );
    assert!(
        message.contains("rank 0 of 2")
            && message.contains("all_reduce_sum_u64")
            && message.contains("link down"),
        "{message}"
    );
    let message = common::err_msg(
        total_norm_across(&vars, &grads, NormType::Inf, &broken),
        "broken transport, Inf",
    );
    assert!(message.contains("all_reduce_max_u64"), "{message}");
    assert_eq!(grads.get(&w).expect("grad").to_vec1::<f32>()?, [30.0, 40.0]);
    // No rank at all: refused before any collective.
    let message = common::err_msg(
        total_norm_across(&vars, &grads, NormType::L2, &Broken { world: 0 }),
        "empty group",
    );
    assert!(message.contains("0 ranks"), "{message}");
    // Bad settings are refused before any collective too.
    assert!(ClipGradNorm::new(-1.0)
        .clip_across_(&vars, &mut grads, &Broken { world: 2 })
        .is_err_and(|e| !e.to_string().contains("link down")));
    Ok(())
}
