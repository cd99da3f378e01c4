//! The norm of a set of gradients, as every back end defines it: each element enters as a
//! [`Power`], a back end's [`Reduction`] sums the powers of its work items exactly (or takes the
//! largest `|g|`), and [`norm_of_reduction`] forms the norm, with the rescue pass where powers
//! may leave the `f64` range. The partial results go through a [`Combine`]: as they are in one
//! process ([`OneProcess`]), or through collectives across processes (`dist`), so that a group
//! of processes takes exactly the decisions one process holding all the gradients takes.

use candle_core::Result;

use crate::ops::exact_sum::ExactSum;
use crate::ops::fault;
use crate::ops::gradients::GradientSet;
use crate::ops::norm_type::NormType;

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
    pub(crate) fn apply(self, x: f64) -> f64 {
        match self {
            Power::Abs => x.abs(),
            Power::Square => x * x,
            Power::Pow { p, divisor } => (x.abs() / divisor).powf(p),
        }
    }
}

/// The two reductions a norm is made of, over some gradients: the CPU's work items, or, across
/// processes, a kernel device's chunks (`dist`).
pub(crate) trait Reduction {
    /// The largest `|g|` (NaN if any is NaN; 0 when there is none).
    fn max_abs(&self) -> Result<f64>;
    /// The exact sum of the per-item partial sums of `power`.
    fn sum_powers(&self, power: Power) -> Result<ExactSum>;
}

/// How the reduction's partial results are combined before the norm is formed: as they are in
/// one process ([`OneProcess`]), through collectives across a process group (`dist`). The norm
/// is computed by the same code either way, so a group of processes takes exactly the decisions
/// (rescue or not) that one process holding all the gradients takes.
///
/// Each takes this part's result or the error of its reduction: across processes a rank whose
/// reduction failed still takes part in the collective, so that every rank fails with it.
pub(crate) trait Combine {
    /// The largest `|g|` over everything combined (NaN if any was NaN), from this part's.
    fn max_abs(&mut self, local: Result<f64>) -> Result<f64>;
    /// The exact sum over everything combined, from this part's.
    fn sum(&mut self, local: Result<ExactSum>) -> Result<ExactSum>;
    /// [`GradientSet::powers_may_leave_f64_range`] of everything combined.
    fn powers_may_leave_f64_range(&self, p: f64) -> bool;
}

/// Combining within one process: the local results are the results.
pub(crate) struct OneProcess<'a>(pub(crate) &'a GradientSet);

impl Combine for OneProcess<'_> {
    fn max_abs(&mut self, local: Result<f64>) -> Result<f64> {
        local
    }
    fn sum(&mut self, local: Result<ExactSum>) -> Result<ExactSum> {
        local
    }
    fn powers_may_leave_f64_range(&self, p: f64) -> bool {
        self.0.powers_may_leave_f64_range(p)
    }
}

/// The norm from a [`Reduction`], its partial results combined by `combine`.
///
/// Sums of powers are exact sums of per-item partials. Where powers may leave the `f64` range
/// (F64 gradients, or `p > 6`) and the sum overflowed or nearly underflowed, the norm is computed
/// again as `max|g| · (Σ (|g| / max|g|)^p)^(1/p)`: the largest term is exactly 1, so the sum lies
/// in `[1, n]` for any `p`, and a finite norm is never reported as `inf` or `0`.
pub(crate) fn norm_of_reduction(
    reduction: &dyn Reduction,
    norm_type: NormType,
    combine: &mut dyn Combine,
) -> Result<f64> {
    let p = match norm_type.canonical() {
        NormType::Inf => {
            return combine.max_abs(fault::check("reduction").and_then(|()| reduction.max_abs()))
        }
        NormType::L1 => 1.0,
        NormType::L2 => 2.0,
        NormType::P(p) => p,
    };
    let power = match p {
        1.0 => Power::Abs,
        2.0 => Power::Square,
        _ => Power::Pow { p, divisor: 1.0 },
    };
    let local = fault::check("reduction").and_then(|()| reduction.sum_powers(power));
    let sum = combine.sum(local)?.value();
    let suspicious = sum.is_infinite() || sum < TINY_SUM;
    if sum.is_nan() || !(suspicious && combine.powers_may_leave_f64_range(p)) {
        return Ok(root(sum, p));
    }
    let local = fault::check("rescue").and_then(|()| reduction.max_abs());
    let max = combine.max_abs(local)?;
    if max == 0.0 || !max.is_finite() {
        return Ok(max);
    }
    let scaled = combine
        .sum(reduction.sum_powers(Power::Pow { p, divisor: max }))?
        .value();
    Ok(root(scaled, p) * max)
}

/// Below this, powers of F64 gradients may have lost bits to underflow.
pub(crate) const TINY_SUM: f64 = 1e-270;

pub(crate) fn root(sum: f64, p: f64) -> f64 {
    match p {
        1.0 => sum,
        2.0 => sum.sqrt(),
        _ => sum.powf(1.0 / p),
    }
}
