//! `GradScaler` against PyTorch's `torch.amp.GradScaler`: the scale sequence step by step (a
//! hardcoded sequence worked out by hand from PyTorch's rules, and a scalar transcription of
//! PyTorch's `_amp_update_scale_cpu_kernel` and of `GradScaler._unscale_grads_` for odd settings),
//! the unscaled gradients bit for bit, the state machine's errors, the skip of non-finite steps
//! (fused on the device, and with any other optimizer), the resume from a state dict, and the
//! fused path against unscale + clip + candle's optimizer.

use std::slice::from_ref;

use candle_core::{backprop::GradStore, DType, Device, Result, Tensor, Var};
use candle_grad_clip::{
    clip_grad_norm_, ClipSetting, FusedAdamW, FusedSgd, GradScaler, KernelEmulation, ParamsSgd,
};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, SGD};
use half::bf16;
use rand::{rngs::StdRng, Rng, SeedableRng};

mod common;
use common::{bits, ORDERS};

/// PyTorch's scaler, transcribed: the scale an `f32`, `inv_scale = (float)(1 / (double)scale)`
/// (`GradScaler.unscale_`), and `_amp_update_scale_cpu_kernel`'s update.
#[derive(Debug, Clone)]
struct TorchScaler {
    scale: f32,
    tracker: i64,
    growth: f64,
    backoff: f64,
    interval: i64,
}

impl TorchScaler {
    fn new(init: f64, growth: f64, backoff: f64, interval: i64) -> Self {
        Self {
            scale: init as f32,
            tracker: 0,
            growth,
            backoff,
            interval,
        }
    }

    fn inv_scale(&self) -> f32 {
        (1.0 / self.scale as f64) as f32
    }

    fn update(&mut self, found_inf: bool) {
        if found_inf {
            self.scale = (self.scale as f64 * self.backoff) as f32;
            self.tracker = 0;
        } else {
            let successful = self.tracker + 1;
            if successful == self.interval {
                let new_scale = (self.scale as f64 * self.growth) as f32;
                if new_scale.is_finite() {
                    self.scale = new_scale;
                }
                self.tracker = 0;
            } else {
                self.tracker = successful;
            }
        }
    }

    /// One unscaled element of `dtype` (given as `f64`), as PyTorch's unscale kernel computes it.
    fn unscale(&self, dtype: DType, g: f64) -> f64 {
        let inv = self.inv_scale();
        match dtype {
            DType::F32 => (g as f32 * inv) as f64,
            DType::F64 => g * inv as f64,
            // Reduced types: opmath f32, then rounded to nearest even.
            DType::BF16 => bf16::from_f32(bf16::from_f64(g).to_f32() * inv).to_f64(),
            other => panic!("no unscale for {other:?}"),
        }
    }
}

fn sgd_lr(lr: f64) -> ParamsSgd {
    ParamsSgd {
        lr,
        ..Default::default()
    }
}

fn tracker(scaler: &GradScaler) -> Result<i64> {
    scaler.state_dict()?["growth_tracker"].to_scalar::<i64>()
}

fn scale_bits(scaler: &GradScaler) -> Result<u32> {
    Ok(scaler.state_dict()?["scale"].to_scalar::<f32>()?.to_bits())
}

/// A store holding `values[i]` (shaped like var `i`, of `dtype`) as the gradient of var `i`.
fn store(vars: &[Var], values: &[Vec<f64>], dtype: DType) -> Result<GradStore> {
    let mut grads = GradStore::default();
    for (v, vals) in vars.iter().zip(values) {
        let t = Tensor::from_vec(vals.clone(), v.shape(), &Device::Cpu)?.to_dtype(dtype)?;
        grads.insert(v, t);
    }
    Ok(grads)
}

