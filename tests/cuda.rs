//! CUDA back end tests (feature `cuda`): the fused kernels against the CPU back end and an `f64`
//! reference. Every test skips, with a printed reason, when `Device::new_cuda(0)` fails. (Built with
//! the feature on a machine without a driver, the binary cannot even start: it links libcuda.)
#![cfg(feature = "cuda")]

use std::time::{Duration, Instant};

use candle_core::{backprop::GradStore, DType, Device, Result, Tensor, Var};
use candle_grad_clip::{
    clip_grad_norm_, clip_grad_value_, clip_grads_with_norm_, total_norm, ClipGradNorm, NormType,
};
use rand::{rngs::StdRng, Rng, SeedableRng};
use rand_distr::{Distribution, Normal};

const DTYPES: [DType; 4] = [DType::F32, DType::F64, DType::F16, DType::BF16];
const NORMS: [NormType; 7] = [
    NormType::L1,
    NormType::L2,
    NormType::Inf,
    NormType::P(3.0),
    NormType::P(0.5),
    NormType::P(7.5),
    NormType::P(2.0),
];

fn cuda() -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(d) => Some(d),
        Err(e) => {
            println!("skipping: no CUDA device ({e})");
            None
        }
    }
}

macro_rules! cuda_or_skip {
    () => {
        match cuda() {
            Some(d) => d,
            None => return Ok(()),
        }
    };
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

/// Relative and absolute tolerance of one rounding in `dtype`: a coefficient that differs in its
/// last bits may move a scaled element by one unit in the last place (absolute for subnormals).
/// Also covers the CPU's F16/BF16 conversions, which are not always correctly rounded (`half`'s
/// `from_f64` drops the low 32 bits for BF16, and rounds through `f32` for F16 on x86), while the
/// kernels round once.
fn tol(dtype: DType) -> (f64, f64) {
    match dtype {
        DType::F64 => (1e-13, 0.0),
        DType::F32 => (3e-7, 1.5e-45),
        DType::F16 => (1e-3, 6e-8),
        _ => (8e-3, 1e-40),
    }
}

fn close(a: f64, b: f64, rel: f64) -> bool {
    (a.is_nan() && b.is_nan()) || a == b || (a - b).abs() <= rel * a.abs().max(b.abs())
}

fn assert_all_close(got: &[f64], want: &[f64], (rel, abs): (f64, f64), what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            close(*g, *w, rel) || (g - w).abs() <= abs,
            "{what}: element {i}: got {g}, want {w}"
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
    let dev = cuda_or_skip!();
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
        assert_all_close(
            &got,
            &want,
            tol(grads[i].dtype()),
            &format!("{what}: grad {i}"),
        );
    }
    Ok(())
}

#[test]
fn clip_matches_cpu_for_every_dtype_and_norm() -> Result<()> {
    let dev = cuda_or_skip!();
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
    let dev = cuda_or_skip!();
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
    let dev = cuda_or_skip!();
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
    let dev = cuda_or_skip!();
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
    let dev = cuda_or_skip!();
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
    assert_all_close(&values(&grads[0])?, &[3.0, 4.0], (1e-6, 0.0), "clipped");
    Ok(())
}

#[test]
fn empty_tensors() -> Result<()> {
    let dev = cuda_or_skip!();
    let made = (|| -> Result<Vec<Tensor>> {
        Ok(vec![
            Tensor::zeros(0, DType::F32, &dev)?,
            Tensor::zeros((3, 0), DType::BF16, &dev)?,
        ])
    })();
    let empty = match made {
        Ok(t) => t,
        Err(e) => {
            println!("skipping: candle cannot make empty CUDA tensors here ({e})");
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
    let dev = cuda_or_skip!();
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
    let dev = cuda_or_skip!();
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
            assert_all_close(
                &values(b)?,
                &values(cb)?,
                tol(dtype),
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
    let dev = cuda_or_skip!();
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
    let dev = cuda_or_skip!();
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
                // Same norm value on both sides: the same coefficient, so F32 and F64 results are
                // bitwise the CPU's; F16/BF16 within the CPU's conversion error (see `tol`).
                let (gv, cv) = (values(g)?, values(c)?);
                if matches!(dtype, DType::F32 | DType::F64) {
                    assert!(bits_equal(&gv, &cv), "{norm_dtype:?} {dtype:?}");
                } else {
                    assert_all_close(&gv, &cv, tol(dtype), &format!("{norm_dtype:?} {dtype:?}"));
                }
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
    let dev = cuda_or_skip!();
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
    let dev = cuda_or_skip!();
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
    let dev = cuda_or_skip!();
    let n: usize = (1usize << 31) + 4099;
    let free = dev
        .as_cuda_device()?
        .cuda_stream()
        .context()
        .mem_get_info()
        .map(|(free, _)| free)
        .unwrap_or(0);
    // The tensor (4 GiB) twice (cat), plus slack.
    if free < 12 << 30 {
        println!("skipping: {} GiB free on the GPU, need 12", free >> 30);
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
    let dev = cuda_or_skip!();
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

    type Call<'a> = &'a dyn Fn(&mut GradStore) -> Result<()>;
    let calls: [(&str, Call); 4] = [
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
