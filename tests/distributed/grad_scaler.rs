//! `GradScaler` across ranks (issue 21, part 3): with sharded gradients an inf on one rank used to
//! skip the step and back the scale off on that rank only, and the ranks' scales diverged. Now
//! found-inf is agreed over every rank (`unscale_across_`, `step_across`), and the scales, the
//! skipped steps and the vars are bitwise those of one process holding every gradient.

use candle_grad_clip::{ClipSetting, FusedAdamW, GradScaler};
use candle_nn::{Optimizer, ParamsAdamW};

use super::*;

const SIZES: [usize; 4] = [5, 7, 3, 11];
const STEPS: usize = 6;

/// The scaled gradient of var `i` at `step`: a spread of values, +inf in var 1 (rank 1's) at
/// step 2 and NaN in var 2 (rank 0's) at step 4.
fn scaled_grad(i: usize, step: usize) -> Vec<f32> {
    (0..SIZES[i])
        .map(|j| {
            if (i, step, j) == (1, 2, 3) {
                f32::INFINITY
            } else if (i, step, j) == (2, 4, 0) {
                f32::NAN
            } else {
                (((i * 7 + j * 3 + step * 5) % 11) as f32 - 5.0) * 3000.0
            }
        })
        .collect()
}

fn model() -> Vec<Var> {
    SIZES
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let init: Vec<f32> = (0..n).map(|j| (i + j) as f32 * 0.01).collect();
            Var::new(init.as_slice(), &Device::Cpu).expect("var")
        })
        .collect()
}

fn store(vars: &[Var], owned: impl Fn(usize) -> bool, step: usize) -> GradStore {
    let mut grads = GradStore::default();
    for (i, v) in vars.iter().enumerate().filter(|(i, _)| owned(*i)) {
        let g = Tensor::new(scaled_grad(i, step).as_slice(), &Device::Cpu).expect("grad");
        grads.insert(v, g);
    }
    grads
}

fn optimizer(vars: Vec<Var>) -> FusedAdamW {
    FusedAdamW::new(vars, ParamsAdamW::default())
        .expect("opt")
        .with_clip(ClipSetting::norm(1.0))
        .expect("clip")
}

/// The vars' values, the scale after each update and the skipped steps.
type Run = (Vec<Vec<f32>>, Vec<f64>, u64);

fn one_process() -> Run {
    let vars = model();
    let mut opt = optimizer(vars.clone());
    let mut scaler = GradScaler::new()
        .with_init_scale(1024.0)
        .with_growth_interval(2);
    let mut scales = Vec::new();
    for step in 0..STEPS {
        let grads = store(&vars, |_| true, step);
        scaler.step(&mut opt, &grads).expect("step");
        scaler.update().expect("update");
        scales.push(scaler.scale_value().expect("scale"));
    }
    let values = vars
        .iter()
        .map(|v| v.to_vec1::<f32>().expect("v"))
        .collect();
    (values, scales, opt.skipped_steps().expect("skipped"))
}

/// Each of two ranks steps the vars `i % 2 == rank` with `step_across` (or `unscale_across_`
/// first when `explicit_unscale`); every rank's vars (others' left at their start), scales, skips.
fn two_ranks(explicit_unscale: bool) -> Vec<Run> {
    on_ranks_within(2, HANG, move |g| {
        let rank = g.rank();
        let vars = model();
        let mine: Vec<Var> = vars
            .iter()
            .enumerate()
            .filter(|(i, _)| i % 2 == rank)
            .map(|(_, v)| v.clone())
            .collect();
        let mut opt = optimizer(mine.clone());
        let mut scaler = GradScaler::new()
            .with_init_scale(1024.0)
            .with_growth_interval(2);
        let mut scales = Vec::new();
        for step in 0..STEPS {
            let mut grads = store(&vars, |i| i % 2 == rank, step);
            if explicit_unscale {
                scaler
                    .unscale_across_(&mine, &mut grads, g)
                    .expect("unscale_across_");
            }
            scaler
                .step_across(&mut opt, &grads, g)
                .expect("step_across");
            scaler.update().expect("update");
            scales.push(scaler.scale_value().expect("scale"));
        }
        let values = vars
            .iter()
            .map(|v| v.to_vec1::<f32>().expect("v"))
            .collect();
        (values, scales, opt.skipped_steps().expect("skipped"))
    })
}

