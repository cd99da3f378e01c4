//! GradScaler's one-read path on the GPU: bitwise the CPU twin's, and a scaled step does not
//! synchronise.

use super::*;

/// The same values bit for bit, any NaN matching any NaN (BF16 NaN payloads differ).
fn same_or_both_nan(a: &[f64], b: &[f64]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()))
}

/// GradScaler's one-read path on the GPU (the reduction and `grad_clip_fused_step` unscale each
/// element as they read it, `inv_scale` read from device memory, found-inf from the control
/// tensor on the device) is bitwise the CPU twin's: vars, counters, the unscaled gradients written
/// back, the norm and the scale after `update`, for F32, F64 and BF16, NaN and ±inf steps, norm
/// (L2 on dyadic values, Inf) and value clips, FusedAdamW and FusedSgd.
#[test]
fn grad_scaler_one_read_path_on_the_gpu_is_the_cpus() -> Result<()> {
    use candle_grad_clip::{
        ClipGradNorm, ClipSetting, FusedAdamW, FusedSgd, GradScaler, ParamsSgd,
    };
    use candle_nn::{Optimizer, ParamsAdamW};
    let dev = cuda_or_skip!("grad_scaler_one_read_path_on_the_gpu_is_the_cpus");
    let clips: [(Option<ClipSetting>, bool); 4] = [
        (None, false),
        (Some(ClipSetting::value(0.5)), false),
        (
            Some(ClipSetting::Norm(
                ClipGradNorm::new(0.4).with_norm_type(NormType::Inf),
            )),
            false,
        ),
        (Some(ClipSetting::norm(5.0)), true),
    ];
    let mut rng = StdRng::seed_from_u64(60);
    for dtype in [DType::F32, DType::F64, DType::BF16] {
        for (c, (clip, dyadic)) in clips.iter().enumerate() {
            for adamw in [true, false] {
                let what = format!("{dtype:?} {clip:?} adamw {adamw}");
                let (g, _) = optimizer_vars(&mut rng, dtype, &dev)?;
                let h: Vec<Var> = g
                    .iter()
                    .map(|v| Var::from_tensor(&v.as_tensor().to_device(&Device::Cpu)?))
                    .collect::<Result<_>>()?;
                type Step = Box<dyn FnMut(&mut GradScaler, &GradStore) -> Result<[u64; 3]>>;
                type Norm = Box<dyn Fn() -> Option<Tensor>>;
                let build = |vars: &[Var]| -> Result<(Step, Norm)> {
                    if adamw {
                        let mut opt = FusedAdamW::new(vars.to_vec(), ParamsAdamW::default())?;
                        if let Some(clip) = clip {
                            opt = opt.with_clip(clip.clone())?;
                        }
                        let opt = std::rc::Rc::new(std::cell::RefCell::new(opt));
                        let o = opt.clone();
                        Ok((
                            Box::new(move |s: &mut GradScaler, gs: &GradStore| {
                                let mut opt = opt.borrow_mut();
                                s.step(&mut *opt, gs)?;
                                Ok([opt.steps()?, opt.clipped_steps()?, opt.skipped_steps()?])
                            }),
                            Box::new(move || o.borrow().last_norm().cloned()),
                        ))
                    } else {
                        let params = ParamsSgd {
                            lr: 0.1,
                            momentum: 0.9,
                            ..Default::default()
                        };
                        let mut opt = FusedSgd::new(vars.to_vec(), params)?;
                        if let Some(clip) = clip {
                            opt = opt.with_clip(clip.clone())?;
                        }
                        let opt = std::rc::Rc::new(std::cell::RefCell::new(opt));
                        let o = opt.clone();
                        Ok((
                            Box::new(move |s: &mut GradScaler, gs: &GradStore| {
                                let mut opt = opt.borrow_mut();
                                s.step(&mut *opt, gs)?;
                                Ok([opt.steps()?, opt.clipped_steps()?, opt.skipped_steps()?])
                            }),
                            Box::new(move || o.borrow().last_norm().cloned()),
                        ))
                    }
                };
                let ((mut step_g, norm_g), (mut step_h, norm_h)) = (build(&g)?, build(&h)?);
                let init = if *dyadic { 512.0 } else { 1000.0 };
                let mut scaler_g = GradScaler::new()
                    .with_init_scale(init)
                    .with_growth_interval(2);
                let mut scaler_h = scaler_g.clone();
                for step in 0..5 {
                    let poison = [0u8, 1, 0, 2, 3][(step + c) % 5];
                    let all = common::scaled_values(
                        &g,
                        scaler_h.scale_value()?,
                        *dyadic,
                        poison,
                        &mut rng,
                    );
                    let (mut gg, mut gh) = (GradStore::default(), GradStore::default());
                    for ((vg, vh), vals) in g.iter().zip(&h).zip(&all) {
                        gg.insert(vg, tensor(vals, vg.dims(), dtype, &dev)?);
                        gh.insert(vh, tensor(vals, vh.dims(), dtype, &Device::Cpu)?);
                    }
                    let counts_g = step_g(&mut scaler_g, &gg)?;
                    let counts_h = step_h(&mut scaler_h, &gh)?;
                    let what = format!("{what} step {step} poison {poison}");
                    assert!(all_bits_equal(&g, &h)?, "{what}: vars");
                    assert_eq!(counts_g, counts_h, "{what}: counters");
                    for (vg, vh) in g.iter().zip(&h) {
                        let (x, y) = (values(gg.get(vg).unwrap())?, values(gh.get(vh).unwrap())?);
                        assert!(same_or_both_nan(&x, &y), "{what}: gradients written back");
                    }
                    match (norm_g(), norm_h()) {
                        (Some(x), Some(y)) => {
                            assert!(same_or_both_nan(&values(&x)?, &values(&y)?), "{what}: norm")
                        }
                        (None, None) => {}
                        other => panic!("{what}: norms {other:?}"),
                    }
                    scaler_g.update()?;
                    scaler_h.update()?;
                    assert_eq!(
                        scaler_g.scale_value()?.to_bits(),
                        scaler_h.scale_value()?.to_bits(),
                        "{what}: scale"
                    );
                }
            }
        }
    }
    Ok(())
}

