//! `Clipped` around candle's optimizers: the plain optimizer on gradients clipped by hand (norm and
//! value), the caller's gradients clipped and the clipped steps counted, `last_norm`, an infinite
//! norm or `max_norm`, bad settings and bad gradients refused before anything changes.

use super::*;
use candle_grad_clip::ClipGradNorm;

#[test]
fn clipped_sgd_equals_sgd_on_hand_clipped_gradients() -> Result<()> {
    for norm_type in [NormType::L2, NormType::L1, NormType::Inf, NormType::P(3.0)] {
        clipped_matches_reference(
            |vars| SGD::new(vars, 0.1),
            ClipSetting::Norm(ClipGradNorm::new(0.5).with_norm_type(norm_type)),
            |g| ref_clip_norm(g, 0.5, norm_type),
            3.0,
            1e-6,
        )?;
    }
    Ok(())
}

#[test]
fn clipped_adamw_equals_adamw_on_hand_clipped_gradients() -> Result<()> {
    // AdamW normalises the step by the second moment, so a clipping error would show through the
    // moments' ratio; weight decay and bias correction run too.
    clipped_matches_reference(
        |vars| {
            AdamW::new(
                vars,
                ParamsAdamW {
                    lr: 0.01,
                    ..Default::default()
                },
            )
        },
        ClipSetting::norm(0.25),
        |g| ref_clip_norm(g, 0.25, NormType::L2),
        5.0,
        1e-5,
    )
}

#[test]
fn clipped_value_equals_sgd_on_hand_clamped_gradients() -> Result<()> {
    clipped_matches_reference(
        |vars| SGD::new(vars, 0.1),
        ClipSetting::value(0.3),
        |g| {
            g.iter()
                .map(|v| v.iter().map(|x| x.clamp(-0.3, 0.3)).collect())
                .collect()
        },
        1.0,
        1e-6,
    )
}

#[test]
fn huge_max_norm_steps_exactly_like_the_inner_optimizer() -> Result<()> {
    for max_norm in [f64::INFINITY, 1e30] {
        let mut rng = StdRng::seed_from_u64(5);
        let init: Vec<Vec<f64>> = SHAPES
            .iter()
            .map(|s| random(numel(s), 1.0, &mut rng))
            .collect();
        let (a_vars, b_vars) = (make_vars(&init)?, make_vars(&init)?);
        let (c_vars, d_vars) = (make_vars(&init)?, make_vars(&init)?);
        let config = ClippedConfig::new(0.05, ClipSetting::norm(max_norm));
        let mut sgd_wrapped = Clipped::<SGD>::new(a_vars.clone(), config)?;
        let mut sgd = SGD::new(b_vars.clone(), 0.05)?;
        let params = ParamsAdamW {
            lr: 0.01,
            ..Default::default()
        };
        let config = ClippedConfig::new(params.clone(), ClipSetting::norm(max_norm));
        let mut adamw_wrapped = Clipped::<AdamW>::new(c_vars.clone(), config)?;
        let mut adamw = AdamW::new(d_vars.clone(), params)?;
        for _ in 0..3 {
            let grads: Vec<Vec<f64>> = SHAPES
                .iter()
                .map(|s| random(numel(s), 100.0, &mut rng))
                .collect();
            let a_grads = store(&a_vars, &grads)?;
            sgd_wrapped.step(&a_grads)?;
            sgd.step(&store(&b_vars, &grads)?)?;
            adamw_wrapped.step(&store(&c_vars, &grads)?)?;
            adamw.step(&store(&d_vars, &grads)?)?;
            // The caller's gradients are untouched too.
            for (var, g) in a_vars.iter().zip(&grads) {
                let expect: Vec<f32> = g.iter().map(|&x| x as f32).collect();
                assert_eq!(
                    a_grads.get(var).unwrap().flatten_all()?.to_vec1::<f32>()?,
                    expect
                );
            }
        }
        for (x, y) in a_vars.iter().zip(&b_vars).chain(c_vars.iter().zip(&d_vars)) {
            assert_eq!(
                values(x)?,
                values(y)?,
                "max_norm {max_norm}: not bitwise equal"
            );
        }
        assert_eq!(sgd_wrapped.clipped_steps()?, 0);
        assert_eq!(adamw_wrapped.clipped_steps()?, 0);
    }
    Ok(())
}

