//! Steps on the CPU: a non-finite step changes nothing; the fused path is unscale, clip and candle's
//! step; the one-read path (`step` without `unscale_`) equals `unscale_` then `step`, and the cases
//! where it does not apply.

use super::*;
use candle_grad_clip::ClipGradNorm;

/// A step with a non-finite gradient leaves the vars and the optimizer state bitwise unchanged:
/// the fused optimizers (state dicts compared), and candle's AdamW (a skipped step followed by a
/// finite one equals the finite one alone, so its moments and step count did not move).
#[test]
fn non_finite_steps_change_nothing() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(3);
    let shapes: [&[usize]; 3] = [&[6, 4], &[4], &[33]];
    let vars = f32_vars(&shapes, &mut rng)?;
    let mut scaler = GradScaler::new().with_init_scale(1024.0);
    let mut adamw =
        FusedAdamW::new(vars.clone(), ParamsAdamW::default())?.with_clip(ClipSetting::norm(0.5))?;
    let mut sgd = FusedSgd::new(
        vars.clone(),
        ParamsSgd {
            lr: 0.1,
            momentum: 0.9,
            ..Default::default()
        },
    )?
    .with_clip(ClipSetting::value(0.1))?;
    for step in 0..8 {
        let poison = [0, 1, 2, 0, 3, 3, 0, 1][step];
        let scale = scaler.scale_value()?;
        let values = scaled_values(&vars, scale, poison, &mut rng);
        let before = (vars_bits(&vars)?, adamw.state_dict()?, sgd.state_dict()?);
        let optimizer = step % 2;
        let grads = store(&vars, &values, DType::F32)?;
        if optimizer == 0 {
            scaler.step(&mut adamw, &grads)?;
        } else {
            scaler.step(&mut sgd, &grads)?;
        }
        scaler.update()?;
        if poison != 0 {
            assert_eq!(vars_bits(&vars)?, before.0, "step {step}: vars");
            let (a, s) = (adamw.state_dict()?, sgd.state_dict()?);
            for (k, t) in a.iter().filter(|(k, _)| *k != "skipped_steps") {
                assert_eq!(bits(t)?, bits(&before.1[k])?, "step {step}: AdamW {k}");
            }
            for (k, t) in s.iter().filter(|(k, _)| *k != "skipped_steps") {
                assert_eq!(bits(t)?, bits(&before.2[k])?, "step {step}: SGD {k}");
            }
        } else {
            assert_ne!(
                vars_bits(&vars)?,
                before.0,
                "step {step}: a finite step updates"
            );
        }
    }
    assert_eq!(adamw.skipped_steps()? + sgd.skipped_steps()?, 5);

    // candle's AdamW: [finite, non-finite, finite] through the scaler equals [finite, finite]
    // without it (unscaled by hand: the scale is a power of two, the division exact).
    let mut rng = StdRng::seed_from_u64(4);
    let a = f32_vars(&shapes, &mut rng)?;
    let b: Vec<Var> = a
        .iter()
        .map(|v| Var::from_tensor(&v.as_tensor().copy()?))
        .collect::<Result<_>>()?;
    let mut ours = AdamW::new(a.clone(), ParamsAdamW::default())?;
    let mut theirs = AdamW::new(b.clone(), ParamsAdamW::default())?;
    let mut scaler = GradScaler::new()
        .with_init_scale(256.0)
        .with_growth_interval(100);
    for poison in [0u8, 2, 0] {
        let scale = scaler.scale_value()?;
        let values = scaled_values(&a, scale, poison, &mut rng);
        let mut grads = store(&a, &values, DType::F32)?;
        scaler.unscale_(&a, &mut grads)?;
        scaler.step(&mut ours, &grads)?;
        scaler.update()?;
        if poison == 0 {
            let unscaled: Vec<Vec<f64>> = values
                .iter()
                .map(|v| {
                    v.iter()
                        .map(|g| (*g as f32 / scale as f32) as f64)
                        .collect()
                })
                .collect();
            theirs.step(&store(&b, &unscaled, DType::F32)?)?;
        }
        assert_eq!(vars_bits(&a)?, vars_bits(&b)?, "poison {poison}");
    }
    Ok(())
}

