//! Helpers shared by the integration tests: exact reads of tensors, an independent f64 reference
//! for the norms (double-double accumulation, power-of-two scaling), per-dtype ulp tolerances.
//!
//! Nothing here calls the crate under test: the expectations are computed from the values that
//! candle itself reads back from the gradient tensors. (Only constants and a log of the kernel
//! emulation are named here, for the tests that share them.)
#![allow(dead_code)]

use candle_core::{backprop::GradStore, DType, Device, Result, Tensor, Var};
use candle_grad_clip::{BlockOrder, EmulationLog};
use half::{bf16, f16};
use rand::{rngs::StdRng, Rng};

/// Every float dtype a gradient may have.
pub const DTYPES: [DType; 4] = [DType::F32, DType::F64, DType::F16, DType::BF16];

/// Every block order of the kernel emulation.
pub const ORDERS: [BlockOrder; 4] = [
    BlockOrder::InOrder,
    BlockOrder::Reversed,
    BlockOrder::Shuffled,
    BlockOrder::Concurrent { threads: 3 },
];

/// The kernels an emulated run launched, in order.
pub fn kernels(log: &EmulationLog) -> Vec<&'static str> {
    log.launches.iter().map(|l| l.kernel).collect()
}

/// Every element of `t` (any float dtype, any layout, any rank) as exact f64, in logical
/// row-major order.
pub fn vals(t: &Tensor) -> Result<Vec<f64>> {
    t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()
}

/// The raw bit patterns of every element of `t`, in logical order: "bitwise unchanged" checks.
pub fn bits(t: &Tensor) -> Result<Vec<u64>> {
    let f = t.flatten_all()?;
    Ok(match t.dtype() {
        DType::F32 => f
            .to_vec1::<f32>()?
            .iter()
            .map(|x| x.to_bits() as u64)
            .collect(),
        DType::F64 => f.to_vec1::<f64>()?.iter().map(|x| x.to_bits()).collect(),
        DType::F16 => f
            .to_vec1::<f16>()?
            .iter()
            .map(|x| x.to_bits() as u64)
            .collect(),
        DType::BF16 => f
            .to_vec1::<bf16>()?
            .iter()
            .map(|x| x.to_bits() as u64)
            .collect(),
        DType::U8 => f.to_vec1::<u8>()?.iter().map(|&x| x as u64).collect(),
        DType::U32 => f.to_vec1::<u32>()?.iter().map(|&x| x as u64).collect(),
        DType::I64 => f.to_vec1::<i64>()?.iter().map(|&x| x as u64).collect(),
        d => panic!("bits: unsupported dtype {d:?}"),
    })
}

/// A tensor of `dtype` holding `values` (row-major) in `shape`. Values that are not
/// representable are rounded by candle; read them back with [`vals`] for exact expectations.
pub fn tensor(values: &[f64], shape: &[usize], dtype: DType) -> Result<Tensor> {
    Tensor::from_vec(values.to_vec(), shape.to_vec(), &Device::Cpu)?.to_dtype(dtype)
}

/// A var of the given shape (its value is irrelevant to clipping).
pub fn var(shape: &[usize]) -> Result<Var> {
    Var::zeros(shape.to_vec(), DType::F32, &Device::Cpu)
}

/// Bits of the gradient of each var (None where there is none).
pub fn store_bits(vars: &[Var], grads: &GradStore) -> Result<Vec<Option<Vec<u64>>>> {
    vars.iter()
        .map(|v| grads.get(v).map(bits).transpose())
        .collect()
}

/// The scalar held by a 0-d float tensor, as f64.
pub fn scalar(t: &Tensor) -> Result<f64> {
    assert_eq!(
        t.rank(),
        0,
        "expected a 0-d tensor, got shape {:?}",
        t.dims()
    );
    t.to_dtype(DType::F64)?.to_scalar::<f64>()
}

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

