//! CUDA back end tests (feature `cuda`): the fused kernels against the CPU back end, an `f64`
//! reference and the host emulation of the same kernels.
//!
//! No usable GPU is a **failure**, not a pass: every test calls [`cuda`], which panics when
//! `Device::new_cuda(0)` fails, unless `CANDLE_GRAD_CLIP_ALLOW_NO_GPU=1` is set (then each test
//! prints `SKIPPED (no GPU): …` to stderr and returns). A test that cannot run one of its parts on
//! this GPU (too little memory, …) prints `SKIPPED: <test>: <reason>` to stderr; `scripts/gpu-check.sh
//! run` counts those lines and fails if there is any. All tests share one device (one PTX load and
//! JIT per process). Built with the feature on a machine without a driver, the binary cannot even
//! start: it links libcuda.
#![cfg(feature = "cuda")]

use std::sync::OnceLock;
use std::time::{Duration, Instant};

// By name: this file has its own `tensor`, `scalar` and `random_values` (on a device).
mod common;

use candle_core::{backprop::GradStore, DType, Device, Result, Tensor, Var};
use candle_grad_clip::{
    clip_grad_norm_, clip_grad_value_, clip_grads_with_norm_, grad_norms, total_norm, ClipGradNorm,
    KernelEmulation, NormType, ZClip,
};
use common::{assert_named_norms, ulp, DTYPES};
use rand::{rngs::StdRng, Rng, SeedableRng};
use rand_distr::{Distribution, Normal};

const NORMS: [NormType; 7] = [
    NormType::L1,
    NormType::L2,
    NormType::Inf,
    NormType::P(3.0),
    NormType::P(0.5),
    NormType::P(7.5),
    NormType::P(2.0),
];

/// Set to 1 to let the CUDA tests pass without a GPU (each prints why it skipped).
const ALLOW_NO_GPU: &str = "CANDLE_GRAD_CLIP_ALLOW_NO_GPU";

/// The GPU shared by every test, or `None` (after saying so on stderr) when there is none and
/// [`ALLOW_NO_GPU`] allows that. Panics when there is none and skipping is not allowed.
fn cuda(test: &str) -> Option<Device> {
    static DEVICE: OnceLock<std::result::Result<Device, String>> = OnceLock::new();
    match DEVICE.get_or_init(|| Device::new_cuda(0).map_err(|e| e.to_string())) {
        Ok(d) => Some(d.clone()),
        Err(e) if std::env::var(ALLOW_NO_GPU).is_ok_and(|v| v == "1") => {
            loud(&format!("SKIPPED (no GPU): {test}: {e}"));
            None
        }
        Err(e) => panic!(
            "no usable CUDA device ({e}); the CUDA tests need a GPU (set {ALLOW_NO_GPU}=1 to skip them)"
        ),
    }
}

macro_rules! cuda_or_skip {
    ($test:expr) => {
        match cuda($test) {
            Some(d) => d,
            None => return Ok(()),
        }
    };
}

/// Reports a part of a test that could not run here, loudly (scripts/gpu-check.sh counts these).
fn skipped(test: &str, reason: &str) {
    loud(&format!("SKIPPED: {test}: {reason}"));
}

/// A line on the process's stderr that the test harness does not capture (it captures only the
/// print macros), so a skip shows even when the test passes.
fn loud(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Random values, seeded, of magnitudes spread over a few decades.
fn random_values(rng: &mut StdRng, n: usize, scale: f64) -> Vec<f64> {
    let normal = Normal::new(0.0, 1.0).unwrap();
    (0..n)
        .map(|_| normal.sample(rng) * scale * 10f64.powi(rng.gen_range(-2..3)))
        .collect()
}

/// A tensor with the given values rounded to `dtype` on the host, then moved to `dev`.
fn tensor(values: &[f64], shape: &[usize], dtype: DType, dev: &Device) -> Result<Tensor> {
    Tensor::from_vec(values.to_vec(), shape, &Device::Cpu)?
        .to_dtype(dtype)?
        .to_device(dev)
}

/// Vars (tiny: they are only keys) and a store holding `grads` as their gradients.
fn store(grads: &[Tensor]) -> Result<(Vec<Var>, GradStore)> {
    let mut store = GradStore::default();
    let mut vars = Vec::with_capacity(grads.len());
    for g in grads {
        let v = Var::zeros(1, g.dtype(), g.device())?;
        store.insert(v.as_tensor(), g.clone());
        vars.push(v);
    }
    Ok((vars, store))
}

fn values(t: &Tensor) -> Result<Vec<f64>> {
    t.to_device(&Device::Cpu)?
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()
}

fn scalar(t: &Tensor) -> Result<f64> {
    t.to_device(&Device::Cpu)?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()
}

fn close(a: f64, b: f64, rel: f64) -> bool {
    (a.is_nan() && b.is_nan()) || a == b || (a - b).abs() <= rel * a.abs().max(b.abs())
}

/// Elements scaled on two back ends whose norms (and so coefficients) may differ in their last
/// bits: both products are rounded once from f64 (the CPU's conversions round correctly too), so
/// they differ by at most one unit in the last place of `dtype` (F64: the norms' own 1e-12).
fn assert_within_one_ulp(got: &[f64], want: &[f64], dtype: DType, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let tol = if dtype == DType::F64 {
            w.abs() * 1e-12
        } else {
            ulp(dtype, *w)
        };
        assert!(
            (g.is_nan() && w.is_nan()) || g == w || (g - w).abs() <= tol,
            "{what}: element {i}: got {g:e}, want {w:e} ({dtype:?}, tol {tol:e})"
        );
    }
}

fn bits_equal(a: &[f64], b: &[f64]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| (x.is_nan() && y.is_nan()) || x.to_bits() == y.to_bits())
}

/// The norm in plain f64 (sum of |x|^p in f64, the reference).
fn reference_norm(all: &[Vec<f64>], norm: NormType) -> f64 {
    let xs = all.iter().flatten().map(|x| x.abs());
    match norm {
        NormType::Inf => xs.fold(0.0, |m: f64, x| {
            if x.is_nan() || m.is_nan() {
                f64::NAN
            } else {
                m.max(x)
            }
        }),
        NormType::L1 => xs.sum(),
        NormType::L2 => xs.map(|x| x * x).sum::<f64>().sqrt(),
        NormType::P(p) => xs.map(|x| x.powf(p)).sum::<f64>().powf(1.0 / p),
    }
}

fn to_cpu(grads: &[Tensor]) -> Result<Vec<Tensor>> {
    grads.iter().map(|g| g.to_device(&Device::Cpu)).collect()
}

const SIZES: [usize; 9] = [1, 3, 7, 31, 4095, 4096, 4097, 70_001, 0];

#[test]
fn norms_match_cpu_and_f64_reference() -> Result<()> {
    let dev = cuda_or_skip!("norms_match_cpu_and_f64_reference");
    let mut rng = StdRng::seed_from_u64(1);
    for dtype in DTYPES {
        let vals: Vec<Vec<f64>> = SIZES
            .iter()
            .map(|&n| random_values(&mut rng, n, 1.0))
            .collect();
        let grads: Vec<Tensor> = vals
            .iter()
            .map(|v| tensor(v, &[v.len()], dtype, &dev))
            .collect::<Result<_>>()?;
        // The reference sees the values as rounded to the dtype.
        let rounded: Vec<Vec<f64>> = grads.iter().map(values).collect::<Result<_>>()?;
        let (vars, gs) = store(&grads)?;
        let (cvars, cgs) = store(&to_cpu(&grads)?)?;
        for norm in NORMS {
            let gpu = total_norm(&vars, &gs, norm)?;
            let want_dtype = if dtype == DType::F64 {
                DType::F64
            } else {
                DType::F32
            };
            assert_eq!(gpu.dtype(), want_dtype);
            assert!(gpu.device().is_cuda());
            assert_eq!(gpu.rank(), 0);
            let gpu = scalar(&gpu)?;
            let cpu = scalar(&total_norm(&cvars, &cgs, norm)?)?;
            let reference = reference_norm(&rounded, norm);
            let rel = if dtype == DType::F64 { 1e-12 } else { 2e-7 };
            assert!(
                close(gpu, cpu, rel),
                "{dtype:?} {norm}: gpu {gpu} cpu {cpu}"
            );
            assert!(
                close(gpu, reference, rel),
                "{dtype:?} {norm}: gpu {gpu} reference {reference}"
            );
            if norm == NormType::Inf {
                assert_eq!(gpu, cpu, "the infinity norm is exact");
            }
        }
    }
    Ok(())
}

/// Clips on the GPU and on the CPU from the same values, compares the norms and every element.
fn check_clip(grads: &[Tensor], clip: ClipGradNorm, what: &str) -> Result<()> {
    let cpu_grads = to_cpu(grads)?;
    let (vars, mut gs) = store(grads)?;
    let (cvars, mut cgs) = store(&cpu_grads)?;
    let gpu_norm = clip.clip_(&vars, &mut gs)?;
    let cpu_norm = clip.clip_(&cvars, &mut cgs)?;
    assert_eq!(gpu_norm.dtype(), cpu_norm.dtype(), "{what}: norm dtype");
    let (g, c) = (scalar(&gpu_norm)?, scalar(&cpu_norm)?);
    assert!(close(g, c, 1e-6), "{what}: norm gpu {g} cpu {c}");
    for (i, (v, cv)) in vars.iter().zip(&cvars).enumerate() {
        let got = values(gs.get(v.as_tensor()).unwrap())?;
        let want = values(cgs.get(cv.as_tensor()).unwrap())?;
        assert_within_one_ulp(&got, &want, grads[i].dtype(), &format!("{what}: grad {i}"));
    }
    Ok(())
}

