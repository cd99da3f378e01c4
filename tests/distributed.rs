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
        let handles: Vec<_> = ranks.iter().map(|g| s.spawn(move || f(g))).collect();
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
fn emulated_kernels_scale_to_the_one_process_bits() {
    // Every other case (all dtypes, norms, splits), with the scale pass run by the emulated
    // kernels under several grids and block orders.
    let cases: Vec<_> = dist_cases::all_cases().into_iter().step_by(2).collect();
    for (world, grid, order) in [
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

/// Gradients of step `step` for var `i` (shape `[7 * i + 3]`), F32; `nan_at` poisons one var.
fn step_grads(vars: &[(usize, Var)], step: usize, nan_at: Option<usize>) -> Result<GradStore> {
    let mut grads = GradStore::default();
    for (i, var) in vars {
        let n = var.elem_count();
        let values: Vec<f32> = (0..n)
            .map(|k| {
                if nan_at == Some(*i) && k == 0 {
                    f32::NAN
                } else {
                    (((k * 31 + i * 17 + step * 7) as f32) * 0.61).sin() * (1.0 + *i as f32)
                }
            })
            .collect();
        grads.insert(var, Tensor::from_vec(values, n, &Device::Cpu)?);
    }
    Ok(grads)
}

const VARS: usize = 7;

/// The vars `i` with `i % world == rank` (all of them for `world = 1`), with fixed start values.
fn owned_vars(rank: usize, world: usize) -> Result<Vec<(usize, Var)>> {
    (0..VARS)
        .filter(|i| i % world == rank)
        .map(|i| {
            let n = 7 * i + 3;
            let start: Vec<f32> = (0..n).map(|k| (k as f32 * 0.1).cos()).collect();
            Ok((
                i,
                Var::from_tensor(&Tensor::from_vec(start, n, &Device::Cpu)?)?,
            ))
        })
        .collect()
}

/// What an optimizer run leaves: each var's bits by index, and the last norm's bits per step.
type Run = (Vec<(usize, Vec<u64>)>, Vec<Option<u64>>);

/// Three steps of an optimizer over this rank's vars (`group = None`: one process, all vars).
fn run_steps(
    rank: usize,
    world: usize,
    nan_step: Option<usize>,
    mut step: impl FnMut(&[Var], &GradStore) -> Result<Option<Tensor>>,
) -> Result<Run> {
    let vars = owned_vars(rank, world)?;
    let plain: Vec<Var> = vars.iter().map(|(_, v)| v.clone()).collect();
    let mut norms = Vec::new();
    for s in 0..3 {
        let grads = step_grads(&vars, s, (nan_step == Some(s)).then_some(5))?;
        let norm = step(&plain, &grads)?;
        norms.push(match norm {
            Some(n) => Some(dist_cases::bits(&n)?[0]),
            None => None,
        });
    }
    let params = vars
        .iter()
        .map(|(i, v)| Ok((*i, dist_cases::bits(v.as_tensor())?)))
        .collect::<Result<_>>()?;
    Ok((params, norms))
}

/// Runs `make_and_step` in one process and over 2 and 3 thread ranks; every rank's vars and
/// norms must be the one-process run's, bitwise.
fn assert_optimizer_matches_one_process(
    what: &str,
    nan_step: Option<usize>,
    run: impl Fn(Option<&LocalGroup>, usize, usize, Option<usize>) -> Result<Run> + Sync,
) {
    let (want_params, want_norms) = run(None, 0, 1, nan_step).expect("one process");
    for world in [2, 3] {
        let results = on_ranks(world, |g| run(Some(g), g.rank(), world, nan_step));
        for (rank, r) in results.into_iter().enumerate() {
            let (params, norms) =
                r.unwrap_or_else(|e| panic!("{what}, rank {rank} of {world}: {e}"));
            assert_eq!(norms, want_norms, "{what}: norms of rank {rank} of {world}");
            for (i, bits) in params {
                let want = &want_params.iter().find(|(j, _)| *j == i).expect("var").1;
                assert_eq!(&bits, want, "{what}: var {i} on rank {rank} of {world}");
            }
        }
    }
}

#[test]
fn clipped_step_across_matches_the_one_process_step() {
    use candle_grad_clip::{AutoClip, ClipSetting, Clipped};
    use candle_nn::{Optimizer, SGD};
    for clip in [
        ClipSetting::norm(1.0),
        ClipSetting::Norm {
            max_norm: 2.0,
            norm_type: NormType::P(3.0),
        },
        ClipSetting::value(0.5),
        ClipSetting::AutoClip(AutoClip::new(50.0).expect("autoclip")),
    ] {
        let what = format!("Clipped<SGD> {clip:?}");
        assert_optimizer_matches_one_process(&what, None, |group, rank, world, nan_step| {
            let mut opt: Option<Clipped<SGD>> = None;
            run_steps(rank, world, nan_step, |vars, grads| {
                let opt = match &mut opt {
                    Some(o) => o,
                    None => opt.insert(Clipped::from_optimizer(
                        SGD::new(vars.to_vec(), 0.1)?,
                        vars.to_vec(),
                        clip.clone(),
                    )?),
                };
                match group {
                    Some(g) => opt.step_across(grads, g)?,
                    None => opt.step(grads)?,
                }
                Ok(opt.last_norm().cloned())
            })
        });
    }
}

#[test]
fn fused_step_across_matches_the_one_process_step() {
    use candle_grad_clip::{AutoClip, ClipSetting, FusedAdamW};
    use candle_nn::{Optimizer, ParamsAdamW};
    for (clip, skip, nan_step) in [
        (Some(ClipSetting::norm(1.0)), false, None),
        (
            Some(ClipSetting::Norm {
                max_norm: 0.5,
                norm_type: NormType::Inf,
            }),
            false,
            None,
        ),
        (
            Some(ClipSetting::AutoClip(
                AutoClip::new(30.0).expect("autoclip"),
            )),
            false,
            None,
        ),
        // A NaN on one rank at step 1: every rank skips that step.
        (None, true, Some(1)),
        (Some(ClipSetting::norm(1.0)), true, Some(1)),
    ] {
        let what = format!("FusedAdamW {clip:?} skip_nonfinite {skip}");
        assert_optimizer_matches_one_process(&what, nan_step, |group, rank, world, nan_step| {
            let mut opt: Option<FusedAdamW> = None;
            let run = run_steps(rank, world, nan_step, |vars, grads| {
                let opt = match &mut opt {
                    Some(o) => o,
                    None => {
                        let mut o = FusedAdamW::new(vars.to_vec(), ParamsAdamW::default())?
                            .skip_nonfinite(skip);
                        if let Some(c) = &clip {
                            o = o.with_clip(c.clone())?;
                        }
                        opt.insert(o)
                    }
                };
                match group {
                    Some(g) => opt.step_across(grads, g)?,
                    None => opt.step(grads)?,
                }
                Ok(opt.last_norm().cloned())
            })?;
            let opt = opt.expect("stepped");
            let skipped = opt.skipped_steps()?;
            if nan_step.is_some() && skip && skipped != 1 {
                candle_core::bail!("{skipped} skipped steps, expected 1")
            }
            Ok(run)
        });
    }
}
