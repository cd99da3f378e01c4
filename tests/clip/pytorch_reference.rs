//! Tests ported from PyTorch's test suite (`test/test_nn.py`: `test_clip_grad_norm`,
//! `test_clip_grad_value`, `test_clip_grad_norm_error_if_nonfinite`), with the reference norms
//! computed independently in f64 instead of by torch.

use crate::common;

use candle_core::{backprop::GradStore, DType, Device, Result, Tensor, Var};
use candle_grad_clip::{clip_grad_norm_, clip_grad_value_, ClipGradNorm, NormType};
use common::*;
use rand::{Rng, SeedableRng};

const MAX_NORM: f64 = 2.0;

/// PyTorch's norm types `[0.5, 1.5, 2, 4, inf]`.
fn norm_types() -> [NormType; 5] {
    [
        NormType::P(0.5),
        NormType::P(1.5),
        NormType::L2,
        NormType::P(4.0),
        NormType::Inf,
    ]
}

/// `nn.Linear(10, 10)`: a weight (10, 10) and a bias (10).
fn linear_vars() -> Result<Vec<Var>> {
    Ok(vec![var(&[10, 10])?, var(&[10])?])
}

fn set_grads(vars: &[Var], grads: &[Tensor]) -> GradStore {
    let mut store = GradStore::default();
    for (v, g) in vars.iter().zip(grads) {
        store.insert(v, g.clone());
    }
    store
}

/// `torch.arange(1., 101).view(10, 10)`, `torch.ones(10).div(1000)`.
fn large_grads() -> Result<Vec<Tensor>> {
    let w = Tensor::arange(1f32, 101f32, &Device::Cpu)?.reshape((10, 10))?;
    let b = (Tensor::ones(10, DType::F32, &Device::Cpu)? / 1000.0)?;
    Ok(vec![w, b])
}

#[test]
fn clip_grad_norm_large_gradients_are_scaled_to_max_norm() -> Result<()> {
    let vars = linear_vars()?;
    for nt in norm_types() {
        let p = nt.order();
        let originals = large_grads()?;
        let fresh: Vec<Tensor> = originals.iter().map(|g| g.copy()).collect::<Result<_>>()?;
        let mut store = set_grads(&vars, &fresh);
        let before = grad_values(&vars, &store)?;
        let norm_before = ref_norm(&before, p);

        let norm = ClipGradNorm::new(MAX_NORM)
            .with_norm_type(nt)
            .clip_(&vars, &mut store)?;
        assert_eq!(norm.dtype(), DType::F32);
        assert_norm(&norm, norm_before, 0.0, &format!("{nt}: returned norm"))?;

        let after = grad_values(&vars, &store)?;
        let norm_after = ref_norm(&after, p);
        // PyTorch: assertEqual(norm_after, max_norm) (f32 tolerance), norm_after <= norm_before.
        assert!(
            (norm_after - MAX_NORM).abs() <= MAX_NORM * 1e-5,
            "{nt}: norm after clipping {norm_after} != {MAX_NORM}"
        );
        assert!(norm_after <= norm_before);
        // Exactly max_norm * norm / (norm + 1e-6), up to the f32 rounding of the elements: each
        // is within half an ulp (relative 2^-24) of its exact product, so the norm is too (every
        // p-norm is monotone and homogeneous); 1e-12 covers the reference norm's own error.
        let exact_after = MAX_NORM * norm_before / (norm_before + 1e-6);
        assert!(
            (norm_after - exact_after).abs() <= exact_after * (f64::powi(2.0, -24) + 1e-12),
            "{nt}: norm after clipping {norm_after} vs {exact_after}"
        );

        // compare_scaling: every element scaled by one common factor, the coefficient of the
        // reference norm, and rounded to the nearest f32.
        let coef = ref_coef(MAX_NORM, norm_before, 1e-6);
        assert!(coef < 1.0);
        assert_scaled_nearest(DType::F32, &before, &after, coef, 1e-12, &format!("{nt}"));
        // The original tensors (not in the store) are untouched: the store got copies.
        assert_eq!(
            vals(&originals[0])?,
            (1..=100).map(f64::from).collect::<Vec<_>>()
        );
        // The tensors held outside the store see the new values (same storage).
        assert_eq!(grad_values(&vars, &set_grads(&vars, &fresh))?, after);
    }
    Ok(())
}

