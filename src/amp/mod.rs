//! Mixed-precision training: [`grad_scaler`] (GradScaler, PyTorch's dynamic loss scaling), above
//! the optimizers it drives.

pub(crate) mod grad_scaler;
pub(crate) mod scaled;
