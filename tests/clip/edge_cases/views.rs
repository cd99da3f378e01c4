//! Views and aliasing: transposed and narrowed gradients, one tensor for two vars, overlapping
//! views.

use super::*;
use candle_grad_clip::ClipGradNorm;

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
            let n = total_norm(&vars, &store, nt, false)?;
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
            let n = total_norm(&vars, &store, nt, false)?;
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
            .with_norm_type(NormType::P(1.5))
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
        let l2 = total_norm(&vars, &store, NormType::L2, false)?;
        assert_norm(&l2, 50f64.sqrt(), 1e-15, "shared L2")?;
        assert_eq!(
            scalar(&total_norm(&vars, &store, NormType::L1, false)?)?,
            14.0
        );
        assert_eq!(
            scalar(&total_norm(&vars, &store, NormType::Inf, false)?)?,
            4.0
        );
        let n = ClipGradNorm::new(1.0)
            .with_eps(0.0)
            .clip_(&vars, &mut store)?;
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
            .with_norm_type(NormType::L1)
            .with_eps(0.0)
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
