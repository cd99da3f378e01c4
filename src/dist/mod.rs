//! The global norm across processes: every rank passes the gradients it owns, and every rank gets
//! the norm of all of them, bitwise the same on every rank.
//!
//! # How
//! The norm is an exact sum ([`ExactSum`]): each rank reduces its own gradients exactly as one
//! process would (same work items, same per-item `f64` partials), into a fixed-point accumulator
//! of 68 digits of 32 bits, each kept in a `u64`. After carry propagation every digit is below
//! 2^32, so the word-by-word sum over up to `u32::MAX` ranks cannot overflow a word: one
//! all-reduce (sum) of 73 words (584 bytes: the digits, the inf and NaN flags, and a three-word
//! header) gives every rank the accumulator of the union, which is rounded once as in one process.
//! The `Inf` norm goes through the max collective (the bits of a non-negative `f64` order like the
//! `u64`s they are, and NaN is sent as the positive quiet NaN, above `+inf`). When the sum of
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
//! (for [`NcclGroup`], a copy of 584 bytes to the device and back). The rescue pass, when it runs,
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
//! # Header
//! Each buffer ends with three words: this rank's count of F64 gradients, of other gradients, and
//! whether it failed before the collective. The counts make the returned dtype (`F64` only when
//! every gradient of every rank is `F64`) and the rescue decision those of one process; the
//! failure word lets a rank whose own gradients were refused (wrong device, broadcast view, …)
//! still take part, so that the other ranks fail with it instead of waiting forever.

pub(crate) mod local;
#[cfg(feature = "mpi")]
mod mpi;
#[cfg(feature = "nccl")]
pub(crate) mod nccl;

use candle_core::{backprop::GradStore, bail, DType, Device, Result, Tensor, Var};

use crate::dispatch;
use crate::dispatch::norm::DeviceReduction;
use crate::ops::clip::{clip_coefficient, needs_scaling, nonfinite_error, ClipSettings};
use crate::ops::exact_sum::{ExactSum, WORDS};
use crate::ops::gradients::GradientSet;
use crate::ops::norm::{norm_of_reduction, Combine};
use crate::ops::norm_type::NormType;

/// A group of processes (or threads) that compute one global norm together: the two collectives
/// the norm needs, on a buffer of a few hundred bytes.
///
/// Implemented for the `mpi` crate's communicators (feature `mpi`), for cudarc's NCCL
/// communicator (feature `nccl`), and by [`LocalGroup`] for threads of one process. Every rank
/// must make the same calls in the same order with buffers of the same length, as with any
/// collective; the norm functions of this crate do so whenever every rank calls them with the
/// same settings.
///
/// ```
/// use candle_grad_clip::{LocalGroup, ProcessGroup};
/// # fn main() -> candle_core::Result<()> {
/// let ranks = LocalGroup::new(3)?;
/// let sums = std::thread::scope(|s| {
///     let handles: Vec<_> = ranks
///         .iter()
///         .map(|g| {
///             s.spawn(move || -> candle_core::Result<Vec<u64>> {
///                 let mut words = [g.rank() as u64 + 1, 10];
///                 g.all_reduce_sum_u64(&mut words)?;
///                 Ok(words.to_vec())
///             })
///         })
///         .collect();
///     handles.into_iter().map(|h| h.join().unwrap()).collect::<Vec<_>>()
/// });
/// for words in sums {
///     assert_eq!(words?, [6, 30]);
/// }
/// # Ok(()) }
/// ```
pub trait ProcessGroup {
    /// This process's index in the group, `0..world_size()`.
    fn rank(&self) -> usize;
    /// The number of processes in the group.
    fn world_size(&self) -> usize;
    /// Replaces `words` on every rank with their element-wise sum over the ranks (wrapping is
    /// the caller's concern: the norm never overflows).
    fn all_reduce_sum_u64(&self, words: &mut [u64]) -> Result<()>;
    /// Replaces `words` on every rank with their element-wise maximum over the ranks.
    fn all_reduce_max_u64(&self, words: &mut [u64]) -> Result<()>;
    /// The device of the gradients this group reduces: the CPU (the default; MPI, [`LocalGroup`])
    /// or the CUDA device of an NCCL communicator. A rank whose gradients live elsewhere fails
    /// before sending them; a rank with no gradient gets its norm on this device.
    fn device(&self) -> Device {
        Device::Cpu
    }
}

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
/// One all-reduce of 584 bytes (`Inf`: the max collective, 32 bytes); two more when powers leave
/// the `f64` range. Gradients must be on [`ProcessGroup::device`]. On a kernel device the local
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
    norm_type.validate()?;
    let local = GradientSet::collect(vars, grads)
        .and_then(|set| check_device("total_norm_across", &set, group).map(|()| set));
    let norm = norm_across("total_norm_across", local, norm_type, group)?;
    norm.tensor()
}