#[test]
fn clip_matches_cpu_for_every_dtype_and_norm() -> Result<()> {
    let dev = cuda_or_skip!("clip_matches_cpu_for_every_dtype_and_norm");
    let mut rng = StdRng::seed_from_u64(2);
    for dtype in DTYPES {
        for norm in NORMS {
            let grads: Vec<Tensor> = SIZES
                .iter()
                .map(|&n| tensor(&random_values(&mut rng, n, 1.0), &[n], dtype, &dev))
                .collect::<Result<_>>()?;
            check_clip(
                &grads,
                ClipGradNorm::new(0.5).norm_type(norm),
                &format!("{dtype:?} {norm}"),
            )?;
        }
    }
    Ok(())
}

#[test]
fn no_clip_leaves_gradients_bitwise_unchanged() -> Result<()> {
    let dev = cuda_or_skip!("no_clip_leaves_gradients_bitwise_unchanged");
    let mut rng = StdRng::seed_from_u64(3);
    for dtype in DTYPES {
        let grads: Vec<Tensor> = SIZES
            .iter()
            .map(|&n| tensor(&random_values(&mut rng, n, 1.0), &[n], dtype, &dev))
            .collect::<Result<_>>()?;
        let before: Vec<Vec<f64>> = grads.iter().map(values).collect::<Result<_>>()?;
        let (vars, mut gs) = store(&grads)?;
        clip_grad_norm_(&vars, &mut gs, 1e30)?;
        for (b, g) in before.iter().zip(&grads) {
            assert!(
                bits_equal(b, &values(g)?),
                "{dtype:?}: modified without clipping"
            );
        }
    }
    Ok(())
}

#[test]
fn mixed_dtypes_in_one_call() -> Result<()> {
    let dev = cuda_or_skip!("mixed_dtypes_in_one_call");
    let mut rng = StdRng::seed_from_u64(4);
    let mut grads = Vec::new();
    for (i, &n) in SIZES.iter().enumerate() {
        let dtype = DTYPES[i % 4];
        grads.push(tensor(&random_values(&mut rng, n, 1.0), &[n], dtype, &dev)?);
    }
    for norm in NORMS {
        check_clip(
            &grads,
            ClipGradNorm::new(0.25).norm_type(norm),
            &format!("mixed {norm}"),
        )?;
    }
    // All F64: the norm is F64.
    let f64s = vec![tensor(&[3.0, 4.0], &[2], DType::F64, &dev)?];
    let (vars, gs) = store(&f64s)?;
    let n = total_norm(&vars, &gs, NormType::L2)?;
    assert_eq!(n.dtype(), DType::F64);
    assert_eq!(scalar(&n)?, 5.0);
    Ok(())
}

#[test]
fn huge_tiny_and_nonfinite_values() -> Result<()> {
    let dev = cuda_or_skip!("huge_tiny_and_nonfinite_values");
    let cases: Vec<(DType, Vec<f64>)> = vec![
        // Squares overflow f64: the rescue pass must give a finite norm.
        (DType::F64, vec![1e200, -3e200, 4e200]),
        (DType::F64, vec![f64::MAX, f64::MAX]),
        // Squares underflow.
        (DType::F64, vec![1e-200, 3e-200, -4e-200, 5e-320]),
        // f32 values whose 8th powers overflow f64 (p > 6 rescue).
        (DType::F32, vec![1e38, -2e38, 3e37]),
        (DType::F32, vec![1e-38, 2e-40, -1e-39]),
        (DType::F32, vec![1.0, f64::NAN, 2.0]),
        (DType::F32, vec![1.0, f64::INFINITY, -2.0]),
        (DType::F32, vec![1.0, f64::NEG_INFINITY, f64::NAN]),
        (DType::BF16, vec![1.0, f64::NAN, 2.0]),
        (DType::F16, vec![65504.0, -65504.0, 1.0]),
        (DType::F64, vec![1.0, f64::INFINITY, 3.0]),
        (DType::F64, vec![0.0, 0.0, -0.0]),
    ];
    for (dtype, vals) in &cases {
        for norm in [
            NormType::L1,
            NormType::L2,
            NormType::Inf,
            NormType::P(8.0),
            NormType::P(3.0),
        ] {
            let grads = vec![tensor(vals, &[vals.len()], *dtype, &dev)?];
            let (vars, gs) = store(&grads)?;
            let (cvars, cgs) = store(&to_cpu(&grads)?)?;
            let g = scalar(&total_norm(&vars, &gs, norm)?)?;
            let c = scalar(&total_norm(&cvars, &cgs, norm)?)?;
            assert!(
                close(g, c, 1e-12),
                "{dtype:?} {vals:?} {norm}: gpu {g} cpu {c}"
            );
            check_clip(
                &grads,
                ClipGradNorm::new(1.0).norm_type(norm),
                &format!("{dtype:?} {vals:?} {norm}"),
            )?;
        }
    }
    Ok(())
}

#[test]
fn error_if_nonfinite_modifies_nothing() -> Result<()> {
    let dev = cuda_or_skip!("error_if_nonfinite_modifies_nothing");
    for bad in [f64::NAN, f64::INFINITY] {
        for dtype in DTYPES {
            let grads = vec![
                tensor(&[30.0, 40.0], &[2], dtype, &dev)?,
                tensor(&[1.0, bad, 2.0], &[3], dtype, &dev)?,
            ];
            let before: Vec<Vec<f64>> = grads.iter().map(values).collect::<Result<_>>()?;
            let (vars, mut gs) = store(&grads)?;
            let r = ClipGradNorm::new(1.0)
                .error_if_nonfinite(true)
                .clip_(&vars, &mut gs);
            assert!(r.is_err(), "{dtype:?} {bad}: expected an error");
            for (b, g) in before.iter().zip(&grads) {
                assert!(bits_equal(b, &values(g)?), "{dtype:?} {bad}: modified");
            }
        }
    }
    // Finite norms still clip with the option set.
    let grads = vec![tensor(&[30.0, 40.0], &[2], DType::F32, &dev)?];
    let (vars, mut gs) = store(&grads)?;
    let n = ClipGradNorm::new(5.0)
        .error_if_nonfinite(true)
        .clip_(&vars, &mut gs)?;
    assert_eq!(scalar(&n)?, 50.0);
    let c = 5.0 / (50.0 + 1e-6);
    assert_within_one_ulp(
        &values(&grads[0])?,
        &[30.0 * c, 40.0 * c],
        DType::F32,
        "clipped",
    );
    Ok(())
}

#[test]
fn empty_tensors() -> Result<()> {
    let dev = cuda_or_skip!("empty_tensors");
    let made = (|| -> Result<Vec<Tensor>> {
        Ok(vec![
            Tensor::zeros(0, DType::F32, &dev)?,
            Tensor::zeros((3, 0), DType::BF16, &dev)?,
        ])
    })();
    let empty = match made {
        Ok(t) => t,
        Err(e) => {
            skipped(
                "empty_tensors",
                &format!("candle cannot make empty CUDA tensors here ({e})"),
            );
            return Ok(());
        }
    };
    let (vars, mut gs) = store(&empty)?;
    for norm in NORMS {
        let n = total_norm(&vars, &gs, norm)?;
        assert_eq!(scalar(&n)?, 0.0);
        assert!(n.device().is_cuda());
    }
    let n = clip_grad_norm_(&vars, &mut gs, 1.0)?;
    assert_eq!(scalar(&n)?, 0.0);
    clip_grad_value_(&vars, &mut gs, 1.0)?;
    clip_grads_with_norm_(&vars, &mut gs, 1.0, &n)?;
    // Mixed with non-empty ones.
    let mut grads = empty.clone();
    grads.push(tensor(&[3.0, 4.0], &[2], DType::F32, &dev)?);
    check_clip(&grads, ClipGradNorm::new(1.0), "empty + [3, 4]")?;
    Ok(())
}

#[test]
fn one_and_5000_tensors() -> Result<()> {
    let dev = cuda_or_skip!("one_and_5000_tensors");
    let mut rng = StdRng::seed_from_u64(5);
    let one = vec![tensor(
        &random_values(&mut rng, 1000, 1.0),
        &[10, 100],
        DType::F32,
        &dev,
    )?];
    check_clip(&one, ClipGradNorm::new(1.0), "one tensor")?;
    let many: Vec<Tensor> = (0..5000)
        .map(|i| {
            let n = 1 + (i * 37) % 300;
            tensor(&random_values(&mut rng, n, 1.0), &[n], DTYPES[i % 4], &dev)
        })
        .collect::<Result<_>>()?;
    check_clip(&many, ClipGradNorm::new(1.0), "5000 tensors")?;
    check_clip(
        &many,
        ClipGradNorm::new(1.0).norm_type(NormType::Inf),
        "5000 tensors, inf",
    )?;
    Ok(())
}

