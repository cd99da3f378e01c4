//! `adaptive_clip_grad_` against the f64 reference, on the CPU and emulated: every dtype and shape,
//! the paper's example by hand, NaN, infinities, zero and extreme values, non-contiguous gradients,
//! missing and repeated gradients, vars large enough for the parallel paths; and the refusals.

use super::*;

/// All shapes of one dtype at once: the clip of every unit against the reference, the global
/// norm, on the CPU and emulated; the emulated result bitwise the CPU's.
#[test]
fn matches_the_f64_reference_for_every_dtype_and_shape() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(9);
    for (k, &dtype) in DTYPES.iter().enumerate() {
        for (clipping, eps) in [
            (0.05, ClipSetting::AGC_DEFAULT_EPS),
            (0.01, 0.0),
            (1.5, 0.1),
        ] {
            let mut vars = Vec::new();
            let mut grads = Vec::new();
            for shape in SHAPES {
                let (v, g) = case(&mut rng, shape, dtype, clipping, eps)?;
                vars.push(v);
                grads.push(g);
            }
            let what = format!("{dtype:?} clipping {clipping} eps {eps}");
            let (norm, cpu) = clip_copy(&vars, &grads, clipping, eps)?;
            // The reference.
            let mut total = 0.0;
            for ((v, g), new) in vars.iter().zip(&grads).zip(&cpu) {
                let (coefficients, sum) =
                    reference(&vals(v.as_tensor())?, &vals(g)?, v.dims(), clipping, eps);
                total += sum;
                assert_clipped(
                    dtype,
                    v.dims(),
                    g,
                    new,
                    &coefficients,
                    &format!("{what} {:?}", v.dims()),
                )?;
            }
            assert_eq!(
                norm.dtype(),
                if dtype == DType::F64 {
                    DType::F64
                } else {
                    DType::F32
                }
            );
            let (got, want) = (scalar(&norm)?, total.sqrt());
            let tol = if dtype == DType::F64 {
                1e-14
            } else {
                2f64.powi(-23)
            };
            assert!(
                (got - want).abs() <= tol * want,
                "{what}: norm {got}, reference {want}"
            );
            // The kernels, several grids and block orders: bitwise the CPU.
            for (r, grid) in [1u32, 3, 7, 64].into_iter().enumerate() {
                let order = ORDERS[(k + r) % ORDERS.len()];
                let emulation = KernelEmulation::new()
                    .grid(grid)
                    .block_order(order)
                    .seed(r as u64);
                let ((norm_e, emulated), log) =
                    emulation.run(|| clip_copy(&vars, &grads, clipping, eps))?;
                assert_eq!(kernels(&log), ["grad_clip_agc"], "{what}");
                assert_eq!(
                    bits(&norm_e)?,
                    bits(&norm)?,
                    "{what} grid {grid} {order:?}: norm"
                );
                for (a, b) in emulated.iter().zip(&cpu) {
                    assert_eq!(
                        bits(a)?,
                        bits(b)?,
                        "{what} grid {grid} {order:?}: {:?}",
                        a.dims()
                    );
                }
            }
        }
    }
    Ok(())
}

/// The example of the paper's formula by hand: a Linear weight [2, 3] and its bias.
#[test]
fn units_are_rows_of_a_matrix_and_the_whole_of_a_vector() -> Result<()> {
    let dev = Device::Cpu;
    let w = Var::new(&[[1f64, 2., 2.], [0., 0., 0.]], &dev)?; // row norms 3 and 0
    let b = Var::new(&[3f64, 4.], &dev)?; // norm 5
    let mut grads = GradStore::default();
    grads.insert(
        &w,
        Tensor::new(&[[0.2f64, 0.0, 0.0], [0.0, 0.0, 1e-5]], &dev)?,
    );
    grads.insert(&b, Tensor::new(&[0.6f64, 0.8], &dev)?);
    let norm = adaptive_clip_grad_(&[w.clone(), b.clone()], &mut grads, 0.1, 1e-3)?;
    assert!((norm.to_scalar::<f64>()? - (0.04f64 + 1e-10 + 1.0).sqrt()).abs() < 1e-15);
    // Row 0: 0.2 <= 0.1 · 3: untouched. Row 1 (zero weights): 1e-5 <= 0.1 · eps = 1e-4: untouched.
    // The bias: 1 > 0.1 · 5: scaled by 0.5.
    let g = grads.get(&w).expect("w").to_vec2::<f64>()?;
    assert_eq!(g, [[0.2, 0.0, 0.0], [0.0, 0.0, 1e-5]]);
    let g = grads.get(&b).expect("b").to_vec1::<f64>()?;
    assert_eq!(g, [0.3, 0.4]);
    // With eps = 1e-6 the zero row's bound is 1e-7 < 1e-5: scaled to norm 1e-7.
    let norm2 = adaptive_clip_grad_(std::slice::from_ref(&w), &mut grads, 0.1, 1e-6)?;
    assert!((norm2.to_scalar::<f64>()? - (0.04f64 + 1e-10).sqrt()).abs() < 1e-15);
    let g = grads.get(&w).expect("w").to_vec2::<f64>()?;
    assert_eq!(g[0], [0.2, 0.0, 0.0]);
    assert!((g[1][2] - 1e-7).abs() < 1e-22, "{}", g[1][2]);
    Ok(())
}

