//! Training checkpoints: the model's vars, the optimizer's state, the clip policy's state, the
//! [`GradScaler`](crate::GradScaler)'s state, the step and user metadata in one safetensors
//! file, saved atomically and loaded all or nothing ([`TrainingCheckpoint`]).
//!
//! The file plumbing lives below, in [`crate::io`] (`atomic` replaces a file crash-safely,
//! `format` turns tensors into the file's bytes and back and computes the digests). Here:
//! `clip` describes a clip setting and carries its state, `optimizer` says which optimizers a
//! checkpoint holds, `file` builds, saves and loads one, `background` saves one on another thread, `restore`
//! checks and applies it.

mod background;
mod clip;
mod file;
mod inspect;
mod optimizer;
mod restore;

pub use background::PendingSave;
pub use file::TrainingCheckpoint;
pub use inspect::CheckpointStatus;
pub use optimizer::CheckpointOptimizer;
pub use restore::Restore;