/// Gradients that are views of shared buffers: narrowed (at an offset, misaligned), transposed
/// (non-contiguous), aliasing one another. Each buffer must be scaled exactly once, as on the CPU.
#[test]
fn offsets_transposes_and_aliases() -> Result<()> {
    let dev = cuda_or_skip!("offsets_transposes_and_aliases");
    let mut rng = StdRng::seed_from_u64(6);
    for dtype in DTYPES {
        let a_vals = random_values(&mut rng, 64 * 48, 1.0);
        let b_vals = random_values(&mut rng, 10_000, 1.0);
        let c_vals = random_values(&mut rng, 4 * 5 * 6, 1.0);
        let build = |dev: &Device| -> Result<(Vec<Tensor>, Vec<Tensor>)> {
            let a = tensor(&a_vals, &[64, 48], dtype, dev)?;
            let b = tensor(&b_vals, &[10_000], dtype, dev)?;
            let c = tensor(&c_vals, &[4, 5, 6], dtype, dev)?;
            let views = vec![
                a.t()?,                              // transposed: non-contiguous, whole buffer
                b.narrow(0, 1, 9_001)?,              // offset 1: misaligned
                b.narrow(0, 5_000, 5_000)?,          // overlaps the previous view
                c.transpose(0, 2)?.narrow(1, 1, 3)?, // strided at an offset
            ];
            Ok((vec![a, b, c], views))
        };
        let (bufs, views) = build(&dev)?;
        let (cbufs, cviews) = build(&Device::Cpu)?;
        for norm in [NormType::L2, NormType::L1, NormType::Inf] {
            let (vars, gs) = store(&views)?;
            let (cvars, cgs) = store(&cviews)?;
            let g = scalar(&total_norm(&vars, &gs, norm)?)?;
            let c = scalar(&total_norm(&cvars, &cgs, norm)?)?;
            assert!(close(g, c, 1e-6), "{dtype:?} {norm}: gpu {g} cpu {c}");
        }
        let (vars, mut gs) = store(&views)?;
        let (cvars, mut cgs) = store(&cviews)?;
        clip_grad_norm_(&vars, &mut gs, 0.1)?;
        clip_grad_norm_(&cvars, &mut cgs, 0.1)?;
        for (i, (b, cb)) in bufs.iter().zip(&cbufs).enumerate() {
            assert_within_one_ulp(
                &values(b)?,
                &values(cb)?,
                dtype,
                &format!("{dtype:?} buffer {i}"),
            );
        }
        // Value clipping through the same views.
        let (vars, mut gs) = store(&views)?;
        let (cvars, mut cgs) = store(&cviews)?;
        clip_grad_value_(&vars, &mut gs, 0.003)?;
        clip_grad_value_(&cvars, &mut cgs, 0.003)?;
        for (i, (b, cb)) in bufs.iter().zip(&cbufs).enumerate() {
            assert!(
                bits_equal(&values(b)?, &values(cb)?),
                "{dtype:?} clamp buffer {i}"
            );
        }
    }
    Ok(())
}

#[test]
fn norms_are_bitwise_reproducible_and_order_independent() -> Result<()> {
    let dev = cuda_or_skip!("norms_are_bitwise_reproducible_and_order_independent");
    let mut rng = StdRng::seed_from_u64(7);
    let vals: Vec<Vec<f64>> = (0..300)
        .map(|i| random_values(&mut rng, 1 + (i * 7919) % 20_000, 1.0))
        .collect();
    let grads: Vec<Tensor> = vals
        .iter()
        .enumerate()
        .map(|(i, v)| tensor(v, &[v.len()], DTYPES[i % 4], &dev))
        .collect::<Result<_>>()?;
    let (vars, gs) = store(&grads)?;
    let mut reversed = vars.clone();
    reversed.reverse();
    for norm in NORMS {
        let first = scalar(&total_norm(&vars, &gs, norm)?)?.to_bits();
        for _ in 0..20 {
            assert_eq!(
                scalar(&total_norm(&vars, &gs, norm)?)?.to_bits(),
                first,
                "{norm}: repeat"
            );
        }
        assert_eq!(
            scalar(&total_norm(&reversed, &gs, norm)?)?.to_bits(),
            first,
            "{norm}: reversed"
        );
    }
    // The same values at another (misaligned) address give the same bits: the summation order
    // depends on the element indices only.
    let shifted: Vec<Tensor> = grads
        .iter()
        .map(|g| {
            let padded = Tensor::cat(&[&Tensor::zeros(1, g.dtype(), &dev)?, g], 0)?;
            padded.narrow(0, 1, g.elem_count())
        })
        .collect::<Result<_>>()?;
    let (svars, sgs) = store(&shifted)?;
    for norm in NORMS {
        let a = scalar(&total_norm(&vars, &gs, norm)?)?.to_bits();
        let b = scalar(&total_norm(&svars, &sgs, norm)?)?.to_bits();
        assert_eq!(a, b, "{norm}: misaligned copy");
    }
    Ok(())
}

#[test]
fn clip_grads_with_norm_reads_the_norm_on_the_device() -> Result<()> {
    let dev = cuda_or_skip!("clip_grads_with_norm_reads_the_norm_on_the_device");
    let mut rng = StdRng::seed_from_u64(8);
    for norm_dtype in DTYPES {
        for dtype in DTYPES {
            let grads: Vec<Tensor> = [100, 5000]
                .iter()
                .map(|&n| tensor(&random_values(&mut rng, n, 1.0), &[n], dtype, &dev))
                .collect::<Result<_>>()?;
            let cpu_grads = to_cpu(&grads)?;
            let (vars, mut gs) = store(&grads)?;
            let (cvars, mut cgs) = store(&cpu_grads)?;
            let norm = Tensor::new(37.5f64, &dev)?.to_dtype(norm_dtype)?;
            clip_grads_with_norm_(&vars, &mut gs, 2.0, &norm)?;
            clip_grads_with_norm_(&cvars, &mut cgs, 2.0, &norm.to_device(&Device::Cpu)?)?;
            for (g, c) in grads.iter().zip(&cpu_grads) {
                // Same norm value on both sides: the same coefficient and one correct rounding of
                // the same f64 product, so every dtype is bitwise the CPU's.
                let (gv, cv) = (values(g)?, values(c)?);
                assert!(bits_equal(&gv, &cv), "{norm_dtype:?} {dtype:?}");
            }
            // A norm below max_norm: nothing changes.
            let before: Vec<Vec<f64>> = grads.iter().map(values).collect::<Result<_>>()?;
            let small = Tensor::new(0.5f64, &dev)?.to_dtype(norm_dtype)?;
            clip_grads_with_norm_(&vars, &mut gs, 2.0, &small)?;
            for (b, g) in before.iter().zip(&grads) {
                assert!(bits_equal(b, &values(g)?));
            }
            // A NaN norm poisons the gradients, as on the CPU.
            let nan = Tensor::new(f64::NAN, &dev)?.to_dtype(norm_dtype)?;
            clip_grads_with_norm_(&vars, &mut gs, 2.0, &nan)?;
            assert!(values(&grads[0])?.iter().all(|x| x.is_nan()));
        }
    }
    Ok(())
}

#[test]
fn clip_grad_value_matches_cpu_bitwise() -> Result<()> {
    let dev = cuda_or_skip!("clip_grad_value_matches_cpu_bitwise");
    let mut rng = StdRng::seed_from_u64(9);
    for dtype in DTYPES {
        for clip in [0.0, 0.1, 1.0 / 3.0, 1.0, 1e10, f64::INFINITY] {
            let mut v = random_values(&mut rng, 9_999, 1.0);
            v.extend([f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -0.0, 0.0]);
            let grads = vec![
                tensor(&v, &[v.len()], dtype, &dev)?,
                tensor(&v[..17], &[17], dtype, &dev)?,
            ];
            let cpu_grads = to_cpu(&grads)?;
            let (vars, mut gs) = store(&grads)?;
            let (cvars, mut cgs) = store(&cpu_grads)?;
            clip_grad_value_(&vars, &mut gs, clip)?;
            clip_grad_value_(&cvars, &mut cgs, clip)?;
            for (g, c) in grads.iter().zip(&cpu_grads) {
                let (gv, cv) = (values(g)?, values(c)?);
                assert!(bits_equal(&gv, &cv), "{dtype:?} clip {clip}");
                assert!(gv.iter().all(|x| x.is_nan() || x.abs() <= clip));
            }
        }
    }
    Ok(())
}

#[test]
fn concurrent_threads_use_separate_scratch() -> Result<()> {
    let dev = cuda_or_skip!("concurrent_threads_use_separate_scratch");
    let handles: Vec<_> = (0..4u64)
        .map(|t| {
            let dev = dev.clone();
            std::thread::spawn(move || -> Result<()> {
                let mut rng = StdRng::seed_from_u64(100 + t);
                for round in 0..10 {
                    let grads: Vec<Tensor> = (0..20)
                        .map(|i| {
                            let n = 1 + (i * 131 + round) % 9000;
                            tensor(
                                &random_values(&mut rng, n, 1.0),
                                &[n],
                                DTYPES[(i + t as usize) % 4],
                                &dev,
                            )
                        })
                        .collect::<Result<_>>()?;
                    check_clip(
                        &grads,
                        ClipGradNorm::new(0.5),
                        &format!("thread {t} round {round}"),
                    )?;
                }
                Ok(())
            })
        })
        .collect();
    for h in handles {
        h.join().expect("thread panicked")?;
    }
    Ok(())
}