/// Concatenated values of the gradients of `vars` (vars without gradient skipped).
pub fn grad_values(vars: &[Var], grads: &GradStore) -> Result<Vec<f64>> {
    let mut out = vec![];
    for v in vars {
        if let Some(g) = grads.get(v) {
            out.extend(vals(g)?);
        }
    }
    Ok(out)
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

/// Asserts that a returned norm matches the f64 reference: F32 within `ref * 2^-23` (about one
/// ulp: the correctly rounded f32 of the reference is always accepted), F64 within `rel64`.
pub fn assert_norm(got: &Tensor, reference: f64, rel64: f64, what: &str) -> Result<()> {
    assert_eq!(
        got.rank(),
        0,
        "{what}: norm must be 0-d, got {:?}",
        got.dims()
    );
    assert!(got.device().is_cpu(), "{what}: norm must be on the CPU");
    let g = scalar(got)?;
    if reference.is_nan() {
        assert!(g.is_nan(), "{what}: expected a NaN norm, got {g}");
        return Ok(());
    }
    // An infinite reference admits exactly that infinity: the relative tolerances below would be
    // infinite too (`inf * 2^-23`) and accept any finite norm.
    if reference.is_infinite() {
        assert!(
            g == reference,
            "{what}: expected a {reference} norm, got {g:e} ({:?})",
            got.dtype()
        );
        return Ok(());
    }
    match got.dtype() {
        DType::F32 => {
            let tol = (reference * f64::powi(2.0, -23)).max(f64::powi(2.0, -149));
            assert!(
                (g - reference).abs() <= tol,
                "{what}: F32 norm {g:e} vs reference {reference:e} (diff {:e}, tol {tol:e})",
                (g - reference).abs()
            );
        }
        DType::F64 => {
            let tol = reference * rel64;
            assert!(
                (g - reference).abs() <= tol,
                "{what}: F64 norm {g:e} vs reference {reference:e} (diff {:e}, tol {tol:e})",
                (g - reference).abs()
            );
        }
        d => panic!("{what}: the norm must be F32 or F64, got {d:?}"),
    }
    Ok(())
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

/// Asserts that `new[i] ~= old[i] * coef` element-wise for a gradient of `dtype`.
pub fn assert_scaled(dtype: DType, old: &[f64], new: &[f64], coef: f64, rel_f64: f64, what: &str) {
    assert_eq!(old.len(), new.len(), "{what}: element count changed");
    for (i, (&o, &n)) in old.iter().zip(new).enumerate() {
        let expected = o * coef;
        if expected.is_nan() {
            assert!(n.is_nan(), "{what}[{i}]: expected NaN, got {n}");
            continue;
        }
        let tol = elem_tol(dtype, expected, rel_f64);
        assert!(
            (n - expected).abs() <= tol,
            "{what}[{i}] ({dtype:?}): {o:e} * {coef:e} = {expected:e}, got {n:e} (tol {tol:e})"
        );
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

/// Asserts that every element of a gradient of `dtype` scaled by `coef` is, bit for bit, the
/// product `old[i] · coef` formed in f64 and rounded once to `dtype` ([`round_to_dtype`]).
pub fn assert_scaled_bitwise(dtype: DType, old: &[f64], new: &[f64], coef: f64, what: &str) {
    assert_eq!(old.len(), new.len(), "{what}: element count changed");
    let mut wrong = 0;
    let mut first = None;
    for (i, (&o, &n)) in old.iter().zip(new).enumerate() {
        let want = round_to_dtype(dtype, o * coef);
        if n.to_bits() != want.to_bits() && !(n.is_nan() && want.is_nan()) {
            wrong += 1;
            first.get_or_insert((i, o, n, want));
        }
    }
    if let Some((i, o, n, want)) = first {
        panic!(
            "{what} ({dtype:?}): {wrong} of {} elements are not the f64 product rounded once; \
             first at [{i}]: {o:e} * {coef:e} = {want:e} expected, got {n:e}",
            old.len()
        );
    }
}

/// Asserts that every element of a gradient of `dtype` scaled by `coef` is the nearest value of
/// `dtype` to `old[i] · coef`: within half an ulp of it, plus `slack` relative for a `coef` that
/// is only known to that precision (a coefficient computed from the reference norm rather than
/// from the norm the library used). Without slack this is [`assert_scaled_bitwise`] up to ties.
pub fn assert_scaled_nearest(
    dtype: DType,
    old: &[f64],
    new: &[f64],
    coef: f64,
    slack: f64,
    what: &str,
) {
    assert_eq!(old.len(), new.len(), "{what}: element count changed");
    for (i, (&o, &n)) in old.iter().zip(new).enumerate() {
        let exact = o * coef;
        let tol = 0.5 * ulp(dtype, exact) + exact.abs() * slack;
        assert!(
            (n - exact).abs() <= tol,
            "{what}[{i}] ({dtype:?}): {o:e} * {coef:e} = {exact:e}, got {n:e}, {:.2} ulp away",
            (n - exact).abs() / ulp(dtype, exact)
        );
    }
}

/// Asserts two lists of bit patterns are equal, naming only the first difference (the lists are
/// long).
pub fn assert_same<T: PartialEq + std::fmt::Debug>(a: &[Vec<T>], b: &[Vec<T>], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        if let Some(j) = x.iter().zip(y).position(|(p, q)| p != q) {
            panic!("{what}: tensor {i} element {j}: {:?} vs {:?}", x[j], y[j]);
        }
        assert_eq!(x.len(), y.len(), "{what}: tensor {i} length");
    }
}

/// Bits of every var's value.
pub fn vars_bits(vars: &[Var]) -> Result<Vec<Vec<u64>>> {
    vars.iter().map(|v| bits(v.as_tensor())).collect()
}

/// Bits of every tensor of an optimizer state, sorted by key.
pub fn state_bits(
    state: &std::collections::HashMap<String, Tensor>,
) -> Result<Vec<(String, Vec<u64>)>> {
    let mut keys: Vec<&String> = state.keys().collect();
    keys.sort();
    keys.into_iter()
        .map(|k| Ok((k.clone(), bits(&state[k])?)))
        .collect()
}

/// Seeded values for optimizer tests: normal, spread over four decades around `scale`, with exact
/// zeros and negative zeros mixed in.
pub fn signed_values(rng: &mut StdRng, n: usize, scale: f64) -> Vec<f64> {
    use rand_distr::{Distribution, StandardNormal};
    (0..n)
        .map(|_| match rng.gen_range(0..20) {
            0 => 0.0,
            1 => -0.0,
            _ => {
                let x: f64 = StandardNormal.sample(rng);
                x * scale * 10f64.powi(rng.gen_range(-2..2))
            }
        })
        .collect()
}

/// Message of an error, lower-cased.
pub fn err_msg<T: std::fmt::Debug>(r: Result<T>, what: &str) -> String {
    match r {
        Ok(v) => panic!("{what}: expected an error, got Ok({v:?})"),
        Err(e) => e.to_string().to_lowercase(),
    }
}

// ---------------------------------------------------------------------------------------------
// Optimizer twins.

/// Two sets of vars with the same values, one var per shape (its dtype `dtypes[k % len]` for the
/// k-th shape): one set for the optimizer under test, one for its reference. Draws
/// [`signed_values`] once per shape, in order.
pub fn twin_vars(
    rng: &mut StdRng,
    shapes: &[&[usize]],
    dtypes: &[DType],
) -> Result<(Vec<Var>, Vec<Var>)> {
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for (k, shape) in shapes.iter().enumerate() {
        let n: usize = shape.iter().product();
        let t = tensor(&signed_values(rng, n, 1.0), shape, dtypes[k % dtypes.len()])?;
        a.push(Var::from_tensor(&t)?);
        b.push(Var::from_tensor(&t)?);
    }
    Ok((a, b))
}

/// The same gradient values for both sets (fresh tensors each, [`signed_values`] times `scale`).
/// With `skip = Some(p)`, each var is left without a gradient with probability `p` (one
/// `gen_bool(p)` drawn before each var's values); with `None`, nothing more is drawn.
pub fn twin_grads(
    rng: &mut StdRng,
    a: &[Var],
    b: &[Var],
    scale: f64,
    skip: Option<f64>,
) -> Result<(GradStore, GradStore)> {
    let (mut ga, mut gb) = (GradStore::default(), GradStore::default());
    for (va, vb) in a.iter().zip(b) {
        if let Some(p) = skip {
            if rng.gen_bool(p) {
                continue;
            }
        }
        let g = signed_values(rng, va.elem_count(), scale);
        ga.insert(va, tensor(&g, va.dims(), va.dtype())?);
        gb.insert(vb, tensor(&g, vb.dims(), vb.dtype())?);
    }
    Ok((ga, gb))
}

// ---------------------------------------------------------------------------------------------
// Per-tensor norms.

/// Asserts that two lists of named per-tensor norms (as `grad_norms` returns them) have the same
/// length and the same names in the same order, and that each norm is within one F32 ulp of the
/// wanted one; `exact`: bit for bit (the infinity norm, which needs no summation).
pub fn assert_named_norms(got: &[(String, f32)], want: &[(String, f32)], exact: bool, what: &str) {
    assert_eq!(
        got.iter().map(|(n, _)| n).collect::<Vec<_>>(),
        want.iter().map(|(n, _)| n).collect::<Vec<_>>(),
        "{what}: names"
    );
    for ((name, g), (_, w)) in got.iter().zip(want) {
        let (g, w) = (*g as f64, *w as f64);
        let tol = if exact { 0.0 } else { ulp(DType::F32, w) };
        assert!(
            (g - w).abs() <= tol && (!exact || g.to_bits() == w.to_bits()),
            "{what} {name}: got {g:e}, want {w:e} (tol {tol:e})"
        );
    }
}

/// Scaled gradients for `vars` (`scale` times the unscaled values) with a NaN, +inf or -inf
/// planted when `poison` is 1, 2 or 3. With `dyadic`, the unscaled values are `k / 1024` for
/// integers `|k| < 256` (8 significant bits: exact in BF16, and every sum of their squares, their
/// absolute values or their cubes over a few thousand elements is exact in `f64`, whatever the
/// order); otherwise uniform in (-0.7, 0.7) (the largest `|g|` away from a power of two, so that
/// its rounding shows in a max norm).
pub fn scaled_values(
    vars: &[Var],
    scale: f64,
    dyadic: bool,
    poison: u8,
    rng: &mut StdRng,
) -> Vec<Vec<f64>> {
    let mut values: Vec<Vec<f64>> = vars
        .iter()
        .map(|v| {
            (0..v.elem_count())
                .map(|_| {
                    let g = if dyadic {
                        rng.gen_range(-255i32..=255) as f64 / 1024.0
                    } else {
                        rng.gen_range(-0.7..0.7)
                    };
                    g * scale
                })
                .collect()
        })
        .collect();
    if poison > 0 {
        let bad = [f64::NAN, f64::INFINITY, f64::NEG_INFINITY];
        let nonempty: Vec<usize> = (0..values.len())
            .filter(|&i| !values[i].is_empty())
            .collect();
        let i = nonempty[rng.gen_range(0..nonempty.len())];
        let j = rng.gen_range(0..values[i].len());
        values[i][j] = bad[(poison - 1) as usize];
    }
    values
}
