//! The norm across ranks, with threads as ranks (`LocalGroup`): bitwise the one-process norm and
//! clipped gradients for 1 to 4 ranks, every dtype and norm, several splits (see `dist_cases`),
//! also with the scale pass in the emulated kernels; an independent f64 reference; errors that
//! name the rank and the collective; a refusing rank fails every rank and nothing is modified.

mod common;
mod dist_cases;

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

#[test]
fn every_rank_gets_the_one_process_bits_for_every_split_dtype_and_norm() {
    let cases = dist_cases::all_cases();
    for world in 1..=4 {
        let counts = on_ranks(world, |g| dist_cases::run_cases(g, &cases));
        assert!(counts.iter().all(|&c| c == cases.len()));
    }
}

#[test]
fn under_the_emulation_every_rank_gets_the_one_process_kernel_bits() {
    // Every case whose sums of powers stay in the f64 range (normal values, and infinities or
    // NaNs among them), against the one-process call under the same emulation: the first sum is
    // made of the kernels' own chunk partials, and the scale pass runs in the kernels; several
    // grids and block orders.
    let cases: Vec<_> = dist_cases::all_cases()
        .into_iter()
        .filter(|c| {
            matches!(
                c.3,
                dist_cases::Values::Normal | dist_cases::Values::Specials
            )
        })
        .collect();
    for (world, grid, order) in [
        (1, 3, BlockOrder::InOrder),
        (2, 1, BlockOrder::InOrder),
        (3, 7, BlockOrder::Shuffled),
        (4, 64, BlockOrder::Reversed),
    ] {
        let within = move |f: &mut dyn FnMut() -> Result<()>| -> Result<()> {
            KernelEmulation::new()
                .grid(grid)
                .block_order(order)
                .run(f)
                .map(|(r, _)| r)
        };
        let counts = on_ranks(world, |g| dist_cases::run_cases_within(g, &cases, &within));
        assert!(counts.iter().all(|&c| c == cases.len()));
    }
}

#[test]
fn under_the_emulation_the_rescue_pass_agrees_across_ranks() {
    // Huge and tiny values, where the rescue pass (on the CPU, divided by the global max) may
    // run: every rank returns the same bits, close to the one-process CPU norm.
    for dtype in dist_cases::DTYPES {
        for norm_type in [NormType::L2, NormType::P(7.0)] {
            for kind in [dist_cases::Values::Huge, dist_cases::Values::Tiny] {
                let model = dist_cases::model(3, dtype, kind).expect("model");
                let mut all = GradStore::default();
                for (v, g) in model.vars.iter().zip(&model.grads) {
                    all.insert(v, g.clone());
                }
                let want = candle_grad_clip::total_norm(&model.vars, &all, norm_type)
                    .and_then(|n| n.to_dtype(DType::F64)?.to_scalar::<f64>())
                    .expect("one-process norm");
                let got = on_ranks(3, |g| -> Result<u64> {
                    let mine: Vec<Var> = model
                        .vars
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| i % 3 == g.rank())
                        .map(|(_, v)| v.clone())
                        .collect();
                    let (norm, _) = KernelEmulation::new()
                        .run(|| total_norm_across(&mine, &all, norm_type, g))?;
                    Ok(norm.to_dtype(DType::F64)?.to_scalar::<f64>()?.to_bits())
                });
                let got: Vec<u64> = got.into_iter().map(|r| r.expect("a norm")).collect();
                let what = format!("{dtype:?} {norm_type:?} {kind:?}");
                assert!(got.iter().all(|&b| b == got[0]), "{what}: ranks disagree");
                let got = f64::from_bits(got[0]);
                // (An F32 norm above f32::MAX is inf on both sides.)
                assert!(
                    got == want || (got - want).abs() <= want * 1e-6,
                    "{what}: {got:e}, one process {want:e}"
                );
            }
        }
    }
}

