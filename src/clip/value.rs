//! Value clipping: [`clip_grad_value_`].

use candle_core::{backprop::GradStore, bail, Result, Var};

use crate::dispatch;
use crate::ops::gradients::GradientSet;

/// Clamps every gradient element of `vars` into `[-clip_value, clip_value]` in place; NaN stays
/// NaN. For F16 and BF16 gradients the bound is rounded towards zero, so no element ends above
/// `clip_value`.
///
/// ```
/// use candle_core::{Device, Tensor, Var, backprop::GradStore};
/// use candle_grad_clip::clip_grad_value_;
/// # fn main() -> candle_core::Result<()> {
/// let w = Var::new(&[0f32, 0., 0.], &Device::Cpu)?;
/// let mut grads = GradStore::default();
/// grads.insert(&w, Tensor::new(&[-5f32, 0.5, 9.], &Device::Cpu)?);
/// clip_grad_value_(&[w.clone()], &mut grads, 1.0)?;
/// assert_eq!(grads.get(&w).unwrap().to_vec1::<f32>()?, [-1.0, 0.5, 1.0]);
/// # Ok(()) }
/// ```
pub fn clip_grad_value_(vars: &[Var], grads: &mut GradStore, clip_value: f64) -> Result<()> {
    if clip_value.is_nan() || clip_value < 0.0 {
        bail!("clip_grad_value_: clip_value must be >= 0, got {clip_value}")
    }
    let set = GradientSet::collect(vars, grads)?;
    dispatch::clip::clamp(&set, clip_value)
}
