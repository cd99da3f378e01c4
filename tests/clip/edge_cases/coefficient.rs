//! The coefficient and the scaling: `eps`, a coefficient of at least one (nothing written),
//! `max_norm` of zero and of infinity, in-place identity, a given norm (`clip_grads_with_norm_`).

use super::*;

#[test]
fn eps_is_added_to_the_norm() -> Result<()> {
    // default eps: coefficient 2.5 / (5 + 1e-6), not exactly 0.5
    let (vars, mut store) = setup(&[f32s(&[3.0, 4.0])?])?;
    clip_grad_norm_(&vars, &mut store, 2.5)?;
    let got = vals(store.get(&vars[0]).unwrap())?;
    let coef = 2.5 / (5.0 + 1e-6);
    assert_scaled(DType::F32, &[3.0, 4.0], &got, coef, REL_MIXED, "eps 1e-6");
    assert_ne!(got[0], 1.5, "eps must be added");
    // eps 0: exactly 0.5
    let (vars, mut store) = setup(&[f32s(&[3.0, 4.0])?])?;
    ClipGradNorm::new(2.5)
        .with_eps(0.0)
        .clip_(&vars, &mut store)?;
    assert_eq!(vals(store.get(&vars[0]).unwrap())?, [1.5, 2.0]);
    // a large eps
    let (vars, mut store) = setup(&[f32s(&[3.0, 4.0])?])?;
    ClipGradNorm::new(2.5)
        .with_eps(5.0)
        .clip_(&vars, &mut store)?;
    assert_eq!(vals(store.get(&vars[0]).unwrap())?, [0.75, 1.0]);
    Ok(())
}

#[test]
fn coefficient_of_at_least_one_writes_nothing() -> Result<()> {
    // norm 5: max_norm 5 gives 5 / (5 + 1e-6) < 1 (scaled), eps 0 gives exactly 1 (untouched).
    let g = f32s(&[3.0, -4.0])?;
    let (vars, mut store) = setup(std::slice::from_ref(&g))?;
    ClipGradNorm::new(5.0)
        .with_eps(0.0)
        .clip_(&vars, &mut store)?;
    assert_eq!(vals(&g)?, [3.0, -4.0]);
    clip_grad_norm_(&vars, &mut store, 5.0 + 2e-6)?;
    assert_eq!(vals(&g)?, [3.0, -4.0]);
    clip_grad_norm_(&vars, &mut store, f64::INFINITY)?;
    assert_eq!(vals(&g)?, [3.0, -4.0]);
    // signed zeros are preserved bitwise too
    let z = f32s(&[-0.0, 1.0])?;
    let (vars, mut store) = setup(std::slice::from_ref(&z))?;
    clip_grad_norm_(&vars, &mut store, 2.0)?;
    assert_eq!(
        bits(&z)?,
        [(-0.0f32).to_bits() as u64, 1f32.to_bits() as u64]
    );
    // and just below: it is scaled
    let (vars, mut store) = setup(&[f32s(&[3.0, -4.0])?])?;
    clip_grad_norm_(&vars, &mut store, 5.0)?;
    let got = vals(store.get(&vars[0]).unwrap())?;
    assert!(got[0] < 3.0 && got[1] > -4.0, "{got:?}");
    Ok(())
}