/// NaN and ±inf in gradients and parameters, zero parameters with eps = 0, huge and tiny values:
/// CPU against the reference, emulated bitwise the CPU (NaN as NaN).
#[test]
fn nonfinite_zero_and_extreme_values() -> Result<()> {
    let dev = Device::Cpu;
    let nan = f64::NAN;
    let inf = f64::INFINITY;
    for dtype in DTYPES {
        // Rows: [NaN in g], [inf in g], [NaN in p], [inf in p], [zero p], [huge g], [tiny g].
        let p = [
            [1.0, 1.0, 1.0],
            [1.0, 1.0, 1.0],
            [nan, 1.0, 1.0],
            [inf, 1.0, 1.0],
            [0.0, -0.0, 0.0],
            [1.0, 2.0, 2.0],
            [1.0, 2.0, 2.0],
        ];
        let g = [
            [nan, 100.0, 1.0],
            [inf, -3.0, 0.0],
            [100.0, 100.0, 100.0],
            [100.0, 100.0, 100.0],
            [1e-3, -1e-3, 0.0],
            [6e4, -6e4, 3e4],
            [1e-7, 0.0, 0.0],
        ];
        let flat = |a: &[[f64; 3]; 7]| a.iter().flatten().copied().collect::<Vec<f64>>();
        let param = tensor(&flat(&p), &[7, 3], dtype)?;
        let grad = tensor(&flat(&g), &[7, 3], dtype)?;
        let v = Var::from_tensor(&param)?;
        for eps in [0.0, 1e-3] {
            let what = format!("{dtype:?} eps {eps}");
            let (norm, cpu) = clip_copy(
                std::slice::from_ref(&v),
                std::slice::from_ref(&grad),
                0.1,
                eps,
            )?;
            let (coefficients, _) = reference(&vals(&param)?, &vals(&grad)?, &[7, 3], 0.1, eps);
            assert_eq!(coefficients[0], None, "{what}: NaN gradient never clipped");
            assert_eq!(
                coefficients[1],
                Some(0.0),
                "{what}: infinite gradient scaled by 0"
            );
            assert_eq!(coefficients[2], None, "{what}: NaN parameter never clipped");
            assert_eq!(
                coefficients[3], None,
                "{what}: infinite parameter never clipped"
            );
            assert!(coefficients[4].is_some(), "{what}: zero parameters clip");
            assert_clipped(dtype, &[7, 3], &grad, &cpu[0], &coefficients, &what)?;
            if eps == 0.0 {
                // max_norm = 0: the unit becomes zeros.
                assert!(vals(&cpu[0])?[12..15].iter().all(|&x| x == 0.0), "{what}");
            }
            assert!(
                scalar(&norm)?.is_nan(),
                "{what}: the global norm of a NaN gradient"
            );
            for (grid, order) in [(1, ORDERS[0]), (5, ORDERS[3])] {
                let emulation = KernelEmulation::new().grid(grid).block_order(order);
                let ((norm_e, emulated), _) = emulation.run(|| {
                    clip_copy(
                        std::slice::from_ref(&v),
                        std::slice::from_ref(&grad),
                        0.1,
                        eps,
                    )
                })?;
                assert!(scalar(&norm_e)?.is_nan());
                let (a, b) = (vals(&emulated[0])?, vals(&cpu[0])?);
                for (x, y) in a.iter().zip(&b) {
                    assert!(
                        x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()),
                        "{what}: {x} vs {y}"
                    );
                }
            }
        }
    }
    // Without the NaN row, an infinite gradient makes the norm infinite.
    let v = Var::new(&[1f32, 1.], &dev)?;
    let mut grads = GradStore::default();
    grads.insert(&v, Tensor::new(&[f32::INFINITY, 1.], &dev)?);
    let norm = adaptive_clip_grad_(std::slice::from_ref(&v), &mut grads, 0.1, 1e-3)?;
    assert_eq!(norm.to_scalar::<f32>()?, f32::INFINITY);
    let g = grads.get(&v).expect("g").to_vec1::<f32>()?;
    assert!(g[0].is_nan() && g[1] == 0.0, "{g:?}");
    Ok(())
}

