//! The CPU's reduction: every gradient view cut into work items ([`WorkItem`]: at most
//! [`CHUNK`] contiguous elements, or a whole strided view), each reduced to one `f64` partial in a
//! fixed lane order, the partials added into an exact sum (`ops::exact_sum`), in parallel for
//! large sets. [`norm`] is the norm of `ops::norm` over these work items. Every loop takes each
//! element through a [`ReadElement`]: as it is, or unscaled (GradScaler's one-read path).

use candle_core::{DType, Layout, Result, StorageRef, Tensor};
use rayon::prelude::*;

use super::{Data, CHUNK, LANES, PARALLEL_MIN_ELEMENTS};
use crate::ops::element::Element;
use crate::ops::exact_sum::ExactSum;
use crate::ops::gradients::{GradientSet, StorageGroups};
use crate::ops::layout_runs::for_each_run;
use crate::ops::norm::{norm_of_reduction, Combine, OneProcess, Power, Reduction};
use crate::ops::norm_type::NormType;

/// One unit of reduction work: a contiguous run of at most [`CHUNK`] elements, or a whole strided
/// view walked run by run.
pub(super) enum WorkItem<'a> {
    Contiguous(Data<'a>),
    Strided(Data<'a>, &'a Layout),
}

/// How a reduction reads each element: as it is ([`AsIs`]), or unscaled on the way
/// (GradScaler's one-read path, `cpu::grad_scaler::Unscaled`). The loops below are written once
/// for both; with the reading inlined, each compiles to the loop it would be on its own.
pub(super) trait ReadElement: Copy + Send + Sync {
    /// The element's value as the reduction takes it.
    fn read<T: Element>(self, x: T) -> f64;
    /// `Σ read(x)²` over F32 by a hand-vectorised loop, bitwise the generic loop's result, where
    /// the CPU has AVX2 and FMA; `None` elsewhere.
    fn sum_squares_f32_fast(self, xs: &[f32]) -> Option<f64>;
}

/// Elements read as they are.
#[derive(Clone, Copy)]
pub(super) struct AsIs;

impl ReadElement for AsIs {
    #[inline(always)]
    fn read<T: Element>(self, x: T) -> f64 {
        x.to_f64()
    }

    fn sum_squares_f32_fast(self, xs: &[f32]) -> Option<f64> {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports AVX2 and FMA (checked just above), all it assumes.
            return Some(unsafe { avx2::sum_squares_f32(xs) });
        }
        let _ = xs;
        None
    }
}

/// Sum of `power(read(x))` over a slice. With AVX2 and FMA, the hottest case (squares of F32)
/// takes a hand-vectorised loop with the same lanes and the same combining order as the generic
/// one.
fn sum_powers<T: Element, R: ReadElement>(xs: &[T], power: Power, read: R) -> f64 {
    if let (Power::Square, Some(xs)) = (power, T::as_f32_slice(xs)) {
        if let Some(sum) = read.sum_squares_f32_fast(xs) {
            return sum;
        }
    }
    sum_powers_any(xs, power, read)
}

multiversion! {
    fn sum_powers_any<T: Element, R: ReadElement>(xs: &[T], power: Power, read: R) -> f64
        => sum_powers_generic, sum_powers_avx2
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{combine_lanes, LANES};

    /// `Σ x²` over F32 in f64: the generic loop's lanes as 4-wide registers, so each instruction
    /// handles four elements (the compiler's own vectorisation of the generic loop stays 2-wide),
    /// and a fused multiply-add per four elements. The square of an f32 is exact in f64, so
    /// `fma(x, x, acc)` rounds exactly as `acc + x * x` does: same lanes, same order, bitwise the
    /// same result as the generic loop.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn sum_squares_f32(xs: &[f32]) -> f64 {
        let mut acc = [_mm256_setzero_pd(); LANES / 4];
        let mut chunks = xs.chunks_exact(LANES);
        for c in &mut chunks {
            for (k, a) in acc.iter_mut().enumerate() {
                // SAFETY: `c` holds LANES floats and `acc` LANES / 4 registers, so the four read
                // at 4k..4k+4 are in bounds; `loadu` accepts any alignment.
                let v = _mm256_cvtps_pd(unsafe { _mm_loadu_ps(c.as_ptr().add(4 * k)) });
                *a = _mm256_fmadd_pd(v, v, *a);
            }
        }
        let mut lanes = [0f64; LANES];
        for (k, a) in acc.iter().enumerate() {
            // SAFETY: `lanes` has LANES doubles; the four written at 4k..4k+4 are in bounds.
            unsafe { _mm256_storeu_pd(lanes.as_mut_ptr().add(4 * k), *a) };
        }
        let tail = chunks
            .remainder()
            .iter()
            .fold(0.0, |t, &x| t + (x as f64) * (x as f64));
        combine_lanes(lanes, tail)
    }
}

