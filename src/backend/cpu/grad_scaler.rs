//! [`GradScaler`](crate::GradScaler)'s passes on the CPU: `unscale_` in one read and one write, and the one-read path: the reduction reads the *scaled*
//! gradients and multiplies each element by `inv_scale` as it reads it ([`unscale`], rounded to
//! the gradient's dtype exactly as `GradScaler::unscale_` rounds it), so that one read-only pass
//! gives the norm and the finiteness of the unscaled gradients; the fused step then unscales each
//! element again as it reads it and writes the unscaled value back (`cpu::update`).
//!
//! [`norm_unscaled`] is bitwise [`norm`](super::norm) of the unscaled gradients: the same work
//! items, the same lanes, the same combining order and the same exact sum, on the unscaled values.

use candle_core::{bail, CpuStorage, InplaceOp1, Layout, Result, Tensor};
use rayon::prelude::*;

use super::reduce::{combine_lanes, max_nan, LockedGradients, WorkItem};
use super::{Data, CHUNK, LANES, PARALLEL_MIN_ELEMENTS};
use crate::ops::element::Element;
use crate::ops::exact_sum::ExactSum;
use crate::ops::grad_scaler::unscale;
use crate::ops::gradients::{GradientSet, StorageGroups};
use crate::ops::layout_runs::for_each_run;
use crate::ops::norm::{root, Power, TINY_SUM};
use crate::ops::norm_type::NormType;

/// Unscales a slice in place (F32: the `f32` product itself, which vectorises).
pub(crate) fn unscale_in_place<T: Element>(xs: &mut [T], inv: f32) {
    if let Some(xs) = T::as_f32_slice_mut(xs) {
        xs.iter_mut().for_each(|x| *x *= inv);
        return;
    }
    xs.iter_mut().for_each(|x| *x = unscale(*x, inv));
}

/// Unscales a slice in place and tells whether any unscaled value is NaN or infinite.
fn unscale_and_check<T: Element>(xs: &mut [T], inv: f32) -> bool {
    if let Some(xs) = T::as_f32_slice_mut(xs) {
        let mut bad = false;
        for x in xs.iter_mut() {
            *x *= inv;
            bad |= !x.is_finite();
        }
        return bad;
    }
    let mut bad = false;
    for x in xs.iter_mut() {
        *x = unscale(*x, inv);
        bad |= !x.to_f64().is_finite();
    }
    bad
}

/// `GradScaler::unscale_` on the CPU: every gradient unscaled in place in one read and one write
/// of each element, the finite check on the way; whether any unscaled value is NaN or infinite.
/// The gradients must be contiguous and share no storage (the caller checks).
pub(crate) fn unscale_all_in_place(grads: &[Tensor], inv: f32) -> Result<bool> {
    struct UnscaleAndCheck {
        inv: f32,
        parallel: bool,
        found: std::cell::Cell<bool>,
    }
    impl InplaceOp1 for UnscaleAndCheck {
        fn name(&self) -> &'static str {
            "candle-grad-clip-unscale"
        }

        fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
            let Some((start, end)) = layout.contiguous_offsets() else {
                bail!("internal error: unscaling a non-contiguous gradient in place")
            };
            fn run<T: Element>(xs: &mut [T], inv: f32, parallel: bool) -> bool {
                if parallel && xs.len() > CHUNK {
                    xs.par_chunks_mut(CHUNK)
                        .map(|c| unscale_and_check(c, inv))
                        .reduce(|| false, |a, b| a | b)
                } else {
                    unscale_and_check(xs, inv)
                }
            }
            let (inv, parallel) = (self.inv, self.parallel);
            let bad = match storage {
                CpuStorage::F32(v) => run(&mut v[start..end], inv, parallel),
                CpuStorage::F64(v) => run(&mut v[start..end], inv, parallel),
                CpuStorage::F16(v) => run(&mut v[start..end], inv, parallel),
                CpuStorage::BF16(v) => run(&mut v[start..end], inv, parallel),
                _ => bail!("GradScaler: a gradient of a non-float dtype"),
            };
            self.found.set(self.found.get() | bad);
            Ok(())
        }

        #[cfg(feature = "cuda")]
        fn cuda_fwd(&self, _: &mut candle_core::CudaStorage, _: &Layout) -> Result<()> {
            bail!("internal error: the CPU unscale was called on CUDA storage")
        }
    }
    let elements: usize = grads.iter().map(|g| g.elem_count()).sum();
    let op = UnscaleAndCheck {
        inv,
        parallel: elements >= PARALLEL_MIN_ELEMENTS && rayon::current_num_threads() > 1,
        found: std::cell::Cell::new(false),
    };
    for grad in grads.iter().filter(|g| g.elem_count() > 0) {
        grad.inplace_op1(&op)?;
    }
    Ok(op.found.get())
}

