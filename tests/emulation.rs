//! The CUDA kernels, run on the CPU through the host emulation (feature `emulation`, on in this
//! crate's tests), driven by the crate's own CUDA host code: every public operation against the
//! CPU back end, and the determinism claim of the CUDA path (the norm is bitwise the same for every
//! grid size and block order).
//!
//! The CPU back end is the reference here: it is itself checked against independent f64
//! references in `edge_cases.rs`, `properties.rs` and `pytorch_reference.rs`. Where the README
//! promises equality (the infinity norm, value clipping, scaling by a given norm) the comparison is
//! bitwise; norms (whose partial sums cover other chunks on the GPU) agree to within one rounding
//! of the returned dtype, and elements scaled by them to within one unit in the last place.

mod common;

use candle_core::{backprop::GradStore, DType, Device, Result, Tensor, Var};
use candle_grad_clip::{
    clip_grad_norm_, clip_grad_value_, clip_grads_with_norm_, grad_norms, total_norm, BlockOrder,
    ClipGradNorm, KernelEmulation, NormType,
};
use candle_nn::{linear, Module, VarBuilder, VarMap};
use common::{assert_named_norms, bits, kernels, scalar, ulp, DTYPES, ORDERS};
use half::{bf16, f16};
use rand::{rngs::StdRng, Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};

const NORMS: [NormType; 6] = [
    NormType::L1,
    NormType::L2,
    NormType::Inf,
    NormType::P(3.0),
    NormType::P(0.5),
    NormType::P(7.5),
];
const GRIDS: [u32; 5] = [1, 2, 3, 7, 64];

// ---------------------------------------------------------------------------------------------
// Scenarios: gradients as views of base buffers, built afresh for each back end.

#[derive(Clone, Debug)]
enum ViewKind {
    Whole,
    /// `narrow(0, start, len)` of a 1-d base: an offset (misaligned when `start` is odd).
    Narrow {
        start: usize,
        len: usize,
    },
    /// `t()` of a 2-d base: non-contiguous, written by the strided kernel.
    Transposed,
    /// `t()?.narrow(1, 1, cols - 2)` of a 2-d base: strided at an offset.
    TransposedNarrow,
}

#[derive(Clone, Debug)]
struct Base {
    values: Vec<f64>,
    shape: Vec<usize>,
    dtype: DType,
}

#[derive(Clone, Debug, Default)]
struct Scenario {
    bases: Vec<Base>,
    /// (base, view) per gradient; a base listed twice is an alias.
    views: Vec<(usize, ViewKind)>,
}

struct Built {
    bases: Vec<Tensor>,
    vars: Vec<Var>,
    store: GradStore,
}

impl Scenario {
    fn build(&self) -> Result<Built> {
        let bases: Vec<Tensor> = self
            .bases
            .iter()
            .map(|b| {
                Tensor::from_vec(b.values.clone(), b.shape.clone(), &Device::Cpu)?.to_dtype(b.dtype)
            })
            .collect::<Result<_>>()?;
        let mut store = GradStore::default();
        let mut vars = Vec::new();
        for (b, kind) in &self.views {
            let base = &bases[*b];
            let view = match kind {
                ViewKind::Whole => base.clone(),
                ViewKind::Narrow { start, len } => base.narrow(0, *start, *len)?,
                ViewKind::Transposed => base.t()?,
                ViewKind::TransposedNarrow => {
                    let cols = base.dims()[0];
                    base.t()?.narrow(1, 1, cols - 2)?
                }
            };
            let var = Var::zeros(1, DType::F32, &Device::Cpu)?;
            store.insert(var.as_tensor(), view);
            vars.push(var);
        }
        Ok(Built { bases, vars, store })
    }

    /// Every element of every base (`Built::bases`), as raw bits.
    fn bits(bases: &[Tensor]) -> Result<Vec<Vec<u64>>> {
        bases.iter().map(bits).collect()
    }
}

fn value_of(dtype: DType, b: u64) -> f64 {
    match dtype {
        DType::F32 => f32::from_bits(b as u32) as f64,
        DType::F64 => f64::from_bits(b),
        DType::F16 => f16::from_bits(b as u16).to_f64(),
        _ => bf16::from_bits(b as u16).to_f64(),
    }
}

/// Seeded normal values spread over five decades, with the given special values mixed in.
fn random_values(rng: &mut StdRng, n: usize, specials: &[f64]) -> Vec<f64> {
    let mut v: Vec<f64> = (0..n)
        .map(|_| {
            let x: f64 = StandardNormal.sample(rng);
            x * 10f64.powi(rng.gen_range(-2..3))
        })
        .collect();
    for &s in specials {
        if n > 0 {
            let i = rng.gen_range(0..n);
            v[i] = s;
        }
    }
    v
}

