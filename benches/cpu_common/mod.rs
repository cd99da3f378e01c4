//! CPU helpers shared by `clip_cpu` (criterion), `cpu_ratios` and `optim_ratios` (interleaved): the
//! gradients, the naive composition a candle user writes today, the floors, and the median of
//! interleaved rounds. (Each bench uses some of them.)
#![allow(dead_code)]

use candle_core::{backprop::GradStore, Device, Result, Tensor, Var};
use rand::{rngs::StdRng, SeedableRng};
use rand_distr::{Distribution, Normal};
use rayon::prelude::*;

/// Vars and their gradients (f32, N(0, 0.01), fixed seed).
pub fn make_grads(shapes: &[Vec<usize>]) -> Result<(Vec<Var>, GradStore, usize)> {
    let mut rng = StdRng::seed_from_u64(0x5eed);
    let normal = Normal::new(0f32, 0.01).expect("valid normal");
    let mut vars = Vec::with_capacity(shapes.len());
    let mut grads = GradStore::default();
    let mut total = 0;
    for shape in shapes {
        let n: usize = shape.iter().product();
        total += n;
        let var = Var::zeros(shape.as_slice(), candle_core::DType::F32, &Device::Cpu)?;
        let data: Vec<f32> = (0..n).map(|_| normal.sample(&mut rng)).collect();
        grads.insert(
            &var,
            Tensor::from_vec(data, shape.as_slice(), &Device::Cpu)?,
        );
        vars.push(var);
    }
    Ok((vars, grads, total))
}

/// What a candle user writes today: one reduction per gradient, a host read, then a new tensor
/// per gradient put back into the store.
pub fn naive_clip(vars: &[Var], grads: &mut GradStore, max_norm: f64) -> Result<f32> {
    let mut squares = Vec::with_capacity(vars.len());
    for var in vars {
        if let Some(g) = grads.get(var) {
            squares.push(g.sqr()?.sum_all()?);
        }
    }
    let norm = Tensor::stack(&squares, 0)?
        .sum_all()?
        .sqrt()?
        .to_scalar::<f32>()?;
    let coefficient = max_norm / (norm as f64 + 1e-6);
    if coefficient < 1.0 {
        for var in vars {
            if let Some(g) = grads.get(var) {
                let scaled = (g * coefficient)?;
                grads.insert(var, scaled);
            }
        }
    }
    Ok(norm)
}

/// The floor for the no-clip case: one read pass (sum of squares) over `n` floats.
pub fn read_pass(xs: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    for c in xs.chunks_exact(16) {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += x * x;
        }
    }
    acc.iter().sum()
}

/// The extra floor for the clip case: one read-write pass (`x *= c`).
pub fn read_write_pass(xs: &mut [f32], c: f32) {
    xs.iter_mut().for_each(|x| *x *= c);
}

/// The same passes split over rayon's threads, in blocks of 32K floats: the floor for code that
/// uses every core.
pub fn read_pass_parallel(xs: &[f32]) -> f32 {
    xs.par_chunks(1 << 15).map(read_pass).sum()
}

pub fn read_write_pass_parallel(xs: &mut [f32], c: f32) {
    xs.par_chunks_mut(1 << 15)
        .for_each(|b| read_write_pass(b, c));
}

/// The median of the rounds' times.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