/// The norm across ranks of a set of gradients collected by an optimizer: its value (unrounded)
/// and the tensor to report (in the dtype and on the device of [`total_norm_across`]). `local`
/// is the set, or the error that refused this rank's gradients: the rank still takes part, so
/// every rank fails with it.
pub(crate) fn set_norm_across(
    caller: &'static str,
    local: Result<GradientSet>,
    norm_type: NormType,
    group: &dyn ProcessGroup,
) -> Result<(f64, Tensor)> {
    norm_type.validate()?;
    let local = local.and_then(|set| check_device(caller, &set, group).map(|()| set));
    let norm = norm_across(caller, local, norm_type, group)?;
    Ok((norm.value, norm.tensor()?))
}

/// `ClipGradNorm::clip_replicated_across_` and `clip_across_` (with no replicated var): the norm
/// counts `owned` and, on rank 0 only, `replicated`; both are scaled.
pub(crate) fn clip_across(
    owned: &[Var],
    replicated: &[Var],
    grads: &GradStore,
    settings: ClipSettings,
    group: &dyn ProcessGroup,
) -> Result<Tensor> {
    const CALLER: &str = "clip_grad_norm_across";
    // Everything that can be refused locally is, before any communication.
    let local = (|| {
        let counted: Vec<Var> = if group.rank() == 0 {
            owned.iter().chain(replicated).cloned().collect()
        } else {
            owned.to_vec()
        };
        let norm_set = GradientSet::collect(&counted, grads)?;
        let all: Vec<Var> = owned.iter().chain(replicated).cloned().collect();
        let write_set = GradientSet::collect(&all, grads)?;
        check_device(CALLER, &write_set, group)?;
        // Gradients that cannot be written are refused whether or not this call clips.
        write_set.storage_groups()?;
        Ok((norm_set, write_set))
    })();
    let (local, write_set) = match local {
        Ok((norm_set, write_set)) => (Ok(norm_set), Some(write_set)),
        Err(e) => (Err(e), None),
    };
    let norm = norm_across(CALLER, local, settings.norm_type, group)?;
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
    let coefficient = clip_coefficient(value, settings.max_norm, settings.eps);
    if let Some(write_set) = write_set {
        if needs_scaling(coefficient) && !write_set.grads().is_empty() {
            // The one-process scale pass of the gradients' device (the CPU's, or the kernels'),
            // with the norm unrounded (F64): the coefficient is the one computed above.
            let norm = Tensor::new(value, write_set.device())?;
            dispatch::clip::scale_with_norm(&write_set, settings.max_norm, settings.eps, &norm)?;
        }
    }
    norm.tensor()
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
fn check_device(caller: &str, set: &GradientSet, group: &dyn ProcessGroup) -> Result<()> {
    if set.grads().is_empty() {
        return Ok(());
    }
    let ours = set.device();
    let theirs = group.device();
    if !ours.same_device(&theirs) {
        bail!(
            "{caller}: rank {} of {}: the gradients are on {:?} but the process group reduces gradients on {:?}",
            group.rank(),
            group.world_size(),
            ours.location(),
            theirs.location()
        )
    }
    Ok(())
}

/// The norm over every rank. `local` is this rank's validated gradients, or the error that refused
/// them: then the rank still takes part in the first collective (with its failure word set), so
/// that every rank returns an error instead of some waiting forever, and returns its own error.
fn norm_across(
    caller: &'static str,
    local: Result<GradientSet>,
    norm_type: NormType,
    group: &dyn ProcessGroup,
) -> Result<GlobalNorm> {
    let world = group.world_size();
    if world == 0 || world > u32::MAX as usize || group.rank() >= world {
        bail!(
            "{caller}: a process group of {world} ranks with this rank {}: the norm needs 1 to 2^32 - 1 ranks and a rank below their number",
            group.rank()
        )
    }
    let (set, failure) = match local {
        Ok(set) => (set, None),
        Err(e) => (GradientSet::from_grads(Vec::new())?, Some(e)),
    };
    let header = Header {
        f64_grads: set
            .grads()
            .iter()
            .filter(|g| g.dtype() == DType::F64)
            .count() as u64,
        other_grads: set
            .grads()
            .iter()
            .filter(|g| g.dtype() != DType::F64)
            .count() as u64,
        failed: failure.is_some() as u64,
    };
    let mut combine = Across {
        caller,
        group,
        local: header,
        global: None,
    };
    let value = norm_of_reduction(&DeviceReduction { set: &set }, norm_type, &mut combine);
    if let Some(e) = failure {
        return Err(e);
    }
    let value = value?;
    let global = combine.global.unwrap_or(header);
    let dtype = if global.f64_grads > 0 && global.other_grads == 0 {
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

/// The three words at the end of every buffer (see the module documentation).
#[derive(Debug, Clone, Copy)]
struct Header {
    f64_grads: u64,
    other_grads: u64,
    failed: u64,
}

const HEADER_WORDS: usize = 3;

impl Header {
    fn words(self) -> [u64; HEADER_WORDS] {
        [self.f64_grads, self.other_grads, self.failed]
    }
}

/// Which collective.
#[derive(Debug, Clone, Copy)]
enum Collective {
    Sum,
    Max,
}

/// The partial results combined through `group`'s collectives.
struct Across<'a> {
    caller: &'static str,
    group: &'a dyn ProcessGroup,
    local: Header,
    /// The header combined over the ranks, once a collective ran.
    global: Option<Header>,
}

impl Across<'_> {
    /// All-reduces `payload` followed by this rank's header; fails on every rank when one failed.
    fn exchange<const N: usize>(&mut self, payload: [u64; N], op: Collective) -> Result<[u64; N]> {
        let mut words = Vec::with_capacity(N + HEADER_WORDS);
        words.extend_from_slice(&payload);
        words.extend_from_slice(&self.local.words());
        let (name, result) = match op {
            Collective::Sum => (
                "all_reduce_sum_u64",
                self.group.all_reduce_sum_u64(&mut words),
            ),
            Collective::Max => (
                "all_reduce_max_u64",
                self.group.all_reduce_max_u64(&mut words),
            ),
        };
        if let Err(e) = result {
            bail!(
                "{}: rank {} of {}: {name} of {} words failed: {e}",
                self.caller,
                self.group.rank(),
                self.group.world_size(),
                words.len()
            )
        }
        if words.len() != N + HEADER_WORDS {
            bail!(
                "{}: rank {}: {name} returned {} words, expected {}",
                self.caller,
                self.group.rank(),
                words.len(),
                N + HEADER_WORDS
            )
        }
        let global = Header {
            f64_grads: words[N],
            other_grads: words[N + 1],
            failed: words[N + 2],
        };
        if global.failed != 0 {
            // (A rank that failed itself returns its own error instead of this one.)
            let how_many = match op {
                Collective::Sum => format!("{} of {}", global.failed, self.group.world_size()),
                Collective::Max => format!("at least one of {}", self.group.world_size()),
            };
            bail!(
                "{}: rank {}: {how_many} ranks refused their gradients before {name} (see their errors); no gradient was modified",
                self.caller,
                self.group.rank()
            )
        }
        self.global = Some(global);
        let mut out = [0u64; N];
        out.copy_from_slice(&words[..N]);
        Ok(out)
    }
}

/// The bits of a non-negative `f64` or NaN, ordered as the values: NaN as the positive quiet NaN,
/// which is above `+inf`.
fn ordered_bits(x: f64) -> u64 {
    if x.is_nan() {
        f64::NAN.to_bits() & !(1 << 63)
    } else {
        debug_assert!(x >= 0.0);
        x.to_bits()
    }
}

impl Combine for Across<'_> {
    fn max_abs(&mut self, local: f64) -> Result<f64> {
        let [bits] = self.exchange([ordered_bits(local)], Collective::Max)?;
        Ok(f64::from_bits(bits))
    }

    fn sum(&mut self, local: ExactSum) -> Result<ExactSum> {
        let words: [u64; WORDS] = self.exchange(local.to_words(), Collective::Sum)?;
        Ok(ExactSum::from_words(&words))
    }

    fn powers_may_leave_f64_range(&self, p: f64) -> bool {
        let global = self.global.unwrap_or(self.local);
        p > 6.0 || global.f64_grads > 0
    }
}
