//! Edge cases of the specification, one by one, by concern: no gradients and the result's dtype,
//! exactness, the coefficient, views and aliasing, non-finite norms, bad arguments (and "nothing
//! changed" after each error), `clip_grad_value_`.

mod bad_arguments;
mod coefficient;
mod empty;
mod exactness;
mod nonfinite;
mod value;
mod views;

use crate::common::*;
use candle_core::{backprop::GradStore, DType, Device, Result, Tensor, Var};
use candle_grad_clip::{
    clip_grad_norm_, clip_grad_value_, clip_grads_with_norm_, total_norm, ClipGradNorm,
    ClipSetting, Clipped, ClippedConfig, NormType,
};
use candle_nn::{Optimizer, SGD};

const ALL_NORMS: [NormType; 6] = [
    NormType::L1,
    NormType::L2,
    NormType::Inf,
    NormType::P(0.5),
    NormType::P(1.5),
    NormType::P(3.0),
];

/// One var per gradient.
fn setup(grads: &[Tensor]) -> Result<(Vec<Var>, GradStore)> {
    let mut vars = vec![];
    let mut store = GradStore::default();
    for g in grads {
        let v = var(g.dims())?;
        store.insert(&v, g.clone());
        vars.push(v);
    }
    Ok((vars, store))
}

fn f32s(v: &[f32]) -> Result<Tensor> {
    Tensor::new(v, &Device::Cpu)
}

type Snapshot = Vec<Option<Vec<u64>>>;

/// [`setup`], and the bits of every gradient before any call.
fn snapshot_setup(grads: &[Tensor]) -> Result<(Vec<Var>, GradStore, Snapshot)> {
    let (vars, store) = setup(grads)?;
    let before = store_bits(&vars, &store)?;
    Ok((vars, store, before))
}