#[test]
fn clip_grad_norm_default_is_l2() -> Result<()> {
    let vars = linear_vars()?;
    let mut a = set_grads(&vars, &large_grads()?);
    let mut b = set_grads(&vars, &large_grads()?);
    let before = grad_values(&vars, &a)?;
    let na = clip_grad_norm_(&vars, &mut a, MAX_NORM)?;
    let nb = ClipGradNorm::new(MAX_NORM)
        .with_norm_type(NormType::P(2.0))
        .clip_(&vars, &mut b)?;
    let reference = ref_norm(&before, 2.0);
    assert_norm(&na, reference, 0.0, "clip_grad_norm_")?;
    assert_eq!(scalar(&na)?.to_bits(), scalar(&nb)?.to_bits());
    let after = grad_values(&vars, &a)?;
    assert_eq!(after, grad_values(&vars, &b)?);
    assert_scaled_nearest(
        DType::F32,
        &before,
        &after,
        ref_coef(MAX_NORM, reference, 1e-6),
        1e-12,
        "L2",
    );
    Ok(())
}

#[test]
fn clip_grad_norm_small_gradients_are_left_unchanged() -> Result<()> {
    let vars = linear_vars()?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    // torch.rand(10, 10).div(10000), torch.ones(10).div(500)
    let w: Vec<f32> = (0..100).map(|_| rng.gen::<f32>() / 10000.0).collect();
    let w = Tensor::from_vec(w, (10, 10), &Device::Cpu)?;
    let b = (Tensor::ones(10, DType::F32, &Device::Cpu)? / 500.0)?;
    let mut store = set_grads(&vars, &[w, b]);
    for nt in norm_types() {
        let before_bits = store_bits(&vars, &store)?;
        let before = grad_values(&vars, &store)?;
        let reference = ref_norm(&before, nt.order());
        assert!(reference < MAX_NORM);
        let norm = ClipGradNorm::new(MAX_NORM)
            .with_norm_type(nt)
            .clip_(&vars, &mut store)?;
        assert_norm(&norm, reference, 0.0, &format!("{nt}: small gradients"))?;
        assert_eq!(
            store_bits(&vars, &store)?,
            before_bits,
            "{nt}: gradients below max_norm must be bitwise unchanged"
        );
    }
    Ok(())
}

/// The end of `test_clip_grad_norm`: the same gradient clipped successively with every norm
/// type (each call sees the result of the previous one).
#[test]
fn clip_grad_norm_successive_norm_types() -> Result<()> {
    let v = var(&[10, 10])?;
    let g = Tensor::arange(1f32, 101f32, &Device::Cpu)?.reshape((10, 10))?;
    let mut store = GradStore::default();
    store.insert(&v, g);
    let vars = [v];
    for nt in norm_types() {
        let before = grad_values(&vars, &store)?;
        let reference = ref_norm(&before, nt.order());
        let norm = ClipGradNorm::new(MAX_NORM)
            .with_norm_type(nt)
            .clip_(&vars, &mut store)?;
        assert_norm(&norm, reference, 0.0, &format!("successive {nt}"))?;
        let after = grad_values(&vars, &store)?;
        let coef = ref_coef(MAX_NORM, reference, 1e-6);
        if coef >= 1.0 {
            assert_eq!(after, before, "{nt}: norm {reference} <= max_norm");
        } else {
            // After the first clip the norm is about 2, where eps changes the coefficient by
            // 5e-7 relative (several f32 ulps): rounding to nearest tells it apart.
            assert_scaled_nearest(DType::F32, &before, &after, coef, 1e-12, &format!("{nt}"));
        }
    }
    Ok(())
}

#[test]
fn clip_grad_value_pytorch() -> Result<()> {
    let clip = 2.5;
    // torch.arange(-50., 50).view(10, 10).div_(5), torch.ones(10).mul_(2)
    let gw = (Tensor::arange(-50f32, 50f32, &Device::Cpu)?.reshape((10, 10))? / 5.0)?;
    let gb = (Tensor::ones(10, DType::F32, &Device::Cpu)? * 2.0)?;
    for with_bias in [true, false] {
        let vars = linear_vars()?;
        let mut store = GradStore::default();
        store.insert(&vars[0], gw.copy()?);
        if with_bias {
            store.insert(&vars[1], gb.copy()?);
        }
        clip_grad_value_(&vars, &mut store, clip)?;
        assert_eq!(store.get(&vars[1]).is_some(), with_bias);
        let w_before = vals(&gw)?;
        let w_after = vals(store.get(&vars[0]).unwrap())?;
        assert_eq!(store.get(&vars[0]).unwrap().dims(), &[10, 10]);
        assert_eq!(store.get(&vars[0]).unwrap().dtype(), DType::F32);
        for (b, a) in w_before.iter().zip(&w_after) {
            assert!(*a <= clip && *a >= -clip);
            assert_eq!(*a, b.clamp(-clip, clip), "clamp({b}) into ±{clip}");
        }
        assert!(w_after.contains(&2.5) && w_after.contains(&-2.5));
        if with_bias {
            assert_eq!(vals(store.get(&vars[1]).unwrap())?, vec![2.0; 10]);
        }
    }
    Ok(())
}

