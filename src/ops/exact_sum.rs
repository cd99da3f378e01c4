//! Exact, order-independent summation of non-negative `f64` values.
//!
//! The global norm is a sum of many per-chunk partial sums. Adding floating-point numbers in a
//! different order gives a different rounding, so a naive reduction depends on the order of the
//! `vars` (hash-map order for `VarMap::all_vars()`) and on the thread count. [`ExactSum`] instead
//! adds every partial into a wide fixed-point integer that covers the whole `f64` range (a
//! "superaccumulator"): integer addition is exact, so the result is the correctly rounded sum of
//! the partials whatever the order, and merging two accumulators is exact too. The CUDA kernel
//! (`kernels/grad_clip.cu`) uses the same digit layout.

/// Bits of payload per digit; each digit lives in a `u64`, so 2^32 additions fit before a carry
/// has to be propagated.
const DIGIT_BITS: u32 = 32;
/// Bit position of the least significant bit of an `f64` subnormal (2^-1074) is position 0; the
/// largest finite value ends below position 2098. Two spare digits absorb carries.
pub(crate) const DIGITS: usize = 68;
/// Words of [`ExactSum::to_words`]: the digits, then the `inf` and `NaN` flags.
pub(crate) const WORDS: usize = DIGITS + 2;

/// A superaccumulator for non-negative `f64` values; `inf` and `NaN` are tracked as flags.
#[derive(Clone, Debug)]
pub(crate) struct ExactSum {
    digits: [u64; DIGITS],
    /// Additions since the last carry propagation.
    pending: u32,
    saw_inf: bool,
    saw_nan: bool,
}

impl Default for ExactSum {
    fn default() -> Self {
        Self::new()
    }
}

impl ExactSum {
    pub(crate) fn new() -> Self {
        Self {
            digits: [0; DIGITS],
            pending: 0,
            saw_inf: false,
            saw_nan: false,
        }
    }

    /// Adds `x`, which must be `>= 0`, `+inf` or `NaN` (the sums of `|g|^p` are never negative).
    pub(crate) fn add(&mut self, x: f64) {
        debug_assert!(
            x.is_nan() || x >= 0.0,
            "ExactSum takes non-negative values, got {x}"
        );
        if x.is_nan() {
            self.saw_nan = true;
            return;
        }
        if x.is_infinite() {
            self.saw_inf = true;
            return;
        }
        let bits = x.to_bits();
        let exponent = ((bits >> 52) & 0x7ff) as u32;
        let fraction = bits & ((1u64 << 52) - 1);
        let (mantissa, position) = if exponent == 0 {
            (fraction, 0)
        } else {
            (fraction | (1u64 << 52), exponent - 1)
        };
        if mantissa == 0 {
            return;
        }
        let digit = (position / DIGIT_BITS) as usize;
        let shifted = (mantissa as u128) << (position % DIGIT_BITS);
        self.digits[digit] += (shifted as u64) & 0xffff_ffff;
        self.digits[digit + 1] += ((shifted >> 32) as u64) & 0xffff_ffff;
        self.digits[digit + 2] += (shifted >> 64) as u64;
        self.pending += 1;
        if self.pending == u32::MAX {
            self.propagate_carries();
        }
    }

    /// Adds everything `other` holds. Exact and commutative.
    pub(crate) fn merge(&mut self, other: &ExactSum) {
        let mut other = other.clone();
        other.propagate_carries();
        self.propagate_carries();
        for (a, b) in self.digits.iter_mut().zip(other.digits.iter()) {
            *a += *b;
        }
        self.pending = 1;
        self.saw_inf |= other.saw_inf;
        self.saw_nan |= other.saw_nan;
    }

    /// The accumulator as words that can be added word by word across processes: the digits with
    /// their carries propagated (each below 2^32), then one word each for "saw inf" and "saw NaN"
    /// (0 or 1). Adding up to `u32::MAX` such arrays cannot overflow a word:
    /// `(2^32 - 1) · (2^32 - 1) = 2^64 - 2^33 + 1 < 2^64`, and [`from_words`](Self::from_words) takes the sum.
    pub(crate) fn to_words(&self) -> [u64; WORDS] {
        let mut normalised = self.clone();
        normalised.propagate_carries();
        let mut words = [0u64; WORDS];
        words[..DIGITS].copy_from_slice(&normalised.digits);
        words[DIGITS] = self.saw_inf as u64;
        words[DIGITS + 1] = self.saw_nan as u64;
        words
    }

