//! Skipping non-finite steps, as [`Clipped`](crate::Clipped) and the fused optimizers share it:
//! the setting, its limit on a run of skips, and the error past the limit.

use candle_core::Result;

use crate::dist::agreement::{Agreement, Field};

/// `skip_nonfinite` and `max_consecutive_skips`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct SkipSetting {
    pub(crate) skip_nonfinite: bool,
    pub(crate) max_consecutive_skips: Option<usize>,
}

impl SkipSetting {
    /// The limit that applies: `max_consecutive_skips`, with skipping on.
    pub(crate) fn limit(&self) -> Option<u64> {
        self.max_consecutive_skips
            .filter(|_| self.skip_nonfinite)
            .map(|l| l as u64)
    }

    /// Refuses one more skip after `run` non-finite steps skipped in a row when that passes the
    /// limit (the error says the training is broken; the caller changes nothing).
    pub(crate) fn check_run(&self, caller: &str, run: u64) -> Result<()> {
        match self.limit() {
            Some(limit) if run >= limit => Err(candle_core::Error::Msg(format!(
                "{caller}: {} non-finite steps in a row, more than max_consecutive_skips = {limit}: the training is broken (a diverged model, a bad batch, a loss scale out of range); nothing was changed",
                run + 1
            ))
            .bt()),
            _ => Ok(()),
        }
    }

    /// `agreement` with the setting (every rank of a step across ranks must share it).
    pub(crate) fn agree_on(&self, agreement: Agreement) -> Agreement {
        agreement
            .set_bool(Field::SkipNonfinite, self.skip_nonfinite)
            .set(
                Field::MaxConsecutiveSkips,
                self.max_consecutive_skips.map_or(u64::MAX, |l| l as u64),
            )
    }
}
