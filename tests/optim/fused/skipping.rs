//! Skipping non-finite steps in the fused optimizers: a skipped step changes nothing and the run
//! goes on as without it; without `skip_nonfinite` a NaN step is taken.

use super::*;

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
                    let opt = FusedAdamW::new(vars, params.clone())?.with_skip_nonfinite(true);
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
