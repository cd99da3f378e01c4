//! The norm: every grid size and block order give the same bits, and the CPU agrees (random
//! scenarios; huge, tiny and non-finite values); the rescue pass is one more launch.

use super::*;

/// Each norm of `norms` of `scenario`: emulated for every grid size and block order, all bitwise
/// equal, and close to the CPU's (each back end with its own build of the scenario, built once).
fn norms_everywhere_match_the_cpu(
    scenario: &Scenario,
    norms: &[NormType],
    what: &str,
) -> Result<()> {
    let emu = scenario.build()?;
    let cpu = scenario.build()?;
    for &norm in norms {
        let mut first: Option<Tensor> = None;
        for (k, &grid) in GRIDS.iter().enumerate() {
            for (j, &order) in ORDERS.iter().enumerate() {
                let (n, _) = emulation(grid, order, (k * 7 + j) as u64)
                    .run(|| total_norm(&emu.vars, &emu.store, norm, false))?;
                match &first {
                    None => first = Some(n),
                    Some(f) => {
                        let (a, b) = (scalar(f)?, scalar(&n)?);
                        assert!(
                            same_bits(a, b),
                            "{what} {norm}: grid {grid} {order:?} gives {b:e}, grid 1 in order {a:e}"
                        );
                    }
                }
            }
        }
        let emulated = first.expect("at least one grid");
        let reference = total_norm(&cpu.vars, &cpu.store, norm, false)?;
        assert_norms_close(&emulated, &reference, norm, &format!("{what} {norm}"))?;
    }
    Ok(())
}

#[test]
fn total_norm_is_bitwise_the_same_for_every_grid_and_block_order() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(1);
    for case in 0..10 {
        let dtypes: &[DType] = if case < 4 {
            &DTYPES[case..case + 1]
        } else {
            &DTYPES
        };
        let scenario = random_scenario(&mut rng, dtypes, &[]);
        norms_everywhere_match_the_cpu(&scenario, &NORMS, &format!("case {case} ({dtypes:?})"))?;
    }
    Ok(())
}

#[test]
fn norms_of_huge_tiny_and_nonfinite_values() -> Result<()> {
    let cases: Vec<(DType, Vec<f64>)> = vec![
        // Squares overflow f64: the rescue pass gives the finite norm.
        (DType::F64, vec![1e200, -3e200, 4e200]),
        (DType::F64, vec![f64::MAX, f64::MAX, 1.0]),
        // Squares underflow.
        (DType::F64, vec![1e-200, 3e-200, -4e-200, 5e-320]),
        // 8th powers of f32 values leave the f64 range (p > 6 rescue).
        (DType::F32, vec![1e38, -2e38, 3e37]),
        (DType::F32, vec![1e-38, 2e-40, -1e-39]),
        (DType::F16, vec![65504.0, -65504.0, 1.0, 6e-8]),
        (DType::BF16, vec![3e38, -1e-38, 1.0]),
        (DType::F32, vec![1.0, f64::NAN, 2.0]),
        (DType::F32, vec![1.0, f64::INFINITY, -2.0]),
        (DType::F32, vec![1.0, f64::NEG_INFINITY, f64::NAN]),
        (DType::BF16, vec![1.0, f64::NAN, 2.0]),
        (DType::F64, vec![1.0, f64::INFINITY, 3.0]),
        (DType::F64, vec![0.0, 0.0, -0.0]),
    ];
    for (dtype, values) in &cases {
        let scenario = Scenario {
            bases: vec![Base {
                values: values.clone(),
                shape: vec![values.len()],
                dtype: *dtype,
            }],
            views: vec![(0, ViewKind::Whole)],
        };
        let norms = [
            NormType::L1,
            NormType::L2,
            NormType::Inf,
            NormType::P(3.0),
            NormType::P(8.0),
            NormType::P(2000.0),
        ];
        norms_everywhere_match_the_cpu(&scenario, &norms, &format!("{dtype:?} {values:?}"))?;
    }
    Ok(())
}

/// F64 gradients and `p > 6` take the rescue launch (a no-op unless the sum left the range).
#[test]
fn the_rescue_pass_is_one_more_launch() -> Result<()> {
    let scenario = Scenario {
        bases: vec![Base {
            values: vec![3e200, 4e200],
            shape: vec![2],
            dtype: DType::F64,
        }],
        views: vec![(0, ViewKind::Whole)],
    };
    let built = scenario.build()?;
    let mut store = built.store;
    let (norm, log) =
        KernelEmulation::new().run(|| clip_grad_norm_(&built.vars, &mut store, 1.0))?;
    // max · sqrt((3/4)² + 1), with 3e200/4e200 rounded: within an ulp or two of 5e200.
    assert!((scalar(&norm)? / 5e200 - 1.0).abs() < 1e-15);
    assert_eq!(
        kernels(&log),
        [
            "grad_clip_reduce_sq",
            "grad_clip_reduce_pow",
            "grad_clip_apply"
        ]
    );
    let clipped = store.get(&built.vars[0]).expect("grad").to_vec1::<f64>()?;
    assert!((clipped[0] - 0.6).abs() < 1e-15 && (clipped[1] - 0.8).abs() < 1e-15);
    Ok(())
}
