//! The CPU back end: the reduction and the in-place element-wise passes over `CpuStorage`.
//!
//! Every gradient view is cut into work items of at most [`CHUNK`] elements (a strided view is one
//! item). Each item is reduced to one `f64` partial in a fixed order, and the partials are added
//! into an [`ExactSum`], so the norm is bitwise the same whatever the order of the vars and
//! whatever the number of threads. Writes go through candle's `inplace_op1`, one call per storage,
//! so that every element is written exactly once even when gradients alias.

use candle_core::{
    bail, CpuStorage, DType, InplaceOp1, Layout, Result, Storage, StorageRef, Tensor,
};
use half::{bf16, f16};
use rayon::prelude::*;

use crate::backend::ElementwiseOp;
use crate::ops::exact_sum::ExactSum;
use crate::ops::gradients::{repeats_elements, GradientSet, StorageGroups};
use crate::ops::layout_runs::{for_each_run, union_of_runs};
use crate::ops::norm_type::NormType;

pub(crate) mod agc;
pub(crate) mod update;

/// Elements per work item: large enough that per-item overhead vanishes, small enough to spread
/// a few big tensors over all threads. It also fixes the summation order, so it must not depend
/// on the thread count.
const CHUNK: usize = 1 << 15;

/// Below this many elements a call runs on the calling thread: waking the pool costs more than
/// it saves.
const PARALLEL_MIN_ELEMENTS: usize = 1 << 20;

/// Independent accumulators in the reduction loops: eight 4-wide registers, enough to keep two
/// add (or FMA) pipelines busy despite their latency.
const LANES: usize = 32;

/// The gradient element types, converted through `f64` (exact for all four).
pub(crate) trait Element: Copy + Send + Sync + 'static {
    fn to_f64(self) -> f64;
    /// Rounds to the nearest value of `Self`.
    fn from_f64(x: f64) -> Self;
    /// The next value towards zero, for a positive non-zero value (one step down in its bits).
    fn next_toward_zero(self) -> Self;
    /// The slice itself when `Self` is `f32` (for the hand-vectorised F32 loops).
    fn as_f32_slice(_xs: &[Self]) -> Option<&[f32]> {
        None
    }
    /// The slice itself, writable, when `Self` is `f32`.
    fn as_f32_slice_mut(_xs: &mut [Self]) -> Option<&mut [f32]> {
        None
    }
}

impl Element for f32 {
    fn as_f32_slice(xs: &[Self]) -> Option<&[f32]> {
        Some(xs)
    }
    fn as_f32_slice_mut(xs: &mut [Self]) -> Option<&mut [f32]> {
        Some(xs)
    }
    fn next_toward_zero(self) -> Self {
        f32::from_bits(self.to_bits() - 1)
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self as f64
    }
    #[inline(always)]
    fn from_f64(x: f64) -> Self {
        x as f32
    }
}

impl Element for f64 {
    fn next_toward_zero(self) -> Self {
        f64::from_bits(self.to_bits() - 1)
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self
    }
    #[inline(always)]
    fn from_f64(x: f64) -> Self {
        x
    }
}

impl Element for bf16 {
    fn next_toward_zero(self) -> Self {
        bf16::from_bits(self.to_bits() - 1)
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        // bf16 is the top half of an f32: a shift, which vectorises (half's own conversion
        // checks CPU features per call).
        f32::from_bits((self.to_bits() as u32) << 16) as f64
    }
    #[inline(always)]
    fn from_f64(x: f64) -> Self {
        // Round to odd in f32, then to nearest even in bf16: one correct rounding (f32 keeps 16
        // more bits than bf16). Branch-free, so the scale loop vectorises; half's own `from_f64`
        // drops the low 32 bits before rounding and so misrounds some near-ties.
        let odd = round_to_odd_f32(x).to_bits();
        if x.is_nan() {
            return bf16::NAN;
        }
        bf16::from_bits(((odd + 0x7fff + ((odd >> 16) & 1)) >> 16) as u16)
    }
}

/// `x` rounded to `f32` towards zero, with the lowest bit set when that was inexact ("round to
/// odd"). Rounding this once more to a format at least two bits narrower gives the correctly
/// rounded result of `x` itself, with no double-rounding error.
#[inline(always)]
fn round_to_odd_f32(x: f64) -> f32 {
    let nearest = x as f32;
    let mut bits = nearest.to_bits();
    // Rounded away from zero (also to infinity): step back towards zero.
    if (nearest as f64).abs() > x.abs() {
        bits -= 1;
    }
    if nearest as f64 != x {
        bits |= 1;
    }
    f32::from_bits(bits)
}

