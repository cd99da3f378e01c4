//! Which optimizers a [`TrainingCheckpoint`](super::TrainingCheckpoint) can hold: the sealed
//! [`CheckpointOptimizer`] trait and its implementations for the fused optimizers.

use std::collections::HashMap;

use candle_core::{Result, Tensor};

use crate::optim::adamw::FusedAdamW;
use crate::optim::clip_setting::ClipSetting;
use crate::optim::sgd::FusedSgd;

pub(crate) mod sealed {
    use std::collections::HashMap;

    use candle_core::{Result, Tensor};

    use crate::optim::clip_setting::ClipSetting;

    /// What a checkpoint needs from an optimizer (crate-internal: the trait is sealed).
    pub trait Sealed {
        fn kind(&self) -> &'static str;
        fn describe_params(&self) -> String;
        fn optimizer_state(&self) -> Result<HashMap<String, Tensor>>;
        fn load_optimizer_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()>;
        fn clip(&self) -> Option<&ClipSetting>;
        /// Replaces the clip setting by a validated one of the same kind and parameters.
        fn replace_clip(&mut self, clip: ClipSetting) -> Result<()>;
    }
}

/// An optimizer whose whole state a [`TrainingCheckpoint`](super::TrainingCheckpoint) saves and restores: [`FusedAdamW`]
/// and [`FusedSgd`] (sealed). `candle_nn::AdamW` keeps its moments private, so it cannot be
/// checkpointed.
///
/// ```
/// fn takes<O: candle_grad_clip::CheckpointOptimizer>(_: &O) {}
/// let opt = candle_grad_clip::FusedSgd::from_varmap(&candle_nn::VarMap::new(), Default::default())?;
/// takes(&opt);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub trait CheckpointOptimizer: sealed::Sealed {}

macro_rules! checkpoint_optimizer {
    ($ty:ident) => {
        impl sealed::Sealed for $ty {
            fn kind(&self) -> &'static str {
                stringify!($ty)
            }
            fn describe_params(&self) -> String {
                format!("{:?}", self.params())
            }
            fn optimizer_state(&self) -> Result<HashMap<String, Tensor>> {
                self.state_dict()
            }
            fn load_optimizer_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
                self.load_state_dict(state)
            }
            fn clip(&self) -> Option<&ClipSetting> {
                self.clip_setting()
            }
            fn replace_clip(&mut self, clip: ClipSetting) -> Result<()> {
                self.set_clip_setting(clip)
            }
        }
        impl CheckpointOptimizer for $ty {}
    };
}
checkpoint_optimizer!(FusedAdamW);
checkpoint_optimizer!(FusedSgd);
