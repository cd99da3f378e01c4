//! A model: one table for the norm and the scale, per-tensor norms (`grad_norms`) in one reduction,
//! of large, strided, aliased, empty and non-finite gradients; a given norm inside a gradient is
//! read before scaling.

use super::*;

fn mlp_grads(dtype: DType) -> Result<(VarMap, GradStore)> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, dtype, &Device::Cpu);
    let l1 = linear(13, 64, vb.pp("l1"))?;
    let l2 = linear(64, 7, vb.pp("l2"))?;
    let l3 = linear(7, 1, vb.pp("l3"))?;
    let x = Tensor::randn(0f32, 1.0, (32, 13), &Device::Cpu)?.to_dtype(dtype)?;
    let y = l3.forward(&l2.forward(&l1.forward(&x)?.tanh()?)?.tanh()?)?;
    let grads = (y.sqr()?.mean_all()? * 1000.0)?.backward()?;
    Ok((varmap, grads))
}

/// The norm's table and the scale's table are the same for a VarMap model (every gradient its own
/// contiguous storage): one upload, two launches.
#[test]
fn one_table_for_a_varmap_model() -> Result<()> {
    let (varmap, grads) = mlp_grads(DType::F32)?;
    let vars = varmap.all_vars();
    let mut emulated = GradStore::default();
    let mut cpu = GradStore::default();
    for v in &vars {
        let g = grads.get(v).expect("every var has a gradient");
        emulated.insert(v, g.copy()?);
        cpu.insert(v, g.copy()?);
    }
    let (norm, log) = KernelEmulation::new().run(|| clip_grad_norm_(&vars, &mut emulated, 0.1))?;
    assert_eq!(log.table_uploads, [vars.len() * 4], "one table, sent once");
    assert_eq!(kernels(&log), ["grad_clip_reduce_sq", "grad_clip_apply"]);
    let cpu_norm = clip_grad_norm_(&vars, &mut cpu, 0.1)?;
    assert_norms_close(&norm, &cpu_norm, NormType::L2, "mlp")?;
    assert!(scalar(&norm)? > 0.1, "the test must clip");
    for v in &vars {
        let (e, c) = (
            bits(emulated.get(v).expect("g"))?,
            bits(cpu.get(v).expect("g"))?,
        );
        for (x, y) in e.iter().zip(&c) {
            let (x, y) = (
                f32::from_bits(*x as u32) as f64,
                f32::from_bits(*y as u32) as f64,
            );
            assert!((x - y).abs() <= ulp(DType::F32, y), "{x} vs {y}");
        }
    }
    Ok(())
}

#[test]
fn grad_norms_per_tensor_in_one_reduction() -> Result<()> {
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let (varmap, grads) = mlp_grads(dtype)?;
        for norm in [NormType::L2, NormType::L1, NormType::Inf, NormType::P(3.0)] {
            let cpu = grad_norms(&varmap, &grads, norm)?;
            let mut first = None;
            for grid in GRIDS {
                let (emulated, log) = emulation(grid, BlockOrder::Shuffled, 9)
                    .run(|| grad_norms(&varmap, &grads, norm))?;
                assert_eq!(log.table_uploads.len(), 1);
                assert_eq!(kernels(&log)[1..], ["grad_clip_segment_norms"]);
                assert_named_norms(
                    &emulated,
                    &cpu,
                    norm == NormType::Inf,
                    &format!("{dtype:?} {norm} grid {grid}"),
                );
                match &first {
                    None => first = Some(emulated),
                    Some(f) => assert_eq!(f, &emulated, "{dtype:?} {norm}: grid {grid}"),
                }
            }
        }
    }
    // F64 gradients may need the rescue pass: one norm per var (each its own reduction).
    let (varmap, grads) = mlp_grads(DType::F64)?;
    let cpu = grad_norms(&varmap, &grads, NormType::L2)?;
    let (emulated, log) =
        KernelEmulation::new().run(|| grad_norms(&varmap, &grads, NormType::L2))?;
    assert_eq!(log.table_uploads.len(), varmap.all_vars().len());
    assert_named_norms(&emulated, &cpu, false, "F64 L2");
    Ok(())
}