/// A bf16 tensor of more than 2^31 elements (64-bit indexing), when the GPU has the memory.
#[test]
fn more_than_2_pow_31_elements() -> Result<()> {
    let dev = cuda_or_skip!("more_than_2_pow_31_elements");
    let n: usize = (1usize << 31) + 4099;
    let (free, _) = dev
        .as_cuda_device()?
        .cuda_stream()
        .context()
        .mem_get_info()
        .map_err(|e| candle_core::Error::Msg(format!("cuMemGetInfo failed: {e:?}")))?;
    // The tensor (4 GiB) twice (cat), plus slack.
    if free < 12 << 30 {
        skipped(
            "more_than_2_pow_31_elements",
            &format!("{} GiB free on the GPU, need 12", free >> 30),
        );
        return Ok(());
    }
    let head = Tensor::ones(n - 1, DType::BF16, &dev)?;
    let tail = Tensor::new(&[4.0f32], &dev)?.to_dtype(DType::BF16)?;
    let big = Tensor::cat(&[&head, &tail], 0)?;
    drop(head);
    let (vars, mut gs) = store(std::slice::from_ref(&big))?;
    // The maximum sits past 2^31: the reduction reads it.
    assert_eq!(scalar(&total_norm(&vars, &gs, NormType::Inf)?)?, 4.0);
    let l1 = scalar(&total_norm(&vars, &gs, NormType::L1)?)?;
    assert_eq!(l1, ((n - 1) as f64 + 4.0) as f32 as f64);
    // Scale by exactly 1/2 (norm 2 * max_norm with eps 0): every element, the last included.
    let l1_norm = ClipGradNorm::new(l1 / 2.0).norm_type(NormType::L1).eps(0.0);
    let norm = scalar(&l1_norm.clip_(&vars, &mut gs)?)?;
    assert_eq!(norm, l1);
    let last = values(&big.narrow(0, n - 2, 2)?)?;
    assert!(
        close(last[0], 0.5, 1e-6) && close(last[1], 2.0, 1e-6),
        "tail {last:?}"
    );
    let first = values(&big.narrow(0, 0, 2)?)?;
    assert!(close(first[0], 0.5, 1e-6), "head {first:?}");
    Ok(())
}

/// None of the four functions waits for the device: with a long queue of matmuls in front, each
/// returns long before the device is done.
#[test]
fn no_host_synchronisation() -> Result<()> {
    let dev = cuda_or_skip!("no_host_synchronisation");
    let mut rng = StdRng::seed_from_u64(10);
    let grads: Vec<Tensor> = (0..200)
        .map(|i| {
            tensor(
                &random_values(&mut rng, 5000, 1.0),
                &[5000],
                DTYPES[i % 4],
                &dev,
            )
        })
        .collect::<Result<_>>()?;
    let (vars, mut gs) = store(&grads)?;
    let a = Tensor::ones((4096, 4096), DType::F32, &dev)?;
    // Warm up: module load, scratch and staging allocation, cuBLAS handles.
    let norm = clip_grad_norm_(&vars, &mut gs, 1.0)?;
    clip_grads_with_norm_(&vars, &mut gs, 1.0, &norm)?;
    clip_grad_value_(&vars, &mut gs, 1.0)?;
    total_norm(&vars, &gs, NormType::L2)?;
    let _ = a.matmul(&a)?;
    dev.synchronize()?;
    // Size the queue: at least ~300 ms of device work.
    let t = Instant::now();
    let mut m = a.matmul(&a)?;
    for _ in 0..4 {
        m = m.matmul(&a)?;
    }
    dev.synchronize()?;
    let per_matmul = t.elapsed() / 5;
    let count =
        (Duration::from_millis(300).as_secs_f64() / per_matmul.as_secs_f64()).ceil() as usize;
    let count = count.clamp(5, 800);
    drop(m);

    let zclip = std::cell::RefCell::new(ZClip::new().warmup_steps(2));
    zclip.borrow_mut().clip_(&vars, &mut gs)?;
    type Call<'a> = &'a dyn Fn(&mut GradStore) -> Result<()>;
    let calls: [(&str, Call); 6] = [
        ("clip_grad_norm_", &|gs| {
            clip_grad_norm_(&vars, gs, 1.0).map(|_| ())
        }),
        ("total_norm", &|gs| {
            total_norm(&vars, gs, NormType::L2).map(|_| ())
        }),
        ("clip_grads_with_norm_", &|gs| {
            clip_grads_with_norm_(&vars, gs, 1.0, &norm)
        }),
        ("clip_grad_value_", &|gs| clip_grad_value_(&vars, gs, 1.0)),
        ("ZClip::clip_", &|gs| {
            zclip.borrow_mut().clip_(&vars, gs).map(|_| ())
        }),
        ("adaptive_clip_grad_", &|gs| {
            candle_grad_clip::adaptive_clip_grad_(&vars, gs, 0.01, 1e-3).map(|_| ())
        }),
    ];
    for (name, call) in calls {
        let start = Instant::now();
        let mut m = a.clone();
        for _ in 0..count {
            m = m.matmul(&a)?;
        }
        let queued = start.elapsed();
        let t = Instant::now();
        call(&mut gs)?;
        let call_time = t.elapsed();
        dev.synchronize()?;
        let total = start.elapsed();
        println!("{name}: returned after {call_time:?}; queue of {count} matmuls took {total:?} (enqueue {queued:?})");
        assert!(
            queued + call_time < total / 2,
            "{name} seems to wait for the device: returned at {:?} of {total:?}",
            queued + call_time
        );
    }
    Ok(())
}

/// ZClip's kernel (`grad_clip_zclip`) on the GPU computes the CPU twin's bits: a recorded norm
/// sequence (spikes, NaN, infinities) fed exactly through one F64 element, statistics and clipped
/// gradient compared bitwise at every step.
#[test]
fn zclip_on_the_gpu_is_bitwise_the_cpu() -> Result<()> {
    let dev = cuda_or_skip!("zclip_on_the_gpu_is_bitwise_the_cpu");
    let mut rng = StdRng::seed_from_u64(21);
    for setting in [
        ZClip::new().warmup_steps(5),
        ZClip::new().warmup_steps(3).max_grad_norm(2.0),
    ] {
        let (mut gpu, mut cpu) = (setting.clone(), setting);
        let vg = Var::new(&[0f64], &dev)?;
        let vc = Var::new(&[0f64], &Device::Cpu)?;
        for step in 0..80 {
            let n: f64 = match rng.gen_range(0..30) {
                0 => f64::NAN,
                1 => f64::INFINITY,
                2 => 500.0 * rng.gen_range(1.0..2.0),
                _ => rng.gen_range(1.0..2.0),
            };
            let mut gg = GradStore::default();
            gg.insert(&vg, Tensor::new(&[n], &dev)?);
            let mut gc = GradStore::default();
            gc.insert(&vc, Tensor::new(&[n], &Device::Cpu)?);
            gpu.clip_(std::slice::from_ref(&vg), &mut gg)?;
            cpu.clip_(std::slice::from_ref(&vc), &mut gc)?;
            let a = gg.get(&vg).unwrap().to_vec1::<f64>()?[0];
            let b = gc.get(&vc).unwrap().to_vec1::<f64>()?[0];
            assert!(
                a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()),
                "step {step}: {a} vs {b}"
            );
            assert_eq!(gpu.statistics()?, cpu.statistics()?, "step {step}");
            let (ca, cb) = (gpu.last_coefficient()?, cpu.last_coefficient()?);
            assert!(
                ca.map(f64::to_bits) == cb.map(f64::to_bits) || ca.is_some_and(f64::is_nan),
                "step {step}"
            );
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The emulation against the GPU, and what only a GPU can show.

/// The host emulation computes the GPU's bits: the same kernels, the same tables, and arithmetic
/// that no compiler may contract (L1, L2 and the max; general `p` uses another `pow`). Clipped
/// elements then follow bit for bit.
#[test]
fn emulation_is_bitwise_the_gpu() -> Result<()> {
    let dev = cuda_or_skip!("emulation_is_bitwise_the_gpu");
    let mut rng = StdRng::seed_from_u64(11);
    for case in 0..6 {
        let grads: Vec<Tensor> = (0..1 + case * 3)
            .map(|i| {
                let n = [1, 31, 4095, 4097, 70_001, 300][(i + case) % 6];
                let dtype = if case < 4 {
                    DTYPES[case]
                } else {
                    DTYPES[i % 4]
                };
                tensor(&random_values(&mut rng, n, 1.0), &[n], dtype, &dev)
            })
            .collect::<Result<_>>()?;
        for norm in [NormType::L1, NormType::L2, NormType::Inf, NormType::P(3.0)] {
            let clip = ClipGradNorm::new(0.5).norm_type(norm);
            let cpu_grads = to_cpu(&grads)?;
            let gpu_grads: Vec<Tensor> = grads.iter().map(|g| g.copy()).collect::<Result<_>>()?;
            let (vars, mut gs) = store(&gpu_grads)?;
            let (evars, mut egs) = store(&cpu_grads)?;
            let gpu_norm = scalar(&clip.clip_(&vars, &mut gs)?)?;
            let (emu_norm, _) = KernelEmulation::new().run(|| clip.clip_(&evars, &mut egs))?;
            let emu_norm = scalar(&emu_norm)?;
            let what = format!("case {case} {norm}");
            if matches!(norm, NormType::P(_)) {
                assert!(
                    close(gpu_norm, emu_norm, 1e-12),
                    "{what}: gpu {gpu_norm:e} emulated {emu_norm:e}"
                );
                continue;
            }
            assert_eq!(
                gpu_norm.to_bits(),
                emu_norm.to_bits(),
                "{what}: gpu {gpu_norm:e} emulated {emu_norm:e}"
            );
            for (i, (g, e)) in gpu_grads.iter().zip(&cpu_grads).enumerate() {
                assert!(bits_equal(&values(g)?, &values(e)?), "{what}: grad {i}");
            }
        }
    }
    Ok(())
}

/// Under CUDA graph capture every call is refused before it enqueues anything, even the
/// `.contiguous()` copy of a transposed gradient: the captured graph stays empty.
#[test]
fn graph_capture_is_refused_before_any_work() -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    if cuda("graph_capture_is_refused_before_any_work").is_none() {
        return Ok(());
    }
    let dev = Device::new_cuda_with_stream(0)?;
    let g = tensor(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3], DType::F32, &dev)?.t()?;
    let before = values(&g)?;
    let (vars, mut gs) = store(std::slice::from_ref(&g))?;
    let stream = dev.as_cuda_device()?.cuda_stream();
    stream
        .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
        .map_err(|e| candle_core::Error::Msg(format!("{e:?}")))?;
    let results = [
        clip_grad_norm_(&vars, &mut gs, 0.1).map(|_| ()),
        total_norm(&vars, &gs, NormType::L2).map(|_| ()),
        clip_grad_value_(&vars, &mut gs, 0.1),
    ];
    let graph = stream
        .end_capture(sys::CUgraphInstantiate_flags(0))
        .map_err(|e| candle_core::Error::Msg(format!("{e:?}")))?;
    for r in results {
        let msg = r.expect_err("refused under capture").to_string();
        assert!(msg.contains("CUDA graph"), "{msg}");
    }
    if let Some(graph) = graph {
        let mut nodes = 0usize;
        // SAFETY: `graph` is a live graph; with a null node array cuGraphGetNodes only writes the
        // node count to `nodes`.
        let rc =
            unsafe { sys::cuGraphGetNodes(graph.cu_graph(), std::ptr::null_mut(), &mut nodes) };
        assert_eq!(rc, sys::CUresult::CUDA_SUCCESS);
        assert_eq!(nodes, 0, "work was captured before the refusal");
    }
    assert!(bits_equal(&before, &values(&g)?));
    Ok(())
}

