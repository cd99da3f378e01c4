//! The global norm across processes: every rank passes the gradients it owns, and every rank gets
//! the norm of all of them, bitwise the same on every rank.
//!
//! # How
//! The norm is an exact sum ([`ExactSum`]): each rank reduces its own gradients exactly as one
//! process would (same work items, same per-item `f64` partials), into a fixed-point accumulator
//! of 68 digits of 32 bits, each kept in a `u64`. After carry propagation every digit is below
//! 2^32, so the word-by-word sum over up to `u32::MAX` ranks cannot overflow a word: one
//! all-reduce (sum) of 87 words (696 bytes: the digits, the inf and NaN flags, and a 17-word
//! header) gives every rank the accumulator of the union, which is rounded once as in one process.
//! The `Inf` norm goes through the max collective (the bits of a non-negative `f64` order like the
//! `u64`s they are, and NaN is sent as the positive quiet NaN, above `+inf`), padded to the same
//! length: every collective of every call has the same length. When the sum of
//! powers may have left the `f64` range (F64 gradients on any rank, or `p > 6`), the rescue pass
//! of the one-process norm runs across the ranks too: a max collective for the global largest
//! `|g|`, then a second sum of the powers divided by it.
//!
//! # Devices
//! Each rank reduces its gradients where they live, as one process would. On a kernel device
//! (CUDA, or the CPU under an active [`KernelEmulation`](crate::KernelEmulation)) the reduction
//! kernel runs as in one process and its chunk partials (one `f64` per 4096 elements) are read
//! back and added exactly on the host: the very numbers the kernel adds into its own
//! superaccumulator, so the first sum is the device's. This costs one small device-to-host read
//! per norm (a host synchronisation); the digits then travel through the group's collectives
//! (for [`NcclGroup`], a copy of 696 bytes to the device and back). The rescue pass, when it runs,
//! divides by the global largest `|g|`, which no kernel does: it runs on the CPU, on host copies
//! of the gradients. The scale pass runs where the gradients are (the CUDA kernels for CUDA
//! gradients), with the coefficient of the global norm.
//!
//! # The bitwise condition
//! Every rank gets the same bits whatever the partition. They are also the bits of the
//! one-process call over the union of every rank's gradients, on the same kind of device
//! ([`total_norm`](crate::total_norm), [`ClipGradNorm::clip_`](crate::ClipGradNorm::clip_)),
//! whenever each unit of that call's reduction lies on one rank:
//! - on the CPU, a contiguous gradient is cut into work items of 2^15 elements counted from its
//!   first element, and a strided gradient is one item;
//! - on a kernel device, every gradient is cut into chunks of 4096 elements counted from its
//!   first element.
//!
//! So a partition that keeps whole gradients always qualifies; a gradient cut into contiguous
//! pieces (one var per piece) qualifies when every cut lies at a multiple of 2^15 elements (CPU)
//! or 4096 elements (kernels) from its first element. Two exceptions on kernel devices: when the
//! rescue pass runs (sums of powers of F64 gradients, or of `p > 6`, that overflow or nearly
//! underflow `f64`), its sum is made of CPU work items, not kernel chunks; and for `p` other than
//! 1, 2 and `inf` the root is taken on the host, whose `pow` may differ from the GPU's by an ulp
//! (not under the emulation, which uses the host's).
//!
//! # Header: ranks fail together and agree
//! Each buffer ends with a header (see `agreement`): this rank's count of F64 gradients and of
//! other gradients, whether it refused its call and why (a code), and a fingerprint of the
//! settings that must be equal on every rank (the call, norm type, `max_norm`, eps,
//! `error_if_nonfinite`, the clip and its parameters, `skip_nonfinite`, the optimizer, the
//! GradScaler's scale). The counts make the returned dtype (`F64` only when every gradient of
//! every rank is `F64`) and the rescue decision those of one process. Every check that can refuse
//! a rank's call runs before the first collective, and a refused rank (its settings, its
//! gradients, their device, a failing reduction, also in the rescue pass between two
//! collectives) still takes part with its refusal in the header, so that the other ranks fail
//! with it instead of waiting forever. When the header says a rank refused or the fingerprints
//! differ, two small follow-up collectives (only then) tell every rank which rank refused and
//! why, or which rank's settings differ from rank 0's and in which field, and every rank returns
//! an error that names them; nothing is modified on any rank. When all is well, the header costs
//! no collective: it travels in the norm's own buffer.

mod across;
pub(crate) mod agreement;
mod group;
pub(crate) mod local;
#[cfg(feature = "mpi")]
mod mpi;
#[cfg(feature = "nccl")]
pub(crate) mod nccl;

use candle_core::{backprop::GradStore, bail, DType, Device, Result, Tensor, Var};

