//! Edge cases of the specification, one by one: dtypes, exactness, views, aliasing, in-place
//! identity, non-finite norms, bad arguments (and "nothing changed" after each error).

mod common;

use candle_core::{backprop::GradStore, DType, Device, Result, Tensor, Var};
use candle_grad_clip::{
    clip_grad_norm_, clip_grad_value_, clip_grads_with_norm_, total_norm, ClipGradNorm,
    ClipSetting, Clipped, ClippedConfig, NormType,
};
use candle_nn::{Optimizer, SGD};
use common::*;

const ALL_NORMS: [NormType; 6] = [
    NormType::L1,
    NormType::L2,
    NormType::Inf,
    NormType::P(0.5),
    NormType::P(1.5),
    NormType::P(3.0),
];

/// One var per gradient.
fn setup(grads: &[Tensor]) -> Result<(Vec<Var>, GradStore)> {
    let mut vars = vec![];
    let mut store = GradStore::default();
    for g in grads {
        let v = var(g.dims())?;
        store.insert(&v, g.clone());
        vars.push(v);
    }
    Ok((vars, store))
}

fn f32s(v: &[f32]) -> Result<Tensor> {
    Tensor::new(v, &Device::Cpu)
}

// ---------------------------------------------------------------------------------------------
// No gradients, skipped vars, dtype of the result.

