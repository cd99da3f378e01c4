//! PyTorch's state machine and its errors: bad settings refused at first use, a skip refused by
//! `max_consecutive_skips`, found-inf after `unscale_`, a partial `unscale_`, no inf checks,
//! `load_state_dict` mid-step; and a run resumed from the state dict, bitwise.

use super::*;

/// Every bad setting is accepted by its setter and refused at the first call that uses it, with
/// its name in the error.
#[test]
fn invalid_settings_are_refused_at_first_use() -> Result<()> {
    let bad: Vec<(&str, GradScaler)> = vec![
        ("init_scale", GradScaler::new().with_init_scale(0.0)),
        ("init_scale", GradScaler::new().with_init_scale(-1.0)),
        ("init_scale", GradScaler::new().with_init_scale(f64::NAN)),
        (
            "init_scale",
            GradScaler::new().with_init_scale(f64::INFINITY),
        ),
        ("init_scale", GradScaler::new().with_init_scale(1e39)), // not finite as an f32
        ("init_scale", GradScaler::new().with_init_scale(1e-50)), // zero as an f32
        ("growth_factor", GradScaler::new().with_growth_factor(1.0)),
        ("growth_factor", GradScaler::new().with_growth_factor(0.5)),
        (
            "growth_factor",
            GradScaler::new().with_growth_factor(f64::NAN),
        ),
        (
            "growth_factor",
            GradScaler::new().with_growth_factor(f64::INFINITY),
        ),
        ("backoff_factor", GradScaler::new().with_backoff_factor(0.0)),
        ("backoff_factor", GradScaler::new().with_backoff_factor(1.0)),
        (
            "backoff_factor",
            GradScaler::new().with_backoff_factor(-0.5),
        ),
        (
            "backoff_factor",
            GradScaler::new().with_backoff_factor(f64::NAN),
        ),
        ("growth_interval", GradScaler::new().with_growth_interval(0)),
    ];
    let w = Var::zeros(2, DType::F32, &Device::Cpu)?;
    for (name, scaler) in bad {
        let check = |r: Result<()>, call: &str| {
            let err = r.expect_err(call).to_string();
            assert!(err.contains(name), "{call}: `{err}` does not name {name}");
        };
        check(scaler.scale(w.as_tensor()).map(|_| ()), "scale");
        check(scaler.scale_value().map(|_| ()), "scale_value");
        let mut grads = store(from_ref(&w), &[vec![1.0, 2.0]], DType::F32)?;
        check(
            scaler.clone().unscale_(from_ref(&w), &mut grads),
            "unscale_",
        );
        assert_eq!(grads.get(&w).unwrap().to_vec1::<f32>()?, [1.0, 2.0]);
        let mut opt = FusedSgd::new(vec![w.clone()], sgd_lr(1.0))?;
        check(scaler.clone().step(&mut opt, &grads), "step");
        assert_eq!(opt.steps()?, 0);
        check(scaler.clone().update(), "update");
    }
    // The limits themselves are accepted.
    GradScaler::new()
        .with_init_scale(f32::MAX as f64)
        .with_growth_factor(1.0001)
        .with_backoff_factor(0.9999)
        .with_growth_interval(1)
        .scale_value()?;
    Ok(())
}

