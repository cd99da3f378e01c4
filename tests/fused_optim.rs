//! The fused optimizers against candle's own (`candle_nn::AdamW`, `candle_nn::SGD`: bitwise, step
//! after step), against clip-then-step (bitwise), against PyTorch's SGD algorithm (exact values
//! worked out by hand, and an f64 transcription), and their state, skipping and refusals.

use std::collections::HashMap;

mod common;

use candle_core::{backprop::GradStore, DType, Device, Result, Tensor, Var};
use candle_grad_clip::{
    clip_grad_norm_, clip_grad_value_, AutoClip, ClipSetting, Clipped, ClippedConfig, FusedAdamW,
    FusedSgd, NormType, ParamsSgd,
};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, SGD};
use common::{
    assert_same, bits, signed_values, state_bits, store_bits, tensor, twin_grads, twin_vars, vals,
    vars_bits,
};
use rand::{rngs::StdRng, SeedableRng};

/// Shapes of a small model: matrices, vectors, a scalar-like var, an odd length.
const SHAPES: [&[usize]; 6] = [&[7, 5], &[5], &[1], &[3, 4, 2], &[1027], &[64, 33]];

/// Probability that a var is left without a gradient in a step that skips some
/// (`common::twin_grads`).
const SKIP: f64 = 0.2;

fn adamw_configs() -> Vec<ParamsAdamW> {
    vec![
        ParamsAdamW::default(),
        ParamsAdamW {
            lr: 0.1,
            beta1: 0.5,
            beta2: 0.75,
            eps: 1e-3,
            weight_decay: 0.0,
        },
        ParamsAdamW {
            lr: 3e-4,
            beta1: 0.0,
            beta2: 0.99,
            eps: 1e-12,
            weight_decay: 0.3,
        },
    ]
}

// ---------------------------------------------------------------------------------------------
// Drop-in exactness.

#[test]
fn adamw_is_bitwise_candles_adamw_for_20_steps() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(1);
    for dtype in [DType::F32, DType::F64] {
        for params in adamw_configs() {
            let (ours, theirs) = twin_vars(&mut rng, &SHAPES, &[dtype])?;
            let mut fused = FusedAdamW::new(ours.clone(), params.clone())?;
            let mut reference = AdamW::new(theirs.clone(), params.clone())?;
            for step in 0..20 {
                let (ga, gb) = twin_grads(
                    &mut rng,
                    &ours,
                    &theirs,
                    1.0,
                    (step % 3 == 1).then_some(SKIP),
                )?;
                fused.step(&ga)?;
                reference.step(&gb)?;
                assert_same(
                    &vars_bits(&ours)?,
                    &vars_bits(&theirs)?,
                    &format!("{dtype:?} {params:?} step {step}"),
                );
            }
            assert_eq!(fused.steps()?, 20);
        }
    }
    Ok(())
}

