//! The README's scaling promise, bit for bit: "product formed in `f64` with the unrounded
//! coefficient, then rounded to the gradient's dtype". Every scaled element must equal the f64
//! product of the old element and the coefficient `max_norm / (norm + eps)`, rounded once to the
//! gradient's dtype by an independent correctly-rounding helper (`common::round_to_dtype`). A
//! tolerance of a few ulps (as `common::elem_tol` allows) would also accept a coefficient
//! rounded to `f32` before the multiplication; equality does not.

use crate::common;

use candle_core::{backprop::GradStore, DType, Device, Result, Tensor, Var};
use candle_grad_clip::{clip_grad_norm_, clip_grads_with_norm_, ClipGradNorm, NormType};
use common::*;
use half::{bf16, f16};
use rand::{rngs::StdRng, Rng, SeedableRng};

/// Seeded values of both signs spread over many binades, representable in `dtype` (read back
/// exactly), with a few in the subnormal range of the dtype.
fn random_values(rng: &mut StdRng, n: usize, dtype: DType) -> Result<Vec<f64>> {
    let tiny = match dtype {
        DType::F16 => 1e-6,
        DType::BF16 | DType::F32 => 1e-39,
        _ => 1e-310,
    };
    let raw: Vec<f64> = (0..n)
        .map(|i| {
            let sign = if rng.gen::<bool>() { 1.0 } else { -1.0 };
            if i % 50 == 7 {
                sign * tiny * rng.gen_range(0.5..8.0)
            } else {
                sign * rng.gen_range(1.0..2.0) * 2f64.powi(rng.gen_range(-12..12))
            }
        })
        .collect();
    vals(&tensor(&raw, &[n], dtype)?)
}

/// The helper itself, against Rust's `as f32` (IEEE round-to-nearest-even), against hand-picked
/// ties and overflows of F16/BF16, and against the exhaustive list of F16/BF16 values.
#[test]
fn the_rounding_helper_is_correct() {
    let mut rng = StdRng::seed_from_u64(0xF32);
    for i in 0..200_000 {
        let base = rng.gen_range(-2.0..2.0) * 2f64.powi(rng.gen_range(-160..130));
        // Every other value a hair from a midpoint of f32 values.
        let x = if i % 2 == 0 {
            base
        } else {
            let f = base as f32;
            let mid = (f as f64 + f32::from_bits(f.to_bits() + 1) as f64) / 2.0;
            f64::from_bits(
                mid.to_bits()
                    .wrapping_add(rng.gen_range(0..3))
                    .wrapping_sub(1),
            )
        };
        let want = x as f32 as f64;
        let got = round_to_dtype(DType::F32, x);
        assert!(
            got.to_bits() == want.to_bits() || (x.is_nan() && got.is_nan()),
            "{x:e}: {got:e} vs {want:e}"
        );
    }
    // Every finite F16 and BF16 value rounds to itself, and each midpoint between neighbours to
    // the one with the even bit pattern (a hair off the midpoint: to the nearer one).
    for bits in 0..0x7bffu16 {
        let (lo, hi) = (
            f16::from_bits(bits).to_f64(),
            f16::from_bits(bits + 1).to_f64(),
        );
        check_neighbours(DType::F16, lo, hi, bits % 2 == 0);
    }
    for bits in 0..0x7f7fu16 {
        let (lo, hi) = (
            bf16::from_bits(bits).to_f64(),
            bf16::from_bits(bits + 1).to_f64(),
        );
        check_neighbours(DType::BF16, lo, hi, bits % 2 == 0);
    }
    // Overflow: halfway past the largest finite value rounds to infinity (ties to even).
    assert_eq!(round_to_dtype(DType::F16, 65519.99), 65504.0);
    assert_eq!(round_to_dtype(DType::F16, 65520.0), f64::INFINITY);
    assert_eq!(round_to_dtype(DType::F16, -1e6), f64::NEG_INFINITY);
    let (bf16_max, half_ulp) = (bf16::MAX.to_f64(), 2f64.powi(127 - 8));
    assert_eq!(
        round_to_dtype(DType::BF16, bf16_max + half_ulp),
        f64::INFINITY
    );
    let below = bf16_max + half_ulp * (1.0 - 2f64.powi(-20));
    assert_eq!(round_to_dtype(DType::BF16, below), bf16_max);
    // Signed zeros and underflow.
    assert_eq!(
        round_to_dtype(DType::F16, -1e-9).to_bits(),
        (-0.0f64).to_bits()
    );
    assert_eq!(round_to_dtype(DType::F16, 2f64.powi(-25)), 0.0); // tie: to 0 (even)
    assert_eq!(
        round_to_dtype(DType::F16, 2f64.powi(-25) * 1.0000001),
        2f64.powi(-24)
    );
}

