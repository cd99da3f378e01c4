//! No gradients, vars without a gradient, gradients of vars not listed, and the dtype of
//! the result.

use super::*;
use candle_grad_clip::ClipGradNorm;

#[test]
fn no_gradients_give_a_zero_scalar_on_the_cpu() -> Result<()> {
    let vars = vec![var(&[3])?, var(&[2, 2])?];
    let mut store = GradStore::default();
    for nt in ALL_NORMS {
        for vs in [&vars[..], &[][..]] {
            let n = total_norm(vs, &store, nt, false)?;
            assert_eq!(n.rank(), 0);
            assert!(n.device().is_cpu());
            assert_eq!(scalar(&n)?, 0.0);
            let n = ClipGradNorm::new(1.0)
                .with_norm_type(nt)
                .clip_(vs, &mut store)?;
            assert_eq!(n.rank(), 0);
            assert!(n.device().is_cpu());
            assert_eq!(scalar(&n)?, 0.0);
        }
    }
    let n = clip_grad_norm_(&vars, &mut store, 0.0)?;
    assert_eq!(scalar(&n)?, 0.0);
    clip_grads_with_norm_(&vars, &mut store, 1.0, &Tensor::new(0f32, &Device::Cpu)?)?;
    clip_grad_value_(&vars, &mut store, 1.0)?;
    assert!(store.get_ids().next().is_none());
    Ok(())
}

#[test]
fn vars_without_gradient_are_skipped() -> Result<()> {
    let a = var(&[2])?;
    let b = var(&[5])?; // no gradient
    let c = var(&[1])?;
    let mut store = GradStore::default();
    store.insert(&a, f32s(&[3.0, 0.0])?);
    store.insert(&c, f32s(&[4.0])?);
    let vars = [a.clone(), b.clone(), c.clone()];
    assert_eq!(
        scalar(&total_norm(&vars, &store, NormType::L2, false)?)?,
        5.0
    );
    assert_eq!(
        scalar(&total_norm(&vars, &store, NormType::L1, false)?)?,
        7.0
    );
    assert_eq!(
        scalar(&total_norm(&vars, &store, NormType::Inf, false)?)?,
        4.0
    );
    // only the listed vars count
    assert_eq!(
        scalar(&total_norm(
            std::slice::from_ref(&c),
            &store,
            NormType::L2,
            false
        )?)?,
        4.0
    );
    let n = ClipGradNorm::new(2.5)
        .with_eps(0.0)
        .clip_(&vars, &mut store)?;
    assert_eq!(scalar(&n)?, 5.0);
    assert!(
        store.get(&b).is_none(),
        "a var without gradient must not get one"
    );
    assert_eq!(vals(store.get(&a).unwrap())?, [1.5, 0.0]);
    assert_eq!(vals(store.get(&c).unwrap())?, [2.0]);
    Ok(())
}

#[test]
fn gradients_of_unlisted_vars_are_untouched() -> Result<()> {
    let (vars, mut store) = setup(&[f32s(&[30.0, 40.0])?, f32s(&[100.0])?])?;
    let other = bits(store.get(&vars[1]).unwrap())?;
    let n = clip_grad_norm_(&vars[..1], &mut store, 1.0)?;
    assert_norm(&n, 50.0, 0.0, "first var only")?;
    assert_eq!(bits(store.get(&vars[1]).unwrap())?, other);
    clip_grad_value_(&vars[..1], &mut store, 0.1)?;
    assert_eq!(bits(store.get(&vars[1]).unwrap())?, other);
    Ok(())
}

#[test]
fn result_dtype_is_f64_only_when_every_gradient_is_f64() -> Result<()> {
    let cases: [(&[DType], DType); 7] = [
        (&[DType::F64], DType::F64),
        (&[DType::F64, DType::F64], DType::F64),
        (&[DType::F32], DType::F32),
        (&[DType::F16], DType::F32),
        (&[DType::BF16], DType::F32),
        (&[DType::F64, DType::F32], DType::F32),
        (&[DType::F16, DType::BF16, DType::F64], DType::F32),
    ];
    for (dtypes, expected) in cases {
        let grads: Vec<Tensor> = dtypes
            .iter()
            .map(|&d| tensor(&[3.0, -4.0], &[2], d))
            .collect::<Result<_>>()?;
        let (mut vars, mut store) = setup(&grads)?;
        // a var without gradient does not count
        vars.push(var(&[2])?);
        for nt in ALL_NORMS {
            let n = total_norm(&vars, &store, nt, false)?;
            assert_eq!(n.dtype(), expected, "{dtypes:?} {nt}");
            let n = ClipGradNorm::new(1e9)
                .with_norm_type(nt)
                .clip_(&vars, &mut store)?;
            assert_eq!(n.dtype(), expected, "{dtypes:?} {nt} (clip_)");
        }
        for (v, &d) in vars.iter().zip(dtypes) {
            assert_eq!(store.get(v).unwrap().dtype(), d);
        }
        let n = clip_grad_norm_(&vars, &mut store, 1.0)?;
        assert_eq!(n.dtype(), expected);
        for (v, &d) in vars.iter().zip(dtypes) {
            assert_eq!(store.get(v).unwrap().dtype(), d, "dtype kept after scaling");
        }
    }
    Ok(())
}