/// PyTorch's state machine: `unscale_` twice before `update`, `unscale_` after `step`, `step`
/// twice before `update`, `update` with nothing recorded. Each error changes nothing.
#[test]
fn state_machine_errors() -> Result<()> {
    let w = Var::zeros(2, DType::F32, &Device::Cpu)?;
    let fresh = || store(from_ref(&w), &[vec![4.0, 8.0]], DType::F32);
    let mut opt = FusedSgd::new(vec![w.clone()], sgd_lr(1.0))?;
    let mut scaler = GradScaler::new().with_init_scale(4.0);

    let err = scaler.update().unwrap_err().to_string();
    assert!(err.contains("no inf checks were recorded"), "{err}");

    let mut grads = fresh()?;
    scaler.unscale_(from_ref(&w), &mut grads)?;
    let err = scaler
        .unscale_(from_ref(&w), &mut grads)
        .unwrap_err()
        .to_string();
    assert!(err.contains("already been called"), "{err}");
    assert_eq!(
        grads.get(&w).unwrap().to_vec1::<f32>()?,
        [1.0, 2.0],
        "unscaled once"
    );

    scaler.step(&mut opt, &grads)?;
    assert_eq!(w.to_vec1::<f32>()?, [-1.0, -2.0]);
    let err = scaler
        .unscale_(from_ref(&w), &mut grads)
        .unwrap_err()
        .to_string();
    assert!(err.contains("after step"), "{err}");
    let err = scaler.step(&mut opt, &grads).unwrap_err().to_string();
    assert!(err.contains("step has already been called"), "{err}");
    assert_eq!(w.to_vec1::<f32>()?, [-1.0, -2.0], "not stepped twice");
    assert_eq!(opt.steps()?, 1);
    scaler.update()?;
    let err = scaler.update().unwrap_err().to_string();
    assert!(err.contains("no inf checks were recorded"), "{err}");

    // After update, a new round works; update after unscale_ alone is allowed (as PyTorch).
    let mut grads = fresh()?;
    scaler.unscale_(from_ref(&w), &mut grads)?;
    scaler.update()?;
    scaler.step(&mut opt, &fresh()?)?;
    scaler.update()?;
    Ok(())
}

/// `step` with a fused optimizer whose `max_consecutive_skips` refuses the skip: the error leaves
/// the scaler unscaled with found-inf recorded, so the gradients are unscaled exactly once (a
/// retry refuses again without unscaling them again) and `update` backs off; then the next step
/// goes on. For FusedSgd and FusedAdamW.
#[test]
fn refused_skip_leaves_the_scaler_consistent() -> Result<()> {
    for adamw in [false, true] {
        let w = Var::new(&[1f32, 2.0, 3.0], &Device::Cpu)?;
        let mut scaler = GradScaler::new().with_init_scale(4.0);
        let scaled = [8.0, f64::INFINITY, 4.0];
        let grads = store(from_ref(&w), &[scaled.to_vec()], DType::F32)?;
        let step = |scaler: &mut GradScaler, grads: &GradStore| -> Result<[u64; 2]> {
            if adamw {
                let mut opt = FusedAdamW::new(vec![w.clone()], ParamsAdamW::default())?
                    .with_clip(ClipSetting::norm(1.0))?
                    .with_max_consecutive_skips(0);
                let r = scaler.step(&mut opt, grads);
                r.map(|()| [0, 0]).or_else(|e| {
                    assert!(e.to_string().contains("max_consecutive_skips"), "{e}");
                    Ok([opt.steps()?, opt.skipped_steps()?])
                })
            } else {
                let mut opt = FusedSgd::new(vec![w.clone()], sgd_lr(1.0))?
                    .with_clip(ClipSetting::norm(1.0))?
                    .with_max_consecutive_skips(0);
                let r = scaler.step(&mut opt, grads);
                r.map(|()| [0, 0]).or_else(|e| {
                    assert!(e.to_string().contains("max_consecutive_skips"), "{e}");
                    Ok([opt.steps()?, opt.skipped_steps()?])
                })
            }
        };
        let once: Vec<f32> = vec![2.0, f32::INFINITY, 1.0];
        for attempt in 0..2 {
            let counts = step(&mut scaler, &grads)?;
            assert_eq!(
                counts,
                [0, 0],
                "adamw {adamw} attempt {attempt}: refused, undone"
            );
            assert_eq!(
                grads.get(&w).unwrap().to_vec1::<f32>()?,
                once,
                "adamw {adamw} attempt {attempt}: unscaled once"
            );
            assert_eq!(w.to_vec1::<f32>()?, [1.0, 2.0, 3.0]);
        }
        scaler.update()?;
        assert_eq!(scaler.scale_value()?, 2.0, "adamw {adamw}: backed off");
        // The next (finite) step works, on the one-read path or not.
        let grads = store(from_ref(&w), &[vec![0.5, 0.5, 0.5]], DType::F32)?;
        let mut opt = FusedSgd::new(vec![w.clone()], sgd_lr(1.0))?.with_max_consecutive_skips(0);
        scaler.step(&mut opt, &grads)?;
        scaler.update()?;
        assert_eq!(opt.steps()?, 1);
        assert_eq!(w.to_vec1::<f32>()?, [0.75, 1.75, 2.75]);
    }
    Ok(())
}