use crate::dispatch;
use crate::dispatch::norm::DeviceReduction;
use crate::ops::clip::{clip_coefficient, needs_scaling, nonfinite_error, ClipSettings};
use crate::ops::fault;
use crate::ops::gradients::GradientSet;
use crate::ops::norm::norm_of_reduction;
use crate::ops::norm_type::NormType;
use across::{Across, Collective};
use agreement::{Agreement, Call, Field, RankError, Refusal};
pub use group::ProcessGroup;

/// The norm of the gradients of `vars` on every rank of `group` together, without modifying them:
/// every rank passes the vars it owns and gets the same 0-d tensor (bitwise), the norm of the
/// union. See [`total_norm`](crate::total_norm) for the dtype (`F64` when every gradient of every
/// rank is `F64`, else `F32`); the tensor lives on the gradients' device, or on
/// [`ProcessGroup::device`] for a rank with no gradient.
///
/// Every rank gets the same bits, whatever the partition. They are the bits of the one-process
/// [`total_norm`](crate::total_norm) over the union (on the same kind of device) whenever each
/// unit of its reduction lies on one rank: CPU work items are 2^15 elements of a contiguous
/// gradient counted from its first element (a strided gradient is one item), kernel chunks
/// (CUDA, the emulation) 4096 elements. So whole tensors always qualify, and so do pieces cut at
/// such multiples; on kernel devices, except when the rescue pass for sums of powers leaving the
/// `f64` range runs (it runs on the CPU) and, on a GPU, for `p` other than 1, 2 and `inf` (the
/// root is taken on the host). A parameter replicated on several ranks must be passed on one of them only
/// (or see [`ClipGradNorm::clip_replicated_across_`](crate::ClipGradNorm::clip_replicated_across_)).
///
/// One all-reduce of 696 bytes (`Inf`: the max collective, of the same length); two more when
/// powers leave the `f64` range. Every rank must pass the same `norm_type`: it travels as a
/// fingerprint, and ranks that differ all fail (see the module documentation); a rank refused
/// (a bad norm type, its gradients, their device) makes every rank fail, naming it. Gradients must be on [`ProcessGroup::device`]. On a kernel device the local
/// sums are the kernels' chunk partials, read back (a host synchronisation) and added exactly.
///
/// ```
/// use candle_core::{Device, Tensor, Var, backprop::GradStore};
/// use candle_grad_clip::{total_norm_across, LocalGroup, NormType};
/// # fn main() -> candle_core::Result<()> {
/// // Two ranks (threads here) own one var each; the global L2 norm of [3, 4] is 5 on both.
/// let norms = std::thread::scope(|s| {
///     let handles: Vec<_> = LocalGroup::new(2)?
///         .into_iter()
///         .zip([3f32, 4.])
///         .map(|(group, g)| {
///             s.spawn(move || -> candle_core::Result<f32> {
///                 let w = Var::new(&[0f32], &Device::Cpu)?;
///                 let mut grads = GradStore::default();
///                 grads.insert(&w, Tensor::new(&[g], &Device::Cpu)?);
///                 total_norm_across(&[w], &grads, NormType::L2, &group)?.to_scalar::<f32>()
///             })
///         })
///         .collect();
///     handles.into_iter().map(|h| h.join().unwrap()).collect::<candle_core::Result<Vec<_>>>()
/// })?;
/// assert_eq!(norms, [5.0, 5.0]);
/// # Ok(()) }
/// ```
pub fn total_norm_across(
    vars: &[Var],
    grads: &GradStore,
    norm_type: NormType,
    group: &dyn ProcessGroup,
) -> Result<Tensor> {
    let agreement = Agreement::new(Call::TotalNorm).set_norm_type(norm_type);
    vars_norm_across(
        "total_norm_across",
        vars,
        grads,
        norm_type,
        agreement,
        None,
        group,
    )
}

/// [`total_norm_across`] for the optimizers: their `agreement`, and `prior`, an error that
/// refused this rank before the call (it still takes part, so that every rank fails with it).
pub(crate) fn vars_norm_across(
    caller: &'static str,
    vars: &[Var],
    grads: &GradStore,
    norm_type: NormType,
    agreement: Agreement,
    prior: Option<RankError>,
    group: &dyn ProcessGroup,
) -> Result<Tensor> {
    let local = match prior {
        Some(e) => Err(e),
        None => agreement::refuse(Refusal::Gradients, GradientSet::collect(vars, grads)),
    };
    set_norm_across(caller, local, norm_type, agreement, group).map(|(_, norm)| norm)
}

