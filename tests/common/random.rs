//! Seeded gradient values: for optimizer tests, for the optimizer twins (two sets of vars with the
//! same values, one under test and one for its reference), and scaled ones for `GradScaler`.

use candle_core::{backprop::GradStore, DType, Device, Result, Tensor, Var};
use candle_nn::VarMap;
use rand::{rngs::StdRng, Rng, SeedableRng};

use super::tensor;

/// Seeded values for optimizer tests: normal, spread over four decades around `scale`, with exact
/// zeros and negative zeros mixed in.
pub fn signed_values(rng: &mut StdRng, n: usize, scale: f64) -> Vec<f64> {
    use rand_distr::{Distribution, StandardNormal};
    (0..n)
        .map(|_| match rng.gen_range(0..20) {
            0 => 0.0,
            1 => -0.0,
            _ => {
                let x: f64 = StandardNormal.sample(rng);
                x * scale * 10f64.powi(rng.gen_range(-2..2))
            }
        })
        .collect()
}

/// Two sets of vars with the same values, one var per shape (its dtype `dtypes[k % len]` for the
/// k-th shape): one set for the optimizer under test, one for its reference. Draws
/// [`signed_values`] once per shape, in order.
pub fn twin_vars(
    rng: &mut StdRng,
    shapes: &[&[usize]],
    dtypes: &[DType],
) -> Result<(Vec<Var>, Vec<Var>)> {
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for (k, shape) in shapes.iter().enumerate() {
        let n: usize = shape.iter().product();
        let t = tensor(&signed_values(rng, n, 1.0), shape, dtypes[k % dtypes.len()])?;
        a.push(Var::from_tensor(&t)?);
        b.push(Var::from_tensor(&t)?);
    }
    Ok((a, b))
}

/// The same gradient values for both sets (fresh tensors each, [`signed_values`] times `scale`).
/// With `skip = Some(p)`, each var is left without a gradient with probability `p` (one
/// `gen_bool(p)` drawn before each var's values); with `None`, nothing more is drawn.
pub fn twin_grads(
    rng: &mut StdRng,
    a: &[Var],
    b: &[Var],
    scale: f64,
    skip: Option<f64>,
) -> Result<(GradStore, GradStore)> {
    let (mut ga, mut gb) = (GradStore::default(), GradStore::default());
    for (va, vb) in a.iter().zip(b) {
        if let Some(p) = skip {
            if rng.gen_bool(p) {
                continue;
            }
        }
        let g = signed_values(rng, va.elem_count(), scale);
        ga.insert(va, tensor(&g, va.dims(), va.dtype())?);
        gb.insert(vb, tensor(&g, vb.dims(), vb.dtype())?);
    }
    Ok((ga, gb))
}

/// Scaled gradients for `vars` (`scale` times the unscaled values) with a NaN, +inf or -inf
/// planted when `poison` is 1, 2 or 3. With `dyadic`, the unscaled values are `k / 1024` for
/// integers `|k| < 256` (8 significant bits: exact in BF16, and every sum of their squares, their
/// absolute values or their cubes over a few thousand elements is exact in `f64`, whatever the
/// order); otherwise uniform in (-0.7, 0.7) (the largest `|g|` away from a power of two, so that
/// its rounding shows in a max norm).
pub fn scaled_values(
    vars: &[Var],
    scale: f64,
    dyadic: bool,
    poison: u8,
    rng: &mut StdRng,
) -> Vec<Vec<f64>> {
    let mut values: Vec<Vec<f64>> = vars
        .iter()
        .map(|v| {
            (0..v.elem_count())
                .map(|_| {
                    let g = if dyadic {
                        rng.gen_range(-255i32..=255) as f64 / 1024.0
                    } else {
                        rng.gen_range(-0.7..0.7)
                    };
                    g * scale
                })
                .collect()
        })
        .collect();
    if poison > 0 {
        let bad = [f64::NAN, f64::INFINITY, f64::NEG_INFINITY];
        let nonempty: Vec<usize> = (0..values.len())
            .filter(|&i| !values[i].is_empty())
            .collect();
        let i = nonempty[rng.gen_range(0..nonempty.len())];
        let j = rng.gen_range(0..values[i].len());
        values[i][j] = bad[(poison - 1) as usize];
    }
    values
}

/// A CPU tensor of `shape` and `dtype` with seeded values uniform in `[-scale, scale)`.
pub fn uniform_tensor(
    rng: &mut StdRng,
    shape: &[usize],
    dtype: DType,
    scale: f64,
) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rng.gen_range(-scale..scale)).collect();
    Tensor::from_vec(v, shape.to_vec(), &Device::Cpu)?.to_dtype(dtype)
}

/// A VarMap of vars with the given names, shapes and dtypes, seeded uniform in `[-1, 1)`.
pub fn seeded_varmap(seed: u64, specs: &[(&str, &[usize], DType)]) -> Result<VarMap> {
    let mut rng = StdRng::seed_from_u64(seed);
    let varmap = VarMap::new();
    {
        let mut data = varmap.data().lock().expect("lock");
        for &(name, shape, dtype) in specs {
            data.insert(
                name.to_string(),
                Var::from_tensor(&uniform_tensor(&mut rng, shape, dtype, 1.0)?)?,
            );
        }
    }
    Ok(varmap)
}
