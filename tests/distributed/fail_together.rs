//! Ranks fail together (issue 21, part 2): a rank refused by its settings, by its optimizer's
//! parameters, or whose reduction fails (before the first collective, or in the rescue pass
//! between two collectives) takes part in the collective anyway, so every rank returns an error
//! that names it and its kind of failure, and nothing is modified on any rank; a failure past the
//! collective (in the update) fails that rank alone, and every rank at the next step. Every case
//! runs under a deadline ([`on_ranks_within`]): before the fix, the other ranks waited forever.

use candle_grad_clip::{ClipSetting, Clipped, FusedAdamW};
use candle_nn::{Optimizer, ParamsAdamW, SGD};

use super::*;

/// Each rank's error (or `Ok`) as text, and its gradient afterwards.
type Outcome = (std::result::Result<f32, String>, Vec<f32>);

/// `ClipGradNorm::clip_across_` on two ranks with gradient `[30, 40]` each; `setup` adjusts the
/// clip or arms a fault on one rank before the call.
fn clip_two_ranks(
    setup: impl Fn(usize, ClipGradNorm) -> ClipGradNorm + Send + Sync + 'static,
    values: &'static [f32],
) -> Vec<Outcome> {
    on_ranks_within(2, HANG, move |g| {
        let (w, mut grads) = one_var(values).expect("grads");
        let clip = setup(g.rank(), ClipGradNorm::new(1.0));
        let result = clip
            .clip_across_(std::slice::from_ref(&w), &mut grads, g)
            .and_then(|n| n.to_dtype(DType::F32)?.to_scalar::<f32>())
            .map_err(|e| e.to_string());
        let after = grads
            .get(&w)
            .expect("grad")
            .to_vec1::<f32>()
            .expect("values");
        (result, after)
    })
}

fn assert_every_rank_failed(outcomes: &[Outcome], values: &[f32], named: &str, own: &str) {
    for (rank, (result, after)) in outcomes.iter().enumerate() {
        let message = result.as_ref().expect_err("every rank fails");
        assert_eq!(after, values, "rank {rank}'s gradient was modified");
        if rank == 1 {
            assert!(message.contains(own), "rank 1 (its own error): {message}");
        } else {
            assert!(
                message.contains("rank 1 (") && message.contains(named),
                "rank {rank} must name rank 1 and '{named}': {message}"
            );
        }
    }
}

/// Issue 21 (2): rank 1 calls `ClipGradNorm::new(-1.0).clip_across_`; its check fails, and rank 0
/// used to wait forever.
#[test]
fn a_rank_refused_by_its_settings_fails_every_rank() {
    let outcomes = clip_two_ranks(
        |rank, clip| {
            if rank == 1 {
                ClipGradNorm::new(-1.0)
            } else {
                clip
            }
        },
        &[30.0, 40.0],
    );
    assert_every_rank_failed(&outcomes, &[30.0, 40.0], "invalid settings", "max_norm");
}

/// Issue 21 (2): a rank whose reduction fails (a device error, injected) before the collective.
#[test]
fn a_rank_whose_reduction_fails_fails_every_rank() {
    let outcomes = clip_two_ranks(
        |rank, clip| {
            if rank == 1 {
                candle_grad_clip::__inject_fault("reduction");
            }
            clip
        },
        &[30.0, 40.0],
    );
    assert_every_rank_failed(
        &outcomes,
        &[30.0, 40.0],
        "its reduction failed",
        "injected fault",
    );
}

/// Issue 21 (2): the rescue pass between the two collectives (F64 gradients whose squares
/// overflow): rank 1's fails there, after the first collective.
#[test]
fn a_rank_whose_rescue_pass_fails_fails_every_rank() {
    let outcomes = on_ranks_within(2, HANG, |g| {
        let w = Var::zeros(2, DType::F64, &Device::Cpu).expect("var");
        let mut grads = GradStore::default();
        grads.insert(
            &w,
            Tensor::new(&[3e200f64, 4e200], &Device::Cpu).expect("grad"),
        );
        if g.rank() == 1 {
            candle_grad_clip::__inject_fault("rescue");
        }
        let result = ClipGradNorm::new(1.0)
            .clip_across_(std::slice::from_ref(&w), &mut grads, g)
            .map(|_| ())
            .map_err(|e| e.to_string());
        let after = grads
            .get(&w)
            .expect("grad")
            .to_vec1::<f64>()
            .expect("values");
        (result, after)
    });
    for (rank, (result, after)) in outcomes.iter().enumerate() {
        let message = result.as_ref().expect_err("every rank fails");
        assert_eq!(
            after,
            &[3e200, 4e200],
            "rank {rank}'s gradient was modified"
        );
        if rank == 0 {
            assert!(
                message.contains("rank 1 (its reduction failed"),
                "rank 0: {message}"
            );
        } else {
            assert!(
                message.contains("injected fault at rescue"),
                "rank 1: {message}"
            );
        }
    }
}