/// The fused path is bitwise an independent unscale (PyTorch's products, by hand), then
/// `clip_grad_norm_`, then candle's `AdamW` step, and the store then holds the unscaled
/// gradients.
#[test]
fn fused_step_is_unscale_then_clipped_step() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(5);
    let shapes: [&[usize]; 4] = [&[16, 9], &[9], &[1], &[257]];
    let a = f32_vars(&shapes, &mut rng)?;
    let b: Vec<Var> = a
        .iter()
        .map(|v| Var::from_tensor(&v.as_tensor().copy()?))
        .collect::<Result<_>>()?;
    let params = ParamsAdamW {
        lr: 0.01,
        weight_decay: 0.1,
        ..Default::default()
    };
    let mut fused =
        FusedAdamW::new(a.clone(), params.clone())?.with_clip(ClipSetting::norm(1.0))?;
    let mut reference = AdamW::new(b.clone(), params)?;
    let mut scaler = GradScaler::new()
        .with_init_scale(3000.0)
        .with_growth_factor(1.5)
        .with_growth_interval(2);
    let mut torch = TorchScaler::new(3000.0, 1.5, 0.5, 2);
    for step in 0..7 {
        let poison = if step == 3 { 2 } else { 0 };
        // Norms around 0.3 to 30 once unscaled: some steps clip, some do not.
        let magnitude = torch.scale as f64 * [0.01, 1.0, 0.1, 1.0, 3.0, 0.02, 0.5][step];
        let values = scaled_values(&a, magnitude, poison, &mut rng);
        let grads = store(&a, &values, DType::F32)?;
        scaler.step(&mut fused, &grads)?;
        scaler.update()?;
        let unscaled: Vec<Vec<f64>> = values
            .iter()
            .map(|v| v.iter().map(|&g| torch.unscale(DType::F32, g)).collect())
            .collect();
        for (v, u) in a.iter().zip(&unscaled) {
            let got = common::vals(grads.get(v).unwrap())?;
            let same = got
                .iter()
                .zip(u)
                .all(|(x, y)| x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()));
            assert!(same, "step {step}: the store holds the unscaled gradients");
        }
        let found_inf = values.iter().flatten().any(|g| !g.is_finite());
        if !found_inf {
            let mut theirs = store(&b, &unscaled, DType::F32)?;
            clip_grad_norm_(&b, &mut theirs, 1.0)?;
            reference.step(&theirs)?;
        }
        torch.update(found_inf);
        assert_eq!(vars_bits(&a)?, vars_bits(&b)?, "step {step}");
        assert_eq!(scale_bits(&scaler)?, torch.scale.to_bits(), "step {step}");
    }
    assert_eq!(fused.skipped_steps()?, 1);
    assert!(fused.clipped_steps()? >= 2);
    Ok(())
}

/// A fused optimizer's step through a scaler: its last norm and `[steps, clipped, skipped]`.
type Stepper = Box<dyn FnMut(&mut GradScaler, &GradStore) -> Result<(Option<Tensor>, [u64; 3])>>;