/// PyTorch's recipe `unscale_` -> `clip_grad_value_` -> `step` on an overflowed batch: the clip
/// makes the gradients finite, but the step follows the found-inf `unscale_` recorded: not
/// taken (vars and state unchanged), counted in `skipped_steps` and towards
/// `max_consecutive_skips`, and the scale backs off. Without `unscale_` the step decides on the
/// device as before.
#[test]
fn step_after_unscale_follows_its_found_inf() -> Result<()> {
    let w = Var::new(&[1f32, 2.0], &Device::Cpu)?;
    let mut opt = FusedAdamW::new(vec![w.clone()], ParamsAdamW::default())?
        .with_skip_nonfinite(true)
        .with_max_consecutive_skips(1);
    let mut scaler = GradScaler::new().with_init_scale(8.0);
    let overflowed = |scaler: &mut GradScaler, opt: &mut FusedAdamW| -> Result<()> {
        let mut grads = store(from_ref(&w), &[vec![f64::INFINITY, 8.0]], DType::F32)?;
        scaler.unscale_(from_ref(&w), &mut grads)?;
        clip_grad_value_(from_ref(&w), &mut grads, 0.5)?;
        assert_eq!(grads.get(&w).unwrap().to_vec1::<f32>()?, [0.5, 0.5]);
        scaler.step(opt, &grads)
    };
    let before = opt.state_dict()?;
    overflowed(&mut scaler, &mut opt)?;
    scaler.update()?;
    assert_eq!(w.to_vec1::<f32>()?, [1.0, 2.0]);
    assert_eq!((opt.steps()?, opt.skipped_steps()?), (0, 1));
    assert_eq!(scaler.scale_value()?, 4.0);
    let after = opt.state_dict()?;
    for (k, t) in &before {
        if k != "skipped_steps" {
            assert_eq!(bits(t)?, bits(&after[k])?, "{k}");
        }
    }
    // A second one in a row is beyond the limit: refused, nothing changed, and the scaler is
    // still consistent (update backs off).
    let err = overflowed(&mut scaler, &mut opt).unwrap_err().to_string();
    assert!(err.contains("max_consecutive_skips"), "{err}");
    assert_eq!((opt.steps()?, opt.skipped_steps()?), (0, 1));
    scaler.update()?;
    assert_eq!(scaler.scale_value()?, 2.0);
    // A finite step ends the run (and is not counted as a skip); a skip is allowed again.
    let mut grads = store(from_ref(&w), &[vec![2.0, 2.0]], DType::F32)?;
    scaler.unscale_(from_ref(&w), &mut grads)?;
    scaler.step(&mut opt, &grads)?;
    scaler.update()?;
    assert_eq!((opt.steps()?, opt.skipped_steps()?), (1, 1));
    overflowed(&mut scaler, &mut opt)?;
    scaler.update()?;
    assert_eq!((opt.steps()?, opt.skipped_steps()?), (1, 2));
    Ok(())
}