/// The norm across ranks of a set of gradients collected by an optimizer: its value (unrounded)
/// and the tensor to report (in the dtype and on the device of [`total_norm_across`]). `local`
/// is the set, or the error that refused this rank (its settings, its gradients, …): the rank
/// still takes part, so every rank fails with it.
pub(crate) fn set_norm_across(
    caller: &'static str,
    local: std::result::Result<GradientSet, RankError>,
    norm_type: NormType,
    agreement: Agreement,
    group: &dyn ProcessGroup,
) -> Result<(f64, Tensor)> {
    let local = agreement::refuse(Refusal::Settings, norm_type.validate())
        .and(local)
        .and_then(|set| check_device(caller, &set, group).map(|()| set));
    let norm = norm_across(caller, local, norm_type, agreement, group)?;
    Ok((norm.value, norm.tensor()?))
}

/// A collective that carries no norm, for a call across ranks that needs none (a fused step
/// without a clip or a skip): every rank learns whether another refused its call or disagrees,
/// and fails with it. A max collective of the norm's length.
pub(crate) fn agree_across(
    caller: &'static str,
    local: std::result::Result<(), RankError>,
    agreement: Agreement,
    group: &dyn ProcessGroup,
) -> Result<()> {
    max_across(caller, local.map(|()| [0u64; 0]), agreement, group).map(|_| ())
}

/// The element-wise maximum over the ranks of `local`'s words (`GradScaler`'s found-inf), with
/// the agreement and the refusals of [`agree_across`].
pub(crate) fn max_across<const N: usize>(
    caller: &'static str,
    local: std::result::Result<[u64; N], RankError>,
    agreement: Agreement,
    group: &dyn ProcessGroup,
) -> Result<[u64; N]> {
    check_world(caller, group)?;
    let mut across = Across::new(caller, group, (0, 0), None, agreement);
    across.exchange(local, Collective::Max)
}

/// `ClipGradNorm::clip_replicated_across_` and `clip_across_` (with no replicated var): the norm
/// counts `owned` and, on rank 0 only, `replicated`; both are scaled. `valid` is the check of the
/// settings, `prior` an error that refused this rank before the call: either still takes part in
/// the collective, so that every rank fails with it.
#[allow(clippy::too_many_arguments)]
pub(crate) fn clip_across(
    owned: &[Var],
    replicated: &[Var],
    grads: &GradStore,
    settings: ClipSettings,
    valid: Result<()>,
    agreement: Agreement,
    prior: Option<RankError>,
    group: &dyn ProcessGroup,
) -> Result<Tensor> {
    plan_clip_across(
        owned, replicated, grads, settings, valid, agreement, prior, group,
    )?
    .apply()
    // Past the collective: the other ranks scaled theirs; this rank's gradients may be partly
    // scaled, so its next collective through `group` fails on every rank.
    .inspect_err(|_| group.mark_out_of_step())
}

/// A clip across ranks past its collective: the global norm, and the scale pass still to run
/// (on this rank only: a failure there is this rank's alone).
pub(crate) struct ClipPlan {
    norm: GlobalNorm,
    write_set: Option<GradientSet>,
    settings: ClipSettings,
}

impl ClipPlan {
    /// Scales this rank's gradients by the global coefficient (when it is below 1) and returns
    /// the global norm.
    pub(crate) fn apply(self) -> Result<Tensor> {
        let settings = self.settings;
        let value = self.norm.value;
        let coefficient = clip_coefficient(value, settings.max_norm, settings.eps);
        if let Some(write_set) = self.write_set {
            if needs_scaling(coefficient) && !write_set.grads().is_empty() {
                // The one-process scale pass of the gradients' device (the CPU's, or the
                // kernels'), with the norm unrounded (F64): the coefficient is the one above.
                let norm = Tensor::new(value, write_set.device())?;
                fault::check("scale")?;
                dispatch::clip::scale_with_norm(
                    &write_set,
                    settings.max_norm,
                    settings.eps,
                    &norm,
                )?;
            }
        }
        self.norm.tensor()
    }
}

