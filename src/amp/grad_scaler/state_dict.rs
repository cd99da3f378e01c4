//! GradScaler's state as named tensors, and its safetensors file.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{bail, DType, Device, Result, Tensor};

use crate::io::state_file::{self, StateDictReader};

use super::{GradScaler, ScalerState, Stage, KEY_GROWTH_TRACKER, KEY_SCALE};

impl GradScaler {
    /// The state as copies on the CPU: `scale` (0-d F32) and `growth_tracker` (0-d I64),
    /// everything a bitwise resume needs when saved between [`update`](Self::update) and the
    /// next step. The settings are not state.
    ///
    /// ```
    /// let state = candle_grad_clip::GradScaler::new().state_dict()?;
    /// assert_eq!(state["scale"].to_scalar::<f32>()?, 65536.0);
    /// assert_eq!(state["growth_tracker"].to_scalar::<i64>()?, 0);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn state_dict(&self) -> Result<HashMap<String, Tensor>> {
        self.validate()?;
        let state = match &self.state {
            Some(s) => s.to_device(&Device::Cpu)?,
            None => self.fresh_state(&Device::Cpu)?,
        };
        let tracker = state.growth_tracker.to_scalar::<f64>()? as i64;
        Ok(HashMap::from([
            (KEY_SCALE.to_string(), state.scale),
            (
                KEY_GROWTH_TRACKER.to_string(),
                Tensor::new(tracker, &Device::Cpu)?,
            ),
        ]))
    }

    /// Loads a state from [`state_dict`](Self::state_dict); a missing, unknown or malformed entry
    /// (a scale not finite or not positive, a negative tracker) is an error and nothing changes,
    /// and so is a load in the middle of a step (after `unscale_` or `step`, before `update`).
    /// The scaler is then ready for a new step.
    ///
    /// ```
    /// use candle_grad_clip::GradScaler;
    /// let mut state = GradScaler::new().with_init_scale(8.0).state_dict()?;
    /// let mut other = GradScaler::new();
    /// other.load_state_dict(&state)?;
    /// assert_eq!(other.scale_value()?, 8.0);
    /// state.remove("growth_tracker");
    /// assert!(other.load_state_dict(&state).is_err());
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn load_state_dict(&mut self, dict: &HashMap<String, Tensor>) -> Result<()> {
        if self.step_in_progress() {
            bail!("GradScaler::load_state_dict: a step is in progress (unscale_ or step since the last update()); call update() first; nothing was loaded")
        }
        let reader = StateDictReader {
            dict,
            caller: "GradScaler::load_state_dict",
        };
        let scale = reader.get(KEY_SCALE, DType::F32, 0)?;
        let tracker = reader.get(KEY_GROWTH_TRACKER, DType::I64, 0)?;
        let scale_value = scale.to_scalar::<f32>()?;
        if !(scale_value.is_finite() && scale_value > 0.0) {
            bail!("GradScaler::load_state_dict: `scale` must be > 0 and finite, got {scale_value}; nothing was loaded")
        }
        let tracker_value = tracker.to_scalar::<i64>()?;
        if !(0..=1 << 53).contains(&tracker_value) {
            bail!("GradScaler::load_state_dict: `growth_tracker` must be in [0, 2^53], got {tracker_value}; nothing was loaded")
        }
        reader.refuse_unknown(&[KEY_SCALE, KEY_GROWTH_TRACKER])?;
        let device = self
            .state
            .as_ref()
            .map_or(Device::Cpu, |s| s.device().clone());
        self.state = Some(ScalerState {
            scale: Tensor::new(scale_value, &device)?,
            growth_tracker: Tensor::new(tracker_value as f64, &device)?,
            found_inf: None,
        });
        self.stage = Stage::Ready;
        Ok(())
    }

    /// Saves [`state_dict`](Self::state_dict) as a safetensors file, atomically, with the SHA-256
    /// of every tensor and of its header.
    ///
    /// ```no_run
    /// candle_grad_clip::GradScaler::new().save_state("scaler.safetensors")?;
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn save_state(&self, path: impl AsRef<Path>) -> Result<()> {
        state_file::save(&self.state_dict()?, "GradScaler", path.as_ref())
    }

    /// Loads a state saved by [`save_state`](Self::save_state), as
    /// [`load_state_dict`](Self::load_state_dict), after verifying the file: a damaged file
    /// (a digest that does not match), one without digests or one of another kind is an error.
    ///
    /// ```no_run
    /// let mut scaler = candle_grad_clip::GradScaler::new();
    /// scaler.load_state("scaler.safetensors")?;
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn load_state(&mut self, path: impl AsRef<Path>) -> Result<()> {
        let dict = state_file::load(path.as_ref(), "GradScaler")?;
        self.load_state_dict(&dict)
    }
}
