//! End to end: a small candle_nn model on a VarMap, `loss.backward()`, `clip_grad_norm_` over
//! `varmap.all_vars()`, then an optimizer step, with every norm recomputed independently in f64.

use crate::common;

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_grad_clip::{clip_grad_norm_, total_norm, NormType};
use candle_nn::{
    linear, loss::mse, AdamW, Linear, Optimizer, ParamsAdamW, VarBuilder, VarMap, SGD,
};
use common::*;

struct Model {
    l1: Linear,
    l2: Linear,
}

impl Model {
    fn new(vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            l1: linear(4, 16, vb.pp("l1"))?,
            l2: linear(16, 1, vb.pp("l2"))?,
        })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.l2.forward(&self.l1.forward(x)?.relu()?)
    }
}

/// Inputs and large targets, so that the gradient norm is far above max_norm.
fn data() -> Result<(Tensor, Tensor)> {
    let xs: Vec<f32> = (0..64 * 4)
        .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
        .collect();
    let x = Tensor::from_vec(xs, (64, 4), &Device::Cpu)?;
    let w = Tensor::new(&[[30f32], [-20.0], [10.0], [5.0]], &Device::Cpu)?;
    let y = (x.matmul(&w)? + 50.0)?;
    Ok((x, y))
}

const MAX_NORM: f64 = 1.0;

#[test]
fn linear_model_clip_then_adamw() -> Result<()> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let model = Model::new(vb.clone())?;
    // a layer that takes no part in the loss: its vars have no gradient
    let _unused = linear(3, 2, vb.pp("unused"))?;
    let vars = varmap.all_vars();
    assert_eq!(vars.len(), 6);
    let mut opt = AdamW::new(
        vars.clone(),
        ParamsAdamW {
            lr: 0.1,
            ..Default::default()
        },
    )?;
    let (x, y) = data()?;

    let unused_before: Vec<Vec<f64>> = {
        let data = varmap.data().lock().unwrap();
        let mut names: Vec<&String> = data.keys().filter(|k| k.starts_with("unused")).collect();
        names.sort();
        names
            .iter()
            .map(|k| vals(data[*k].as_tensor()))
            .collect::<Result<_>>()?
    };

    let mut first_loss = None;
    let mut last_loss = 0.0;
    for step in 0..60 {
        let loss = mse(&model.forward(&x)?, &y)?;
        let loss_value = loss.to_scalar::<f32>()? as f64;
        first_loss.get_or_insert(loss_value);
        last_loss = loss_value;
        let mut grads = loss.backward()?;

        let with_grad = vars.iter().filter(|v| grads.get(v).is_some()).count();
        assert_eq!(with_grad, 4, "weights and biases of l1 and l2");
        let before = grad_values(&vars, &grads)?;
        let reference = ref_norm(&before, 2.0);

        // the order of all_vars() is HashMap order: it must not matter
        let mut rev = vars.clone();
        rev.reverse();
        let n_rev = total_norm(&rev, &grads, NormType::L2, false)?;

        let norm = clip_grad_norm_(&vars, &mut grads, MAX_NORM)?;
        assert_eq!(norm.dtype(), DType::F32);
        assert_norm(&norm, reference, 0.0, &format!("step {step}"))?;
        assert_eq!(
            norm.to_scalar::<f32>()?.to_bits(),
            n_rev.to_scalar::<f32>()?.to_bits()
        );

        let after = grad_values(&vars, &grads)?;
        let after_norm = ref_norm(&after, 2.0);
        // at most max_norm, up to the f32 rounding of the scaled elements
        assert!(
            after_norm <= MAX_NORM * (1.0 + f64::powi(2.0, -23)),
            "step {step}: norm after clipping {after_norm} > {MAX_NORM}"
        );
        let coef = ref_coef(MAX_NORM, reference, 1e-6);
        if coef < 1.0 {
            assert!(
                (after_norm - MAX_NORM).abs() <= 1e-5,
                "step {step}: norm after clipping {after_norm}, expected ~{MAX_NORM}"
            );
        }
        assert_scaled(
            DType::F32,
            &before,
            &after,
            coef,
            REL_MIXED,
            &format!("step {step}"),
        );

        let params_before = grad_values(&vars, &varmap_as_store(&vars)?)?;
        opt.step(&grads)?;
        let params_after = grad_values(&vars, &varmap_as_store(&vars)?)?;
        assert!(params_after.iter().all(|x| x.is_finite()));
        assert_ne!(
            params_before, params_after,
            "step {step}: AdamW did not move"
        );
    }
    let first_loss = first_loss.unwrap();
    eprintln!("loss {first_loss} -> {last_loss}");
    assert!(
        last_loss < 0.5 * first_loss,
        "training with clipping should make progress: {first_loss} -> {last_loss}"
    );
    // AdamW skips vars without gradient
    let data = varmap.data().lock().unwrap();
    let mut names: Vec<&String> = data.keys().filter(|k| k.starts_with("unused")).collect();
    names.sort();
    for (k, before) in names.iter().zip(&unused_before) {
        assert_eq!(&vals(data[*k].as_tensor())?, before, "{k}");
    }
    Ok(())
}

/// The current values of the vars, in a GradStore keyed by the vars (to reuse `grad_values`).
fn varmap_as_store(vars: &[candle_core::Var]) -> Result<candle_core::backprop::GradStore> {
    let mut s = candle_core::backprop::GradStore::default();
    for v in vars {
        s.insert(v, v.as_tensor().copy()?);
    }
    Ok(s)
}

/// The optimizer sees the clipped gradients: with SGD, each parameter moves by exactly
/// `lr * clipped gradient`.
#[test]
fn sgd_step_uses_the_clipped_gradients() -> Result<()> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let model = Model::new(vb)?;
    let vars = varmap.all_vars();
    let lr = 0.5;
    let mut opt = SGD::new(vars.clone(), lr)?;
    let (x, y) = data()?;
    let loss = mse(&model.forward(&x)?, &y)?;
    let mut grads = loss.backward()?;
    let before = grad_values(&vars, &grads)?;
    let reference = ref_norm(&before, 2.0);
    let coef = ref_coef(MAX_NORM, reference, 1e-6);
    assert!(
        coef < 1e-2,
        "the test needs a large gradient: norm {reference}"
    );
    let params_before = grad_values(&vars, &varmap_as_store(&vars)?)?;
    clip_grad_norm_(&vars, &mut grads, MAX_NORM)?;
    opt.step(&grads)?;
    let params_after = grad_values(&vars, &varmap_as_store(&vars)?)?;
    for i in 0..before.len() {
        let expected = params_before[i] - lr * before[i] * coef;
        let tol = 4.0 * ulp(DType::F32, expected) + 4.0 * ulp(DType::F32, params_before[i]);
        assert!(
            (params_after[i] - expected).abs() <= tol,
            "param {i}: {} - {lr} * {} * {coef} = {expected}, got {}",
            params_before[i],
            before[i],
            params_after[i]
        );
    }
    Ok(())
}
