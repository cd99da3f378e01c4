//! Clipping: `clip_grad_norm_` for every norm type and dtype, F64 products rounded once,
//! `clip_grad_value_` and `clip_grads_with_norm_` bitwise the CPU's, NaN or negative given norms,
//! ten thousand tensors in one table, `error_if_nonfinite`, empty gradients.

use super::*;
use candle_grad_clip::ClipGradNorm;

/// Runs `op` on a fresh build of `scenario` on the CPU and emulated (grid `grid`, `order`), and
/// returns the buffers afterwards and the results.
#[allow(clippy::type_complexity)]
fn both<R>(
    scenario: &Scenario,
    grid: u32,
    order: BlockOrder,
    op: impl Fn(&[Var], &mut GradStore) -> Result<R>,
) -> Result<((Vec<Vec<u64>>, R), (Vec<Vec<u64>>, R))> {
    let mut cpu = scenario.build()?;
    let cpu_result = op(&cpu.vars, &mut cpu.store)?;
    let mut emu = scenario.build()?;
    let (emu_result, _) = emulation(grid, order, 3).run(|| op(&emu.vars, &mut emu.store))?;
    Ok((
        (Scenario::bits(&emu.bases)?, emu_result),
        (Scenario::bits(&cpu.bases)?, cpu_result),
    ))
}

#[test]
fn clip_grad_norm_matches_the_cpu_for_every_norm_type_and_dtype() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(2);
    for case in 0..8 {
        let dtypes: &[DType] = if case < 4 {
            &DTYPES[case..case + 1]
        } else {
            &DTYPES
        };
        let scenario = random_scenario(&mut rng, dtypes, &[]);
        for (k, norm) in NORMS.into_iter().enumerate() {
            let clip = ClipGradNorm::new(0.5).with_norm_type(norm);
            let what = format!("case {case} {norm}");
            let mut first: Option<Vec<Vec<u64>>> = None;
            for (grid, order) in [(1, ORDERS[0]), (7, ORDERS[k % 4]), (64, ORDERS[3])] {
                let ((emu, en), (cpu, cn)) = both(&scenario, grid, order, |v, g| clip.clip_(v, g))?;
                assert_norms_close(&en, &cn, norm, &what)?;
                assert_buffers(&scenario, &emu, &cpu, false, &what);
                // The clipped gradients are bitwise the same for every grid.
                match &first {
                    None => first = Some(emu),
                    Some(f) => assert!(f == &emu, "{what}: grid {grid} differs"),
                }
            }
        }
    }
    Ok(())
}

/// F64 gradients return an F64 norm, so the coefficient is known exactly: every element must be
/// `old * (max_norm / (norm + eps))` rounded once (an independent f64 product).
#[test]
fn f64_clipping_is_the_product_rounded_once() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(3);
    for _ in 0..4 {
        let scenario = random_scenario(&mut rng, &[DType::F64], &[]);
        let built = scenario.build()?;
        let before = Scenario::bits(&built.bases)?;
        let mut store = built.store;
        let (norm, _) =
            KernelEmulation::new().run(|| clip_grad_norm_(&built.vars, &mut store, 0.25))?;
        let c = 0.25 / (scalar(&norm)? + 1e-6);
        assert!(c < 1.0);
        let after = Scenario::bits(&built.bases)?;
        // Bases reached by no view keep their values; all others are scaled exactly once.
        for (b, (old, new)) in before.iter().zip(&after).enumerate() {
            let reached = covered(&scenario, b)?;
            for (i, (&o, &n)) in old.iter().zip(new).enumerate() {
                let want = if reached[i] {
                    f64::from_bits(o) * c
                } else {
                    f64::from_bits(o)
                };
                assert_eq!(
                    f64::from_bits(n).to_bits(),
                    want.to_bits(),
                    "base {b} element {i}"
                );
            }
        }
    }
    Ok(())
}