    /// The accumulator whose words are `words`: one [`to_words`](Self::to_words) array, or the
    /// word-by-word sum of up to `u32::MAX` of them (then it holds the sum of their values; a flag
    /// word counts the accumulators that had the flag).
    pub(crate) fn from_words(words: &[u64; WORDS]) -> Self {
        let mut digits = [0u64; DIGITS];
        digits.copy_from_slice(&words[..DIGITS]);
        Self {
            digits,
            // Digits may hold up to (2^32 - 1)^2: propagate before any further addition.
            pending: u32::MAX - 1,
            saw_inf: words[DIGITS] != 0,
            saw_nan: words[DIGITS + 1] != 0,
        }
    }

    fn propagate_carries(&mut self) {
        let mut carry = 0u64;
        for d in self.digits.iter_mut() {
            let v = *d + carry;
            *d = v & 0xffff_ffff;
            carry = v >> DIGIT_BITS;
        }
        debug_assert_eq!(carry, 0, "ExactSum overflowed its top digit");
        self.pending = 0;
    }

    /// The exact sum, rounded once to the nearest `f64` (ties to even). `NaN` if a `NaN` was
    /// added, `+inf` if an infinity was added or the sum exceeds `f64::MAX`.
    pub(crate) fn value(&self) -> f64 {
        if self.saw_nan {
            return f64::NAN;
        }
        if self.saw_inf {
            return f64::INFINITY;
        }
        let mut acc = self.clone();
        acc.propagate_carries();
        let Some(top) = acc.digits.iter().rposition(|&d| d != 0) else {
            return 0.0;
        };
        // A 96-bit window of the three top digits, plus a sticky bit for anything below it, rounds
        // to 53 bits exactly as the infinitely precise value would.
        let low = top.saturating_sub(2);
        let mut window: u128 = 0;
        for i in (low..=top).rev() {
            window = (window << DIGIT_BITS) | acc.digits[i] as u128;
        }
        if acc.digits[..low].iter().any(|&d| d != 0) {
            window |= 1;
        }
        // `u128 as f64` rounds to nearest even. The scale is an exact power of two, and the
        // product is exact: either the window is below 2^53 (low == 0, exact conversion) or the
        // result is a normal number.
        (window as f64) * pow2(low as i32 * DIGIT_BITS as i32 - 1074)
    }
}

