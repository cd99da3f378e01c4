//! Saving a [`TrainingCheckpoint`] on another thread while the run goes on
//! ([`TrainingCheckpoint::save_in_background`], [`PendingSave`]).

use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use candle_core::Result;

use super::file::TrainingCheckpoint;

impl TrainingCheckpoint {
    /// Saves it as [`save`](Self::save) does, on a new thread, and returns at once: the
    /// checkpoint holds host copies taken when it was built, so the vars and the optimizer may go
    /// on changing (the file holds the state at build time). [`PendingSave::wait`] returns the
    /// save's result. Wait for one save before starting the next to the same path: two in flight
    /// at once each succeed, but the one that ends last wins, which need not be the newer.
    ///
    /// ```
    /// use candle_core::{DType, Device};
    /// use candle_grad_clip::TrainingCheckpoint;
    /// let varmap = candle_nn::VarMap::new();
    /// let w = varmap.get(2, "w", candle_nn::Init::Const(1.0), DType::F32, &Device::Cpu)?;
    /// let path = std::env::temp_dir().join(format!("doc-bg-{}.safetensors", std::process::id()));
    /// let pending = TrainingCheckpoint::new(&varmap, 1)?.save_in_background(&path)?;
    /// varmap.data().lock().unwrap()["w"].set(&(w.as_ref() * 2.0)?)?; // training goes on
    /// pending.wait()?;
    /// let saved = TrainingCheckpoint::load(&path)?.var("w", &Device::Cpu)?;
    /// assert_eq!(saved.to_vec1::<f32>()?, [1.0, 1.0]); // the values at build time
    /// # std::fs::remove_file(&path)?;
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn save_in_background(self, path: impl AsRef<Path>) -> Result<PendingSave> {
        let path = path.as_ref().to_path_buf();
        let target = path.clone();
        let handle = std::thread::Builder::new()
            .name("checkpoint-save".into())
            .spawn(move || self.save(&target))
            .map_err(|e| {
                candle_core::Error::Msg(format!(
                    "TrainingCheckpoint::save_in_background: cannot start a thread to save `{}` ({e})",
                    path.display()
                ))
            })?;
        Ok(PendingSave {
            handle: Some(handle),
            path,
        })
    }
}

/// A save running on another thread ([`TrainingCheckpoint::save_in_background`]). Dropping it
/// waits for the save to end (its error then goes unseen: call [`wait`](Self::wait)).
///
/// ```
/// use candle_grad_clip::TrainingCheckpoint;
/// let path = std::env::temp_dir().join(format!("doc-pending-{}.safetensors", std::process::id()));
/// let pending = TrainingCheckpoint::new(&candle_nn::VarMap::new(), 0)?.save_in_background(&path)?;
/// assert_eq!(pending.path(), path);
/// pending.wait()?;
/// # std::fs::remove_file(&path)?;
/// # Ok::<(), candle_core::Error>(())
/// ```
#[derive(Debug)]
#[must_use = "a save in the background reports its error through `wait`"]
pub struct PendingSave {
    handle: Option<JoinHandle<Result<()>>>,
    path: PathBuf,
}

impl PendingSave {
    /// The path the checkpoint is being saved to.
    ///
    /// ```
    /// # let path = std::env::temp_dir().join(format!("doc-pending-path-{}.safetensors", std::process::id()));
    /// let pending = candle_grad_clip::TrainingCheckpoint::new(&candle_nn::VarMap::new(), 0)?
    ///     .save_in_background(&path)?;
    /// assert!(pending.path().ends_with(path.file_name().unwrap()));
    /// # pending.wait()?;
    /// # std::fs::remove_file(&path)?;
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the save has ended (successfully or not); [`wait`](Self::wait) then returns at
    /// once.
    ///
    /// ```
    /// # let path = std::env::temp_dir().join(format!("doc-pending-fin-{}.safetensors", std::process::id()));
    /// let pending = candle_grad_clip::TrainingCheckpoint::new(&candle_nn::VarMap::new(), 0)?
    ///     .save_in_background(&path)?;
    /// while !pending.is_finished() {
    ///     std::thread::yield_now();
    /// }
    /// pending.wait()?;
    /// # std::fs::remove_file(&path)?;
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn is_finished(&self) -> bool {
        self.handle.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Waits for the save to end and returns its result ([`TrainingCheckpoint::save`]'s).
    ///
    /// ```
    /// let dir = std::env::temp_dir().join(format!("doc-pending-err-{}", std::process::id()));
    /// // A folder that does not exist: the save fails, and `wait` says so.
    /// let pending = candle_grad_clip::TrainingCheckpoint::new(&candle_nn::VarMap::new(), 0)?
    ///     .save_in_background(dir.join("missing").join("ckpt.safetensors"))?;
    /// assert!(pending.wait().is_err());
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn wait(mut self) -> Result<()> {
        self.join()
    }

    fn join(&mut self) -> Result<()> {
        match self.handle.take().map(JoinHandle::join) {
            None | Some(Ok(Ok(()))) => Ok(()),
            Some(Ok(Err(e))) => Err(e),
            Some(Err(_)) => Err(candle_core::Error::Msg(format!(
                "TrainingCheckpoint::save_in_background: the thread saving `{}` panicked",
                self.path.display()
            ))),
        }
    }
}

impl Drop for PendingSave {
    fn drop(&mut self) {
        let _ = self.join();
    }
}
