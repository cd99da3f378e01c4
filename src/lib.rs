//! Gradient clipping, fused optimizers, loss scaling and training checkpoints for
//! [candle](https://github.com/huggingface/candle).
//!
//! The simplest use: rescale the gradients that `loss.backward()` returns so that their global norm is at most
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
//! # What to reach for
//!
//! | you want | reach for |
//! | --- | --- |
//! | to clip the `GradStore` of your own loop | [`clip_grad_norm_`], [`clip_grad_value_`], [`ClipGradNorm`] (every option: [`NormType`], `eps`, `error_if_nonfinite`), [`clip_grads_with_norm_`] (a norm computed earlier), [`adaptive_clip_grad_`] (AGC, unit-wise) |
//! | to measure without clipping | [`total_norm`]; [`grad_norms`] (per named var), [`GradNormStats`] (norms recorded step by step, `suggest_max_norm`) |
//! | your `candle_nn::Optimizer` (`SGD`, `AdamW`, your own), clipped before each step | [`Clipped`] with [`ClippedConfig`]; `with_skip_nonfinite`, `with_max_consecutive_skips`, `consecutive_skips` |
//! | the fastest step: AdamW or SGD as one pass with the clip folded in | [`FusedAdamW`] (bitwise `candle_nn::AdamW`), [`FusedSgd`] with [`ParamsSgd`] (PyTorch's SGD), both a [`Fused`] over a [`FusedRule`]; `with_clip`, `with_skip_nonfinite`, `state_dict` / `save_state` |
//! | a batch larger than the device holds: micro-batches summed in place, one clip and one step | [`GradAccumulator`] (`add` per micro-batch, `grads()`, then clip and step, `zero_()`) |
//! | how to clip, in an optimizer or a checkpoint | [`ClipSetting`]: a norm, a value, [`AutoClip`], [`ZClip`] ([`ZClipMode`]) or AGC — the setting of [`Clipped`], of the fused optimizers' `with_clip` and of [`TrainingCheckpoint::with_clip`] |
//! | no threshold to tune, or only the spikes clipped | [`AutoClip`] (a percentile of the norms seen so far), [`ZClip`] (z-scores against an EMA, statistics on the device); each also clips a `GradStore` on its own (`clip_`) |
//! | an F16 forward pass with F32 master weights | [`GradScaler`]: PyTorch's dynamic loss scaling, state on the device; any [`ScaledOptimizer`] (a wrapper around a fused optimizer keeps its fused path through [`ScaledOptimizer::fused`]) |
//! | to stop and resume bitwise | [`TrainingCheckpoint`]: vars, optimizer, clip policy, `GradScaler`, step and metadata in one verified file, saved atomically (or in the background: [`PendingSave`]), restored all or nothing ([`Restore`]); any [`CheckpointOptimizer`]; [`TrainingCheckpoint::inspect`] ([`CheckpointStatus`]) and [`TrainingCheckpoint::fits`] tell a damaged file or another run's |
//! | the global norm of gradients spread over processes | [`clip_grad_norm_across_`], [`total_norm_across`], [`ClipGradNorm::clip_across_`], the optimizers' `step_across`, `GradScaler::step_across`, over a [`ProcessGroup`]: [`LocalGroup`] (threads), the `mpi` crate's communicators (feature `mpi`), `NcclGroup` (feature `nccl`) |
//! | to test CUDA kernels without a GPU | `KernelEmulation`, `BlockOrder`, `EmulationLog` (feature `emulation`) |
//!
//! Every function returns `candle_core::Result`: bad input is an error that names the problem,
//! and no gradient is modified. candle's `Error` cannot carry a typed error (its `Wrapped` holds a
//! `Display`), so the conditions a loop reacts to are queries instead: `consecutive_skips()`,
//! `last_step_skipped()`, [`TrainingCheckpoint::inspect`]. Settings follow one convention on
//! every type: `with_<name>(value)` sets, `<name>()` reads back, and every use checks them. `vars` is typically `varmap.all_vars()` and `grads` the
//! `GradStore` that `loss.backward()` returns.
//!
//! # Semantics
//!
//! Those of PyTorch's `torch.nn.utils.clip_grad_norm_`, made exact: the norm is accumulated in
//! `f64` and its partial sums added exactly, so it is right where PyTorch overflows or rounds and
//! bitwise the same for any order of the vars and any thread count; the coefficient is
//! `min(1, max_norm / (norm + eps))` with `eps =` [`ClipGradNorm::DEFAULT_EPS`], and the gradients are not
//! written at all when it is 1. `docs/semantics.md` in the repository lists every rule and each
//! difference from PyTorch.
//!
//! # Feature flags
//!
//! - `cuda`: the CUDA back end (multi-tensor kernels; turns on candle's `cuda`). Needs nvcc at
//!   build time. The kernels have so far run only under the host emulation, not on a GPU.
//! - `emulation`: the CUDA kernels compiled for the host and run on the CPU (`KernelEmulation`),
//!   for tests; needs a C++17 compiler.
//! - `mpi`: [`ProcessGroup`] for the `mpi` crate's communicators (needs an MPI library and
//!   libclang).
//! - `nccl`: `NcclGroup`, a [`ProcessGroup`] over cudarc's NCCL communicator (implies `cuda`).
//! - `test-hooks`: internal, for this crate's own tests; do not enable it.
//!
//! # Guides
//!
//! The repository's `docs/` holds a guide per topic — training loops, clip policies, mixed
//! precision, checkpoints, across processes, the `train_lm` example, semantics, CUDA, the
//! emulation — whose examples are doctests like the one above; `BENCHMARKS.md` holds every
//! measurement, and `docs/ARCHITECTURE.md` the crate's internal layering.

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
pub use clip::across::clip_grad_norm_across_;
pub use clip::agc::adaptive_clip_grad_;
pub use clip::norm::{clip_grad_norm_, clip_grads_with_norm_, total_norm, ClipGradNorm};
pub use clip::value::clip_grad_value_;
pub use ops::norm_type::NormType;
// Training-loop integration: optimizers, policies, loss scaling, statistics.
pub use accum::GradAccumulator;
pub use amp::grad_scaler::GradScaler;
pub use amp::scaled::{FusedHandle, ScaledOptimizer};
pub use optim::adamw::{AdamWRule, FusedAdamW};
pub use optim::clip_setting::ClipSetting;
pub use optim::clipped::{Clipped, ClippedConfig};
pub use optim::fused::api::{Fused, FusedRule};
pub use optim::sgd::{FusedSgd, ParamsSgd, SgdRule};
pub use policy::autoclip::AutoClip;
pub use policy::zclip::{ZClip, ZClipMode, ZClipStatistics};
pub use stats::{grad_norms, GradNormStats};
// Training checkpoints: vars, optimizer, clip policy, GradScaler, step and metadata in one file.
pub use checkpoint::{
    CheckpointOptimizer, CheckpointStatus, PendingSave, Restore, TrainingCheckpoint,
};
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

/// The Rust blocks of the README and of the guides in `docs/`, compiled and run as doctests by
/// `cargo test` (`--doc`); never built otherwise.
#[cfg(doctest)]
mod doc_files {
    #[doc = include_str!("../README.md")]
    struct Readme;
    #[doc = include_str!("../docs/training-loops.md")]
    struct TrainingLoops;
    #[doc = include_str!("../docs/clip-policies.md")]
    struct ClipPolicies;
    #[doc = include_str!("../docs/mixed-precision.md")]
    struct MixedPrecision;
    #[doc = include_str!("../docs/accumulation.md")]
    struct Accumulation;
    #[doc = include_str!("../docs/checkpoints.md")]
    struct Checkpoints;
    #[doc = include_str!("../docs/across-processes.md")]
    struct AcrossProcesses;
    #[doc = include_str!("../docs/train_lm.md")]
    struct TrainLm;
    #[doc = include_str!("../docs/semantics.md")]
    struct Semantics;
    #[doc = include_str!("../docs/emulation.md")]
    struct Emulation;
    #[doc = include_str!("../docs/cuda.md")]
    struct Cuda;
    #[doc = include_str!("../docs/ARCHITECTURE.md")]
    struct Architecture;
}
