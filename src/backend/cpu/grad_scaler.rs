//! [`GradScaler`](crate::GradScaler)'s passes on the CPU: `unscale_` in one read and one write of
//! each element, and the one-read path: the reduction reads the *scaled* gradients through
//! [`Unscaled`], which multiplies each element by `inv_scale` as it reads it ([`unscale`], rounded
//! to the gradient's dtype exactly as `GradScaler::unscale_` rounds it), so that one read-only pass
//! gives the norm and the finiteness of the unscaled gradients; the fused step then unscales each
//! element again as it reads it and writes the unscaled value back (`cpu::fused_step`).
//!
//! [`norm_unscaled`] is bitwise `cpu::reduce::norm` of the unscaled gradients: the same work
//! items, the same lanes, the same combining order and the same exact sum, on the unscaled values.

use candle_core::{bail, CpuStorage, InplaceOp1, Layout, Result, Tensor};
use rayon::prelude::*;

use super::reduce::{norm_read, ReadElement};
use super::{CHUNK, PARALLEL_MIN_ELEMENTS};
use crate::ops::element::Element;
use crate::ops::grad_scaler::unscale;
use crate::ops::gradients::{GradientSet, StorageGroups};
use crate::ops::norm::OneProcess;
use crate::ops::norm_type::NormType;

/// Unscales a slice in place (F32: the `f32` product itself, which vectorises).
pub(crate) fn unscale_in_place<T: Element>(xs: &mut [T], inv: f32) {
    if let Some(xs) = T::as_f32_slice_mut(xs) {
        xs.iter_mut().for_each(|x| *x *= inv);
        return;
    }
    xs.iter_mut().for_each(|x| *x = unscale(*x, inv));
}

/// Unscales a slice in place and tells whether any unscaled value is NaN or infinite.
fn unscale_and_check<T: Element>(xs: &mut [T], inv: f32) -> bool {
    if let Some(xs) = T::as_f32_slice_mut(xs) {
        let mut bad = false;
        for x in xs.iter_mut() {
            *x *= inv;
            bad |= !x.is_finite();
        }
        return bad;
    }
    let mut bad = false;
    for x in xs.iter_mut() {
        *x = unscale(*x, inv);
        bad |= !x.to_f64().is_finite();
    }
    bad
}

/// `GradScaler::unscale_` on the CPU: every gradient unscaled in place in one read and one write
/// of each element, the finite check on the way; whether any unscaled value is NaN or infinite.
/// The gradients must be contiguous and share no storage (the caller checks).
pub(crate) fn unscale_all_in_place(grads: &[Tensor], inv: f32) -> Result<bool> {
    struct UnscaleAndCheck {
        inv: f32,
        parallel: bool,
        found: std::cell::Cell<bool>,
    }
    impl InplaceOp1 for UnscaleAndCheck {
        fn name(&self) -> &'static str {
            "candle-grad-clip-unscale"
        }

        fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
            let Some((start, end)) = layout.contiguous_offsets() else {
                bail!("internal error: unscaling a non-contiguous gradient in place")
            };
            fn run<T: Element>(xs: &mut [T], inv: f32, parallel: bool) -> bool {
                if parallel && xs.len() > CHUNK {
                    xs.par_chunks_mut(CHUNK)
                        .map(|c| unscale_and_check(c, inv))
                        .reduce(|| false, |a, b| a | b)
                } else {
                    unscale_and_check(xs, inv)
                }
            }
            let (inv, parallel) = (self.inv, self.parallel);
            let bad = match storage {
                CpuStorage::F32(v) => run(&mut v[start..end], inv, parallel),
                CpuStorage::F64(v) => run(&mut v[start..end], inv, parallel),
                CpuStorage::F16(v) => run(&mut v[start..end], inv, parallel),
                CpuStorage::BF16(v) => run(&mut v[start..end], inv, parallel),
                _ => bail!("GradScaler: a gradient of a non-float dtype"),
            };
            self.found.set(self.found.get() | bad);
            Ok(())
        }

        #[cfg(feature = "cuda")]
        fn cuda_fwd(&self, _: &mut candle_core::CudaStorage, _: &Layout) -> Result<()> {
            bail!("internal error: the CPU unscale was called on CUDA storage")
        }
    }
    let elements: usize = grads.iter().map(|g| g.elem_count()).sum();
    let op = UnscaleAndCheck {
        inv,
        parallel: elements >= PARALLEL_MIN_ELEMENTS && rayon::current_num_threads() > 1,
        found: std::cell::Cell::new(false),
    };
    for grad in grads.iter().filter(|g| g.elem_count() > 0) {
        grad.inplace_op1(&op)?;
    }
    Ok(op.found.get())
}

