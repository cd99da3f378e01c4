//! Under the kernel emulation (several grids and block orders): the fused path, `unscale_` and the
//! one-read path bitwise the CPU's; the launches of a scaled step.

use super::*;
use candle_grad_clip::ClipGradNorm;

/// Under the kernel emulation (several grids and block orders), the fused path without a clip
/// and with value clipping gives the CPU's results bit for bit.
#[test]
fn emulated_fused_path_equals_the_cpu() -> Result<()> {
    for (case, order) in ORDERS.iter().enumerate() {
        let grid = [1, 3, 7, 64][case];
        let emulation = KernelEmulation::new().grid(grid).block_order(*order);
        let mut rng = StdRng::seed_from_u64(20 + case as u64);
        let shapes: [&[usize]; 3] = [&[40, 33], &[33], &[4099]];
        let a = f32_vars(&shapes, &mut rng)?;
        let b: Vec<Var> = a
            .iter()
            .map(|v| Var::from_tensor(&v.as_tensor().copy()?))
            .collect::<Result<_>>()?;
        // (A norm clip is not compared: the kernels' norm is not bitwise the CPU's, see
        // tests/emulation/fused_step.rs.)
        let mut emulated = FusedAdamW::new(a.clone(), ParamsAdamW::default())?;
        let mut cpu = FusedAdamW::new(b.clone(), ParamsAdamW::default())?;
        if case % 2 == 1 {
            emulated = emulated.with_clip(ClipSetting::value(0.01))?;
            cpu = cpu.with_clip(ClipSetting::value(0.01))?;
        }
        let mut scaler_e = GradScaler::new()
            .with_init_scale(512.0)
            .with_growth_interval(2);
        let mut scaler_c = scaler_e.clone();
        for step in 0..5 {
            let poison = [0u8, 1, 0, 0, 2][step];
            let values = scaled_values(&a, 512.0, poison, &mut rng);
            let ge = store(&a, &values, DType::F32)?;
            let gc = store(&b, &values, DType::F32)?;
            let ((), log) = emulation.run(|| {
                scaler_e.step(&mut emulated, &ge)?;
                scaler_e.update()
            })?;
            assert!(common::kernels(&log).contains(&"grad_clip_fused_step"));
            scaler_c.step(&mut cpu, &gc)?;
            scaler_c.update()?;
            let what = format!("grid {grid} {order:?} step {step}");
            assert_eq!(vars_bits(&a)?, vars_bits(&b)?, "{what}");
            assert_eq!(scale_bits(&scaler_e)?, scale_bits(&scaler_c)?, "{what}");
        }
        assert_eq!(emulated.skipped_steps()?, 2);
        assert_eq!(cpu.skipped_steps()?, 2);
    }
    Ok(())
}

/// Under the kernel emulation (the path of CUDA: each gradient unscaled and written back in
/// turn when no two share a storage, all at once otherwise), `unscale_` gives the CPU's values
/// and found-inf bit for bit, for F32, F64 and BF16, with NaN, infinities, empty gradients and
/// gradients sharing a storage. (The memory saved is not observable here.)
#[test]
fn emulated_unscale_equals_the_cpu() -> Result<()> {
    for (case, order) in ORDERS.iter().enumerate() {
        let emulation = KernelEmulation::new()
            .grid([1, 3, 7, 64][case])
            .block_order(*order);
        for (d, dtype) in [DType::F32, DType::F64, DType::BF16]
            .into_iter()
            .enumerate()
        {
            let mut rng = StdRng::seed_from_u64(300 + (case * 3 + d) as u64);
            let shapes: [&[usize]; 4] = [&[40, 33], &[0], &[33], &[4099]];
            for poison in 0..3u8 {
                for shared in [false, true] {
                    let vars = f32_vars(&shapes, &mut rng)?;
                    let values = scaled_values(&vars, 1000.0, poison, &mut rng);
                    let (mut ge, mut gc) =
                        (store(&vars, &values, dtype)?, store(&vars, &values, dtype)?);
                    if shared {
                        // The second and third var share the first one's storage.
                        for g in [&mut ge, &mut gc] {
                            let first = g.get(&vars[0]).unwrap().clone();
                            g.insert(&vars[1], first.flatten_all()?.narrow(0, 0, 0)?);
                            g.insert(&vars[2], first.flatten_all()?.narrow(0, 0, 33)?);
                        }
                    }
                    let mut scaler_e = GradScaler::new().with_init_scale(1000.0);
                    let mut scaler_c = scaler_e.clone();
                    let ((), _) = emulation.run(|| scaler_e.unscale_(&vars, &mut ge))?;
                    scaler_c.unscale_(&vars, &mut gc)?;
                    let what = format!("case {case} {dtype:?} poison {poison} shared {shared}");
                    for v in &vars {
                        assert_eq!(
                            bits(ge.get(v).unwrap())?,
                            bits(gc.get(v).unwrap())?,
                            "{what}"
                        );
                    }
                    scaler_e.update()?;
                    scaler_c.update()?;
                    assert_eq!(scale_bits(&scaler_e)?, scale_bits(&scaler_c)?, "{what}");
                }
            }
        }
    }
    Ok(())
}

