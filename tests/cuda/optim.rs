//! The fused optimizers on the GPU: bitwise candle's, the folded clip bitwise clip then step, the
//! emulation's steps bit for bit, a non-finite step skipped on the device, and no synchronisation.

use super::*;

/// `FusedAdamW` on CUDA is bitwise `candle_nn::AdamW` on CUDA (candle's affine kernel is one fma;
/// the fused kernel spells the same fma), `FusedSgd` without momentum bitwise `candle_nn::SGD`.
#[test]
fn fused_optimizers_are_bitwise_candles_on_the_gpu() -> Result<()> {
    use candle_grad_clip::{FusedAdamW, FusedSgd, ParamsSgd};
    use candle_nn::{AdamW, Optimizer, ParamsAdamW, SGD};
    let dev = cuda_or_skip!("fused_optimizers_are_bitwise_candles_on_the_gpu");
    let mut rng = StdRng::seed_from_u64(21);
    for dtype in [DType::F32, DType::F64] {
        let params = ParamsAdamW {
            lr: 0.01,
            weight_decay: 0.1,
            ..Default::default()
        };
        let (ours, theirs) = optimizer_vars(&mut rng, dtype, &dev)?;
        let mut fused = FusedAdamW::new(ours.clone(), params.clone())?;
        let mut reference = AdamW::new(theirs.clone(), params)?;
        for step in 0..20 {
            let (ga, gb) = optimizer_grads(&mut rng, &ours, &theirs, 1.0)?;
            fused.step(&ga)?;
            reference.step(&gb)?;
            assert!(
                all_bits_equal(&ours, &theirs)?,
                "AdamW {dtype:?} step {step}"
            );
        }
        let (ours, theirs) = optimizer_vars(&mut rng, dtype, &dev)?;
        let mut fused = FusedSgd::new(
            ours.clone(),
            ParamsSgd {
                lr: 0.1,
                ..Default::default()
            },
        )?;
        let mut reference = SGD::new(theirs.clone(), 0.1)?;
        for step in 0..5 {
            let (ga, gb) = optimizer_grads(&mut rng, &ours, &theirs, 1.0)?;
            fused.step(&ga)?;
            reference.step(&gb)?;
            assert!(all_bits_equal(&ours, &theirs)?, "SGD {dtype:?} step {step}");
        }
    }
    Ok(())
}

/// The folded clip is bitwise `Clipped<AdamW>` (clip_grad_norm_ on the GPU, then candle's AdamW
/// on the GPU), norm and clipped-step count included.
#[test]
fn folded_clip_is_clip_then_step_on_the_gpu() -> Result<()> {
    use candle_grad_clip::{ClipSetting, Clipped, ClippedConfig, FusedAdamW};
    use candle_nn::{AdamW, Optimizer, ParamsAdamW};
    let dev = cuda_or_skip!("folded_clip_is_clip_then_step_on_the_gpu");
    let mut rng = StdRng::seed_from_u64(22);
    for dtype in [DType::F32, DType::F64] {
        for setting in [ClipSetting::norm(0.5), ClipSetting::value(0.05)] {
            let params = ParamsAdamW {
                lr: 0.01,
                ..Default::default()
            };
            let (ours, theirs) = optimizer_vars(&mut rng, dtype, &dev)?;
            let mut fused =
                FusedAdamW::new(ours.clone(), params.clone())?.with_clip(setting.clone())?;
            let mut reference =
                Clipped::<AdamW>::new(theirs.clone(), ClippedConfig::new(params, setting.clone()))?;
            for step in 0..8 {
                let (ga, gb) = optimizer_grads(
                    &mut rng,
                    &ours,
                    &theirs,
                    if step % 3 == 2 { 30.0 } else { 1.0 },
                )?;
                fused.step(&ga)?;
                reference.step(&gb)?;
                assert!(
                    all_bits_equal(&ours, &theirs)?,
                    "{dtype:?} {setting:?} step {step}"
                );
                let (a, b) = (
                    fused.last_norm().expect("norm"),
                    reference.last_norm().expect("norm"),
                );
                assert_eq!(
                    scalar(a)?.to_bits(),
                    scalar(b)?.to_bits(),
                    "{dtype:?} {setting:?}: norm"
                );
            }
            assert_eq!(fused.clipped_steps()?, reference.clipped_steps()?);
        }
    }
    Ok(())
}