#[test]
fn step_clips_the_callers_gradients_and_counts_clipped_steps() -> Result<()> {
    let w = Var::new(&[0f32, 0.], &Device::Cpu)?;
    let config = ClippedConfig::new(1.0, ClipSetting::norm(1.0));
    let mut opt = Clipped::<SGD>::new(vec![w.clone()], config)?;
    let mut expected_clipped = 0;
    for g in [
        [0.3f32, 0.4],
        [3., 4.],
        [0.6, 0.8],
        [f32::NAN, 0.],
        [30., 40.],
    ] {
        let mut grads = GradStore::default();
        grads.insert(&w, Tensor::new(&g, &Device::Cpu)?);
        // A tensor that is not a var's gradient: left alone.
        let other = Var::new(&[7f32], &Device::Cpu)?;
        grads.insert(&other, Tensor::new(&[1e6f32], &Device::Cpu)?);
        opt.step(&grads)?;
        let norm = ((g[0] as f64).powi(2) + (g[1] as f64).powi(2)).sqrt();
        let last = opt
            .last_norm()
            .unwrap()
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
        assert!((last - norm).abs() <= 1e-6 * norm || (last.is_nan() && norm.is_nan()));
        let coefficient = 1.0 / (norm + 1e-6);
        if coefficient.is_nan() || coefficient < 1.0 {
            expected_clipped += 1;
        }
        let after = grads.get(&w).unwrap().to_vec1::<f32>()?;
        if norm > 1.0 {
            let n = ((after[0] as f64).powi(2) + (after[1] as f64).powi(2)).sqrt();
            assert!(
                (n - 1.0).abs() < 1e-5,
                "caller's gradient not clipped: {after:?}"
            );
        }
        assert_eq!(grads.get(&other).unwrap().to_vec1::<f32>()?, [1e6]);
    }
    // Clipped: [3, 4], [NaN, 0] (a NaN norm counts), [30, 40], and [0.6, 0.8]: at norm 1 the
    // coefficient is 1 / (1 + 1e-6) < 1, as in PyTorch. Not clipped: [0.3, 0.4].
    assert_eq!(opt.clipped_steps()?, expected_clipped);
    assert_eq!(expected_clipped, 4);
    assert_eq!(opt.steps()?, 5);
    Ok(())
}

/// `Clipped::last_norm` is the norm the setting bounds, against f64 references: the largest
/// `|g|` for value clipping, the L2 norm for AutoClip, the setting's norm type for `Norm`. The
/// gradients are random over three vars, so L1, L2 and the largest `|g|` all differ.
#[test]
fn clipped_last_norm_is_the_norm_the_setting_bounds() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(17);
    let norm = |max_norm, norm_type| {
        ClipSetting::Norm(ClipGradNorm::new(max_norm).with_norm_type(norm_type))
    };
    for (setting, reference) in [
        (ClipSetting::value(0.5), NormType::Inf),
        (ClipSetting::AutoClip(AutoClip::default()), NormType::L2),
        (ClipSetting::AutoClip(AutoClip::new(90.0)?), NormType::L2),
        (ClipSetting::norm(0.5), NormType::L2),
        (norm(0.5, NormType::L1), NormType::L1),
        (norm(0.5, NormType::Inf), NormType::Inf),
        (norm(0.5, NormType::P(3.0)), NormType::P(3.0)),
    ] {
        let init: Vec<Vec<f64>> = SHAPES
            .iter()
            .map(|s| random(numel(s), 1.0, &mut rng))
            .collect();
        let vars = make_vars(&init)?;
        let sgd = SGD::new(vars.clone(), 0.1)?;
        let mut opt = Clipped::from_optimizer(sgd, vars.clone(), setting.clone())?;
        for step in 0..3 {
            let grads: Vec<Vec<f64>> = SHAPES
                .iter()
                .map(|s| random(numel(s), 2.0, &mut rng))
                .collect();
            opt.step(&store(&vars, &grads)?)?;
            let want = ref_norm(&as_f32(&grads), reference);
            let last = opt.last_norm().expect("a norm");
            assert_eq!(last.dtype(), DType::F32);
            let got = last.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            // The F32 norm tensor holds the norm rounded to nearest.
            assert!(
                (got - want).abs() <= want * (f64::powi(2.0, -24) + 1e-12),
                "{setting:?}, step {step}: last_norm {got} vs the {reference} norm {want}"
            );
        }
    }
    Ok(())
}

