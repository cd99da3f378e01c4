//! `GradScaler` against PyTorch's `torch.amp.GradScaler`: the scale sequence step by step (values
//! recorded from PyTorch 2.15 itself by `scripts/grad_scaler_pytorch.py`, a sequence worked out by
//! hand from PyTorch's rules, and a scalar transcription of PyTorch's `_amp_update_scale_cpu_kernel`
//! and of `GradScaler._unscale_grads_` for random sequences),
//! the unscaled gradients bit for bit, the state machine's errors, the skip of non-finite steps
//! (fused on the device, and with any other optimizer), the resume from a state dict, and the
//! fused path against unscale + clip + candle's optimizer.

use std::slice::from_ref;

use candle_core::{backprop::GradStore, DType, Device, Result, Tensor, Var};
use candle_grad_clip::{
    clip_grad_norm_, clip_grad_value_, ClipSetting, FusedAdamW, FusedSgd, GradScaler,
    KernelEmulation, ParamsSgd,
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
/// ones are accepted. Other refusals: non-contiguous gradients, and `step` with a candle
/// optimizer (vars unknown) without `unscale_` first when the store holds an F16 gradient (an
/// F16 intermediate's or an F16 var's: the store cannot tell); with `unscale_` first it steps.
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

    // Through `step` with a fused optimizer over an F16 var: refused (the error names `step`),
    // nothing stepped.
    let mut scaler = GradScaler::new();
    let mut opt = FusedSgd::new(vec![w16.clone()], sgd_lr(1.0))?;
    let err = scaler.step(&mut opt, &grads).unwrap_err().to_string();
    assert!(
        err.contains("GradScaler::step: the gradient of var #0 is F16"),
        "{err}"
    );
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

    // A candle optimizer without unscale_, the store holding an F16 gradient: refused, nothing
    // changed.
    let grads = store(
        from_ref(&w32),
        &[vec![65536.0, 2.0 * 65536.0, 3.0 * 65536.0]],
        DType::F32,
    )?;
    let mut grads = grads;
    let intermediate = Tensor::zeros(2, DType::F16, &dev)?;
    grads.insert(
        &intermediate,
        Tensor::new(&[half::f16::from_f32(4.0); 2], &dev)?,
    );
    let mut sgd = SGD::new(vec![w32.clone()], 0.1)?;
    let mut scaler = GradScaler::new();
    let err = scaler.step(&mut sgd, &grads).unwrap_err().to_string();
    assert!(err.contains("F16 gradient"), "{err}");
    assert!(err.contains("unscale_(&vars, &mut grads)"), "{err}");
    assert_eq!(
        grads.get(&w32).unwrap().to_vec1::<f32>()?,
        [65536.0, 2.0 * 65536.0, 3.0 * 65536.0]
    );
    assert_eq!(w32.to_vec1::<f32>()?, [0.0; 3]);
    assert!(scaler.update().is_err()); // nothing was recorded
                                       // With unscale_ first, only the vars' gradients are unscaled (the F16 one left alone).
    scaler.unscale_(from_ref(&w32), &mut grads)?;
    scaler.step(&mut sgd, &grads)?;
    assert_eq!(grads.get(&w32).unwrap().to_vec1::<f32>()?, [1.0, 2.0, 3.0]);
    assert_eq!(
        grads
            .get(&intermediate)
            .unwrap()
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?,
        [4.0, 4.0]
    );
    let want: Vec<f32> = [1.0f32, 2.0, 3.0].iter().map(|g| 0.0 - 0.1 * g).collect();
    assert_eq!(w32.to_vec1::<f32>()?, want);
    scaler.update()?;
    // Without an F16 gradient in the store, step unscales every gradient of the store.
    let grads = store(from_ref(&w32), &[vec![65536.0; 3]], DType::F32)?;
    scaler.step(&mut sgd, &grads)?;
    assert_eq!(grads.get(&w32).unwrap().to_vec1::<f32>()?, [1.0; 3]);
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
/// (The norm of a non-finite step is not compared: after `unscale_` the step is not run, as
/// PyTorch's, so `last_norm` stays the previous step's; the one-read path runs it and skips.)
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

// ---------------------------------------------------------------------------------------------
// PyTorch's own values: `python scripts/grad_scaler_pytorch.py` (torch 2.15.0, CPU), pasted.

// SCRIPTED: torch.float32, init 65536.0, growth 2.0, backoff 0.5, interval 2
const SCRIPTED_SCALE_BITS: [u32; 9] = [
    1199570944, 1207959552, 1199570944, 1199570944, 1191182336, 1191182336, 1199570944, 1199570944,
    1191182336,
];
const SCRIPTED_TRACKERS: [i64; 9] = [1, 0, 0, 1, 0, 1, 0, 1, 0];
#[rustfmt::skip]
const SCRIPTED_UNSCALED_BITS: [[u64; 3]; 9] = [[4537376624575774720, 13765252261057921024, 4490196915098484736], [4541880224203145216, 13765252261057921024, 4494700514725855232], [4540191374342881280, 9218868437227405312, 4492502757948784640], [4546383823830515712, 13765252261057921024, 4499204114353225728], [4548072673690779648, 9221120237041090560, 4500357035509940224], [4553702173224992768, 13769755860685291520, 4506013556830896128], [4554546598155124736, 13769755860685291520, 4507166478524481536], [4550887423457886208, 13765252261057921024, 4503707713980596224], [4551731848388018176, 18442240474082181120, 4504284174290518016]];

// ODD_F32: torch.float32, init 1000.0, growth 1.7, backoff 0.3, interval 3
const ODD_F32_SCALE_BITS: [u32; 28] = [
    1148846080, 1148846080, 1154777088, 1140785152, 1140785152, 1140785152, 1146667008, 1146667008,
    1146667008, 1152924877, 1138562499, 1138562499, 1138562499, 1144777753, 1130463672, 1130463672,
    1130463672, 1136635459, 1136635459, 1136635459, 1143139769, 1143139769, 1128498091, 1114283520,
    1114283520, 1114283520, 1120365747, 1120365747,
];
const ODD_F32_TRACKERS: [i64; 28] = [
    1, 2, 0, 0, 1, 2, 0, 1, 2, 0, 0, 1, 2, 0, 0, 1, 2, 0, 1, 2, 0, 1, 0, 0, 1, 2, 0, 1,
];
#[rustfmt::skip]
const ODD_F32_UNSCALED_BITS: [[u64; 5]; 28] = [[4623139617095286784, 13759099320974442496, 4494622300150169600, 4607069829453578240, 13857681888392511488], [4624132474484555776, 13759828757818900480, 4495269939342475264, 4607761453405962240, 13858340378819690496], [4625125331336953856, 13760558195200229376, 4495917578534780928, 4608396782148255744, 13858998869783740416], [4622029953238564864, 13758071273307504640, 4493204508897181696, 9221120237041090560, 13856315802103316480], [4630550458073612288, 13766363339032625152, 4501576769177911296, 4614034009402376192, 13864677423213182976], [4631037153030176768, 13767078473099116544, 4502211708688793600, 4614656881128898560, 13865323001894928384], [4631523847449870336, 13767648834555478016, 4502846648736546816, 4615279752855420928, 13865968581650415616], [4628709363433865216, 13764386202914390016, 4499821345713946624, 4612311950854979584, 13862892586202562560], [4629281945388318720, 13764806869728100352, 4500194839828103168, 4612678346461937664, 13863272338620940288], [4629777472408256512, 13765227537078681600, 4500568333942259712, 4613044741532024832, 13863652091039318016], [9218868437227405312, 13762406606316765184, 4497558710234644480, 4610006722721873920, 13860667500548587520], [4634752609515732992, 13770423999756500992, 4505687100661694464, 4618151815202996224, 13868781165143392256], [4635033287239139328, 13770836418622390272, 4506053271319740416, 4618511026403409920, 13869153471162220544], [4635313964425674752, 13771248837488279552, 4506419441977786368, 4618870236530081792, 13869525777181048832], [4632131199848939520, 13768095046760923136, 4503619312816226304, 4616057042078007296, 18442240474082181120], [4640257842761170944, 13776399369248964608, 4511497427445874688, 4623937305265045504, 13874613387133976576], [4640533016483987456, 13776657480677326848, 4511856417992343552, 4624289472719093760, 13874978392782143488], [4640808190206803968, 13776859646935433216, 4512215409075683328, 4624641640710012928, 13875343399504052224], [4637793766873235456, 13773450122044112896, 4508878905070845952, 4621368552971042816, 13871950989520535552], [4638117501106913280, 13773687964984934400, 4509090076264759296, 4621575710518018048, 13872165699230629888], [4638441234803720192, 13773925807388884992, 4509301247458672640, 4621782868064993280, 13872380408403853312], [4635032506091962368, 13770835271866122240, 4506052252338749440, 4618510027286642688, 13869152435538231296], [4635222937962545152, 13771115086301102080, 9221120237041090560, 4618753741984628736, 13869405034912940032], [4643468409734955008, 13779003026742181888, 4514314141623648256, 9221120237041090560, 13877401836668846080], [4651410361537265664, 13787038647486251008, 4522458713876856832, 4634947050738286592, 13885531955283361792], [4651674849918320640, 13787232963617882112, 4522631239491911680, 4635116296608940032, 13885707370874535936], [4651939338836246528, 13787427278675771392, 4522803764570095616, 4635285543016464384, 13885882787002580992], [4648500987198177280, 13784283889822334976, 4519507843174367232, 4631966667704893440, 13882607101345267712]];

// ODD_BF16: torch.bfloat16, init 1000.0, growth 1.7, backoff 0.3, interval 3
const ODD_BF16_SCALE_BITS: [u32; 28] = [
    1148846080, 1148846080, 1154777088, 1140785152, 1140785152, 1140785152, 1146667008, 1146667008,
    1146667008, 1152924877, 1138562499, 1138562499, 1138562499, 1144777753, 1130463672, 1130463672,
    1130463672, 1136635459, 1136635459, 1136635459, 1143139769, 1143139769, 1128498091, 1114283520,
    1114283520, 1114283520, 1120365747, 1120365747,
];
const ODD_BF16_TRACKERS: [i64; 28] = [
    1, 2, 0, 0, 1, 2, 0, 1, 2, 0, 0, 1, 2, 0, 0, 1, 2, 0, 1, 2, 0, 1, 0, 0, 1, 2, 0, 1,
];
#[rustfmt::skip]
const ODD_BF16_UNSCALED_BITS: [[u64; 5]; 28] = [[4623156123728347136, 13759094995942375424, 4494627612487843840, 4607076865683750912, 13857681606535282688], [4624106101774745600, 13759833867756240896, 4495260931185442816, 4607745368753438720, 13858350109604970496], [4625126448565321728, 13760537555198017536, 4495929434255130624, 4608413871823126528, 13858983428302569472], [4622030223821504512, 13758039464779710464, 4493220237604290560, 9221120237041090560, 13856309416023818240], [4630580026239090688, 13766378160964763648, 4501594118161432576, 4614043371357339648, 13864683296580960256], [4631037423076245504, 13767081848406540288, 4502227436859031552, 4614676690054938624, 13865316615278559232], [4631530004285489152, 13767679982732050432, 4502860755556630528, 4615274824380448768, 13865985118348247040], [4628715254518382592, 13764407836127789056, 4499834899556990976, 4612319337124986880, 13862888893604429824], [4629278204471803904, 13764830048592855040, 4500186743277879296, 4612671180845875200, 13863275921697406976], [4629770785681047552, 13765217076685832192, 4500573771370856448, 4613058208938852352, 13863627765418295296], [9218868437227405312, 13762402326918725632, 4497583099743305728, 4609997168567123968, 13860637093790744576], [4634766966517661696, 13770424363754979328, 4505710689695825920, 4618159942891732992, 13868764683743264768], [4635048441494372352, 13770811391847956480, 4506062533416714240, 4618546970984710144, 13869151711836241920], [4635329916471083008, 13771233604313022464, 4506414377137602560, 4618863630333509632, 13869538739929219072], [4632163322983088128, 13768102195197116416, 4503634811742584832, 4616048880566403072, 18442240474082181120], [4640290912935608320, 13776405707010080768, 4511516111090483200, 4623930179914301440, 13874605289510010880], [4640502019168141312, 13776651997614702592, 4511867954811371520, 4624282023635189760, 13874957133230899200], [4640783494144851968, 13776863103847235584, 4512219798532259840, 4624669051728166912, 13875344161323876352], [4637792822517301248, 13773450219754618880, 4508877283183820800, 4621361720751816704, 13871931277231259648], [4638109481866100736, 13773696510359240704, 4509088389416353792, 4621572826984349696, 13872177567835881472], [4638426141214900224, 13773942800963862528, 4509299495648886784, 4621783933216882688, 13872388674068414464], [4635048441494372352, 13770846576220045312, 4506062533416714240, 4618511786612621312, 13869151711836241920], [4635224363354816512, 13771128051196755968, 9221120237041090560, 4618758077217243136, 13869433186812952576], [4643492690795692032, 13779009350544654336, 4514330860857589760, 9221120237041090560, 13877384854905028608], [4651444358887768064, 13787031387380908032, 4522458450810109952, 4634942888378105856, 13885547629229637632], [4651655465120301056, 13787242493613441024, 4522634372670554112, 4635118810238550016, 13885688366717992960], [4651936940097011712, 13787418415473885184, 4522775110158909440, 4635259547726905344, 13885899472950525952], [4648488871632306176, 13784287006357979136, 4519502963554648064, 4631987401122643968, 13882592141974175744]];

// ODD_F64: torch.float64, init 1000.0, growth 1.7, backoff 0.3, interval 3
const ODD_F64_SCALE_BITS: [u32; 28] = [
    1148846080, 1148846080, 1154777088, 1140785152, 1140785152, 1140785152, 1146667008, 1146667008,
    1146667008, 1152924877, 1138562499, 1138562499, 1138562499, 1144777753, 1130463672, 1130463672,
    1130463672, 1136635459, 1136635459, 1136635459, 1143139769, 1143139769, 1128498091, 1114283520,
    1114283520, 1114283520, 1120365747, 1120365747,
];
const ODD_F64_TRACKERS: [i64; 28] = [
    1, 2, 0, 0, 1, 2, 0, 1, 2, 0, 0, 1, 2, 0, 0, 1, 2, 0, 1, 2, 0, 1, 0, 0, 1, 2, 0, 1,
];
#[rustfmt::skip]
const ODD_F64_UNSCALED_BITS: [[u64; 5]; 28] = [[4623139617239920148, 13759099320991622365, 4494622300527267729, 4607069829231804416, 13857681888229195776], [4624132474266371826, 13759828757991926304, 4495269939389965331, 4607761453279234340, 13858340378863131501], [4625125331292823504, 13760558194992230245, 4495917578252662933, 4608396782542557769, 13858998869497067227], [4622029952994545781, 13758071273381132650, 4493204508933382134, 9221120237041090560, 13856315802122415543], [4630550458200730080, 13766363339162701304, 4501576768873214045, 4614034008974444836, 13864677423083346798], [4631037152827205598, 13767078473485050034, 4502211708942073958, 4614656880808483694, 13865323002143740490], [4631523847453681114, 13767648834339502518, 4502846649010933870, 4615279752642522551, 13865968581204134181], [4628709363709644374, 13764386202535573900, 4499821345833174916, 4612311951063646208, 13862892586352508928], [4629281945568752622, 13764806869744053087, 4500194839955847767, 4612678346225333979, 13863272338704901266], [4629777472182365379, 13765227536952532274, 4500568334078520617, 4613044741387021750, 13863652091057293604], [9218868437227405312, 13762406606031702070, 4497558710828748899, 4610006722295459255, 13860667500724504869], [4634752609648177353, 13770423999977630450, 4505687100283295574, 4618151815189514532, 13868781164930980717], [4635033287021027768, 13770836418796152377, 4506053270979971689, 4618511026120743790, 13869153471146791498], [4635313964393878182, 13771248837614674303, 4506419441676647804, 4618870237051973047, 13869525777362602276], [4632131199712139248, 13768095046833078587, 4503619312982699237, 4616057042126635008, 18442240474082181120], [4640257842577258709, 13776399369198283994, 4511497427133372867, 4623937305221529600, 13874613387170152448], [4640533016486941360, 13776657480760649213, 4511856418031685452, 4624289472820019199, 13874978393283624959], [4640808190396624011, 13776859646858982798, 4512215408929998037, 4624641640418508799, 13875343399397097471], [4637793766966689558, 13773450122399981615, 4508878905120544860, 4621368553163512686, 13871950989467488842], [4638117500967882345, 13773687964861116629, 4509090076230546814, 4621575710567862858, 13872165698939238108], [4638441234969075131, 13773925807322251642, 4509301247340548768, 4621782867972213029, 13872380408410987374], [4635032506368280494, 13770835271728683286, 4506052252543189883, 4618510027041275904, 13869152435645186048], [4635222938133688015, 13771115086388842126, 9221120237041090560, 4618753741634629046, 13869405035023714596], [4643468410037839509, 13779003026578359563, 4514314141620948562, 9221120237041090560, 13877401836381049417], [4651410361373557912, 13787038647649705192, 4522458714234247197, 4634947050607467374, 13885531954909647434], [4651674849939834572, 13787232963388285431, 4522631239653009767, 4635116296854906002, 13885707371146866102], [4651939338506111236, 13787427279126865671, 4522803765071772339, 4635285543102344631, 13885882787384084772], [4648500987231202448, 13784283889796933313, 4519507843488832466, 4631966667317987621, 13882607101532232558]];

// CAPPED: torch.float32, init 2.2685489775901924e+38, growth 2.0, backoff 0.5, interval 1
const CAPPED_SCALE_BITS: [u32; 3] = [2133502634, 2133502634, 2133502634];
const CAPPED_TRACKERS: [i64; 3] = [0, 0, 0];
#[rustfmt::skip]
const CAPPED_UNSCALED_BITS: [[u64; 2]; 3] = [[4032973466310279168, 13256345503165054976], [4032973466310279168, 13256345503165054976], [4032973466310279168, 13256345503165054976]];

/// The inputs of `scripts/grad_scaler_pytorch.py`: the scaled gradient of each step, as Python
/// computes them (f64), and the dtype's tensor (PyTorch converts through f32).
fn pytorch_steps(scenario: &str) -> Vec<Vec<f64>> {
    let bad = [f64::NAN, f64::INFINITY, f64::NEG_INFINITY];
    match scenario {
        "scripted" => {
            let poison = [
                None,
                None,
                Some(1),
                None,
                Some(0),
                None,
                None,
                None,
                Some(2),
            ];
            poison
                .iter()
                .enumerate()
                .map(|(k, p)| {
                    let k = k as f64;
                    let mut g = vec![1.5 * (k + 1.0), -3.0, 1e-3 * (k + 1.0)];
                    if let Some(p) = p {
                        g[1] = bad[*p];
                    }
                    g
                })
                .collect()
        }
        "odd" => {
            let pattern = [
                0usize, 0, 0, 1, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0,
                0, 0,
            ];
            let values = [12345.678, -0.0173, 3.0e-5, 987.5, -65504.0];
            pattern
                .iter()
                .enumerate()
                .map(|(k, &p)| {
                    let mut g: Vec<f64> =
                        values.iter().map(|v| v * (1.0 + k as f64 / 7.0)).collect();
                    if p > 0 {
                        g[k % values.len()] = bad[p - 1];
                    }
                    g
                })
                .collect()
        }
        _ => vec![vec![1.0, -1.0]; 3],
    }
}

/// The scaler driven through the scripted and odd sequences of `scripts/grad_scaler_pytorch.py`,
/// by `step` (the one-read path) and by `unscale_` then `step`: PyTorch's scale bits and growth
/// tracker after every update, and PyTorch's unscaled gradients bit for bit (NaN as NaN).
#[test]
fn pytorch_values_step_by_step() -> Result<()> {
    type Case<'a> = (
        &'a str,
        DType,
        [f64; 4],
        &'a [u32],
        &'a [i64],
        Vec<Vec<u64>>,
    );
    let rows = |r: &[[u64; 5]]| r.iter().map(|x| x.to_vec()).collect::<Vec<_>>();
    let cases: Vec<Case> = vec![
        (
            "scripted",
            DType::F32,
            [65536.0, 2.0, 0.5, 2.0],
            &SCRIPTED_SCALE_BITS,
            &SCRIPTED_TRACKERS,
            SCRIPTED_UNSCALED_BITS.iter().map(|x| x.to_vec()).collect(),
        ),
        (
            "odd",
            DType::F32,
            [1000.0, 1.7, 0.3, 3.0],
            &ODD_F32_SCALE_BITS,
            &ODD_F32_TRACKERS,
            rows(&ODD_F32_UNSCALED_BITS),
        ),
        (
            "odd",
            DType::BF16,
            [1000.0, 1.7, 0.3, 3.0],
            &ODD_BF16_SCALE_BITS,
            &ODD_BF16_TRACKERS,
            rows(&ODD_BF16_UNSCALED_BITS),
        ),
        (
            "odd",
            DType::F64,
            [1000.0, 1.7, 0.3, 3.0],
            &ODD_F64_SCALE_BITS,
            &ODD_F64_TRACKERS,
            rows(&ODD_F64_UNSCALED_BITS),
        ),
        (
            "capped",
            DType::F32,
            [f32::MAX as f64 / 1.5, 2.0, 0.5, 1.0],
            &CAPPED_SCALE_BITS,
            &CAPPED_TRACKERS,
            CAPPED_UNSCALED_BITS.iter().map(|x| x.to_vec()).collect(),
        ),
    ];
    for (scenario, dtype, [init, growth, backoff, interval], scales, trackers, unscaled) in cases {
        for unscale_first in [false, true] {
            let steps = pytorch_steps(scenario);
            let w = Var::zeros(steps[0].len(), dtype, &Device::Cpu)?;
            let mut opt = FusedSgd::new(vec![w.clone()], sgd_lr(0.0))?;
            let mut scaler = GradScaler::new()
                .init_scale(init)
                .growth_factor(growth)
                .backoff_factor(backoff)
                .growth_interval(interval as usize);
            for (k, g) in steps.iter().enumerate() {
                let t = Tensor::from_vec(g.clone(), g.len(), &Device::Cpu)?;
                // PyTorch converts a Python float to bf16 through f32.
                let t = match dtype {
                    DType::F64 => t,
                    _ => t.to_dtype(DType::F32)?.to_dtype(dtype)?,
                };
                let mut grads = GradStore::default();
                grads.insert(&w, t);
                if unscale_first {
                    scaler.unscale_(from_ref(&w), &mut grads)?;
                }
                scaler.step(&mut opt, &grads)?;
                let what = format!("{scenario} {dtype:?} unscale_first {unscale_first} step {k}");
                let got = common::vals(grads.get(&w).unwrap())?;
                for (x, &want) in got.iter().zip(&unscaled[k]) {
                    let want = f64::from_bits(want);
                    let same = x.to_bits() == want.to_bits() || (x.is_nan() && want.is_nan());
                    assert!(
                        same,
                        "{what}: unscaled {got:?} vs PyTorch {:?}",
                        unscaled[k]
                    );
                }
                scaler.update()?;
                assert_eq!(scale_bits(&scaler)?, scales[k], "{what}: scale");
                assert_eq!(tracker(&scaler)?, trackers[k], "{what}: tracker");
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Review fixes: skip limits, found-inf after unscale_, partial unscale_, no inf checks, loading
// mid-step, the unscale on kernel devices.

/// `step` with a fused optimizer whose `max_consecutive_skips` refuses the skip: the error leaves
/// the scaler unscaled with found-inf recorded, so the gradients are unscaled exactly once (a
/// retry refuses again without unscaling them again) and `update` backs off; then the next step
/// goes on. For FusedSgd and FusedAdamW.
#[test]
fn refused_skip_leaves_the_scaler_consistent() -> Result<()> {
    for adamw in [false, true] {
        let w = Var::new(&[1f32, 2.0, 3.0], &Device::Cpu)?;
        let mut scaler = GradScaler::new().init_scale(4.0);
        let scaled = [8.0, f64::INFINITY, 4.0];
        let grads = store(from_ref(&w), &[scaled.to_vec()], DType::F32)?;
        let step = |scaler: &mut GradScaler, grads: &GradStore| -> Result<[usize; 2]> {
            if adamw {
                let mut opt = FusedAdamW::new(vec![w.clone()], ParamsAdamW::default())?
                    .with_clip(ClipSetting::norm(1.0))?
                    .max_consecutive_skips(0);
                let r = scaler.step(&mut opt, grads);
                r.map(|()| [0, 0]).or_else(|e| {
                    assert!(e.to_string().contains("max_consecutive_skips"), "{e}");
                    Ok([opt.steps()?, opt.skipped_steps()?])
                })
            } else {
                let mut opt = FusedSgd::new(vec![w.clone()], sgd_lr(1.0))?
                    .with_clip(ClipSetting::norm(1.0))?
                    .max_consecutive_skips(0);
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
        let mut opt = FusedSgd::new(vec![w.clone()], sgd_lr(1.0))?.max_consecutive_skips(0);
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
        .skip_nonfinite(true)
        .max_consecutive_skips(1);
    let mut scaler = GradScaler::new().init_scale(8.0);
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
    let mut scaler = GradScaler::new().init_scale(4.0);
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
    let mut scaler = GradScaler::new().init_scale(4.0);
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
    let saved = GradScaler::new().init_scale(2.0).state_dict()?;
    let mut scaler = GradScaler::new().init_scale(8.0);
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
                    let mut scaler_e = GradScaler::new().init_scale(1000.0);
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
    fn counts(&self) -> Result<[usize; 3]>;
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
            fn counts(&self) -> Result<[usize; 3]> {
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
            Some(ClipSetting::Norm {
                max_norm: 0.4,
                norm_type: NormType::Inf,
            }),
            false,
        ),
        (Some(ClipSetting::norm(5.0)), true),
        (
            Some(ClipSetting::Norm {
                max_norm: 500.0,
                norm_type: NormType::L1,
            }),
            true,
        ),
        (
            Some(ClipSetting::Norm {
                max_norm: 2.0,
                norm_type: NormType::P(3.0),
            }),
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
            let mut scaler_e = GradScaler::new().init_scale(init).growth_interval(2);
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
            Some(ClipSetting::Norm {
                max_norm: 1.0,
                norm_type: NormType::L1,
            }),
            &["grad_clip_reduce_abs", "grad_clip_fused_step"],
        ),
        (
            Some(ClipSetting::value(0.1)),
            &["grad_clip_reduce_inf", "grad_clip_fused_step"],
        ),
    ];
    for (clip, want) in cases {
        for adamw in [true, false] {
            let mut scaler = GradScaler::new().init_scale(1000.0);
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
