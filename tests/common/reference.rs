//! The independent f64 reference: the p-norm in extended precision, the coefficient of the
//! specification, correct rounding to a float dtype (independently of candle, `half` and Rust's
//! casts), per-dtype ulps and tolerances, numpy's linear quantile.

use candle_core::DType;

// ---------------------------------------------------------------------------------------------
// Reference norm.

fn two_sum(a: f64, b: f64) -> (f64, f64) {
    let s = a + b;
    let bb = s - a;
    let e = (a - (s - bb)) + (b - bb);
    (s, e)
}

/// Double-double accumulator: about 106 bits, plenty for a reference on a few million terms.
#[derive(Default, Clone, Copy)]
struct Dd {
    hi: f64,
    lo: f64,
}

impl Dd {
    fn add2(&mut self, xh: f64, xl: f64) {
        let (s, e) = two_sum(self.hi, xh);
        let e = e + self.lo + xl;
        let (h, l) = two_sum(s, e);
        self.hi = h;
        self.lo = l;
    }
    fn value(self) -> f64 {
        self.hi + self.lo
    }
}

/// exponent k with 2^k <= m < 2^(k+1) for a finite m > 0 (subnormals: -1022).
fn exponent(m: f64) -> i32 {
    let e = ((m.to_bits() >> 52) & 0x7ff) as i32;
    if e == 0 {
        -1022
    } else {
        e - 1023
    }
}

fn pow2(k: i32) -> f64 {
    // exact for -1074 <= k <= 1023
    if k < -1022 {
        f64::from_bits(1u64 << (k + 1074))
    } else {
        f64::from_bits(((k + 1023) as u64) << 52)
    }
}

/// The p-norm (`p = f64::INFINITY` for the max norm) of the concatenation of `values`,
/// computed independently in extended precision. NaN if any value is NaN, infinite if any
/// value is infinite (and p > 0).
pub fn ref_norm(values: &[f64], p: f64) -> f64 {
    if values.iter().any(|x| x.is_nan()) {
        return f64::NAN;
    }
    let m = values.iter().fold(0f64, |a, &x| a.max(x.abs()));
    if p == f64::INFINITY || m == 0.0 || m.is_infinite() {
        return m;
    }
    // Scale by a power of two so that nothing overflows; exact (bar deep underflow).
    let k = exponent(m);
    let down = pow2(-k);
    let up = pow2(k);
    let mut acc = Dd::default();
    if p == 1.0 {
        for &x in values {
            acc.add2(x.abs() * down, 0.0);
        }
        acc.value() * up
    } else if p == 2.0 {
        for &x in values {
            let y = x.abs() * down;
            let sq = y * y;
            acc.add2(sq, y.mul_add(y, -sq));
        }
        // sqrt(hi + lo) ~= sqrt(hi) * (1 + lo / (2 hi))
        let r = acc.hi.sqrt();
        (r + acc.lo / (2.0 * r)) * up
    } else {
        for &x in values {
            let y = (x.abs() * down).powf(p);
            acc.add2(y, 0.0);
        }
        acc.value().powf(1.0 / p) * up
    }
}

/// The coefficient of the specification: `min(1, max_norm / (norm + eps))`; 0 for max_norm = 0.
pub fn ref_coef(max_norm: f64, norm: f64, eps: f64) -> f64 {
    if max_norm == 0.0 && !norm.is_nan() {
        return 0.0;
    }
    (max_norm / (norm + eps)).min(1.0)
}

// ---------------------------------------------------------------------------------------------
// Tolerances.

/// The spacing of `dtype` around |x| (subnormal spacing for tiny values), exactly (from the
/// exponent bits, not a logarithm). Panics for a dtype that is not F16, BF16, F32 or F64.
pub fn ulp(dtype: DType, x: f64) -> f64 {
    let (mant, min_exp, _) = format_of(dtype);
    let a = x.abs();
    let e = if a == 0.0 || !a.is_finite() {
        min_exp
    } else {
        exponent(a).max(min_exp)
    };
    pow2(e - mant)
}

