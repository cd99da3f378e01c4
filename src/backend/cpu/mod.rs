//! The CPU back end: the reduction and the in-place element-wise passes over `CpuStorage`.
//!
//! Every gradient view is cut into work items of at most [`CHUNK`] elements (a strided view is one
//! item). Each item is reduced to one `f64` partial in a fixed order, and the partials are added
//! into an [`ExactSum`], so the norm is bitwise the same whatever the order of the vars and
//! whatever the number of threads. Writes go through candle's `inplace_op1`, one call per storage,
//! so that every element is written exactly once even when gradients alias.

//! Files: [`reduce`] (the norm's work items and loops), [`apply`] (the in-place element-wise
//! passes), [`agc`], [`grad_scaler`] (GradScaler's one-read path) and [`fused_step`] (the fused
//! optimizer step), [`accumulate`] (gradient accumulation). The element arithmetic itself is defined in `ops::element`.

use candle_core::{bail, CpuStorage, Result, Storage};
use half::{bf16, f16};

/// Elements per work item: large enough that per-item overhead vanishes, small enough to spread
/// a few big tensors over all threads. It also fixes the summation order, so it must not depend
/// on the thread count.
pub(super) const CHUNK: usize = 1 << 15;

/// Below this many elements a call runs on the calling thread: waking the pool costs more than
/// it saves.
pub(super) const PARALLEL_MIN_ELEMENTS: usize = 1 << 20;

/// Independent accumulators in the reduction loops: eight 4-wide registers, enough to keep two
/// add (or FMA) pipelines busy despite their latency.
pub(super) const LANES: usize = 32;

/// A read-only view of one storage's data, by dtype.
#[derive(Clone, Copy)]
pub(super) enum Data<'a> {
    F32(&'a [f32]),
    F64(&'a [f64]),
    F16(&'a [f16]),
    BF16(&'a [bf16]),
}

impl<'a> Data<'a> {
    pub(super) fn of(storage: &'a Storage) -> Result<Self> {
        Ok(match storage {
            Storage::Cpu(CpuStorage::F32(v)) => Data::F32(v),
            Storage::Cpu(CpuStorage::F64(v)) => Data::F64(v),
            Storage::Cpu(CpuStorage::F16(v)) => Data::F16(v),
            Storage::Cpu(CpuStorage::BF16(v)) => Data::BF16(v),
            other => bail!(
                "gradient clipping on the CPU needs F32, F64, F16 or BF16 CPU storage, got {:?} on {:?}",
                other.dtype(),
                other.device().location()
            ),
        })
    }

    pub(super) fn range(self, start: usize, end: usize) -> Self {
        match self {
            Data::F32(v) => Data::F32(&v[start..end]),
            Data::F64(v) => Data::F64(&v[start..end]),
            Data::F16(v) => Data::F16(&v[start..end]),
            Data::BF16(v) => Data::BF16(&v[start..end]),
        }
    }
}

/// Runs `$body` with `$xs` bound to the typed slice of a [`Data`].
macro_rules! dispatch {
    ($data:expr, $xs:ident => $body:expr) => {
        match $data {
            Data::F32($xs) => $body,
            Data::F64($xs) => $body,
            Data::F16($xs) => $body,
            Data::BF16($xs) => $body,
        }
    };
}

/// Compiles `$generic` a second time for AVX2 and picks that version at run time when the CPU has
/// it. Both versions perform the same operations in the same order (Rust never contracts a
/// multiply and an add into an FMA), so the results are bitwise the same; AVX2 only makes each
/// instruction handle twice the lanes, which matters when the data sits in cache.
macro_rules! multiversion {
    ($(#[$meta:meta])* fn $name:ident<$($t:ident: $bound:ident),+>($($arg:ident: $ty:ty),*) $(-> $ret:ty)?
        => $generic:ident, $avx2:ident) => {
        $(#[$meta])*
        fn $name<$($t: $bound),+>($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: `$avx2` only assumes AVX2, which the CPU was just found to support.
                return unsafe { $avx2($($arg),*) };
            }
            $generic($($arg),*)
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2")]
        fn $avx2<$($t: $bound),+>($($arg: $ty),*) $(-> $ret)? {
            $generic($($arg),*)
        }
    };
}

pub(crate) mod accumulate;
pub(crate) mod agc;
pub(crate) mod apply;
pub(crate) mod fused_step;
pub(crate) mod grad_scaler;
pub(crate) mod reduce;