/// `unscale_` with part of a fused optimizer's vars, then `step`: refused (the other vars would
/// step with scaled gradients), nothing changed; with all of them it steps.
#[test]
fn step_refuses_gradients_unscale_left_scaled() -> Result<()> {
    let a = Var::new(&[1f32, 2.0], &Device::Cpu)?;
    let b = Var::new(&[3f32], &Device::Cpu)?;
    let mut opt = FusedSgd::new(vec![a.clone(), b.clone()], sgd_lr(1.0))?;
    let mut scaler = GradScaler::new().with_init_scale(4.0);
    let vars = [a.clone(), b.clone()];
    let mut grads = store(&vars, &[vec![4.0, 4.0], vec![8.0]], DType::F32)?;
    scaler.unscale_(from_ref(&a), &mut grads)?;
    let err = scaler.step(&mut opt, &grads).unwrap_err().to_string();
    assert!(err.contains("var #1 was not unscaled"), "{err}");
    assert_eq!(opt.steps()?, 0);
    assert_eq!(a.to_vec1::<f32>()?, [1.0, 2.0]);
    assert_eq!(b.to_vec1::<f32>()?, [3.0]);
    assert_eq!(grads.get(&b).unwrap().to_vec1::<f32>()?, [8.0]);
    scaler.update()?;
    let mut grads = store(&vars, &[vec![4.0, 4.0], vec![8.0]], DType::F32)?;
    scaler.unscale_(&vars, &mut grads)?;
    scaler.step(&mut opt, &grads)?;
    assert_eq!(a.to_vec1::<f32>()?, [0.0, 1.0]);
    assert_eq!(b.to_vec1::<f32>()?, [1.0]);
    Ok(())
}

/// PyTorch's "No inf checks were recorded": `step` with a fused optimizer none of whose vars has
/// a gradient (nothing changes; `update` after it fails too), `step` with a candle optimizer
/// and an empty store, and `unscale_` that found no gradient (the following `step` and `update`
/// fail; the scaler is then ready, its scale unchanged).
#[test]
fn no_inf_checks_are_errors() -> Result<()> {
    let w = Var::new(&[1f32], &Device::Cpu)?;
    let other = Var::new(&[1f32], &Device::Cpu)?;
    let grads = store(from_ref(&other), &[vec![64.0]], DType::F32)?;
    let mut scaler = GradScaler::new().with_init_scale(4.0);
    let mut opt = FusedSgd::new(vec![w.clone()], sgd_lr(1.0))?;
    let err = scaler.step(&mut opt, &grads).unwrap_err().to_string();
    assert!(err.contains("no inf checks were recorded"), "{err}");
    assert_eq!(grads.get(&other).unwrap().to_vec1::<f32>()?, [64.0]);
    assert_eq!((opt.steps()?, opt.skipped_steps()?), (0, 0));
    assert!(scaler.update().is_err());
    // A candle optimizer with an empty store.
    let mut sgd = SGD::new(vec![w.clone()], 0.1)?;
    let err = scaler
        .step(&mut sgd, &GradStore::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("no inf checks were recorded"), "{err}");
    assert!(scaler.update().is_err());
    // unscale_ with no gradient records nothing.
    let mut grads = grads;
    scaler.unscale_(from_ref(&w), &mut grads)?;
    let err = scaler.step(&mut opt, &grads).unwrap_err().to_string();
    assert!(err.contains("no inf checks were recorded"), "{err}");
    let err = scaler.update().unwrap_err().to_string();
    assert!(err.contains("no inf checks were recorded"), "{err}");
    assert_eq!((opt.steps()?, opt.skipped_steps()?), (0, 0));
    assert_eq!(scaler.scale_value()?, 4.0);
    // Ready again.
    let grads = store(from_ref(&w), &[vec![4.0]], DType::F32)?;
    scaler.step(&mut opt, &grads)?;
    scaler.update()?;
    assert_eq!(w.to_vec1::<f32>()?, [0.0]);
    Ok(())
}