/// An infinite norm counts as clipped under every setting with a finite threshold (AutoClip's
/// once a finite norm is in its history); `last_norm` is then `inf`. A fresh AutoClip has no
/// finite threshold (`+inf`): it neither clips nor counts that step.
#[test]
fn clipped_counts_an_infinite_norm_as_clipped() -> Result<()> {
    let norm = |norm_type| ClipSetting::Norm(ClipGradNorm::new(1.0).with_norm_type(norm_type));
    for (setting, warm_up) in [
        (ClipSetting::norm(1.0), false),
        (norm(NormType::L1), false),
        (norm(NormType::Inf), false),
        (norm(NormType::P(3.0)), false),
        (ClipSetting::value(1.0), false),
        (ClipSetting::AutoClip(AutoClip::default()), true),
        (ClipSetting::AutoClip(AutoClip::new(100.0)?), true),
    ] {
        let w = Var::new(&[0f32, 0., 0.], &Device::Cpu)?;
        let mut opt =
            Clipped::<SGD>::new(vec![w.clone()], ClippedConfig::new(0.1, setting.clone()))?;
        let step = |opt: &mut Clipped<SGD>, g: [f32; 3]| -> Result<GradStore> {
            let mut grads = GradStore::default();
            grads.insert(&w, Tensor::new(&g, &Device::Cpu)?);
            opt.step(&grads)?;
            Ok(grads)
        };
        if warm_up {
            // Norm 0.05: the first norm is its own threshold; 0.05 / (0.05 + 1e-6) < 1 clips.
            step(&mut opt, [0.03, 0.04, 0.0])?;
            assert_eq!(opt.clipped_steps()?, 1, "{setting:?}: warm-up");
        }
        let before = opt.clipped_steps()?;
        let grads = step(&mut opt, [f32::INFINITY, 0.5, -0.25])?;
        let last = opt.last_norm().expect("a norm").to_scalar::<f32>()?;
        assert_eq!(last, f32::INFINITY, "{setting:?}: last_norm");
        assert_eq!(
            opt.clipped_steps()?,
            before + 1,
            "{setting:?}: an infinite norm was not counted as clipped"
        );
        // And the gradients were indeed changed.
        let g = grads.get(&w).expect("gradient").to_vec1::<f32>()?;
        assert_ne!(g[0], f32::INFINITY, "{setting:?}: {g:?}");
    }
    // A fresh AutoClip: no finite norm seen, threshold +inf: untouched and not counted.
    let w = Var::new(&[0f32, 0.], &Device::Cpu)?;
    let config = ClippedConfig::new(0.1, ClipSetting::AutoClip(AutoClip::default()));
    let mut opt = Clipped::<SGD>::new(vec![w.clone()], config)?;
    let mut grads = GradStore::default();
    grads.insert(&w, Tensor::new(&[f32::INFINITY, 1.0], &Device::Cpu)?);
    opt.step(&grads)?;
    let g = grads.get(&w).expect("gradient").to_vec1::<f32>()?;
    assert_eq!(g, [f32::INFINITY, 1.0]);
    assert_eq!((opt.steps()?, opt.clipped_steps()?), (1, 0));
    Ok(())
}

