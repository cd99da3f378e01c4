//! Non-finite norms: NaN and infinite norms by default, `error_if_nonfinite`, and the norm
//! assertion's own treatment of an infinite reference.

use super::*;

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
            let n = total_norm(&vars, &store, nt, false)?;
            assert!(scalar(&n)?.is_nan(), "{dtype:?} {nt}: total_norm");
            let n = ClipGradNorm::new(1.0)
                .with_norm_type(nt)
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
                let n = total_norm(&vars, &store, nt, false)?;
                assert_eq!(scalar(&n)?, f64::INFINITY, "{dtype:?} {nt}");
                let n = ClipGradNorm::new(1.0)
                    .with_norm_type(nt)
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
                        .with_norm_type(nt)
                        .with_error_if_nonfinite(true)
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
                .with_norm_type(nt)
                .with_error_if_nonfinite(true)
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

/// `error_if_nonfinite` refuses a norm that is finite in f64 but overflows the F32 tensor it is
/// returned in (a review finding, kept as a regression).
#[test]
fn error_if_nonfinite_refuses_a_norm_that_overflows_its_f32_tensor() -> Result<()> {
    let (a, b) = (var(&[1])?, var(&[1])?);
    let mut store = GradStore::default();
    store.insert(&a, tensor(&[1e300], &[1], DType::F64)?);
    store.insert(&b, tensor(&[1.0], &[1], DType::F32)?);
    let vars = [a, b];
    let before = store_bits(&vars, &store)?;
    let result = ClipGradNorm::new(1.0)
        .with_error_if_nonfinite(true)
        .clip_(&vars, &mut store);
    assert!(result.is_err(), "an F32 norm of 1e300 is inf: {result:?}");
    assert_eq!(store_bits(&vars, &store)?, before);
    // Without the flag the norm is returned (as inf in F32) and the gradients clipped.
    let norm = ClipGradNorm::new(1.0).clip_(&vars, &mut store)?;
    assert!(scalar(&norm)?.is_infinite());
    Ok(())
}

/// `total_norm(.., error_if_nonfinite = true)` (PyTorch's `get_total_norm`): a NaN or infinite
/// norm is an error naming it, for every dtype and norm type; a finite norm comes back with the
/// same bits as without the flag.
#[test]
fn total_norm_with_error_if_nonfinite_refuses_a_nonfinite_norm() -> Result<()> {
    for dtype in [DType::F32, DType::F64, DType::F16, DType::BF16] {
        for nt in ALL_NORMS {
            for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
                let (vars, store) = nonfinite_setup(dtype, bad)?;
                let err = err_msg(total_norm(&vars, &store, nt, true), "total_norm");
                assert!(err.contains("non-finite"), "{dtype:?} {nt} {bad}: {err}");
            }
            let (vars, store) = nonfinite_setup(dtype, 3.0)?;
            let with = total_norm(&vars, &store, nt, true)?;
            let without = total_norm(&vars, &store, nt, false)?;
            assert_eq!(
                scalar(&with)?.to_bits(),
                scalar(&without)?.to_bits(),
                "{dtype:?} {nt}"
            );
        }
    }
    Ok(())
}
