//! Exactness: norms whose squares overflow the gradient's dtype, a million BF16 ones, the
//! infinity norm, mixed dtypes in one call, orders whose powers leave the f64 range.

use super::*;
use candle_grad_clip::ClipGradNorm;

#[test]
fn f16_gradients_whose_squares_overflow_give_the_exact_norm() -> Result<()> {
    let g = tensor(&[60000.0; 4], &[2, 2], DType::F16)?;
    assert_eq!(vals(&g)?, [60000.0; 4]);
    let (vars, mut store) = setup(&[g])?;
    assert_eq!(
        scalar(&total_norm(&vars, &store, NormType::L2, false)?)?,
        120000.0
    );
    assert_eq!(
        scalar(&total_norm(&vars, &store, NormType::L1, false)?)?,
        240000.0
    );
    assert_eq!(
        scalar(&total_norm(&vars, &store, NormType::Inf, false)?)?,
        60000.0
    );
    let p3 = total_norm(&vars, &store, NormType::P(3.0), false)?;
    assert_norm(&p3, ref_norm(&[60000.0; 4], 3.0), 0.0, "f16 P(3)")?;
    let n = clip_grad_norm_(&vars, &mut store, 1.0)?;
    assert_eq!(scalar(&n)?, 120000.0);
    let g = store.get(&vars[0]).unwrap();
    assert_eq!(g.dtype(), DType::F16);
    assert_scaled(
        DType::F16,
        &[60000.0; 4],
        &vals(g)?,
        1.0 / (120000.0 + 1e-6),
        REL_MIXED,
        "f16",
    );
    Ok(())
}

#[test]
fn f32_gradients_whose_squares_overflow_give_the_exact_norm() -> Result<()> {
    let x = 1e20f32 as f64;
    let (vars, mut store) = setup(&[f32s(&[1e20, -1e20])?, f32s(&[1e20, 1e20])?])?;
    let n = total_norm(&vars, &store, NormType::L2, false)?;
    assert_eq!(scalar(&n)?, 2.0 * x, "sqrt(4 x^2) = 2x exactly");
    let n = total_norm(&vars, &store, NormType::P(4.0), false)?;
    assert_norm(&n, ref_norm(&[x; 4], 4.0), 0.0, "P(4) of 1e20")?;
    // and tiny ones whose squares underflow f32
    let (v2, s2) = setup(&[f32s(&[3e-30, 4e-30])?])?;
    let n = total_norm(&v2, &s2, NormType::L2, false)?;
    assert_norm(
        &n,
        ref_norm(&[3e-30f32 as f64, 4e-30f32 as f64], 2.0),
        0.0,
        "tiny",
    )?;
    let n = clip_grad_norm_(&vars, &mut store, 1.0)?;
    assert_eq!(scalar(&n)?, 2.0 * x);
    assert_scaled(
        DType::F32,
        &[x, -x, x, x],
        &grad_values(&vars, &store)?,
        1.0 / (2.0 * x),
        REL_MIXED,
        "1e20",
    );
    Ok(())
}

#[test]
fn a_million_bf16_ones_give_exactly_1000() -> Result<()> {
    let g = Tensor::ones((1000, 1000), DType::BF16, &Device::Cpu)?;
    let (vars, mut store) = setup(&[g])?;
    assert_eq!(
        scalar(&total_norm(&vars, &store, NormType::L2, false)?)?,
        1000.0
    );
    assert_eq!(
        scalar(&total_norm(&vars, &store, NormType::L1, false)?)?,
        1e6
    );
    assert_eq!(
        scalar(&total_norm(&vars, &store, NormType::Inf, false)?)?,
        1.0
    );
    let n = clip_grad_norm_(&vars, &mut store, 1.0)?;
    assert_eq!(scalar(&n)?, 1000.0);
    let g = store.get(&vars[0]).unwrap();
    assert_eq!(g.dtype(), DType::BF16);
    let after = vals(g)?;
    let expected = 1.0 / (1000.0 + 1e-6);
    let tol = ulp(DType::BF16, expected);
    assert!(after.iter().all(|&x| (x - expected).abs() <= tol));
    Ok(())
}

