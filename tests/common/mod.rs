//! Helpers shared by the integration tests (every folder of `tests/` includes this one as
//! `common`): exact reads of tensors ([`reads`]), an independent f64 reference for the norms
//! (double-double accumulation, power-of-two scaling), exact rounding and per-dtype ulp
//! tolerances ([`reference`]), the assertions built on them ([`assertions`]), seeded gradient
//! values and optimizer twins ([`random`]). Everything is re-exported here: `common::bits`,
//! `common::ref_norm`, ...
//!
//! Nothing here calls the crate under test: the expectations are computed from the values that
//! candle itself reads back from the gradient tensors. (Only constants and a log of the kernel
//! emulation are named here, for the tests that share them.)
#![allow(dead_code)]

mod assertions;
mod random;
mod reads;
mod reference;

// Not every test target uses every helper.
#[allow(unused_imports)]
pub use assertions::*;
#[allow(unused_imports)]
pub use random::*;
#[allow(unused_imports)]
pub use reads::*;
#[allow(unused_imports)]
pub use reference::*;

use candle_core::DType;
use candle_grad_clip::{BlockOrder, EmulationLog};

/// Every float dtype a gradient may have.
pub const DTYPES: [DType; 4] = [DType::F32, DType::F64, DType::F16, DType::BF16];

/// Every block order of the kernel emulation.
pub const ORDERS: [BlockOrder; 4] = [
    BlockOrder::InOrder,
    BlockOrder::Reversed,
    BlockOrder::Shuffled,
    BlockOrder::Concurrent { threads: 3 },
];

/// The kernels an emulated run launched, in order.
pub fn kernels(log: &EmulationLog) -> Vec<&'static str> {
    log.launches.iter().map(|l| l.kernel).collect()
}
