//! The order of the vector norm used for clipping.

use candle_core::{bail, Result};

/// Which vector norm [`total_norm`](crate::total_norm) and [`ClipGradNorm`](crate::ClipGradNorm)
/// take over all gradients viewed as one vector.
///
/// `L2` is the default, as in PyTorch. `P(p)` is the general p-norm `(Σ|g|^p)^(1/p)` and needs a
/// finite `p > 0`; `P(1.0)` and `P(2.0)` are computed exactly as `L1` and `L2`.
///
/// ```
/// use candle_grad_clip::NormType;
/// assert_eq!(NormType::default(), NormType::L2);
/// assert!(NormType::P(0.5).validate().is_ok());
/// assert!(NormType::P(-1.0).validate().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum NormType {
    /// Sum of absolute values.
    L1,
    /// Euclidean norm: square root of the sum of squares.
    #[default]
    L2,
    /// Largest absolute value (the infinity norm). Exact: no rounding at all.
    Inf,
    /// `(Σ|g|^p)^(1/p)` for a finite `p > 0`.
    P(f64),
}

impl NormType {
    /// Checks that the norm is well defined: `P(p)` needs a finite `p > 0`.
    ///
    /// ```
    /// use candle_grad_clip::NormType;
    /// assert!(NormType::P(f64::NAN).validate().is_err());
    /// ```
    pub fn validate(self) -> Result<()> {
        if let NormType::P(p) = self {
            if !(p.is_finite() && p > 0.0) {
                bail!("NormType::P(p) needs a finite p > 0, got p = {p} (use NormType::Inf for the infinity norm)")
            }
        }
        Ok(())
    }

    /// The same norm with `P(1)`, `P(2)` replaced by `L1`, `L2`, so that each back end needs one
    /// fast path per norm and the general power only where it is really needed.
    pub(crate) fn canonical(self) -> NormType {
        match self {
            NormType::P(1.0) => NormType::L1,
            NormType::P(2.0) => NormType::L2,
            other => other,
        }
    }

    /// The exponent `p` of the norm (`f64::INFINITY` for `Inf`).
    ///
    /// ```
    /// use candle_grad_clip::NormType;
    /// assert_eq!(NormType::L2.order(), 2.0);
    /// assert_eq!(NormType::Inf.order(), f64::INFINITY);
    /// ```
    pub fn order(self) -> f64 {
        match self {
            NormType::L1 => 1.0,
            NormType::L2 => 2.0,
            NormType::Inf => f64::INFINITY,
            NormType::P(p) => p,
        }
    }
}

impl std::fmt::Display for NormType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NormType::L1 => write!(f, "L1"),
            NormType::L2 => write!(f, "L2"),
            NormType::Inf => write!(f, "infinity"),
            NormType::P(p) => write!(f, "L{p}"),
        }
    }
}
