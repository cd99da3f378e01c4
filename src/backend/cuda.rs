//! The CUDA back end (feature `cuda`).