#[test]
fn norms_match_an_independent_f64_reference() {
    // F64 values over 3 ranks against common::ref_norm (double-double sums of the values that
    // candle reads back), for L1, L2, p = 3 and Inf.
    let mut rng = StdRng::seed_from_u64(11);
    let shards: Vec<Vec<f64>> = (0..3)
        .map(|r| common::signed_values(&mut rng, 1000 + 777 * r, 10f64.powi(r as i32 - 1)))
        .collect();
    let all: Vec<f64> = shards.concat();
    for (norm_type, p) in [
        (NormType::L1, 1.0),
        (NormType::L2, 2.0),
        (NormType::P(3.0), 3.0),
        (NormType::Inf, f64::INFINITY),
    ] {
        let want = common::ref_norm(&all, p);
        let got = on_ranks(3, |g| -> Result<f64> {
            let values = &shards[g.rank()];
            let w = Var::zeros(values.len(), DType::F64, &Device::Cpu)?;
            let mut grads = GradStore::default();
            grads.insert(&w, Tensor::new(values.as_slice(), &Device::Cpu)?);
            total_norm_across(&[w], &grads, norm_type, g)?.to_scalar::<f64>()
        });
        for (rank, got) in got.into_iter().enumerate() {
            let got = got.expect("a norm");
            assert!(
                (got - want).abs() <= want * 4e-16,
                "{norm_type:?} rank {rank}: {got:e}, reference {want:e}"
            );
        }
    }
}

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
        let err = clip_grad_norm_across(std::slice::from_ref(&w), &mut grads, 1.0, g)
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
            let results = on_ranks(2, |g| -> (String, Vec<f32>, Vec<f32>, usize) {
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
                .skip_nonfinite(skip);
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
                    opt.steps() + opt.skipped_steps(),
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
        clip_grad_norm_across(&vars, &mut grads, 1.0, &broken),
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

#[test]
fn empty_ranks_get_the_norm_with_the_global_dtype() {
    // Only rank 2 holds gradients, all F64: every rank returns an F64 norm (rank 0 and 1 on
    // the group's device, the CPU), and error_if_nonfinite fails every rank alike.
    let results = on_ranks(3, |g| -> Result<(DType, f64)> {
        let mut grads = GradStore::default();
        let mut vars = Vec::new();
        if g.rank() == 2 {
            let w = Var::zeros(2, DType::F64, &Device::Cpu)?;
            grads.insert(&w, Tensor::new(&[6f64, 8.], &Device::Cpu)?);
            vars.push(w);
        }
        let norm = clip_grad_norm_across(&vars, &mut grads, 1.0, g)?;
        Ok((norm.dtype(), norm.to_scalar::<f64>()?))
    });
    for r in results {
        assert_eq!(r.expect("a norm"), (DType::F64, 10.0));
    }
    let results = on_ranks(2, |g| {
        let (w, mut grads) = one_var(&[if g.rank() == 0 { f32::INFINITY } else { 1.0 }])?;
        ClipGradNorm::new(1.0)
            .error_if_nonfinite(true)
            .clip_across_(std::slice::from_ref(&w), &mut grads, g)?;
        grads.get(&w).expect("grad").to_vec1::<f32>()
    });
    for r in results {
        assert!(r.is_err_and(|e| e.to_string().contains("non-finite")));
    }
}

#[test]
fn optimizers_step_across_like_the_one_process_step() {
    // Clipped<SGD> (norm, p = 3, value, AutoClip) and FusedAdamW (norm, Inf, AutoClip,
    // skip_nonfinite with and without a clip, a NaN on one rank): three steps on 2 and 3 ranks,
    // every var and every last norm bitwise the one-process run's (see dist_cases).
    for world in [2, 3] {
        let counts = on_ranks(world, |g| dist_cases::check_optimizers(g));
        assert!(counts.iter().all(|&c| c == counts[0] && c > 0));
    }
}
