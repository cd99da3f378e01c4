//! The kernels of `kernels/grad_clip.cu` as the host sees them: their names, their argument lists
//! (built here, once, for every device that runs them) and the grid each wants. One cohesive
//! thing, kept in one file: the mirror of every kernel's parameter list, so that a change of a
//! kernel signature is made in one place on the host side.

use half::{bf16, f16};

use crate::ops::accumulate::AccumulateOp;
use crate::ops::element::round_toward_zero;
use crate::ops::fused_step::Rule;
use crate::ops::gradients::GradientSet;
use crate::ops::norm_type::NormType;
use crate::ops::zclip::ZClipParams;

use super::abi::{BLOCK, WARPS_PER_BLOCK};
use super::table::{Part, StridedTarget};

/// The entry points of `kernels/grad_clip.cu`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kernel {
    ReduceInf,
    ReduceAbs,
    ReduceSq,
    ReducePow,
    Apply,
    ApplyStrided,
    SegmentNorms,
    FusedStep,
    ZClip,
    Agc,
    AgcStrided,
    Accumulate,
}

impl Kernel {
    /// Every kernel the host launches (the emulation checks that each is compiled in).
    #[cfg(test)]
    pub(crate) const ALL: [Kernel; 12] = [
        Kernel::ReduceInf,
        Kernel::ReduceAbs,
        Kernel::ReduceSq,
        Kernel::ReducePow,
        Kernel::Apply,
        Kernel::ApplyStrided,
        Kernel::SegmentNorms,
        Kernel::FusedStep,
        Kernel::ZClip,
        Kernel::Agc,
        Kernel::AgcStrided,
        Kernel::Accumulate,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Kernel::ReduceInf => "grad_clip_reduce_inf",
            Kernel::ReduceAbs => "grad_clip_reduce_abs",
            Kernel::ReduceSq => "grad_clip_reduce_sq",
            Kernel::ReducePow => "grad_clip_reduce_pow",
            Kernel::Apply => "grad_clip_apply",
            Kernel::ApplyStrided => "grad_clip_apply_strided",
            Kernel::SegmentNorms => "grad_clip_segment_norms",
            Kernel::FusedStep => "grad_clip_fused_step",
            Kernel::ZClip => "grad_clip_zclip",
            Kernel::Agc => "grad_clip_agc",
            Kernel::AgcStrided => "grad_clip_agc_strided",
            Kernel::Accumulate => "grad_clip_accumulate",
        }
    }
}

/// One kernel argument, by value, in the kernel's own type.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Arg {
    /// A device address (a pointer parameter).
    Ptr(u64),
    U32(u32),
    U64(u64),
    F64(f64),
    /// A struct of four doubles (`Bounds`).
    F64x4([f64; 4]),
    /// A struct of sixteen 64-bit words (`StridedView`).
    U64x16([u64; 16]),
    /// A struct of eight doubles (`StepParams`).
    F64x8([f64; 8]),
}

impl Arg {
    /// The emulation's token for this argument's type (`ArgToken` in `emulation/include/cuda_emu.h`).
    #[cfg_attr(not(feature = "emulation"), allow(dead_code))]
    pub(crate) fn token(&self) -> &'static str {
        match self {
            Arg::Ptr(_) => "p",
            Arg::U32(_) => "u",
            Arg::U64(_) => "U",
            Arg::F64(_) => "d",
            Arg::F64x4(_) => "s32",
            Arg::U64x16(_) => "s128",
            Arg::F64x8(_) => "s64",
        }
    }
}

/// How many blocks a launch wants. The device caps the multi-tensor kernels at what can be
/// resident at once (they loop over their work); the result never depends on the grid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Grid {
    /// One warp per work item (a chunk of the multi-tensor kernels, a segment's norm).
    Warps(u64),
    /// One thread per item of a grid-stride loop (strided views).
    Threads(u64),
}

impl Grid {
    /// Blocks for all the work at once, before any cap.
    pub(crate) fn wanted(self) -> u32 {
        let blocks = match self {
            Grid::Warps(items) => items.div_ceil(WARPS_PER_BLOCK),
            Grid::Threads(items) => items.div_ceil(BLOCK as u64),
        };
        blocks.clamp(1, 65_535) as u32
    }
}

/// A kernel launch, ready for any device.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Launch {
    pub(crate) kernel: Kernel,
    pub(crate) grid: Grid,
    pub(crate) args: Vec<Arg>,
}