fn f32_vars(shapes: &[&[usize]], rng: &mut StdRng) -> Result<Vec<Var>> {
    shapes
        .iter()
        .map(|s| {
            let n: usize = s.iter().product();
            let vals: Vec<f32> = (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect();
            Var::from_tensor(&Tensor::from_vec(vals, s.to_vec(), &Device::Cpu)?)
        })
        .collect()
}

fn vars_bits(vars: &[Var]) -> Result<Vec<Vec<u64>>> {
    vars.iter().map(|v| bits(v.as_tensor())).collect()
}

/// Scaled gradient values for `vars` (about `scale` in magnitude), with a NaN, +inf or -inf
/// planted when `poison` is 1, 2 or 3.
fn scaled_values(vars: &[Var], scale: f64, poison: u8, rng: &mut StdRng) -> Vec<Vec<f64>> {
    let mut values: Vec<Vec<f64>> = vars
        .iter()
        .map(|v| {
            (0..v.elem_count())
                .map(|_| rng.gen_range(-1.0..1.0) * scale)
                .collect()
        })
        .collect();
    let bad = [f64::NAN, f64::INFINITY, f64::NEG_INFINITY];
    if poison > 0 {
        let nonempty: Vec<usize> = (0..values.len())
            .filter(|&i| !values[i].is_empty())
            .collect();
        let i = nonempty[rng.gen_range(0..nonempty.len())];
        let j = rng.gen_range(0..values[i].len());
        values[i][j] = bad[(poison - 1) as usize];
    }
    values
}

/// The scripted sequence, with the values worked out by hand from PyTorch's rules (growth
/// interval 2): the scale after each `update`, and the growth tracker.
#[test]
fn scripted_sequence_matches_pytorch() -> Result<()> {
    // finite, finite, inf, finite, NaN, finite, finite, finite, -inf
    let poison = [0u8, 0, 2, 0, 1, 0, 0, 0, 3];
    let scales = [
        65536.0, 131072.0, 65536.0, 65536.0, 32768.0, 32768.0, 65536.0, 65536.0, 32768.0,
    ];
    let trackers = [1, 0, 0, 1, 0, 1, 0, 1, 0];
    for path in ["candle SGD", "FusedSgd", "FusedAdamW"] {
        let mut rng = StdRng::seed_from_u64(1);
        let vars = f32_vars(&[&[3, 2], &[4]], &mut rng)?;
        let mut scaler = GradScaler::new().growth_interval(2);
        let mut sgd = SGD::new(vars.clone(), 0.1)?;
        let mut fused_sgd = FusedSgd::new(vars.clone(), sgd_lr(0.1))?;
        let mut adamw = FusedAdamW::new(vars.clone(), ParamsAdamW::default())?;
        for (k, &p) in poison.iter().enumerate() {
            let scale = scaler.scale_value()?;
            let mut grads = store(&vars, &scaled_values(&vars, scale, p, &mut rng), DType::F32)?;
            let before = vars_bits(&vars)?;
            match path {
                "candle SGD" => {
                    scaler.unscale_(&vars, &mut grads)?;
                    scaler.step(&mut sgd, &grads)?;
                }
                "FusedSgd" => scaler.step(&mut fused_sgd, &grads)?,
                _ => scaler.step(&mut adamw, &grads)?,
            }
            scaler.update()?;
            let what = format!("{path} step {k}");
            assert_eq!(scaler.scale_value()?, scales[k], "{what}: scale");
            assert_eq!(tracker(&scaler)?, trackers[k], "{what}: growth tracker");
            let changed = vars_bits(&vars)? != before;
            assert_eq!(changed, p == 0, "{what}: stepped iff finite");
        }
        let skipped = poison.iter().filter(|&&p| p != 0).count();
        match path {
            "FusedSgd" => assert_eq!(fused_sgd.skipped_steps()?, skipped),
            "FusedAdamW" => {
                assert_eq!(adamw.skipped_steps()?, skipped);
                assert_eq!(adamw.steps()?, poison.len() - skipped);
            }
            _ => {}
        }
    }
    Ok(())
}

/// Odd settings (a scale that is not a power of two, growth 1.7, backoff 0.3, interval 3) over a
/// random sequence of finite and non-finite steps: the scale's bits, the tracker and the unscaled
/// gradients' bits equal the transcription of PyTorch at every step, for F32, F64 and BF16
/// gradients.
#[test]
fn odd_settings_follow_pytorch_step_by_step() -> Result<()> {
    for (case, dtype) in [DType::F32, DType::F64, DType::BF16]
        .into_iter()
        .enumerate()
    {
        let mut rng = StdRng::seed_from_u64(10 + case as u64);
        let vars: Vec<Var> = [&[5usize, 3][..], &[7], &[1]]
            .iter()
            .map(|s| Var::zeros(s.to_vec(), dtype, &Device::Cpu))
            .collect::<Result<_>>()?;
        let mut scaler = GradScaler::new()
            .init_scale(1000.0)
            .growth_factor(1.7)
            .backoff_factor(0.3)
            .growth_interval(3);
        let mut torch = TorchScaler::new(1000.0, 1.7, 0.3, 3);
        for step in 0..60 {
            let poison = if rng.gen_bool(0.2) {
                rng.gen_range(1..=3)
            } else {
                0
            };
            let values = scaled_values(&vars, torch.scale as f64, poison, &mut rng);
            let mut grads = store(&vars, &values, dtype)?;
            let scaled: Vec<Vec<f64>> = vars
                .iter()
                .map(|v| common::vals(grads.get(v).unwrap()))
                .collect::<Result<_>>()?;
            scaler.unscale_(&vars, &mut grads)?;
            for (v, scaled) in vars.iter().zip(&scaled) {
                let got = common::vals(grads.get(v).unwrap())?;
                let expected: Vec<f64> = scaled.iter().map(|&g| torch.unscale(dtype, g)).collect();
                let same = got
                    .iter()
                    .zip(&expected)
                    .all(|(a, b)| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()));
                assert!(
                    same,
                    "{dtype:?} step {step}: unscaled {got:?} != {expected:?}"
                );
            }
            let found_inf = scaled.iter().flatten().any(|g| !g.is_finite());
            let mut opt = SGD::new(vars.clone(), 0.0)?;
            scaler.step(&mut opt, &grads)?;
            scaler.update()?;
            torch.update(found_inf);
            let what = format!("{dtype:?} step {step}");
            assert_eq!(scale_bits(&scaler)?, torch.scale.to_bits(), "{what}: scale");
            assert_eq!(tracker(&scaler)?, torch.tracker, "{what}: tracker");
        }
        // The sequence went both ways.
        assert_ne!(torch.scale, 1000.0);
    }
    Ok(())
}