/// `grad_norms` of gradients of several chunks, transposed (read through a contiguous copy) and
/// aliasing one another: every per-tensor norm against the CPU's.
#[test]
fn grad_norms_of_large_strided_and_aliased_gradients() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(13);
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let shared = Tensor::from_vec(random_values(&mut rng, 70_001, &[]), 70_001, &Device::Cpu)?
        .to_dtype(DType::F32)?;
    let matrix = Tensor::from_vec(
        random_values(&mut rng, 90 * 70, &[]),
        (90, 70),
        &Device::Cpu,
    )?
    .to_dtype(DType::BF16)?;
    let mut grads = GradStore::default();
    let names = [
        "a_large",
        "b_alias_head",
        "c_alias_tail",
        "d_transposed",
        "e_small",
    ];
    let views = [
        Tensor::from_vec(random_values(&mut rng, 12_289, &[]), 12_289, &Device::Cpu)?
            .to_dtype(DType::F16)?,
        shared.narrow(0, 0, 50_000)?,
        shared.narrow(0, 30_001, 40_000)?,
        matrix.t()?,
        Tensor::from_vec(random_values(&mut rng, 5, &[]), 5, &Device::Cpu)?.to_dtype(DType::F32)?,
    ];
    for (name, view) in names.iter().zip(views) {
        let var =
            vb.get_with_hints_dtype(view.dims(), name, candle_nn::Init::Const(0.0), view.dtype())?;
        grads.insert(&var, view);
    }
    for norm in [NormType::L2, NormType::L1, NormType::Inf, NormType::P(3.0)] {
        let cpu = grad_norms(&varmap, &grads, norm)?;
        for grid in [1, 3, 64] {
            let (emulated, log) = emulation(grid, BlockOrder::Concurrent { threads: 2 }, 4)
                .run(|| grad_norms(&varmap, &grads, norm))?;
            assert_eq!(kernels(&log)[1..], ["grad_clip_segment_norms"]);
            assert_named_norms(
                &emulated,
                &cpu,
                norm == NormType::Inf,
                &format!("{norm} grid {grid}"),
            );
        }
    }
    Ok(())
}

/// An empty view and a var without gradient in `grad_norms`, and NaN gradients.
#[test]
fn grad_norms_of_empty_and_nonfinite_gradients() -> Result<()> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let a = vb.get(3, "a")?;
    let b = vb.get((2, 0), "b")?;
    let c = vb.get(4, "c")?;
    let _no_grad = vb.get(2, "d")?;
    let mut grads = GradStore::default();
    grads.insert(&a, Tensor::new(&[3f32, 4., 0.], &Device::Cpu)?);
    grads.insert(&b, Tensor::zeros((2, 0), DType::F32, &Device::Cpu)?);
    grads.insert(&c, Tensor::new(&[1f32, f32::NAN, 2., 2.], &Device::Cpu)?);
    let (norms, _) = KernelEmulation::new()
        .grid(2)
        .run(|| grad_norms(&varmap, &grads, NormType::L2))?;
    let names: Vec<&str> = norms.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["a", "b", "c"]);
    assert_eq!(norms[0].1, 5.0);
    assert_eq!(norms[1].1, 0.0);
    assert!(norms[2].1.is_nan());
    Ok(())
}

/// A `total_norm` that is a view into a gradient's own storage is read before any element is
/// scaled, as on the CPU, whatever the block order (the kernels read a copy).
#[test]
fn a_given_norm_inside_a_gradient_is_read_before_scaling() -> Result<()> {
    let build = || -> Result<(Tensor, Var, GradStore, Tensor)> {
        let mut values: Vec<f32> = (0..20_000).map(|i| (i % 7) as f32 - 3.0).collect();
        values[0] = 40.0; // the "norm": element 0 of the gradient itself
        let buf = Tensor::from_vec(values, 20_000, &Device::Cpu)?;
        let var = Var::zeros(20_000, DType::F32, &Device::Cpu)?;
        let mut store = GradStore::default();
        store.insert(&var, buf.clone());
        let norm = buf.narrow(0, 0, 1)?.squeeze(0)?;
        Ok((buf, var, store, norm))
    };
    let (cpu_buf, var, mut store, norm) = build()?;
    clip_grads_with_norm_(&[var], &mut store, 2.0, &norm)?;
    let want = bits(&cpu_buf)?;
    for order in ORDERS {
        let (buf, var, mut store, norm) = build()?;
        emulation(64, order, 5)
            .run(|| clip_grads_with_norm_(std::slice::from_ref(&var), &mut store, 2.0, &norm))?;
        let got = bits(&buf)?;
        let first_difference = got.iter().zip(&want).position(|(a, b)| a != b);
        assert_eq!(
            first_difference, None,
            "{order:?}: elements differ from the CPU's"
        );
    }
    Ok(())
}
