//! Clipping on the GPU against the CPU: every dtype and norm, no clip (bitwise unchanged), mixed
//! dtypes, huge, tiny and non-finite values, `error_if_nonfinite`, empty tensors, one and 5000
//! tensors, offsets, transposes and aliases, a norm given on the device (a negative one poisons the
//! gradients), value clipping bitwise; and AGC bitwise the CPU twin.

use super::*;

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
                ClipGradNorm::new(0.5).with_norm_type(norm),
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
            ClipGradNorm::new(0.25).with_norm_type(norm),
            &format!("mixed {norm}"),
        )?;
    }
    // All F64: the norm is F64.
    let f64s = vec![tensor(&[3.0, 4.0], &[2], DType::F64, &dev)?];
    let (vars, gs) = store(&f64s)?;
    let n = total_norm(&vars, &gs, NormType::L2, false)?;
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
            let g = scalar(&total_norm(&vars, &gs, norm, false)?)?;
            let c = scalar(&total_norm(&cvars, &cgs, norm, false)?)?;
            assert!(
                close(g, c, 1e-12),
                "{dtype:?} {vals:?} {norm}: gpu {g} cpu {c}"
            );
            check_clip(
                &grads,
                ClipGradNorm::new(1.0).with_norm_type(norm),
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
                .with_error_if_nonfinite(true)
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
        .with_error_if_nonfinite(true)
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
        let n = total_norm(&vars, &gs, norm, false)?;
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
        ClipGradNorm::new(1.0).with_norm_type(NormType::Inf),
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
            let g = scalar(&total_norm(&vars, &gs, norm, false)?)?;
            let c = scalar(&total_norm(&cvars, &cgs, norm, false)?)?;
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