/// The scale never grows past `f32::MAX`: a growth that would overflow is dropped (the tracker is
/// still reset), as PyTorch does.
#[test]
fn growth_is_capped_at_f32_max() -> Result<()> {
    let w = Var::zeros(2, DType::F32, &Device::Cpu)?;
    let init = f32::MAX as f64 / 1.5;
    let mut scaler = GradScaler::new().init_scale(init).growth_interval(1);
    let mut torch = TorchScaler::new(init, 2.0, 0.5, 1);
    let mut opt = FusedSgd::new(vec![w.clone()], sgd_lr(0.1))?;
    for _ in 0..3 {
        let grads = store(from_ref(&w), &[vec![1.0, -1.0]], DType::F32)?;
        scaler.step(&mut opt, &grads)?;
        scaler.update()?;
        torch.update(false);
        assert_eq!(scale_bits(&scaler)?, (init as f32).to_bits());
        assert_eq!(scale_bits(&scaler)?, torch.scale.to_bits());
        assert_eq!(tracker(&scaler)?, 0);
    }
    // Growing from just below the cap lands on a finite value: taken.
    let mut scaler = GradScaler::new()
        .init_scale(f32::MAX as f64 / 2.0)
        .growth_interval(1);
    let grads = store(from_ref(&w), &[vec![1.0, -1.0]], DType::F32)?;
    scaler.step(&mut opt, &grads)?;
    scaler.update()?;
    assert_eq!(scaler.scale_value()?, f32::MAX as f64);
    Ok(())
}

