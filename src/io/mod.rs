//! The bottom layer's file plumbing: [`atomic`] replaces a file crash-safely, streaming it
//! (every `save_state` and training checkpoint), [`format`] turns tensors into safetensors bytes
//! and back without copying a file's tensors, [`digest`] seals a file with the SHA-256 of every
//! tensor and of its header and verifies it on reading, [`state_file`] is the verified file of a
//! `save_state`. Imports nothing of the crate.

pub(crate) mod atomic;
pub(crate) mod digest;
pub(crate) mod format;
pub(crate) mod state_file;