/// `x` and `y` hold the same values bit for bit, but that any NaN may be any NaN (the payload of a
/// NaN rounded to BF16 differs between `half` on the CPU and `__double2bfloat16` on the GPU).
fn assert_same_values(x: &Tensor, y: &Tensor, what: &str) -> Result<()> {
    let (x, y) = (common::vals(x)?, common::vals(y)?);
    assert_eq!(x.len(), y.len(), "{what}: lengths");
    for (k, (u, v)) in x.iter().zip(&y).enumerate() {
        assert!(
            u.to_bits() == v.to_bits() || (u.is_nan() && v.is_nan()),
            "{what}: [{k}] {u:e} vs {v:e}"
        );
    }
    Ok(())
}

/// A fused optimizer behind a scaler, for the emulated one-read path's test: its step, its last
/// norm, `[steps, clipped, skipped]` and its state dict.
trait ScaledFused {
    fn scaled_step(&mut self, scaler: &mut GradScaler, grads: &GradStore) -> Result<()>;
    fn norm(&self) -> Option<Tensor>;
    fn counts(&self) -> Result<[u64; 3]>;
    fn state(&self) -> Result<std::collections::HashMap<String, Tensor>>;
}

macro_rules! impl_scaled_fused {
    ($ty:ty) => {
        impl ScaledFused for $ty {
            fn scaled_step(&mut self, scaler: &mut GradScaler, grads: &GradStore) -> Result<()> {
                scaler.step(self, grads)
            }
            fn norm(&self) -> Option<Tensor> {
                self.last_norm().cloned()
            }
            fn counts(&self) -> Result<[u64; 3]> {
                Ok([self.steps()?, self.clipped_steps()?, self.skipped_steps()?])
            }
            fn state(&self) -> Result<std::collections::HashMap<String, Tensor>> {
                self.state_dict()
            }
        }
    };
}
impl_scaled_fused!(FusedAdamW);
impl_scaled_fused!(FusedSgd);