/// The fused step's one-read path on the CPU (`step` without `unscale_`: the reduction and the
/// update unscale each element as they read it) equals `unscale_` then `step` (unscale pass, then
/// the fused step on unscaled gradients) bit for bit: vars, optimizer state, counters, the norm,
/// the scale, and the gradients left in the store; for F32, F64 and BF16 vars, every clip kind,
/// AdamW and SGD with momentum, vars large enough for the parallel passes, and non-finite steps.
/// (The norm of a non-finite step is not compared: after `unscale_` the step is not run, as
/// PyTorch's, so `last_norm` stays the previous step's; the one-read path runs it and skips.)
#[test]
fn one_read_path_equals_unscale_then_step() -> Result<()> {
    use candle_grad_clip::NormType;
    let clips: Vec<Option<ClipSetting>> = vec![
        None,
        Some(ClipSetting::norm(0.5)),
        Some(ClipSetting::Norm(
            ClipGradNorm::new(0.05).with_norm_type(NormType::Inf),
        )),
        Some(ClipSetting::Norm(
            ClipGradNorm::new(1.0).with_norm_type(NormType::P(3.0)),
        )),
        Some(ClipSetting::value(0.01)),
    ];
    let shapes: [&[usize]; 4] = [&[300, 257], &[257], &[1], &[0]];
    for (case, dtype) in [DType::F32, DType::F64, DType::BF16]
        .into_iter()
        .enumerate()
    {
        for (c, clip) in clips.iter().enumerate() {
            let mut rng = StdRng::seed_from_u64(100 + (case * 10 + c) as u64);
            let make = |rng: &mut StdRng| -> Result<Vec<Var>> {
                shapes
                    .iter()
                    .map(|s| {
                        let n: usize = s.iter().product();
                        let v: Vec<f64> = (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect();
                        Var::from_tensor(
                            &Tensor::from_vec(v, s.to_vec(), &Device::Cpu)?.to_dtype(dtype)?,
                        )
                    })
                    .collect()
            };
            let a = make(&mut rng)?;
            let b: Vec<Var> = a
                .iter()
                .map(|v| Var::from_tensor(&v.as_tensor().copy()?))
                .collect::<Result<_>>()?;
            let adamw = c % 2 == 0;
            let build = |vars: &[Var]| -> Result<Stepper> {
                if adamw {
                    let mut opt = FusedAdamW::new(vars.to_vec(), ParamsAdamW::default())?;
                    if let Some(clip) = clip {
                        opt = opt.with_clip(clip.clone())?;
                    }
                    Ok(Box::new(move |scaler, grads| {
                        scaler.step(&mut opt, grads)?;
                        Ok((
                            opt.last_norm().cloned(),
                            [opt.steps()?, opt.clipped_steps()?, opt.skipped_steps()?],
                        ))
                    }))
                } else {
                    let params = ParamsSgd {
                        lr: 0.1,
                        momentum: 0.9,
                        weight_decay: 0.01,
                        ..Default::default()
                    };
                    let mut opt = FusedSgd::new(vars.to_vec(), params)?;
                    if let Some(clip) = clip {
                        opt = opt.with_clip(clip.clone())?;
                    }
                    Ok(Box::new(move |scaler, grads| {
                        scaler.step(&mut opt, grads)?;
                        Ok((
                            opt.last_norm().cloned(),
                            [opt.steps()?, opt.clipped_steps()?, opt.skipped_steps()?],
                        ))
                    }))
                }
            };
            let (mut one_read, mut two_pass) = (build(&a)?, build(&b)?);
            let mut scaler_a = GradScaler::new()
                .with_init_scale(1000.0)
                .with_growth_interval(2);
            let mut scaler_b = scaler_a.clone();
            for step in 0..5 {
                let poison = [0u8, 0, 2, 0, 1][step];
                let scaler_b_before = scaler_b.scale_value()? as f32;
                let values = scaled_values(&a, scaler_a.scale_value()? * 0.3, poison, &mut rng);
                let ga = store(&a, &values, dtype)?;
                let mut gb = store(&b, &values, dtype)?;
                let stored: Vec<Vec<f64>> = a
                    .iter()
                    .map(|v| common::vals(ga.get(v).unwrap()))
                    .collect::<Result<_>>()?;
                let (norm_a, counts_a) = one_read(&mut scaler_a, &ga)?;
                scaler_b.unscale_(&b, &mut gb)?;
                let (norm_b, counts_b) = two_pass(&mut scaler_b, &gb)?;
                scaler_a.update()?;
                scaler_b.update()?;
                let what = format!("{dtype:?} clip {clip:?} adamw {adamw} step {step}");
                assert_eq!(vars_bits(&a)?, vars_bits(&b)?, "{what}: vars");
                assert_eq!(counts_a, counts_b, "{what}: steps, clipped, skipped");
                // The store's gradients: PyTorch's unscaled values (transcribed), on both paths.
                let torch = TorchScaler::new(scaler_b_before as f64, 2.0, 0.5, 2);
                for ((va, vb), scaled) in a.iter().zip(&b).zip(&stored) {
                    let (x, y) = (
                        common::vals(ga.get(va).unwrap())?,
                        common::vals(gb.get(vb).unwrap())?,
                    );
                    for (k, g) in scaled.iter().enumerate() {
                        let want = torch.unscale(dtype, *g);
                        let same =
                            |v: f64| v.to_bits() == want.to_bits() || (v.is_nan() && want.is_nan());
                        assert!(
                            same(x[k]),
                            "{what}: one-read store [{k}] {} vs {want}",
                            x[k]
                        );
                        assert!(
                            same(y[k]),
                            "{what}: two-pass store [{k}] {} vs {want}",
                            y[k]
                        );
                    }
                }
                match (norm_a, norm_b) {
                    _ if poison != 0 => {}
                    (Some(x), Some(y)) => assert_eq!(bits(&x)?, bits(&y)?, "{what}: norm"),
                    (None, None) => {}
                    other => panic!("{what}: norms {other:?}"),
                }
                assert_eq!(
                    scale_bits(&scaler_a)?,
                    scale_bits(&scaler_b)?,
                    "{what}: scale"
                );
            }
        }
    }
    Ok(())
}

/// `step` without `unscale_` where the one-read path does not apply: gradients sharing a storage
/// (unscaled once, before the step) and AutoClip (whose norm is taken before the step); and vars
/// without a gradient on the one-read path (left alone, their state too).
#[test]
fn step_without_unscale_in_the_other_cases() -> Result<()> {
    use candle_grad_clip::AutoClip;
    let dev = Device::Cpu;
    // Two vars whose gradients are one tensor.
    let (a, b) = (
        Var::zeros(4, DType::F32, &dev)?,
        Var::zeros(4, DType::F32, &dev)?,
    );
    let shared = Tensor::new(&[8f32, -16.0, 3.0, 1e-30], &dev)?;
    let mut grads = GradStore::default();
    grads.insert(&a, shared.clone());
    grads.insert(&b, shared.clone());
    let mut scaler = GradScaler::new().with_init_scale(8.0);
    let mut opt = FusedSgd::new(vec![a.clone(), b.clone()], sgd_lr(1.0))?;
    scaler.step(&mut opt, &grads)?;
    scaler.update()?;
    let unscaled: Vec<f32> = [8f32, -16.0, 3.0, 1e-30]
        .iter()
        .map(|g| g * 0.125)
        .collect();
    assert_eq!(shared.to_vec1::<f32>()?, unscaled, "unscaled once");
    let stepped: Vec<f32> = unscaled.iter().map(|g| -g).collect();
    assert_eq!(a.to_vec1::<f32>()?, stepped);
    assert_eq!(b.to_vec1::<f32>()?, stepped);

    // AutoClip: the same as unscale_ then step.
    let mut rng = StdRng::seed_from_u64(30);
    let shapes: [&[usize]; 2] = [&[20, 7], &[7]];
    let x = f32_vars(&shapes, &mut rng)?;
    let y: Vec<Var> = x
        .iter()
        .map(|v| Var::from_tensor(&v.as_tensor().copy()?))
        .collect::<Result<_>>()?;
    let auto = || -> Result<ClipSetting> { Ok(ClipSetting::AutoClip(AutoClip::new(10.0)?)) };
    let mut ox = FusedAdamW::new(x.clone(), ParamsAdamW::default())?.with_clip(auto()?)?;
    let mut oy = FusedAdamW::new(y.clone(), ParamsAdamW::default())?.with_clip(auto()?)?;
    let (mut sx, mut sy) = (GradScaler::new(), GradScaler::new());
    for step in 0..4 {
        let values = scaled_values(&x, 65536.0, (step == 2) as u8, &mut rng);
        let gx = store(&x, &values, DType::F32)?;
        let mut gy = store(&y, &values, DType::F32)?;
        sx.step(&mut ox, &gx)?;
        sy.unscale_(&y, &mut gy)?;
        sy.step(&mut oy, &gy)?;
        sx.update()?;
        sy.update()?;
        assert_eq!(vars_bits(&x)?, vars_bits(&y)?, "AutoClip step {step}");
        for (vx, vy) in x.iter().zip(&y) {
            assert_eq!(bits(gx.get(vx).unwrap())?, bits(gy.get(vy).unwrap())?);
        }
    }
    assert_eq!(ox.skipped_steps()?, 1);

    // A var without a gradient on the one-read path: untouched, its moments too.
    let z = f32_vars(&shapes, &mut rng)?;
    let mut oz =
        FusedAdamW::new(z.clone(), ParamsAdamW::default())?.with_clip(ClipSetting::norm(1.0))?;
    let mut sz = GradScaler::new();
    let before = bits(z[1].as_tensor())?;
    let mut gz = store(&z, &scaled_values(&z, 65536.0, 0, &mut rng), DType::F32)?;
    gz.remove(&z[1]);
    let g0 = common::vals(gz.get(&z[0]).unwrap())?;
    sz.step(&mut oz, &gz)?;
    sz.update()?;
    assert_eq!(bits(z[1].as_tensor())?, before);
    let state = oz.state_dict()?;
    assert!(common::vals(&state["1.exp_avg"])?.iter().all(|&m| m == 0.0));
    let torch = TorchScaler::new(65536.0, 2.0, 0.5, 2000);
    let got = common::vals(gz.get(&z[0]).unwrap())?;
    for (g, s) in got.iter().zip(&g0) {
        assert_eq!(g.to_bits(), torch.unscale(DType::F32, *s).to_bits());
    }
    Ok(())
}

/// The scaler finds the fused path through `ScaledOptimizer`, not the type: a user's newtype
/// around `FusedAdamW` that forwards `fused()` steps bitwise as the bare optimizer and counts a
/// found-inf step in the fused optimizer's `skipped_steps` (the fused path skips inside the
/// step); one that keeps the default takes the plain path (the step is not called, so nothing is
/// counted), with the same vars.
#[test]
fn a_wrapper_that_forwards_fused_takes_the_fused_path() -> Result<()> {
    use candle_grad_clip::{FusedHandle, ScaledOptimizer};

    /// A user's newtype around `FusedAdamW`; `FORWARD`: whether it forwards `fused()`.
    struct Wrapper<const FORWARD: bool>(FusedAdamW);
    type Forwarding = Wrapper<true>;
    type Plain = Wrapper<false>;
    impl<const FORWARD: bool> Optimizer for Wrapper<FORWARD> {
        type Config = ParamsAdamW;
        fn new(vars: Vec<Var>, config: ParamsAdamW) -> Result<Self> {
            Ok(Self(FusedAdamW::new(vars, config)?))
        }
        fn step(&mut self, grads: &GradStore) -> Result<()> {
            self.0.step(grads)
        }
        fn learning_rate(&self) -> f64 {
            self.0.learning_rate()
        }
        fn set_learning_rate(&mut self, lr: f64) {
            self.0.set_learning_rate(lr)
        }
    }
    impl<const FORWARD: bool> ScaledOptimizer for Wrapper<FORWARD> {
        fn fused(&mut self) -> Option<FusedHandle<'_>> {
            if FORWARD {
                self.0.fused()
            } else {
                None // the trait's default: the plain path
            }
        }
    }

    let mut rng = StdRng::seed_from_u64(11);
    let shapes: [&[usize]; 2] = [&[5, 3], &[7]];
    let bare_vars = f32_vars(&shapes, &mut rng)?;
    let copy = |vars: &[Var]| -> Result<Vec<Var>> {
        vars.iter()
            .map(|v| Var::from_tensor(&v.as_tensor().copy()?))
            .collect()
    };
    let (forwarding_vars, plain_vars) = (copy(&bare_vars)?, copy(&bare_vars)?);
    let mut bare = FusedAdamW::new(bare_vars.clone(), ParamsAdamW::default())?;
    let mut forwarding = Forwarding::new(forwarding_vars.clone(), ParamsAdamW::default())?;
    let mut plain = Plain::new(plain_vars.clone(), ParamsAdamW::default())?;
    let mut scalers = [GradScaler::new(), GradScaler::new(), GradScaler::new()];
    for step in 0..4 {
        let poison = step == 2;
        let grads_for = |vars: &[Var]| -> Result<GradStore> {
            let mut g = GradStore::default();
            for (k, v) in vars.iter().enumerate() {
                let n = v.elem_count();
                let mut values: Vec<f32> =
                    (0..n).map(|i| (i + k + step) as f32 * 0.25 - 1.0).collect();
                if poison && k == 1 {
                    values[0] = f32::INFINITY;
                }
                let t = Tensor::new(values.as_slice(), &Device::Cpu)?.reshape(v.shape())?;
                g.insert(v, (t * 65536.0)?);
            }
            Ok(g)
        };
        scalers[0].step(&mut bare, &grads_for(&bare_vars)?)?;
        scalers[1].step(&mut forwarding, &grads_for(&forwarding_vars)?)?;
        scalers[2].step(&mut plain, &grads_for(&plain_vars)?)?;
        for s in &mut scalers {
            s.update()?;
        }
    }
    let want = vars_bits(&bare_vars)?;
    common::assert_same(&vars_bits(&forwarding_vars)?, &want, "forwarding wrapper");
    common::assert_same(&vars_bits(&plain_vars)?, &want, "plain wrapper");
    assert_eq!(bare.skipped_steps()?, 1);
    assert_eq!(
        forwarding.0.skipped_steps()?,
        1,
        "the fused path counts the skip"
    );
    assert_eq!(
        plain.0.skipped_steps()?,
        0,
        "the plain path does not call the step"
    );
    assert_eq!(
        (bare.steps()?, forwarding.0.steps()?, plain.0.steps()?),
        (3, 3, 3)
    );
    Ok(())
}