#[test]
fn no_gradients_give_a_zero_scalar_on_the_cpu() -> Result<()> {
    let vars = vec![var(&[3])?, var(&[2, 2])?];
    let mut store = GradStore::default();
    for nt in ALL_NORMS {
        for vs in [&vars[..], &[][..]] {
            let n = total_norm(vs, &store, nt)?;
            assert_eq!(n.rank(), 0);
            assert!(n.device().is_cpu());
            assert_eq!(scalar(&n)?, 0.0);
            let n = ClipGradNorm::new(1.0).norm_type(nt).clip_(vs, &mut store)?;
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
    assert_eq!(scalar(&total_norm(&vars, &store, NormType::L2)?)?, 5.0);
    assert_eq!(scalar(&total_norm(&vars, &store, NormType::L1)?)?, 7.0);
    assert_eq!(scalar(&total_norm(&vars, &store, NormType::Inf)?)?, 4.0);
    // only the listed vars count
    assert_eq!(
        scalar(&total_norm(std::slice::from_ref(&c), &store, NormType::L2)?)?,
        4.0
    );
    let n = ClipGradNorm::new(2.5).eps(0.0).clip_(&vars, &mut store)?;
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
            let n = total_norm(&vars, &store, nt)?;
            assert_eq!(n.dtype(), expected, "{dtypes:?} {nt}");
            let n = ClipGradNorm::new(1e9)
                .norm_type(nt)
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

// ---------------------------------------------------------------------------------------------
// Exactness.

#[test]
fn f16_gradients_whose_squares_overflow_give_the_exact_norm() -> Result<()> {
    let g = tensor(&[60000.0; 4], &[2, 2], DType::F16)?;
    assert_eq!(vals(&g)?, [60000.0; 4]);
    let (vars, mut store) = setup(&[g])?;
    assert_eq!(scalar(&total_norm(&vars, &store, NormType::L2)?)?, 120000.0);
    assert_eq!(scalar(&total_norm(&vars, &store, NormType::L1)?)?, 240000.0);
    assert_eq!(scalar(&total_norm(&vars, &store, NormType::Inf)?)?, 60000.0);
    let p3 = total_norm(&vars, &store, NormType::P(3.0))?;
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
    let n = total_norm(&vars, &store, NormType::L2)?;
    assert_eq!(scalar(&n)?, 2.0 * x, "sqrt(4 x^2) = 2x exactly");
    let n = total_norm(&vars, &store, NormType::P(4.0))?;
    assert_norm(&n, ref_norm(&[x; 4], 4.0), 0.0, "P(4) of 1e20")?;
    // and tiny ones whose squares underflow f32
    let (v2, s2) = setup(&[f32s(&[3e-30, 4e-30])?])?;
    let n = total_norm(&v2, &s2, NormType::L2)?;
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
    assert_eq!(scalar(&total_norm(&vars, &store, NormType::L2)?)?, 1000.0);
    assert_eq!(scalar(&total_norm(&vars, &store, NormType::L1)?)?, 1e6);
    assert_eq!(scalar(&total_norm(&vars, &store, NormType::Inf)?)?, 1.0);
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
    let n = total_norm(&vars, &store, NormType::Inf)?;
    assert_eq!(scalar(&n)? as f32, 5.4321237f32);
    assert_eq!(n.to_scalar::<f32>()?, 5.4321237f32);
    let d = tensor(&[-0.1, 1.0 / 3.0], &[2], DType::F64)?;
    let (v64, _s64) = setup(&[d])?;
    let n = total_norm(&v64, &_s64, NormType::Inf)?;
    assert_eq!(n.to_scalar::<f64>()?, 1.0 / 3.0);
    // clip with Inf: largest element becomes max_norm / (max + eps)
    let n = ClipGradNorm::new(1.0)
        .norm_type(NormType::Inf)
        .eps(0.0)
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
        let n = total_norm(&vars, &s, nt)?;
        assert_eq!(n.dtype(), DType::F32);
        assert_norm(&n, reference, 0.0, &format!("mixed {nt}"))?;
        let max_norm = reference * 1e-3;
        let n = ClipGradNorm::new(max_norm)
            .norm_type(nt)
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

#[test]
fn integer_gradients_are_an_error_and_nothing_changes() -> Result<()> {
    let ints = [
        Tensor::new(&[1u32, 2, 3], &Device::Cpu)?,
        Tensor::new(&[1u8, 200], &Device::Cpu)?,
        Tensor::new(&[-5i64, 7], &Device::Cpu)?,
    ];
    for int in ints {
        let (vars, mut store, before) = snapshot_setup(&[f32s(&[300.0, 400.0])?, int.clone()])?;
        let check = |msg: String| {
            assert!(
                ["integer", "float", "dtype", "u8", "u32", "i64"]
                    .iter()
                    .any(|w| msg.contains(w)),
                "the error should say what is wrong with the dtype: {msg}"
            )
        };
        check(err_msg(
            total_norm(&vars, &store, NormType::L2),
            "total_norm",
        ));
        check(err_msg(
            clip_grad_norm_(&vars, &mut store, 1.0),
            "clip_grad_norm_",
        ));
        assert_eq!(store_bits(&vars, &store)?, before);
        check(err_msg(
            ClipGradNorm::new(1.0)
                .norm_type(NormType::Inf)
                .clip_(&vars, &mut store),
            "clip_ inf",
        ));
        assert_eq!(store_bits(&vars, &store)?, before);
        let n = Tensor::new(500f32, &Device::Cpu)?;
        check(err_msg(
            clip_grads_with_norm_(&vars, &mut store, 1.0, &n),
            "clip_grads_with_norm_",
        ));
        assert_eq!(store_bits(&vars, &store)?, before);
        check(err_msg(
            clip_grad_value_(&vars, &mut store, 1.0),
            "clip_grad_value_",
        ));
        assert_eq!(store_bits(&vars, &store)?, before);
        assert_eq!(store.get(&vars[1]).unwrap().dtype(), int.dtype());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Coefficient, eps, max_norm = 0, in-place identity.

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
    ClipGradNorm::new(2.5).eps(0.0).clip_(&vars, &mut store)?;
    assert_eq!(vals(store.get(&vars[0]).unwrap())?, [1.5, 2.0]);
    // a large eps
    let (vars, mut store) = setup(&[f32s(&[3.0, 4.0])?])?;
    ClipGradNorm::new(2.5).eps(5.0).clip_(&vars, &mut store)?;
    assert_eq!(vals(store.get(&vars[0]).unwrap())?, [0.75, 1.0]);
    Ok(())
}

#[test]
fn coefficient_of_at_least_one_writes_nothing() -> Result<()> {
    // norm 5: max_norm 5 gives 5 / (5 + 1e-6) < 1 (scaled), eps 0 gives exactly 1 (untouched).
    let g = f32s(&[3.0, -4.0])?;
    let (vars, mut store) = setup(std::slice::from_ref(&g))?;
    ClipGradNorm::new(5.0).eps(0.0).clip_(&vars, &mut store)?;
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
                    .norm_type(nt)
                    .eps(eps)
                    .clip_(&vars, &mut store)?;
                let after = grad_values(&vars, &store)?;
                assert!(after.iter().all(|&x| x == 0.0), "{what}: {after:?}");
                // all-zero gradients and eps 0: 0 / 0 must not give NaN
                let (vars, mut store) = setup(&[tensor(&[0.0, 0.0], &[2], dtype)?])?;
                let n = ClipGradNorm::new(0.0)
                    .norm_type(nt)
                    .eps(eps)
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

// ---------------------------------------------------------------------------------------------
// Views and aliasing.

#[test]
fn transposed_gradient_is_read_and_written_correctly() -> Result<()> {
    for dtype in [DType::F32, DType::F64, DType::F16, DType::BF16] {
        let base_vals: Vec<f64> = (0..12).map(|i| (i as f64 - 4.5) * 1.25).collect();
        let base = tensor(&base_vals, &[3, 4], dtype)?;
        let view = base.t()?;
        assert!(!view.is_contiguous());
        let extra = tensor(&[100.0, -3.0], &[2], dtype)?;
        let (vars, mut store) = setup(&[view.clone(), extra.clone()])?;
        let logical = grad_values(&vars, &store)?;
        for nt in ALL_NORMS {
            let n = total_norm(&vars, &store, nt)?;
            let mut all = base_vals.clone();
            all.extend([100.0, -3.0]);
            assert_norm(&n, ref_norm(&all, nt.order()), 1e-14, &format!("t {nt}"))?;
        }
        let n = clip_grad_norm_(&vars, &mut store, 2.0)?;
        let reference = ref_norm(&logical, 2.0);
        assert_norm(&n, reference, 1e-14, "t clip")?;
        let coef = ref_coef(2.0, reference, 1e-6);
        let f64n = 1e-12;
        assert_scaled(dtype, &base_vals, &vals(&base)?, coef, f64n, "base of view");
        assert_scaled(
            dtype,
            &logical,
            &grad_values(&vars, &store)?,
            coef,
            f64n,
            "view",
        );
        assert_eq!(store.get(&vars[0]).unwrap().dims(), &[4, 3]);
        assert_eq!(store.get(&vars[0]).unwrap().id(), view.id());
    }
    Ok(())
}

#[test]
fn narrowed_views_touch_only_their_elements() -> Result<()> {
    for dtype in [DType::F32, DType::F64, DType::F16, DType::BF16] {
        let base_vals: Vec<f64> = (0..30).map(|i| (i as f64 + 1.0) * 0.5).collect();
        // contiguous range at an offset: rows 1..3 of a 5x6
        let big1 = tensor(&base_vals, &[5, 6], dtype)?;
        let v1 = big1.narrow(0, 1, 2)?;
        // strided with an offset: columns 2..5 of rows 1..4 of a 5x6
        let big2 = tensor(&base_vals, &[5, 6], dtype)?;
        let v2 = big2.narrow(0, 1, 3)?.narrow(1, 2, 3)?;
        assert!(!v2.is_contiguous());
        let in1: Vec<usize> = (6..18).collect();
        let in2: Vec<usize> = (1..4)
            .flat_map(|r| (2..5).map(move |c| r * 6 + c))
            .collect();
        let (vars, mut store) = setup(&[v1.clone(), v2.clone()])?;
        let logical: Vec<f64> = in1.iter().chain(&in2).map(|&i| base_vals[i]).collect();
        assert_eq!(grad_values(&vars, &store)?, logical);
        for nt in ALL_NORMS {
            let n = total_norm(&vars, &store, nt)?;
            assert_norm(
                &n,
                ref_norm(&logical, nt.order()),
                1e-14,
                &format!("narrow {nt}"),
            )?;
        }
        let bits1 = bits(&big1)?;
        let bits2 = bits(&big2)?;
        let n = ClipGradNorm::new(1.0)
            .norm_type(NormType::P(1.5))
            .clip_(&vars, &mut store)?;
        let reference = ref_norm(&logical, 1.5);
        assert_norm(&n, reference, 1e-13, "narrow clip")?;
        let coef = ref_coef(1.0, reference, 1e-6);
        let f64n = 1e-12;
        for (big, old_bits, inside) in [(&big1, &bits1, &in1), (&big2, &bits2, &in2)] {
            let new_bits = bits(big)?;
            let new_vals = vals(big)?;
            for i in 0..30 {
                if inside.contains(&i) {
                    assert_scaled(
                        dtype,
                        &[base_vals[i]],
                        &[new_vals[i]],
                        coef,
                        f64n,
                        &format!("{dtype:?} inside {i}"),
                    );
                } else {
                    assert_eq!(
                        new_bits[i], old_bits[i],
                        "{dtype:?}: element {i} outside the view was written"
                    );
                }
            }
        }
        // clip_grad_value_ on the views: outside untouched as well
        let bits1 = bits(&big1)?;
        let bits2 = bits(&big2)?;
        clip_grad_value_(&vars, &mut store, 0.01)?;
        for (big, old_bits, inside) in [(&big1, &bits1, &in1), (&big2, &bits2, &in2)] {
            let new_bits = bits(big)?;
            let new_vals = vals(big)?;
            for i in 0..30 {
                if inside.contains(&i) {
                    assert!(new_vals[i] <= 0.01 && new_vals[i] > 0.0, "{dtype:?} {i}");
                } else {
                    assert_eq!(new_bits[i], old_bits[i], "{dtype:?}: value clip wrote {i}");
                }
            }
        }
    }
    Ok(())
}

#[test]
fn same_tensor_for_two_vars_counts_twice_and_is_scaled_once() -> Result<()> {
    for dtype in [DType::F32, DType::F64, DType::F16, DType::BF16] {
        let g = tensor(&[3.0, 4.0], &[2], dtype)?;
        let a = var(&[2])?;
        let b = var(&[2])?;
        let mut store = GradStore::default();
        store.insert(&a, g.clone());
        store.insert(&b, g.clone());
        let vars = [a.clone(), b.clone()];
        let l2 = total_norm(&vars, &store, NormType::L2)?;
        assert_norm(&l2, 50f64.sqrt(), 1e-15, "shared L2")?;
        assert_eq!(scalar(&total_norm(&vars, &store, NormType::L1)?)?, 14.0);
        assert_eq!(scalar(&total_norm(&vars, &store, NormType::Inf)?)?, 4.0);
        let n = ClipGradNorm::new(1.0).eps(0.0).clip_(&vars, &mut store)?;
        assert_norm(&n, 50f64.sqrt(), 1e-15, "shared clip")?;
        let coef = 1.0 / 50f64.sqrt();
        let f64n = 1e-12;
        assert_scaled(
            dtype,
            &[3.0, 4.0],
            &vals(&g)?,
            coef,
            f64n,
            "shared, scaled once",
        );
        assert_scaled(
            dtype,
            &[3.0, 4.0],
            &vals(store.get(&b).unwrap())?,
            coef,
            f64n,
            "b",
        );
        // and with L1: the shared elements count twice, scaled once
        let cur = vals(&g)?;
        let reference = 2.0 * cur.iter().map(|x| x.abs()).sum::<f64>();
        let n = ClipGradNorm::new(0.25)
            .norm_type(NormType::L1)
            .eps(0.0)
            .clip_(&vars, &mut store)?;
        assert_norm(&n, reference, 1e-15, "shared L1")?;
        assert_scaled(dtype, &cur, &vals(&g)?, 0.25 / reference, f64n, "shared L1");
    }
    Ok(())
}

#[test]
fn overlapping_views_count_twice_and_are_scaled_once() -> Result<()> {
    for dtype in [DType::F32, DType::F64, DType::F16, DType::BF16] {
        let base_vals = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0];
        let base = tensor(&base_vals, &[7], dtype)?;
        let v1 = base.narrow(0, 0, 4)?; // 1 2 3 4
        let v2 = base.narrow(0, 2, 4)?; // 3 4 5 6   (7 outside both)
        let t = tensor(&base_vals[..6], &[2, 3], dtype)?;
        let tt = t.t()?; // t and its transpose: the same storage
        let (vars, mut store) = setup(&[v1, v2, t.clone(), tt])?;
        let logical = grad_values(&vars, &store)?;
        assert_eq!(logical.len(), 20);
        let reference = ref_norm(&logical, 2.0);
        let n = clip_grad_norm_(&vars, &mut store, 1.0)?;
        assert_norm(&n, reference, 1e-15, "overlap")?;
        let coef = ref_coef(1.0, reference, 1e-6);
        let after = vals(&base)?;
        let f64n = 1e-12;
        assert_scaled(
            dtype,
            &base_vals[..6],
            &after[..6],
            coef,
            f64n,
            "overlap once",
        );
        assert_eq!(after[6], 7.0, "outside both views");
        assert_scaled(
            dtype,
            &base_vals[..6],
            &vals(&t)?,
            coef,
            f64n,
            "t and t.t() once",
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Non-finite norms.

fn nonfinite_setup(dtype: DType, bad: f64) -> Result<(Vec<Var>, GradStore)> {
    setup(&[
        tensor(&[1.0, bad, -2.0], &[3], dtype)?,
        tensor(&[5.0, 0.25], &[2], dtype)?,
    ])
}

#[test]
fn nan_norm_makes_the_gradients_nan_by_default() -> Result<()> {
    for dtype in [DType::F32, DType::F64, DType::F16, DType::BF16] {
        for nt in ALL_NORMS {
            let (vars, mut store) = nonfinite_setup(dtype, f64::NAN)?;
            let n = total_norm(&vars, &store, nt)?;
            assert!(scalar(&n)?.is_nan(), "{dtype:?} {nt}: total_norm");
            let n = ClipGradNorm::new(1.0)
                .norm_type(nt)
                .clip_(&vars, &mut store)?;
            assert!(scalar(&n)?.is_nan(), "{dtype:?} {nt}: returned norm");
            let after = grad_values(&vars, &store)?;
            assert!(
                after.iter().all(|x| x.is_nan()),
                "{dtype:?} {nt}: NaN norm must make every gradient NaN, got {after:?}"
            );
        }
    }
    Ok(())
}

#[test]
fn infinite_norm_zeroes_finite_elements_by_default() -> Result<()> {
    for dtype in [DType::F32, DType::F64, DType::F16, DType::BF16] {
        for nt in ALL_NORMS {
            for bad in [f64::INFINITY, f64::NEG_INFINITY] {
                let (vars, mut store) = nonfinite_setup(dtype, bad)?;
                let n = total_norm(&vars, &store, nt)?;
                assert_eq!(scalar(&n)?, f64::INFINITY, "{dtype:?} {nt}");
                let n = ClipGradNorm::new(1.0)
                    .norm_type(nt)
                    .clip_(&vars, &mut store)?;
                assert_eq!(scalar(&n)?, f64::INFINITY);
                let after = grad_values(&vars, &store)?;
                for (i, x) in after.iter().enumerate() {
                    if i != 1 {
                        assert_eq!(*x, 0.0, "{dtype:?} {nt}: finite element {i} -> {x}");
                    }
                }
            }
        }
        // a finite f16 norm that overflows f16 is not infinite: handled above (60000).
    }
    Ok(())
}

/// The helper behind the norm checks of every test: an infinite reference admits only that
/// infinity. (A relative tolerance is infinite too there, and once admitted any finite norm.)
#[test]
fn assert_norm_admits_only_the_infinity_for_an_infinite_reference() -> Result<()> {
    let inf = f64::INFINITY;
    assert_norm(&Tensor::new(f32::INFINITY, &Device::Cpu)?, inf, 0.0, "F32")?;
    assert_norm(
        &Tensor::new(f64::INFINITY, &Device::Cpu)?,
        inf,
        1e-12,
        "F64",
    )?;
    for (finite, rel64) in [
        (Tensor::new(f32::MAX, &Device::Cpu)?, 0.0),
        (Tensor::new(1f32, &Device::Cpu)?, 1e-12),
        (Tensor::new(f64::MAX, &Device::Cpu)?, 1e-12),
        (Tensor::new(f64::MAX, &Device::Cpu)?, 0.0),
    ] {
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            assert_norm(
                &finite,
                inf,
                rel64,
                "a finite norm against an infinite reference",
            )
        }));
        assert!(
            outcome.is_err(),
            "assert_norm accepted {finite} ({:?}) for an infinite reference",
            finite.dtype()
        );
    }
    Ok(())
}

#[test]
fn error_if_nonfinite_errors_and_changes_nothing() -> Result<()> {
    for dtype in [DType::F32, DType::F64, DType::F16, DType::BF16] {
        for nt in ALL_NORMS {
            for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
                let what = format!("{dtype:?} {nt} {bad}");
                let (vars, mut store) = nonfinite_setup(dtype, bad)?;
                let held: Vec<Tensor> =
                    vars.iter().map(|v| store.get(v).unwrap().clone()).collect();
                let before = store_bits(&vars, &store)?;
                let msg = err_msg(
                    ClipGradNorm::new(1.0)
                        .norm_type(nt)
                        .error_if_nonfinite(true)
                        .clip_(&vars, &mut store),
                    &what,
                );
                assert!(
                    msg.contains("nan") || msg.contains("inf") || msg.contains("finite"),
                    "{what}: the error should name the problem: {msg}"
                );
                assert_eq!(store_bits(&vars, &store)?, before, "{what}");
                for (v, h) in vars.iter().zip(&held) {
                    assert_eq!(store.get(v).unwrap().id(), h.id());
                }
            }
            // finite: no error, clipped as usual
            let (vars, mut store) = nonfinite_setup(dtype, 3.0)?;
            let values = grad_values(&vars, &store)?;
            let reference = ref_norm(&values, nt.order());
            let n = ClipGradNorm::new(1.0)
                .norm_type(nt)
                .error_if_nonfinite(true)
                .clip_(&vars, &mut store)?;
            assert_norm(&n, reference, 1e-13, &format!("{dtype:?} {nt} finite"))?;
            assert_scaled(
                dtype,
                &values,
                &grad_values(&vars, &store)?,
                ref_coef(1.0, reference, 1e-6),
                rel64(nt.order()),
                "finite with error_if_nonfinite",
            );
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Bad arguments.

type Snapshot = Vec<Option<Vec<u64>>>;

/// [`setup`], and the bits of every gradient before any call.
fn snapshot_setup(grads: &[Tensor]) -> Result<(Vec<Var>, GradStore, Snapshot)> {
    let (vars, store) = setup(grads)?;
    let before = store_bits(&vars, &store)?;
    Ok((vars, store, before))
}

/// Gradients of three dtypes, one of them NaN: a bad argument is refused whatever the values.
fn bad_args_setup() -> Result<(Vec<Var>, GradStore, Snapshot)> {
    snapshot_setup(&[
        f32s(&[30.0, -40.0])?,
        tensor(&[7.0, f64::NAN], &[2], DType::F16)?,
        tensor(&[1e3], &[], DType::F64)?,
    ])
}

#[test]
fn bad_max_norm_is_an_error_and_changes_nothing() -> Result<()> {
    for max_norm in [-1.0, -1e-300, f64::NAN, f64::NEG_INFINITY] {
        let (vars, mut store, before) = bad_args_setup()?;
        let msg = err_msg(clip_grad_norm_(&vars, &mut store, max_norm), "max_norm");
        assert!(msg.contains("max_norm"), "unclear message: {msg}");
        assert_eq!(store_bits(&vars, &store)?, before);
        for nt in ALL_NORMS {
            let msg = err_msg(
                ClipGradNorm::new(max_norm)
                    .norm_type(nt)
                    .error_if_nonfinite(true)
                    .clip_(&vars, &mut store),
                "max_norm builder",
            );
            assert!(msg.contains("max_norm"), "unclear message: {msg}");
            assert_eq!(store_bits(&vars, &store)?, before);
        }
        let n = Tensor::new(1e6f32, &Device::Cpu)?;
        let msg = err_msg(
            clip_grads_with_norm_(&vars, &mut store, max_norm, &n),
            "with_norm",
        );
        assert!(msg.contains("max_norm"), "unclear message: {msg}");
        assert_eq!(store_bits(&vars, &store)?, before);
    }
    Ok(())
}

#[test]
fn bad_p_is_an_error_and_changes_nothing() -> Result<()> {
    for (p, shown) in [
        (0.0, "0"),
        (-0.0, "0"),
        (-1.0, "-1"),
        (-2.5, "-2.5"),
        (f64::NAN, "nan"),
        (f64::INFINITY, "inf"),
        (f64::NEG_INFINITY, "-inf"),
    ] {
        let (vars, mut store, before) = bad_args_setup()?;
        let msg = err_msg(total_norm(&vars, &store, NormType::P(p)), "total_norm p");
        assert!(msg.contains(shown), "message should show p = {p}: {msg}");
        let msg = err_msg(
            ClipGradNorm::new(1.0)
                .norm_type(NormType::P(p))
                .clip_(&vars, &mut store),
            "clip_ p",
        );
        assert!(msg.contains(shown), "message should show p = {p}: {msg}");
        assert_eq!(store_bits(&vars, &store)?, before, "p = {p}");
        // also with no gradients at all
        let mut empty = GradStore::default();
        err_msg(total_norm(&vars, &empty, NormType::P(p)), "p, no grads");
        err_msg(
            ClipGradNorm::new(1.0)
                .norm_type(NormType::P(p))
                .clip_(&vars, &mut empty),
            "p, no grads (clip_)",
        );
    }
    Ok(())
}

#[test]
fn bad_clip_value_is_an_error_and_changes_nothing() -> Result<()> {
    for c in [-1.0, -1e-300, f64::NAN, f64::NEG_INFINITY] {
        let (vars, mut store, before) = bad_args_setup()?;
        let msg = err_msg(clip_grad_value_(&vars, &mut store, c), "clip_value");
        assert!(msg.contains("clip_value"), "unclear message: {msg}");
        assert_eq!(store_bits(&vars, &store)?, before);
    }
    Ok(())
}

#[test]
fn total_norm_argument_must_be_0d() -> Result<()> {
    let bad_norms = [
        Tensor::new(&[1f32], &Device::Cpu)?,
        Tensor::new(&[1f32, 2.0], &Device::Cpu)?,
        Tensor::new(&[[1f64]], &Device::Cpu)?,
        Tensor::zeros(0, DType::F32, &Device::Cpu)?,
    ];
    for n in bad_norms {
        let (vars, mut store, before) = bad_args_setup()?;
        let msg = err_msg(
            clip_grads_with_norm_(&vars, &mut store, 1.0, &n),
            "non-0-d total_norm",
        );
        assert!(
            ["0-d", "scalar", "rank", "shape", "dim"]
                .iter()
                .any(|w| msg.contains(w)),
            "unclear message: {msg}"
        );
        assert_eq!(store_bits(&vars, &store)?, before);
    }
    Ok(())
}

/// A setup whose norm (about 1000) is far above the `max_norm` of 1 used with it: any call that
/// got past validation would visibly rescale (or zero) the gradients.
fn clean_setup() -> Result<(Vec<Var>, GradStore, Snapshot)> {
    snapshot_setup(&[
        f32s(&[30.0, -40.0])?,
        tensor(&[7.0, 0.5], &[2], DType::F16)?,
        tensor(&[1e3], &[], DType::F64)?,
        tensor(&[-2.0, 9.0], &[2], DType::BF16)?,
    ])
}

/// README: "`eps` negative or not finite" is refused before anything is written. An infinite or
/// NaN `eps` that got through would zero the gradients (coefficient `1 / inf`, or NaN taken as 0).
#[test]
fn bad_eps_is_an_error_and_changes_nothing() -> Result<()> {
    for eps in [f64::INFINITY, f64::NAN, f64::NEG_INFINITY, -1.0, -1e-300] {
        for nt in ALL_NORMS {
            for error_if_nonfinite in [false, true] {
                let (vars, mut store, before) = clean_setup()?;
                let clip = ClipGradNorm::new(1.0)
                    .norm_type(nt)
                    .eps(eps)
                    .error_if_nonfinite(error_if_nonfinite);
                assert!(clip.validate().is_err(), "eps {eps} validated");
                let msg = err_msg(clip.clip_(&vars, &mut store), &format!("eps {eps}, {nt}"));
                assert!(msg.contains("eps"), "unclear message: {msg}");
                assert_eq!(store_bits(&vars, &store)?, before, "eps {eps}, {nt}");
            }
        }
    }
    Ok(())
}

/// README: "a `total_norm` that is not a 0-d float tensor" is refused before anything is
/// written. An integer norm of 5 that got through would scale the gradients by 1 / 5.
#[test]
fn non_float_total_norm_is_an_error_and_changes_nothing() -> Result<()> {
    let int_norms = [
        Tensor::new(5u8, &Device::Cpu)?,
        Tensor::new(5u32, &Device::Cpu)?,
        Tensor::new(5i64, &Device::Cpu)?,
    ];
    for n in int_norms {
        let (vars, mut store, before) = clean_setup()?;
        let msg = err_msg(
            clip_grads_with_norm_(&vars, &mut store, 1.0, &n),
            &format!("{:?} total_norm", n.dtype()),
        );
        assert!(msg.contains("float"), "unclear message: {msg}");
        assert_eq!(store_bits(&vars, &store)?, before, "{:?}", n.dtype());
    }
    Ok(())
}

/// README: "broadcast gradients that repeat elements (candle cannot write them in place)" are
/// refused before anything is written, by every function that writes and by `Clipped::step`;
/// the other gradients of the call are not written either. Reading them is fine: the norm counts
/// every logical element.
#[test]
fn broadcast_gradients_are_refused_before_anything_is_written() -> Result<()> {
    for dtype in [DType::F32, DType::F64, DType::F16, DType::BF16] {
        for broadcast_first in [false, true] {
            let what = format!("{dtype:?}, broadcast first {broadcast_first}");
            let base = tensor(&[3.0, -4.0], &[1, 2], dtype)?;
            let broadcast = base.broadcast_as((3, 2))?;
            assert_eq!(broadcast.stride()[0], 0, "{what}: not a broadcast view");
            let plain = tensor(&[30.0, 40.0], &[2], dtype)?;
            let grads = if broadcast_first {
                [broadcast.clone(), plain.clone()]
            } else {
                [plain.clone(), broadcast.clone()]
            };
            let (vars, mut store, before) = snapshot_setup(&grads)?;
            let base_bits = bits(&base)?;
            let unchanged = |store: &GradStore, call: &str| -> Result<()> {
                assert_eq!(store_bits(&vars, store)?, before, "{what}: {call} wrote");
                assert_eq!(
                    bits(&base)?,
                    base_bits,
                    "{what}: {call} wrote the broadcast source"
                );
                Ok(())
            };

            // Reading: 30² + 40² + 3 · (3² + 4²) = 2575.
            let values = grad_values(&vars, &store)?;
            assert_eq!(values.len(), 8);
            for nt in ALL_NORMS {
                let n = total_norm(&vars, &store, nt)?;
                assert_norm(&n, ref_norm(&values, nt.order()), 1e-13, &what)?;
            }

            let refused = |msg: String, call: &str| {
                assert!(
                    msg.contains("broadcast"),
                    "{what}: {call}: unclear message: {msg}"
                )
            };
            refused(
                err_msg(clip_grad_norm_(&vars, &mut store, 1.0), &what),
                "clip_grad_norm_",
            );
            unchanged(&store, "clip_grad_norm_")?;
            for nt in ALL_NORMS {
                let r = ClipGradNorm::new(1.0)
                    .norm_type(nt)
                    .clip_(&vars, &mut store);
                refused(err_msg(r, &what), "ClipGradNorm::clip_");
                unchanged(&store, "ClipGradNorm::clip_")?;
            }
            // Refused even when nothing would be written (the norm, 50.7, is below max_norm), so
            // that whether a call fails does not depend on the gradients' values.
            refused(
                err_msg(clip_grad_norm_(&vars, &mut store, 1e6), &what),
                "clip_grad_norm_ without clipping",
            );
            unchanged(&store, "clip_grad_norm_ without clipping")?;
            let norm = Tensor::new(100f64, &Device::Cpu)?;
            refused(
                err_msg(clip_grads_with_norm_(&vars, &mut store, 1.0, &norm), &what),
                "clip_grads_with_norm_",
            );
            unchanged(&store, "clip_grads_with_norm_")?;
            refused(
                err_msg(clip_grads_with_norm_(&vars, &mut store, 1e6, &norm), &what),
                "clip_grads_with_norm_ without clipping",
            );
            unchanged(&store, "clip_grads_with_norm_ without clipping")?;
            refused(
                err_msg(clip_grad_value_(&vars, &mut store, 1.0), &what),
                "clip_grad_value_",
            );
            unchanged(&store, "clip_grad_value_")?;

            // Clipped::step: no gradient clipped, no parameter moved, no step counted.
            let params: Vec<Var> = grads
                .iter()
                .map(|g| Var::ones(g.dims(), dtype, &Device::Cpu))
                .collect::<Result<_>>()?;
            let mut store = GradStore::default();
            for (p, g) in params.iter().zip(&grads) {
                store.insert(p, g.clone());
            }
            let param_bits = vars_bits(&params)?;
            for setting in [ClipSetting::norm(1.0), ClipSetting::value(1.0)] {
                let config = ClippedConfig::new(0.1, setting);
                let mut opt = Clipped::<SGD>::new(params.clone(), config)?;
                refused(err_msg(opt.step(&store), &what), "Clipped::step");
                assert_eq!(bits(&base)?, base_bits, "{what}: Clipped::step");
                assert_eq!(
                    bits(&plain)?,
                    before[usize::from(broadcast_first)].clone().unwrap()
                );
                for (p, b) in params.iter().zip(&param_bits) {
                    assert_eq!(&bits(p.as_tensor())?, b, "{what}: a parameter moved");
                }
                assert_eq!(opt.steps(), 0);
                assert!(opt.last_norm().is_none());
            }
        }
    }
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
    let n = total_norm(&vars, &store, NormType::L2)?;
    clip_grads_with_norm_(&vars, &mut store, 1.0, &n)?;
    clip_grad_norm_(&vars2, &mut store2, 1.0)?;
    assert_eq!(store_bits(&vars, &store)?, store_bits(&vars2, &store2)?);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// clip_grad_value_.

#[test]
fn clip_grad_value_clamps_and_keeps_nan() -> Result<()> {
    for dtype in [DType::F32, DType::F64, DType::F16, DType::BF16] {
        let input = [
            -5.0,
            -1.0,
            -0.3,
            -0.0,
            0.0,
            0.3,
            1.0,
            7.0,
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
        ];
        let g = tensor(&input, &[11], dtype)?;
        let s = tensor(&[2.5], &[], dtype)?;
        let before = vals(&g)?;
        let before_bits = bits(&g)?;
        let (vars, mut store) = setup(&[g.clone(), s.clone()])?;
        clip_grad_value_(&vars, &mut store, 1.0)?;
        let after = vals(&g)?;
        let after_bits = bits(&g)?;
        assert_eq!(g.dtype(), dtype);
        for i in 0..input.len() {
            let (b, a) = (before[i], after[i]);
            if b.is_nan() {
                assert!(a.is_nan(), "{dtype:?}: NaN must stay NaN");
            } else if b.abs() <= 1.0 {
                assert_eq!(
                    after_bits[i], before_bits[i],
                    "{dtype:?}: {b} within bounds"
                );
            } else {
                assert_eq!(a, b.signum(), "{dtype:?}: {b} clamped to ±1");
            }
        }
        assert_eq!(vals(&s)?, [1.0]);
        // clip_value 0 zeroes everything but NaN
        clip_grad_value_(&vars, &mut store, 0.0)?;
        for (i, a) in vals(&g)?.iter().enumerate() {
            if input[i].is_nan() {
                assert!(a.is_nan());
            } else {
                assert_eq!(*a, 0.0);
            }
        }
    }
    Ok(())
}

#[test]
fn clip_grad_value_result_never_exceeds_a_non_representable_bound() -> Result<()> {
    // 0.1 is not representable in any of these types: every element ends within [-0.1, 0.1],
    // within one ulp of the bound for the clamped ones.
    for dtype in [DType::F32, DType::F64, DType::F16, DType::BF16] {
        for c in [0.1, 1.0 / 3.0, 1e-3, 65519.0, 3e38] {
            if dtype == DType::F16 && c > 65504.0 {
                continue;
            }
            let input = [-1e4, -0.2, 0.2, 1e4, 0.05, 7e38];
            let input: Vec<f64> = input
                .iter()
                .map(|&x: &f64| {
                    if dtype == DType::F16 {
                        x.clamp(-6e4, 6e4)
                    } else {
                        x
                    }
                })
                .map(|x| {
                    if dtype == DType::F64 || x < 3e38 {
                        x
                    } else {
                        3.3e38
                    }
                })
                .collect();
            let g = tensor(&input, &[input.len()], dtype)?;
            let before = vals(&g)?;
            let (vars, mut store) = setup(std::slice::from_ref(&g))?;
            clip_grad_value_(&vars, &mut store, c)?;
            for (b, a) in before.iter().zip(vals(&g)?) {
                assert!(
                    a.abs() <= c,
                    "{dtype:?} clip {c}: {b} -> {a} exceeds the bound"
                );
                if b.abs() > c {
                    assert_eq!(a.signum(), b.signum());
                    assert!(
                        c - a.abs() <= ulp(dtype, c),
                        "{dtype:?} clip {c}: {b} -> {a} too far from the bound"
                    );
                } else {
                    assert_eq!(a, *b);
                }
            }
        }
    }
    Ok(())
}

/// Review findings, kept as regressions: a negative `total_norm` is refused, `max_norm = inf`
/// never clips (even an infinite norm), and `error_if_nonfinite` refuses a norm that is finite in
/// f64 but overflows the F32 tensor it is returned in.
#[test]
fn negative_total_norm_is_an_error_and_changes_nothing() -> Result<()> {
    let v = var(&[2])?;
    let mut store = GradStore::default();
    store.insert(&v, tensor(&[3.0, 4.0], &[2], DType::F32)?);
    let before = store_bits(std::slice::from_ref(&v), &store)?;
    let negative = Tensor::new(-2f32, &Device::Cpu)?;
    let msg = err_msg(
        clip_grads_with_norm_(std::slice::from_ref(&v), &mut store, 1.0, &negative),
        "negative total_norm",
    );
    assert!(msg.contains("total_norm"), "{msg}");
    assert_eq!(store_bits(std::slice::from_ref(&v), &store)?, before);
    Ok(())
}

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
fn error_if_nonfinite_refuses_a_norm_that_overflows_its_f32_tensor() -> Result<()> {
    let (a, b) = (var(&[1])?, var(&[1])?);
    let mut store = GradStore::default();
    store.insert(&a, tensor(&[1e300], &[1], DType::F64)?);
    store.insert(&b, tensor(&[1.0], &[1], DType::F32)?);
    let vars = [a, b];
    let before = store_bits(&vars, &store)?;
    let result = ClipGradNorm::new(1.0)
        .error_if_nonfinite(true)
        .clip_(&vars, &mut store);
    assert!(result.is_err(), "an F32 norm of 1e300 is inf: {result:?}");
    assert_eq!(store_bits(&vars, &store)?, before);
    // Without the flag the norm is returned (as inf in F32) and the gradients clipped.
    let norm = ClipGradNorm::new(1.0).clip_(&vars, &mut store)?;
    assert!(scalar(&norm)?.is_infinite());
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
        )?)?;
        assert!((got - want).abs() <= want * 1e-6, "p {p}: {got} vs {want}");
    }
    Ok(())
}