#[test]
fn plain_sgd_is_bitwise_candles_sgd() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(2);
    for dtype in [DType::F32, DType::F64] {
        for lr in [0.1, 1e-3, 0.0, 3.0] {
            let (ours, theirs) = twin_vars(&mut rng, &SHAPES, &[dtype])?;
            let params = ParamsSgd {
                lr,
                ..Default::default()
            };
            let mut fused = FusedSgd::new(ours.clone(), params)?;
            let mut reference = SGD::new(theirs.clone(), lr)?;
            for step in 0..20 {
                let (ga, gb) = twin_grads(
                    &mut rng,
                    &ours,
                    &theirs,
                    1.0,
                    (step % 2 == 0).then_some(SKIP),
                )?;
                fused.step(&ga)?;
                reference.step(&gb)?;
                assert_same(
                    &vars_bits(&ours)?,
                    &vars_bits(&theirs)?,
                    &format!("{dtype:?} lr {lr} step {step}"),
                );
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// PyTorch's SGD.

/// Values of `torch.optim.SGD`'s algorithm worked out by hand on exactly representable inputs
/// (every intermediate is exact in binary, so these are the values PyTorch computes):
/// p = 1, g = 1 every step, lr = 0.5, momentum 0.5.
#[test]
fn sgd_momentum_and_nesterov_match_pytorchs_algorithm_on_exact_values() -> Result<()> {
    let cases: [(ParamsSgd, [f64; 3]); 4] = [
        // b1 = 1, p = 0.5; b2 = 0.5 + 1 = 1.5, p = -0.25; b3 = 0.75 + 1 = 1.75, p = -1.125.
        (
            ParamsSgd {
                lr: 0.5,
                momentum: 0.5,
                ..Default::default()
            },
            [0.5, -0.25, -1.125],
        ),
        // Nesterov: d = g + 0.5 b: d1 = 1.5, p = 0.25; d2 = 1 + 0.75 = 1.75, p = -0.625;
        // d3 = 1 + 0.875 = 1.875, p = -1.5625.
        (
            ParamsSgd {
                lr: 0.5,
                momentum: 0.5,
                nesterov: true,
                ..Default::default()
            },
            [0.25, -0.625, -1.5625],
        ),
        // Dampening 0.5: b1 = g = 1 (no dampening at the first step), p = 0.5;
        // b2 = 0.5 + 0.5 = 1, p = 0; b3 = 0.5 + 0.5 = 1, p = -0.5.
        (
            ParamsSgd {
                lr: 0.5,
                momentum: 0.5,
                dampening: 0.5,
                ..Default::default()
            },
            [0.5, 0.0, -0.5],
        ),
        // Weight decay 0.5, no momentum: d = g + 0.5 p: d1 = 1.5, p = 0.25; d2 = 1.125,
        // p = -0.3125; d3 = 0.84375, p = -0.734375.
        (
            ParamsSgd {
                lr: 0.5,
                weight_decay: 0.5,
                ..Default::default()
            },
            [0.25, -0.3125, -0.734375],
        ),
    ];
    for dtype in [DType::F32, DType::F64, DType::BF16, DType::F16] {
        for (params, expected) in &cases {
            let w = Var::from_tensor(&Tensor::new(&[1f64], &Device::Cpu)?.to_dtype(dtype)?)?;
            let mut opt = FusedSgd::new(vec![w.clone()], params.clone())?;
            for (step, want) in expected.iter().enumerate() {
                let mut grads = GradStore::default();
                grads.insert(&w, Tensor::new(&[1f64], &Device::Cpu)?.to_dtype(dtype)?);
                opt.step(&grads)?;
                let got = vals(&w)?[0];
                assert_eq!(got, *want, "{dtype:?} {params:?} step {step}");
            }
        }
    }
    Ok(())
}

/// An f64 transcription of `torch.optim.SGD` over random data: F64 vars bitwise, F32 within a few
/// ulps per parameter.
#[test]
fn sgd_matches_an_f64_transcription_of_pytorchs_algorithm() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(3);
    for params in [
        ParamsSgd {
            lr: 0.05,
            momentum: 0.9,
            dampening: 0.1,
            weight_decay: 0.01,
            nesterov: false,
        },
        ParamsSgd {
            lr: 0.05,
            momentum: 0.9,
            dampening: 0.0,
            weight_decay: 1e-4,
            nesterov: true,
        },
    ] {
        let n = 500;
        let p0 = signed_values(&mut rng, n, 1.0);
        let grads: Vec<Vec<f64>> = (0..8).map(|_| signed_values(&mut rng, n, 1.0)).collect();
        // The transcription.
        let (mut p, mut buf) = (p0.clone(), vec![0.0; n]);
        for (k, g) in grads.iter().enumerate() {
            for i in 0..n {
                let mut d = g[i];
                if params.weight_decay != 0.0 {
                    d += params.weight_decay * p[i];
                }
                buf[i] = if k == 0 {
                    d
                } else {
                    buf[i] * params.momentum + (1.0 - params.dampening) * d
                };
                d = if params.nesterov {
                    d + params.momentum * buf[i]
                } else {
                    buf[i]
                };
                p[i] -= params.lr * d;
            }
        }
        for dtype in [DType::F64, DType::F32] {
            let w = Var::from_tensor(&tensor(&p0, &[n], dtype)?)?;
            let mut opt = FusedSgd::new(vec![w.clone()], params.clone())?;
            for g in &grads {
                let mut store = GradStore::default();
                store.insert(&w, tensor(g, &[n], dtype)?);
                opt.step(&store)?;
            }
            let got = vals(&w)?;
            for i in 0..n {
                if dtype == DType::F64 {
                    assert_eq!(got[i].to_bits(), p[i].to_bits(), "{params:?} {i}");
                } else {
                    let tol = 64.0 * f32::EPSILON as f64 * p[i].abs().max(1.0);
                    assert!(
                        (got[i] - p[i]).abs() <= tol,
                        "{params:?} {i}: {} vs {}",
                        got[i],
                        p[i]
                    );
                }
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The clip folded in.

/// For every setting: the fused, clipped step is bitwise the clip followed by candle's step, as
/// `Clipped<AdamW>` does it (clip the store in place, then `AdamW::step`), with the same norm and
/// the same count of clipped steps; and the fused step leaves the `GradStore` unwritten.
#[test]
fn folded_clip_is_bitwise_clip_then_step() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(4);
    let settings = [
        ClipSetting::norm(0.5),
        ClipSetting::norm(1e6),
        ClipSetting::Norm {
            max_norm: 0.3,
            norm_type: NormType::L1,
        },
        ClipSetting::Norm {
            max_norm: 0.01,
            norm_type: NormType::Inf,
        },
        ClipSetting::Norm {
            max_norm: 0.7,
            norm_type: NormType::P(3.0),
        },
        ClipSetting::value(0.05),
        ClipSetting::AutoClip(AutoClip::new(30.0)?),
    ];
    for dtype in [DType::F32, DType::F64] {
        for setting in &settings {
            let params = ParamsAdamW {
                lr: 0.01,
                ..Default::default()
            };
            let (ours, theirs) = twin_vars(&mut rng, &SHAPES, &[dtype])?;
            let mut fused =
                FusedAdamW::new(ours.clone(), params.clone())?.with_clip(setting.clone())?;
            let config = ClippedConfig::new(params, setting.clone());
            let mut reference = Clipped::<AdamW>::new(theirs.clone(), config)?;
            for step in 0..12 {
                let scale = if step % 4 == 3 { 100.0 } else { 1.0 };
                let (ga, gb) = twin_grads(
                    &mut rng,
                    &ours,
                    &theirs,
                    scale,
                    (step % 5 == 2).then_some(SKIP),
                )?;
                let before = store_bits(&ours, &ga)?;
                fused.step(&ga)?;
                assert_eq!(
                    before,
                    store_bits(&ours, &ga)?,
                    "the fused step wrote the GradStore"
                );
                reference.step(&gb)?;
                let what = format!("{dtype:?} {setting:?} step {step}");
                assert_same(&vars_bits(&ours)?, &vars_bits(&theirs)?, &what);
                let (a, b) = (
                    fused.last_norm().expect("a norm"),
                    reference.last_norm().expect("a norm"),
                );
                assert_eq!(bits(a)?, bits(b)?, "{what}: last_norm");
            }
            assert_eq!(
                fused.clipped_steps()?,
                reference.clipped_steps()?,
                "{dtype:?} {setting:?}"
            );
            assert!(
                fused.clipped_steps()? > 0
                    || matches!(setting, ClipSetting::Norm { max_norm, .. } if *max_norm > 1.0)
            );
        }
    }
    Ok(())
}

/// SGD with momentum has no candle counterpart: its folded clip is checked against clipping a
/// copy of the gradients and stepping an unclipped `FusedSgd`.
#[test]
fn folded_clip_with_momentum_is_clip_then_unclipped_step() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(5);
    let params = ParamsSgd {
        lr: 0.05,
        momentum: 0.9,
        dampening: 0.2,
        weight_decay: 1e-3,
        nesterov: false,
    };
    for dtype in [DType::F32, DType::F64, DType::BF16, DType::F16] {
        for setting in [ClipSetting::norm(0.5), ClipSetting::value(0.02)] {
            let (ours, theirs) = twin_vars(&mut rng, &SHAPES, &[dtype])?;
            let mut fused =
                FusedSgd::new(ours.clone(), params.clone())?.with_clip(setting.clone())?;
            let mut reference = FusedSgd::new(theirs.clone(), params.clone())?;
            for step in 0..10 {
                let (ga, mut gb) = twin_grads(
                    &mut rng,
                    &ours,
                    &theirs,
                    1.0,
                    (step % 4 == 1).then_some(SKIP),
                )?;
                fused.step(&ga)?;
                match &setting {
                    ClipSetting::Value { clip_value } => {
                        clip_grad_value_(&theirs, &mut gb, *clip_value)?
                    }
                    _ => {
                        clip_grad_norm_(&theirs, &mut gb, 0.5)?;
                    }
                }
                reference.step(&gb)?;
                assert_same(
                    &vars_bits(&ours)?,
                    &vars_bits(&theirs)?,
                    &format!("{dtype:?} {setting:?} step {step}"),
                );
            }
            // The whole state (momentum buffers, step count) bitwise, but for the count of
            // clipped steps, which only the folded clip keeps.
            let state = |opt: &FusedSgd| -> Result<Vec<(String, Vec<u64>)>> {
                let mut state = opt.state_dict()?;
                state.remove("clipped_steps");
                state_bits(&state)
            };
            assert_eq!(
                state(&fused)?,
                state(&reference)?,
                "{dtype:?} {setting:?}: state"
            );
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Skipping non-finite steps.

#[test]
fn a_skipped_step_changes_nothing_and_the_run_goes_on_as_without_it() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(6);
    for dtype in [DType::F32, DType::F64, DType::BF16] {
        for clip in [
            None,
            Some(ClipSetting::norm(1.0)),
            Some(ClipSetting::value(0.1)),
        ] {
            for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
                let (ours, theirs) = twin_vars(&mut rng, &SHAPES, &[dtype])?;
                let params = ParamsAdamW::default();
                let make = |vars: Vec<Var>| -> Result<FusedAdamW> {
                    let opt = FusedAdamW::new(vars, params.clone())?.skip_nonfinite(true);
                    match &clip {
                        Some(c) => opt.with_clip(c.clone()),
                        None => Ok(opt),
                    }
                };
                let mut skipping = make(ours.clone())?;
                let mut clean = make(theirs.clone())?;
                for step in 0..6 {
                    let (ga, gb) = twin_grads(&mut rng, &ours, &theirs, 1.0, None)?;
                    if step == 3 {
                        // A bad step for `skipping` only: one non-finite element somewhere.
                        let mut bad_store = GradStore::default();
                        for (i, v) in ours.iter().enumerate() {
                            let mut g = vals(ga.get(v).expect("grad"))?;
                            if i == 4 {
                                g[17] = bad;
                            }
                            bad_store.insert(v, tensor(&g, v.dims(), dtype)?);
                        }
                        let params_before = vars_bits(&ours)?;
                        let state_before = skipping.state_dict()?;
                        skipping.step(&bad_store)?;
                        assert_eq!(
                            vars_bits(&ours)?,
                            params_before,
                            "{dtype:?} {clip:?} {bad}: params"
                        );
                        let mut state_after = skipping.state_dict()?;
                        let mut state_before = state_before;
                        // Only the skip counter moved.
                        assert_eq!(
                            state_after
                                .remove("skipped_steps")
                                .map(|t| bits(&t))
                                .transpose()?,
                            Some(vec![1])
                        );
                        state_before.remove("skipped_steps");
                        assert_eq!(
                            state_bits(&state_after)?,
                            state_bits(&state_before)?,
                            "{dtype:?} {clip:?} {bad}: state"
                        );
                    }
                    skipping.step(&ga)?;
                    clean.step(&gb)?;
                    assert_same(
                        &vars_bits(&ours)?,
                        &vars_bits(&theirs)?,
                        &format!("{dtype:?} {clip:?} {bad}: step {step}"),
                    );
                }
                assert_eq!((skipping.skipped_steps()?, clean.skipped_steps()?), (1, 0));
                assert_eq!(skipping.steps()?, 6);
                assert_eq!(skipping.clipped_steps()?, clean.clipped_steps()?);
            }
        }
    }
    Ok(())
}

/// Without `skip_nonfinite`, a NaN gradient poisons the step as candle's AdamW would (and a NaN
/// norm counts as clipped).
#[test]
fn without_skipping_a_nan_step_is_taken() -> Result<()> {
    let w = Var::new(&[1f32, 2.], &Device::Cpu)?;
    let r = Var::new(&[1f32, 2.], &Device::Cpu)?;
    let mut fused = FusedAdamW::new(vec![w.clone()], ParamsAdamW::default())?
        .with_clip(ClipSetting::norm(1.0))?;
    let mut reference = Clipped::<AdamW>::new(
        vec![r.clone()],
        ClippedConfig::new(ParamsAdamW::default(), ClipSetting::norm(1.0)),
    )?;
    let (mut ga, mut gb) = (GradStore::default(), GradStore::default());
    ga.insert(&w, Tensor::new(&[f32::NAN, 1.], &Device::Cpu)?);
    gb.insert(&r, Tensor::new(&[f32::NAN, 1.], &Device::Cpu)?);
    fused.step(&ga)?;
    reference.step(&gb)?;
    assert!(w.to_vec1::<f32>()?.iter().all(|x| x.is_nan()));
    assert_eq!(bits(&w)?, bits(&r)?);
    assert_eq!(
        (
            fused.clipped_steps()?,
            fused.skipped_steps()?,
            fused.steps()?
        ),
        (1, 0, 1)
    );
    // Value clipping: a NaN element counts as clipped too (as `Clipped` counts it), the NaN stays.
    let w = Var::new(&[1f32, 2.], &Device::Cpu)?;
    let r = Var::new(&[1f32, 2.], &Device::Cpu)?;
    let mut fused = FusedAdamW::new(vec![w.clone()], ParamsAdamW::default())?
        .with_clip(ClipSetting::value(10.0))?;
    let config = ClippedConfig::new(ParamsAdamW::default(), ClipSetting::value(10.0));
    let mut reference = Clipped::<AdamW>::new(vec![r.clone()], config)?;
    let (mut ga, mut gb) = (GradStore::default(), GradStore::default());
    ga.insert(&w, Tensor::new(&[f32::NAN, 1.], &Device::Cpu)?);
    gb.insert(&r, Tensor::new(&[f32::NAN, 1.], &Device::Cpu)?);
    fused.step(&ga)?;
    reference.step(&gb)?;
    assert_eq!(bits(&w)?, bits(&r)?);
    assert_eq!((fused.clipped_steps()?, reference.clipped_steps()?), (1, 1));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// State.

#[test]
fn save_load_resume_is_bitwise_the_straight_run() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(7);
    let dir = std::env::temp_dir().join(format!("candle-grad-clip-state-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    for dtype in [DType::F32, DType::F64, DType::F16] {
        for sgd in [false, true] {
            let (ours, theirs) = twin_vars(&mut rng, &SHAPES, &[dtype])?;
            let grads: Vec<(GradStore, GradStore)> = (0..10)
                .map(|k| twin_grads(&mut rng, &ours, &theirs, 1.0, (k % 3 == 0).then_some(SKIP)))
                .collect::<Result<_>>()?;
            let sgd_params = ParamsSgd {
                lr: 0.1,
                momentum: 0.5,
                nesterov: true,
                ..Default::default()
            };
            let adamw_params = ParamsAdamW {
                lr: 0.01,
                ..Default::default()
            };
            // Straight: 10 steps.
            if sgd {
                let mut straight = FusedSgd::new(theirs.clone(), sgd_params.clone())?
                    .with_clip(ClipSetting::norm(0.5))?;
                for (_, gb) in &grads {
                    straight.step(gb)?;
                }
                let mut first = FusedSgd::new(ours.clone(), sgd_params.clone())?
                    .with_clip(ClipSetting::norm(0.5))?;
                for (ga, _) in &grads[..5] {
                    first.step(ga)?;
                }
                let path = dir.join(format!("sgd-{dtype:?}.safetensors"));
                first.save_state(&path)?;
                drop(first);
                let mut resumed = FusedSgd::new(ours.clone(), sgd_params.clone())?
                    .with_clip(ClipSetting::norm(0.5))?;
                resumed.load_state(&path)?;
                for (ga, _) in &grads[5..] {
                    resumed.step(ga)?;
                }
                assert_same(
                    &vars_bits(&ours)?,
                    &vars_bits(&theirs)?,
                    &format!("sgd {dtype:?}"),
                );
                assert_eq!(
                    state_bits(&resumed.state_dict()?)?,
                    state_bits(&straight.state_dict()?)?
                );
            } else {
                let mut straight = FusedAdamW::new(theirs.clone(), adamw_params.clone())?
                    .with_clip(ClipSetting::norm(0.5))?;
                for (_, gb) in &grads {
                    straight.step(gb)?;
                }
                let mut first = FusedAdamW::new(ours.clone(), adamw_params.clone())?
                    .with_clip(ClipSetting::norm(0.5))?;
                for (ga, _) in &grads[..5] {
                    first.step(ga)?;
                }
                let state = first.state_dict()?;
                drop(first);
                let mut resumed = FusedAdamW::new(ours.clone(), adamw_params.clone())?
                    .with_clip(ClipSetting::norm(0.5))?;
                resumed.load_state_dict(&state)?;
                for (ga, _) in &grads[5..] {
                    resumed.step(ga)?;
                }
                assert_same(
                    &vars_bits(&ours)?,
                    &vars_bits(&theirs)?,
                    &format!("adamw {dtype:?}"),
                );
                assert_eq!(
                    state_bits(&resumed.state_dict()?)?,
                    state_bits(&straight.state_dict()?)?
                );
            }
        }
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// `from_varmap` keys the state by name, so a model built in another order resumes correctly.
#[test]
fn from_varmap_state_is_keyed_by_name() -> Result<()> {
    let build = |names: &[&str]| -> Result<candle_nn::VarMap> {
        let varmap = candle_nn::VarMap::new();
        let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        for (k, name) in names.iter().enumerate() {
            vb.get_with_hints(k + 2, name, candle_nn::Init::Const(1.0))?;
        }
        Ok(varmap)
    };
    let a = build(&["x", "y", "z"])?;
    let mut opt = FusedAdamW::from_varmap(&a, ParamsAdamW::default())?;
    let mut grads = GradStore::default();
    for var in a.all_vars() {
        grads.insert(&var, var.ones_like()?);
    }
    opt.step(&grads)?;
    let state = opt.state_dict()?;
    assert!(state.contains_key("y.exp_avg_sq"));
    // Another process: vars created in another order; same names, same shapes per name.
    let b = candle_nn::VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&b, DType::F32, &Device::Cpu);
    vb.get_with_hints(4, "z", candle_nn::Init::Const(1.0))?;
    vb.get_with_hints(2, "x", candle_nn::Init::Const(1.0))?;
    vb.get_with_hints(3, "y", candle_nn::Init::Const(1.0))?;
    let mut resumed = FusedAdamW::from_varmap(&b, ParamsAdamW::default())?;
    resumed.load_state_dict(&state)?;
    assert_eq!(state_bits(&resumed.state_dict()?)?, state_bits(&state)?);
    Ok(())
}

#[test]
fn mismatched_states_are_refused_and_nothing_changes() -> Result<()> {
    let w = Var::zeros(3, DType::F32, &Device::Cpu)?;
    let mut opt = FusedAdamW::new(vec![w.clone()], ParamsAdamW::default())?;
    let mut grads = GradStore::default();
    grads.insert(&w, Tensor::new(&[1f32, 2., 3.], &Device::Cpu)?);
    opt.step(&grads)?;
    let good = opt.state_dict()?;
    let before = state_bits(&good)?;
    let mut cases: Vec<(&str, HashMap<String, Tensor>)> = Vec::new();
    let mut wrong_shape = good.clone();
    wrong_shape.insert(
        "0.exp_avg".into(),
        Tensor::zeros(4, DType::F32, &Device::Cpu)?,
    );
    cases.push(("shape", wrong_shape));
    let mut wrong_dtype = good.clone();
    wrong_dtype.insert(
        "0.exp_avg".into(),
        Tensor::zeros(3, DType::F64, &Device::Cpu)?,
    );
    cases.push(("dtype", wrong_dtype));
    let mut missing = good.clone();
    missing.remove("0.exp_avg_sq");
    cases.push(("no `0.exp_avg_sq`", missing));
    let mut extra = good.clone();
    extra.insert(
        "1.exp_avg".into(),
        Tensor::zeros(3, DType::F32, &Device::Cpu)?,
    );
    cases.push(("unexpected", extra));
    let mut bad_step = good.clone();
    bad_step.insert("step".into(), Tensor::new(-1i64, &Device::Cpu)?);
    cases.push(("negative", bad_step));
    for (what, dict) in cases {
        let err = opt.load_state_dict(&dict).expect_err(what).to_string();
        assert!(err.contains(what), "{what}: {err}");
        assert_eq!(state_bits(&opt.state_dict()?)?, before, "{what}: changed");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Refusals and odd inputs.

#[test]
fn bad_configs_are_refused_and_nothing_changes() -> Result<()> {
    let bad_adamw = [
        ParamsAdamW {
            lr: -1e-3,
            ..Default::default()
        },
        ParamsAdamW {
            lr: f64::NAN,
            ..Default::default()
        },
        ParamsAdamW {
            beta1: 1.0,
            ..Default::default()
        },
        ParamsAdamW {
            beta2: -0.1,
            ..Default::default()
        },
        ParamsAdamW {
            eps: 0.0,
            ..Default::default()
        },
        ParamsAdamW {
            weight_decay: f64::INFINITY,
            ..Default::default()
        },
        ParamsAdamW {
            weight_decay: -0.1,
            ..Default::default()
        },
    ];
    let w = Var::new(&[1f32, 2.], &Device::Cpu)?;
    let mut opt = FusedAdamW::new(vec![w.clone()], ParamsAdamW::default())?;
    for p in bad_adamw {
        assert!(
            FusedAdamW::new(vec![w.clone()], p.clone()).is_err(),
            "{p:?}"
        );
        assert!(opt.set_params(p.clone()).is_err(), "{p:?}");
        assert_eq!(opt.params().lr, ParamsAdamW::default().lr);
    }
    // An invalid learning rate through the trait is refused at the step, nothing written.
    opt.set_learning_rate(f64::NAN);
    let mut grads = GradStore::default();
    grads.insert(&w, Tensor::new(&[1f32, 1.], &Device::Cpu)?);
    let before = bits(&w)?;
    assert!(opt.step(&grads).is_err());
    assert_eq!(bits(&w)?, before);
    assert_eq!(opt.steps()?, 0);
    let bad_sgd = [
        ParamsSgd {
            lr: -0.1,
            ..Default::default()
        },
        ParamsSgd {
            momentum: -0.5,
            ..Default::default()
        },
        ParamsSgd {
            weight_decay: -1.0,
            ..Default::default()
        },
        ParamsSgd {
            nesterov: true,
            ..Default::default()
        },
        ParamsSgd {
            nesterov: true,
            momentum: 0.9,
            dampening: 0.1,
            ..Default::default()
        },
        ParamsSgd {
            dampening: f64::NAN,
            ..Default::default()
        },
    ];
    let mut sgd = FusedSgd::new(vec![w.clone()], ParamsSgd::default())?;
    for p in bad_sgd {
        let err = FusedSgd::new(vec![w.clone()], p.clone())
            .expect_err("refused")
            .to_string();
        assert!(err.contains("ParamsSgd"), "{err}");
        assert!(sgd.set_params(p).is_err());
        assert_eq!(sgd.params(), &ParamsSgd::default());
    }
    assert!(FusedSgd::new(vec![], ParamsSgd::default())?
        .with_clip(ClipSetting::value(f64::NAN))
        .is_err());
    Ok(())
}

#[test]
fn bad_gradients_are_refused_and_nothing_changes() -> Result<()> {
    let w = Var::new(&[1f32, 2., 3., 4.], &Device::Cpu)?;
    let v = Var::new(&[1f32, 2.], &Device::Cpu)?;
    let mut opt = FusedAdamW::new(vec![v.clone(), w.clone()], ParamsAdamW::default())?;
    let before = (bits(&w)?, bits(&v)?, state_bits(&opt.state_dict()?)?);
    let cases = [
        ("dtype", Tensor::new(&[1f64, 2., 3., 4.], &Device::Cpu)?),
        ("shape", Tensor::new(&[1f32, 2., 3.], &Device::Cpu)?),
        ("storage", w.as_tensor().clone()),
    ];
    for (what, g) in cases {
        let mut grads = GradStore::default();
        grads.insert(&v, Tensor::new(&[1f32, 1.], &Device::Cpu)?);
        grads.insert(&w, g);
        let err = opt.step(&grads).expect_err(what).to_string();
        assert!(err.contains("var #1"), "{what}: {err}");
        assert_eq!(
            (bits(&w)?, bits(&v)?, state_bits(&opt.state_dict()?)?),
            before,
            "{what}"
        );
    }
    Ok(())
}

/// Mixed dtypes in one optimizer, a transposed (non-contiguous) gradient, a var never given a
/// gradient, an integer var (left out), an empty var.
#[test]
fn mixed_dtypes_views_and_vars_without_gradients() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(8);
    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    for dtype in [DType::F32, DType::F64] {
        let t = tensor(&signed_values(&mut rng, 12, 1.0), &[3, 4], dtype)?;
        ours.push(Var::from_tensor(&t)?);
        theirs.push(Var::from_tensor(&t)?);
    }
    let idle = Var::new(&[5f32], &Device::Cpu)?;
    let ints = Var::from_tensor(&Tensor::new(&[1u32, 2], &Device::Cpu)?)?;
    let empty = Var::zeros(0, DType::F32, &Device::Cpu)?;
    let mut all = ours.clone();
    all.extend([idle.clone(), ints.clone(), empty.clone()]);
    let mut fused = FusedAdamW::new(all, ParamsAdamW::default())?;
    assert_eq!(fused.vars().len(), 4, "the integer var is left out");
    let mut reference = AdamW::new(theirs.clone(), ParamsAdamW::default())?;
    for _ in 0..3 {
        let (mut ga, mut gb) = (GradStore::default(), GradStore::default());
        for (a, b) in ours.iter().zip(&theirs) {
            let g = signed_values(&mut rng, 12, 1.0);
            // Given as the transpose of a (4, 3) tensor: a strided view.
            let gt = tensor(&g, &[4, 3], a.dtype())?;
            ga.insert(a, gt.t()?);
            gb.insert(b, gt.t()?.contiguous()?);
        }
        ga.insert(&empty, Tensor::zeros(0, DType::F32, &Device::Cpu)?);
        fused.step(&ga)?;
        reference.step(&gb)?;
        assert_eq!(vars_bits(&ours)?, vars_bits(&theirs)?);
    }
    assert_eq!(idle.to_vec1::<f32>()?, [5.0]);
    let state = fused.state_dict()?;
    assert_eq!(
        state["2.exp_avg"].to_vec1::<f32>()?,
        [0.0],
        "no gradient, no moment"
    );
    Ok(())
}

/// F16/BF16 vars compute in f32 with f32 moments: each step is closer to the exact step (in f64,
/// from the same inputs) than candle's AdamW, which computes in the var's dtype.
#[test]
fn half_precision_steps_are_closer_to_exact_than_candles() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(9);
    for dtype in [DType::F16, DType::BF16] {
        let n = 2000;
        let p0 = signed_values(&mut rng, n, 1.0);
        let g = signed_values(&mut rng, n, 1.0);
        let params = ParamsAdamW {
            lr: 0.01,
            weight_decay: 0.1,
            ..Default::default()
        };
        let ours = Var::from_tensor(&tensor(&p0, &[n], dtype)?)?;
        let theirs = Var::from_tensor(&tensor(&p0, &[n], dtype)?)?;
        let p_exact_in = vals(&ours)?;
        let g_t = tensor(&g, &[n], dtype)?;
        let g_in = vals(&g_t)?;
        let mut fused = FusedAdamW::new(vec![ours.clone()], params.clone())?;
        let mut reference = AdamW::new(vec![theirs.clone()], params.clone())?;
        let (mut ga, mut gb) = (GradStore::default(), GradStore::default());
        ga.insert(&ours, g_t.clone());
        gb.insert(&theirs, g_t.clone());
        fused.step(&ga)?;
        reference.step(&gb)?;
        // The exact first step: m = (1-b1) g, v = (1-b2) g², m̂ = g, v̂ = g².
        let exact: Vec<f64> = p_exact_in
            .iter()
            .zip(&g_in)
            .map(|(&p, &g)| {
                let m_hat = (1.0 - params.beta1) * g / (1.0 - params.beta1);
                let v_hat = (1.0 - params.beta2) * g * g / (1.0 - params.beta2);
                p * (1.0 - params.lr * params.weight_decay)
                    - params.lr * m_hat / (v_hat.sqrt() + params.eps)
            })
            .collect();
        // A NaN (candle's F16 step gives some: eps = 1e-8 is 0 in F16, so a zero gradient gives
        // 0 / 0) is an infinite error.
        let err = |v: &Var| -> Result<f64> {
            Ok(vals(v)?
                .iter()
                .zip(&exact)
                .map(|(a, b)| {
                    if a.is_nan() {
                        f64::INFINITY
                    } else {
                        (a - b).abs()
                    }
                })
                .sum())
        };
        let (ours_err, theirs_err) = (err(&ours)?, err(&theirs)?);
        assert!(
            ours_err < theirs_err,
            "{dtype:?}: ours {ours_err:e}, candle {theirs_err:e}"
        );
        // Ours is the exact step rounded once to the dtype, but for f32's own roundings: one ulp
        // relative, above a floor: F16's smallest normal (its subnormals are spaced 2^-24); for
        // BF16 (normal down to 1e-38) only the f32 roundings of a step that nearly cancels
        // (terms of about lr = 0.01, errors of about 1e-9), far below 2^-7 * 2e-6.
        let got = vals(&ours)?;
        for (i, (&a, &b)) in got.iter().zip(&exact).enumerate() {
            let ulp = if dtype == DType::F16 {
                2f64.powi(-10) * b.abs().max(6.1e-5)
            } else {
                2f64.powi(-7) * b.abs().max(2e-6)
            };
            assert!((a - b).abs() <= ulp, "{dtype:?} {i}: {a} vs exact {b}");
        }
    }
    Ok(())
}
