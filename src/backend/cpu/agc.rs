//! The CPU twin of adaptive gradient clipping (`ops::agc`): each unit's sums of squares in the
//! lane order that a warp of `grad_clip_agc` uses, rayon over the units of large vars, then an
//! in-place pass over the clipped units only.

use candle_core::{bail, CpuStorage, InplaceOp1, Layout, Result, Tensor};
use rayon::prelude::*;

use super::Data;
use crate::ops::agc::{unit_coefficient, units_of, LANES};
use crate::ops::element::{scale, Element};
use crate::ops::exact_sum::ExactSum;
use crate::ops::layout_runs::for_each_run;

/// Elements of a var above which its units are summed (and scaled) in parallel.
const PARALLEL_MIN_ELEMENTS: usize = 1 << 18;
/// Elements per parallel work item: units are grouped until they reach this.
const ITEM_ELEMENTS: usize = 1 << 15;

/// Combines the lanes by the warp's shuffle-down tree: `lane[l] += lane[l + w]`, `w = 16 … 1`.
#[inline(always)]
fn warp_tree(mut acc: [f64; LANES]) -> f64 {
    let mut width = LANES / 2;
    while width > 0 {
        for lane in 0..width {
            acc[lane] += acc[lane + width];
        }
        width /= 2;
    }
    acc[0]
}

/// `(Σ p², Σ g²)` over one unit, element `i` in lane `i % 32` (see `ops::agc`).
#[inline(always)]
fn unit_sums_generic<T: Element>(p: &[T], g: &[T]) -> (f64, f64) {
    let mut ap = [0f64; LANES];
    let mut ag = [0f64; LANES];
    let mut pc = p.chunks_exact(LANES);
    let mut gc = g.chunks_exact(LANES);
    for (a, b) in (&mut pc).zip(&mut gc) {
        for lane in 0..LANES {
            let x = a[lane].to_f64();
            ap[lane] += x * x;
            let y = b[lane].to_f64();
            ag[lane] += y * y;
        }
    }
    for (lane, (x, y)) in pc.remainder().iter().zip(gc.remainder()).enumerate() {
        let (x, y) = (x.to_f64(), y.to_f64());
        ap[lane] += x * x;
        ag[lane] += y * y;
    }
    (warp_tree(ap), warp_tree(ag))
}