// ---------------------------------------------------------------------------------------------
// The norm.

/// Which reduction kernel, which power, whether the overflow rescue may be needed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct NormPlan {
    kernel: Kernel,
    p: f64,
    /// Mirrors `cpu::reduce::norm`: sums of powers of F64 gradients, or powers above 6, may
    /// overflow or underflow `f64`; then a second pass divides every element by `max|g|`.
    pub(crate) rescue: bool,
    /// GradScaler's one-read path: the device address of the `f32` `inv_scale` by which every
    /// element is unscaled as it is read (`ops::grad_scaler::unscale`'s rounding); 0: none.
    prescale: u64,
}

/// Reduction modes (`MODE_*`), as `grad_clip_segment_norms` takes them.
const MODE_INF: u32 = 0;
const MODE_ABS: u32 = 1;
const MODE_SQ: u32 = 2;
const MODE_POW: u32 = 3;

impl NormPlan {
    pub(crate) fn new(norm_type: NormType, set: &GradientSet) -> Self {
        let (kernel, p) = match norm_type.canonical() {
            NormType::Inf => {
                return Self {
                    kernel: Kernel::ReduceInf,
                    p: f64::INFINITY,
                    rescue: false,
                    prescale: 0,
                }
            }
            NormType::L1 => (Kernel::ReduceAbs, 1.0),
            NormType::L2 => (Kernel::ReduceSq, 2.0),
            NormType::P(p) => (Kernel::ReducePow, p),
        };
        Self {
            kernel,
            p,
            rescue: set.powers_may_leave_f64_range(p),
            prescale: 0,
        }
    }

    /// The same reduction over the gradients unscaled as they are read by the `f32` `inv_scale` at
    /// device address `inv_scale` (GradScaler's one-read path: the norm and the non-finite flag of
    /// the unscaled gradients, which are not written), or as they are when `None`.
    pub(crate) fn prescaled(self, inv_scale: Option<u64>) -> Self {
        Self {
            prescale: inv_scale.unwrap_or(0),
            ..self
        }
    }

    /// The reduction over the `part` of the table at `table`: one launch, and the rescue launch
    /// (`grad_clip_reduce_pow`, pass 1, a no-op unless pass 0 asks for it) when the plan may need
    /// it. Writes the norm to `out` (f64 when `out_f64`, else f32) and the coefficient
    /// `min(1, max_norm / (norm + eps))` to the scratch; with `partials`, also every chunk's
    /// partial (for [`segment_norms`](Self::segment_norms)).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn reduce(
        &self,
        table: u64,
        part: Part,
        scratch: u64,
        out: u64,
        out_f64: bool,
        max_norm: f64,
        eps: f64,
        partials: Option<u64>,
    ) -> Vec<Launch> {
        let args = |pass: u32| {
            vec![
                Arg::Ptr(part.segments_ptr(table)),
                Arg::U32(part.segments),
                Arg::U64(part.chunks),
                Arg::Ptr(scratch),
                Arg::Ptr(out),
                Arg::U32(out_f64 as u32),
                Arg::F64(self.p),
                Arg::U32(pass),
                Arg::U32(self.rescue as u32),
                Arg::F64(max_norm),
                Arg::F64(eps),
                Arg::Ptr(partials.unwrap_or(0)),
                Arg::Ptr(self.prescale),
            ]
        };
        let mut launches = vec![Launch {
            kernel: self.kernel,
            grid: Grid::Warps(part.chunks),
            args: args(0),
        }];
        if self.rescue {
            launches.push(Launch {
                kernel: Kernel::ReducePow,
                grid: Grid::Warps(part.chunks),
                args: args(1),
            });
        }
        launches
    }

    /// Per-segment norms (as `f32`, to `out[segment]`) from the chunk partials that
    /// [`reduce`](Self::reduce) stored. Only for plans without the rescue pass.
    pub(crate) fn segment_norms(&self, table: u64, part: Part, partials: u64, out: u64) -> Launch {
        debug_assert!(!self.rescue, "segment norms are not rescued");
        let mode = match self.kernel {
            Kernel::ReduceInf => MODE_INF,
            Kernel::ReduceAbs => MODE_ABS,
            Kernel::ReduceSq => MODE_SQ,
            _ => MODE_POW,
        };
        Launch {
            kernel: Kernel::SegmentNorms,
            grid: Grid::Warps(part.segments as u64),
            args: vec![
                Arg::Ptr(part.segments_ptr(table)),
                Arg::U32(part.segments),
                Arg::U64(part.chunks),
                Arg::Ptr(partials),
                Arg::Ptr(out),
                Arg::U32(mode),
                Arg::F64(self.p),
            ],
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The element-wise passes.

/// What `grad_clip_apply` does to each element (`OP_*`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum ElementOp {
    /// Multiply by the coefficient (in `f64`, rounded once), unless it is `>= 1`.
    Scale(Coefficient),
    /// Clamp into `[-v, v]`, with the bound rounded towards zero in each dtype.
    Clamp(f64),
}

/// Where the scale kernel takes its coefficient from (`COEF_*`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Coefficient {
    /// `Scratch::coefficient`, written by the reduction earlier on the stream (the scratch's
    /// address).
    Scratch(u64),
    /// That of a norm in device memory (`clip_grads_with_norm_`).
    Norm(NormAt),
}

