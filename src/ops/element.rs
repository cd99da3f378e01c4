//! The element types of a gradient and the arithmetic every back end performs on one element,
//! with each rounding defined: conversions through `f64`, correct rounding to F16/BF16 (one
//! rounding, no double-rounding error), the scaled and the clamped element. The CPU twin calls
//! these functions; the kernels of `kernels/grad_clip.cu` reproduce them bitwise.

use half::{bf16, f16};

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

/// One element scaled: the product in f64 with the unrounded coefficient (relative error at most
/// 2^-53, far below the dtype's ulp), then rounded to the dtype: within half an ulp of the exact
/// product, up to that 2^-53 on near-ties. (The fused optimizers form clipped gradients with it.)
#[inline(always)]
pub(crate) fn scale<T: Element>(x: T, c: f64) -> T {
    T::from_f64(x.to_f64() * c)
}

/// One element clamped into `[-bound, bound]` (`lo`, `hi` the bound's values in `T`); comparisons
/// with NaN are false, so NaN stays NaN.
#[inline(always)]
pub(crate) fn clamp<T: Element>(x: T, bound: f64, lo: T, hi: T) -> T {
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