multiversion! {
    /// Largest `|read(x)|`, or NaN if any is NaN.
    fn max_abs<T: Element, R: ReadElement>(xs: &[T], read: R) -> f64 => max_abs_generic, max_abs_avx2
}

/// Adds the lanes pairwise in a fixed order, then the tail.
#[inline(always)]
pub(super) fn combine_lanes(mut acc: [f64; LANES], tail: f64) -> f64 {
    let mut width = LANES;
    while width > 1 {
        width /= 2;
        for lane in 0..width {
            acc[lane] += acc[lane + width];
        }
    }
    acc[0] + tail
}

/// Sum of `power(read(x))` over a slice, in [`LANES`] independent lanes (which the compiler turns
/// into SIMD) combined in a fixed order.
#[inline(always)]
pub(super) fn sum_powers_generic<T: Element, R: ReadElement>(
    xs: &[T],
    power: Power,
    read: R,
) -> f64 {
    // Monomorphise the hot cases so that the match is hoisted out of the loop.
    #[inline(always)]
    fn lanes<T: Element, R: ReadElement>(xs: &[T], read: R, f: impl Fn(f64) -> f64) -> f64 {
        let mut acc = [0.0f64; LANES];
        let mut chunks = xs.chunks_exact(LANES);
        for c in &mut chunks {
            for lane in 0..LANES {
                acc[lane] += f(read.read(c[lane]));
            }
        }
        let mut tail = 0.0;
        for &x in chunks.remainder() {
            tail += f(read.read(x));
        }
        combine_lanes(acc, tail)
    }
    match power {
        Power::Abs => lanes(xs, read, |x| x.abs()),
        Power::Square => lanes(xs, read, |x| x * x),
        p @ Power::Pow { .. } => lanes(xs, read, |x| p.apply(x)),
    }
}

#[inline(always)]
fn max_abs_generic<T: Element, R: ReadElement>(xs: &[T], read: R) -> f64 {
    let mut acc = [0.0f64; LANES];
    let mut nan = false;
    let mut chunks = xs.chunks_exact(LANES);
    for c in &mut chunks {
        for lane in 0..LANES {
            let a = read.read(c[lane]).abs();
            nan |= a.is_nan();
            acc[lane] = acc[lane].max(a);
        }
    }
    let mut m = acc.iter().fold(0.0f64, |m, &a| m.max(a));
    for &x in chunks.remainder() {
        let a = read.read(x).abs();
        nan |= a.is_nan();
        m = m.max(a);
    }
    if nan {
        f64::NAN
    } else {
        m
    }
}

/// NaN-propagating maximum of two non-negative values.
pub(super) fn max_nan(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else {
        a.max(b)
    }
}

impl WorkItem<'_> {
    fn sum_powers<R: ReadElement>(&self, power: Power, read: R) -> f64 {
        match *self {
            WorkItem::Contiguous(data) => dispatch!(data, xs => sum_powers(xs, power, read)),
            WorkItem::Strided(data, layout) => {
                let mut total = 0.0;
                for_each_run(layout, |start, len| {
                    total += dispatch!(data.range(start, start + len), xs => sum_powers(xs, power, read));
                });
                total
            }
        }
    }

    fn max_abs<R: ReadElement>(&self, read: R) -> f64 {
        match *self {
            WorkItem::Contiguous(data) => dispatch!(data, xs => max_abs(xs, read)),
            WorkItem::Strided(data, layout) => {
                let mut m = 0.0;
                for_each_run(layout, |start, len| {
                    m = max_nan(
                        m,
                        dispatch!(data.range(start, start + len), xs => max_abs(xs, read)),
                    );
                });
                m
            }
        }
    }
}

/// Read guards on the gradients' storages, held while the reduction runs: one per storage, so
/// that gradients sharing a buffer never take its (non-reentrant) read lock twice, which would
/// deadlock behind a writer waiting in between.
pub(super) struct LockedGradients<'a> {
    guards: Vec<StorageRef<'a>>,
    /// For each gradient: the index of its storage's guard, and its layout.
    views: Vec<(usize, &'a Layout)>,
    elements: usize,
}

