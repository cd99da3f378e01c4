//! Bad arguments: integer gradients, a bad `max_norm`, `p`, clip value, `eps` or `total_norm`,
//! broadcast gradients. Each is refused, and nothing changes.

use super::*;

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
            total_norm(&vars, &store, NormType::L2, false),
            "total_norm",
        ));
        check(err_msg(
            clip_grad_norm_(&vars, &mut store, 1.0),
            "clip_grad_norm_",
        ));
        assert_eq!(store_bits(&vars, &store)?, before);
        check(err_msg(
            ClipGradNorm::new(1.0)
                .with_norm_type(NormType::Inf)
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
                    .with_norm_type(nt)
                    .with_error_if_nonfinite(true)
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
        let msg = err_msg(
            total_norm(&vars, &store, NormType::P(p), false),
            "total_norm p",
        );
        assert!(msg.contains(shown), "message should show p = {p}: {msg}");
        let msg = err_msg(
            ClipGradNorm::new(1.0)
                .with_norm_type(NormType::P(p))
                .clip_(&vars, &mut store),
            "clip_ p",
        );
        assert!(msg.contains(shown), "message should show p = {p}: {msg}");
        assert_eq!(store_bits(&vars, &store)?, before, "p = {p}");
        // also with no gradients at all
        let mut empty = GradStore::default();
        err_msg(
            total_norm(&vars, &empty, NormType::P(p), false),
            "p, no grads",
        );
        err_msg(
            ClipGradNorm::new(1.0)
                .with_norm_type(NormType::P(p))
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
                    .with_norm_type(nt)
                    .with_eps(eps)
                    .with_error_if_nonfinite(error_if_nonfinite);
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
                let n = total_norm(&vars, &store, nt, false)?;
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
                    .with_norm_type(nt)
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
                assert_eq!(opt.steps()?, 0);
                assert!(opt.last_norm().is_none());
            }
        }
    }
    Ok(())
}

/// A negative `total_norm` is refused (a review finding, kept as a regression).
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
