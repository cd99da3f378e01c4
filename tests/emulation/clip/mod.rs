//! The clipping kernels (the norm reductions, the scaling and the clamp) under the host emulation,
//! driven by the crate's own CUDA host code: every public operation against the CPU back end, and
//! the determinism claim of the CUDA path (the norm is bitwise the same for every grid size and
//! block order).
//!
//! The CPU back end is the reference here: it is itself checked against independent f64
//! references in `tests/clip` (`edge_cases`, `properties`, `pytorch_reference`). Where the README
//! promises equality (the infinity norm, value clipping, scaling by a given norm) the comparison is
//! bitwise; norms (whose partial sums cover other chunks on the GPU) agree to within one rounding
//! of the returned dtype, and elements scaled by them to within one unit in the last place.
//!
//! Here the scenarios (gradients as views of base buffers) and the comparisons that [`norms`],
//! [`clipping`] and [`model`] share.

mod clipping;
mod model;
mod norms;

use crate::common::{assert_named_norms, bits, kernels, scalar, ulp, DTYPES, ORDERS};
use candle_core::{backprop::GradStore, DType, Device, Result, Tensor, Var};
use candle_grad_clip::{
    clip_grad_norm_, clip_grad_value_, clip_grads_with_norm_, grad_norms, total_norm, BlockOrder,
    KernelEmulation, NormType,
};
use candle_nn::{linear, Module, VarBuilder, VarMap};
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