#[test]
fn max_norm_zero_zeroes_the_gradients_without_nan() -> Result<()> {
    for dtype in [DType::F32, DType::F64, DType::F16, DType::BF16] {
        for nt in ALL_NORMS {
            for eps in [1e-6, 0.0] {
                let what = format!("{dtype:?} {nt} eps {eps}");
                let (vars, mut store) = setup(&[
                    tensor(&[3.0, -4.0, 0.0], &[3], dtype)?,
                    tensor(&[0.5], &[], dtype)?,
                ])?;
                ClipGradNorm::new(0.0)
                    .with_norm_type(nt)
                    .with_eps(eps)
                    .clip_(&vars, &mut store)?;
                let after = grad_values(&vars, &store)?;
                assert!(after.iter().all(|&x| x == 0.0), "{what}: {after:?}");
                // all-zero gradients and eps 0: 0 / 0 must not give NaN
                let (vars, mut store) = setup(&[tensor(&[0.0, 0.0], &[2], dtype)?])?;
                let n = ClipGradNorm::new(0.0)
                    .with_norm_type(nt)
                    .with_eps(eps)
                    .clip_(&vars, &mut store)?;
                assert_eq!(scalar(&n)?, 0.0);
                let after = grad_values(&vars, &store)?;
                assert!(
                    after.iter().all(|&x| x == 0.0),
                    "{what} zero grads: {after:?}"
                );
            }
        }
        // through clip_grads_with_norm_ as well
        let (vars, mut store) = setup(&[tensor(&[0.0, 0.0], &[2], dtype)?])?;
        let zero = Tensor::new(0f32, &Device::Cpu)?;
        clip_grads_with_norm_(&vars, &mut store, 0.0, &zero)?;
        assert!(grad_values(&vars, &store)?.iter().all(|&x| x == 0.0));
        let (vars, mut store) = setup(&[tensor(&[1.0, -2.0], &[2], dtype)?])?;
        clip_grads_with_norm_(&vars, &mut store, 0.0, &zero)?;
        assert!(grad_values(&vars, &store)?.iter().all(|&x| x == 0.0));
    }
    Ok(())
}

#[test]
fn scaling_is_in_place_and_keeps_tensor_identity() -> Result<()> {
    for dtype in [DType::F32, DType::F64, DType::F16, DType::BF16] {
        let g = tensor(&[30.0, -40.0, 12.0, 0.5], &[2, 2], dtype)?;
        let before = vals(&g)?;
        let (vars, mut store) = setup(std::slice::from_ref(&g))?;
        let held = store.get(&vars[0]).unwrap().clone();
        let n = clip_grad_norm_(&vars, &mut store, 1.0)?;
        let reference = ref_norm(&before, 2.0);
        assert_norm(&n, reference, 1e-15, "identity")?;
        assert_eq!(store.get(&vars[0]).unwrap().id(), held.id());
        assert_eq!(store.get(&vars[0]).unwrap().id(), g.id());
        let coef = ref_coef(1.0, reference, 1e-6);
        assert_scaled(dtype, &before, &vals(&held)?, coef, 1e-12, "held clone");
        assert_scaled(dtype, &before, &vals(&g)?, coef, 1e-12, "original");
        // same for clip_grads_with_norm_ and clip_grad_value_
        let n = Tensor::new(10f64, &Device::Cpu)?;
        let before = vals(&g)?;
        clip_grads_with_norm_(&vars, &mut store, 0.5, &n)?;
        assert_eq!(store.get(&vars[0]).unwrap().id(), g.id());
        assert_scaled(
            dtype,
            &before,
            &vals(&held)?,
            0.5 / (10.0 + 1e-6),
            1e-12,
            "with_norm",
        );
        let before = vals(&g)?;
        clip_grad_value_(&vars, &mut store, 0.01)?;
        assert_eq!(store.get(&vars[0]).unwrap().id(), g.id());
        let after = vals(&held)?;
        for (b, a) in before.iter().zip(&after) {
            assert!(a.abs() <= 0.01 && a.signum() == b.signum(), "{b} -> {a}");
        }
    }
    Ok(())
}

/// `max_norm = inf` never clips, even an infinite norm (a review finding, kept as a regression).
#[test]
fn infinite_max_norm_never_clips() -> Result<()> {
    let v = var(&[2])?;
    let mut store = GradStore::default();
    store.insert(&v, tensor(&[f64::INFINITY, 3.0], &[2], DType::F32)?);
    let before = store_bits(std::slice::from_ref(&v), &store)?;
    let norm = clip_grad_norm_(std::slice::from_ref(&v), &mut store, f64::INFINITY)?;
    assert!(scalar(&norm)?.is_infinite());
    assert_eq!(store_bits(std::slice::from_ref(&v), &store)?, before);
    Ok(())
}

