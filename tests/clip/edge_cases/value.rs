//! `clip_grad_value_`: clamps, keeps NaN, and never exceeds a bound the dtype cannot represent.

use super::*;

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
