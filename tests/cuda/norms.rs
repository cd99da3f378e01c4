//! Norms on the GPU: against the CPU and an f64 reference for every dtype, norm and size;
//! bitwise reproducible and independent of the order of the vars; per-tensor norms (`grad_norms`)
//! against the CPU.

use super::*;

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
            let gpu = total_norm(&vars, &gs, norm, false)?;
            let want_dtype = if dtype == DType::F64 {
                DType::F64
            } else {
                DType::F32
            };
            assert_eq!(gpu.dtype(), want_dtype);
            assert!(gpu.device().is_cuda());
            assert_eq!(gpu.rank(), 0);
            let gpu = scalar(&gpu)?;
            let cpu = scalar(&total_norm(&cvars, &cgs, norm, false)?)?;
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
        let first = scalar(&total_norm(&vars, &gs, norm, false)?)?.to_bits();
        for _ in 0..20 {
            assert_eq!(
                scalar(&total_norm(&vars, &gs, norm, false)?)?.to_bits(),
                first,
                "{norm}: repeat"
            );
        }
        assert_eq!(
            scalar(&total_norm(&reversed, &gs, norm, false)?)?.to_bits(),
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
        let a = scalar(&total_norm(&vars, &gs, norm, false)?)?.to_bits();
        let b = scalar(&total_norm(&svars, &sgs, norm, false)?)?.to_bits();
        assert_eq!(a, b, "{norm}: misaligned copy");
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