/// Sum of `power(unscale(x))` over a slice. With AVX2 and FMA, squares of F32 take a
/// hand-vectorised loop with the same lanes and combining order as the generic one (as
/// `cpu::sum_powers` does for the plain norm).
fn sum_powers_unscaled<T: Element>(xs: &[T], power: Power, inv: f32) -> f64 {
    #[cfg(target_arch = "x86_64")]
    if let (Power::Square, Some(xs)) = (power, T::as_f32_slice(xs)) {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports AVX2 and FMA (checked just above), all it assumes.
            return unsafe { avx2::sum_squares_unscaled_f32(xs, inv) };
        }
    }
    sum_powers_unscaled_any(xs, power, inv)
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::super::reduce::combine_lanes;
    use super::super::LANES;

    /// `Σ (x · inv)²` over F32 in f64, `x · inv` the `f32` product (`unscale` for F32): the
    /// generic loop's lanes as 4-wide registers and a fused multiply-add per four elements. The
    /// square of an f32 is exact in f64, so `fma(u, u, acc)` rounds exactly as `acc + u * u`:
    /// bitwise the generic loop's result.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn sum_squares_unscaled_f32(xs: &[f32], inv: f32) -> f64 {
        let inv4 = _mm_set1_ps(inv);
        let mut acc = [_mm256_setzero_pd(); LANES / 4];
        let mut chunks = xs.chunks_exact(LANES);
        for c in &mut chunks {
            for (k, a) in acc.iter_mut().enumerate() {
                // SAFETY: `c` holds LANES floats and `acc` LANES / 4 registers, so the four read
                // at 4k..4k+4 are in bounds; `loadu` accepts any alignment.
                let x = unsafe { _mm_loadu_ps(c.as_ptr().add(4 * k)) };
                let u = _mm256_cvtps_pd(_mm_mul_ps(x, inv4));
                *a = _mm256_fmadd_pd(u, u, *a);
            }
        }
        let mut lanes = [0f64; LANES];
        for (k, a) in acc.iter().enumerate() {
            // SAFETY: `lanes` has LANES doubles; the four written at 4k..4k+4 are in bounds.
            unsafe { _mm256_storeu_pd(lanes.as_mut_ptr().add(4 * k), *a) };
        }
        let tail = chunks.remainder().iter().fold(0.0, |t, &x| {
            let u = (x * inv) as f64;
            t + u * u
        });
        combine_lanes(lanes, tail)
    }
}

macro_rules! multiversion_unscaled {
    (fn $name:ident<$t:ident: Element>($($arg:ident: $ty:ty),*) -> $ret:ty => $generic:ident, $avx2:ident) => {
        fn $name<$t: Element>($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: `$avx2` only assumes AVX2, which the CPU was just found to support.
                return unsafe { $avx2($($arg),*) };
            }
            $generic($($arg),*)
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2")]
        fn $avx2<$t: Element>($($arg: $ty),*) -> $ret {
            $generic($($arg),*)
        }
    };
}

multiversion_unscaled! {
    fn sum_powers_unscaled_any<T: Element>(xs: &[T], power: Power, inv: f32) -> f64
        => sum_powers_unscaled_generic, sum_powers_unscaled_avx2
}

multiversion_unscaled! {
    fn max_abs_unscaled<T: Element>(xs: &[T], inv: f32) -> f64
        => max_abs_unscaled_generic, max_abs_unscaled_avx2
}

/// `cpu::sum_powers_generic` on the unscaled values.
#[inline(always)]
fn sum_powers_unscaled_generic<T: Element>(xs: &[T], power: Power, inv: f32) -> f64 {
    #[inline(always)]
    fn lanes<T: Element>(xs: &[T], inv: f32, f: impl Fn(f64) -> f64) -> f64 {
        let mut acc = [0.0f64; LANES];
        let mut chunks = xs.chunks_exact(LANES);
        for c in &mut chunks {
            for lane in 0..LANES {
                acc[lane] += f(unscale(c[lane], inv).to_f64());
            }
        }
        let mut tail = 0.0;
        for &x in chunks.remainder() {
            tail += f(unscale(x, inv).to_f64());
        }
        combine_lanes(acc, tail)
    }
    match power {
        Power::Abs => lanes(xs, inv, |x| x.abs()),
        Power::Square => lanes(xs, inv, |x| x * x),
        p @ Power::Pow { .. } => lanes(xs, inv, |x| p.apply(x)),
    }
}