#[test]
fn sharded_grad_scaler_is_bitwise_one_process_over_the_union() {
    let (want_values, want_scales, want_skipped) = one_process();
    assert_eq!(
        want_skipped, 2,
        "the reference skips the steps with inf and NaN"
    );
    for explicit in [false, true] {
        let runs = two_ranks(explicit);
        for (rank, (values, scales, skipped)) in runs.iter().enumerate() {
            assert_eq!(
                scales, &want_scales,
                "explicit {explicit}: rank {rank}'s scales"
            );
            assert_eq!(
                *skipped, want_skipped,
                "explicit {explicit}: rank {rank}'s skips"
            );
            for i in (0..SIZES.len()).filter(|i| i % 2 == rank) {
                let (got, want): (Vec<u32>, Vec<u32>) = (
                    values[i].iter().map(|x| x.to_bits()).collect(),
                    want_values[i].iter().map(|x| x.to_bits()).collect(),
                );
                assert_eq!(got, want, "explicit {explicit}: rank {rank}, var {i}");
            }
        }
    }
}

/// Each rank's own `unscale_` (the unfixed way) lets the scales diverge: this is what
/// `unscale_across_` prevents.
#[test]
fn unscale_across_agrees_where_per_rank_unscale_diverges() {
    let scales = on_ranks_within(2, HANG, |g| {
        let run = |across: bool| -> f64 {
            let vars = model();
            let mine: Vec<Var> = vars.iter().skip(g.rank()).step_by(2).cloned().collect();
            let mut grads = store(&vars, |i| i % 2 == g.rank(), 2);
            let mut scaler = GradScaler::new();
            if across {
                scaler
                    .unscale_across_(&mine, &mut grads, g)
                    .expect("unscale");
            } else {
                scaler.unscale_(&mine, &mut grads).expect("unscale");
            }
            scaler.update().expect("update");
            scaler.scale_value().expect("scale")
        };
        (run(false), run(true))
    });
    assert_ne!(scales[0].0, scales[1].0, "per rank: rank 1 alone backs off");
    assert_eq!((scales[0].1, scales[1].1), (32768.0, 32768.0));
}

/// A rank whose gradient is refused (F16) fails every rank before anything is written: rank 0's
/// gradients stay scaled and its scaler is ready for `unscale_` again.
#[test]
fn a_refused_rank_fails_every_rank_and_nothing_is_unscaled() {
    let outcomes = on_ranks_within(2, HANG, |g| {
        let w = Var::zeros(2, DType::F32, &Device::Cpu).expect("var");
        let mut grads = GradStore::default();
        let grad = Tensor::new(&[4f32, 8.], &Device::Cpu).expect("grad");
        let grad = if g.rank() == 1 {
            grad.to_dtype(DType::F16).expect("f16")
        } else {
            grad
        };
        grads.insert(&w, grad);
        let mut scaler = GradScaler::new().with_init_scale(4.0);
        let err = scaler
            .unscale_across_(std::slice::from_ref(&w), &mut grads, g)
            .expect_err("every rank fails")
            .to_string();
        let after = grads
            .get(&w)
            .expect("grad")
            .to_dtype(DType::F32)
            .and_then(|t| t.to_vec1::<f32>())
            .expect("values");
        let ready = scaler
            .unscale_(std::slice::from_ref(&w), &mut grads)
            .is_ok()
            || g.rank() == 1;
        (err, after, ready)
    });
    for (rank, (err, after, ready)) in outcomes.iter().enumerate() {
        assert_eq!(after, &[4.0, 8.0], "rank {rank}'s gradient was modified");
        assert!(ready, "rank {rank}'s scaler was left unscaled");
        if rank == 0 {
            assert!(err.contains("rank 1 (gradients refused)"), "{err}");
        } else {
            assert!(err.contains("F16"), "{err}");
        }
    }
}

/// Ranks whose scales differ (a state loaded on one rank only) are refused.
#[test]
fn ranks_whose_scales_differ_are_refused() {
    let outcomes = on_ranks_within(2, HANG, |g| {
        let (w, mut grads) = one_var(&[1.0, 2.0]).expect("grads");
        let mut scaler = GradScaler::new().with_init_scale(if g.rank() == 0 { 8.0 } else { 16.0 });
        scaler
            .unscale_across_(&[w], &mut grads, g)
            .map_err(|e| e.to_string())
    });
    for (rank, r) in outcomes.iter().enumerate() {
        let message = r.as_ref().expect_err("refused");
        assert!(
            message.contains("GradScaler scale"),
            "rank {rank}: {message}"
        );
    }
}
