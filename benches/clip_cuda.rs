//! GPU benchmarks (feature `cuda`), criterion group `gpu`: the fused kernels against a
//! device-to-device copy of the same byte count (the bandwidth ceiling). Every iteration
//! synchronises the device, so the times are real device times plus launch overhead.
//!
//! ```text
//! cargo bench --features cuda --bench clip_cuda                # every set
//! cargo bench --features cuda --bench clip_cuda -- 'set_A'     # one set
//! ```
//!
//! Parameter sets, gradients ~ N(0, 0.01):
//! - A: 4×(4096×4096) + 8×(4096×1024) + 188×4096 ≈ 101M parameters in 200 tensors (f32, bf16);
//! - C: 1000 tensors of 1000 (f32);
//! - D: 10,000 tensors of 1000 (f32).
//!
//! Cases: `clip` (`max_norm = 0`: the coefficient is 0 every iteration, so every call reads the
//! gradients for the norm and then reads and writes them to scale), `noclip` (`max_norm = 1e30`:
//! the scale kernel exits at once), `norm` (`total_norm` only), and `copy` (`cuMemcpyDtoDAsync`
//! of the gradients' byte count: reads and writes it once), and gradient accumulation
//! (`accumulate`, `accumulate_f32`, `accumulate_zero`, `accumulate_candle`; see
//! `accumulate_cases`). PyTorch's
//! `clip_grad_norm_(foreach=True)` on the same shapes is timed by `scripts/torch_clip_bench.py`.

mod common;

use std::hint::black_box;
use std::time::Duration;

use candle_core::{backprop::GradStore, DType, Device, Result, Tensor, Var};
use candle_grad_clip::{
    clip_grad_norm_, total_norm, ClipSetting, FusedAdamW, GradAccumulator, NormType, ZClip,
};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use common::rekey;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

struct ParamSet {
    name: &'static str,
    shapes: Vec<Vec<usize>>,
    dtypes: &'static [DType],
}

fn param_sets() -> Vec<ParamSet> {
    let a = common::set_a_shapes();
    vec![
        ParamSet {
            name: "set_A_101M_200",
            shapes: a,
            dtypes: &[DType::F32, DType::BF16],
        },
        ParamSet {
            name: "set_C_1M_1000",
            shapes: vec![vec![1000]; 1000],
            dtypes: &[DType::F32],
        },
        ParamSet {
            name: "set_D_10M_10000",
            shapes: vec![vec![1000]; 10_000],
            dtypes: &[DType::F32],
        },
    ]
}

/// Vars (tiny keys) and their gradients on the device, N(0, 0.01) from candle's device RNG.
fn make_grads(
    dev: &Device,
    shapes: &[Vec<usize>],
    dtype: DType,
) -> Result<(Vec<Var>, GradStore, usize)> {
    dev.set_seed(0x5eed)?;
    let mut vars = Vec::with_capacity(shapes.len());
    let mut grads = GradStore::default();
    let mut bytes = 0;
    for shape in shapes {
        let var = Var::zeros(1, dtype, dev)?;
        let g = Tensor::randn(0f32, 0.01, shape.as_slice(), dev)?.to_dtype(dtype)?;
        bytes += g.elem_count() * dtype.size_in_bytes();
        grads.insert(&var, g);
        vars.push(var);
    }
    dev.synchronize()?;
    Ok((vars, grads, bytes))
}

fn bench_gpu(c: &mut Criterion) {
    let dev = match Device::new_cuda(0) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("skipping the GPU benchmarks: no CUDA device ({e})");
            return;
        }
    };
    let cuda = dev.as_cuda_device().expect("a CUDA device").clone();
    let stream = cuda.cuda_stream();
    let mut group = c.benchmark_group("gpu");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    for set in param_sets() {
        for &dtype in set.dtypes {
            let (vars, mut grads, bytes) =
                make_grads(&dev, &set.shapes, dtype).expect("gradients on the device");
            let id = |case: &str| {
                format!(
                    "{}/{}/{case}",
                    set.name,
                    format!("{dtype:?}").to_lowercase()
                )
            };
            group.throughput(Throughput::Bytes(bytes as u64));
            group.bench_function(id("noclip"), |b| {
                b.iter(|| {
                    black_box(clip_grad_norm_(&vars, &mut grads, 1e30).expect("clip"));
                    dev.synchronize().expect("sync");
                })
            });
            group.bench_function(id("norm"), |b| {
                b.iter(|| {
                    black_box(total_norm(&vars, &grads, NormType::L2, false).expect("norm"));
                    dev.synchronize().expect("sync");
                })
            });
            accumulate_cases(&mut group, &dev, &set.shapes, &grads, &vars, dtype, &id)
                .expect("accumulation cases");
            // Before `clip`, which zeroes the gradients: the clipped optimizer step must clip.
            if set.name == "set_A_101M_200" && dtype == DType::F32 {
                optimizer_cases(&mut group, &dev, &set.shapes, &grads, &vars, &id);
            }
            group.bench_function(id("clip"), |b| {
                b.iter(|| {
                    black_box(clip_grad_norm_(&vars, &mut grads, 0.0).expect("clip"));
                    dev.synchronize().expect("sync");
                })
            });
            let src = cuda.alloc_zeros::<u8>(bytes).expect("copy source");
            let mut dst = cuda.alloc_zeros::<u8>(bytes).expect("copy destination");
            group.bench_function(id("copy"), |b| {
                b.iter(|| {
                    stream.memcpy_dtod(&src, &mut dst).expect("copy");
                    dev.synchronize().expect("sync");
                })
            });
        }
    }
    group.finish();
}

