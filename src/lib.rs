//! Gradient clipping for [candle](https://github.com/huggingface/candle).
//!
//! Rescale the gradients that `loss.backward()` returns so that their global norm is at most
//! `max_norm`, in place, in one pass over the data:
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use candle_nn::{linear, Module, Optimizer, VarBuilder, VarMap, SGD};
//! # fn main() -> candle_core::Result<()> {
//! let varmap = VarMap::new();
//! let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
//! let model = linear(4, 1, vb.pp("fc"))?;
//! let mut opt = SGD::new(varmap.all_vars(), 0.1)?;
//!
//! let x = Tensor::ones((8, 4), DType::F32, &Device::Cpu)?;
//! let loss = model.forward(&x)?.sqr()?.mean_all()?;
//! let mut grads = loss.backward()?;
//! let norm = candle_grad_clip::clip_grad_norm_(&varmap.all_vars(), &mut grads, 1.0)?;
//! opt.step(&grads)?;
//! # let _ = norm;
//! # Ok(()) }
//! ```
//!
//! The crate is laid out as one mechanism with two back ends:
//! - `gradients`: collect the gradients of the vars from the `GradStore` and validate them;
//! - `backend`: reduce them to one norm and scale them in place, on the CPU (`backend::cpu`,
//!   rayon) or on CUDA (`backend::cuda`, fused kernels from `kernels/`, feature `cuda`);
//! - `exact_sum`: the order-independent exact summation that makes the norm deterministic.
//!
//! Semantics follow PyTorch's `torch.nn.utils.clip_grad_norm_`; see the README for where and why
//! they differ.

mod autoclip;
mod backend;
mod clip;
mod exact_sum;
mod gradients;
mod layout_runs;
mod norm_type;
mod optim;
mod stats;

pub use clip::{
    clip_grad_norm_, clip_grad_value_, clip_grads_with_norm_, total_norm, ClipGradNorm, DEFAULT_EPS,
};
pub use norm_type::NormType;
// Training-loop integration (optimizer wrapper, per-layer norms, statistics, AutoClip).
pub use autoclip::AutoClip;
pub use optim::{ClipSetting, Clipped, ClippedConfig};
pub use stats::{grad_norms, GradNormStats};
// The CUDA kernels run on the CPU, for tests (feature `emulation`).
#[cfg(feature = "emulation")]
pub use backend::emulated::{BlockOrder, EmulatedLaunch, EmulationLog, KernelEmulation};
