//! The optimizer state: save, load and resume bitwise; `from_varmap` keys the state by name;
//! mismatched states are refused and change nothing.

use super::*;

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