/// GradScaler's one-read path in the kernels: under the kernel emulation (several grids and block
/// orders), `step` without `unscale_` (the reduction and `grad_clip_fused_step` unscale each
/// element as they read it, `inv_scale` read from device memory, found-inf taken from the control
/// tensor on the device) equals the CPU twin's one-read path bit for bit, step after step: vars,
/// optimizer state, `[steps, clipped, skipped]`, the unscaled gradients written back into the
/// store, the norm, and found-inf (through the scale and the growth tracker after `update`); for
/// F32, F64 and BF16, steps with a NaN, +inf or -inf, no clip, value clips and norm clips (L2, L1,
/// Inf, p = 3), FusedAdamW and FusedSgd with momentum. The kernels add other partials than the
/// CPU (`backend::kernels`), so the norm clips whose norm is a sum (all but Inf) take gradients
/// whose unscaled values are small dyadic numbers (every partial sum exact, the scale a power of
/// two); the others take arbitrary values and a scale (1000) whose inverse rounds.
#[test]
fn emulated_one_read_path_equals_the_cpus() -> Result<()> {
    use candle_grad_clip::NormType;
    // (clip, dyadic values)
    let clips: Vec<(Option<ClipSetting>, bool)> = vec![
        (None, false),
        (Some(ClipSetting::value(0.5)), false),
        (
            Some(ClipSetting::Norm(
                ClipGradNorm::new(0.4).with_norm_type(NormType::Inf),
            )),
            false,
        ),
        (Some(ClipSetting::norm(5.0)), true),
        (
            Some(ClipSetting::Norm(
                ClipGradNorm::new(500.0).with_norm_type(NormType::L1),
            )),
            true,
        ),
        (
            Some(ClipSetting::Norm(
                ClipGradNorm::new(2.0).with_norm_type(NormType::P(3.0)),
            )),
            true,
        ),
    ];
    let shapes: [&[usize]; 5] = [&[40, 130], &[257], &[1], &[0], &[4099]];
    for (case, dtype) in [DType::F32, DType::F64, DType::BF16]
        .into_iter()
        .enumerate()
    {
        for (c, (clip, dyadic)) in clips.iter().enumerate() {
            let k = case * clips.len() + c;
            let (grid, order) = ([1, 3, 7, 64][k % 4], ORDERS[(k / 4 + k) % 4]);
            let emulation = KernelEmulation::new()
                .grid(grid)
                .block_order(order)
                .seed(k as u64);
            let mut rng = StdRng::seed_from_u64(300 + k as u64);
            let a: Vec<Var> = shapes
                .iter()
                .map(|s| {
                    let n: usize = s.iter().product();
                    let v: Vec<f64> = (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect();
                    Var::from_tensor(
                        &Tensor::from_vec(v, s.to_vec(), &Device::Cpu)?.to_dtype(dtype)?,
                    )
                })
                .collect::<Result<_>>()?;
            let b: Vec<Var> = a
                .iter()
                .map(|v| Var::from_tensor(&v.as_tensor().copy()?))
                .collect::<Result<_>>()?;
            let adamw = k % 2 == 0;
            let build = |vars: &[Var]| -> Result<Box<dyn ScaledFused>> {
                if adamw {
                    let mut opt = FusedAdamW::new(vars.to_vec(), ParamsAdamW::default())?;
                    if let Some(clip) = clip {
                        opt = opt.with_clip(clip.clone())?;
                    }
                    Ok(Box::new(opt))
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
                    Ok(Box::new(opt))
                }
            };
            let (mut emulated, mut cpu) = (build(&a)?, build(&b)?);
            let init = if *dyadic { 512.0 } else { 1000.0 };
            let mut scaler_e = GradScaler::new()
                .with_init_scale(init)
                .with_growth_interval(2);
            let mut scaler_c = scaler_e.clone();
            for step in 0..6 {
                let poison = [0u8, 1, 0, 0, 2, 3][step];
                let values =
                    common::scaled_values(&a, scaler_e.scale_value()?, *dyadic, poison, &mut rng);
                let ge = store(&a, &values, dtype)?;
                let gc = store(&b, &values, dtype)?;
                let ((), log) = emulation.run(|| emulated.scaled_step(&mut scaler_e, &ge))?;
                let launched = common::kernels(&log);
                assert_eq!(launched.last(), Some(&"grad_clip_fused_step"));
                assert!(!launched.contains(&"grad_clip_apply"), "{launched:?}");
                cpu.scaled_step(&mut scaler_c, &gc)?;
                let what = format!(
                    "{dtype:?} {clip:?} adamw {adamw} grid {grid} {order:?} step {step} poison {poison}"
                );
                assert_eq!(vars_bits(&a)?, vars_bits(&b)?, "{what}: vars");
                let (se, sc) = (emulated.state()?, cpu.state()?);
                assert_eq!(se.len(), sc.len(), "{what}");
                for (key, t) in &se {
                    assert_eq!(bits(t)?, bits(&sc[key])?, "{what}: state {key}");
                }
                assert_eq!(emulated.counts()?, cpu.counts()?, "{what}: counters");
                for (i, (va, vb)) in a.iter().zip(&b).enumerate() {
                    let (x, y) = (ge.get(va).unwrap(), gc.get(vb).unwrap());
                    assert_same_values(x, y, &format!("{what}: gradient #{i} written back"))?;
                }
                match (emulated.norm(), cpu.norm()) {
                    (Some(x), Some(y)) => assert_same_values(&x, &y, &format!("{what}: norm"))?,
                    (None, None) => {}
                    other => panic!("{what}: norms {other:?}"),
                }
                emulation.run(|| scaler_e.update())?;
                scaler_c.update()?;
                assert_eq!(
                    scale_bits(&scaler_e)?,
                    scale_bits(&scaler_c)?,
                    "{what}: scale"
                );
                assert_eq!(tracker(&scaler_e)?, tracker(&scaler_c)?, "{what}: tracker");
            }
            assert_eq!(cpu.counts()?[2], 3, "the poisoned steps are skipped");
        }
    }
    Ok(())
}

/// The launches of a scaled step on the one-read path: the reduction (the norm of the unscaled
/// gradients, or their largest `|g|` for the finite check) and the fused step, one table: no
/// unscale pass, for any clip the path takes.
#[test]
fn a_scaled_step_is_the_reduction_and_the_fused_step() -> Result<()> {
    use candle_grad_clip::NormType;
    let mut rng = StdRng::seed_from_u64(40);
    let vars = f32_vars(&[&[40, 33], &[33], &[4099]], &mut rng)?;
    let cases: [(Option<ClipSetting>, &[&str]); 4] = [
        (None, &["grad_clip_reduce_inf", "grad_clip_fused_step"]),
        (
            Some(ClipSetting::norm(1.0)),
            &["grad_clip_reduce_sq", "grad_clip_fused_step"],
        ),
        (
            Some(ClipSetting::Norm(
                ClipGradNorm::new(1.0).with_norm_type(NormType::L1),
            )),
            &["grad_clip_reduce_abs", "grad_clip_fused_step"],
        ),
        (
            Some(ClipSetting::value(0.1)),
            &["grad_clip_reduce_inf", "grad_clip_fused_step"],
        ),
    ];
    for (clip, want) in cases {
        for adamw in [true, false] {
            let mut scaler = GradScaler::new().with_init_scale(1000.0);
            let values = common::scaled_values(&vars, 1000.0, false, 0, &mut rng);
            let grads = store(&vars, &values, DType::F32)?;
            let ((), log) = if adamw {
                let mut opt = FusedAdamW::new(vars.clone(), ParamsAdamW::default())?;
                if let Some(c) = &clip {
                    opt = opt.with_clip(c.clone())?;
                }
                KernelEmulation::new().run(|| scaler.step(&mut opt, &grads))?
            } else {
                let mut opt = FusedSgd::new(vars.clone(), sgd_lr(0.1))?;
                if let Some(c) = &clip {
                    opt = opt.with_clip(c.clone())?;
                }
                KernelEmulation::new().run(|| scaler.step(&mut opt, &grads))?
            };
            assert_eq!(common::kernels(&log), want, "{clip:?} adamw {adamw}");
            assert_eq!(log.table_uploads.len(), 1, "{clip:?} adamw {adamw}");
            // The store now holds the unscaled gradients (PyTorch's values).
            let torch = TorchScaler::new(1000.0, 2.0, 0.5, 2000);
            for (v, scaled) in vars.iter().zip(&values) {
                let got = common::vals(grads.get(v).unwrap())?;
                for (g, s) in got.iter().zip(scaled) {
                    assert_eq!(g.to_bits(), torch.unscale(DType::F32, *s).to_bits());
                }
            }
        }
    }
    Ok(())
}