/// Unscaling, element by element: NaN and infinities, gradients shared by two vars (unscaled
/// once), vars without a gradient, empty gradients.
#[test]
fn unscale_handles_the_nasty_cases() -> Result<()> {
    let dev = Device::Cpu;
    let a = Var::zeros(4, DType::F32, &dev)?;
    let b = Var::zeros(4, DType::F32, &dev)?;
    let empty = Var::zeros(0, DType::F32, &dev)?;
    let without = Var::zeros(3, DType::F32, &dev)?;
    let shared = Tensor::new(&[8f32, -16.0, 3.0, 1e-30], &dev)?;
    let mut grads = GradStore::default();
    grads.insert(&a, shared.clone());
    grads.insert(&b, shared.clone());
    grads.insert(&empty, Tensor::zeros(0, DType::F32, &dev)?);
    let vars = [a.clone(), b.clone(), empty.clone(), without.clone()];
    let mut scaler = GradScaler::new().init_scale(8.0);
    scaler.unscale_(&vars, &mut grads)?;
    let expected: Vec<f32> = [8f32, -16.0, 3.0, 1e-30]
        .iter()
        .map(|g| g * 0.125)
        .collect();
    assert_eq!(
        shared.to_vec1::<f32>()?,
        expected,
        "unscaled once, in place"
    );
    assert!(grads.get(&without).is_none());
    let mut opt = FusedSgd::new(vars.to_vec(), sgd_lr(1.0))?;
    scaler.step(&mut opt, &grads)?;
    scaler.update()?;
    assert_eq!(opt.skipped_steps()?, 0);

    // A NaN among finite values: the finite ones are still unscaled (as PyTorch), the step skips.
    let mut grads = GradStore::default();
    grads.insert(
        &a,
        Tensor::new(&[f32::NAN, 2.0, f32::INFINITY, -4.0], &dev)?,
    );
    scaler.unscale_(&vars, &mut grads)?;
    let got = grads.get(&a).unwrap().to_vec1::<f32>()?;
    assert!(got[0].is_nan());
    assert_eq!(&got[1..], &[0.25, f32::INFINITY, -0.5]);
    let before = vars_bits(&vars)?;
    scaler.step(&mut opt, &grads)?;
    scaler.update()?;
    assert_eq!(vars_bits(&vars)?, before);
    assert_eq!(opt.skipped_steps()?, 1);
    assert_eq!(scaler.scale_value()?, 4.0);
    Ok(())
}

/// Where the check differs from PyTorch (documented): with a scale below 1, a finite scaled
/// gradient that overflows once unscaled makes the step non-finite, and it is skipped.
#[test]
fn overflow_on_unscaling_counts_as_non_finite() -> Result<()> {
    let w = Var::zeros(2, DType::F32, &Device::Cpu)?;
    let mut scaler = GradScaler::new().init_scale(0.25);
    let mut grads = store(from_ref(&w), &[vec![f32::MAX as f64, 1.0]], DType::F32)?;
    scaler.unscale_(from_ref(&w), &mut grads)?;
    assert_eq!(grads.get(&w).unwrap().to_vec1::<f32>()?[0], f32::INFINITY);
    let mut opt = FusedSgd::new(vec![w.clone()], sgd_lr(1.0))?;
    scaler.step(&mut opt, &grads)?;
    scaler.update()?;
    assert_eq!(opt.skipped_steps()?, 1);
    assert_eq!(scaler.scale_value()?, 0.125);
    Ok(())
}