/// The rescue pass across ranks still gives every rank the one-process norm (no fault).
#[test]
fn the_rescue_pass_across_ranks_is_the_one_process_norm() {
    let var = |value: f64| {
        let w = Var::zeros(1, DType::F64, &Device::Cpu).expect("var");
        let grad = Tensor::new(&[value], &Device::Cpu).expect("grad");
        (w, grad)
    };
    let norms = on_ranks_within(2, HANG, move |g| {
        let (w, grad) = var([3e200f64, 4e200][g.rank()]);
        let mut grads = GradStore::default();
        grads.insert(&w, grad);
        total_norm_across(&[w], &grads, NormType::L2, g)
            .and_then(|n| n.to_scalar::<f64>())
            .expect("norm")
    });
    let mut grads = GradStore::default();
    let vars: Vec<Var> = [3e200f64, 4e200]
        .into_iter()
        .map(|value| {
            let (w, grad) = var(value);
            grads.insert(&w, grad);
            w
        })
        .collect();
    let one = candle_grad_clip::total_norm(&vars, &grads, NormType::L2, false)
        .and_then(|n| n.to_scalar::<f64>())
        .expect("one process");
    assert!(
        one.is_finite() && one > 4e200,
        "the rescue pass ran: {one:e}"
    );
    assert_eq!(norms, [one, one]);
}

/// Each rank's step results, var and steps taken.
type Steps = (Vec<std::result::Result<(), String>>, Vec<f32>, u64);

/// A FusedAdamW on each of two ranks over one var with gradient `g`, the first `steps` steps
/// across; `setup` adjusts rank 1's optimizer. Each rank's step results, var and counts.
fn fused_two_ranks(
    clip: Option<ClipSetting>,
    steps: usize,
    setup: impl Fn(usize, &mut FusedAdamW) + Send + Sync + 'static,
) -> Vec<Steps> {
    on_ranks_within(2, HANG, move |g| {
        let (w, grads) = one_var(&[3.0, 4.0]).expect("grads");
        let mut opt = FusedAdamW::new(vec![w.clone()], ParamsAdamW::default()).expect("opt");
        if let Some(clip) = &clip {
            opt = opt.with_clip(clip.clone()).expect("clip");
        }
        setup(g.rank(), &mut opt);
        let results = (0..steps)
            .map(|_| opt.step_across(&grads, g).map_err(|e| e.to_string()))
            .collect();
        let var = w.to_vec1::<f32>().expect("var");
        (results, var, opt.steps().expect("steps"))
    })
}

/// Issue 21 (3): rank 1's step refused by its settings (`set_learning_rate(NaN)`) used to fail
/// there while rank 0 stepped (no clip: no collective at all), or left rank 0 waiting (a clip).
#[test]
fn a_rank_whose_learning_rate_is_invalid_fails_every_rank() {
    for clip in [
        None,
        Some(ClipSetting::norm(1.0)),
        Some(ClipSetting::value(1.0)),
    ] {
        let outcomes = fused_two_ranks(clip.clone(), 1, |rank, opt| {
            if rank == 1 {
                opt.set_learning_rate(f64::NAN);
            }
        });
        for (rank, (results, var, steps)) in outcomes.iter().enumerate() {
            let message = results[0].as_ref().expect_err("every rank fails");
            assert_eq!(var, &[0.0, 0.0], "{clip:?}: rank {rank} stepped");
            assert_eq!(*steps, 0, "{clip:?}: rank {rank} counted a step");
            if rank == 0 {
                assert!(
                    message.contains("rank 1 (invalid optimizer parameters)"),
                    "{clip:?}: rank 0: {message}"
                );
            }
        }
    }
}

/// A failure past the collective (the update, injected on rank 1) fails rank 1 alone; rank 0
/// stepped, so the ranks differ: the next step fails on every rank, naming rank 1.
#[test]
fn a_failure_past_the_collective_fails_every_rank_at_the_next_step() {
    for clip in [None, Some(ClipSetting::norm(1.0))] {
        let outcomes = fused_two_ranks(clip.clone(), 3, |rank, _| {
            if rank == 1 {
                candle_grad_clip::__inject_fault("update");
            }
        });
        let (rank0, rank1) = (&outcomes[0], &outcomes[1]);
        assert!(rank0.0[0].is_ok(), "{clip:?}: rank 0's first step");
        assert!(
            rank1.0[0]
                .as_ref()
                .is_err_and(|m| m.contains("injected fault")),
            "{clip:?}: rank 1's first step: {:?}",
            rank1.0[0]
        );
        for step in 1..3 {
            let m0 = rank0.0[step].as_ref().expect_err("rank 0 fails");
            let m1 = rank1.0[step].as_ref().expect_err("rank 1 fails");
            assert!(
                m0.contains("rank 1 (an earlier step failed on it"),
                "{clip:?}: step {step}, rank 0: {m0}"
            );
            assert!(m1.contains("earlier step failed"), "rank 1: {m1}");
        }
        assert_eq!((rank0.2, rank1.2), (1, 0), "{clip:?}: the steps taken");
    }
}