/// Relative tolerance of F64 results (norms and, through the coefficient, scaled F64
/// elements) for a norm of order `p`: the general powers lose a few ulps, amplified by 1/p.
pub fn rel64(p: f64) -> f64 {
    if p == 1.0 || p == 2.0 || p == f64::INFINITY {
        1e-13
    } else {
        1e-12
    }
}

/// Relative tolerance for scaled F64 elements when the norm may be F32 (mixed dtypes: the
/// coefficient may come from the F32-rounded norm).
pub const REL_MIXED: f64 = 2.4e-7;

/// Tolerance for one scaled element of `dtype` whose exact value is `expected`: one ulp for
/// F16/BF16, 4 ulps (< 5e-7 relative) for F32, `rel_f64` relative (at least 16 ulps) for F64.
pub fn elem_tol(dtype: DType, expected: f64, rel_f64: f64) -> f64 {
    match dtype {
        DType::F16 | DType::BF16 => ulp(dtype, expected),
        DType::F32 => 4.0 * ulp(dtype, expected),
        DType::F64 => (expected.abs() * rel_f64).max(16.0 * ulp(dtype, expected)),
        d => panic!("elem_tol: {d:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Correct rounding, independently of candle, `half` and Rust's casts.

/// (explicit significand bits, exponent of the smallest normal, exponent of the largest finite)
/// of a float dtype.
fn format_of(dtype: DType) -> (i32, i32, i32) {
    match dtype {
        DType::F16 => (10, -14, 15),
        DType::BF16 => (7, -126, 127),
        DType::F32 => (23, -126, 127),
        DType::F64 => (52, -1022, 1023),
        d => panic!("format_of: {d:?}"),
    }
}

/// `x` rounded once to the nearest value of `dtype` (ties to the even significand, overflow to
/// infinity, the sign kept on zero), returned as the exact f64 of that value.
///
/// Computed from the definition: the two neighbours `lo = n·q` and `hi = (n+1)·q` of `|x|` on the
/// grid of spacing `q` (the dtype's ulp at `|x|`, subnormal spacing below the normal range), and
/// the nearer of the two by exact f64 subtraction. `half::{f16, bf16}::from_f64` are not used:
/// they are not correctly rounded from f64 (they round via f32, or drop the low bits first).
pub fn round_to_dtype(dtype: DType, x: f64) -> f64 {
    if dtype == DType::F64 || x == 0.0 || !x.is_finite() {
        return x;
    }
    let (mant, emin, emax) = format_of(dtype);
    let a = x.abs();
    let q = pow2(exponent(a).max(emin) - mant);
    // a / q scales by a power of two (exact); lo and hi are exact multiples of q.
    let n = (a / q).floor();
    let (lo, hi) = (n * q, (n + 1.0) * q);
    // Both differences are exact (Sterbenz), except `hi - a` when `n = 0` and `a` is far below
    // `q / 2`, where rounding it cannot change the comparison.
    let (below, above) = (a - lo, hi - a);
    let nearest = if below < above || (below == above && n % 2.0 == 0.0) {
        lo
    } else {
        hi
    };
    let largest = (2.0 - pow2(-mant)) * pow2(emax);
    let r = if nearest > largest {
        f64::INFINITY
    } else {
        nearest
    };
    if x < 0.0 {
        -r
    } else {
        r
    }
}

// ---------------------------------------------------------------------------------------------
// Quantiles.

/// numpy's default (linear) quantile of sorted data.
pub fn ref_quantile(sorted: &[f64], q: f64) -> f64 {
    let h = (sorted.len() - 1) as f64 * q;
    let (lo, hi) = (h.floor() as usize, h.ceil() as usize);
    sorted[lo] + (h - lo as f64) * (sorted[hi] - sorted[lo])
}