/// A 0-d norm of dtype code `dtype` at device address `ptr`, and the clip it calls for: the
/// coefficient `min(1, max_norm / (norm + eps))` (a negative or NaN norm gives NaN).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct NormAt {
    pub(crate) ptr: u64,
    pub(crate) dtype: u64,
    pub(crate) max_norm: f64,
    pub(crate) eps: f64,
}

impl NormAt {
    /// The kernels' code for reading it (`COEF_NORM_F32 = 1`, F64 = 2, F16 = 3, BF16 = 4: one
    /// more than the dtype code).
    fn kind(self) -> u32 {
        1 + self.dtype as u32
    }
}

impl ElementOp {
    /// The kernel arguments after the table: `op, coef_src, coef_kind, max_norm, eps, bounds`.
    fn args(self) -> [Arg; 6] {
        const OP_SCALE: u32 = 0;
        const OP_CLAMP: u32 = 1;
        const COEF_SCRATCH: u32 = 0;
        let (op, ptr, kind, max_norm, eps, bounds) = match self {
            ElementOp::Scale(Coefficient::Scratch(ptr)) => {
                (OP_SCALE, ptr, COEF_SCRATCH, 0.0, 0.0, [0.0; 4])
            }
            ElementOp::Scale(Coefficient::Norm(norm)) => (
                OP_SCALE,
                norm.ptr,
                norm.kind(),
                norm.max_norm,
                norm.eps,
                [0.0; 4],
            ),
            ElementOp::Clamp(v) => (OP_CLAMP, 0, COEF_SCRATCH, 0.0, 0.0, clamp_bounds(v)),
        };
        [
            Arg::U32(op),
            Arg::Ptr(ptr),
            Arg::U32(kind),
            Arg::F64(max_norm),
            Arg::F64(eps),
            Arg::F64x4(bounds),
        ]
    }

    /// `grad_clip_apply` over the `part` of the table at `table`; nothing when it is empty.
    pub(crate) fn apply(self, table: u64, part: Part) -> Option<Launch> {
        if part.segments == 0 {
            return None;
        }
        let mut args = vec![
            Arg::Ptr(part.segments_ptr(table)),
            Arg::U32(part.segments),
            Arg::U64(part.chunks),
        ];
        args.extend(self.args());
        Some(Launch {
            kernel: Kernel::Apply,
            grid: Grid::Warps(part.chunks),
            args,
        })
    }

    /// The pass over every gradient: `grad_clip_apply` over the `part` of the table at `table`,
    /// then `grad_clip_apply_strided` over each non-contiguous view of `strided`.
    pub(crate) fn apply_all(
        self,
        table: u64,
        part: Part,
        strided: &[StridedTarget],
    ) -> impl Iterator<Item = Launch> + '_ {
        self.apply(table, part)
            .into_iter()
            .chain(strided.iter().map(move |target| self.apply_strided(target)))
    }

    /// `grad_clip_apply_strided` over one non-contiguous view.
    pub(crate) fn apply_strided(self, target: &StridedTarget) -> Launch {
        let mut args = vec![
            Arg::U64(target.ptr),
            Arg::U32(target.dtype as u32),
            Arg::U64(target.elements),
            Arg::U32(target.rank),
            Arg::U64x16(target.view),
        ];
        args.extend(self.args());
        Launch {
            kernel: Kernel::ApplyStrided,
            grid: Grid::Threads(target.elements),
            args,
        }
    }
}