#[test]
fn gradients_on_two_devices_are_refused_and_nothing_is_written() -> Result<()> {
    let dev = cuda_or_skip!("gradients_on_two_devices_are_refused_and_nothing_is_written");
    let on_gpu = tensor(&[30.0, 40.0], &[2], DType::F32, &dev)?;
    let on_cpu = Tensor::new(&[300f32, 400.], &Device::Cpu)?;
    let (vars, mut gs) = store(&[on_gpu.clone(), on_cpu.clone()])?;
    let before = (values(&on_gpu)?, values(&on_cpu)?);
    for r in [
        clip_grad_norm_(&vars, &mut gs, 1.0).map(|_| ()),
        clip_grad_value_(&vars, &mut gs, 1.0),
        total_norm(&vars, &gs, NormType::L2).map(|_| ()),
    ] {
        let msg = r.expect_err("two devices").to_string();
        assert!(msg.contains("different devices"), "{msg}");
    }
    assert!(bits_equal(&before.0, &values(&on_gpu)?));
    assert!(bits_equal(&before.1, &values(&on_cpu)?));
    Ok(())
}

/// A negative norm handed to `clip_grads_with_norm_` is never read back on CUDA: the kernel makes
/// the gradients NaN instead of flipping their signs.
#[test]
fn a_negative_given_norm_poisons_the_gradients() -> Result<()> {
    let dev = cuda_or_skip!("a_negative_given_norm_poisons_the_gradients");
    for dtype in DTYPES {
        let g = tensor(&[1.0, -2.0, 3.0], &[3], dtype, &dev)?;
        let (vars, mut gs) = store(std::slice::from_ref(&g))?;
        let norm = Tensor::new(-4.0f64, &dev)?.to_dtype(dtype)?;
        clip_grads_with_norm_(&vars, &mut gs, 1.0, &norm)?;
        assert!(values(&g)?.iter().all(|x| x.is_nan()), "{dtype:?}");
    }
    Ok(())
}

#[test]
fn grad_norms_match_the_cpu() -> Result<()> {
    let dev = cuda_or_skip!("grad_norms_match_the_cpu");
    for dtype in DTYPES {
        let varmap = candle_nn::VarMap::new();
        let vb = candle_nn::VarBuilder::from_varmap(&varmap, dtype, &dev);
        let mut rng = StdRng::seed_from_u64(12);
        let mut grads = GradStore::default();
        let mut cpu_grads = GradStore::default();
        for (i, n) in [3usize, 5000, 1, 70_001].into_iter().enumerate() {
            let var = vb.get(n, &format!("v{i}"))?;
            let g = tensor(&random_values(&mut rng, n, 1.0), &[n], dtype, &dev)?;
            cpu_grads.insert(&var, g.to_device(&Device::Cpu)?);
            grads.insert(&var, g);
        }
        for norm in [NormType::L2, NormType::L1, NormType::Inf, NormType::P(3.0)] {
            let gpu = grad_norms(&varmap, &grads, norm)?;
            let cpu = grad_norms(&varmap, &cpu_grads, norm)?;
            assert_eq!(gpu.len(), 4);
            assert_named_norms(
                &gpu,
                &cpu,
                norm == NormType::Inf,
                &format!("{dtype:?} {norm}: gpu vs cpu"),
            );
        }
    }
    Ok(())
}