/// An inner optimizer that refuses its step on one rank.
struct Refusing {
    inner: SGD,
    refuse: bool,
}

impl Optimizer for Refusing {
    type Config = (f64, bool);
    fn new(vars: Vec<Var>, (lr, refuse): (f64, bool)) -> Result<Self> {
        Ok(Self {
            inner: SGD::new(vars, lr)?,
            refuse,
        })
    }
    fn step(&mut self, grads: &GradStore) -> Result<()> {
        if self.refuse {
            candle_core::bail!("the inner optimizer refuses")
        }
        self.inner.step(grads)
    }
    fn learning_rate(&self) -> f64 {
        self.inner.learning_rate()
    }
    fn set_learning_rate(&mut self, lr: f64) {
        self.inner.set_learning_rate(lr)
    }
}

/// `Clipped::step_across` whose inner step fails on rank 1 (past the clip's collective): rank 1
/// alone fails, then every rank at the next step.
#[test]
fn a_clipped_inner_step_failing_on_one_rank_fails_every_rank_at_the_next_step() {
    for skip in [false, true] {
        let outcomes = on_ranks_within(2, HANG, move |g| {
            let (w, grads) = one_var(&[3.0, 4.0]).expect("grads");
            let inner = Refusing::new(vec![w.clone()], (0.1, g.rank() == 1)).expect("inner");
            let mut opt = Clipped::from_optimizer(inner, vec![w.clone()], ClipSetting::norm(1.0))
                .expect("clipped")
                .with_skip_nonfinite(skip);
            let results: Vec<_> = (0..2)
                .map(|_| opt.step_across(&grads, g).map_err(|e| e.to_string()))
                .collect();
            results
        });
        assert!(outcomes[0][0].is_ok(), "skip {skip}: rank 0's first step");
        assert!(outcomes[1][0].is_err(), "skip {skip}: rank 1's first step");
        let m0 = outcomes[0][1]
            .as_ref()
            .expect_err("rank 0's second step fails");
        assert!(
            m0.contains("rank 1 (an earlier step failed on it"),
            "skip {skip}: {m0}"
        );
        assert!(outcomes[1][1].is_err(), "skip {skip}: rank 1's second step");
    }
}

/// A failure past the collective of a stateless call (`clip_across_`'s scale pass, injected on
/// rank 1) fails rank 1 alone; its gradients may be partly scaled, so its group is out of step:
/// the next call fails on every rank, naming rank 1, instead of going on with ranks that differ.
#[test]
fn a_stateless_call_failing_past_the_collective_fails_every_rank_at_the_next_call() {
    let outcomes = on_ranks_within(2, HANG, |g| {
        let mut results = Vec::new();
        for call in 0..3 {
            if g.rank() == 1 && call == 0 {
                candle_grad_clip::__inject_fault("scale");
            }
            let (w, mut grads) = one_var(&[30.0, 40.0]).expect("grads");
            results.push(
                ClipGradNorm::new(1.0)
                    .clip_across_(std::slice::from_ref(&w), &mut grads, g)
                    .map(|_| ())
                    .map_err(|e| e.to_string()),
            );
        }
        (results, g.is_out_of_step())
    });
    let ((rank0, out0), (rank1, out1)) = (&outcomes[0], &outcomes[1]);
    assert!(rank0[0].is_ok(), "rank 0's first call: {:?}", rank0[0]);
    assert!(
        rank1[0]
            .as_ref()
            .is_err_and(|m| m.contains("injected fault at scale")),
        "rank 1's first call: {:?}",
        rank1[0]
    );
    for call in 1..3 {
        let m0 = rank0[call].as_ref().expect_err("rank 0 fails");
        let m1 = rank1[call].as_ref().expect_err("rank 1 fails");
        assert!(
            m0.contains("rank 1 (an earlier step failed on it"),
            "call {call}, rank 0: {m0}"
        );
        assert!(m1.contains("out of step"), "call {call}, rank 1: {m1}");
    }
    assert_eq!((*out0, *out1), (false, true));
}