/// The clamp bound for each dtype code, rounded towards zero in that dtype as the CPU rounds it,
/// as exact `f64` values.
fn clamp_bounds(v: f64) -> [f64; 4] {
    [
        round_toward_zero::<f32>(v) as f64,
        v,
        round_toward_zero::<f16>(v).to_f64(),
        round_toward_zero::<bf16>(v).to_f64(),
    ]
}

// ---------------------------------------------------------------------------------------------
// The fused optimizer step.

/// Where `grad_clip_fused_step` takes its verdict on the gradients from (`VERDICT_*`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Verdict {
    /// No reduction ran: nothing clipped, nothing non-finite.
    None,
    /// The coefficient and non-finite flag the reduction left in the scratch (the kernel's
    /// `scratch` argument).
    Scratch,
    /// A norm in device memory: its coefficient, non-finite when the norm is.
    Norm(NormAt),
}

/// What the step does to each gradient as it reads it (`TRANSFORM_*`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Transform {
    None,
    /// By the verdict's coefficient, when it is below 1.
    Scale,
    /// Into `[-v, v]` (the verdict is the largest `|g|`, to count clipped steps).
    Clamp(f64),
    /// Each unit by its own coefficient, as `grad_clip_agc` stored them: the device address of the
    /// table's AGC units (`AgcUnits`, see `kernels::agc`); the verdict is the scratch's.
    Agc(u64),
}

/// `grad_clip_fused_step` over the update `part` of the table at `table`. With `prescale`
/// (GradScaler's one-read path: the device address of the `f32` `inv_scale`), each gradient
/// element is unscaled as it is read and written back, on a skipped step too.
#[allow(clippy::too_many_arguments)]
pub(crate) fn fused_step(
    table: u64,
    part: Part,
    rule: Rule,
    transform: Transform,
    verdict: Verdict,
    skip_nonfinite: bool,
    scratch: u64,
    control: u64,
    prescale: Option<u64>,
) -> Launch {
    const RULE_ADAMW: u32 = 0;
    const RULE_SGD: u32 = 1;
    const RULE_SGD_PLAIN: u32 = 2;
    let (code, params) = match rule {
        Rule::AdamW {
            lr,
            beta1,
            beta2,
            eps,
            weight_decay,
        } => (
            RULE_ADAMW,
            [lr, beta1, beta2, eps, weight_decay, 0.0, 0.0, 0.0],
        ),
        Rule::Sgd {
            lr,
            momentum,
            dampening,
            weight_decay,
            nesterov,
        } => {
            let code = if rule.is_plain_sgd() {
                RULE_SGD_PLAIN
            } else {
                RULE_SGD
            };
            let nesterov = if nesterov { 1.0 } else { 0.0 };
            (
                code,
                [
                    lr,
                    0.0,
                    0.0,
                    0.0,
                    weight_decay,
                    momentum,
                    dampening,
                    nesterov,
                ],
            )
        }
    };
    let (transform_code, clamp) = match transform {
        Transform::None => (0, None),
        Transform::Scale => (1, None),
        Transform::Clamp(v) => (2, Some(v)),
        Transform::Agc(_) => (3, None),
    };
    let (verdict_code, src, kind, max_norm, eps) = match verdict {
        Verdict::None => (0, 0, 0, f64::INFINITY, 0.0),
        Verdict::Scratch => (1, 0, 0, f64::INFINITY, 0.0),
        Verdict::Norm(norm) => (2, norm.ptr, norm.kind(), norm.max_norm, norm.eps),
    };
    // AGC reads its units where the verdict would read a norm (its verdict is the scratch's).
    let src = match transform {
        Transform::Agc(units) => units,
        _ => src,
    };
    let (max_norm, bounds) = match clamp {
        Some(v) => (v, clamp_bounds(v)),
        None => (max_norm, [0.0; 4]),
    };
    Launch {
        kernel: Kernel::FusedStep,
        grid: Grid::Warps(part.chunks),
        args: vec![
            Arg::Ptr(part.segments_ptr(table)),
            Arg::U32(part.segments),
            Arg::U64(part.chunks),
            Arg::U32(code),
            Arg::F64x8(params),
            Arg::U32(transform_code),
            Arg::U32(verdict_code),
            Arg::Ptr(src),
            Arg::U32(kind),
            Arg::F64(max_norm),
            Arg::F64(eps),
            Arg::F64x4(bounds),
            Arg::U32(skip_nonfinite as u32),
            Arg::Ptr(scratch),
            Arg::Ptr(control),
            Arg::Ptr(prescale.unwrap_or(0)),
        ],
    }
}

