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
//! let loss = (model.forward(&x)? - 10.0)?.sqr()?.mean_all()?;
//! let mut grads = loss.backward()?;
//! # let vars = varmap.all_vars();
//! # // The global L2 norm with candle's own ops: sqrt of the sum of every squared element.
//! # let l2 = |grads: &candle_core::backprop::GradStore| -> candle_core::Result<f64> {
//! #     let mut sum = 0.0;
//! #     for v in &vars {
//! #         sum += grads.get(v).unwrap().to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>()?;
//! #     }
//! #     Ok(sum.sqrt())
//! # };
//! # let before = l2(&grads)?;
//! let norm = candle_grad_clip::clip_grad_norm_(&varmap.all_vars(), &mut grads, 1.0)?;
//! opt.step(&grads)?;
//! // The norm before clipping, far above 1 here: SGD stepped on gradients scaled to norm 1.
//! let norm = norm.to_scalar::<f32>()? as f64;
//! assert!(norm > 10.0);
//! # assert!((norm - before).abs() <= 1e-6 * before);
//! # assert!((l2(&grads)? - 1.0 / (1.0 + 1e-6 / before)).abs() < 1e-6);
//! # Ok(()) }
//! ```
//!
//! The crate is laid out as one mechanism with back ends, and the features built on it:
//! - `gradients`: collect the gradients of the vars from the `GradStore` and validate them;
//! - `backend`: reduce them to one norm and scale them in place, on the CPU (`backend::cpu`,
//!   rayon) or through the multi-tensor kernels of `kernels/` (`backend::kernels`: what they are
//!   asked to do), run on CUDA (`backend::cuda`, feature `cuda`) or emulated on the CPU
//!   (`backend::emulated`, feature `emulation`);
//! - `exact_sum`: the order-independent exact summation that makes the norm deterministic;
//! - `clip`: the public clipping functions and the norm types;
//! - `optim`: optimizers ([`Clipped`], [`FusedAdamW`], [`FusedSgd`]);
//! - `policy`: thresholds decided by the run itself ([`AutoClip`], [`ZClip`]), dynamic loss
//!   scaling ([`GradScaler`]);
//! - `stats`: per-layer norms and norm statistics;
//! - `dist`: the global norm across processes ([`ProcessGroup`], [`total_norm_across`]).
//!
//! Semantics follow PyTorch's `torch.nn.utils.clip_grad_norm_`; see the README for where and why
//! they differ.

mod backend;
mod checkpoint;
mod clip;
mod dist;
mod exact_sum;
mod gradients;
mod layout_runs;
mod optim;
mod policy;
mod stats;

pub use clip::NormType;
pub use clip::{
    adaptive_clip_grad_, clip_grad_norm_, clip_grad_value_, clip_grads_with_norm_, total_norm,
    ClipGradNorm, AGC_DEFAULT_EPS, DEFAULT_EPS,
};
// Training-loop integration (optimizer wrapper, per-layer norms, statistics, AutoClip).
pub use optim::{ClipSetting, Clipped, ClippedConfig, FusedAdamW, FusedSgd, ParamsSgd};
pub use policy::{AutoClip, GradScaler, ZClip, ZClipMode};
// Training checkpoints: vars, optimizer, clip policy, GradScaler, step and metadata in one file.
pub use checkpoint::{CheckpointOptimizer, Restore, TrainingCheckpoint};
// For benches/scaler_ratios.rs only.
#[doc(hidden)]
pub use policy::__unscaled_norm_cpu;
// The global norm across processes (MPI with feature `mpi`, NCCL with feature `nccl`, threads).
#[cfg(feature = "nccl")]
pub use dist::NcclGroup;
pub use dist::{clip_grad_norm_across, total_norm_across, LocalGroup, ProcessGroup};
pub use stats::{grad_norms, GradNormStats};
// The CUDA kernels run on the CPU, for tests (feature `emulation`).
#[cfg(feature = "emulation")]
pub use backend::emulated::{BlockOrder, EmulatedLaunch, EmulationLog, KernelEmulation};
