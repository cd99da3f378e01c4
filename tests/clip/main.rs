//! Norm and value clipping against independent f64 references: the specification's edge cases one
//! by one, seeded random properties, PyTorch's own test cases, the exact rounding of the scaling, a
//! model end to end; and adaptive gradient clipping (AGC), also through its kernels under the host
//! emulation and through the optimizers.

#[path = "../common/mod.rs"]
mod common;

mod agc;
mod edge_cases;
mod end_to_end;
mod properties;
mod pytorch_reference;
mod scaling_precision;