#[test]
fn infinity_norm_is_exact() -> Result<()> {
    let a = tensor(&[0.1, -5.40625, 2.0], &[3], DType::F16)?;
    let b = tensor(&[1e-3, 5.4], &[2], DType::BF16)?;
    let c = f32s(&[-5.4321237, 3.0])?;
    let grads = [a.copy()?, b.copy()?, c.copy()?];
    let (vars, mut store) = setup(&[a, b, c])?;
    let n = total_norm(&vars, &store, NormType::Inf, false)?;
    assert_eq!(scalar(&n)? as f32, 5.4321237f32);
    assert_eq!(n.to_scalar::<f32>()?, 5.4321237f32);
    let d = tensor(&[-0.1, 1.0 / 3.0], &[2], DType::F64)?;
    let (v64, _s64) = setup(&[d])?;
    let n = total_norm(&v64, &_s64, NormType::Inf, false)?;
    assert_eq!(n.to_scalar::<f64>()?, 1.0 / 3.0);
    // clip with Inf: largest element becomes max_norm / (max + eps)
    let n = ClipGradNorm::new(1.0)
        .with_norm_type(NormType::Inf)
        .with_eps(0.0)
        .clip_(&vars, &mut store)?;
    assert_eq!(n.to_scalar::<f32>()?, 5.4321237f32);
    let coef = 1.0 / (5.4321237f32 as f64);
    for (v, g) in vars.iter().zip(&grads) {
        let after = vals(store.get(v).unwrap())?;
        assert_scaled(g.dtype(), &vals(g)?, &after, coef, REL_MIXED, "Inf clip");
        assert!(after.iter().all(|x| x.abs() <= 1.0 + 4.0 * f64::EPSILON));
    }
    Ok(())
}

#[test]
fn mixed_dtypes_in_one_call() -> Result<()> {
    let grads = vec![
        tensor(&[60000.0, -1.5, 0.0], &[3], DType::F16)?,
        tensor(&[1e30, 2.0], &[2], DType::BF16)?,
        f32s(&[1e20, -7.0])?,
        tensor(&[1e25, 0.125], &[2], DType::F64)?,
    ];
    let (vars, store) = setup(&grads)?;
    let values = grad_values(&vars, &store)?;
    for nt in ALL_NORMS {
        let reference = ref_norm(&values, nt.order());
        let mut s = GradStore::default();
        for (v, g) in vars.iter().zip(&grads) {
            s.insert(v, g.copy()?);
        }
        let n = total_norm(&vars, &s, nt, false)?;
        assert_eq!(n.dtype(), DType::F32);
        assert_norm(&n, reference, 0.0, &format!("mixed {nt}"))?;
        let max_norm = reference * 1e-3;
        let n = ClipGradNorm::new(max_norm)
            .with_norm_type(nt)
            .clip_(&vars, &mut s)?;
        assert_norm(&n, reference, 0.0, &format!("mixed clip {nt}"))?;
        let coef = ref_coef(max_norm, reference, 1e-6);
        for (v, g) in vars.iter().zip(&grads) {
            let new = s.get(v).unwrap();
            assert_eq!(new.dtype(), g.dtype());
            assert_scaled(
                g.dtype(),
                &vals(g)?,
                &vals(new)?,
                coef,
                REL_MIXED,
                &format!("mixed {nt} {:?}", g.dtype()),
            );
        }
    }
    Ok(())
}

/// F64 gradients and high orders whose powers leave the f64 range still give the finite norm.
#[test]
fn high_order_norms_stay_finite() -> Result<()> {
    for (values, dtype, p, want) in [
        (vec![1.5, 1.0], DType::F32, 2000.0, 1.5),
        (vec![1e308], DType::F64, 400.0, 1e308),
        (vec![3e200, 4e200], DType::F64, 2.0, 5e200),
    ] {
        let v = var(&[values.len()])?;
        let mut store = GradStore::default();
        store.insert(&v, tensor(&values, &[values.len()], dtype)?);
        let got = scalar(&total_norm(
            std::slice::from_ref(&v),
            &store,
            NormType::P(p),
            false,
        )?)?;
        assert!((got - want).abs() <= want * 1e-6, "p {p}: {got} vs {want}");
    }
    Ok(())
}