const LENGTHS: [usize; 13] = [1, 2, 3, 7, 31, 32, 33, 255, 4095, 4096, 4097, 8193, 70_001];

/// A random scenario: 1 to 6 bases of the given dtypes (one drawn per base), views of every kind.
fn random_scenario(rng: &mut StdRng, dtypes: &[DType], specials: &[f64]) -> Scenario {
    let mut s = Scenario::default();
    let n_bases = rng.gen_range(1..=6);
    for _ in 0..n_bases {
        let dtype = dtypes[rng.gen_range(0..dtypes.len())];
        let b = s.bases.len();
        if rng.gen_bool(0.3) {
            let (rows, cols) = (rng.gen_range(3..40), rng.gen_range(3..90));
            s.bases.push(Base {
                values: random_values(rng, rows * cols, specials),
                shape: vec![rows, cols],
                dtype,
            });
            let kind = if rng.gen_bool(0.5) {
                ViewKind::Transposed
            } else {
                ViewKind::TransposedNarrow
            };
            s.views.push((b, kind));
        } else {
            let n = LENGTHS[rng.gen_range(0..LENGTHS.len())];
            s.bases.push(Base {
                values: random_values(rng, n, specials),
                shape: vec![n],
                dtype,
            });
            match rng.gen_range(0..4) {
                0 if n > 2 => {
                    // Two overlapping views (aliases in one storage).
                    s.views.push((
                        b,
                        ViewKind::Narrow {
                            start: 1,
                            len: n - 2,
                        },
                    ));
                    s.views.push((
                        b,
                        ViewKind::Narrow {
                            start: 0,
                            len: n / 2,
                        },
                    ));
                }
                1 if n > 1 => s.views.push((
                    b,
                    ViewKind::Narrow {
                        start: 1,
                        len: n - 1,
                    },
                )),
                2 => {
                    // The same gradient twice.
                    s.views.push((b, ViewKind::Whole));
                    s.views.push((b, ViewKind::Whole));
                }
                _ => s.views.push((b, ViewKind::Whole)),
            }
        }
    }
    s
}

fn emulation(grid: u32, order: BlockOrder, seed: u64) -> KernelEmulation {
    KernelEmulation::new()
        .grid(grid)
        .block_order(order)
        .seed(seed)
}

fn same_bits(a: f64, b: f64) -> bool {
    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
}

/// Norms of two back ends agree to within one rounding of the returned dtype (the infinity norm
/// exactly); general powers get a few f64 ulps more, amplified by 1/p.
fn assert_norms_close(emulated: &Tensor, cpu: &Tensor, norm: NormType, what: &str) -> Result<()> {
    assert_eq!(emulated.dtype(), cpu.dtype(), "{what}: norm dtype");
    assert_eq!(emulated.rank(), 0, "{what}: 0-d");
    let (e, c) = (scalar(emulated)?, scalar(cpu)?);
    if norm == NormType::Inf || !c.is_finite() || c == 0.0 {
        assert!(same_bits(e, c), "{what}: emulated {e:e}, cpu {c:e}");
        return Ok(());
    }
    let tol = match (emulated.dtype(), norm) {
        (DType::F64, NormType::L1 | NormType::L2) => c * 1e-14,
        (DType::F64, _) => c * 1e-12,
        _ => ulp(DType::F32, c),
    };
    assert!(
        (e - c).abs() <= tol,
        "{what}: emulated {e:e}, cpu {c:e} (diff {:e}, tol {tol:e})",
        (e - c).abs()
    );
    Ok(())
}