/// Gradient accumulation (`GradAccumulator`, issue 23) on vars of the set's shapes:
/// `accumulate` (`add` in the gradients' dtype: reads both, writes the sum, 3x the gradient
/// bytes for F32), `accumulate_f32` (BF16 gradients into F32 buffers: 2 + 4 + 4 bytes a
/// parameter), `accumulate_zero` (`zero_`: one write), and `accumulate_candle` (candle's
/// `(acc + g)?` per var, a new tensor each).
fn accumulate_cases(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    dev: &Device,
    shapes: &[Vec<usize>],
    grads: &GradStore,
    keys: &[Var],
    dtype: DType,
    id: &dyn Fn(&str) -> String,
) -> Result<()> {
    let vars: Vec<Var> = shapes
        .iter()
        .map(|s| Var::zeros(s.as_slice(), dtype, dev))
        .collect::<Result<_>>()?;
    let grads = rekey(grads, keys, &vars);
    let mut acc = GradAccumulator::new(&vars)?;
    if dtype != DType::F32 {
        acc = acc.accumulate_in(DType::F32)?;
    }
    acc.add(&grads)?;
    let case = if dtype == DType::F32 {
        "accumulate"
    } else {
        "accumulate_f32"
    };
    group.bench_function(id(case), |b| {
        b.iter(|| {
            acc.add(&grads).expect("add");
            dev.synchronize().expect("sync");
        })
    });
    group.bench_function(id("accumulate_zero"), |b| {
        b.iter(|| {
            acc.zero_().expect("zero_");
            dev.synchronize().expect("sync");
        })
    });
    let mut candle = GradStore::default();
    for v in &vars {
        candle.insert(v, v.as_tensor().zeros_like()?);
    }
    group.bench_function(id("accumulate_candle"), |b| {
        b.iter(|| {
            for v in &vars {
                let sum = (candle.get(v).expect("started") + grads.get(v).expect("a gradient"))
                    .expect("add");
                candle.insert(v, sum);
            }
            dev.synchronize().expect("sync");
        })
    });
    Ok(())
}

/// The optimizer steps on real parameters of the set's shapes (the gradients of `vars` reused:
/// N(0, 0.01), a norm of about 100, so that `ClipSetting::norm(1.0)` clips every step).
fn optimizer_cases(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    dev: &Device,
    shapes: &[Vec<usize>],
    grads: &GradStore,
    vars: &[Var],
    id: &dyn Fn(&str) -> String,
) {
    let params = || -> Vec<Var> {
        shapes
            .iter()
            .map(|s| Var::zeros(s.as_slice(), DType::F32, dev).expect("param"))
            .collect()
    };
    let config = ParamsAdamW::default();
    let ps = params();
    let fused = FusedAdamW::new(ps.clone(), config.clone()).expect("FusedAdamW");
    time_steps(group, dev, &id("adamw"), fused, &rekey(grads, vars, &ps));
    let ps = params();
    let clipped = FusedAdamW::new(ps.clone(), config.clone())
        .and_then(|o| o.with_clip(ClipSetting::norm(1.0)))
        .expect("FusedAdamW with a clip");
    time_steps(
        group,
        dev,
        &id("adamw_clip"),
        clipped,
        &rekey(grads, vars, &ps),
    );
    // The policies folded into the step: ZClip (its statistics updated by a kernel between the
    // reduction and the step; spikes are clipped after 3 warm-up steps) and AGC (unit-wise).
    for (name, setting) in [
        (
            "adamw_zclip",
            ClipSetting::ZClip(ZClip::new().with_warmup_steps(3)),
        ),
        ("adamw_agc", ClipSetting::agc(0.01)),
    ] {
        let ps = params();
        let opt = FusedAdamW::new(ps.clone(), config.clone())
            .and_then(|o| o.with_clip(setting))
            .expect("FusedAdamW with a policy");
        time_steps(group, dev, &id(name), opt, &rekey(grads, vars, &ps));
    }
    let ps = params();
    let candle = AdamW::new(ps.clone(), config).expect("AdamW");
    time_steps(
        group,
        dev,
        &id("adamw_candle"),
        candle,
        &rekey(grads, vars, &ps),
    );
}

/// Times `optimizer.step(grads)`, each synchronised; the optimizer (and its state) is dropped
/// afterwards.
fn time_steps<O: Optimizer>(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    dev: &Device,
    id: &str,
    mut optimizer: O,
    grads: &GradStore,
) {
    group.bench_function(id, |b| {
        b.iter(|| {
            optimizer.step(grads).expect("step");
            dev.synchronize().expect("sync");
        })
    });
}

criterion_group!(benches, bench_gpu);
criterion_main!(benches);
