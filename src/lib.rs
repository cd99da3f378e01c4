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
//! The crate is one mechanism with back ends — collect the gradients, build a segment table,
//! reduce, form a coefficient or run a policy, then an element-wise pass or a fused optimizer
//! step — on the CPU, on CUDA and under the kernels' host emulation, and the features built on
//! it, bottom first (`docs/ARCHITECTURE.md` draws it):
//! - `io`: crash-safe file replacement and safetensors bytes with digests;
//! - `ops`: what each operation is on any device (parameters, constants, the host arithmetic
//!   every back end reproduces bitwise), the gradients' collection and the exact summation that
//!   makes the norm deterministic;
//! - `backend`: the CPU twin (`backend::cpu`, rayon), the kernel plan (`backend::kernels`: what
//!   the multi-tensor kernels of `kernels/` are asked to do), run on CUDA (`backend::cuda`,
//!   feature `cuda`) or emulated on the CPU (`backend::emulated`, feature `emulation`);
//! - `dispatch`: picks the back end for a set of gradients;
//! - `dist`: process groups and the global norm across processes ([`ProcessGroup`],
//!   [`total_norm_across`]);
//! - `clip`: the public clipping functions; `stats`: per-layer norms and norm statistics;
//! - `policy`: thresholds decided by the run itself ([`AutoClip`], [`ZClip`]);
//! - `optim`: optimizers ([`Clipped`], [`FusedAdamW`], [`FusedSgd`]);
//! - `amp`: dynamic loss scaling for mixed precision ([`GradScaler`]);
//! - `checkpoint`: training checkpoints in one file ([`TrainingCheckpoint`]).
//!
//! Semantics follow PyTorch's `torch.nn.utils.clip_grad_norm_`; see the README for where and why
//! they differ.

// The layers, bottom first: `io` and `ops` (definitions), `backend`, `dispatch`, then the public
// layers `dist`, `clip`, `stats`, `policy`, `optim`, `amp`, `checkpoint` (docs/ARCHITECTURE.md;
// `scripts/check-layers.py` checks that imports only point down).
mod accum;
mod amp;
mod backend;
mod checkpoint;
mod clip;
mod dispatch;
mod dist;
mod io;
mod ops;
mod optim;
mod policy;
mod stats;

// Clipping functions.
pub use clip::across::clip_grad_norm_across;
pub use clip::agc::{adaptive_clip_grad_, AGC_DEFAULT_EPS};
pub use clip::norm::{clip_grad_norm_, clip_grads_with_norm_, total_norm, ClipGradNorm};
pub use clip::value::clip_grad_value_;
pub use ops::clip::DEFAULT_EPS;
pub use ops::norm_type::NormType;
// Training-loop integration: optimizers, policies, loss scaling, statistics.
pub use accum::GradAccumulator;
pub use amp::grad_scaler::GradScaler;
pub use optim::adamw::FusedAdamW;
pub use optim::clip_setting::ClipSetting;
pub use optim::clipped::{Clipped, ClippedConfig};
pub use optim::sgd::{FusedSgd, ParamsSgd};
pub use policy::autoclip::AutoClip;
pub use policy::zclip::{ZClip, ZClipMode};
pub use stats::{grad_norms, GradNormStats};
// Training checkpoints: vars, optimizer, clip policy, GradScaler, step and metadata in one file.
pub use checkpoint::{CheckpointOptimizer, PendingSave, Restore, TrainingCheckpoint};
// For benches/scaler_ratios.rs only.
#[doc(hidden)]
pub use amp::grad_scaler::__unscaled_norm_cpu;
// For this crate's own tests only (feature `test-hooks`): a simulated device error on one thread.
#[cfg(feature = "test-hooks")]
#[doc(hidden)]
pub use ops::fault::__inject_fault;
// The global norm across processes (MPI with feature `mpi`, NCCL with feature `nccl`, threads).
pub use dist::local::LocalGroup;
#[cfg(feature = "nccl")]
pub use dist::nccl::NcclGroup;
pub use dist::{total_norm_across, ProcessGroup};
// The CUDA kernels run on the CPU, for tests (feature `emulation`).
#[cfg(feature = "emulation")]
pub use backend::emulated::{BlockOrder, EmulatedLaunch, EmulationLog, KernelEmulation};
