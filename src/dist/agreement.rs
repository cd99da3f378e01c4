//! What travels in the header of every collective besides the norm: whether a rank refused its
//! call (and why, as a code), and a fingerprint of the settings that must be equal on every rank.
//! When either says something is wrong, two small follow-up collectives (only then) tell every
//! rank which rank refused and why, or which rank's settings differ from rank 0's and in what,
//! so that every rank returns an error that names them.
//!
//! # The header
//! Seventeen words after the payload of every collective (sum or max):
//!
//! | words | sum | max |
//! | --- | --- | --- |
//! | F64 gradients, other gradients | counts | whether any |
//! | failed | ranks that refused | whether one did |
//! | failure id | the one refusing rank's id (exact when one refused) | the lowest refusing rank's id |
//! | ranks | `world_size` (one per rank) | 1 |
//! | 4 fingerprint chunks `c` (16 bits each) | `Σ c` | `max c` |
//! | their squares `c²` | `Σ c²` | |
//! | their complements `0xFFFF − c` | | `0xFFFF − min c` |
//!
//! A failure id is `(u32::MAX − rank) << 32 | kind`: the max collective gives the lowest rank and
//! its kind. The fingerprints are all equal exactly when `n · Σ c² = (Σ c)²` for every chunk
//! (Cauchy–Schwarz, exact in `u128`: `Σ c² < 2^64` for up to `u32::MAX` ranks) after a sum, and
//! when `max c + (0xFFFF − min c) = 0xFFFF` after a max.

use candle_core::Result;

use crate::ops::norm_type::NormType;

/// Which public call a rank is making (the first field of every [`Agreement`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Call {
    TotalNorm = 1,
    ClipNorm = 2,
    ClippedStep = 3,
    FusedStep = 4,
    ScalerUnscale = 5,
}

const CALLS: [&str; 6] = [
    "none",
    "total_norm_across",
    "ClipGradNorm::clip_across_",
    "Clipped::step_across",
    "fused step_across",
    "GradScaler::unscale_across_",
];

/// The fields of an [`Agreement`], in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Field {
    Call = 0,
    WorldSize,
    Optimizer,
    Clip,
    NormType,
    P,
    MaxNorm,
    Eps,
    ErrorIfNonfinite,
    ClipParameter,
    ClipParameters,
    SkipNonfinite,
    MaxConsecutiveSkips,
    Replicated,
    Scale,
    ScalerSettings,
}

pub(crate) const FIELDS: usize = 16;

/// How a field's value is shown in an error.
#[derive(Clone, Copy)]
enum Show {
    Code(&'static [&'static str]),
    Float,
    Bool,
    Count,
    Hash,
}

const FIELD_INFO: [(&str, Show); FIELDS] = [
    ("call", Show::Code(&CALLS)),
    ("world size", Show::Count),
    (
        "optimizer",
        Show::Code(&["none", "FusedAdamW", "FusedSgd", "Clipped"]),
    ),
    (
        "clip setting",
        Show::Code(&["none", "Norm", "Value", "AutoClip", "ZClip", "Agc"]),
    ),
    ("norm type", Show::Code(&["none", "L1", "L2", "Inf", "P"])),
    ("p", Show::Float),
    ("max_norm", Show::Float),
    ("eps", Show::Float),
    ("error_if_nonfinite", Show::Bool),
    ("clip parameter", Show::Float),
    ("clip parameters", Show::Hash),
    ("skip_nonfinite", Show::Bool),
    ("max_consecutive_skips", Show::Count),
    ("replicated vars", Show::Count),
    ("GradScaler scale", Show::Float),
    ("GradScaler settings", Show::Hash),
];

/// The settings of a call that must be equal on every rank, as words; their fingerprint travels
/// in the header of every collective of the call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Agreement {
    pub(super) fields: [u64; FIELDS],
}

impl Agreement {
    pub(crate) fn new(call: Call) -> Self {
        let mut fields = [0; FIELDS];
        fields[Field::Call as usize] = call as u64;
        Self { fields }
    }

    pub(crate) fn set(mut self, field: Field, value: u64) -> Self {
        self.fields[field as usize] = value;
        self
    }

    pub(crate) fn set_f64(self, field: Field, value: f64) -> Self {
        self.set(field, value.to_bits())
    }

    pub(crate) fn set_bool(self, field: Field, value: bool) -> Self {
        self.set(field, value as u64)
    }

    /// The norm type (canonical: `P(2)` is `L2`) and its `p`.
    pub(crate) fn set_norm_type(self, norm_type: NormType) -> Self {
        let (code, p) = match norm_type.canonical() {
            NormType::L1 => (1, 0.0),
            NormType::L2 => (2, 0.0),
            NormType::Inf => (3, 0.0),
            NormType::P(p) => (4, p),
        };
        self.set(Field::NormType, code).set_f64(Field::P, p)
    }

    /// The agreement with this rank's view of the world size.
    pub(super) fn in_world(self, world: usize) -> Self {
        self.set(Field::WorldSize, world as u64)
    }

    /// A hash of the fields, the same on every rank for the same fields.
    pub(super) fn fingerprint(&self) -> u64 {
        hash_words(&self.fields)
    }

    /// The first field in which `self` differs from `other`.
    pub(super) fn first_difference(&self, other: &Agreement) -> Option<usize> {
        (0..FIELDS).find(|&i| self.fields[i] != other.fields[i])
    }
}