/// `load_state_dict` in the middle of a step (after `unscale_` or `step`) is refused and
/// changes nothing; after `update` it loads.
#[test]
fn load_state_dict_mid_step_is_refused() -> Result<()> {
    let w = Var::new(&[1f32], &Device::Cpu)?;
    let saved = GradScaler::new().with_init_scale(2.0).state_dict()?;
    let mut scaler = GradScaler::new().with_init_scale(8.0);
    let mut grads = store(from_ref(&w), &[vec![8.0]], DType::F32)?;
    scaler.unscale_(from_ref(&w), &mut grads)?;
    let err = scaler.load_state_dict(&saved).unwrap_err().to_string();
    assert!(err.contains("in progress"), "{err}");
    let mut opt = FusedSgd::new(vec![w.clone()], sgd_lr(1.0))?;
    scaler.step(&mut opt, &grads)?;
    assert!(scaler.load_state_dict(&saved).is_err());
    assert_eq!(scaler.scale_value()?, 8.0);
    scaler.update()?;
    scaler.load_state_dict(&saved)?;
    assert_eq!(scaler.scale_value()?, 2.0);
    Ok(())
}

/// A run stopped after any step and resumed from the state dict (or a file) goes on bitwise.
#[test]
fn state_resumes_bitwise() -> Result<()> {
    let make = || {
        GradScaler::new()
            .with_init_scale(700.0)
            .with_growth_factor(1.3)
            .with_backoff_factor(0.6)
            .with_growth_interval(3)
    };
    let w = Var::zeros(4, DType::F32, &Device::Cpu)?;
    let poison = [0u8, 0, 1, 0, 0, 0, 0, 2, 0, 0, 0, 0];
    let run = |scaler: &mut GradScaler, from: usize, to: usize| -> Result<Vec<u32>> {
        let mut rng = StdRng::seed_from_u64(7);
        let mut opt = FusedSgd::new(vec![w.clone()], sgd_lr(0.0))?;
        let mut seen = vec![];
        for (k, &p) in poison.iter().enumerate().take(to) {
            let values = scaled_values(from_ref(&w), 1.0, p, &mut rng);
            if k < from {
                continue;
            }
            scaler.step(&mut opt, &store(from_ref(&w), &values, DType::F32)?)?;
            scaler.update()?;
            seen.push(scale_bits(scaler)?);
        }
        Ok(seen)
    };
    let full = run(&mut make(), 0, poison.len())?;
    let dir = std::env::temp_dir().join(format!("grad-scaler-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    for cut in 0..poison.len() {
        let mut first = make();
        let head = run(&mut first, 0, cut)?;
        let mut resumed = make();
        if cut % 2 == 0 {
            resumed.load_state_dict(&first.state_dict()?)?;
        } else {
            let path = dir.join("scaler.safetensors");
            first.save_state(&path)?;
            resumed.load_state(&path)?;
        }
        let tail = run(&mut resumed, cut, poison.len())?;
        assert_eq!([head, tail].concat(), full, "cut after {cut} steps");
    }
    std::fs::remove_dir_all(&dir)?;

    // Malformed states are refused and change nothing.
    let mut scaler = make();
    let good = make().state_dict()?;
    let dev = Device::Cpu;
    let cases: Vec<(&str, Tensor)> = vec![
        ("scale", Tensor::new(-1f32, &dev)?),
        ("scale", Tensor::new(f32::INFINITY, &dev)?),
        ("scale", Tensor::new(1f64, &dev)?),
        ("scale", Tensor::new(&[1f32], &dev)?),
        ("growth_tracker", Tensor::new(-1i64, &dev)?),
        ("growth_tracker", Tensor::new(1f32, &dev)?),
    ];
    for (key, value) in cases {
        let mut bad = good.clone();
        bad.insert(key.to_string(), value);
        let err = scaler.load_state_dict(&bad).unwrap_err().to_string();
        assert!(err.contains(key), "{err}");
    }
    let mut bad = good.clone();
    bad.insert("found_inf".into(), Tensor::new(0f32, &dev)?);
    assert!(scaler.load_state_dict(&bad).is_err());
    let mut bad = good.clone();
    bad.remove("scale");
    assert!(scaler.load_state_dict(&bad).is_err());
    assert_eq!(scaler.scale_value()?, 700.0);
    Ok(())
}
