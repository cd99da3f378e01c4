//! The bottom layer: what every operation is, independent of the device that runs it.
//!
//! Each module here defines one operation or one shared notion: its parameters, its constants and
//! the host arithmetic (the "twin") that every back end reproduces bitwise. Nothing here imports
//! from the layers above (`backend`, `dispatch`, the public modules): those layers import from
//! here. See `docs/ARCHITECTURE.md`.

pub(crate) mod accumulate;
pub(crate) mod agc;
pub(crate) mod clip;
pub(crate) mod element;
pub(crate) mod exact_sum;
pub(crate) mod fault;
pub(crate) mod fused_step;
pub(crate) mod grad_scaler;
pub(crate) mod gradients;
pub(crate) mod layout_runs;
pub(crate) mod norm;
pub(crate) mod norm_type;
pub(crate) mod varmap;
pub(crate) mod zclip;
