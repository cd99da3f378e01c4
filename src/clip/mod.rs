//! The public clipping functions, a file per kind: [`norm`] (global-norm clipping and the
//! `ClipGradNorm` builder), [`value`], [`agc`] (adaptive, unit-wise) and [`across`] (the global
//! norm over the ranks of a process group).

pub(crate) mod across;
pub(crate) mod agc;
pub(crate) mod norm;
pub(crate) mod value;
