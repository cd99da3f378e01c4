//! Ranks agree or are refused (issue 21, part 3): settings that must be equal on every rank
//! travel as a fingerprint in the collective, and ranks that differ all fail, naming the rank and
//! the setting; the skip of a non-finite step is decided over every rank for every clip kind.
//! Before the fix, the first cases returned `Ok` on both ranks with different "global" norms,
//! and AGC skipped on one rank only.

use candle_grad_clip::{ClipSetting, Clipped, FusedAdamW, FusedSgd, ParamsSgd};
use candle_nn::{Optimizer, ParamsAdamW, SGD};

use super::*;

/// `ClipGradNorm::clip_across_` on two ranks, rank `r` clipping with `clips[r]`: each rank's
/// error message (or `Ok`) and its gradient afterwards.
fn clip_with(clips: [ClipGradNorm; 2]) -> Vec<(std::result::Result<f32, String>, Vec<f32>)> {
    on_ranks_within(2, HANG, move |g| {
        let (w, mut grads) = one_var(&[30.0, 40.0]).expect("grads");
        let result = clips[g.rank()]
            .clip_across_(std::slice::from_ref(&w), &mut grads, g)
            .and_then(|n| n.to_scalar::<f32>())
            .map_err(|e| e.to_string());
        let after = grads
            .get(&w)
            .expect("grad")
            .to_vec1::<f32>()
            .expect("values");
        (result, after)
    })
}

fn assert_refused(
    outcomes: &[(std::result::Result<f32, String>, Vec<f32>)],
    field: &str,
    rank1_says: &str,
) {
    for (rank, (result, after)) in outcomes.iter().enumerate() {
        let message = result.as_ref().expect_err("ranks that differ are refused");
        assert_eq!(after, &[30.0, 40.0], "rank {rank}'s gradient was modified");
        assert!(
            message.contains("settings differ") && message.contains(field),
            "rank {rank}: {message}"
        );
        if rank == 1 {
            assert!(message.contains(rank1_says), "rank 1: {message}");
        } else {
            assert!(message.contains("rank 1's"), "rank 0: {message}");
        }
    }
}

/// Issue 21 (3): rank 0 clips with L2 and rank 1 with L1.
#[test]
fn ranks_clipping_with_different_norm_types_are_refused() {
    let outcomes = clip_with([
        ClipGradNorm::new(1.0),
        ClipGradNorm::new(1.0).with_norm_type(NormType::L1),
    ]);
    assert_refused(
        &outcomes,
        "norm type",
        "this rank's norm type is L1 but rank 0's is L2",
    );
}

/// Issue 21 (3): `max_norm` 1 on rank 0 and 2 on rank 1.
#[test]
fn ranks_clipping_with_different_max_norms_are_refused() {
    let outcomes = clip_with([ClipGradNorm::new(1.0), ClipGradNorm::new(2.0)]);
    assert_refused(
        &outcomes,
        "max_norm",
        "this rank's max_norm is 2 but rank 0's is 1",
    );
}

#[test]
fn ranks_with_different_eps_or_error_if_nonfinite_are_refused() {
    let outcomes = clip_with([ClipGradNorm::new(1.0), ClipGradNorm::new(1.0).with_eps(0.0)]);
    assert_refused(&outcomes, "eps", "this rank's eps is 0");
    let outcomes = clip_with([
        ClipGradNorm::new(1.0),
        ClipGradNorm::new(1.0).with_error_if_nonfinite(true),
    ]);
    assert_refused(
        &outcomes,
        "error_if_nonfinite",
        "is true but rank 0's is false",
    );
}