/// Base buffers of two back ends after an operation: every element within one ulp of its dtype
/// (F64: within 1e-12 relative, the norms' own agreement; `bitwise`: equal bits), NaN where the
/// other has NaN.
fn assert_buffers(
    scenario: &Scenario,
    emulated: &[Vec<u64>],
    cpu: &[Vec<u64>],
    bitwise: bool,
    what: &str,
) {
    for (b, base) in scenario.bases.iter().enumerate() {
        for (i, (&e, &c)) in emulated[b].iter().zip(&cpu[b]).enumerate() {
            if e == c {
                continue;
            }
            let (ev, cv) = (value_of(base.dtype, e), value_of(base.dtype, c));
            let tol = if base.dtype == DType::F64 {
                cv.abs() * 1e-12
            } else {
                ulp(base.dtype, cv)
            };
            let ok = !bitwise
                && ((ev.is_nan() && cv.is_nan())
                    || (ev.is_finite() && cv.is_finite() && (ev - cv).abs() <= tol));
            assert!(
                ok,
                "{what}: base {b} ({:?}) element {i}: emulated {ev:e} ({e:#x}), cpu {cv:e} ({c:#x})",
                base.dtype
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The norm: every grid and block order give the same bits; the CPU agrees.

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
                    .run(|| total_norm(&emu.vars, &emu.store, norm))?;
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
        let reference = total_norm(&cpu.vars, &cpu.store, norm)?;
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

// ---------------------------------------------------------------------------------------------
// Clipping.

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
            let clip = ClipGradNorm::new(0.5).norm_type(norm);
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
        let clip = ClipGradNorm::new(1.0).norm_type(norm);
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
            let clip = ClipGradNorm::new(1.0).error_if_nonfinite(true);
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
            .run(|| total_norm(&built.vars, &store, norm))?;
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

// ---------------------------------------------------------------------------------------------
// A model: one table for the norm and the scale, per-tensor norms in one pass.

fn mlp_grads(dtype: DType) -> Result<(VarMap, GradStore)> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, dtype, &Device::Cpu);
    let l1 = linear(13, 64, vb.pp("l1"))?;
    let l2 = linear(64, 7, vb.pp("l2"))?;
    let l3 = linear(7, 1, vb.pp("l3"))?;
    let x = Tensor::randn(0f32, 1.0, (32, 13), &Device::Cpu)?.to_dtype(dtype)?;
    let y = l3.forward(&l2.forward(&l1.forward(&x)?.tanh()?)?.tanh()?)?;
    let grads = (y.sqr()?.mean_all()? * 1000.0)?.backward()?;
    Ok((varmap, grads))
}

/// The norm's table and the scale's table are the same for a VarMap model (every gradient its own
/// contiguous storage): one upload, two launches.
#[test]
fn one_table_for_a_varmap_model() -> Result<()> {
    let (varmap, grads) = mlp_grads(DType::F32)?;
    let vars = varmap.all_vars();
    let mut emulated = GradStore::default();
    let mut cpu = GradStore::default();
    for v in &vars {
        let g = grads.get(v).expect("every var has a gradient");
        emulated.insert(v, g.copy()?);
        cpu.insert(v, g.copy()?);
    }
    let (norm, log) = KernelEmulation::new().run(|| clip_grad_norm_(&vars, &mut emulated, 0.1))?;
    assert_eq!(log.table_uploads, [vars.len() * 4], "one table, sent once");
    assert_eq!(kernels(&log), ["grad_clip_reduce_sq", "grad_clip_apply"]);
    let cpu_norm = clip_grad_norm_(&vars, &mut cpu, 0.1)?;
    assert_norms_close(&norm, &cpu_norm, NormType::L2, "mlp")?;
    assert!(scalar(&norm)? > 0.1, "the test must clip");
    for v in &vars {
        let (e, c) = (
            bits(emulated.get(v).expect("g"))?,
            bits(cpu.get(v).expect("g"))?,
        );
        for (x, y) in e.iter().zip(&c) {
            let (x, y) = (
                f32::from_bits(*x as u32) as f64,
                f32::from_bits(*y as u32) as f64,
            );
            assert!((x - y).abs() <= ulp(DType::F32, y), "{x} vs {y}");
        }
    }
    Ok(())
}

#[test]
fn grad_norms_per_tensor_in_one_reduction() -> Result<()> {
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let (varmap, grads) = mlp_grads(dtype)?;
        for norm in [NormType::L2, NormType::L1, NormType::Inf, NormType::P(3.0)] {
            let cpu = grad_norms(&varmap, &grads, norm)?;
            let mut first = None;
            for grid in GRIDS {
                let (emulated, log) = emulation(grid, BlockOrder::Shuffled, 9)
                    .run(|| grad_norms(&varmap, &grads, norm))?;
                assert_eq!(log.table_uploads.len(), 1);
                assert_eq!(kernels(&log)[1..], ["grad_clip_segment_norms"]);
                assert_named_norms(
                    &emulated,
                    &cpu,
                    norm == NormType::Inf,
                    &format!("{dtype:?} {norm} grid {grid}"),
                );
                match &first {
                    None => first = Some(emulated),
                    Some(f) => assert_eq!(f, &emulated, "{dtype:?} {norm}: grid {grid}"),
                }
            }
        }
    }
    // F64 gradients may need the rescue pass: one norm per var (each its own reduction).
    let (varmap, grads) = mlp_grads(DType::F64)?;
    let cpu = grad_norms(&varmap, &grads, NormType::L2)?;
    let (emulated, log) =
        KernelEmulation::new().run(|| grad_norms(&varmap, &grads, NormType::L2))?;
    assert_eq!(log.table_uploads.len(), varmap.all_vars().len());
    assert_named_norms(&emulated, &cpu, false, "F64 L2");
    Ok(())
}

/// `grad_norms` of gradients of several chunks, transposed (read through a contiguous copy) and
/// aliasing one another: every per-tensor norm against the CPU's.
#[test]
fn grad_norms_of_large_strided_and_aliased_gradients() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(13);
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let shared = Tensor::from_vec(random_values(&mut rng, 70_001, &[]), 70_001, &Device::Cpu)?
        .to_dtype(DType::F32)?;
    let matrix = Tensor::from_vec(
        random_values(&mut rng, 90 * 70, &[]),
        (90, 70),
        &Device::Cpu,
    )?
    .to_dtype(DType::BF16)?;
    let mut grads = GradStore::default();
    let names = [
        "a_large",
        "b_alias_head",
        "c_alias_tail",
        "d_transposed",
        "e_small",
    ];
    let views = [
        Tensor::from_vec(random_values(&mut rng, 12_289, &[]), 12_289, &Device::Cpu)?
            .to_dtype(DType::F16)?,
        shared.narrow(0, 0, 50_000)?,
        shared.narrow(0, 30_001, 40_000)?,
        matrix.t()?,
        Tensor::from_vec(random_values(&mut rng, 5, &[]), 5, &Device::Cpu)?.to_dtype(DType::F32)?,
    ];
    for (name, view) in names.iter().zip(views) {
        let var =
            vb.get_with_hints_dtype(view.dims(), name, candle_nn::Init::Const(0.0), view.dtype())?;
        grads.insert(&var, view);
    }
    for norm in [NormType::L2, NormType::L1, NormType::Inf, NormType::P(3.0)] {
        let cpu = grad_norms(&varmap, &grads, norm)?;
        for grid in [1, 3, 64] {
            let (emulated, log) = emulation(grid, BlockOrder::Concurrent { threads: 2 }, 4)
                .run(|| grad_norms(&varmap, &grads, norm))?;
            assert_eq!(kernels(&log)[1..], ["grad_clip_segment_norms"]);
            assert_named_norms(
                &emulated,
                &cpu,
                norm == NormType::Inf,
                &format!("{norm} grid {grid}"),
            );
        }
    }
    Ok(())
}