#[test]
fn clip_grads_with_norm_uses_the_given_norm() -> Result<()> {
    for dtype in [DType::F32, DType::F64, DType::F16, DType::BF16] {
        for norm in [
            Tensor::new(100f32, &Device::Cpu)?,
            Tensor::new(100f64, &Device::Cpu)?,
        ] {
            let g = tensor(&[3.0, -4.0, 0.5], &[3], dtype)?;
            let before = vals(&g)?;
            let (vars, mut store) = setup(std::slice::from_ref(&g))?;
            clip_grads_with_norm_(&vars, &mut store, 2.0, &norm)?;
            assert_scaled(
                dtype,
                &before,
                &vals(&g)?,
                2.0 / (100.0 + 1e-6),
                REL_MIXED,
                "given norm",
            );
            // coefficient >= 1: nothing written
            let b = bits(&g)?;
            clip_grads_with_norm_(&vars, &mut store, 200.0, &norm)?;
            assert_eq!(bits(&g)?, b);
            // infinite norm: zero
            let inf = Tensor::new(f32::INFINITY, &Device::Cpu)?;
            clip_grads_with_norm_(&vars, &mut store, 2.0, &inf)?;
            assert!(vals(&g)?.iter().all(|&x| x == 0.0));
        }
    }
    // the result of total_norm round-trips (PyTorch's get_total_norm + clip_grads_with_norm_)
    let (vars, mut store) = setup(&[f32s(&[30.0, 40.0])?, f32s(&[0.0])?])?;
    let (vars2, mut store2) = setup(&[f32s(&[30.0, 40.0])?, f32s(&[0.0])?])?;
    let n = total_norm(&vars, &store, NormType::L2, false)?;
    clip_grads_with_norm_(&vars, &mut store, 1.0, &n)?;
    clip_grad_norm_(&vars2, &mut store2, 1.0)?;
    assert_eq!(store_bits(&vars, &store)?, store_bits(&vars2, &store2)?);
    Ok(())
}

/// `ClipGradNorm::clip_grads_with_norm_` uses the clip's own `max_norm` and `eps`: each element
/// is `g · min(1, max_norm / (norm + eps))` rounded once (against the f64 reference), for eps 0,
/// the default and a large one; `error_if_nonfinite` refuses a non-finite given norm and
/// changes nothing.
#[test]
fn clip_grads_with_norm_takes_the_clip_eps() -> Result<()> {
    for dtype in [DType::F32, DType::F64, DType::F16, DType::BF16] {
        for eps in [0.0, ClipGradNorm::DEFAULT_EPS, 0.5, 7.0] {
            let (vars, mut store) = setup(&[
                tensor(&[3.0, -4.0, 0.5], &[3], dtype)?,
                tensor(&[12.0, 0.0], &[2], dtype)?,
            ])?;
            let old = grad_values(&vars, &store)?;
            let norm = total_norm(&vars, &store, NormType::L2, false)?;
            let n = scalar(&norm)?;
            ClipGradNorm::new(2.0)
                .with_eps(eps)
                .clip_grads_with_norm_(&vars, &mut store, &norm)?;
            let coef = ref_coef(2.0, n, eps);
            assert_scaled_bitwise(
                dtype,
                &old,
                &grad_values(&vars, &store)?,
                coef,
                &format!("eps {eps}"),
            );
        }
        let (vars, mut store) = setup(&[tensor(&[3.0, -4.0], &[2], dtype)?])?;
        let nan = Tensor::new(f32::NAN, &Device::Cpu)?;
        let before = grad_values(&vars, &store)?;
        let r = ClipGradNorm::new(1.0)
            .with_error_if_nonfinite(true)
            .clip_grads_with_norm_(&vars, &mut store, &nan);
        assert!(r.is_err(), "{dtype:?}");
        assert_eq!(
            grad_values(&vars, &store)?,
            before,
            "{dtype:?}: nothing changed"
        );
    }
    Ok(())
}