/// Non-contiguous gradients (transposed and narrowed views) are clipped in place through their
/// layout, exactly as their contiguous copies; on the CPU and emulated (the strided kernel).
#[test]
fn non_contiguous_gradients_are_clipped_in_place() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(3);
    for dtype in DTYPES {
        let (v1, g1) = case(&mut rng, &[6, 40], dtype, 0.05, 1e-3)?;
        let (v2, g2) = case(&mut rng, &[4, 3, 5], dtype, 0.05, 1e-3)?;
        // The same values behind strided views: g1 as the transpose of a [40, 6] tensor, g2 as a
        // narrow of a [4, 3, 9] tensor.
        let base1 = g1.t()?.contiguous()?;
        let pad = Tensor::zeros((4, 3, 4), dtype, &Device::Cpu)?;
        let base2 = Tensor::cat(&[&g2, &pad], 2)?;
        let want = clip_copy(
            &[v1.clone(), v2.clone()],
            &[g1.clone(), g2.clone()],
            0.05,
            1e-3,
        )?;
        for emulate in [false, true] {
            let (b1, b2) = (base1.copy()?, base2.copy()?);
            let (s1, s2) = (b1.t()?, b2.narrow(2, 0, 5)?);
            assert!(!s1.is_contiguous() && !s2.is_contiguous());
            let mut store = GradStore::default();
            store.insert(&v1, s1.clone());
            store.insert(&v2, s2.clone());
            let vars = [v1.clone(), v2.clone()];
            let norm = if emulate {
                let (norm, log) = KernelEmulation::new()
                    .grid(3)
                    .run(|| adaptive_clip_grad_(&vars, &mut store, 0.05, 1e-3))?;
                assert_eq!(
                    kernels(&log),
                    [
                        "grad_clip_agc",
                        "grad_clip_agc_strided",
                        "grad_clip_agc_strided"
                    ]
                );
                norm
            } else {
                adaptive_clip_grad_(&vars, &mut store, 0.05, 1e-3)?
            };
            let what = format!("{dtype:?} emulated {emulate}");
            assert_eq!(bits(&norm)?, bits(&want.0)?, "{what}: norm");
            // In place: the caller's strided views (and their bases) hold the result.
            assert_eq!(bits(&s1)?, bits(&want.1[0])?, "{what}: transposed");
            assert_eq!(bits(&s2)?, bits(&want.1[1])?, "{what}: narrowed");
            // The padding outside the narrowed view is untouched.
            assert!(
                vals(&b2.narrow(2, 5, 4)?)?.iter().all(|&x| x == 0.0),
                "{what}"
            );
        }
    }
    Ok(())
}

/// Vars without gradients are skipped, a var listed twice is clipped once, no gradient at all
/// gives a 0-d F32 zero.
#[test]
fn missing_repeated_and_no_gradients() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(4);
    let (v, g) = case(&mut rng, &[8, 16], DType::F32, 0.05, 1e-3)?;
    let other = Var::zeros((3, 3), DType::F32, &Device::Cpu)?;
    let once = clip_copy(
        std::slice::from_ref(&v),
        std::slice::from_ref(&g),
        0.05,
        1e-3,
    )?;
    let mut store = GradStore::default();
    store.insert(&v, g.copy()?);
    let norm = adaptive_clip_grad_(
        &[v.clone(), other.clone(), v.clone()],
        &mut store,
        0.05,
        1e-3,
    )?;
    assert_eq!(bits(&norm)?, bits(&once.0)?);
    assert_eq!(bits(store.get(&v).expect("g"))?, bits(&once.1[0])?);
    let norm = adaptive_clip_grad_(&[other], &mut GradStore::default(), 0.05, 1e-3)?;
    assert_eq!((norm.dtype(), norm.to_scalar::<f32>()?), (DType::F32, 0.0));
    Ok(())
}

/// Vars large enough for the CPU's parallel paths (units summed and scaled on several threads):
/// the reference, and the emulated kernel bitwise.
#[test]
fn large_vars_match_the_reference_and_the_kernel() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(10);
    for dtype in [DType::F32, DType::BF16] {
        let shapes: [&[usize]; 3] = [&[600, 500], &[300_000], &[2, 150_001]];
        let mut vars = Vec::new();
        let mut grads = Vec::new();
        for shape in shapes {
            let (v, g) = case(&mut rng, shape, dtype, 0.05, 1e-3)?;
            vars.push(v);
            grads.push(g);
        }
        let (norm, cpu) = clip_copy(&vars, &grads, 0.05, 1e-3)?;
        for ((v, g), new) in vars.iter().zip(&grads).zip(&cpu) {
            let (c, _) = reference(&vals(v.as_tensor())?, &vals(g)?, v.dims(), 0.05, 1e-3);
            assert_clipped(
                dtype,
                v.dims(),
                g,
                new,
                &c,
                &format!("{dtype:?} {:?}", v.dims()),
            )?;
        }
        let ((norm_e, emulated), _) = KernelEmulation::new()
            .grid(5)
            .block_order(ORDERS[2])
            .run(|| clip_copy(&vars, &grads, 0.05, 1e-3))?;
        assert_eq!(bits(&norm_e)?, bits(&norm)?, "{dtype:?}");
        for (a, b) in emulated.iter().zip(&cpu) {
            assert_eq!(bits(a)?, bits(b)?, "{dtype:?} {:?}", a.dims());
        }
    }
    Ok(())
}

