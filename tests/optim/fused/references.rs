//! Drop-in exactness: `FusedAdamW` and plain `FusedSgd` are bitwise candle's `AdamW` and `SGD`,
//! step after step (and in half precision closer to the exact step than candle's); SGD with momentum
//! and Nesterov against PyTorch's algorithm (exact values by hand, and an f64 transcription).

use super::*;

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

/// `FusedAdamW::new_lr` is `candle_nn::AdamW::new_lr`: the same defaults, the same steps.
#[test]
fn adamw_new_lr_is_bitwise_candles_new_lr() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(5);
    let (ours, theirs) = twin_vars(&mut rng, &SHAPES, &[DType::F32])?;
    let mut fused = FusedAdamW::new_lr(ours.clone(), 0.03)?;
    let mut reference = AdamW::new_lr(theirs.clone(), 0.03)?;
    assert_eq!(
        format!("{:?}", fused.params()),
        format!("{:?}", reference.params())
    );
    for step in 0..5 {
        let (ga, gb) = twin_grads(&mut rng, &ours, &theirs, 1.0, None)?;
        fused.step(&ga)?;
        reference.step(&gb)?;
        assert_same(
            &vars_bits(&ours)?,
            &vars_bits(&theirs)?,
            &format!("step {step}"),
        );
    }
    assert!(FusedAdamW::new_lr(ours, f64::NAN).is_err());
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