/// The sums of consecutive units of `unit_len` elements, into `out`. Compiled a second time for
/// AVX2 (the same operations in the same order: bitwise the same results).
fn units_sums<T: Element>(p: &[T], g: &[T], unit_len: usize, out: &mut [(f64, f64)]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: `units_sums_avx2` only assumes AVX2, which the CPU was just found to support.
        unsafe { units_sums_avx2(p, g, unit_len, out) };
        return;
    }
    units_sums_generic(p, g, unit_len, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn units_sums_avx2<T: Element>(p: &[T], g: &[T], unit_len: usize, out: &mut [(f64, f64)]) {
    units_sums_generic(p, g, unit_len, out)
}

#[inline(always)]
fn units_sums_generic<T: Element>(p: &[T], g: &[T], unit_len: usize, out: &mut [(f64, f64)]) {
    for ((p, g), o) in p.chunks(unit_len).zip(g.chunks(unit_len)).zip(out) {
        *o = unit_sums_generic(p, g);
    }
}

/// The contiguous data of a tensor (through a contiguous copy when it is a strided view), for
/// reading.
fn contiguous(t: &Tensor) -> Result<Tensor> {
    if t.layout().contiguous_offsets().is_some() {
        Ok(t.clone())
    } else {
        t.contiguous()
    }
}

/// The sums of squares `(Σ p², Σ g²)` of every unit of one var.
fn var_sums(param: &Tensor, grad: &Tensor) -> Result<Vec<(f64, f64)>> {
    let (units, unit_len) = units_of(param.dims());
    let mut sums = vec![(0.0, 0.0); units];
    if units == 0 {
        return Ok(sums);
    }
    let (param, grad) = (contiguous(param)?, contiguous(grad)?);
    let (p_storage, p_layout) = param.storage_and_layout();
    let (g_storage, g_layout) = grad.storage_and_layout();
    let (Some((ps, pe)), Some((gs, ge))) =
        (p_layout.contiguous_offsets(), g_layout.contiguous_offsets())
    else {
        bail!("internal error: a contiguous copy is not contiguous")
    };
    let p = Data::of(&p_storage)?.range(ps, pe);
    let g = Data::of(&g_storage)?.range(gs, ge);
    let parallel = unit_len * units >= PARALLEL_MIN_ELEMENTS && rayon::current_num_threads() > 1;
    let per_item = (ITEM_ELEMENTS / unit_len).max(1);
    macro_rules! run {
        ($p:expr, $g:expr) => {{
            let (p, g) = ($p, $g);
            if parallel {
                sums.par_chunks_mut(per_item)
                    .enumerate()
                    .for_each(|(k, out)| {
                        let first = k * per_item * unit_len;
                        let end = first + out.len() * unit_len;
                        units_sums(&p[first..end], &g[first..end], unit_len, out)
                    });
            } else {
                units_sums(p, g, unit_len, &mut sums);
            }
        }};
    }
    match (p, g) {
        (Data::F32(p), Data::F32(g)) => run!(p, g),
        (Data::F64(p), Data::F64(g)) => run!(p, g),
        (Data::F16(p), Data::F16(g)) => run!(p, g),
        (Data::BF16(p), Data::BF16(g)) => run!(p, g),
        _ => bail!("adaptive gradient clipping: a var and its gradient differ in dtype"),
    }
    Ok(sums)
}

/// Every unit's clip coefficient (`None`: untouched), var by var, and the global L2 norm of the
/// gradients (the exact sum of the units' gradient sums, then its square root). Reads each
/// parameter and gradient once; writes nothing.
pub(crate) fn coefficients(
    params: &[Tensor],
    grads: &[Tensor],
    clipping: f64,
    eps: f64,
) -> Result<(f64, Vec<Vec<Option<f64>>>)> {
    let mut total = ExactSum::new();
    let mut all = Vec::with_capacity(grads.len());
    for (param, grad) in params.iter().zip(grads) {
        let sums = var_sums(param, grad)?;
        let mut coefficients = Vec::with_capacity(sums.len());
        for &(p, g) in &sums {
            total.add(g);
            coefficients.push(unit_coefficient(p, g, clipping, eps));
        }
        all.push(coefficients);
    }
    Ok((total.value().sqrt(), all))
}

/// Scales the clipped units of every gradient in place (`coefficients` as returned by
/// [`coefficients`]); the others are not written.
pub(crate) fn scale_units(grads: &[Tensor], coefficients: &[Vec<Option<f64>>]) -> Result<()> {
    for (grad, coefficients) in grads.iter().zip(coefficients) {
        if coefficients.iter().any(Option::is_some) {
            grad.inplace_op1(&ScaleUnits {
                coefficients,
                rank: grad.rank(),
            })?;
        }
    }
    Ok(())
}

/// The in-place pass over one gradient's clipped units.
struct ScaleUnits<'a> {
    coefficients: &'a [Option<f64>],
    rank: usize,
}

impl InplaceOp1 for ScaleUnits<'_> {
    fn name(&self) -> &'static str {
        "candle-grad-clip-agc"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        match storage {
            CpuStorage::F32(v) => self.apply(v, layout),
            CpuStorage::F64(v) => self.apply(v, layout),
            CpuStorage::F16(v) => self.apply(v, layout),
            CpuStorage::BF16(v) => self.apply(v, layout),
            _ => bail!("adaptive gradient clipping can only write F32, F64, F16 and BF16 storage"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, _: &mut candle_core::CudaStorage, _: &Layout) -> Result<()> {
        bail!("internal error: the CPU AGC pass was called on CUDA storage")
    }
}

impl ScaleUnits<'_> {
    fn apply<T: Element>(&self, data: &mut [T], layout: &Layout) -> Result<()> {
        let (units, unit_len) = units_of(layout.dims());
        if units != self.coefficients.len() {
            bail!(
                "internal error: AGC coefficients for {} units, the gradient has {units}",
                self.coefficients.len()
            )
        }
        let scale_slice = |xs: &mut [T], c: f64| xs.iter_mut().for_each(|x| *x = scale(*x, c));
        if let Some((start, end)) = layout.contiguous_offsets() {
            let xs = &mut data[start..end];
            if xs.len() >= PARALLEL_MIN_ELEMENTS && rayon::current_num_threads() > 1 {
                xs.par_chunks_mut(unit_len)
                    .zip(self.coefficients)
                    .for_each(|(xs, c)| {
                        if let Some(c) = *c {
                            scale_slice(xs, c)
                        }
                    });
            } else {
                for (xs, c) in xs.chunks_mut(unit_len).zip(self.coefficients) {
                    if let Some(c) = *c {
                        scale_slice(xs, c)
                    }
                }
            }
            return Ok(());
        }
        // A strided view (without repeated elements, checked by the caller): unit by unit.
        for (u, c) in self.coefficients.iter().enumerate() {
            let Some(c) = *c else { continue };
            let unit = if self.rank >= 2 {
                layout.narrow(0, u, 1)?
            } else {
                layout.clone()
            };
            for_each_run(&unit, |s, len| scale_slice(&mut data[s..s + len], c));
        }
        Ok(())
    }
}