/// Bad settings and bad gradients are refused with an error naming the problem, and nothing
/// changes.
#[test]
fn refusals_change_nothing() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(6);
    let (v, g) = case(&mut rng, &[5, 7], DType::F32, 0.05, 1e-3)?;
    let (w, h) = case(&mut rng, &[9], DType::F32, 0.05, 1e-3)?;
    let before = (bits(&g)?, bits(&h)?);
    let vars = [v.clone(), w.clone()];
    let fresh = || -> Result<GradStore> {
        let mut s = GradStore::default();
        s.insert(&v, g.clone());
        s.insert(&w, h.clone());
        Ok(s)
    };
    let unchanged = |what: &str| -> Result<()> {
        assert_eq!((bits(&g)?, bits(&h)?), before, "{what}: a gradient changed");
        Ok(())
    };
    for (clipping, eps, word) in [
        (0.0, 1e-3, "clipping"),
        (-1.0, 1e-3, "clipping"),
        (f64::NAN, 1e-3, "clipping"),
        (f64::INFINITY, 1e-3, "clipping"),
        (0.05, -1.0, "eps"),
        (0.05, f64::NAN, "eps"),
    ] {
        let what = format!("clipping {clipping} eps {eps}");
        let msg = err_msg(
            adaptive_clip_grad_(&vars, &mut fresh()?, clipping, eps),
            &what,
        );
        assert!(msg.contains(word), "{what}: {msg}");
        unchanged(&what)?;
        let setting = ClipSetting::Agc { clipping, eps };
        assert!(setting.validate().is_err(), "{what}");
        assert!(
            Clipped::<SGD>::new(vars.to_vec(), ClippedConfig::new(0.1, setting.clone())).is_err()
        );
        assert!(FusedAdamW::new(vars.to_vec(), ParamsAdamW::default())?
            .with_clip(setting.clone())
            .is_err());
        assert!(FusedSgd::new(vars.to_vec(), ParamsSgd::default())?
            .with_clip(setting)
            .is_err());
    }
    assert!(ClipSetting::agc(0.01).validate().is_ok());
    assert!(ClipSetting::Agc {
        clipping: 0.01,
        eps: 0.0
    }
    .validate()
    .is_ok());
    // A gradient of the wrong shape (the second var's), after a good one: nothing is clipped.
    let mut store = fresh()?;
    store.insert(&w, Tensor::zeros(4, DType::F32, &Device::Cpu)?);
    let msg = err_msg(adaptive_clip_grad_(&vars, &mut store, 0.05, 1e-3), "shape");
    assert!(msg.contains("shape") || msg.contains("[4]"), "{msg}");
    unchanged("shape")?;
    // The wrong dtype.
    let mut store = fresh()?;
    store.insert(&w, h.to_dtype(DType::F64)?);
    err_msg(adaptive_clip_grad_(&vars, &mut store, 0.05, 1e-3), "dtype");
    unchanged("dtype")?;
    // A broadcast gradient.
    let mut store = fresh()?;
    let row = Tensor::ones((1, 7), DType::F32, &Device::Cpu)?.broadcast_as((5, 7))?;
    store.insert(&v, row);
    let msg = err_msg(
        adaptive_clip_grad_(&vars, &mut store, 0.05, 1e-3),
        "broadcast",
    );
    assert!(msg.contains("broadcast"), "{msg}");
    unchanged("broadcast")?;
    // A gradient that is its own parameter.
    let mut store = fresh()?;
    store.insert(&w, w.as_tensor().clone());
    let msg = err_msg(
        adaptive_clip_grad_(&vars, &mut store, 0.05, 1e-3),
        "aliasing",
    );
    assert!(msg.contains("storage"), "{msg}");
    unchanged("aliasing")?;
    // The same under emulation.
    KernelEmulation::new().run(|| -> Result<()> {
        let mut store = fresh()?;
        store.insert(&w, h.to_dtype(DType::F64)?);
        err_msg(adaptive_clip_grad_(&vars, &mut store, 0.05, 1e-3), "dtype");
        err_msg(
            adaptive_clip_grad_(&vars, &mut fresh()?, 0.0, 1e-3),
            "clipping",
        );
        Ok(())
    })?;
    unchanged("emulated")?;
    Ok(())
}