/// Equal settings still give the one-process result (the fingerprint changes nothing then).
#[test]
fn ranks_that_agree_clip_as_one_process() {
    let outcomes = clip_with([ClipGradNorm::new(1.0), ClipGradNorm::new(1.0)]);
    let (w, mut grads) = one_var(&[30.0, 40.0]).expect("grads");
    let (v, _) = one_var(&[30.0, 40.0]).expect("grads");
    grads.insert(&v, Tensor::new(&[30f32, 40.], &Device::Cpu).expect("grad"));
    let norm = ClipGradNorm::new(1.0)
        .clip_(&[w.clone(), v], &mut grads)
        .and_then(|n| n.to_scalar::<f32>())
        .expect("one process");
    let clipped = grads
        .get(&w)
        .expect("grad")
        .to_vec1::<f32>()
        .expect("values");
    for (result, after) in outcomes {
        assert_eq!(result.expect("agree"), norm);
        assert_eq!(after, clipped);
    }
}

/// Fused steps across two ranks, rank `r` built by `make(r, var)`, with rank 1's gradient `bad`
/// and rank 0's `[3, 4]`: each rank's result, var, steps and skipped steps.
#[allow(clippy::type_complexity)]
fn fused_with<O: Optimizer + Send + 'static>(
    bad: [f32; 2],
    make: impl Fn(usize, Var) -> O + Send + Sync + 'static,
    step: impl Fn(&mut O, &GradStore, &LocalGroup) -> Result<()> + Send + Sync + 'static,
    counts: impl Fn(&O) -> (u64, u64) + Send + Sync + 'static,
) -> Vec<(std::result::Result<(), String>, Vec<f32>, (u64, u64))> {
    on_ranks_within(2, HANG, move |g| {
        let values = if g.rank() == 1 { bad } else { [3.0, 4.0] };
        let (w, grads) = one_var(&values).expect("grads");
        let mut opt = make(g.rank(), w.clone());
        let result = step(&mut opt, &grads, g).map_err(|e| e.to_string());
        (result, w.to_vec1::<f32>().expect("var"), counts(&opt))
    })
}

fn adamw(clip: Option<ClipSetting>, var: Var) -> FusedAdamW {
    let opt = FusedAdamW::new(vec![var], ParamsAdamW::default()).expect("opt");
    match clip {
        Some(clip) => opt.with_clip(clip).expect("clip"),
        None => opt,
    }
}

fn fused_counts(opt: &FusedAdamW) -> (u64, u64) {
    (
        opt.steps().expect("steps"),
        opt.skipped_steps().expect("skipped"),
    )
}

/// Issue 21 (3): `FusedAdamW` + AGC + `skip_nonfinite(true)` with a NaN on rank 1 only: rank 1
/// skipped and rank 0 stepped. Now every rank skips, for every clip kind (and without a clip).
#[test]
fn a_nan_on_one_rank_skips_the_fused_step_on_every_rank_for_every_clip() {
    for clip in [
        Some(ClipSetting::agc(0.01)),
        Some(ClipSetting::norm(1.0)),
        Some(ClipSetting::value(1.0)),
        Some(ClipSetting::AutoClip(candle_grad_clip::AutoClip::default())),
        Some(ClipSetting::ZClip(candle_grad_clip::ZClip::new())),
        None,
    ] {
        let what = format!("{clip:?}");
        let outcomes = fused_with(
            [f32::NAN, 1.0],
            move |_, w| adamw(clip.clone(), w).with_skip_nonfinite(true),
            |opt, grads, g| opt.step_across(grads, g),
            fused_counts,
        );
        for (rank, (result, var, counts)) in outcomes.iter().enumerate() {
            assert!(result.is_ok(), "{what}: rank {rank}: {result:?}");
            assert_eq!(var, &[0.0, 0.0], "{what}: rank {rank} stepped");
            assert_eq!(*counts, (0, 1), "{what}: rank {rank}'s (steps, skipped)");
        }
    }
}

