//! Queries a training loop reacts to without parsing an error message: what a file is
//! ([`TrainingCheckpoint::inspect`]) and whether a checkpoint is this run's
//! ([`TrainingCheckpoint::fits`]). candle's `Error` cannot carry a typed error (its `Wrapped`
//! holds a `Display`), so these are queries.

use std::path::Path;

use candle_core::{Result, Tensor};
use candle_nn::VarMap;

use super::file::{TrainingCheckpoint, VARS};
use crate::ops::varmap::sorted_vars;

/// What [`TrainingCheckpoint::inspect`] found a file to be.
///
/// ```
/// use candle_grad_clip::{CheckpointStatus, TrainingCheckpoint};
/// let path = std::env::temp_dir().join(format!("doc-status-{}.safetensors", std::process::id()));
/// std::fs::write(&path, b"not a checkpoint")?;
/// assert!(matches!(TrainingCheckpoint::inspect(&path)?, CheckpointStatus::Damaged(_)));
/// # std::fs::remove_file(&path)?;
/// # Ok::<(), candle_core::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckpointStatus {
    /// A training checkpoint of this version, verified whole: [`TrainingCheckpoint::load`]
    /// reads it.
    Intact {
        /// Its step.
        step: u64,
    },
    /// Damaged: truncated, not a safetensors file, or a digest that does not match (a crash
    /// mid-copy, a bad disk). Fall back to an older checkpoint. The reason, as `load` words it.
    Damaged(String),
    /// An intact safetensors file that is not a training checkpoint of this version (a
    /// `save_state` file, another program's, or a format this version does not read).
    NotACheckpoint(String),
}

impl TrainingCheckpoint {
    /// What the file at `path` is, verified as [`load`](Self::load) verifies it: an intact
    /// checkpoint, a damaged one, or another kind of file. An error only when the file cannot
    /// be read (missing, no permission).
    ///
    /// ```
    /// use candle_grad_clip::{CheckpointStatus, TrainingCheckpoint};
    /// let path = std::env::temp_dir().join(format!("doc-inspect-{}.safetensors", std::process::id()));
    /// TrainingCheckpoint::new(&candle_nn::VarMap::new(), 7)?.save(&path)?;
    /// assert_eq!(TrainingCheckpoint::inspect(&path)?, CheckpointStatus::Intact { step: 7 });
    /// let mut bytes = std::fs::read(&path)?;
    /// let last = bytes.len() - 1;
    /// bytes[last] ^= 1; // a flipped bit in the header's padding or a tensor
    /// std::fs::write(&path, &bytes)?;
    /// assert!(matches!(TrainingCheckpoint::inspect(&path)?, CheckpointStatus::Damaged(_)));
    /// assert!(TrainingCheckpoint::inspect(path.with_extension("missing")).is_err());
    /// # std::fs::remove_file(&path)?;
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn inspect(path: impl AsRef<Path>) -> Result<CheckpointStatus> {
        let path = path.as_ref();
        if let Err(e) = std::fs::File::open(path) {
            candle_core::bail!(
                "TrainingCheckpoint::inspect: `{}` cannot be read ({e})",
                path.display()
            )
        }
        Ok(match Self::load(path) {
            Ok(checkpoint) => CheckpointStatus::Intact {
                step: checkpoint.step(),
            },
            Err(e) => {
                let reason = e.to_string();
                let other = ["is not a training checkpoint", "has format"];
                if other.iter().any(|o| reason.contains(o)) {
                    CheckpointStatus::NotACheckpoint(reason)
                } else {
                    CheckpointStatus::Damaged(reason)
                }
            }
        })
    }

    /// Whether this checkpoint is of `varmap`'s model: the same var names, each with the same
    /// shape and dtype (what [`restore`](Self::restore) requires). `false` for another run's
    /// checkpoint (another model, another size).
    ///
    /// ```
    /// use candle_core::{DType, Device};
    /// use candle_nn::{Init, VarMap};
    /// let varmap = VarMap::new();
    /// varmap.get(2, "w", Init::Const(0.0), DType::F32, &Device::Cpu)?;
    /// let checkpoint = candle_grad_clip::TrainingCheckpoint::new(&varmap, 0)?;
    /// assert!(checkpoint.fits(&varmap)?);
    /// let other = VarMap::new();
    /// other.get(3, "w", Init::Const(0.0), DType::F32, &Device::Cpu)?;
    /// assert!(!checkpoint.fits(&other)?);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn fits(&self, varmap: &VarMap) -> Result<bool> {
        let vars = sorted_vars(varmap, "TrainingCheckpoint::fits")?;
        if vars.len() != self.var_names().len() {
            return Ok(false);
        }
        for (name, var) in &vars {
            let Some(entry) = self.entries.get(&format!("{VARS}{name}")) else {
                return Ok(false);
            };
            let tensor: &Tensor = var.as_tensor();
            if entry.shape != tensor.dims() || entry.dtype != tensor.dtype() {
                return Ok(false);
            }
        }
        Ok(true)
    }
}
