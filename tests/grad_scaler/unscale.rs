//! Unscaling: NaN, infinities, shared and empty gradients; an overflow on unscaling; F16 gradients
//! refused and BF16 ones allowed (and the other refusals); the scaled loss.

use super::*;

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
    let mut scaler = GradScaler::new().with_init_scale(8.0);
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
    let mut scaler = GradScaler::new().with_init_scale(0.25);
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
    let mut scaler = GradScaler::new().with_init_scale(4.0);
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
    let mut scaler = GradScaler::new().with_init_scale(4.0);
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
            .with_init_scale(1024.0)
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
