//! CPU benchmarks: this crate against the naive composition a candle user writes today and
//! against the machine's floor (one plain read pass, one plain read-write pass over a buffer of
//! the same size), side by side in one run.
//!
//! ```text
//! cargo bench --bench clip_cpu                 # every set
//! cargo bench --bench clip_cpu -- 'set_C'      # one set
//! ```
//!
//! The floors are plain loops over one `Vec<f32>` of the same length, on one thread and on all of
//! rayon's threads (`RAYON_NUM_THREADS` sets the count for the crate and the parallel floors).
//!
//! Parameter sets shaped like real models, f32 gradients ~ N(0, 0.01):
//! - A: 4×(4096×4096) + 8×(4096×1024) + 188×4096 ≈ 101M parameters in 200 tensors;
//! - B: 100×(1000×100) = 10M parameters in 100 tensors;
//! - C: 1000 tensors of 1000.

mod common;

use std::hint::black_box;
use std::time::Duration;

use candle_core::{backprop::GradStore, Device, Result, Tensor, Var};
use candle_grad_clip::{clip_grad_norm_, total_norm, NormType};
use criterion::{criterion_group, criterion_main, Criterion};
use rand::{rngs::StdRng, SeedableRng};
use rand_distr::{Distribution, Normal};
use rayon::prelude::*;

struct ParamSet {
    name: &'static str,
    shapes: Vec<Vec<usize>>,
}

fn param_sets() -> Vec<ParamSet> {
    let a = common::set_a_shapes();
    vec![
        ParamSet {
            name: "set_A_101M_200",
            shapes: a,
        },
        ParamSet {
            name: "set_B_10M_100",
            shapes: vec![vec![1000, 100]; 100],
        },
        ParamSet {
            name: "set_C_1M_1000",
            shapes: vec![vec![1000]; 1000],
        },
    ]
}

/// Vars and their gradients (f32, N(0, 0.01), fixed seed).
fn make_grads(shapes: &[Vec<usize>]) -> Result<(Vec<Var>, GradStore, usize)> {
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
fn naive_clip(vars: &[Var], grads: &mut GradStore, max_norm: f64) -> Result<f32> {
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
fn read_pass(xs: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    for c in xs.chunks_exact(16) {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += x * x;
        }
    }
    acc.iter().sum()
}

/// The extra floor for the clip case: one read-write pass (`x *= c`).
fn read_write_pass(xs: &mut [f32], c: f32) {
    xs.iter_mut().for_each(|x| *x *= c);
}

/// The same passes split over rayon's threads, in blocks of 32K floats: the floor for code that
/// uses every core.
fn read_pass_parallel(xs: &[f32]) -> f32 {
    xs.par_chunks(1 << 15).map(read_pass).sum()
}

fn read_write_pass_parallel(xs: &mut [f32], c: f32) {
    xs.par_chunks_mut(1 << 15)
        .for_each(|b| read_write_pass(b, c));
}

fn bench(c: &mut Criterion) {
    for set in param_sets() {
        let (vars, mut grads, n) = make_grads(&set.shapes).expect("gradients");
        let norm = total_norm(&vars, &grads, NormType::L2)
            .and_then(|t| t.to_scalar::<f32>())
            .expect("norm") as f64;
        // In the clip case every call must really scale: each iteration clips to 0.999 of the
        // previous target, so the norm before the call is always above max_norm. The values
        // shrink by 0.999 per call, far from denormals within a run.
        let mut clip_to = norm;
        let mut next_target = move || {
            clip_to *= 0.999;
            clip_to
        };
        let mut group = c.benchmark_group(set.name);
        group.sample_size(10);
        group.warm_up_time(Duration::from_secs(1));
        group.measurement_time(Duration::from_secs(if n > 50_000_000 { 12 } else { 4 }));

        group.bench_function("crate/no_clip", |b| {
            b.iter(|| clip_grad_norm_(black_box(&vars), &mut grads, 1e30).expect("clip"))
        });
        group.bench_function("crate/clip", |b| {
            b.iter(|| clip_grad_norm_(black_box(&vars), &mut grads, next_target()).expect("clip"))
        });
        group.bench_function("naive/no_clip", |b| {
            b.iter(|| naive_clip(black_box(&vars), &mut grads, 1e30).expect("naive"))
        });
        group.bench_function("naive/clip", |b| {
            b.iter(|| naive_clip(black_box(&vars), &mut grads, next_target()).expect("naive"))
        });

        let mut buffer: Vec<f32> = vec![0.01; n];
        group.bench_function("floor/read", |b| b.iter(|| read_pass(black_box(&buffer))));
        group.bench_function("floor/read_write", |b| {
            b.iter(|| read_write_pass(black_box(&mut buffer), black_box(0.999_999)))
        });
        group.bench_function("floor/read_parallel", |b| {
            b.iter(|| read_pass_parallel(black_box(&buffer)))
        });
        group.bench_function("floor/read_write_parallel", |b| {
            b.iter(|| read_write_pass_parallel(black_box(&mut buffer), black_box(0.999_999)))
        });
        group.finish();
        drop(buffer);
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
