//! ZClip through the optimizers: `Clipped` and the fused optimizers are `ZClip::clip_` then the
//! (unclipped) step, bitwise; a step without gradients is not clipped.

use super::*;

fn random_grads(rng: &mut StdRng, vars: &[Var], scale: f64) -> Result<GradStore> {
    let mut grads = GradStore::default();
    for v in vars {
        let vals: Vec<f64> = (0..v.elem_count())
            .map(|_| scale * rng.gen_range(-1.0..1.0))
            .collect();
        grads.insert(
            v,
            Tensor::new(vals, &Device::Cpu)?
                .reshape(v.shape())?
                .to_dtype(v.dtype())?,
        );
    }
    Ok(grads)
}

fn copy_store(vars: &[Var], grads: &GradStore) -> Result<GradStore> {
    let mut out = GradStore::default();
    for v in vars {
        if let Some(g) = grads.get(v) {
            out.insert(v, g.copy()?);
        }
    }
    Ok(out)
}

fn twin_models(dtype: DType) -> Result<(Vec<Var>, Vec<Var>)> {
    let mut rng = StdRng::seed_from_u64(11);
    let shapes: [&[usize]; 3] = [&[6, 5], &[5], &[300]];
    let mut a = Vec::new();
    let mut b = Vec::new();
    for s in shapes {
        let n: usize = s.iter().product();
        let vals: Vec<f64> = (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let t = Tensor::new(vals, &Device::Cpu)?
            .reshape(s)?
            .to_dtype(dtype)?;
        a.push(Var::from_tensor(&t)?);
        b.push(Var::from_tensor(&t.copy()?)?);
    }
    Ok((a, b))
}

/// A spike every 7th step (20x), 30 steps, warm-up 5.
fn spike_scale(step: usize) -> f64 {
    if step % 7 == 6 {
        20.0
    } else {
        1.0
    }
}

/// `Clipped<SGD>` with ZClip is `ZClip::clip_` then `SGD::step`, bitwise, and counts the steps
/// ZClip clipped (the spikes after the warm-up).
#[test]
fn clipped_with_zclip_is_zclip_then_the_step() -> Result<()> {
    let (ours, theirs) = twin_models(DType::F32)?;
    let setting = ZClip::new().with_warmup_steps(5);
    let mut opt = Clipped::<SGD>::new(
        ours.clone(),
        ClippedConfig::new(0.05, ClipSetting::ZClip(setting.clone())),
    )?;
    let mut zclip = setting;
    let mut sgd = SGD::new(theirs.clone(), 0.05)?;
    let mut rng = StdRng::seed_from_u64(12);
    let mut expected_clipped = 0;
    for step in 0..30 {
        let ga = random_grads(&mut rng, &ours, spike_scale(step))?;
        let mut gb = GradStore::default();
        for (a, b) in ours.iter().zip(&theirs) {
            gb.insert(b, ga.get(a).expect("g").copy()?);
        }
        opt.step(&ga)?;
        let norm = zclip.clip_(&theirs, &mut gb)?;
        sgd.step(&gb)?;
        assert_same(
            &vars_bits(&ours)?,
            &vars_bits(&theirs)?,
            &format!("step {step}"),
        );
        assert_eq!(bits(opt.last_norm().expect("norm"))?, bits(&norm)?);
        expected_clipped += u64::from(zclip.last_coefficient()? < Some(1.0));
    }
    assert!(
        expected_clipped >= 3,
        "the spikes after the warm-up are clipped"
    );
    assert_eq!(opt.clipped_steps()?, expected_clipped);
    let ClipSetting::ZClip(inner) = opt.clip_setting() else {
        panic!("the setting is kept")
    };
    assert_eq!(inner.statistics()?, zclip.statistics()?);
    Ok(())
}

/// The fused optimizers with ZClip folded in are `ZClip::clip_` then the unclipped fused step,
/// bitwise (F32 and F64), on the CPU and under the emulation; `clipped_steps` and `last_norm`
/// follow ZClip; a NaN step is skipped with `skip_nonfinite` and leaves the statistics alone.
#[test]
fn fused_optimizers_with_zclip_are_zclip_then_the_step() -> Result<()> {
    for dtype in [DType::F32, DType::F64] {
        for emulated in [false, true] {
            for adamw in [true, false] {
                let what = format!("{dtype:?} emulated {emulated} adamw {adamw}");
                let (ours, theirs) = twin_models(dtype)?;
                let setting = ZClip::new().with_warmup_steps(5);
                let mut zclip = setting.clone();
                let (mut fused, mut plain): (Box<dyn StepWith>, Box<dyn StepWith>) = if adamw {
                    let p = ParamsAdamW {
                        lr: 0.01,
                        ..Default::default()
                    };
                    (
                        Box::new(
                            FusedAdamW::new(ours.clone(), p.clone())?
                                .with_clip(ClipSetting::ZClip(setting))?
                                .with_skip_nonfinite(true),
                        ),
                        Box::new(FusedAdamW::new(theirs.clone(), p)?.with_skip_nonfinite(true)),
                    )
                } else {
                    let p = ParamsSgd {
                        lr: 0.05,
                        momentum: 0.9,
                        ..Default::default()
                    };
                    (
                        Box::new(
                            FusedSgd::new(ours.clone(), p.clone())?
                                .with_clip(ClipSetting::ZClip(setting))?
                                .with_skip_nonfinite(true),
                        ),
                        Box::new(FusedSgd::new(theirs.clone(), p)?.with_skip_nonfinite(true)),
                    )
                };
                let mut rng = StdRng::seed_from_u64(13);
                let mut clipped = 0;
                for step in 0..30 {
                    let mut ga = random_grads(&mut rng, &ours, spike_scale(step))?;
                    if step == 9 {
                        // A NaN step: skipped by both, the statistics untouched.
                        ga.insert(
                            &ours[1],
                            Tensor::full(f64::NAN, 5, &Device::Cpu)?.to_dtype(dtype)?,
                        );
                    }
                    let mut gb = GradStore::default();
                    for (a, b) in ours.iter().zip(&theirs) {
                        gb.insert(b, ga.get(a).expect("g").copy()?);
                    }
                    let before = zclip.state_dict()?;
                    let run = |f: &mut dyn FnMut() -> Result<()>| -> Result<()> {
                        if emulated {
                            KernelEmulation::new().grid(5).run(f)?;
                            Ok(())
                        } else {
                            f()
                        }
                    };
                    run(&mut || fused.take(&ga))?;
                    if step == 9 {
                        // What ZClip::clip_ would do to the statistics: nothing (NaN norm).
                        let probe = zclip
                            .clone()
                            .clip_(&theirs, &mut copy_store(&theirs, &gb)?)?;
                        assert!(probe.to_dtype(DType::F64)?.to_scalar::<f64>()?.is_nan());
                        assert_eq!(
                            fused.zclip().state_dict()?["mean"]
                                .to_scalar::<f64>()?
                                .to_bits(),
                            before["mean"].to_scalar::<f64>()?.to_bits()
                        );
                    } else {
                        // Under the same back end: the kernels' norm is not bitwise the CPU's.
                        run(&mut || zclip.clip_(&theirs, &mut gb).map(|_| ()))?;
                        clipped += u64::from(zclip.last_coefficient()? < Some(1.0));
                    }
                    run(&mut || plain.take(&gb))?;
                    let what = format!("{what} step {step}");
                    assert_same(&vars_bits(&ours)?, &vars_bits(&theirs)?, &what);
                    assert_eq!(fused.state()?, plain.state()?, "{what}: state");
                }
                assert!(clipped >= 3, "{what}");
                assert_eq!(fused.counts()?, (29, clipped, 1), "{what}: counts");
                assert_eq!(
                    fused.zclip().statistics()?,
                    zclip.statistics()?,
                    "{what}: statistics"
                );
            }
        }
    }
    Ok(())
}

/// What the fused test needs of both optimizers.
trait StepWith {
    fn take(&mut self, grads: &GradStore) -> Result<()>;
    fn state(&self) -> Result<Vec<(String, Vec<u64>)>>;
    fn counts(&self) -> Result<(u64, u64, u64)>;
    fn zclip(&self) -> &ZClip;
}

macro_rules! step_with {
    ($ty:ty) => {
        impl StepWith for $ty {
            fn take(&mut self, grads: &GradStore) -> Result<()> {
                self.step(grads)
            }
            fn state(&self) -> Result<Vec<(String, Vec<u64>)>> {
                let mut dict = self.state_dict()?;
                dict.remove("clipped_steps");
                state_bits(&dict)
            }
            fn counts(&self) -> Result<(u64, u64, u64)> {
                Ok((self.steps()?, self.clipped_steps()?, self.skipped_steps()?))
            }
            fn zclip(&self) -> &ZClip {
                match self.clip_setting() {
                    Some(ClipSetting::ZClip(z)) => z,
                    _ => panic!("no ZClip"),
                }
            }
        }
    };
}
step_with!(FusedAdamW);
step_with!(FusedSgd);

/// `Clipped` with ZClip: a step without any gradient leaves the statistics alone and is not
/// counted as clipped (the last step's coefficient is not reused).
#[test]
fn an_empty_step_is_not_clipped() -> Result<()> {
    let w = Var::new(&[0f32, 0.], &Device::Cpu)?;
    let setting = ZClip::new().with_warmup_steps(1).with_max_grad_norm(1.0);
    let mut opt = Clipped::<SGD>::new(
        vec![w.clone()],
        ClippedConfig::new(0.1, ClipSetting::ZClip(setting)),
    )?;
    let mut grads = GradStore::default();
    grads.insert(&w, Tensor::new(&[30f32, 40.], &Device::Cpu)?);
    opt.step(&grads)?; // warm-up step, capped by max_grad_norm: clipped
    assert_eq!(opt.clipped_steps()?, 1);
    let before = match opt.clip_setting() {
        ClipSetting::ZClip(z) => z.state_dict()?,
        _ => unreachable!(),
    };
    opt.step(&GradStore::default())?;
    assert_eq!((opt.steps()?, opt.clipped_steps()?), (2, 1));
    let ClipSetting::ZClip(z) = opt.clip_setting() else {
        unreachable!()
    };
    assert_eq!(
        bits(&z.state_dict()?["mean"])?,
        bits(&before["mean"])?,
        "statistics untouched"
    );
    Ok(())
}
