//! The bottom layer's file plumbing: [`atomic`] replaces a file crash-safely (every `save_state`
//! and training checkpoint), [`format`] turns tensors into safetensors bytes (with metadata and
//! SHA-256 digests) and back. Imports nothing of the crate.

pub(crate) mod atomic;
pub(crate) mod format;
