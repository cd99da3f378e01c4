//! Which optimizers a [`TrainingCheckpoint`](super::TrainingCheckpoint) can hold: the sealed
//! [`CheckpointOptimizer`] trait and its implementations for the fused optimizers.

use std::collections::{BTreeMap, HashMap};

use candle_core::{Result, Var};

use crate::io::format::Entry;
use crate::optim::clip_setting::ClipSetting;
use crate::optim::fused::api::{Fused, FusedRule};
use crate::optim::fused::state_dict::{StateBackup, StateValue};

pub(crate) mod sealed {
    use std::collections::{BTreeMap, HashMap};

    use candle_core::{Result, Var};

    use crate::io::format::Entry;
    use crate::optim::clip_setting::ClipSetting;
    use crate::optim::fused::state_dict::{StateBackup, StateValue};

    /// What a checkpoint needs from an optimizer (crate-internal: the trait is sealed).
    pub trait Sealed {
        fn kind(&self) -> &'static str;
        fn describe_params(&self) -> String;
        /// The vars it updates, in its order.
        fn optimizer_vars(&self) -> &[Var];
        /// Its state as host entries, var `i`'s under `keys[i]`.
        fn optimizer_entries(&self, keys: &[String]) -> Result<BTreeMap<String, Entry>>;
        /// Loads a state, var `i`'s under `keys[i]`, checked whole first; returns the old one.
        fn load_optimizer_values(
            &mut self,
            values: &HashMap<&str, StateValue<'_>>,
            keys: &[String],
        ) -> Result<StateBackup>;
        /// Puts back what [`load_optimizer_values`](Self::load_optimizer_values) replaced.
        fn put_back_state(&mut self, backup: StateBackup) -> Result<()>;
        fn clip(&self) -> Option<&ClipSetting>;
        /// Replaces the clip setting by a validated one of the same kind and parameters.
        fn replace_clip(&mut self, clip: ClipSetting) -> Result<()>;
    }
}

/// An optimizer whose whole state a [`TrainingCheckpoint`](super::TrainingCheckpoint) saves and restores: [`FusedAdamW`](crate::FusedAdamW)
/// and [`FusedSgd`](crate::FusedSgd) (sealed). `candle_nn::AdamW` keeps its moments private, so it cannot be
/// checkpointed.
///
/// ```
/// fn takes<O: candle_grad_clip::CheckpointOptimizer>(_: &O) {}
/// let opt = candle_grad_clip::FusedSgd::from_varmap(&candle_nn::VarMap::new(), Default::default())?;
/// takes(&opt);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub trait CheckpointOptimizer: sealed::Sealed {}

impl<R: FusedRule> sealed::Sealed for Fused<R> {
    fn kind(&self) -> &'static str {
        R::NAME
    }
    fn describe_params(&self) -> String {
        format!("{:?}", self.params())
    }
    fn optimizer_vars(&self) -> &[Var] {
        self.vars()
    }
    fn optimizer_entries(&self, keys: &[String]) -> Result<BTreeMap<String, Entry>> {
        self.state_entries(keys)
    }
    fn load_optimizer_values(
        &mut self,
        values: &HashMap<&str, StateValue<'_>>,
        keys: &[String],
    ) -> Result<StateBackup> {
        self.load_state_values(values, keys)
    }
    fn put_back_state(&mut self, backup: StateBackup) -> Result<()> {
        self.put_back(backup)
    }
    fn clip(&self) -> Option<&ClipSetting> {
        self.clip_setting()
    }
    fn replace_clip(&mut self, clip: ClipSetting) -> Result<()> {
        self.set_clip_setting(clip)
    }
}

impl<R: FusedRule> CheckpointOptimizer for Fused<R> {}