/// A new device per iteration: the per-thread scratch keeps the 4 most recent, and every call is
/// still right.
#[test]
fn a_new_device_per_iteration() -> Result<()> {
    if cuda("a_new_device_per_iteration").is_none() {
        return Ok(());
    }
    for i in 0..12 {
        let dev = Device::new_cuda(0)?;
        let g = tensor(&[3.0, 4.0], &[2], DType::F32, &dev)?;
        let (vars, mut gs) = store(std::slice::from_ref(&g))?;
        let n = clip_grad_norm_(&vars, &mut gs, 1.0)?;
        assert_eq!(scalar(&n)?, 5.0, "device {i}");
        let c = 1.0 / (5.0 + 1e-6);
        assert_within_one_ulp(&values(&g)?, &[3.0 * c, 4.0 * c], DType::F32, "clipped");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The fused optimizers on the GPU.

/// Vars on `dev` (and a twin set with the same values) for the optimizer tests.
fn optimizer_vars(rng: &mut StdRng, dtype: DType, dev: &Device) -> Result<(Vec<Var>, Vec<Var>)> {
    let mut a = Vec::new();
    let mut b = Vec::new();
    for n in [5000usize, 1, 70_001, 4096, 333] {
        let t = tensor(&random_values(rng, n, 1.0), &[n], dtype, dev)?;
        a.push(Var::from_tensor(&t)?);
        b.push(Var::from_tensor(&t)?);
    }
    Ok((a, b))
}

fn optimizer_grads(
    rng: &mut StdRng,
    a: &[Var],
    b: &[Var],
    scale: f64,
) -> Result<(GradStore, GradStore)> {
    let (mut ga, mut gb) = (GradStore::default(), GradStore::default());
    for (va, vb) in a.iter().zip(b) {
        let g = random_values(rng, va.elem_count(), scale);
        ga.insert(va, tensor(&g, va.dims(), va.dtype(), va.device())?);
        gb.insert(vb, tensor(&g, vb.dims(), vb.dtype(), vb.device())?);
    }
    Ok((ga, gb))
}

fn all_bits_equal(a: &[Var], b: &[Var]) -> Result<bool> {
    for (x, y) in a.iter().zip(b) {
        if !bits_equal(&values(x.as_tensor())?, &values(y.as_tensor())?) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// `FusedAdamW` on CUDA is bitwise `candle_nn::AdamW` on CUDA (candle's affine kernel is one fma;
/// the fused kernel spells the same fma), `FusedSgd` without momentum bitwise `candle_nn::SGD`.
#[test]
fn fused_optimizers_are_bitwise_candles_on_the_gpu() -> Result<()> {
    use candle_grad_clip::{FusedAdamW, FusedSgd, ParamsSgd};
    use candle_nn::{AdamW, Optimizer, ParamsAdamW, SGD};
    let dev = cuda_or_skip!("fused_optimizers_are_bitwise_candles_on_the_gpu");
    let mut rng = StdRng::seed_from_u64(21);
    for dtype in [DType::F32, DType::F64] {
        let params = ParamsAdamW {
            lr: 0.01,
            weight_decay: 0.1,
            ..Default::default()
        };
        let (ours, theirs) = optimizer_vars(&mut rng, dtype, &dev)?;
        let mut fused = FusedAdamW::new(ours.clone(), params.clone())?;
        let mut reference = AdamW::new(theirs.clone(), params)?;
        for step in 0..20 {
            let (ga, gb) = optimizer_grads(&mut rng, &ours, &theirs, 1.0)?;
            fused.step(&ga)?;
            reference.step(&gb)?;
            assert!(
                all_bits_equal(&ours, &theirs)?,
                "AdamW {dtype:?} step {step}"
            );
        }
        let (ours, theirs) = optimizer_vars(&mut rng, dtype, &dev)?;
        let mut fused = FusedSgd::new(
            ours.clone(),
            ParamsSgd {
                lr: 0.1,
                ..Default::default()
            },
        )?;
        let mut reference = SGD::new(theirs.clone(), 0.1)?;
        for step in 0..5 {
            let (ga, gb) = optimizer_grads(&mut rng, &ours, &theirs, 1.0)?;
            fused.step(&ga)?;
            reference.step(&gb)?;
            assert!(all_bits_equal(&ours, &theirs)?, "SGD {dtype:?} step {step}");
        }
    }
    Ok(())
}

/// The folded clip is bitwise `Clipped<AdamW>` (clip_grad_norm_ on the GPU, then candle's AdamW
/// on the GPU), norm and clipped-step count included.
#[test]
fn folded_clip_is_clip_then_step_on_the_gpu() -> Result<()> {
    use candle_grad_clip::{ClipSetting, Clipped, ClippedConfig, FusedAdamW};
    use candle_nn::{AdamW, Optimizer, ParamsAdamW};
    let dev = cuda_or_skip!("folded_clip_is_clip_then_step_on_the_gpu");
    let mut rng = StdRng::seed_from_u64(22);
    for dtype in [DType::F32, DType::F64] {
        for setting in [ClipSetting::norm(0.5), ClipSetting::value(0.05)] {
            let params = ParamsAdamW {
                lr: 0.01,
                ..Default::default()
            };
            let (ours, theirs) = optimizer_vars(&mut rng, dtype, &dev)?;
            let mut fused =
                FusedAdamW::new(ours.clone(), params.clone())?.with_clip(setting.clone())?;
            let mut reference =
                Clipped::<AdamW>::new(theirs.clone(), ClippedConfig::new(params, setting.clone()))?;
            for step in 0..8 {
                let (ga, gb) = optimizer_grads(
                    &mut rng,
                    &ours,
                    &theirs,
                    if step % 3 == 2 { 30.0 } else { 1.0 },
                )?;
                fused.step(&ga)?;
                reference.step(&gb)?;
                assert!(
                    all_bits_equal(&ours, &theirs)?,
                    "{dtype:?} {setting:?} step {step}"
                );
                let (a, b) = (
                    fused.last_norm().expect("norm"),
                    reference.last_norm().expect("norm"),
                );
                assert_eq!(
                    scalar(a)?.to_bits(),
                    scalar(b)?.to_bits(),
                    "{dtype:?} {setting:?}: norm"
                );
            }
            assert_eq!(fused.clipped_steps()?, reference.clipped_steps()?);
        }
    }
    Ok(())
}

/// The GPU's fused steps are the emulation's, bit for bit (every dtype, both rules, a clip), and
/// a step whose gradients hold a NaN is skipped on the device.
#[test]
fn fused_steps_match_the_emulation_and_skip_on_the_device() -> Result<()> {
    use candle_grad_clip::{ClipSetting, FusedAdamW, FusedSgd, ParamsSgd};
    use candle_nn::{Optimizer, ParamsAdamW};
    let dev = cuda_or_skip!("fused_steps_match_the_emulation_and_skip_on_the_device");
    let mut rng = StdRng::seed_from_u64(23);
    for dtype in DTYPES {
        for sgd in [false, true] {
            let (gpu_vars, _) = optimizer_vars(&mut rng, dtype, &dev)?;
            let cpu_vars: Vec<Var> = gpu_vars
                .iter()
                .map(|v| Var::from_tensor(&v.as_tensor().to_device(&Device::Cpu)?))
                .collect::<Result<_>>()?;
            macro_rules! make {
                ($vars:expr) => {{
                    let o: Box<dyn FnMut(&GradStore) -> Result<()>> = if sgd {
                        let mut o = FusedSgd::new(
                            $vars.clone(),
                            ParamsSgd {
                                lr: 0.05,
                                momentum: 0.9,
                                nesterov: true,
                                ..Default::default()
                            },
                        )?
                        .with_clip(ClipSetting::norm(0.5))?
                        .skip_nonfinite(true);
                        Box::new(move |g| o.step(g))
                    } else {
                        let mut o = FusedAdamW::new(
                            $vars.clone(),
                            ParamsAdamW {
                                lr: 0.01,
                                ..Default::default()
                            },
                        )?
                        .with_clip(ClipSetting::value(0.05))?
                        .skip_nonfinite(true);
                        Box::new(move |g| o.step(g))
                    };
                    o
                }};
            }
            let mut on_gpu = make!(gpu_vars);
            let mut emulated = make!(cpu_vars);
            for step in 0..6 {
                let (mut gg, _) = optimizer_grads(&mut rng, &gpu_vars, &gpu_vars, 1.0)?;
                if step == 3 {
                    let v = &gpu_vars[2];
                    let mut g = random_values(&mut rng, v.elem_count(), 1.0);
                    g[123] = f64::NAN;
                    gg.insert(v, tensor(&g, v.dims(), dtype, &dev)?);
                }
                let mut gc = GradStore::default();
                for (gv, cv) in gpu_vars.iter().zip(&cpu_vars) {
                    gc.insert(cv, gg.get(gv).expect("grad").to_device(&Device::Cpu)?);
                }
                let before = gpu_vars
                    .iter()
                    .map(|v| values(v.as_tensor()))
                    .collect::<Result<Vec<_>>>()?;
                on_gpu(&gg)?;
                KernelEmulation::new().run(|| emulated(&gc))?;
                for (i, (g, c)) in gpu_vars.iter().zip(&cpu_vars).enumerate() {
                    assert!(
                        bits_equal(&values(g.as_tensor())?, &values(c.as_tensor())?),
                        "{dtype:?} sgd {sgd} step {step} var {i}: GPU and emulation differ"
                    );
                    if step == 3 {
                        assert!(
                            bits_equal(&values(g.as_tensor())?, &before[i]),
                            "the NaN step was not skipped"
                        );
                    }
                }
            }
        }
    }
    Ok(())
}

/// A clipped, skip-checking fused step does not wait for the device, for the clips that promise
/// it: a norm, ZClip (its statistics updated by a kernel) and AGC (folded in).
#[test]
fn fused_steps_do_not_synchronise() -> Result<()> {
    use candle_grad_clip::{ClipSetting, FusedAdamW};
    use candle_nn::{Optimizer, ParamsAdamW};
    let dev = cuda_or_skip!("fused_steps_do_not_synchronise");
    let mut rng = StdRng::seed_from_u64(24);
    let (vars, _) = optimizer_vars(&mut rng, DType::F32, &dev)?;
    let (grads, _) = optimizer_grads(&mut rng, &vars, &vars, 1.0)?;
    let a = Tensor::ones((4096, 4096), DType::F32, &dev)?;
    for setting in [
        ClipSetting::norm(1.0),
        ClipSetting::ZClip(ZClip::new().warmup_steps(1)),
        ClipSetting::agc(0.01),
    ] {
        let what = format!("{setting:?}");
        let mut opt = FusedAdamW::new(vars.clone(), ParamsAdamW::default())?
            .with_clip(setting)?
            .skip_nonfinite(true);
        opt.step(&grads)?; // warm up: module load, scratch
        returns_before_the_device(&dev, &a, &format!("{what}: the fused step"), || {
            opt.step(&grads)
        })?;
    }
    Ok(())
}

/// Queues 200 matmuls of `a` (4096 x 4096) on `dev`, then runs `call`: it must return while they
/// are still running (before half of the whole), or it waited for the device.
fn returns_before_the_device(
    dev: &Device,
    a: &Tensor,
    what: &str,
    call: impl FnOnce() -> Result<()>,
) -> Result<()> {
    let _ = a.matmul(a)?;
    dev.synchronize()?;
    let start = Instant::now();
    let mut m = a.clone();
    for _ in 0..200 {
        m = m.matmul(a)?;
    }
    let queued = start.elapsed();
    let t = Instant::now();
    call()?;
    let returned = queued + t.elapsed();
    dev.synchronize()?;
    drop(m);
    let total = start.elapsed();
    assert!(
        returned < total / 2,
        "{what} seems to wait for the device: returned at {returned:?} of {total:?}"
    );
    Ok(())
}

/// `adaptive_clip_grad_` on CUDA is bitwise the CPU twin (the kernel spells out every rounding and
/// sums each unit in the CPU's lane order) for every dtype, units of 1 to 70,001 elements, NaN
/// and ±inf, a transposed gradient; and a fused optimizer with `ClipSetting::agc` is bitwise
/// `adaptive_clip_grad_` then the unclipped fused step, on the GPU.
#[test]
fn agc_matches_cpu_bitwise() -> Result<()> {
    use candle_grad_clip::{adaptive_clip_grad_, ClipSetting, FusedSgd, ParamsSgd};
    use candle_nn::Optimizer;
    let dev = cuda_or_skip!("agc_matches_cpu_bitwise");
    let mut rng = StdRng::seed_from_u64(31);
    let shapes: [&[usize]; 7] = [
        &[],
        &[7],
        &[70_001],
        &[300, 1],
        &[5, 4099],
        &[64, 3, 3, 3],
        &[0, 4],
    ];
    for dtype in DTYPES {
        for (clipping, eps) in [(0.01, 1e-3), (0.5, 0.0)] {
            let mut params = Vec::new();
            let mut grads = Vec::new();
            for shape in shapes {
                let n: usize = shape.iter().product();
                let mut p = random_values(&mut rng, n, 1.0);
                if n > 10 {
                    p[..n / 10].iter_mut().for_each(|x| *x = 0.0);
                }
                let mut g = random_values(&mut rng, n, 0.05);
                if n > 1000 {
                    g[3] = f64::NAN;
                    g[n - 2] = f64::INFINITY;
                }
                params.push(tensor(&p, shape, dtype, &dev)?);
                grads.push(tensor(&g, shape, dtype, &dev)?);
            }
            // A transposed gradient.
            let g = random_values(&mut rng, 6 * 40, 0.05);
            params.push(tensor(
                &random_values(&mut rng, 6 * 40, 1.0),
                &[6, 40],
                dtype,
                &dev,
            )?);
            grads.push(tensor(&g, &[40, 6], dtype, &dev)?.t()?);
            let run = |device: &Device| -> Result<(Tensor, Vec<Tensor>)> {
                let vars: Vec<Var> = params
                    .iter()
                    .map(|p| Var::from_tensor(&p.to_device(device)?))
                    .collect::<Result<_>>()?;
                let mut store = GradStore::default();
                let gs: Vec<Tensor> = grads
                    .iter()
                    .map(|g| g.copy()?.to_device(device)) // fresh storage, same layout
                    .collect::<Result<_>>()?;
                for (v, g) in vars.iter().zip(&gs) {
                    store.insert(v.as_tensor(), g.clone());
                }
                let norm = adaptive_clip_grad_(&vars, &mut store, clipping, eps)?;
                Ok((norm, gs))
            };
            let what = format!("{dtype:?} clipping {clipping} eps {eps}");
            let (gpu_norm, gpu) = run(&dev)?;
            let (cpu_norm, cpu) = run(&Device::Cpu)?;
            assert!(
                bits_equal(&[scalar(&gpu_norm)?], &[scalar(&cpu_norm)?]),
                "{what}: norm"
            );
            for (a, b) in gpu.iter().zip(&cpu) {
                assert!(
                    bits_equal(&values(a)?, &values(b)?),
                    "{what}: {:?}",
                    a.dims()
                );
            }
            // The fused optimizer (finite gradients: the NaN units are not clipped anyway).
            let finite: Vec<Tensor> = grads
                .iter()
                .map(|g| {
                    let v: Vec<f64> = values(g)?
                        .iter()
                        .map(|x| if x.is_finite() { *x } else { 1.0 })
                        .collect();
                    tensor(&v, g.dims(), dtype, &dev)
                })
                .collect::<Result<_>>()?;
            let vars = |ps: &[Tensor]| -> Result<Vec<Var>> {
                ps.iter().map(|p| Var::from_tensor(&p.copy()?)).collect()
            };
            let (ours, theirs) = (vars(&params)?, vars(&params)?);
            let sgd = ParamsSgd {
                lr: 0.1,
                momentum: 0.9,
                ..Default::default()
            };
            let mut folded = FusedSgd::new(ours.clone(), sgd.clone())?
                .with_clip(ClipSetting::Agc { clipping, eps })?;
            let mut plain = FusedSgd::new(theirs.clone(), sgd)?;
            let (mut ga, mut gb) = (GradStore::default(), GradStore::default());
            for ((a, b), g) in ours.iter().zip(&theirs).zip(&finite) {
                ga.insert(a.as_tensor(), g.copy()?);
                gb.insert(b.as_tensor(), g.copy()?);
            }
            folded.step(&ga)?;
            let norm = adaptive_clip_grad_(&theirs, &mut gb, clipping, eps)?;
            plain.step(&gb)?;
            assert!(
                bits_equal(
                    &[scalar(folded.last_norm().expect("a norm"))?],
                    &[scalar(&norm)?]
                ),
                "{what}: fused norm"
            );
            for (a, b) in ours.iter().zip(&theirs) {
                assert!(
                    bits_equal(&values(a.as_tensor())?, &values(b.as_tensor())?),
                    "{what}: fused {:?}",
                    a.dims()
                );
            }
        }
    }
    Ok(())
}

/// The norm across ranks on CUDA gradients (`dist`): two `LocalGroup` ranks on this GPU, each
/// owning every other tensor. The local sums are the kernels' own chunk partials (read back and
/// added exactly), so for L1, L2 and Inf the norm and the clipped gradients are bitwise the
/// one-process CUDA call's; for p = 7 the root is taken on the host (the GPU's `pow` may differ
/// by an ulp): both ranks agree, within 4 ulps of the one-process norm. With `nccl`, the same
/// through an NCCL communicator of one rank.
#[test]
fn norm_across_ranks_of_cuda_gradients_is_the_one_process_cuda_norm() -> Result<()> {
    use candle_grad_clip::{LocalGroup, ProcessGroup};
    let Some(dev) = cuda("norm_across_ranks_of_cuda_gradients_is_the_one_process_cuda_norm") else {
        return Ok(());
    };
    let shapes: [&[usize]; 5] = [&[5000], &[33, 17], &[1], &[70_000], &[3, 3]];
    for dtype in DTYPES {
        for norm_type in [NormType::L1, NormType::L2, NormType::Inf, NormType::P(7.0)] {
            let exact = norm_type != NormType::P(7.0);
            let mut rng = StdRng::seed_from_u64(41);
            let grads: Vec<Tensor> = shapes
                .iter()
                .map(|s| {
                    let n: usize = s.iter().product();
                    tensor(&random_values(&mut rng, n, 1.0), s, dtype, &dev)
                })
                .collect::<Result<_>>()?;
            let vars: Vec<Var> = shapes
                .iter()
                .map(|s| Var::zeros(s.to_vec(), dtype, &dev))
                .collect::<Result<_>>()?;
            let clip = ClipGradNorm::new(0.5).norm_type(norm_type);
            let mut one_process = GradStore::default();
            for (v, g) in vars.iter().zip(&grads) {
                one_process.insert(v, g.copy()?);
            }
            let want_norm = clip.clip_(&vars, &mut one_process)?;
            let want_value = want_norm.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            let want_norm = (want_norm.dtype(), common::bits(&want_norm)?);
            let want: Vec<Vec<u64>> = vars
                .iter()
                .map(|v| common::bits(one_process.get(v).expect("grad")))
                .collect::<Result<_>>()?;
            let ranks = LocalGroup::on_devices(vec![dev.clone(), dev.clone()])?;
            let results: Vec<Result<(DType, Vec<u64>)>> = std::thread::scope(|s| {
                let handles: Vec<_> = ranks
                    .iter()
                    .map(|g| {
                        let (grads, vars, want, want_norm) = (&grads, &vars, &want, &want_norm);
                        let dev = dev.clone();
                        s.spawn(move || -> Result<(DType, Vec<u64>)> {
                            let mut store = GradStore::default();
                            let mine: Vec<usize> =
                                (0..vars.len()).filter(|i| i % 2 == g.rank()).collect();
                            for &i in &mine {
                                store.insert(&vars[i], grads[i].copy()?);
                            }
                            let owned: Vec<Var> = mine.iter().map(|&i| vars[i].clone()).collect();
                            let norm = clip.clip_across_(&owned, &mut store, g)?;
                            assert!(norm.device().same_device(&dev));
                            let got = (norm.dtype(), common::bits(&norm)?);
                            if exact {
                                assert_eq!(&got, want_norm, "{dtype:?} {norm_type:?}: the norm");
                                for &i in &mine {
                                    let got = common::bits(store.get(&vars[i]).expect("grad"))?;
                                    assert_eq!(got, want[i], "{dtype:?} {norm_type:?}: grad {i}");
                                }
                            }
                            Ok(got)
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().expect("a rank panicked"))
                    .collect()
            });
            let got: Vec<(DType, Vec<u64>)> = results.into_iter().collect::<Result<_>>()?;
            assert_eq!(
                got[0], got[1],
                "{dtype:?} {norm_type:?}: the ranks disagree"
            );
            if !exact {
                let norm = if got[0].0 == DType::F64 {
                    f64::from_bits(got[0].1[0])
                } else {
                    f32::from_bits(got[0].1[0] as u32) as f64
                };
                let tol = 4.0 * ulp(got[0].0, want_value);
                assert!(
                    (norm - want_value).abs() <= tol,
                    "{dtype:?} {norm_type:?}: {norm:e}, one process {want_value:e}"
                );
            }
        }
    }
    // A rank whose gradients are on the CPU while its group reduces CUDA gradients is refused.
    let ranks = LocalGroup::on_devices(vec![dev.clone()])?;
    let w = Var::zeros(2, DType::F32, &Device::Cpu)?;
    let mut store = GradStore::default();
    store.insert(&w, Tensor::new(&[3f32, 4.], &Device::Cpu)?);
    // (The same gradients clip in one process: only the group's device refuses them.)
    clip_grad_norm_(std::slice::from_ref(&w), &mut store, 1.0)?;
    let err = candle_grad_clip::total_norm_across(&[w], &store, NormType::L2, &ranks[0]);
    let message = err.expect_err("another device").to_string();
    assert!(
        message.contains("rank 0") && message.contains("Cuda"),
        "{message}"
    );
    #[cfg(feature = "nccl")]
    {
        use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id};
        use candle_grad_clip::NcclGroup;
        let stream = dev.as_cuda_device()?.cuda_stream();
        let comm = Comm::from_rank(stream, 0, 1, Id::new().expect("an NCCL id"))
            .expect("an NCCL communicator of one rank");
        let group = NcclGroup::new(comm, dev.clone())?;
        assert_eq!((group.rank(), group.world_size()), (0, 1));
        let mut words = [1u64, u64::MAX - 1, 7];
        group.all_reduce_sum_u64(&mut words)?;
        assert_eq!(words, [1, u64::MAX - 1, 7]);
        group.all_reduce_max_u64(&mut words)?;
        assert_eq!(words, [1, u64::MAX - 1, 7]);
        let w = Var::zeros(2, DType::F32, &dev)?;
        let mut store = GradStore::default();
        store.insert(&w, Tensor::new(&[30f32, 40.], &dev)?);
        let norm = candle_grad_clip::clip_grad_norm_across(
            std::slice::from_ref(&w),
            &mut store,
            1.0,
            &group,
        )?;
        assert_eq!(norm.to_scalar::<f32>()?, 50.0);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// GradScaler's one-read path on the GPU.

/// The same values bit for bit, any NaN matching any NaN (BF16 NaN payloads differ).
fn same_or_both_nan(a: &[f64], b: &[f64]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()))
}

/// GradScaler's one-read path on the GPU (the reduction and `grad_clip_fused_step` unscale each
/// element as they read it, `inv_scale` read from device memory, found-inf from the control
/// tensor on the device) is bitwise the CPU twin's: vars, counters, the unscaled gradients written
/// back, the norm and the scale after `update`, for F32, F64 and BF16, NaN and ±inf steps, norm
/// (L2 on dyadic values, Inf) and value clips, FusedAdamW and FusedSgd.
#[test]
fn grad_scaler_one_read_path_on_the_gpu_is_the_cpus() -> Result<()> {
    use candle_grad_clip::{ClipSetting, FusedAdamW, FusedSgd, GradScaler, ParamsSgd};
    use candle_nn::{Optimizer, ParamsAdamW};
    let dev = cuda_or_skip!("grad_scaler_one_read_path_on_the_gpu_is_the_cpus");
    let clips: [(Option<ClipSetting>, bool); 4] = [
        (None, false),
        (Some(ClipSetting::value(0.5)), false),
        (
            Some(ClipSetting::Norm {
                max_norm: 0.4,
                norm_type: NormType::Inf,
            }),
            false,
        ),
        (Some(ClipSetting::norm(5.0)), true),
    ];
    let mut rng = StdRng::seed_from_u64(60);
    for dtype in [DType::F32, DType::F64, DType::BF16] {
        for (c, (clip, dyadic)) in clips.iter().enumerate() {
            for adamw in [true, false] {
                let what = format!("{dtype:?} {clip:?} adamw {adamw}");
                let (g, _) = optimizer_vars(&mut rng, dtype, &dev)?;
                let h: Vec<Var> = g
                    .iter()
                    .map(|v| Var::from_tensor(&v.as_tensor().to_device(&Device::Cpu)?))
                    .collect::<Result<_>>()?;
                type Step = Box<dyn FnMut(&mut GradScaler, &GradStore) -> Result<[usize; 3]>>;
                type Norm = Box<dyn Fn() -> Option<Tensor>>;
                let build = |vars: &[Var]| -> Result<(Step, Norm)> {
                    if adamw {
                        let mut opt = FusedAdamW::new(vars.to_vec(), ParamsAdamW::default())?;
                        if let Some(clip) = clip {
                            opt = opt.with_clip(clip.clone())?;
                        }
                        let opt = std::rc::Rc::new(std::cell::RefCell::new(opt));
                        let o = opt.clone();
                        Ok((
                            Box::new(move |s: &mut GradScaler, gs: &GradStore| {
                                let mut opt = opt.borrow_mut();
                                s.step(&mut *opt, gs)?;
                                Ok([opt.steps()?, opt.clipped_steps()?, opt.skipped_steps()?])
                            }),
                            Box::new(move || o.borrow().last_norm().cloned()),
                        ))
                    } else {
                        let params = ParamsSgd {
                            lr: 0.1,
                            momentum: 0.9,
                            ..Default::default()
                        };
                        let mut opt = FusedSgd::new(vars.to_vec(), params)?;
                        if let Some(clip) = clip {
                            opt = opt.with_clip(clip.clone())?;
                        }
                        let opt = std::rc::Rc::new(std::cell::RefCell::new(opt));
                        let o = opt.clone();
                        Ok((
                            Box::new(move |s: &mut GradScaler, gs: &GradStore| {
                                let mut opt = opt.borrow_mut();
                                s.step(&mut *opt, gs)?;
                                Ok([opt.steps()?, opt.clipped_steps()?, opt.skipped_steps()?])
                            }),
                            Box::new(move || o.borrow().last_norm().cloned()),
                        ))
                    }
                };
                let ((mut step_g, norm_g), (mut step_h, norm_h)) = (build(&g)?, build(&h)?);
                let init = if *dyadic { 512.0 } else { 1000.0 };
                let mut scaler_g = GradScaler::new().init_scale(init).growth_interval(2);
                let mut scaler_h = scaler_g.clone();
                for step in 0..5 {
                    let poison = [0u8, 1, 0, 2, 3][(step + c) % 5];
                    let all = common::scaled_values(
                        &g,
                        scaler_h.scale_value()?,
                        *dyadic,
                        poison,
                        &mut rng,
                    );
                    let (mut gg, mut gh) = (GradStore::default(), GradStore::default());
                    for ((vg, vh), vals) in g.iter().zip(&h).zip(&all) {
                        gg.insert(vg, tensor(vals, vg.dims(), dtype, &dev)?);
                        gh.insert(vh, tensor(vals, vh.dims(), dtype, &Device::Cpu)?);
                    }
                    let counts_g = step_g(&mut scaler_g, &gg)?;
                    let counts_h = step_h(&mut scaler_h, &gh)?;
                    let what = format!("{what} step {step} poison {poison}");
                    assert!(all_bits_equal(&g, &h)?, "{what}: vars");
                    assert_eq!(counts_g, counts_h, "{what}: counters");
                    for (vg, vh) in g.iter().zip(&h) {
                        let (x, y) = (values(gg.get(vg).unwrap())?, values(gh.get(vh).unwrap())?);
                        assert!(same_or_both_nan(&x, &y), "{what}: gradients written back");
                    }
                    match (norm_g(), norm_h()) {
                        (Some(x), Some(y)) => {
                            assert!(same_or_both_nan(&values(&x)?, &values(&y)?), "{what}: norm")
                        }
                        (None, None) => {}
                        other => panic!("{what}: norms {other:?}"),
                    }
                    scaler_g.update()?;
                    scaler_h.update()?;
                    assert_eq!(
                        scaler_g.scale_value()?.to_bits(),
                        scaler_h.scale_value()?.to_bits(),
                        "{what}: scale"
                    );
                }
            }
        }
    }
    Ok(())
}

/// A scaled step on the one-read path enqueues its work and returns: no host read of the scale,
/// of found-inf or of the skip count.
#[test]
fn grad_scaler_steps_do_not_synchronise() -> Result<()> {
    use candle_grad_clip::{ClipSetting, FusedAdamW, GradScaler};
    use candle_nn::{Optimizer, ParamsAdamW};
    let dev = cuda_or_skip!("grad_scaler_steps_do_not_synchronise");
    let mut rng = StdRng::seed_from_u64(61);
    let (vars, _) = optimizer_vars(&mut rng, DType::F32, &dev)?;
    let (grads, _) = optimizer_grads(&mut rng, &vars, &vars, 1000.0)?;
    let a = Tensor::ones((4096, 4096), DType::F32, &dev)?;
    for setting in [
        None,
        Some(ClipSetting::norm(1.0)),
        Some(ClipSetting::value(0.1)),
    ] {
        let what = format!("{setting:?}");
        let mut opt = FusedAdamW::new(vars.clone(), ParamsAdamW::default())?;
        if let Some(s) = setting {
            opt = opt.with_clip(s)?;
        }
        let mut scaler = GradScaler::new().init_scale(1000.0);
        scaler.step(&mut opt, &grads)?; // warm up: module load, scratch, the scaler's state
        scaler.update()?;
        returns_before_the_device(&dev, &a, &format!("{what}: the scaled step"), || {
            scaler.step(&mut opt, &grads)
        })?;
        scaler.update()?;
    }
    Ok(())
}
