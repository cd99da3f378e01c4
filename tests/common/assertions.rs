//! Assertions on norms, scaled elements and bit patterns, and on error messages.

use candle_core::{DType, Result, Tensor};

use super::{elem_tol, round_to_dtype, scalar, ulp};

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

/// Message of an error, lower-cased.
pub fn err_msg<T: std::fmt::Debug>(r: Result<T>, what: &str) -> String {
    match r {
        Ok(v) => panic!("{what}: expected an error, got Ok({v:?})"),
        Err(e) => e.to_string().to_lowercase(),
    }
}

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