/// `cpu::max_abs_generic` on the unscaled values.
#[inline(always)]
fn max_abs_unscaled_generic<T: Element>(xs: &[T], inv: f32) -> f64 {
    let mut acc = [0.0f64; LANES];
    let mut nan = false;
    let mut chunks = xs.chunks_exact(LANES);
    for c in &mut chunks {
        for lane in 0..LANES {
            let a = unscale(c[lane], inv).to_f64().abs();
            nan |= a.is_nan();
            acc[lane] = acc[lane].max(a);
        }
    }
    let mut m = acc.iter().fold(0.0f64, |m, &a| m.max(a));
    for &x in chunks.remainder() {
        let a = unscale(x, inv).to_f64().abs();
        nan |= a.is_nan();
        m = m.max(a);
    }
    if nan {
        f64::NAN
    } else {
        m
    }
}

impl WorkItem<'_> {
    fn sum_powers_unscaled(&self, power: Power, inv: f32) -> f64 {
        match *self {
            WorkItem::Contiguous(data) => {
                dispatch!(data, xs => sum_powers_unscaled(xs, power, inv))
            }
            WorkItem::Strided(data, layout) => {
                let mut total = 0.0;
                for_each_run(layout, |start, len| {
                    total += dispatch!(data.range(start, start + len), xs => sum_powers_unscaled(xs, power, inv));
                });
                total
            }
        }
    }

    fn max_abs_unscaled(&self, inv: f32) -> f64 {
        match *self {
            WorkItem::Contiguous(data) => dispatch!(data, xs => max_abs_unscaled(xs, inv)),
            WorkItem::Strided(data, layout) => {
                let mut m = 0.0;
                for_each_run(layout, |start, len| {
                    m = max_nan(
                        m,
                        dispatch!(data.range(start, start + len), xs => max_abs_unscaled(xs, inv)),
                    );
                });
                m
            }
        }
    }
}