/// `2^k` for `-1074 <= k <= 1023`, built from its bits.
fn pow2(k: i32) -> f64 {
    debug_assert!((-1074..=1023).contains(&k));
    if k >= -1022 {
        f64::from_bits(((k + 1023) as u64) << 52)
    } else {
        f64::from_bits(1u64 << (k + 1074))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum_of(xs: &[f64]) -> f64 {
        let mut s = ExactSum::new();
        xs.iter().for_each(|&x| s.add(x));
        s.value()
    }

    #[test]
    fn small_integers_are_exact() {
        assert_eq!(sum_of(&[1.0, 2.0, 3.0]), 6.0);
        assert_eq!(sum_of(&[]), 0.0);
        assert_eq!(sum_of(&[0.0, 0.0]), 0.0);
    }

    #[test]
    fn catastrophic_order_is_exact() {
        // 1e16 + 1 + 1 - ... naive left-to-right gives 1e16; exact gives 1e16 + 2.
        assert_eq!(sum_of(&[1e16, 1.0, 1.0]), 1e16 + 2.0);
        assert_eq!(sum_of(&[1.0, 1.0, 1e16]), 1e16 + 2.0);
        // Values far apart in magnitude.
        assert_eq!(sum_of(&[1e300, 1e-300]), 1e300);
        assert_eq!(
            sum_of(&[f64::MIN_POSITIVE / 4.0, f64::MIN_POSITIVE / 4.0]),
            f64::MIN_POSITIVE / 2.0
        );
        assert_eq!(sum_of(&[5e-324; 3]), 1.5e-323);
    }

    #[test]
    fn rounding_is_to_nearest_with_sticky_bits() {
        // 1 + 2^-53 + 2^-110: exactly above the halfway point, so it rounds up.
        let x = sum_of(&[1.0, 2f64.powi(-53), 2f64.powi(-110)]);
        assert_eq!(x, 1.0 + f64::EPSILON);
        // 1 + 2^-53 alone is a tie and rounds to even (1.0).
        assert_eq!(sum_of(&[1.0, 2f64.powi(-53)]), 1.0);
    }

    #[test]
    fn overflow_and_specials() {
        assert_eq!(sum_of(&[f64::MAX, f64::MAX]), f64::INFINITY);
        assert_eq!(sum_of(&[f64::MAX, 1.0]), f64::MAX);
        assert_eq!(sum_of(&[1.0, f64::INFINITY]), f64::INFINITY);
        assert!(sum_of(&[f64::INFINITY, f64::NAN]).is_nan());
    }

    #[test]
    fn merge_matches_single_accumulator() {
        let xs: Vec<f64> = (0..1000)
            .map(|i| (i as f64 * 0.37).sin().abs() * 10f64.powi(i % 40 - 20))
            .collect();
        let whole = sum_of(&xs);
        let (a, b) = xs.split_at(333);
        let mut sa = ExactSum::new();
        a.iter().for_each(|&x| sa.add(x));
        let mut sb = ExactSum::new();
        b.iter().for_each(|&x| sb.add(x));
        sb.merge(&sa);
        assert_eq!(sb.value().to_bits(), whole.to_bits());
        let mut reversed: Vec<f64> = xs.clone();
        reversed.reverse();
        assert_eq!(sum_of(&reversed).to_bits(), whole.to_bits());
    }

    #[test]
    fn summed_words_hold_the_sum_of_the_accumulators() {
        // Independent reference: the single accumulator over every value (itself checked above
        // against exact arithmetic); the word-wise sum must give it bitwise, flags included.
        let xs: Vec<f64> = (0..3000)
            .map(|i| (i as f64 * 0.61).cos().abs() * 10f64.powi(i % 90 - 45))
            .collect();
        for parts in [1, 2, 3, 7] {
            let mut summed = [0u64; WORDS];
            for part in xs.chunks(xs.len().div_ceil(parts)) {
                let mut s = ExactSum::new();
                part.iter().for_each(|&x| s.add(x));
                for (w, v) in summed.iter_mut().zip(s.to_words()) {
                    *w += v;
                }
            }
            let total = ExactSum::from_words(&summed);
            assert_eq!(
                total.value().to_bits(),
                sum_of(&xs).to_bits(),
                "{parts} parts"
            );
        }
        // Worst case for the digits: u32::MAX accumulators whose digits are all 2^32 - 1 (the
        // low 61 digits, so that the total stays finite): no word wraps, and the total is that
        // accumulator's value times u32::MAX (two roundings against one: within 2 ulps).
        let mut full = ExactSum::new();
        full.digits[..61].fill(0xffff_ffff);
        let words = full.to_words();
        let summed: [u64; WORDS] = std::array::from_fn(|i| words[i] * u32::MAX as u64);
        let mut total = ExactSum::from_words(&summed);
        let want = full.value() * u32::MAX as f64;
        assert!(want.is_finite());
        assert!((total.value() - want).abs() <= want * 2.0 * f64::EPSILON);
        // Adding to a summed accumulator first normalises it.
        total.add(1.0);
        total.propagate_carries();
        assert!(total.digits.iter().all(|&d| d < 1 << 32));
        // Flags count the accumulators that had them.
        let mut with_nan = ExactSum::new();
        with_nan.add(f64::NAN);
        let mut words = with_nan.to_words();
        assert_eq!((words[DIGITS], words[DIGITS + 1]), (0, 1));
        words[DIGITS] += 1; // another accumulator saw an infinity: NaN still wins
        let both = ExactSum::from_words(&words);
        assert!(both.value().is_nan());
        let mut inf_only = [0u64; WORDS];
        inf_only[DIGITS] = 3;
        assert_eq!(ExactSum::from_words(&inf_only).value(), f64::INFINITY);
    }
}