impl Element for f16 {
    fn next_toward_zero(self) -> Self {
        f16::from_bits(self.to_bits() - 1)
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        // Branch-free, so the reduction loops vectorise (half's conversion checks CPU features
        // per call). The exponent and mantissa shifted into f32 position, times 2^112, is the
        // exact value for normal and subnormal halves; infinities and NaNs are selected apart.
        let h = self.to_bits() as u32;
        let magnitude = (h & 0x7fff) << 13;
        let finite = f32::from_bits(magnitude) * f32::from_bits((127 + 112) << 23);
        let special = f32::from_bits(0x7f80_0000 | magnitude);
        let value = if h & 0x7c00 == 0x7c00 {
            special
        } else {
            finite
        };
        f32::from_bits(value.to_bits() | ((h & 0x8000) << 16)) as f64
    }
    #[inline(always)]
    fn from_f64(x: f64) -> Self {
        // One correct rounding, as for bf16 (half's `from_f64` also drops low bits first).
        if x.is_nan() {
            return f16::NAN;
        }
        f16::from_f32(round_to_odd_f32(x))
    }
}

/// A read-only view of one storage's data, by dtype.
#[derive(Clone, Copy)]
pub(super) enum Data<'a> {
    F32(&'a [f32]),
    F64(&'a [f64]),
    F16(&'a [f16]),
    BF16(&'a [bf16]),
}

impl<'a> Data<'a> {
    pub(super) fn of(storage: &'a Storage) -> Result<Self> {
        Ok(match storage {
            Storage::Cpu(CpuStorage::F32(v)) => Data::F32(v),
            Storage::Cpu(CpuStorage::F64(v)) => Data::F64(v),
            Storage::Cpu(CpuStorage::F16(v)) => Data::F16(v),
            Storage::Cpu(CpuStorage::BF16(v)) => Data::BF16(v),
            other => bail!(
                "gradient clipping on the CPU needs F32, F64, F16 or BF16 CPU storage, got {:?} on {:?}",
                other.dtype(),
                other.device().location()
            ),
        })
    }

    pub(super) fn range(self, start: usize, end: usize) -> Self {
        match self {
            Data::F32(v) => Data::F32(&v[start..end]),
            Data::F64(v) => Data::F64(&v[start..end]),
            Data::F16(v) => Data::F16(&v[start..end]),
            Data::BF16(v) => Data::BF16(&v[start..end]),
        }
    }
}

/// Runs `$body` with `$xs` bound to the typed slice of a [`Data`].
macro_rules! dispatch {
    ($data:expr, $xs:ident => $body:expr) => {
        match $data {
            Data::F32($xs) => $body,
            Data::F64($xs) => $body,
            Data::F16($xs) => $body,
            Data::BF16($xs) => $body,
        }
    };
}

/// One unit of reduction work: a contiguous run of at most [`CHUNK`] elements, or a whole strided
/// view walked run by run.
enum WorkItem<'a> {
    Contiguous(Data<'a>),
    Strided(Data<'a>, &'a Layout),
}

/// How each element enters the norm.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Power {
    Abs,
    Square,
    /// `(|x| / divisor)^p`: the rescue pass divides by the largest `|x|`, which keeps every
    /// power in `[0, 1]` whatever `p`; the normal pass divides by 1 (exact).
    Pow {
        p: f64,
        divisor: f64,
    },
}

impl Power {
    #[inline(always)]
    fn apply(self, x: f64) -> f64 {
        match self {
            Power::Abs => x.abs(),
            Power::Square => x * x,
            Power::Pow { p, divisor } => (x.abs() / divisor).powf(p),
        }
    }
}

/// Compiles `$generic` a second time for AVX2 and picks that version at run time when the CPU has
/// it. Both versions perform the same operations in the same order (Rust never contracts a
/// multiply and an add into an FMA), so the results are bitwise the same; AVX2 only makes each
/// instruction handle twice the lanes, which matters when the data sits in cache.
macro_rules! multiversion {
    ($(#[$meta:meta])* fn $name:ident<$t:ident: Element>($($arg:ident: $ty:ty),*) $(-> $ret:ty)?
        => $generic:ident, $avx2:ident) => {
        $(#[$meta])*
        fn $name<$t: Element>($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: `$avx2` only assumes AVX2, which the CPU was just found to support.
                return unsafe { $avx2($($arg),*) };
            }
            $generic($($arg),*)
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2")]
        fn $avx2<$t: Element>($($arg: $ty),*) $(-> $ret)? {
            $generic($($arg),*)
        }
    };
}

/// Sum of `power(x)` over a slice. With AVX2 and FMA, the hottest case (squares of F32) takes a
/// hand-vectorised loop with the same lanes and the same combining order as the generic one.
fn sum_powers<T: Element>(xs: &[T], power: Power) -> f64 {
    #[cfg(target_arch = "x86_64")]
    if let (Power::Square, Some(xs)) = (power, T::as_f32_slice(xs)) {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports AVX2 and FMA (checked just above), all it assumes.
            return unsafe { avx2::sum_squares_f32(xs) };
        }
    }
    sum_powers_any(xs, power)
}

multiversion! {
    fn sum_powers_any<T: Element>(xs: &[T], power: Power) -> f64 => sum_powers_generic, sum_powers_avx2
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
    /// Largest `|x|`, or NaN if any element is NaN.
    fn max_abs<T: Element>(xs: &[T]) -> f64 => max_abs_generic, max_abs_avx2
}

multiversion! {
    /// Applies an element kernel to a slice in place.
    fn run_kernel<T: Element>(kernel: ElementKernel<T>, xs: &mut [T]) => run_kernel_generic, run_kernel_avx2
}

/// Adds the lanes pairwise in a fixed order, then the tail.
#[inline(always)]
fn combine_lanes(mut acc: [f64; LANES], tail: f64) -> f64 {
    let mut width = LANES;
    while width > 1 {
        width /= 2;
        for lane in 0..width {
            acc[lane] += acc[lane + width];
        }
    }
    acc[0] + tail
}

/// Sum of `power(x)` over a slice, in [`LANES`] independent lanes (which the compiler turns into
/// SIMD) combined in a fixed order.
#[inline(always)]
fn sum_powers_generic<T: Element>(xs: &[T], power: Power) -> f64 {
    // Monomorphise the hot cases so that the match is hoisted out of the loop.
    #[inline(always)]
    fn lanes<T: Element>(xs: &[T], f: impl Fn(f64) -> f64) -> f64 {
        let mut acc = [0.0f64; LANES];
        let mut chunks = xs.chunks_exact(LANES);
        for c in &mut chunks {
            for lane in 0..LANES {
                acc[lane] += f(c[lane].to_f64());
            }
        }
        let mut tail = 0.0;
        for &x in chunks.remainder() {
            tail += f(x.to_f64());
        }
        combine_lanes(acc, tail)
    }
    match power {
        Power::Abs => lanes(xs, |x| x.abs()),
        Power::Square => lanes(xs, |x| x * x),
        p @ Power::Pow { .. } => lanes(xs, |x| p.apply(x)),
    }
}

#[inline(always)]
fn max_abs_generic<T: Element>(xs: &[T]) -> f64 {
    let mut acc = [0.0f64; LANES];
    let mut nan = false;
    let mut chunks = xs.chunks_exact(LANES);
    for c in &mut chunks {
        for lane in 0..LANES {
            let a = c[lane].to_f64().abs();
            nan |= a.is_nan();
            acc[lane] = acc[lane].max(a);
        }
    }
    let mut m = acc.iter().fold(0.0f64, |m, &a| m.max(a));
    for &x in chunks.remainder() {
        let a = x.to_f64().abs();
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
fn max_nan(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else {
        a.max(b)
    }
}

impl WorkItem<'_> {
    fn sum_powers(&self, power: Power) -> f64 {
        match *self {
            WorkItem::Contiguous(data) => dispatch!(data, xs => sum_powers(xs, power)),
            WorkItem::Strided(data, layout) => {
                let mut total = 0.0;
                for_each_run(layout, |start, len| {
                    total += dispatch!(data.range(start, start + len), xs => sum_powers(xs, power));
                });
                total
            }
        }
    }

    fn max_abs(&self) -> f64 {
        match *self {
            WorkItem::Contiguous(data) => dispatch!(data, xs => max_abs(xs)),
            WorkItem::Strided(data, layout) => {
                let mut m = 0.0;
                for_each_run(layout, |start, len| {
                    m = max_nan(
                        m,
                        dispatch!(data.range(start, start + len), xs => max_abs(xs)),
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
struct LockedGradients<'a> {
    guards: Vec<StorageRef<'a>>,
    /// For each gradient: the index of its storage's guard, and its layout.
    views: Vec<(usize, &'a Layout)>,
    elements: usize,
}

impl<'a> LockedGradients<'a> {
    fn lock(set: &'a GradientSet, groups: &StorageGroups) -> Self {
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

    fn work_items(&self) -> Result<Vec<WorkItem<'_>>> {
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

    fn parallel(&self) -> bool {
        self.elements >= PARALLEL_MIN_ELEMENTS && rayon::current_num_threads() > 1
    }

    fn exact_sum(&self, items: &[WorkItem<'_>], power: Power) -> ExactSum {
        self.exact_sum_by(items, |item| item.sum_powers(power))
    }

    /// The exact sum of `partial` over the work items (in parallel for large sets).
    fn exact_sum_by(
        &self,
        items: &[WorkItem<'_>],
        partial: impl Fn(&WorkItem<'_>) -> f64 + Sync,
    ) -> ExactSum {
        let add = |mut acc: ExactSum, item: &WorkItem<'_>| {
            acc.add(partial(item));
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

    fn max_abs(&self, items: &[WorkItem<'_>]) -> f64 {
        self.max_abs_by(items, |item| item.max_abs())
    }

    /// The largest of `largest` over the work items, NaN winning (in parallel for large sets).
    fn max_abs_by(
        &self,
        items: &[WorkItem<'_>],
        largest: impl Fn(&WorkItem<'_>) -> f64 + Sync + Send,
    ) -> f64 {
        if self.parallel() {
            items.par_iter().map(&largest).reduce(|| 0.0, max_nan)
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

/// How the reduction's partial results are combined before the norm is formed: as they are in
/// one process ([`OneProcess`]), through collectives across a process group (`dist`). The norm
/// is computed by the same code either way, so a group of processes takes exactly the decisions
/// (rescue or not) that one process holding all the gradients takes.
pub(crate) trait Combine {
    /// The largest `|g|` over everything combined (NaN if any was NaN), from this part's.
    fn max_abs(&mut self, local: f64) -> Result<f64>;
    /// The exact sum over everything combined, from this part's.
    fn sum(&mut self, local: ExactSum) -> Result<ExactSum>;
    /// [`GradientSet::powers_may_leave_f64_range`] of everything combined.
    fn powers_may_leave_f64_range(&self, p: f64) -> bool;
}

/// Combining within one process: the local results are the results.
pub(crate) struct OneProcess<'a>(pub(crate) &'a GradientSet);

impl Combine for OneProcess<'_> {
    fn max_abs(&mut self, local: f64) -> Result<f64> {
        Ok(local)
    }
    fn sum(&mut self, local: ExactSum) -> Result<ExactSum> {
        Ok(local)
    }
    fn powers_may_leave_f64_range(&self, p: f64) -> bool {
        self.0.powers_may_leave_f64_range(p)
    }
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
    let locked = LockedGradients::lock(set, groups);
    let items = locked.work_items()?;
    let reduction = CpuReduction {
        locked: &locked,
        items: &items,
    };
    norm_of_reduction(&reduction, norm_type, combine)
}

/// The two reductions a norm is made of, over some gradients: the CPU's work items, or, across
/// processes, a kernel device's chunks (`dist`).
pub(crate) trait Reduction {
    /// The largest `|g|` (NaN if any is NaN; 0 when there is none).
    fn max_abs(&self) -> Result<f64>;
    /// The exact sum of the per-item partial sums of `power`.
    fn sum_powers(&self, power: Power) -> Result<ExactSum>;
}

/// [`Reduction`] over the work items of locked gradients.
struct CpuReduction<'r, 'a> {
    locked: &'r LockedGradients<'a>,
    items: &'r [WorkItem<'r>],
}

impl Reduction for CpuReduction<'_, '_> {
    fn max_abs(&self) -> Result<f64> {
        Ok(self.locked.max_abs(self.items))
    }
    fn sum_powers(&self, power: Power) -> Result<ExactSum> {
        Ok(self.locked.exact_sum(self.items, power))
    }
}

/// [`Reduction::max_abs`] over the CPU work items of `set` (read-locked for the call).
pub(crate) fn max_abs_of(set: &GradientSet) -> Result<f64> {
    let locked = LockedGradients::lock(set, &set.group_by_storage());
    let items = locked.work_items()?;
    Ok(locked.max_abs(&items))
}

/// [`Reduction::sum_powers`] over the CPU work items of `set` (read-locked for the call).
pub(crate) fn exact_sum_of(set: &GradientSet, power: Power) -> Result<ExactSum> {
    let locked = LockedGradients::lock(set, &set.group_by_storage());
    let items = locked.work_items()?;
    Ok(locked.exact_sum(&items, power))
}

/// The norm from a [`Reduction`], its partial results combined by `combine` (see [`norm`] for
/// the rescue pass).
pub(crate) fn norm_of_reduction(
    reduction: &dyn Reduction,
    norm_type: NormType,
    combine: &mut dyn Combine,
) -> Result<f64> {
    let p = match norm_type.canonical() {
        NormType::Inf => return combine.max_abs(reduction.max_abs()?),
        NormType::L1 => 1.0,
        NormType::L2 => 2.0,
        NormType::P(p) => p,
    };
    let power = match p {
        1.0 => Power::Abs,
        2.0 => Power::Square,
        _ => Power::Pow { p, divisor: 1.0 },
    };
    let sum = combine.sum(reduction.sum_powers(power)?)?.value();
    let suspicious = sum.is_infinite() || sum < TINY_SUM;
    if sum.is_nan() || !(suspicious && combine.powers_may_leave_f64_range(p)) {
        return Ok(root(sum, p));
    }
    let max = combine.max_abs(reduction.max_abs()?)?;
    if max == 0.0 || !max.is_finite() {
        return Ok(max);
    }
    let scaled = combine
        .sum(reduction.sum_powers(Power::Pow { p, divisor: max })?)?
        .value();
    Ok(root(scaled, p) * max)
}

/// Below this, powers of F64 gradients may have lost bits to underflow.
const TINY_SUM: f64 = 1e-270;

fn root(sum: f64, p: f64) -> f64 {
    match p {
        1.0 => sum,
        2.0 => sum.sqrt(),
        _ => sum.powf(1.0 / p),
    }
}

/// Applies `op` in place to every element of every gradient, each element exactly once; `groups`
/// are the set's [`storage_groups`](GradientSet::storage_groups).
pub(crate) fn apply_in_place(
    set: &GradientSet,
    groups: &StorageGroups,
    op: ElementwiseOp,
) -> Result<()> {
    let grads = set.grads();
    let elements: usize = grads.iter().map(|g| g.elem_count()).sum();
    let parallel = elements >= PARALLEL_MIN_ELEMENTS && rayon::current_num_threads() > 1;
    let run_group = |group: &[usize]| -> Result<()> {
        // `storage_groups` guarantees a member that candle accepts as an in-place destination
        // when the group has elements at all.
        let writable = |i: usize| grads[i].elem_count() > 0 && !repeats_elements(&grads[i]);
        let Some(&dst) = group.iter().find(|&&i| writable(i)) else {
            return Ok(());
        };
        grads[dst].inplace_op1(&InPlace {
            op,
            grads,
            group,
            parallel,
        })
    };
    if parallel {
        let groups: Vec<&[usize]> = groups.iter().collect();
        groups.into_par_iter().try_for_each(run_group)
    } else {
        groups.iter().try_for_each(run_group)
    }
}

/// The `InplaceOp1` that writes one storage: `op` on the union of the elements of the views
/// `grads[i]` for `i` in `group`, which all live in that storage.
struct InPlace<'a> {
    op: ElementwiseOp,
    grads: &'a [Tensor],
    group: &'a [usize],
    parallel: bool,
}

impl InplaceOp1 for InPlace<'_> {
    fn name(&self) -> &'static str {
        "candle-grad-clip-elementwise"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, _layout: &Layout) -> Result<()> {
        match storage {
            CpuStorage::F32(v) => self.apply(v),
            CpuStorage::F64(v) => self.apply(v),
            CpuStorage::F16(v) => self.apply(v),
            CpuStorage::BF16(v) => self.apply(v),
            _ => bail!("gradient clipping can only write F32, F64, F16 and BF16 storage"),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, _: &mut candle_core::CudaStorage, _: &Layout) -> Result<()> {
        bail!("internal error: the CPU in-place pass was called on CUDA storage")
    }
}

impl InPlace<'_> {
    fn apply<T: Element>(&self, data: &mut [T]) {
        let kernel = ElementKernel::<T>::new(self.op);
        if let [i] = self.group {
            let view = self.grads[*i].layout();
            if let Some((start, end)) = view.contiguous_offsets() {
                let xs = &mut data[start..end];
                if self.parallel && xs.len() > CHUNK {
                    xs.par_chunks_mut(CHUNK).for_each(|c| kernel.run(c));
                } else {
                    kernel.run(xs);
                }
                return;
            }
            if !view.has_internal_overlap() {
                for_each_run(view, |start, len| kernel.run(&mut data[start..start + len]));
                return;
            }
        }
        // Aliasing views, or a view that repeats elements: write the union of their runs once.
        let views = self.group.iter().map(|&i| self.grads[i].layout());
        for (s, e) in union_of_runs(views) {
            kernel.run(&mut data[s..e]);
        }
    }
}

/// [`ElementwiseOp`] with its constants converted once for element type `T`.
#[derive(Clone, Copy)]
pub(super) enum ElementKernel<T> {
    Scale(f64),
    Clamp { bound: f64, lo: T, hi: T },
}

impl<T: Element> ElementKernel<T> {
    pub(super) fn new(op: ElementwiseOp) -> Self {
        match op {
            ElementwiseOp::Scale(c) => ElementKernel::Scale(c),
            ElementwiseOp::Clamp(v) => {
                let hi = round_toward_zero::<T>(v);
                ElementKernel::Clamp {
                    bound: hi.to_f64(),
                    lo: T::from_f64(-hi.to_f64()),
                    hi,
                }
            }
        }
    }

    fn run(&self, xs: &mut [T]) {
        run_kernel(*self, xs)
    }
}

#[inline(always)]
fn run_kernel_generic<T: Element>(kernel: ElementKernel<T>, xs: &mut [T]) {
    match kernel {
        ElementKernel::Scale(c) => xs.iter_mut().for_each(|x| *x = scale(*x, c)),
        ElementKernel::Clamp { bound, lo, hi } => {
            xs.iter_mut().for_each(|x| *x = clamp(*x, bound, lo, hi))
        }
    }
}

/// One element scaled: the product in f64 with the unrounded coefficient (relative error at most
/// 2^-53, far below the dtype's ulp), then rounded to the dtype: within half an ulp of the exact
/// product, up to that 2^-53 on near-ties. (The fused optimizers form clipped gradients with it.)
#[inline(always)]
pub(super) fn scale<T: Element>(x: T, c: f64) -> T {
    T::from_f64(x.to_f64() * c)
}

/// One element clamped into `[-bound, bound]` (`lo`, `hi` the bound's values in `T`); comparisons
/// with NaN are false, so NaN stays NaN.
#[inline(always)]
pub(super) fn clamp<T: Element>(x: T, bound: f64, lo: T, hi: T) -> T {
    let v = x.to_f64();
    if v > bound {
        hi
    } else if v < -bound {
        lo
    } else {
        x
    }
}

/// The largest value of `T` not above `v` (for `v >= 0`), so clamped values never exceed `v`.
pub(crate) fn round_toward_zero<T: Element>(v: f64) -> T {
    let nearest = T::from_f64(v);
    if nearest.to_f64() <= v {
        nearest
    } else {
        nearest.next_toward_zero()
    }
}

/// The 0-d norm tensor on the CPU in the dtype the API promises.
pub(crate) fn norm_tensor(norm: f64, dtype: DType) -> Result<Tensor> {
    match dtype {
        DType::F64 => Tensor::new(norm, &candle_core::Device::Cpu),
        _ => Tensor::new(norm as f32, &candle_core::Device::Cpu),
    }
}

// After the macros it uses.
pub(crate) mod prescale;

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    /// The nearest value of `T` to `x` (ties to the even bit pattern), by brute force over the
    /// neighbours of a first guess: an independent check of `Element::from_f64`.
    fn nearest_by_search<T: Element>(
        x: f64,
        first_guess: fn(f64) -> T,
        bits_of: fn(T) -> u16,
        from_bits: fn(u16) -> T,
    ) -> T {
        let guess = bits_of(first_guess(x)) as i32;
        let mut best: Option<(f64, u16)> = None;
        for b in (guess - 2)..=(guess + 2) {
            let Ok(b) = u16::try_from(b) else { continue };
            let v = from_bits(b).to_f64();
            if v.is_nan() || (v == 0.0 && v.is_sign_negative() != x.is_sign_negative()) {
                continue;
            }
            let d = (v - x).abs();
            best = match best {
                Some((bd, bb)) if bd < d || (bd == d && bb % 2 == 0) => Some((bd, bb)),
                _ => Some((d, b)),
            };
        }
        from_bits(best.expect("a neighbour").1)
    }

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
                let generic = sum_powers_generic(&xs, Power::Square);
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

    #[test]
    fn half_precision_to_f64_is_exact_for_every_bit_pattern() {
        for bits in 0..=u16::MAX {
            let (ours, theirs) = (
                <f16 as Element>::to_f64(f16::from_bits(bits)),
                f16::from_bits(bits).to_f64(),
            );
            assert!(
                ours.to_bits() == theirs.to_bits() || (ours.is_nan() && theirs.is_nan()),
                "f16 {bits:#x}"
            );
            let (ours, theirs) = (
                <bf16 as Element>::to_f64(bf16::from_bits(bits)),
                bf16::from_bits(bits).to_f64(),
            );
            assert!(
                ours.to_bits() == theirs.to_bits() || (ours.is_nan() && theirs.is_nan()),
                "bf16 {bits:#x}"
            );
        }
    }

    #[test]
    fn half_precision_rounding_is_correct() {
        let mut rng = StdRng::seed_from_u64(7);
        for i in 0..200_000 {
            // Values near representable points and midpoints, with noise in the low f64 bits.
            let base: f64 = rng.gen_range(-4.0..4.0) * 2f64.powi(rng.gen_range(-20..20));
            let x = if i % 2 == 0 {
                base
            } else {
                f64::from_bits(base.to_bits() ^ rng.gen_range(0..1u64 << 30))
            };
            let got = <bf16 as Element>::from_f64(x);
            let want = nearest_by_search(x, bf16::from_f64, bf16::to_bits, bf16::from_bits);
            assert_eq!(got.to_bits(), want.to_bits(), "bf16 from {x:e}");
            if x.abs() < 60000.0 {
                let got = <f16 as Element>::from_f64(x);
                let want = nearest_by_search(x, f16::from_f64, f16::to_bits, f16::from_bits);
                assert_eq!(got.to_bits(), want.to_bits(), "f16 from {x:e}");
            }
        }
        // Exact midpoints round to the even neighbour; a hair above or below decides, even when
        // the hair lies in the low 32 bits of the f64 (which half's own conversion ignores).
        fn check_ties<T: Element>(lo_bits: u16, from_bits: fn(u16) -> T, bits_of: fn(T) -> u16) {
            let (lo, hi) = (from_bits(lo_bits).to_f64(), from_bits(lo_bits + 1).to_f64());
            let mid = (lo + hi) / 2.0;
            let even = if lo_bits % 2 == 0 { lo } else { hi };
            let above = f64::from_bits(mid.to_bits() + 1);
            let below = f64::from_bits(mid.to_bits() - 1);
            for (x, want) in [(mid, even), (above, hi), (below, lo)] {
                let got = T::from_f64(x);
                assert_eq!(
                    got.to_f64(),
                    want,
                    "{x:e} rounded to bits {:#x}",
                    bits_of(got)
                );
            }
        }
        for _ in 0..20_000 {
            check_ties(
                rng.gen_range(0x0001..0x7f7f),
                bf16::from_bits,
                bf16::to_bits,
            );
            check_ties(rng.gen_range(0x0001..0x7bff), f16::from_bits, f16::to_bits);
        }
        assert!(<bf16 as Element>::from_f64(f64::NAN).is_nan());
        assert_eq!(<bf16 as Element>::from_f64(1e300), bf16::INFINITY);
        assert_eq!(<f16 as Element>::from_f64(-1e10), f16::NEG_INFINITY);
        assert_eq!(<bf16 as Element>::from_f64(-0.0).to_bits(), 0x8000);
    }
}