/// Which elements of base `b` some view of the scenario covers.
fn covered(scenario: &Scenario, b: usize) -> Result<Vec<bool>> {
    let base = &scenario.bases[b];
    let n = base.values.len();
    // The element indices of the base, viewed as each gradient views it (candle's own indexing).
    let idx: Vec<f64> = (0..n).map(|i| i as f64).collect();
    let t = Tensor::from_vec(idx, base.shape.clone(), &Device::Cpu)?;
    let mut seen = vec![false; n];
    for (vb, kind) in &scenario.views {
        if *vb != b {
            continue;
        }
        let view = match kind {
            ViewKind::Whole => t.clone(),
            ViewKind::Narrow { start, len } => t.narrow(0, *start, *len)?,
            ViewKind::Transposed => t.t()?,
            ViewKind::TransposedNarrow => t.t()?.narrow(1, 1, t.dims()[0] - 2)?,
        };
        for i in view.flatten_all()?.to_vec1::<f64>()? {
            seen[i as usize] = true;
        }
    }
    Ok(seen)
}

#[test]
fn clip_grad_value_is_bitwise_the_cpus() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(4);
    let specials = [
        f64::NAN,
        f64::INFINITY,
        f64::NEG_INFINITY,
        -0.0,
        1e30,
        -1e-30,
    ];
    for case in 0..8 {
        let scenario = random_scenario(&mut rng, &DTYPES, &specials);
        for (k, clip) in [0.0, 0.1, 1.0 / 3.0, 1.0, 1e10, f64::INFINITY]
            .into_iter()
            .enumerate()
        {
            let grid = GRIDS[k % GRIDS.len()];
            let order = ORDERS[(case + k) % ORDERS.len()];
            let ((emu, _), (cpu, _)) =
                both(&scenario, grid, order, |v, g| clip_grad_value_(v, g, clip))?;
            assert_buffers(
                &scenario,
                &emu,
                &cpu,
                true,
                &format!("case {case} clip {clip}"),
            );
        }
    }
    Ok(())
}

#[test]
fn clip_grads_with_norm_is_bitwise_the_cpus() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(5);
    for case in 0..6 {
        let scenario = random_scenario(&mut rng, &DTYPES, &[]);
        for (k, norm_dtype) in DTYPES.into_iter().enumerate() {
            // Coefficients 2/37.5, 2/3, just below 1, and above 1 (nothing written).
            for norm_value in [37.5, 3.0, 2.0 + 1e-5, 0.5, 1e-3] {
                let norm = Tensor::new(norm_value, &Device::Cpu)?.to_dtype(norm_dtype)?;
                let ((emu, _), (cpu, _)) = both(&scenario, GRIDS[k], ORDERS[k], |v, g| {
                    clip_grads_with_norm_(v, g, 2.0, &norm)
                })?;
                assert_buffers(
                    &scenario,
                    &emu,
                    &cpu,
                    true,
                    &format!("case {case} norm {norm_value} {norm_dtype:?}"),
                );
            }
        }
    }
    Ok(())
}

/// A NaN norm makes the gradients NaN (as on the CPU); a negative one too on the CUDA path, which
/// never reads the norm back (the CPU refuses it): the signs never flip.
#[test]
fn nan_or_negative_given_norms_poison_the_gradients() -> Result<()> {
    for dtype in DTYPES {
        for bad in [f64::NAN, -3.0, -0.5] {
            let scenario = Scenario {
                bases: vec![Base {
                    values: vec![1.0, -2.0, 3.0, 0.0],
                    shape: vec![4],
                    dtype,
                }],
                views: vec![(0, ViewKind::Whole)],
            };
            let built = scenario.build()?;
            let mut store = built.store;
            let norm = Tensor::new(bad, &Device::Cpu)?;
            KernelEmulation::new()
                .run(|| clip_grads_with_norm_(&built.vars, &mut store, 1.0, &norm))?;
            let after = built.bases[0].to_dtype(DType::F64)?.to_vec1::<f64>()?;
            assert!(
                after.iter().all(|x| x.is_nan()),
                "{dtype:?} {bad}: {after:?}"
            );
        }
    }
    Ok(())
}

