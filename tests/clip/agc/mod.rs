//! Adaptive gradient clipping (`adaptive_clip_grad_`, `ClipSetting::Agc`): against an f64
//! transcription of the formula written here (per-unit norms summed in f64 over the values candle
//! reads back), on the CPU and through the emulated kernels (which must equal the CPU bit for bit
//! for every grid and block order), through `Clipped` and the fused optimizers, with the nasty
//! cases (NaN, ±inf, zero parameters, empty tensors, non-contiguous gradients) and the refusals.
//!
//! Here the f64 reference and the cases that [`clip`] (the function itself) and [`optimizers`]
//! (AGC through `Clipped` and the fused optimizers) share.

mod clip;
mod optimizers;

use crate::common::{
    bits, err_msg, kernels, scalar, signed_values, tensor, ulp, vals, DTYPES, ORDERS,
};
use candle_core::{backprop::GradStore, DType, Device, Result, Tensor, Var};
use candle_grad_clip::{
    adaptive_clip_grad_, ClipSetting, Clipped, ClippedConfig, FusedAdamW, FusedSgd,
    KernelEmulation, ParamsSgd,
};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, SGD};
use rand::{rngs::StdRng, Rng, SeedableRng};

/// Shapes of rank 0, 1, 2 and 4, units of 1 element to 4099, empty ones.
const SHAPES: [&[usize]; 12] = [
    &[],
    &[1],
    &[7],
    &[0],
    &[3, 0],
    &[0, 4],
    &[5, 4],
    &[9, 1],
    &[1, 4099],
    &[6, 3, 2, 2],
    &[33, 70],
    &[2, 600],
];

// ---------------------------------------------------------------------------------------------
// The reference.

/// Units of a tensor of `dims`, timm's convention: slices along dim 0 for rank >= 2, the whole
/// tensor otherwise; `(count, length)`.
fn units(dims: &[usize]) -> (usize, usize) {
    let n: usize = dims.iter().product();
    if n == 0 {
        (0, 0)
    } else if dims.len() >= 2 {
        (dims[0], n / dims[0])
    } else {
        (1, n)
    }
}

/// The reference clip of one var: for each unit, `Some(coefficient)` when
/// `‖g‖ > clipping · max(‖w‖, eps)`, with the coefficient `max_norm / max(‖g‖, 1e-6)`, norms in
/// f64 (plain sequential sums); NaN comparisons are false. Also the sum of the squares of `g`.
fn reference(
    p: &[f64],
    g: &[f64],
    dims: &[usize],
    clipping: f64,
    eps: f64,
) -> (Vec<Option<f64>>, f64) {
    let (count, len) = units(dims);
    let mut out = Vec::new();
    let mut total = 0.0;
    for u in 0..count {
        let w: f64 = p[u * len..(u + 1) * len]
            .iter()
            .map(|x| x * x)
            .sum::<f64>()
            .sqrt();
        let gs: f64 = g[u * len..(u + 1) * len].iter().map(|x| x * x).sum();
        total += gs;
        let gn = gs.sqrt();
        let max_norm = clipping * if w.is_nan() { f64::NAN } else { w.max(eps) };
        out.push((gn > max_norm).then(|| max_norm / gn.max(1e-6)));
    }
    (out, total)
}

/// Asserts the clip of one gradient: clipped units within one ulp of `old · coefficient` (F64:
/// also 1e-13 relative, the summation order of the norms), NaN where that product is NaN, the
/// other units bit for bit unchanged.
fn assert_clipped(
    dtype: DType,
    dims: &[usize],
    old: &Tensor,
    new: &Tensor,
    coefficients: &[Option<f64>],
    what: &str,
) -> Result<()> {
    let (_, len) = units(dims);
    let (old_v, new_v) = (vals(old)?, vals(new)?);
    let (old_b, new_b) = (bits(old)?, bits(new)?);
    for (u, c) in coefficients.iter().enumerate() {
        for i in u * len..(u + 1) * len {
            match c {
                None => assert_eq!(
                    old_b[i], new_b[i],
                    "{what}: unit {u} element {i} is not clipped but changed ({} -> {})",
                    old_v[i], new_v[i]
                ),
                Some(c) => {
                    let want = old_v[i] * c;
                    if want.is_nan() {
                        assert!(
                            new_v[i].is_nan(),
                            "{what}: unit {u} element {i}: {} not NaN",
                            new_v[i]
                        );
                        continue;
                    }
                    let tol = ulp(dtype, want)
                        + if dtype == DType::F64 {
                            1e-13 * want.abs()
                        } else {
                            0.0
                        };
                    assert!(
                        (new_v[i] - want).abs() <= tol,
                        "{what}: unit {u} element {i}: {} * {c} = {want}, got {}",
                        old_v[i],
                        new_v[i]
                    );
                }
            }
        }
    }
    Ok(())
}

/// A var of `shape` and `dtype` whose units have random norms (one unit in five all zeros), and
/// a gradient whose unit norms lie 4× above or 4× below the unit's `clipping · max(‖w‖, eps)`
/// (far from the threshold, so that rounding never decides).
fn case(
    rng: &mut StdRng,
    shape: &[usize],
    dtype: DType,
    clipping: f64,
    eps: f64,
) -> Result<(Var, Tensor)> {
    let n: usize = shape.iter().product();
    let (count, len) = units(shape);
    let mut p = signed_values(rng, n, 1.0);
    for u in 0..count {
        if rng.gen_bool(0.2) {
            p[u * len..(u + 1) * len].iter_mut().for_each(|x| *x = 0.0);
        }
    }
    let param = tensor(&p, shape, dtype)?;
    let p = vals(&param)?;
    let mut g = signed_values(rng, n, 1.0);
    for u in 0..count {
        let unit = &mut g[u * len..(u + 1) * len];
        if unit.iter().all(|&x| x == 0.0) {
            unit[0] = 1.0;
        }
        let w: f64 = p[u * len..(u + 1) * len]
            .iter()
            .map(|x| x * x)
            .sum::<f64>()
            .sqrt();
        let gn: f64 = unit.iter().map(|x| x * x).sum::<f64>().sqrt();
        let ratio = if rng.gen_bool(0.5) { 4.0 } else { 0.25 };
        let k = ratio * clipping * w.max(eps) / gn;
        unit.iter_mut().for_each(|x| *x *= k);
    }
    Ok((Var::from_tensor(&param)?, tensor(&g, shape, dtype)?))
}

/// Runs `adaptive_clip_grad_` on fresh copies of `grads` (the same values), returning the norm and
/// the clipped gradients.
fn clip_copy(
    vars: &[Var],
    grads: &[Tensor],
    clipping: f64,
    eps: f64,
) -> Result<(Tensor, Vec<Tensor>)> {
    let mut store = GradStore::default();
    let copies: Vec<Tensor> = grads.iter().map(|g| g.copy()).collect::<Result<_>>()?;
    for (v, g) in vars.iter().zip(&copies) {
        store.insert(v, g.clone());
    }
    let norm = adaptive_clip_grad_(vars, &mut store, clipping, eps)?;
    let out = vars
        .iter()
        .map(|v| store.get(v).expect("a gradient").clone())
        .collect();
    Ok((norm, out))
}

fn store(vars: &[Var], grads: &[Tensor]) -> Result<GradStore> {
    let mut s = GradStore::default();
    for (v, g) in vars.iter().zip(grads) {
        s.insert(v, g.copy()?);
    }
    Ok(s)
}
