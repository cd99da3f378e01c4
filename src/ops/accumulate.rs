//! Gradient accumulation as every back end defines it: the element arithmetic of one pass over
//! (buffer, gradient) pairs, the buffer's dtype, and the checks of a gradient against its var.
//! The CPU twin (`backend/cpu/accumulate.rs`) calls [`accumulate`]; the kernel
//! `grad_clip_accumulate` of `kernels/grad_clip.cu` reproduces it bitwise.

use candle_core::{bail, DType, Device, Result, Tensor, Var};

use crate::ops::element::Element;

/// One pass over every (buffer, source) pair, in place in the buffers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum AccumulateOp {
    /// `acc = acc + g`, the sum rounded once to the buffer's dtype: candle's `(acc + g)?` (the
    /// sum of two values of a dtype, or of an F32 and a narrower gradient, is exact in `f64` or
    /// rounds innocuously to the buffer's dtype).
    Add,
    /// `acc = acc + round(g * alpha)`: the product taken in `f64` and rounded once to the
    /// buffer's dtype, then the sum rounded once (not fused).
    AddScaled(f64),
    /// `dst = round(src)`: an (F32/F64) accumulation buffer rounded once to the var's dtype.
    Round,
    /// `dst = 0` (+0.0): the buffers cleared; no source.
    Zero,
}

impl AccumulateOp {
    #[cfg_attr(not(any(feature = "cuda", feature = "emulation")), allow(dead_code))]
    /// Whether the pass reads a source tensor.
    pub(crate) fn reads_source(self) -> bool {
        self != AccumulateOp::Zero
    }
}

/// The new value of one buffer element `acc` given the source element `g` (ignored by `Zero`).
#[inline(always)]
pub(crate) fn accumulate<A: Element, G: Element>(acc: A, g: G, op: AccumulateOp) -> A {
    match op {
        AccumulateOp::Add => A::from_f64(acc.to_f64() + g.to_f64()),
        AccumulateOp::AddScaled(alpha) => {
            let product = A::from_f64(g.to_f64() * alpha);
            A::from_f64(acc.to_f64() + product.to_f64())
        }
        AccumulateOp::Round => A::from_f64(g.to_f64()),
        AccumulateOp::Zero => A::from_f64(0.0),
    }
}

/// The dtypes a var may have (the gradient dtypes of the crate).
pub(crate) fn is_float(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::F64 | DType::F16 | DType::BF16)
}

/// Bits of precision of a float dtype, to order "wider".
fn precision(dtype: DType) -> u32 {
    match dtype {
        DType::F64 => 53,
        DType::F32 => 24,
        DType::F16 => 11,
        _ => 8,
    }
}

/// The dtype of a var's buffer: `requested` when it is wider than the var's dtype, else the var's
/// own (an accumulation dtype never narrows a var).
pub(crate) fn buffer_dtype(var: DType, requested: Option<DType>) -> DType {
    match requested {
        Some(r) if precision(r) > precision(var) && r.size_in_bytes() > var.size_in_bytes() => r,
        _ => var,
    }
}

/// One (buffer, source) pair of a pass: the buffer is a whole contiguous storage owned by the
/// accumulator; the source any view of the buffer's shape (none for [`AccumulateOp::Zero`]), in a
/// storage other than the buffer's.
pub(crate) struct Pair {
    pub(crate) dst: Tensor,
    pub(crate) src: Option<Tensor>,
}

/// The pairs of one pass, all on one device.
pub(crate) struct PairSet {
    pairs: Vec<Pair>,
    device: Device,
}

impl PairSet {
    /// The pairs, on `device` (the vars' device; the caller checked every tensor).
    pub(crate) fn new(pairs: Vec<Pair>, device: Device) -> Self {
        Self { pairs, device }
    }

    pub(crate) fn pairs(&self) -> &[Pair] {
        &self.pairs
    }

    pub(crate) fn device(&self) -> &Device {
        &self.device
    }

    /// Elements written by a pass.
    pub(crate) fn elements(&self) -> usize {
        self.pairs.iter().map(|p| p.dst.elem_count()).sum()
    }
}

/// Refuses a var that cannot have an accumulation buffer (not a float dtype); `i` is its index.
pub(crate) fn check_var(i: usize, var: &Var, device: &Device) -> Result<()> {
    if !is_float(var.dtype()) {
        bail!(
            "GradAccumulator: var #{i} (shape {:?}) has dtype {:?}; gradients are accumulated for F32, F64, F16 and BF16 vars only",
            var.dims(),
            var.dtype()
        )
    }
    if !var.device().same_device(device) {
        bail!(
            "GradAccumulator: the vars are on different devices: {:?} and {:?} (var #{i})",
            device.location(),
            var.device().location()
        )
    }
    Ok(())
}

/// Refuses a gradient of var #`i` that does not match the var (dtype, shape, device); `call`
/// names the public method.
pub(crate) fn check_gradient(call: &str, i: usize, var: &Var, grad: &Tensor) -> Result<()> {
    if grad.dtype() != var.dtype() || grad.dims() != var.dims() {
        bail!(
            "{call}: the gradient of var #{i} is {:?} {:?} but the var is {:?} {:?}; nothing was accumulated",
            grad.dtype(),
            grad.dims(),
            var.dtype(),
            var.dims()
        )
    }
    if !grad.device().same_device(var.device()) {
        bail!(
            "{call}: the gradient of var #{i} is on {:?} but the var is on {:?}; nothing was accumulated",
            grad.device().location(),
            var.device().location()
        )
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};

    #[test]
    fn buffer_dtype_never_narrows() {
        assert_eq!(buffer_dtype(DType::BF16, Some(DType::F32)), DType::F32);
        assert_eq!(buffer_dtype(DType::F16, Some(DType::F32)), DType::F32);
        assert_eq!(buffer_dtype(DType::F32, Some(DType::F32)), DType::F32);
        assert_eq!(buffer_dtype(DType::F64, Some(DType::F32)), DType::F64);
        assert_eq!(buffer_dtype(DType::F32, Some(DType::F16)), DType::F32);
        assert_eq!(buffer_dtype(DType::F16, Some(DType::BF16)), DType::F16);
        assert_eq!(buffer_dtype(DType::BF16, None), DType::BF16);
    }

    #[test]
    fn element_arithmetic() {
        let one = bf16::from_f32(1.0);
        let tiny = bf16::from_f32(2f32.powi(-9));
        // 1 + 2^-9 is a tie in BF16: to even (1).
        assert_eq!(accumulate(one, tiny, AccumulateOp::Add), one);
        // In F32 it is exact.
        assert_eq!(
            accumulate(1f32, tiny, AccumulateOp::Add),
            1.0 + 2f32.powi(-9)
        );
        assert_eq!(
            accumulate(f16::from_f32(3.0), 1f32, AccumulateOp::Zero).to_f64(),
            0.0
        );
        assert_eq!(accumulate(0f32, 0.1f64, AccumulateOp::Round), 0.1f32);
        assert_eq!(accumulate(1f32, 3f32, AccumulateOp::AddScaled(0.5)), 2.5);
    }
}