impl<'a> LockedGradients<'a> {
    pub(super) fn lock(set: &'a GradientSet, groups: &StorageGroups) -> Self {
        let grads = set.grads();
        let mut guards = Vec::with_capacity(grads.len());
        let mut views: Vec<Option<(usize, &Layout)>> = vec![None; grads.len()];
        for group in groups.iter() {
            let (guard, _) = grads[group[0]].storage_and_layout();
            for &i in group {
                views[i] = Some((guards.len(), grads[i].layout()));
            }
            guards.push(guard);
        }
        // Every gradient is in exactly one group, so every entry is set.
        let views = views.into_iter().flatten().collect();
        let elements = grads.iter().map(|g| g.elem_count()).sum();
        Self {
            guards,
            views,
            elements,
        }
    }

    pub(super) fn work_items(&self) -> Result<Vec<WorkItem<'_>>> {
        let mut items = Vec::with_capacity(self.views.len());
        for &(guard, layout) in &self.views {
            let data = Data::of(&self.guards[guard])?;
            match layout.contiguous_offsets() {
                Some((start, end)) => {
                    let mut s = start;
                    while s < end {
                        let e = (s + CHUNK).min(end);
                        items.push(WorkItem::Contiguous(data.range(s, e)));
                        s = e;
                    }
                }
                None if layout.shape().elem_count() == 0 => {}
                None => items.push(WorkItem::Strided(data, layout)),
            }
        }
        Ok(items)
    }

    pub(super) fn parallel(&self) -> bool {
        self.elements >= PARALLEL_MIN_ELEMENTS && rayon::current_num_threads() > 1
    }

    /// The exact sum of every work item's sum of `power(read(x))` (in parallel for large sets).
    fn exact_sum<R: ReadElement>(&self, items: &[WorkItem<'_>], power: Power, read: R) -> ExactSum {
        let add = |mut acc: ExactSum, item: &WorkItem<'_>| {
            acc.add(item.sum_powers(power, read));
            acc
        };
        if self.parallel() {
            items
                .par_iter()
                .fold(ExactSum::new, add)
                .reduce(ExactSum::new, |mut a, b| {
                    a.merge(&b);
                    a
                })
        } else {
            items.iter().fold(ExactSum::new(), add)
        }
    }

    /// The largest `|read(x)|` over the work items, NaN winning (in parallel for large sets).
    fn max_abs<R: ReadElement>(&self, items: &[WorkItem<'_>], read: R) -> f64 {
        let largest = |item: &WorkItem<'_>| item.max_abs(read);
        if self.parallel() {
            items.par_iter().map(largest).reduce(|| 0.0, max_nan)
        } else {
            items.iter().map(largest).fold(0.0, max_nan)
        }
    }
}

/// The norm of all gradients in the set, computed in `f64`.
///
/// Sums of powers are exact sums of per-item partials. Where powers may leave the `f64` range
/// (F64 gradients, or `p > 6`) and the sum overflowed or nearly underflowed, the norm is computed
/// again as `max|g| · (Σ (|g| / max|g|)^p)^(1/p)`: the largest term is exactly 1, so the sum lies
/// in `[1, n]` for any `p`, and a finite norm is never reported as `inf` or `0`.
/// `groups` are the set's storage groups ([`GradientSet::group_by_storage`], or the validated
/// [`GradientSet::storage_groups`] of a call that goes on to write).
pub(crate) fn norm(set: &GradientSet, groups: &StorageGroups, norm_type: NormType) -> Result<f64> {
    norm_combined(set, groups, norm_type, &mut OneProcess(set))
}

/// [`norm`] with the partial results combined by `combine`: every call of `combine` is made by
/// every participant in the same order, since the decisions between them depend only on
/// combined results.
pub(crate) fn norm_combined(
    set: &GradientSet,
    groups: &StorageGroups,
    norm_type: NormType,
    combine: &mut dyn Combine,
) -> Result<f64> {
    norm_read(set, groups, norm_type, AsIs, combine)
}

/// [`norm_combined`] with every element taken through `read`.
pub(super) fn norm_read<R: ReadElement>(
    set: &GradientSet,
    groups: &StorageGroups,
    norm_type: NormType,
    read: R,
    combine: &mut dyn Combine,
) -> Result<f64> {
    let locked = LockedGradients::lock(set, groups);
    let items = locked.work_items()?;
    let reduction = CpuReduction {
        locked: &locked,
        items: &items,
        read,
    };
    norm_of_reduction(&reduction, norm_type, combine)
}