impl LockedGradients<'_> {
    fn exact_sum_unscaled(&self, items: &[WorkItem<'_>], power: Power, inv: f32) -> ExactSum {
        self.exact_sum_by(items, |item| item.sum_powers_unscaled(power, inv))
    }

    fn max_abs_unscaled(&self, items: &[WorkItem<'_>], inv: f32) -> f64 {
        self.max_abs_by(items, |item| item.max_abs_unscaled(inv))
    }
}

/// The norm of the gradients multiplied by `inv` ([`unscale`]), read-only: bitwise
/// [`norm`](super::norm) of the unscaled gradients (the same rescue pass included).
pub(crate) fn norm_unscaled(
    set: &GradientSet,
    groups: &StorageGroups,
    norm_type: NormType,
    inv: f32,
) -> Result<f64> {
    let locked = LockedGradients::lock(set, groups);
    let items = locked.work_items()?;
    let p = match norm_type.canonical() {
        NormType::Inf => return Ok(locked.max_abs_unscaled(&items, inv)),
        NormType::L1 => 1.0,
        NormType::L2 => 2.0,
        NormType::P(p) => p,
    };
    let power = match p {
        1.0 => Power::Abs,
        2.0 => Power::Square,
        _ => Power::Pow { p, divisor: 1.0 },
    };
    let sum = locked.exact_sum_unscaled(&items, power, inv).value();
    let suspicious = sum.is_infinite() || sum < TINY_SUM;
    if sum.is_nan() || !(suspicious && set.powers_may_leave_f64_range(p)) {
        return Ok(root(sum, p));
    }
    let max = locked.max_abs_unscaled(&items, inv);
    if max == 0.0 || !max.is_finite() {
        return Ok(max);
    }
    let scaled = locked
        .exact_sum_unscaled(&items, Power::Pow { p, divisor: max }, inv)
        .value();
    Ok(root(scaled, p) * max)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::reduce::norm;
    use candle_core::{DType, Device, Tensor};
    use rand::{rngs::StdRng, Rng, SeedableRng};

    /// `g * inv` as `GradScaler::unscale_` computes it, with candle's ops.
    fn unscaled_by_candle(g: &Tensor, inv: f32) -> Result<Tensor> {
        let inv = Tensor::new(inv, &Device::Cpu)?;
        match g.dtype() {
            DType::F32 => g.broadcast_mul(&inv),
            DType::F64 => g.broadcast_mul(&inv.to_dtype(DType::F64)?),
            _ => g
                .to_dtype(DType::F32)?
                .broadcast_mul(&inv)?
                .to_dtype(g.dtype()),
        }
    }

    #[test]
    fn the_unscaled_norm_is_the_norm_of_the_unscaled_gradients_bitwise() -> Result<()> {
        let mut rng = StdRng::seed_from_u64(9);
        let shapes: [&[usize]; 5] = [&[70_001], &[33, 65], &[1], &[0], &[3, 1000]];
        for (case, dtype) in [DType::F32, DType::F64, DType::BF16]
            .into_iter()
            .enumerate()
        {
            for inv in [1.0 / 65536.0, 1.0 / 1000.0, 3.7, 1.0 / 3e38] {
                let mut grads = vec![];
                for (k, shape) in shapes.iter().enumerate() {
                    let n: usize = shape.iter().product();
                    let big = if k == 0 { 1e30 } else { 1e4 };
                    let v: Vec<f64> = (0..n).map(|_| rng.gen_range(-big..big)).collect();
                    let t = Tensor::from_vec(v, shape.to_vec(), &Device::Cpu)?.to_dtype(dtype)?;
                    // The last one as a non-contiguous view.
                    grads.push(if k == 4 { t.t()? } else { t });
                }
                let scaled = GradientSet::from_grads(grads.clone())?;
                let unscaled = GradientSet::from_grads(
                    grads
                        .iter()
                        .map(|g| unscaled_by_candle(g, inv))
                        .collect::<Result<_>>()?,
                )?;
                for norm_type in [
                    NormType::L1,
                    NormType::L2,
                    NormType::Inf,
                    NormType::P(3.0),
                    NormType::P(7.5),
                ] {
                    let got = norm_unscaled(&scaled, &scaled.group_by_storage(), norm_type, inv)?;
                    let want = norm(&unscaled, &unscaled.group_by_storage(), norm_type)?;
                    assert_eq!(
                        got.to_bits(),
                        want.to_bits(),
                        "case {case} {dtype:?} inv {inv} {norm_type:?}: {got} vs {want}"
                    );
                }
            }
        }
        Ok(())
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn hand_vectorised_unscaled_squares_match_the_generic_loop_bitwise() {
        if !(std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma"))
        {
            return;
        }
        let mut rng = StdRng::seed_from_u64(11);
        for len in [0, 1, 31, 32, 33, 1000, 4099] {
            let xs: Vec<f32> = (0..len)
                .map(|_| rng.gen_range(-1e4f32..1e4) * 2f32.powi(rng.gen_range(-60..60)))
                .collect();
            for inv in [1.0 / 65536.0, 1.0 / 1000.0, 3.7] {
                // SAFETY: AVX2 and FMA were found above.
                let fast = unsafe { avx2::sum_squares_unscaled_f32(&xs, inv) };
                let generic = sum_powers_unscaled_generic(&xs, Power::Square, inv);
                assert_eq!(fast.to_bits(), generic.to_bits(), "len {len} inv {inv}");
            }
        }
    }

    #[test]
    fn unscale_is_candles_product_bitwise() -> Result<()> {
        let mut rng = StdRng::seed_from_u64(10);
        for dtype in [DType::F32, DType::F64, DType::BF16] {
            let v: Vec<f64> = (0..4096)
                .map(|i| match i % 7 {
                    0 => f64::INFINITY,
                    1 => rng.gen_range(-3e38..3e38),
                    _ => rng.gen_range(-1e3..1e3) * 2f64.powi(rng.gen_range(-140..100)),
                })
                .collect();
            let t = Tensor::from_vec(v, 4096, &Device::Cpu)?.to_dtype(dtype)?;
            for inv in [1.0 / 3000.0, 7.0, 1.0 / 65536.0] {
                let want = unscaled_by_candle(&t, inv)?
                    .to_dtype(DType::F64)?
                    .to_vec1::<f64>()?;
                let got: Vec<f64> = match dtype {
                    DType::F32 => t
                        .to_vec1::<f32>()?
                        .into_iter()
                        .map(|x| unscale(x, inv) as f64)
                        .collect(),
                    DType::F64 => t
                        .to_vec1::<f64>()?
                        .into_iter()
                        .map(|x| unscale(x, inv))
                        .collect(),
                    _ => t
                        .to_vec1::<half::bf16>()?
                        .into_iter()
                        .map(|x| unscale(x, inv).to_f64())
                        .collect(),
                };
                for (g, w) in got.iter().zip(&want) {
                    assert!(
                        g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
                        "{dtype:?} {inv}: {g} vs {w}"
                    );
                }
            }
        }
        Ok(())
    }
}