/// An empty view and a var without gradient in `grad_norms`, and NaN gradients.
#[test]
fn grad_norms_of_empty_and_nonfinite_gradients() -> Result<()> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let a = vb.get(3, "a")?;
    let b = vb.get((2, 0), "b")?;
    let c = vb.get(4, "c")?;
    let _no_grad = vb.get(2, "d")?;
    let mut grads = GradStore::default();
    grads.insert(&a, Tensor::new(&[3f32, 4., 0.], &Device::Cpu)?);
    grads.insert(&b, Tensor::zeros((2, 0), DType::F32, &Device::Cpu)?);
    grads.insert(&c, Tensor::new(&[1f32, f32::NAN, 2., 2.], &Device::Cpu)?);
    let (norms, _) = KernelEmulation::new()
        .grid(2)
        .run(|| grad_norms(&varmap, &grads, NormType::L2))?;
    let names: Vec<&str> = norms.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["a", "b", "c"]);
    assert_eq!(norms[0].1, 5.0);
    assert_eq!(norms[1].1, 0.0);
    assert!(norms[2].1.is_nan());
    Ok(())
}

/// A `total_norm` that is a view into a gradient's own storage is read before any element is
/// scaled, as on the CPU, whatever the block order (the kernels read a copy).
#[test]
fn a_given_norm_inside_a_gradient_is_read_before_scaling() -> Result<()> {
    let build = || -> Result<(Tensor, Var, GradStore, Tensor)> {
        let mut values: Vec<f32> = (0..20_000).map(|i| (i % 7) as f32 - 3.0).collect();
        values[0] = 40.0; // the "norm": element 0 of the gradient itself
        let buf = Tensor::from_vec(values, 20_000, &Device::Cpu)?;
        let var = Var::zeros(20_000, DType::F32, &Device::Cpu)?;
        let mut store = GradStore::default();
        store.insert(&var, buf.clone());
        let norm = buf.narrow(0, 0, 1)?.squeeze(0)?;
        Ok((buf, var, store, norm))
    };
    let (cpu_buf, var, mut store, norm) = build()?;
    clip_grads_with_norm_(&[var], &mut store, 2.0, &norm)?;
    let want = bits(&cpu_buf)?;
    for order in ORDERS {
        let (buf, var, mut store, norm) = build()?;
        emulation(64, order, 5)
            .run(|| clip_grads_with_norm_(std::slice::from_ref(&var), &mut store, 2.0, &norm))?;
        let got = bits(&buf)?;
        let first_difference = got.iter().zip(&want).position(|(a, b)| a != b);
        assert_eq!(
            first_difference, None,
            "{order:?}: elements differ from the CPU's"
        );
    }
    Ok(())
}
