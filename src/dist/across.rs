//! The partial results of a norm (or a flag) combined through a process group's collectives,
//! each buffer padded to the norm's length and followed by the header of [`agreement`]: this
//! rank's gradient counts, its refusal, its settings' fingerprint. A collective whose header says
//! a rank refused or the settings differ fails on every rank, with an error that names them.

use candle_core::{bail, Result};

use super::agreement::{
    self, field_name, fingerprints_agree, from_rank_id, header, rank_id, ranks_counted,
    refusal_text, show, Agreement, RankError, Refusal, FIELDS, HEADER_WORDS, H_F64, H_FAILED,
    H_FAILURE_ID, H_OTHER,
};
use super::group::ProcessGroup;
use crate::ops::exact_sum::{ExactSum, WORDS};
use crate::ops::norm::Combine;

/// Which collective.
#[derive(Debug, Clone, Copy)]
pub(super) enum Collective {
    Sum,
    Max,
}

impl Collective {
    fn name(self) -> &'static str {
        match self {
            Collective::Sum => "all_reduce_sum_u64",
            Collective::Max => "all_reduce_max_u64",
        }
    }

    fn run(self, group: &dyn ProcessGroup, words: &mut [u64]) -> Result<()> {
        match self {
            Collective::Sum => group.all_reduce_sum_u64(words),
            Collective::Max => group.all_reduce_max_u64(words),
        }
    }
}

/// The partial results combined through `group`'s collectives, each with the header of the
/// agreement module: this rank's gradient counts, its failure, its settings' fingerprint.
pub(super) struct Across<'a> {
    caller: &'static str,
    group: &'a dyn ProcessGroup,
    /// This rank's count of F64 gradients and of other gradients.
    counts: (u64, u64),
    /// The error that refused this rank, until it is returned.
    pub(super) failure: Option<RankError>,
    agreement: Agreement,
    /// The counts combined over the ranks, once a collective ran.
    pub(super) global: Option<(u64, u64)>,
}

impl<'a> Across<'a> {
    pub(super) fn new(
        caller: &'static str,
        group: &'a dyn ProcessGroup,
        counts: (u64, u64),
        failure: Option<RankError>,
        agreement: Agreement,
    ) -> Self {
        let agreement = agreement.in_world(group.world_size());
        // A call that failed on this rank past its collective: every rank fails now.
        let failure = failure.or_else(|| {
            group.is_out_of_step().then(|| {
                RankError::new(
                    Refusal::Diverged,
                    candle_core::Error::Msg(format!(
                        "{caller}: an earlier step failed on this rank after its collective \
                         (its gradients or state may differ from the other ranks'): this group \
                         is out of step; start a new one"
                    )),
                )
            })
        });
        Self {
            caller,
            group,
            counts,
            failure,
            agreement,
            global: None,
        }
    }

    /// All-reduces `payload` (padded to the norm's length, so that every collective of every
    /// call has the same length) followed by this rank's header. Fails on every rank when a rank
    /// refused (this one: `payload` is its error, or it failed before) or the settings differ.
    pub(super) fn exchange<const N: usize>(
        &mut self,
        payload: std::result::Result<[u64; N], RankError>,
        op: Collective,
    ) -> Result<[u64; N]> {
        let (rank, world, name) = (self.group.rank(), self.group.world_size(), op.name());
        if N > WORDS {
            bail!("internal error: a payload of {N} words in the norm's collective")
        }
        let payload = payload.unwrap_or_else(|e| {
            self.failure.get_or_insert(e);
            [0; N]
        });
        let failure = self.failure.as_ref().map(|e| (rank, e.kind));
        let mut words = vec![0u64; WORDS + HEADER_WORDS];
        words[..N].copy_from_slice(&payload);
        words[WORDS..].copy_from_slice(&header(
            self.counts.0,
            self.counts.1,
            failure,
            self.agreement.fingerprint(),
        ));
        let len = words.len();
        if let Err(e) = op.run(self.group, &mut words) {
            if let Some(own) = self.failure.take() {
                return Err(own.error);
            }
            bail!(
                "{}: rank {rank} of {world}: {name} of {len} words failed: {e}",
                self.caller
            )
        }
        if words.len() != len {
            bail!(
                "{}: rank {rank}: {name} returned {} words, expected {len}",
                self.caller,
                words.len()
            )
        }
        let h = &words[WORDS..];
        let sum = matches!(op, Collective::Sum);
        if !ranks_counted(h, sum, world) {
            if let Some(own) = self.failure.take() {
                return Err(own.error);
            }
            bail!(
                "{}: rank {rank} of {world}: {name} combined the contributions of {} ranks: a rank counted twice or missing (a broken process group); nothing was modified",
                self.caller,
                h[agreement::H_RANKS]
            )
        }
        if h[H_FAILED] != 0 || !fingerprints_agree(h, sum, world) {
            return Err(self.report(name, h, sum));
        }
        self.global = Some((h[H_F64], h[H_OTHER]));
        let mut out = [0u64; N];
        out.copy_from_slice(&words[..N]);
        Ok(out)
    }

