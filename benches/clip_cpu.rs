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
mod cpu_common;

use std::hint::black_box;
use std::time::Duration;

use candle_grad_clip::{clip_grad_norm_, total_norm, NormType};
use cpu_common::{
    make_grads, naive_clip, read_pass, read_pass_parallel, read_write_pass,
    read_write_pass_parallel,
};
use criterion::{criterion_group, criterion_main, Criterion};

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

fn bench(c: &mut Criterion) {
    for set in param_sets() {
        let (vars, mut grads, n) = make_grads(&set.shapes).expect("gradients");
        let norm = total_norm(&vars, &grads, NormType::L2, false)
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