/// Elements unscaled as they are read: [`unscale`] by `inv_scale`, rounded as
/// `GradScaler::unscale_` rounds it.
#[derive(Clone, Copy)]
pub(super) struct Unscaled(pub(super) f32);

impl ReadElement for Unscaled {
    #[inline(always)]
    fn read<T: Element>(self, x: T) -> f64 {
        unscale(x, self.0).to_f64()
    }

    fn sum_squares_f32_fast(self, xs: &[f32]) -> Option<f64> {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports AVX2 and FMA (checked just above), all it assumes.
            return Some(unsafe { avx2::sum_squares_unscaled_f32(xs, self.0) });
        }
        let _ = xs;
        None
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::super::reduce::combine_lanes;
    use super::super::LANES;

    /// `Σ (x · inv)²` over F32 in f64, `x · inv` the `f32` product (`unscale` for F32): the
    /// generic loop's lanes as 4-wide registers and a fused multiply-add per four elements. The
    /// square of an f32 is exact in f64, so `fma(u, u, acc)` rounds exactly as `acc + u * u`:
    /// bitwise the generic loop's result.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn sum_squares_unscaled_f32(xs: &[f32], inv: f32) -> f64 {
        let inv4 = _mm_set1_ps(inv);
        let mut acc = [_mm256_setzero_pd(); LANES / 4];
        let mut chunks = xs.chunks_exact(LANES);
        for c in &mut chunks {
            for (k, a) in acc.iter_mut().enumerate() {
                // SAFETY: `c` holds LANES floats and `acc` LANES / 4 registers, so the four read
                // at 4k..4k+4 are in bounds; `loadu` accepts any alignment.
                let x = unsafe { _mm_loadu_ps(c.as_ptr().add(4 * k)) };
                let u = _mm256_cvtps_pd(_mm_mul_ps(x, inv4));
                *a = _mm256_fmadd_pd(u, u, *a);
            }
        }
        let mut lanes = [0f64; LANES];
        for (k, a) in acc.iter().enumerate() {
            // SAFETY: `lanes` has LANES doubles; the four written at 4k..4k+4 are in bounds.
            unsafe { _mm256_storeu_pd(lanes.as_mut_ptr().add(4 * k), *a) };
        }
        let tail = chunks.remainder().iter().fold(0.0, |t, &x| {
            let u = (x * inv) as f64;
            t + u * u
        });
        combine_lanes(lanes, tail)
    }
}

