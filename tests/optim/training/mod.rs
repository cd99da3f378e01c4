//! Training-loop integration: `Clipped` ([`clipped`]), `grad_norms` and `GradNormStats`
//! ([`stats`]), and a short run of the `exploding_rnn` example's training code ([`example`]).
//! Every expected value comes from an independent `f64` reference written here, never from the
//! library. (AutoClip's tests are in `tests/policy`.)

mod clipped;
mod example;
mod stats;

use candle_core::{backprop::GradStore, DType, Device, Result, Tensor, Var};
use candle_grad_clip::{
    grad_norms, AutoClip, ClipSetting, Clipped, ClippedConfig, GradNormStats, NormType,
};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarMap, SGD};
use rand::{rngs::StdRng, Rng, SeedableRng};

const SHAPES: [&[usize]; 3] = [&[4, 3], &[3], &[2, 2, 2]];

fn random(n: usize, scale: f64, rng: &mut StdRng) -> Vec<f64> {
    (0..n)
        .map(|_| scale * (rng.gen::<f64>() * 2.0 - 1.0))
        .collect()
}

fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// Fresh vars with the given initial values (f32).
fn make_vars(init: &[Vec<f64>]) -> Result<Vec<Var>> {
    init.iter()
        .zip(SHAPES)
        .map(|(v, shape)| {
            let data: Vec<f32> = v.iter().map(|&x| x as f32).collect();
            Var::from_tensor(&Tensor::from_vec(data, shape, &Device::Cpu)?)
        })
        .collect()
}

fn store(vars: &[Var], grads: &[Vec<f64>]) -> Result<GradStore> {
    let mut store = GradStore::default();
    for (var, g) in vars.iter().zip(grads) {
        let data: Vec<f32> = g.iter().map(|&x| x as f32).collect();
        store.insert(var, Tensor::from_vec(data, var.shape(), &Device::Cpu)?);
    }
    Ok(store)
}

fn values(var: &Var) -> Result<Vec<f32>> {
    var.flatten_all()?.to_vec1::<f32>()
}

/// The f32 gradients as the library sees them, in f64.
fn as_f32(grads: &[Vec<f64>]) -> Vec<Vec<f64>> {
    grads
        .iter()
        .map(|g| g.iter().map(|&x| x as f32 as f64).collect())
        .collect()
}

/// Reference global p-norm in f64.
fn ref_norm(grads: &[Vec<f64>], norm_type: NormType) -> f64 {
    let all = grads.iter().flatten().copied();
    match norm_type {
        NormType::Inf => all.fold(0.0, |m, x: f64| m.max(x.abs())),
        other => {
            let p = other.order();
            all.map(|x| x.abs().powf(p)).sum::<f64>().powf(1.0 / p)
        }
    }
}

/// Reference norm clipping: PyTorch's `min(1, max_norm / (norm + 1e-6))`.
fn ref_clip_norm(grads: &[Vec<f64>], max_norm: f64, norm_type: NormType) -> Vec<Vec<f64>> {
    let norm = ref_norm(grads, norm_type);
    let c = (max_norm / (norm + 1e-6)).min(1.0);
    grads
        .iter()
        .map(|g| g.iter().map(|x| x * c).collect())
        .collect()
}

fn assert_close(a: &[f32], b: &[f32], tol: f32, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= tol * (1.0 + y.abs()),
            "{what}[{i}]: {x} vs {y}"
        );
    }
}

/// Runs `steps` steps of `Clipped<O>` on random gradients and of the plain `O` on gradients
/// clipped by hand with `reference`; the parameters must agree after every step.
fn clipped_matches_reference<O: Optimizer>(
    make: impl Fn(Vec<Var>) -> Result<O>,
    clip: ClipSetting,
    reference: impl Fn(&[Vec<f64>]) -> Vec<Vec<f64>>,
    grad_scale: f64,
    tol: f32,
) -> Result<()> {
    let mut rng = StdRng::seed_from_u64(11);
    let init: Vec<Vec<f64>> = SHAPES
        .iter()
        .map(|s| random(numel(s), 1.0, &mut rng))
        .collect();
    let wrapped_vars = make_vars(&init)?;
    let plain_vars = make_vars(&init)?;
    let mut wrapped =
        Clipped::from_optimizer(make(wrapped_vars.clone())?, wrapped_vars.clone(), clip)?;
    let mut plain = make(plain_vars.clone())?;
    for step in 0..4 {
        let grads: Vec<Vec<f64>> = SHAPES
            .iter()
            .map(|s| random(numel(s), grad_scale * (1 + step) as f64, &mut rng))
            .collect();
        let clipped = reference(&as_f32(&grads));
        wrapped.step(&store(&wrapped_vars, &grads)?)?;
        plain.step(&store(&plain_vars, &clipped)?)?;
        for (i, (w, p)) in wrapped_vars.iter().zip(&plain_vars).enumerate() {
            assert_close(
                &values(w)?,
                &values(p)?,
                tol,
                &format!("step {step}, var {i}"),
            );
        }
    }
    assert_eq!(wrapped.steps()?, 4);
    Ok(())
}