// ---------------------------------------------------------------------------------------------
// Policies: single-thread kernels between the reduction and the pass that scales.

/// `grad_clip_zclip`: the ZClip step for the 0-d norm at `norm` (its `dtype`; `max_norm` and
/// `eps` unused), reading the statistics (`words` F64 words) at `state_in` and writing the new
/// ones to `state_out`; the coefficient goes to the scratch.
pub(crate) fn zclip(
    state_in: u64,
    state_out: u64,
    words: usize,
    norm: NormAt,
    scratch: u64,
    params: &ZClipParams,
) -> Launch {
    Launch {
        kernel: Kernel::ZClip,
        grid: Grid::Threads(1),
        args: vec![
            Arg::Ptr(state_in),
            Arg::Ptr(state_out),
            Arg::U32(words as u32),
            Arg::Ptr(norm.ptr),
            Arg::U32(norm.kind()),
            Arg::Ptr(scratch),
            Arg::F64(params.alpha),
            Arg::F64(params.z_threshold),
            Arg::U32(params.mean_mode as u32),
            Arg::F64(params.max_grad_norm),
        ],
    }
}

// ---------------------------------------------------------------------------------------------
// Adaptive gradient clipping.

/// `grad_clip_agc` over `segments` `AgcSegment`s at `segs` holding `units` units in all: each
/// unit's clip (in place for the segments marked `write`), its coefficient to `coefs` (0: not
/// stored), the global L2 norm to `out` (f64 when `out_f64`), 1 or 0 to the f32 at `clipped` (0:
/// not stored), and the verdict to the scratch.
#[allow(clippy::too_many_arguments)]
pub(crate) fn agc(
    segs: u64,
    segments: u32,
    units: u64,
    clipping: f64,
    eps: f64,
    scratch: u64,
    out: u64,
    out_f64: bool,
    coefs: u64,
    clipped: u64,
) -> Launch {
    Launch {
        kernel: Kernel::Agc,
        grid: Grid::Warps(units),
        args: vec![
            Arg::Ptr(segs),
            Arg::U32(segments),
            Arg::U64(units),
            Arg::F64(clipping),
            Arg::F64(eps),
            Arg::Ptr(scratch),
            Arg::Ptr(out),
            Arg::U32(out_f64 as u32),
            Arg::Ptr(coefs),
            Arg::Ptr(clipped),
        ],
    }
}

/// `grad_clip_agc_strided` over one non-contiguous gradient of units of `unit_len` elements, their
/// coefficients at `coefs` (the var's first unit).
pub(crate) fn agc_strided(target: &StridedTarget, unit_len: u64, coefs: u64) -> Launch {
    Launch {
        kernel: Kernel::AgcStrided,
        grid: Grid::Threads(target.elements),
        args: vec![
            Arg::U64(target.ptr),
            Arg::U32(target.dtype as u32),
            Arg::U64(target.elements),
            Arg::U32(target.rank),
            Arg::U64x16(target.view),
            Arg::U64(unit_len),
            Arg::Ptr(coefs),
        ],
    }
}

// ---------------------------------------------------------------------------------------------
// Gradient accumulation.

/// `grad_clip_accumulate` over the pair `part` of the table at `table` (`push_pairs`), with the
/// operation's code (`ACC_*`) and scale; nothing when the part is empty.
pub(crate) fn accumulate(table: u64, part: Part, op: AccumulateOp) -> Option<Launch> {
    if part.segments == 0 {
        return None;
    }
    let (code, alpha) = match op {
        AccumulateOp::Add => (0, 1.0),
        AccumulateOp::AddScaled(alpha) => (1, alpha),
        AccumulateOp::Round => (2, 1.0),
        AccumulateOp::Zero => (3, 0.0),
    };
    Some(Launch {
        kernel: Kernel::Accumulate,
        grid: Grid::Warps(part.chunks),
        args: vec![
            Arg::Ptr(part.segments_ptr(table)),
            Arg::U32(part.segments),
            Arg::U64(part.chunks),
            Arg::U32(code),
            Arg::F64(alpha),
        ],
    })
}