    /// After a collective whose header says a rank refused or the settings differ: two small
    /// collectives (every rank makes them, having seen the same header) tell every rank how many
    /// refused, rank 0's settings, the lowest refusing rank and why, and the lowest rank whose
    /// settings differ from rank 0's and in which field. The error this rank returns: its own if it
    /// refused, else one that names them.
    fn report(&mut self, name: &str, h: &[u64], sum: bool) -> candle_core::Error {
        let (rank, world) = (self.group.rank(), self.group.world_size());
        let mut first = vec![0u64; 1 + FIELDS];
        first[0] = self.failure.is_some() as u64;
        if rank == 0 {
            first[1..].copy_from_slice(&self.agreement.fields);
        }
        let follow_up = self.group.all_reduce_sum_u64(&mut first).and_then(|()| {
            let mut rank0 = Agreement {
                fields: [0; FIELDS],
            };
            rank0.fields.copy_from_slice(&first[1..]);
            let differs = self.agreement.first_difference(&rank0);
            let mut second = [
                self.failure
                    .as_ref()
                    .map_or(0, |e| rank_id(rank, e.kind as u64)),
                differs.map_or(0, |f| rank_id(rank, u32::MAX as u64 - f as u64)),
            ];
            self.group.all_reduce_max_u64(&mut second)?;
            Ok((first[0], rank0, second))
        });
        if let Some(own) = self.failure.take() {
            return own.error;
        }
        let caller = self.caller;
        let (refused, rank0, [failure_id, difference_id]) = match follow_up {
            Ok(found) => found,
            Err(e) => {
                // What the first header says, without the details.
                let what = if h[H_FAILED] != 0 {
                    let (r, kind) = from_rank_id(h[H_FAILURE_ID]);
                    match (sum, h[H_FAILED]) {
                        (true, 1) | (false, _) => {
                            format!("rank {r} refused its call ({})", refusal_text(kind))
                        }
                        (true, n) => format!("{n} of {world} ranks refused their call"),
                    }
                } else {
                    "the ranks' settings differ".to_string()
                };
                return candle_core::Error::Msg(format!(
                    "{caller}: rank {rank} of {world}: before {name}, {what}; the collective that would tell which failed: {e}; nothing was modified"
                ))
                .bt();
            }
        };
        if refused > 0 {
            let (r, kind) = from_rank_id(failure_id);
            let others = match refused {
                1 => String::new(),
                2 => " and 1 other rank".to_string(),
                n => format!(" and {} other ranks", n - 1),
            };
            return candle_core::Error::Msg(format!(
                "{caller}: rank {rank} of {world}: {refused} of {world} ranks refused their call before {name}: rank {r} ({}){others} (see their errors); nothing was modified",
                refusal_text(kind)
            ))
            .bt();
        }
        if difference_id != 0 {
            let (r, low) = from_rank_id(difference_id);
            let field = (u32::MAX as u64 - low) as usize;
            let detail = if field >= FIELDS {
                format!("rank {r}'s differ from rank 0's")
            } else {
                let theirs = show(field, rank0.fields[field]);
                if r == rank {
                    format!(
                        "this rank's {} is {} but rank 0's is {theirs}",
                        field_name(field),
                        show(field, self.agreement.fields[field])
                    )
                } else {
                    format!(
                        "rank {r}'s {} differs from rank 0's ({theirs})",
                        field_name(field)
                    )
                }
            };
            return candle_core::Error::Msg(format!(
                "{caller}: rank {rank} of {world}: the ranks' settings differ (they must be equal on every rank): {detail}; seen in {name}; nothing was modified"
            ))
            .bt();
        }
        candle_core::Error::Msg(format!(
            "{caller}: rank {rank} of {world}: the settings' fingerprints in {name} differ but every rank's settings equal rank 0's: the ranks made different collectives (an Inf norm on some, another norm on others?) or the transport is broken; nothing was modified"
        ))
        .bt()
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

/// A local reduction that failed refuses this rank (it still takes part).
fn reduced<T>(local: Result<T>) -> std::result::Result<T, RankError> {
    agreement::refuse(Refusal::Reduction, local)
}

impl Combine for Across<'_> {
    fn max_abs(&mut self, local: Result<f64>) -> Result<f64> {
        let local = reduced(local).map(|x| [ordered_bits(x)]);
        let [bits] = self.exchange(local, Collective::Max)?;
        Ok(f64::from_bits(bits))
    }

    fn sum(&mut self, local: Result<ExactSum>) -> Result<ExactSum> {
        let local = reduced(local).map(|s| s.to_words());
        let words: [u64; WORDS] = self.exchange(local, Collective::Sum)?;
        Ok(ExactSum::from_words(&words))
    }

    fn powers_may_leave_f64_range(&self, p: f64) -> bool {
        let (f64_grads, _) = self.global.unwrap_or(self.counts);
        p > 6.0 || f64_grads > 0
    }
}