/// [`Reduction`] over the work items of locked gradients, each element taken through `read`.
struct CpuReduction<'r, 'a, R> {
    locked: &'r LockedGradients<'a>,
    items: &'r [WorkItem<'r>],
    read: R,
}

impl<R: ReadElement> Reduction for CpuReduction<'_, '_, R> {
    fn max_abs(&self) -> Result<f64> {
        Ok(self.locked.max_abs(self.items, self.read))
    }
    fn sum_powers(&self, power: Power) -> Result<ExactSum> {
        Ok(self.locked.exact_sum(self.items, power, self.read))
    }
}

/// [`Reduction::max_abs`] over the CPU work items of `set` (read-locked for the call).
pub(crate) fn max_abs_of(set: &GradientSet) -> Result<f64> {
    let locked = LockedGradients::lock(set, &set.group_by_storage());
    let items = locked.work_items()?;
    Ok(locked.max_abs(&items, AsIs))
}

/// [`Reduction::sum_powers`] over the CPU work items of `set` (read-locked for the call).
pub(crate) fn exact_sum_of(set: &GradientSet, power: Power) -> Result<ExactSum> {
    let locked = LockedGradients::lock(set, &set.group_by_storage());
    let items = locked.work_items()?;
    Ok(locked.exact_sum(&items, power, AsIs))
}

/// The 0-d norm tensor on the CPU in the dtype the API promises.
pub(crate) fn norm_tensor(norm: f64, dtype: DType) -> Result<Tensor> {
    match dtype {
        DType::F64 => Tensor::new(norm, &candle_core::Device::Cpu),
        _ => Tensor::new(norm as f32, &candle_core::Device::Cpu),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    /// A power whose every term leaves the f64 range (p >= 1024, or huge / tiny F64 values) is
    /// still the finite norm: the rescue divides by the largest |g|.
    #[test]
    fn rescue_gives_finite_norms_for_any_order() {
        use candle_core::{backprop::GradStore, Device, Tensor, Var};
        let norm_of = |values: &[f64], f32_grads: bool, p: f64| -> f64 {
            let var = Var::zeros(values.len(), DType::F64, &Device::Cpu).expect("var");
            let mut store = GradStore::default();
            let grad = Tensor::new(values, &Device::Cpu).expect("tensor");
            let grad = if f32_grads {
                grad.to_dtype(DType::F32).expect("f32")
            } else {
                grad
            };
            store.insert(&var, grad);
            let set = GradientSet::collect(&[var], &store).expect("set");
            norm(&set, &set.group_by_storage(), NormType::P(p)).expect("norm")
        };
        let close = |got: f64, want: f64| (got - want).abs() <= want * 1e-12;
        // (1.5^2000 + 1^2000)^(1/2000) = 1.5 * (1 + (2/3)^2000)^(1/2000) = 1.5 to f64 precision.
        assert!(close(norm_of(&[1.5, 1.0], true, 2000.0), 1.5));
        assert!(close(norm_of(&[1e308], false, 400.0), 1e308));
        assert!(close(
            norm_of(&[1e-310, 1e-310], false, 120.0),
            1e-310 * 2f64.powf(1.0 / 120.0)
        ));
        assert!(close(norm_of(&[3e200, 4e200], false, 2.0), 5e200));
        assert!(close(norm_of(&[3e-200, 4e-200], false, 2.0), 5e-200));
        assert_eq!(norm_of(&[0.0, 0.0], false, 2.0), 0.0);
        assert!(norm_of(&[f64::INFINITY, 1.0], false, 2.0).is_infinite());
        assert!(norm_of(&[f64::NAN, 1e300], false, 2.0).is_nan());
    }

    #[test]
    fn hand_vectorised_squares_match_the_generic_loop_bitwise() {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            let mut rng = StdRng::seed_from_u64(3);
            for len in [0, 1, 31, 32, 33, 1000, 4099] {
                let xs: Vec<f32> = (0..len)
                    .map(|_| rng.gen_range(-1e3f32..1e3) * rng.gen_range(0.0f32..1e-3))
                    .collect();
                let generic = sum_powers_generic(&xs, Power::Square, AsIs);
                // SAFETY: AVX2 and FMA were detected just above.
                let vectorised = unsafe { avx2::sum_squares_f32(&xs) };
                assert_eq!(generic.to_bits(), vectorised.to_bits(), "len {len}");
            }
            return;
        }
        eprintln!(
            "hand_vectorised_squares_match_the_generic_loop_bitwise: SKIPPED, this CPU lacks \
             AVX2+FMA (or is not x86_64): the hand-vectorised loop was not compared"
        );
    }
}