/// FNV-1a over the words' bytes: the fingerprint, and a field that holds several settings
/// (`ClipParameters`, `ScalerSettings`; an `f64` enters as its bits).
pub(crate) fn hash_words(words: &[u64]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for w in words {
        for b in w.to_le_bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// A field's value as an error shows it.
pub(super) fn show(field: usize, value: u64) -> String {
    match FIELD_INFO[field].1 {
        Show::Code(names) => names
            .get(value as usize)
            .map_or_else(|| format!("#{value}"), |n| n.to_string()),
        Show::Float => format!("{}", f64::from_bits(value)),
        Show::Bool => (value != 0).to_string(),
        Show::Count if value == u64::MAX => "none".to_string(),
        Show::Count => value.to_string(),
        Show::Hash => format!("#{value:016x}"),
    }
}

pub(super) fn field_name(field: usize) -> &'static str {
    FIELD_INFO[field].0
}

/// Why a rank refused its call before the collective (the kind travels as a code).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Invalid settings (a clip's, a norm type, the GradScaler's).
    Settings = 1,
    /// Invalid optimizer parameters (a learning rate, betas, …).
    Optimizer = 2,
    /// Gradients refused (dtype, shape, a view that cannot be written, …).
    Gradients = 3,
    /// Gradients on another device than the group's.
    Device = 4,
    /// This rank's reduction failed (a device error, out of memory).
    Reduction = 5,
    /// A call out of sequence (a GradScaler's stage).
    Sequence = 6,
    /// An earlier step failed on this rank after its collective: its state differs from the
    /// other ranks'.
    Diverged = 7,
}

const REFUSALS: [&str; 8] = [
    "unknown",
    "invalid settings",
    "invalid optimizer parameters",
    "gradients refused",
    "gradients on another device than the group's",
    "its reduction failed (a device error)",
    "a call out of sequence",
    "an earlier step failed on it after its collective, so its state differs from the others'",
];

pub(super) fn refusal_text(code: u64) -> &'static str {
    REFUSALS.get(code as usize).copied().unwrap_or(REFUSALS[0])
}

/// A rank's own error, with the kind the other ranks are told.
#[derive(Debug)]
pub(crate) struct RankError {
    pub(crate) kind: Refusal,
    pub(crate) error: candle_core::Error,
}

impl RankError {
    pub(crate) fn new(kind: Refusal, error: candle_core::Error) -> Self {
        Self { kind, error }
    }
}

/// `result` with its error marked as a refusal of `kind`.
pub(crate) fn refuse<T>(kind: Refusal, result: Result<T>) -> std::result::Result<T, RankError> {
    result.map_err(|e| RankError::new(kind, e))
}

/// The header words (see the module documentation).
pub(super) const H_F64: usize = 0;
pub(super) const H_OTHER: usize = 1;
pub(super) const H_FAILED: usize = 2;
pub(super) const H_FAILURE_ID: usize = 3;
pub(super) const H_RANKS: usize = 4;
const H_CHUNKS: usize = 5;
const H_SQUARES: usize = 9;
const H_COMPLEMENTS: usize = 13;
pub(super) const HEADER_WORDS: usize = 17;

/// A rank's id in a max collective: the lowest rank wins, `low` (a kind or a field) with it.
pub(super) fn rank_id(rank: usize, low: u64) -> u64 {
    ((u32::MAX as u64 - rank as u64) << 32) | (low & 0xFFFF_FFFF)
}

/// The rank and the low word of an id (`rank_id`).
pub(super) fn from_rank_id(id: u64) -> (usize, u64) {
    ((u32::MAX as u64 - (id >> 32)) as usize, id & 0xFFFF_FFFF)
}

/// This rank's header.
pub(super) fn header(
    f64_grads: u64,
    other_grads: u64,
    failure: Option<(usize, Refusal)>,
    fingerprint: u64,
) -> [u64; HEADER_WORDS] {
    let mut h = [0u64; HEADER_WORDS];
    h[H_F64] = f64_grads;
    h[H_OTHER] = other_grads;
    if let Some((rank, kind)) = failure {
        h[H_FAILED] = 1;
        h[H_FAILURE_ID] = rank_id(rank, kind as u64);
    }
    h[H_RANKS] = 1;
    for i in 0..4 {
        let c = (fingerprint >> (16 * i)) & 0xFFFF;
        h[H_CHUNKS + i] = c;
        h[H_SQUARES + i] = c * c;
        h[H_COMPLEMENTS + i] = 0xFFFF - c;
    }
    h
}

/// Whether the combined header says every rank sent the same fingerprint; `sum`: the header was
/// summed over `world` ranks, else maxed.
pub(super) fn fingerprints_agree(h: &[u64], sum: bool, world: usize) -> bool {
    (0..4).all(|i| {
        if sum {
            let (s, q) = (h[H_CHUNKS + i] as u128, h[H_SQUARES + i] as u128);
            world as u128 * q == s * s
        } else {
            h[H_CHUNKS + i] + h[H_COMPLEMENTS + i] == 0xFFFF
        }
    })
}

/// Whether the combined header holds one contribution per rank.
pub(super) fn ranks_counted(h: &[u64], sum: bool, world: usize) -> bool {
    h[H_RANKS] == if sum { world as u64 } else { 1 }
}