/// `test_clip_grad_norm_error_if_nonfinite`, restricted to the norm types this crate accepts
/// (p > 0): F64 parameters of ones(10) whose gradient is a scalar (in every element or only
/// one), optionally after a parameter whose gradient is 1.
#[test]
fn clip_grad_norm_error_if_nonfinite_pytorch() -> Result<()> {
    let norms_pos = [
        NormType::P(0.1),
        NormType::L1,
        NormType::L2,
        NormType::P(3.5),
        NormType::Inf,
    ];
    let inf = f64::INFINITY;
    // (scalars, whether the norm is non-finite for every positive norm type.)
    // 2e200: the L2 and L3.5 sums overflow f64 in PyTorch (which then reports an infinite norm,
    // or an error); the README promises the finite norm here (the rescue pass), so it is a finite
    // case like 2e22, error_if_nonfinite or not.
    let cases: [(&[f64], bool); 4] = [
        (&[inf, -inf], true),
        (&[f64::NAN], true),
        (&[2e22, -2e22], false),
        (&[2e200, -2e200], false),
    ];
    for (scalars, nonfinite) in cases {
        for &scalar_value in scalars {
            for grad_only_one_elem in [false, true] {
                for prefix in [false, true] {
                    for nt in norms_pos {
                        for error_if_nonfinite in [false, true] {
                            let what = format!(
                                "scalar {scalar_value}, one elem {grad_only_one_elem}, prefix {prefix}, {nt}, error {error_if_nonfinite}"
                            );
                            let mut vars = vec![];
                            let mut store = GradStore::default();
                            if prefix {
                                let v = var(&[1])?;
                                store.insert(&v, tensor(&[1.0], &[1], DType::F64)?);
                                vars.push(v);
                            }
                            let mut g = vec![
                                if grad_only_one_elem {
                                    0.0
                                } else {
                                    scalar_value
                                };
                                10
                            ];
                            g[1] = scalar_value;
                            let v = var(&[10])?;
                            store.insert(&v, tensor(&g, &[10], DType::F64)?);
                            vars.push(v);

                            let values = grad_values(&vars, &store)?;
                            let reference = ref_norm(&values, nt.order());
                            let before = store_bits(&vars, &store)?;
                            let clip = ClipGradNorm::new(1.0)
                                .with_norm_type(nt)
                                .with_error_if_nonfinite(error_if_nonfinite);
                            if nonfinite {
                                if error_if_nonfinite {
                                    let msg = err_msg(clip.clip_(&vars, &mut store), &what);
                                    assert!(
                                        msg.contains("nan")
                                            || msg.contains("inf")
                                            || msg.contains("finite"),
                                        "{what}: the error should name the problem: {msg}"
                                    );
                                    assert_eq!(store_bits(&vars, &store)?, before, "{what}");
                                } else {
                                    let norm = clip.clip_(&vars, &mut store)?;
                                    assert_norm(&norm, reference, 0.0, &what)?;
                                    // As PyTorch: a NaN norm makes every gradient NaN, an
                                    // infinite one gives coefficient 0 (so inf * 0 = NaN).
                                    let coef = if reference.is_nan() {
                                        f64::NAN
                                    } else {
                                        ref_coef(1.0, reference, 1e-6)
                                    };
                                    let after = grad_values(&vars, &store)?;
                                    assert_scaled(DType::F64, &values, &after, coef, 0.0, &what);
                                }
                            } else {
                                assert!(reference.is_finite(), "{what}: reference {reference}");
                                let norm = clip.clip_(&vars, &mut store)?;
                                assert_norm(&norm, reference, 1e-12, &what)?;
                                let after = grad_values(&vars, &store)?;
                                let coef = ref_coef(1.0, reference, 1e-6);
                                assert_scaled(
                                    DType::F64,
                                    &values,
                                    &after,
                                    coef,
                                    rel64(nt.order()),
                                    &what,
                                );
                            }
                        }
                    }
                }
            }
        }
    }
    Ok(())
}