/// F16 gradients are refused with the explanation of mixed precision, and nothing changes; BF16
/// ones are accepted. Other refusals: non-contiguous gradients, and a candle optimizer without
/// `unscale_` first.
#[test]
fn f16_gradients_are_refused_bf16_allowed() -> Result<()> {
    let dev = Device::Cpu;
    let w32 = Var::zeros(3, DType::F32, &dev)?;
    let w16 = Var::zeros(3, DType::F16, &dev)?;
    let mut grads = GradStore::default();
    grads.insert(&w32, Tensor::new(&[4f32, 8.0, 16.0], &dev)?);
    grads.insert(
        &w16,
        Tensor::new(&[4f32, 8.0, 16.0], &dev)?.to_dtype(DType::F16)?,
    );
    let mut scaler = GradScaler::new().init_scale(4.0);
    let err = scaler
        .unscale_(&[w32.clone(), w16.clone()], &mut grads)
        .unwrap_err()
        .to_string();
    assert!(err.contains("F16"), "{err}");
    assert!(err.contains("F32 (master) gradients"), "{err}");
    assert!(err.contains("forward pass in F16"), "{err}");
    assert!(err.contains("nothing was modified"), "{err}");
    assert_eq!(grads.get(&w32).unwrap().to_vec1::<f32>()?, [4.0, 8.0, 16.0]);
    // The refusal left the scaler ready: unscaling the F32 ones works.
    scaler.unscale_(from_ref(&w32), &mut grads)?;
    assert_eq!(grads.get(&w32).unwrap().to_vec1::<f32>()?, [1.0, 2.0, 4.0]);

    // Through `step` with a fused optimizer over an F16 var: refused, nothing stepped.
    let mut scaler = GradScaler::new();
    let mut opt = FusedSgd::new(vec![w16.clone()], sgd_lr(1.0))?;
    assert!(scaler.step(&mut opt, &grads).is_err());
    assert_eq!(opt.steps()?, 0);

    let wb = Var::zeros(3, DType::BF16, &dev)?;
    let mut grads = GradStore::default();
    grads.insert(
        &wb,
        Tensor::new(&[4f32, 8.0, 3.0], &dev)?.to_dtype(DType::BF16)?,
    );
    let mut scaler = GradScaler::new().init_scale(4.0);
    scaler.unscale_(from_ref(&wb), &mut grads)?;
    assert_eq!(
        grads
            .get(&wb)
            .unwrap()
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?,
        [1.0, 2.0, 0.75]
    );

    // A non-contiguous gradient.
    let wt = Var::zeros((2, 3), DType::F32, &dev)?;
    let mut grads = GradStore::default();
    grads.insert(&wt, Tensor::zeros((3, 2), DType::F32, &dev)?.t()?);
    let err = GradScaler::new()
        .unscale_(&[wt], &mut grads)
        .unwrap_err()
        .to_string();
    assert!(err.contains("not contiguous"), "{err}");

    // A candle optimizer needs unscale_ first.
    let mut grads = store(from_ref(&w32), &[vec![1.0, 2.0, 3.0]], DType::F32)?;
    let mut sgd = SGD::new(vec![w32.clone()], 0.1)?;
    let mut scaler = GradScaler::new();
    let err = scaler.step(&mut sgd, &grads).unwrap_err().to_string();
    assert!(err.contains("call unscale_"), "{err}");
    assert_eq!(w32.to_vec1::<f32>()?, [0.0; 3]);
    scaler.unscale_(from_ref(&w32), &mut grads)?;
    scaler.step(&mut sgd, &grads)?;
    Ok(())
}