#[test]
fn ten_thousand_tensors_in_one_table() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(6);
    let mut scenario = Scenario::default();
    for i in 0..10_000 {
        let n = 1 + (i * 37) % 300;
        scenario.bases.push(Base {
            values: random_values(&mut rng, n, &[]),
            shape: vec![n],
            dtype: DTYPES[i % 4],
        });
        scenario.views.push((i, ViewKind::Whole));
    }
    for (norm, grid) in [(NormType::L2, 7), (NormType::Inf, 64), (NormType::L1, 1)] {
        let clip = ClipGradNorm::new(1.0).with_norm_type(norm);
        let ((emu, en), (cpu, cn)) = both(&scenario, grid, BlockOrder::Shuffled, |v, g| {
            clip.clip_(v, g)
        })?;
        assert_norms_close(&en, &cn, norm, &format!("10,000 tensors {norm}"))?;
        assert_buffers(&scenario, &emu, &cpu, false, "10,000 tensors");
    }
    // One table of 10,000 segments, sent once, for the norm and the scale.
    let mut built = scenario.build()?;
    let (_, log) =
        KernelEmulation::new().run(|| clip_grad_norm_(&built.vars, &mut built.store, 1.0))?;
    assert_eq!(log.table_uploads, [10_000 * 4]);
    Ok(())
}

#[test]
fn error_if_nonfinite_modifies_nothing() -> Result<()> {
    for bad in [f64::NAN, f64::INFINITY] {
        for dtype in DTYPES {
            let scenario = Scenario {
                bases: vec![
                    Base {
                        values: vec![30.0, 40.0],
                        shape: vec![2],
                        dtype,
                    },
                    Base {
                        values: vec![1.0, bad, 2.0],
                        shape: vec![3],
                        dtype,
                    },
                ],
                views: vec![(0, ViewKind::Whole), (1, ViewKind::Whole)],
            };
            let built = scenario.build()?;
            let before = Scenario::bits(&built.bases)?;
            let mut store = built.store;
            let clip = ClipGradNorm::new(1.0).with_error_if_nonfinite(true);
            let r = KernelEmulation::new().run(|| clip.clip_(&built.vars, &mut store));
            let msg = r.expect_err("a non-finite norm is an error").to_string();
            assert!(msg.contains("non-finite"), "{msg}");
            let after = Scenario::bits(&built.bases)?;
            assert_eq!(before, after, "{dtype:?} {bad}: modified");
        }
    }
    Ok(())
}

#[test]
fn empty_gradients() -> Result<()> {
    let scenario = Scenario {
        bases: vec![
            Base {
                values: vec![],
                shape: vec![0],
                dtype: DType::F32,
            },
            Base {
                values: vec![],
                shape: vec![3, 0],
                dtype: DType::BF16,
            },
        ],
        views: vec![(0, ViewKind::Whole), (1, ViewKind::Whole)],
    };
    let built = scenario.build()?;
    let mut store = built.store;
    for norm in NORMS {
        let (n, log) = KernelEmulation::new()
            .grid(3)
            .run(|| total_norm(&built.vars, &store, norm, false))?;
        assert_eq!(scalar(&n)?, 0.0);
        assert_eq!(log.table_uploads, [0]);
    }
    let (n, log) = KernelEmulation::new().run(|| clip_grad_norm_(&built.vars, &mut store, 1.0))?;
    assert_eq!(scalar(&n)?, 0.0);
    // Nothing to write: no scale launch.
    assert_eq!(kernels(&log), ["grad_clip_reduce_sq"]);
    KernelEmulation::new().run(|| clip_grad_value_(&built.vars, &mut store, 1.0))?;
    KernelEmulation::new().run(|| clip_grads_with_norm_(&built.vars, &mut store, 1.0, &n))?;
    Ok(())
}