#[test]
fn bad_settings_are_refused_and_change_nothing() -> Result<()> {
    for bad in [
        ClipSetting::norm(-1.0),
        ClipSetting::norm(f64::NAN),
        ClipSetting::Norm(ClipGradNorm::new(1.0).with_norm_type(NormType::P(0.0))),
        ClipSetting::Norm(ClipGradNorm::new(1.0).with_norm_type(NormType::P(f64::INFINITY))),
        ClipSetting::value(-0.5),
        ClipSetting::value(f64::NAN),
    ] {
        let err = Clipped::<SGD>::new(vec![], ClippedConfig::new(0.1, bad.clone()));
        assert!(err.is_err(), "{bad:?} accepted");
    }
    for p in [0.0, -5.0, 100.5, f64::NAN, f64::INFINITY] {
        let err = AutoClip::new(p).unwrap_err().to_string();
        assert!(err.contains("percentile"), "{err}");
    }
    let mut autoclip = AutoClip::new(20.0)?;
    autoclip.observe(1.0);
    assert!(autoclip.clone().with_capacity(10).is_err());
    assert!(AutoClip::default().with_capacity(0).is_err());
    assert_eq!(
        (autoclip.observed(), autoclip.capacity()),
        (1, AutoClip::DEFAULT_CAPACITY)
    );

    // A refused setting keeps the old one.
    let w = Var::new(&[1f32, 1.], &Device::Cpu)?;
    let config = ClippedConfig::new(0.1, ClipSetting::AutoClip(AutoClip::default()));
    let mut opt = Clipped::<SGD>::new(vec![w.clone()], config)?;
    assert!(opt.set_clip_setting(ClipSetting::norm(-2.0)).is_err());
    assert!(matches!(opt.clip_setting(), ClipSetting::AutoClip(_)));

    // A step that fails (an integer gradient) changes no parameter, count or history.
    let mut grads = GradStore::default();
    grads.insert(&w, Tensor::new(&[1u32, 2], &Device::Cpu)?);
    assert!(opt.step(&grads).is_err());
    assert_eq!(w.to_vec1::<f32>()?, [1.0, 1.0]);
    assert_eq!((opt.steps()?, opt.clipped_steps()?), (0, 0));
    assert!(opt.last_norm().is_none());
    match opt.clip_setting() {
        ClipSetting::AutoClip(a) => assert_eq!(a.observed(), 0),
        other => panic!("setting changed to {other:?}"),
    }
    Ok(())
}

/// A gradient the inner optimizer would refuse (wrong dtype) is refused before anything changes:
/// no gradient clipped, no AutoClip history recorded, no step counted.
#[test]
fn clipped_step_refuses_bad_gradients_before_changing_anything() -> Result<()> {
    let w = Var::new(&[0f32, 0.], &Device::Cpu)?;
    let config = ClippedConfig::new(0.1, ClipSetting::AutoClip(AutoClip::default()));
    let mut opt = Clipped::<SGD>::new(vec![w.clone()], config)?;
    let mut grads = GradStore::default();
    grads.insert(&w, Tensor::new(&[30f64, 40.], &Device::Cpu)?);
    assert!(opt.step(&grads).is_err());
    let g = grads.get(&w).expect("gradient").to_vec1::<f64>()?;
    assert_eq!(g, [30.0, 40.0]);
    assert_eq!(w.to_vec1::<f32>()?, [0.0, 0.0]);
    assert_eq!(opt.steps()?, 0);
    match opt.clip_setting() {
        ClipSetting::AutoClip(autoclip) => assert_eq!(autoclip.observed(), 0),
        other => panic!("setting changed: {other:?}"),
    }
    Ok(())
}

/// `max_norm = inf` never clips, even an infinite norm: nothing written, nothing counted.
#[test]
fn clipped_with_infinite_max_norm_never_clips() -> Result<()> {
    let w = Var::new(&[0f32, 0.], &Device::Cpu)?;
    let config = ClippedConfig::new(0.0, ClipSetting::norm(f64::INFINITY));
    let mut opt = Clipped::<SGD>::new(vec![w.clone()], config)?;
    let mut grads = GradStore::default();
    grads.insert(&w, Tensor::new(&[f32::INFINITY, 3.], &Device::Cpu)?);
    opt.step(&grads)?;
    let g = grads.get(&w).expect("gradient").to_vec1::<f32>()?;
    assert_eq!(g, [f32::INFINITY, 3.0]);
    assert_eq!((opt.steps()?, opt.clipped_steps()?), (1, 0));
    Ok(())
}