/// Every bad setting is accepted by its setter and refused at the first call that uses it, with
/// its name in the error.
#[test]
fn invalid_settings_are_refused_at_first_use() -> Result<()> {
    let bad: Vec<(&str, GradScaler)> = vec![
        ("init_scale", GradScaler::new().init_scale(0.0)),
        ("init_scale", GradScaler::new().init_scale(-1.0)),
        ("init_scale", GradScaler::new().init_scale(f64::NAN)),
        ("init_scale", GradScaler::new().init_scale(f64::INFINITY)),
        ("init_scale", GradScaler::new().init_scale(1e39)), // not finite as an f32
        ("init_scale", GradScaler::new().init_scale(1e-50)), // zero as an f32
        ("growth_factor", GradScaler::new().growth_factor(1.0)),
        ("growth_factor", GradScaler::new().growth_factor(0.5)),
        ("growth_factor", GradScaler::new().growth_factor(f64::NAN)),
        (
            "growth_factor",
            GradScaler::new().growth_factor(f64::INFINITY),
        ),
        ("backoff_factor", GradScaler::new().backoff_factor(0.0)),
        ("backoff_factor", GradScaler::new().backoff_factor(1.0)),
        ("backoff_factor", GradScaler::new().backoff_factor(-0.5)),
        ("backoff_factor", GradScaler::new().backoff_factor(f64::NAN)),
        ("growth_interval", GradScaler::new().growth_interval(0)),
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
        .init_scale(f32::MAX as f64)
        .growth_factor(1.0001)
        .backoff_factor(0.9999)
        .growth_interval(1)
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
    let mut scaler = GradScaler::new().init_scale(4.0);

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

/// A step with a non-finite gradient leaves the vars and the optimizer state bitwise unchanged:
/// the fused optimizers (state dicts compared), and candle's AdamW (a skipped step followed by a
/// finite one equals the finite one alone, so its moments and step count did not move).
#[test]
fn non_finite_steps_change_nothing() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(3);
    let shapes: [&[usize]; 3] = [&[6, 4], &[4], &[33]];
    let vars = f32_vars(&shapes, &mut rng)?;
    let mut scaler = GradScaler::new().init_scale(1024.0);
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
    let mut scaler = GradScaler::new().init_scale(256.0).growth_interval(100);
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
        .init_scale(3000.0)
        .growth_factor(1.5)
        .growth_interval(2);
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

/// A run stopped after any step and resumed from the state dict (or a file) goes on bitwise.
#[test]
fn state_resumes_bitwise() -> Result<()> {
    let make = || {
        GradScaler::new()
            .init_scale(700.0)
            .growth_factor(1.3)
            .backoff_factor(0.6)
            .growth_interval(3)
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

/// `scale` computes in F32 for F16, BF16 and F32 losses (F64 stays F64), so that a scaled F16
/// loss above F16's range stays finite, and is differentiable: the gradients are the scale times
/// the loss's. (The gradient flowing back into the F16 part of the graph is `scale · dloss` in
/// F16: when it overflows, the step is found non-finite and the scale backs off, by design.)
#[test]
fn scaled_loss_is_f32_and_differentiable() -> Result<()> {
    let w = Var::new(&[1f32, -2.0, 3.0], &Device::Cpu)?;
    for dtype in [DType::F16, DType::BF16, DType::F32, DType::F64] {
        // 140 · 65536 > 65504: the scaled loss overflows F16, not F32.
        let loss = (w.as_tensor().to_dtype(dtype)?.sqr()?.sum_all()? * 10.0)?;
        let scaled = GradScaler::new().scale(&loss)?;
        let expect_dtype = if dtype == DType::F64 {
            DType::F64
        } else {
            DType::F32
        };
        assert_eq!(scaled.dtype(), expect_dtype, "{dtype:?}");
        let value = scaled.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        assert_eq!(value, 140.0 * 65536.0, "{dtype:?}");
        // d/dw (10 w²) · 1024 = 20480 w: exact in every dtype, within F16's range.
        let grads = GradScaler::new()
            .init_scale(1024.0)
            .scale(&loss)?
            .backward()?;
        let g = grads.get(&w).expect("a gradient").to_vec1::<f32>()?;
        assert_eq!(g, [20480.0, -40960.0, 61440.0], "{dtype:?}");
    }
    // A non-float loss is refused.
    assert!(GradScaler::new()
        .scale(&Tensor::new(1i64, &Device::Cpu)?)
        .is_err());
    Ok(())
}

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
        // tests/emulation_optim.rs.)
        let mut emulated = FusedAdamW::new(a.clone(), ParamsAdamW::default())?;
        let mut cpu = FusedAdamW::new(b.clone(), ParamsAdamW::default())?;
        if case % 2 == 1 {
            emulated = emulated.with_clip(ClipSetting::value(0.01))?;
            cpu = cpu.with_clip(ClipSetting::value(0.01))?;
        }
        let mut scaler_e = GradScaler::new().init_scale(512.0).growth_interval(2);
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

/// A fused optimizer's step through a scaler: its last norm and `[steps, clipped, skipped]`.
type Stepper = Box<dyn FnMut(&mut GradScaler, &GradStore) -> Result<(Option<Tensor>, [usize; 3])>>;

/// The fused step's one-read path on the CPU (`step` without `unscale_`: the reduction and the
/// update unscale each element as they read it) equals `unscale_` then `step` (unscale pass, then
/// the fused step on unscaled gradients) bit for bit: vars, optimizer state, counters, the norm,
/// the scale, and the gradients left in the store; for F32, F64 and BF16 vars, every clip kind,
/// AdamW and SGD with momentum, vars large enough for the parallel passes, and non-finite steps.
#[test]
fn one_read_path_equals_unscale_then_step() -> Result<()> {
    use candle_grad_clip::NormType;
    let clips: Vec<Option<ClipSetting>> = vec![
        None,
        Some(ClipSetting::norm(0.5)),
        Some(ClipSetting::Norm {
            max_norm: 0.05,
            norm_type: NormType::Inf,
        }),
        Some(ClipSetting::Norm {
            max_norm: 1.0,
            norm_type: NormType::P(3.0),
        }),
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
            let mut scaler_a = GradScaler::new().init_scale(1000.0).growth_interval(2);
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
    let mut scaler = GradScaler::new().init_scale(8.0);
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