/// The GPU's fused steps are the emulation's, bit for bit (every dtype, both rules, a clip), and
/// a step whose gradients hold a NaN is skipped on the device.
#[test]
fn fused_steps_match_the_emulation_and_skip_on_the_device() -> Result<()> {
    use candle_grad_clip::{ClipSetting, FusedAdamW, FusedSgd, ParamsSgd};
    use candle_nn::{Optimizer, ParamsAdamW};
    let dev = cuda_or_skip!("fused_steps_match_the_emulation_and_skip_on_the_device");
    let mut rng = StdRng::seed_from_u64(23);
    for dtype in DTYPES {
        for sgd in [false, true] {
            let (gpu_vars, _) = optimizer_vars(&mut rng, dtype, &dev)?;
            let cpu_vars: Vec<Var> = gpu_vars
                .iter()
                .map(|v| Var::from_tensor(&v.as_tensor().to_device(&Device::Cpu)?))
                .collect::<Result<_>>()?;
            macro_rules! make {
                ($vars:expr) => {{
                    let o: Box<dyn FnMut(&GradStore) -> Result<()>> = if sgd {
                        let mut o = FusedSgd::new(
                            $vars.clone(),
                            ParamsSgd {
                                lr: 0.05,
                                momentum: 0.9,
                                nesterov: true,
                                ..Default::default()
                            },
                        )?
                        .with_clip(ClipSetting::norm(0.5))?
                        .with_skip_nonfinite(true);
                        Box::new(move |g| o.step(g))
                    } else {
                        let mut o = FusedAdamW::new(
                            $vars.clone(),
                            ParamsAdamW {
                                lr: 0.01,
                                ..Default::default()
                            },
                        )?
                        .with_clip(ClipSetting::value(0.05))?
                        .with_skip_nonfinite(true);
                        Box::new(move |g| o.step(g))
                    };
                    o
                }};
            }
            let mut on_gpu = make!(gpu_vars);
            let mut emulated = make!(cpu_vars);
            for step in 0..6 {
                let (mut gg, _) = optimizer_grads(&mut rng, &gpu_vars, &gpu_vars, 1.0)?;
                if step == 3 {
                    let v = &gpu_vars[2];
                    let mut g = random_values(&mut rng, v.elem_count(), 1.0);
                    g[123] = f64::NAN;
                    gg.insert(v, tensor(&g, v.dims(), dtype, &dev)?);
                }
                let mut gc = GradStore::default();
                for (gv, cv) in gpu_vars.iter().zip(&cpu_vars) {
                    gc.insert(cv, gg.get(gv).expect("grad").to_device(&Device::Cpu)?);
                }
                let before = gpu_vars
                    .iter()
                    .map(|v| values(v.as_tensor()))
                    .collect::<Result<Vec<_>>>()?;
                on_gpu(&gg)?;
                KernelEmulation::new().run(|| emulated(&gc))?;
                for (i, (g, c)) in gpu_vars.iter().zip(&cpu_vars).enumerate() {
                    assert!(
                        bits_equal(&values(g.as_tensor())?, &values(c.as_tensor())?),
                        "{dtype:?} sgd {sgd} step {step} var {i}: GPU and emulation differ"
                    );
                    if step == 3 {
                        assert!(
                            bits_equal(&values(g.as_tensor())?, &before[i]),
                            "the NaN step was not skipped"
                        );
                    }
                }
            }
        }
    }
    Ok(())
}

/// A clipped, skip-checking fused step does not wait for the device, for the clips that promise
/// it: a norm, ZClip (its statistics updated by a kernel) and AGC (folded in).
#[test]
fn fused_steps_do_not_synchronise() -> Result<()> {
    use candle_grad_clip::{ClipSetting, FusedAdamW};
    use candle_nn::{Optimizer, ParamsAdamW};
    let dev = cuda_or_skip!("fused_steps_do_not_synchronise");
    let mut rng = StdRng::seed_from_u64(24);
    let (vars, _) = optimizer_vars(&mut rng, DType::F32, &dev)?;
    let (grads, _) = optimizer_grads(&mut rng, &vars, &vars, 1.0)?;
    let a = Tensor::ones((4096, 4096), DType::F32, &dev)?;
    for setting in [
        ClipSetting::norm(1.0),
        ClipSetting::ZClip(ZClip::new().with_warmup_steps(1)),
        ClipSetting::agc(0.01),
    ] {
        let what = format!("{setting:?}");
        let mut opt = FusedAdamW::new(vars.clone(), ParamsAdamW::default())?
            .with_clip(setting)?
            .with_skip_nonfinite(true);
        opt.step(&grads)?; // warm up: module load, scratch
        returns_before_the_device(&dev, &a, &format!("{what}: the fused step"), || {
            opt.step(&grads)
        })?;
    }
    Ok(())
}
