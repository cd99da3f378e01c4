//! The fused optimizer step as the back ends see it: one element-wise pass over every
//! (parameter, gradient, state) triple, with the clip folded in. The optimizers in `src/optim/`
//! describe a [`Step`]; [`fused_step`] runs it on the parameters' device: the CPU twin
//! (`backend::cpu::fused_step`) or the multi-tensor update kernel (`kernels::fused_step`).
//!
//! The step's bookkeeping lives in a small `I64` tensor on the parameters' device, the *control*
//! tensor, so that a step skipped on a GPU needs no host synchronisation: `[steps, clipped steps,
//! skipped steps, then one word per var: 1 once a step with state (AdamW's moments, SGD's momentum
//! buffer) has updated that var's state]`. SGD uses it to start a momentum buffer with the first
//! gradient, as PyTorch does.

use candle_core::{DType, Result, Tensor};

use crate::ops::gradients::GradientSet;
use crate::ops::norm_type::NormType;
use crate::ops::zclip::ZClipParams;

/// Words of the control tensor before the per-var flags.
pub(crate) const CONTROL_WORDS: usize = 3;
/// Index of the step count in the control tensor.
pub(crate) const STEPS: usize = 0;
/// Index of the clipped-step count.
pub(crate) const CLIPPED: usize = 1;
/// Index of the skipped-step count.
pub(crate) const SKIPPED: usize = 2;

/// The update rule of a step, with its hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rule {
    /// candle's `AdamW` (decoupled weight decay), with the bias corrections of step `steps + 1`.
    AdamW {
        lr: f64,
        beta1: f64,
        beta2: f64,
        eps: f64,
        weight_decay: f64,
    },
    /// PyTorch's `torch.optim.SGD`.
    Sgd {
        lr: f64,
        momentum: f64,
        dampening: f64,
        weight_decay: f64,
        nesterov: bool,
    },
}

impl Rule {
    /// SGD with neither momentum nor weight decay: `p - lr * g`, candle's `SGD` exactly (both back
    /// ends follow candle's op sequence for it).
    pub(crate) fn is_plain_sgd(&self) -> bool {
        matches!(self, Rule::Sgd { momentum, weight_decay, .. } if *momentum == 0.0 && *weight_decay == 0.0)
    }

    /// State tensors per var: AdamW's two moments; SGD's momentum buffer when momentum is on.
    pub(crate) fn state_count(&self) -> usize {
        match self {
            Rule::AdamW { .. } => 2,
            Rule::Sgd { momentum, .. } if *momentum != 0.0 => 1,
            Rule::Sgd { .. } => 0,
        }
    }
}

/// The dtype of a var's state tensors: F64 for F64 vars, F32 for the others (F16/BF16 vars keep
/// their moments in F32).
pub(crate) fn state_dtype(param: DType) -> DType {
    if param == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// Index of a state dtype among a slot's buffers: 0 for F32, 1 for F64.
pub(crate) fn state_class(param: DType) -> usize {
    (state_dtype(param) == DType::F64) as usize
}

/// The optimizer state of all vars, flat: for each slot (AdamW: the two moments; SGD: the
/// momentum buffer) one contiguous 1-D tensor per state dtype (`[F32, F64]`), and each var's
/// place in them. One buffer per slot and dtype keeps a step to a few storage locks and the
/// moments of consecutive vars adjacent in memory.
#[derive(Debug, Clone, Default)]
pub(crate) struct FlatState {
    /// Per slot: the F32 and the F64 buffer (absent when no var has that state dtype).
    pub(crate) buffers: Vec<[Option<Tensor>; 2]>,
    /// Per var: where its state lies in each slot's buffers.
    pub(crate) places: Vec<Place>,
}

/// A var's place in the flat state: buffer `class` (see [`state_class`]), elements
/// `offset..offset + len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Place {
    pub(crate) class: usize,
    pub(crate) offset: usize,
    pub(crate) len: usize,
}

/// What the step does to the gradients before the update (never writing them). It holds the
/// tensors it reads (handles: a clone shares the storage).
#[derive(Debug, Clone)]
pub(crate) enum StepClip {
    /// Use them as they are.
    None,
    /// Scale by `min(1, max_norm / (norm + eps))` of their `norm_type` norm, as `clip_grad_norm_`.
    Norm {
        norm_type: NormType,
        max_norm: f64,
        eps: f64,
    },
    /// Clamp into `[-v, v]`, as `clip_grad_value_`.
    Value(f64),
    /// Scale by `min(1, max_norm / (norm + eps))` of a norm computed earlier (AutoClip's
    /// threshold), as `clip_grads_with_norm_`.
    GivenNorm {
        norm: Tensor,
        max_norm: f64,
        eps: f64,
    },
    /// ZClip (`policy::zclip`): its step on the statistics `state` (1-D `F64` on the device, not
    /// written: the new statistics are returned in [`Outcome::policy_state`]) decides the
    /// coefficient of the global L2 norm.
    ZClip { state: Tensor, params: ZClipParams },
    /// Adaptive gradient clipping, unit-wise (`ops::agc`): each unit's gradient scaled by its
    /// own coefficient as it is read.
    Agc { clipping: f64, eps: f64 },
}

/// One var of a step.
pub(crate) struct Target {
    /// The var's tensor (contiguous), written in place.
    pub(crate) param: Tensor,
    /// Its index among the optimizer's vars (its flag in the control tensor, its place in the
    /// state).
    pub(crate) index: usize,
}

/// A fused optimizer step.
pub(crate) struct Step<'a> {
    /// The vars that have a gradient, on one device.
    pub(crate) targets: Vec<Target>,
    /// Their gradients, target by target (same dtypes and shapes), only read.
    pub(crate) grads: &'a GradientSet,
    pub(crate) rule: Rule,
    pub(crate) clip: StepClip,
    /// Leave everything unchanged (and count the step as skipped) when the gradients are not all
    /// finite.
    pub(crate) skip_nonfinite: bool,
    /// GradScaler's one-read path: the gradients hold *scaled* values, and `inv_scale`
    /// (`(f32)(1 / (f64)scale)`, a 0-d `F32` tensor on the step's device, never read back on a
    /// GPU) unscales each element as the reduction and the update read it
    /// (`ops::grad_scaler::unscale`); the update writes the unscaled values back into the gradients
    /// (so does a skipped step). The norm, the finite check and the clip are those of the
    /// unscaled gradients. Only where [`runs_prescaled`] says so.
    pub(crate) prescale: Option<&'a Tensor>,
    /// The control tensor (see the module documentation).
    pub(crate) control: &'a Tensor,
    /// The state (its first [`Rule::state_count`] slots are written).
    pub(crate) state: &'a FlatState,
}

/// What a step measured.
pub(crate) struct Outcome {
    /// The norm the clip setting bounds (the largest `|g|` for value clipping), as a 0-d tensor on
    /// the device; `None` without a clip.
    pub(crate) norm: Option<Tensor>,
    /// The new statistics of a policy clip (ZClip), on the device.
    pub(crate) policy_state: Option<Tensor>,
}

impl Step<'_> {
    /// [`prescale`](Self::prescale) read back, for the CPU twin (where reading it is free).
    pub(crate) fn inv_scale_on_host(&self) -> Result<Option<f32>> {
        self.prescale
            .map(|inv| inv.to_dtype(DType::F32)?.to_scalar::<f32>())
            .transpose()
    }
}