/// [`clip_across`] up to its collective (and `error_if_nonfinite`, which every rank decides
/// alike): everything that fails on every rank together.
#[allow(clippy::too_many_arguments)]
pub(crate) fn plan_clip_across(
    owned: &[Var],
    replicated: &[Var],
    grads: &GradStore,
    settings: ClipSettings,
    valid: Result<()>,
    agreement: Agreement,
    prior: Option<RankError>,
    group: &dyn ProcessGroup,
) -> Result<ClipPlan> {
    const CALLER: &str = "clip_grad_norm_across_";
    let agreement = agreement
        .set_norm_type(settings.norm_type)
        .set_f64(Field::MaxNorm, settings.max_norm)
        .set_f64(Field::Eps, settings.eps)
        .set_bool(Field::ErrorIfNonfinite, settings.error_if_nonfinite)
        .set(Field::Replicated, replicated.len() as u64);
    // Everything that can be refused locally is, before any communication.
    let local = (|| {
        if let Some(e) = prior {
            return Err(e);
        }
        agreement::refuse(Refusal::Settings, valid)?;
        let counted: Vec<Var> = if group.rank() == 0 {
            owned.iter().chain(replicated).cloned().collect()
        } else {
            owned.to_vec()
        };
        let norm_set =
            agreement::refuse(Refusal::Gradients, GradientSet::collect(&counted, grads))?;
        let all: Vec<Var> = owned.iter().chain(replicated).cloned().collect();
        let write_set = agreement::refuse(Refusal::Gradients, GradientSet::collect(&all, grads))?;
        check_device(CALLER, &write_set, group)?;
        // Gradients that cannot be written are refused whether or not this call clips.
        agreement::refuse(Refusal::Gradients, write_set.storage_groups())?;
        Ok((norm_set, write_set))
    })();
    let (local, write_set) = match local {
        Ok((norm_set, write_set)) => (Ok(norm_set), Some(write_set)),
        Err(e) => (Err(e), None),
    };
    let norm = norm_across(CALLER, local, settings.norm_type, agreement, group)?;
    let value = norm.value;
    // Finite as returned: an F32 norm tensor overflows above f32::MAX.
    let returned = if norm.dtype == DType::F64 {
        value
    } else {
        value as f32 as f64
    };
    if settings.error_if_nonfinite && !returned.is_finite() {
        return Err(nonfinite_error(returned, settings.norm_type));
    }
    Ok(ClipPlan {
        norm,
        write_set,
        settings,
    })
}

/// The global norm as a value, with where and how to return it.
struct GlobalNorm {
    value: f64,
    dtype: DType,
    device: Device,
}

impl GlobalNorm {
    fn tensor(&self) -> Result<Tensor> {
        match self.dtype {
            DType::F64 => Tensor::new(self.value, &self.device),
            _ => Tensor::new(self.value as f32, &self.device),
        }
    }
}

/// Gradients on another device than the group's are refused before any communication.
fn check_device(
    caller: &str,
    set: &GradientSet,
    group: &dyn ProcessGroup,
) -> std::result::Result<(), RankError> {
    if set.grads().is_empty() {
        return Ok(());
    }
    let ours = set.device();
    let theirs = group.device();
    if !ours.same_device(&theirs) {
        return Err(RankError::new(
            Refusal::Device,
            candle_core::Error::Msg(format!(
                "{caller}: rank {} of {}: the gradients are on {:?} but the process group reduces gradients on {:?}",
                group.rank(),
                group.world_size(),
                ours.location(),
                theirs.location()
            ))
            .bt(),
        ));
    }
    Ok(())
}

/// A group whose size or rank the norm cannot work with fails before any collective.
fn check_world(caller: &str, group: &dyn ProcessGroup) -> Result<()> {
    let world = group.world_size();
    if world == 0 || world > u32::MAX as usize || group.rank() >= world {
        bail!(
            "{caller}: a process group of {world} ranks with this rank {}: the norm needs 1 to 2^32 - 1 ranks and a rank below their number",
            group.rank()
        )
    }
    Ok(())
}

/// The norm over every rank. `local` is this rank's validated gradients, or the error that refused
/// this rank: then the rank still takes part in the first collective (with its failure word set),
/// so that every rank returns an error instead of some waiting forever, and returns its own error.
fn norm_across(
    caller: &'static str,
    local: std::result::Result<GradientSet, RankError>,
    norm_type: NormType,
    agreement: Agreement,
    group: &dyn ProcessGroup,
) -> Result<GlobalNorm> {
    check_world(caller, group)?;
    let (set, failure) = match local {
        Ok(set) => (set, None),
        Err(e) => (GradientSet::from_grads(Vec::new())?, Some(e)),
    };
    let f64_grads = set
        .grads()
        .iter()
        .filter(|g| g.dtype() == DType::F64)
        .count() as u64;
    let counts = (f64_grads, set.grads().len() as u64 - f64_grads);
    let mut combine = Across::new(caller, group, counts, failure, agreement);
    let value = norm_of_reduction(&DeviceReduction { set: &set }, norm_type, &mut combine)?;
    if let Some(e) = combine.failure.take() {
        // (Every exchange fails for a rank that failed: not reached.)
        return Err(e.error);
    }
    let (f64_grads, other_grads) = combine.global.unwrap_or(counts);
    let dtype = if f64_grads > 0 && other_grads == 0 {
        DType::F64
    } else {
        DType::F32
    };
    let device = if set.grads().is_empty() {
        group.device()
    } else {
        set.device().clone()
    };
    Ok(GlobalNorm {
        value,
        dtype,
        device,
    })
}