/// A scaled step on the one-read path enqueues its work and returns: no host read of the scale,
/// of found-inf or of the skip count.
#[test]
fn grad_scaler_steps_do_not_synchronise() -> Result<()> {
    use candle_grad_clip::{ClipSetting, FusedAdamW, GradScaler};
    use candle_nn::{Optimizer, ParamsAdamW};
    let dev = cuda_or_skip!("grad_scaler_steps_do_not_synchronise");
    let mut rng = StdRng::seed_from_u64(61);
    let (vars, _) = optimizer_vars(&mut rng, DType::F32, &dev)?;
    let (grads, _) = optimizer_grads(&mut rng, &vars, &vars, 1000.0)?;
    let a = Tensor::ones((4096, 4096), DType::F32, &dev)?;
    for setting in [
        None,
        Some(ClipSetting::norm(1.0)),
        Some(ClipSetting::value(0.1)),
    ] {
        let what = format!("{setting:?}");
        let mut opt = FusedAdamW::new(vars.clone(), ParamsAdamW::default())?;
        if let Some(s) = setting {
            opt = opt.with_clip(s)?;
        }
        let mut scaler = GradScaler::new().with_init_scale(1000.0);
        scaler.step(&mut opt, &grads)?; // warm up: module load, scratch, the scaler's state
        scaler.update()?;
        returns_before_the_device(&dev, &a, &format!("{what}: the scaled step"), || {
            scaler.step(&mut opt, &grads)
        })?;
        scaler.update()?;
    }
    Ok(())
}