/// The norm of the gradients multiplied by `inv` ([`unscale`]), read-only: bitwise
/// [`norm`](super::reduce::norm) of the unscaled gradients (the same work items, lanes, combining
/// order, exact sum and rescue pass, on the unscaled values).
pub(crate) fn norm_unscaled(
    set: &GradientSet,
    groups: &StorageGroups,
    norm_type: NormType,
    inv: f32,
) -> Result<f64> {
    norm_read(set, groups, norm_type, Unscaled(inv), &mut OneProcess(set))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::reduce::{norm, sum_powers_generic};
    use crate::ops::norm::Power;
    use candle_core::{DType, Device, Tensor};
    use rand::{rngs::StdRng, Rng, SeedableRng};

    /// `g * inv` as `GradScaler::unscale_` computes it, with candle's ops.
    fn unscaled_by_candle(g: &Tensor, inv: f32) -> Result<Tensor> {
        let inv = Tensor::new(inv, &Device::Cpu)?;
        match g.dtype() {
            DType::F32 => g.broadcast_mul(&inv),
            DType::F64 => g.broadcast_mul(&inv.to_dtype(DType::F64)?),
            _ => g
                .to_dtype(DType::F32)?
                .broadcast_mul(&inv)?
                .to_dtype(g.dtype()),
        }
    }

    #[test]
    fn the_unscaled_norm_is_the_norm_of_the_unscaled_gradients_bitwise() -> Result<()> {
        let mut rng = StdRng::seed_from_u64(9);
        let shapes: [&[usize]; 5] = [&[70_001], &[33, 65], &[1], &[0], &[3, 1000]];
        for (case, dtype) in [DType::F32, DType::F64, DType::BF16]
            .into_iter()
            .enumerate()
        {
            for inv in [1.0 / 65536.0, 1.0 / 1000.0, 3.7, 1.0 / 3e38] {
                let mut grads = vec![];
                for (k, shape) in shapes.iter().enumerate() {
                    let n: usize = shape.iter().product();
                    let big = if k == 0 { 1e30 } else { 1e4 };
                    let v: Vec<f64> = (0..n).map(|_| rng.gen_range(-big..big)).collect();
                    let t = Tensor::from_vec(v, shape.to_vec(), &Device::Cpu)?.to_dtype(dtype)?;
                    // The last one as a non-contiguous view.
                    grads.push(if k == 4 { t.t()? } else { t });
                }
                let scaled = GradientSet::from_grads(grads.clone())?;
                let unscaled = GradientSet::from_grads(
                    grads
                        .iter()
                        .map(|g| unscaled_by_candle(g, inv))
                        .collect::<Result<_>>()?,
                )?;
                for norm_type in [
                    NormType::L1,
                    NormType::L2,
                    NormType::Inf,
                    NormType::P(3.0),
                    NormType::P(7.5),
                ] {
                    let got = norm_unscaled(&scaled, &scaled.group_by_storage(), norm_type, inv)?;
                    let want = norm(&unscaled, &unscaled.group_by_storage(), norm_type)?;
                    assert_eq!(
                        got.to_bits(),
                        want.to_bits(),
                        "case {case} {dtype:?} inv {inv} {norm_type:?}: {got} vs {want}"
                    );
                }
            }
        }
        Ok(())
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn hand_vectorised_unscaled_squares_match_the_generic_loop_bitwise() {
        if !(std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma"))
        {
            return;
        }
        let mut rng = StdRng::seed_from_u64(11);
        for len in [0, 1, 31, 32, 33, 1000, 4099] {
            let xs: Vec<f32> = (0..len)
                .map(|_| rng.gen_range(-1e4f32..1e4) * 2f32.powi(rng.gen_range(-60..60)))
                .collect();
            for inv in [1.0 / 65536.0, 1.0 / 1000.0, 3.7] {
                // SAFETY: AVX2 and FMA were found above.
                let fast = unsafe { avx2::sum_squares_unscaled_f32(&xs, inv) };
                let generic = sum_powers_generic(&xs, Power::Square, Unscaled(inv));
                assert_eq!(fast.to_bits(), generic.to_bits(), "len {len} inv {inv}");
            }
        }
    }

    #[test]
    fn unscale_is_candles_product_bitwise() -> Result<()> {
        let mut rng = StdRng::seed_from_u64(10);
        for dtype in [DType::F32, DType::F64, DType::BF16] {
            let v: Vec<f64> = (0..4096)
                .map(|i| match i % 7 {
                    0 => f64::INFINITY,
                    1 => rng.gen_range(-3e38..3e38),
                    _ => rng.gen_range(-1e3..1e3) * 2f64.powi(rng.gen_range(-140..100)),
                })
                .collect();
            let t = Tensor::from_vec(v, 4096, &Device::Cpu)?.to_dtype(dtype)?;
            for inv in [1.0 / 3000.0, 7.0, 1.0 / 65536.0] {
                let want = unscaled_by_candle(&t, inv)?
                    .to_dtype(DType::F64)?
                    .to_vec1::<f64>()?;
                let got: Vec<f64> = match dtype {
                    DType::F32 => t
                        .to_vec1::<f32>()?
                        .into_iter()
                        .map(|x| unscale(x, inv) as f64)
                        .collect(),
                    DType::F64 => t
                        .to_vec1::<f64>()?
                        .into_iter()
                        .map(|x| unscale(x, inv))
                        .collect(),
                    _ => t
                        .to_vec1::<half::bf16>()?
                        .into_iter()
                        .map(|x| unscale(x, inv).to_f64())
                        .collect(),
                };
                for (g, w) in got.iter().zip(&want) {
                    assert!(
                        g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
                        "{dtype:?} {inv}: {g} vs {w}"
                    );
                }
            }
        }
        Ok(())
    }
}
