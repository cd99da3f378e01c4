//! GradScaler's unscaling of one element, as every back end defines it (PyTorch's arithmetic of
//! `torch.amp.GradScaler.unscale_`). The public type is `amp::grad_scaler::GradScaler`.

use std::any::TypeId;

use crate::ops::element::Element;

/// One element unscaled as `GradScaler::unscale_` computes it (PyTorch's arithmetic): F64 as
/// `x * (f64)inv` in `f64`; the others as the `f32` product `(f32)x * inv`, then rounded to
/// their dtype (exact for F32).
#[inline(always)]
pub(crate) fn unscale<T: Element>(x: T, inv: f32) -> T {
    if TypeId::of::<T>() == TypeId::of::<f64>() {
        T::from_f64(x.to_f64() * inv as f64)
    } else {
        // The f64 product of a value with at most 24 significant bits and an f32 is exact, so
        // rounding it to f32 is the f32 product.
        T::from_f64(((x.to_f64() * inv as f64) as f32) as f64)
    }
}