fn check_neighbours(dtype: DType, lo: f64, hi: f64, lo_is_even: bool) {
    assert_eq!(round_to_dtype(dtype, lo).to_bits(), lo.to_bits());
    assert_eq!(round_to_dtype(dtype, hi).to_bits(), hi.to_bits());
    let mid = (lo + hi) / 2.0;
    let even = if lo_is_even { lo } else { hi };
    assert_eq!(round_to_dtype(dtype, mid), even, "tie {lo:e} / {hi:e}");
    if mid > 0.0 {
        let (below, above) = (
            f64::from_bits(mid.to_bits() - 1),
            f64::from_bits(mid.to_bits() + 1),
        );
        assert_eq!(round_to_dtype(dtype, below), lo, "below {mid:e}");
        assert_eq!(round_to_dtype(dtype, above), hi, "above {mid:e}");
    }
}

/// `clip_grads_with_norm_` with a given norm: the coefficient `max_norm / (norm + 1e-6)` is
/// known exactly, so every scaled element has exactly one right value. F32, F64, F16 and BF16
/// gradients in one call, contiguous, transposed and narrowed, one large enough for the
/// parallel path; F64 and F32 norm tensors.
#[test]
fn clip_grads_with_norm_rounds_the_f64_product_once() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(0x5CA1E);
    for round in 0..6 {
        let mut vars = vec![];
        let mut store = GradStore::default();
        let mut originals = vec![];
        for (k, dtype) in DTYPES.into_iter().enumerate() {
            let n = if round == 0 && k == 0 {
                (1 << 20) + 77
            } else {
                600
            };
            let values = random_values(&mut rng, n, dtype)?;
            let base = tensor(&values, &[n], dtype)?;
            let grad = match (round + k) % 3 {
                0 => base,
                // A transposed (strided) view of a (20, n / 20) matrix.
                1 if n % 20 == 0 => base.reshape((20, n / 20))?.t()?,
                // A view at an offset.
                _ => base.narrow(0, 3, n - 5)?,
            };
            let v = Var::zeros(grad.dims(), dtype, &Device::Cpu)?;
            originals.push((dtype, vals(&grad)?, grad.clone()));
            store.insert(&v, grad);
            vars.push(v);
        }
        let norm_value = rng.gen_range(1.0..1e4) * (1.0 + rng.gen::<f64>() * 1e-9);
        let max_norm = norm_value * rng.gen_range(0.01..0.99);
        let norm = if round % 2 == 0 {
            Tensor::new(norm_value, &Device::Cpu)?
        } else {
            Tensor::new(norm_value as f32, &Device::Cpu)?
        };
        // The coefficient of the specification, from the norm exactly as the tensor holds it.
        let coef = max_norm / (scalar(&norm)? + 1e-6);
        clip_grads_with_norm_(&vars, &mut store, max_norm, &norm)?;
        for (dtype, old, grad) in &originals {
            assert_scaled_bitwise(
                *dtype,
                old,
                &vals(grad)?,
                coef,
                &format!("round {round}, norm {:?}", norm.dtype()),
            );
        }
    }
    Ok(())
}

/// `clip_grad_norm_` and the builder on F64 gradients: the returned F64 norm is the one the
/// coefficient was formed from (checked against the f64 reference), and every element is the
/// f64 product with that coefficient, bit for bit.
#[test]
fn clip_grad_norm_on_f64_gradients_scales_bit_for_bit() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(0xF64);
    for nt in [
        NormType::L2,
        NormType::L1,
        NormType::Inf,
        NormType::P(3.0),
        NormType::P(0.5),
    ] {
        let mut vars = vec![];
        let mut store = GradStore::default();
        for n in [1, 129, 40_000] {
            let values = random_values(&mut rng, n, DType::F64)?;
            let g = tensor(&values, &[n], DType::F64)?;
            let v = Var::zeros(n, DType::F64, &Device::Cpu)?;
            store.insert(&v, g);
            vars.push(v);
        }
        let before = grad_values(&vars, &store)?;
        let reference = ref_norm(&before, nt.order());
        let max_norm = reference * 0.3;
        let norm = if nt == NormType::L2 {
            clip_grad_norm_(&vars, &mut store, max_norm)?
        } else {
            ClipGradNorm::new(max_norm)
                .with_norm_type(nt)
                .clip_(&vars, &mut store)?
        };
        assert_eq!(norm.dtype(), DType::F64);
        assert_norm(&norm, reference, rel64(nt.order()), &format!("{nt}"))?;
        let coef = max_norm / (scalar(&norm)? + 1e-6);
        assert_scaled_bitwise(
            DType::F64,
            &before,
            &grad_values(&vars, &store)?,
            coef,
            &format!("{nt}"),
        );
    }
    Ok(())
}