/// Fused optimizers whose settings differ are refused on every rank, nothing stepped: the clip
/// (kind and parameters), `skip_nonfinite`, the optimizer itself.
#[test]
fn fused_steps_with_different_settings_are_refused() {
    type Make = fn(usize, Var) -> FusedAdamW;
    let cases: [(&str, Make); 4] = [
        ("max_norm", |r, w| {
            adamw(Some(ClipSetting::norm(1.0 + r as f64)), w)
        }),
        ("clip setting", |r, w| {
            let clip = [ClipSetting::norm(1.0), ClipSetting::agc(0.01)][r].clone();
            adamw(Some(clip), w)
        }),
        ("clip parameter", |r, w| {
            adamw(Some(ClipSetting::agc(0.01 * (1 + r) as f64)), w)
        }),
        ("skip_nonfinite", |r, w| {
            adamw(None, w).with_skip_nonfinite(r == 1)
        }),
    ];
    for (field, make) in cases {
        let outcomes = fused_with(
            [1.0, 2.0],
            make,
            |opt, grads, g| opt.step_across(grads, g),
            fused_counts,
        );
        for (rank, (result, var, counts)) in outcomes.iter().enumerate() {
            let message = result.as_ref().expect_err("refused");
            assert!(
                message.contains("settings differ") && message.contains(field),
                "{field}: rank {rank}: {message}"
            );
            assert_eq!(var, &[0.0, 0.0], "{field}: rank {rank} stepped");
            assert_eq!(*counts, (0, 0), "{field}: rank {rank}");
        }
    }
    // FusedAdamW on rank 0, FusedSgd on rank 1 (no clip: the small collective).
    let outcomes = on_ranks_within(2, HANG, |g| {
        let (w, grads) = one_var(&[1.0, 2.0]).expect("grads");
        if g.rank() == 0 {
            adamw(None, w).step_across(&grads, g)
        } else {
            FusedSgd::new(vec![w], ParamsSgd::default())
                .expect("sgd")
                .step_across(&grads, g)
        }
        .map_err(|e| e.to_string())
    });
    for (rank, result) in outcomes.iter().enumerate() {
        let message = result.as_ref().expect_err("refused");
        assert!(message.contains("optimizer"), "rank {rank}: {message}");
    }
}

/// `Clipped::step_across` with different clips on the two ranks: refused, nothing stepped.
#[test]
fn clipped_steps_with_different_settings_are_refused() {
    for skip in [false, true] {
        let outcomes = fused_with(
            [1.0, 2.0],
            move |r, w| {
                Clipped::from_optimizer(
                    SGD::new(vec![w.clone()], 0.1).expect("sgd"),
                    vec![w],
                    ClipSetting::norm(1.0 + r as f64),
                )
                .expect("clipped")
                .with_skip_nonfinite(skip)
            },
            |opt, grads, g| opt.step_across(grads, g),
            |opt| {
                (
                    opt.steps().expect("steps"),
                    opt.skipped_steps().expect("skipped"),
                )
            },
        );
        for (rank, (result, var, counts)) in outcomes.iter().enumerate() {
            let message = result.as_ref().expect_err("refused");
            assert!(
                message.contains("max_norm"),
                "skip {skip}: rank {rank}: {message}"
            );
            assert_eq!(var, &[0.0, 0.0], "skip {skip}: rank {rank} stepped");
            assert_eq!(*counts, (0, 0), "skip {skip}: rank {rank}");
        }
    }
}

/// A refusal and a disagreement on three ranks name the lowest refusing (or differing) rank on
/// every rank, and the count of refusing ranks.
#[test]
fn several_refusing_ranks_are_counted_and_the_first_is_named() {
    let outcomes = on_ranks_within(4, HANG, |g| {
        let (w, mut grads) = one_var(&[1.0, 2.0]).expect("grads");
        let max_norm = if g.rank() >= 2 { f64::NAN } else { 1.0 };
        ClipGradNorm::new(max_norm)
            .clip_across_(&[w], &mut grads, g)
            .map(|_| ())
            .map_err(|e| e.to_string())
    });
    for (rank, outcome) in outcomes.iter().enumerate().take(2) {
        let message = outcome.as_ref().expect_err("refused");
        assert!(
            message.contains("2 of 4 ranks refused")
                && message.contains("rank 2 (invalid settings) and 1 other rank"),
            "rank {rank}: {message}"
        );
    }
}
