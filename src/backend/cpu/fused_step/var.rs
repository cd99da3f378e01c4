//! One var of a CPU step: its parameter written in place through candle's `inplace_op1`, its
//! gradient read (or, on GradScaler's one-read path, unscaled in place and read), its state
//! slices updated, in parallel chunks for large vars; AGC's units each with their own clip.

use std::cell::RefCell;

use candle_core::{bail, CpuStorage, InplaceOp1, Layout, Result, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;

use super::rules::{update_block, Consts, StateSlice, StateType};
use crate::backend::cpu::apply::ElementKernel;
use crate::backend::cpu::grad_scaler::unscale_in_place;
use crate::backend::cpu::Data;
use crate::ops::clip::ElementwiseOp;
use crate::ops::element::Element;
use crate::ops::fused_step::{Rule, Target};

/// Elements per parallel work item within one large var.
const PARALLEL_CHUNK: usize = 1 << 15;

/// One var's update, as candle's in-place op on its parameter (the state slices are already
/// held).
pub(super) struct Update<'a> {
    pub(super) state: RefCell<Option<[Option<StateSlice<'a>>; 2]>>,
    pub(super) rule: Rule,
    pub(super) t: i64,
    pub(super) has_state: bool,
    pub(super) transform: Option<ElementwiseOp>,
    /// GradScaler's `inv_scale`: each gradient element is unscaled in place, then read.
    pub(super) unscale: Option<f32>,
    pub(super) parallel: bool,
    /// AGC: the var's unit coefficients (the unit's gradient scaled as it is read, or untouched).
    pub(super) units: Option<&'a [Option<f64>]>,
}

/// Updates one var: its parameter written in place, its gradient `grad` read (through a contiguous copy
/// when it is a strided view), clipped on the way through `transform`.
pub(super) fn update_target(target: &Target, grad: &Tensor, job: &Update<'_>) -> Result<()> {
    if target.param.elem_count() == 0 {
        return Ok(());
    }
    if job.unscale.is_some() {
        // Written too: the gradient's storage locked for writing, then the parameter's (distinct
        // storages: `check_gradient`, and GradScaler takes this path only for gradients that
        // share no storage).
        return grad.inplace_op1(&UnscaleAndUpdate { target, job });
    }
    let grad = if grad.layout().contiguous_offsets().is_some() {
        grad.clone()
    } else {
        grad.contiguous()?
    };
    let (g_storage, g_layout) = grad.storage_and_layout();
    let Some((g_start, g_end)) = g_layout.contiguous_offsets() else {
        bail!("internal error: a contiguous copy is not contiguous")
    };
    let g = Data::of(&g_storage)?.range(g_start, g_end);
    target.param.inplace_op1(&UpdateParam {
        job,
        g: Grad::Read(g),
    })
}

struct UpdateParam<'j, 'a, 'g> {
    job: &'j Update<'a>,
    g: Grad<'g>,
}

/// The gradient as the update takes it: read, or unscaled in place and then read.
enum Grad<'g> {
    Read(Data<'g>),
    Unscale(RefCell<Option<DataMut<'g>>>),
}

/// A writable gradient slice, by dtype.
enum DataMut<'a> {
    F32(&'a mut [f32]),
    F64(&'a mut [f64]),
    F16(&'a mut [f16]),
    BF16(&'a mut [bf16]),
}

/// A gradient slice as `run` takes it.
enum GradSlice<'g, T> {
    Read(&'g [T]),
    Unscale(&'g mut [T], f32),
}

/// Holds a gradient's storage for writing while its parameter is updated (GradScaler's one-read
/// path).
struct UnscaleAndUpdate<'t, 'j, 'a> {
    target: &'t Target,
    job: &'j Update<'a>,
}

impl InplaceOp1 for UnscaleAndUpdate<'_, '_, '_> {
    fn name(&self) -> &'static str {
        "candle-grad-clip-fused-step-unscale"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            bail!("internal error: a prescaled step with a non-contiguous gradient")
        };
        let g = match storage {
            CpuStorage::F32(v) => DataMut::F32(&mut v[start..end]),
            CpuStorage::F64(v) => DataMut::F64(&mut v[start..end]),
            CpuStorage::F16(v) => DataMut::F16(&mut v[start..end]),
            CpuStorage::BF16(v) => DataMut::BF16(&mut v[start..end]),
            _ => bail!("fused optimizer step: a gradient of a non-float dtype"),
        };
        self.target.param.inplace_op1(&UpdateParam {
            job: self.job,
            g: Grad::Unscale(RefCell::new(Some(g))),
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, _: &mut candle_core::CudaStorage, _: &Layout) -> Result<()> {
        bail!("internal error: the CPU step was called on CUDA storage")
    }
}

impl InplaceOp1 for UpdateParam<'_, '_, '_> {
    fn name(&self) -> &'static str {
        "candle-grad-clip-fused-step"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            bail!("fused optimizer steps need contiguous vars")
        };
        let Some([s0, s1]) = self.job.state.borrow_mut().take() else {
            bail!("internal error: a var was updated twice")
        };
        let (p, j) = (storage, self.job);
        let mismatch = || bail!("fused optimizer step: a var and its gradient differ in dtype");
        match &self.g {
            Grad::Read(g) => match (p, *g) {
                (CpuStorage::F32(p), Data::F32(g)) => {
                    run::<f32, f32>(&mut p[start..end], GradSlice::Read(g), s0, s1, j)
                }
                (CpuStorage::F64(p), Data::F64(g)) => {
                    run::<f64, f64>(&mut p[start..end], GradSlice::Read(g), s0, s1, j)
                }
                (CpuStorage::F16(p), Data::F16(g)) => {
                    run::<f16, f32>(&mut p[start..end], GradSlice::Read(g), s0, s1, j)
                }
                (CpuStorage::BF16(p), Data::BF16(g)) => {
                    run::<bf16, f32>(&mut p[start..end], GradSlice::Read(g), s0, s1, j)
                }
                _ => mismatch(),
            },
            Grad::Unscale(g) => {
                let (Some(g), Some(inv)) = (g.borrow_mut().take(), j.unscale) else {
                    bail!("internal error: a gradient was unscaled twice")
                };
                match (p, g) {
                    (CpuStorage::F32(p), DataMut::F32(g)) => {
                        run::<f32, f32>(&mut p[start..end], GradSlice::Unscale(g, inv), s0, s1, j)
                    }
                    (CpuStorage::F64(p), DataMut::F64(g)) => {
                        run::<f64, f64>(&mut p[start..end], GradSlice::Unscale(g, inv), s0, s1, j)
                    }
                    (CpuStorage::F16(p), DataMut::F16(g)) => {
                        run::<f16, f32>(&mut p[start..end], GradSlice::Unscale(g, inv), s0, s1, j)
                    }
                    (CpuStorage::BF16(p), DataMut::BF16(g)) => {
                        run::<bf16, f32>(&mut p[start..end], GradSlice::Unscale(g, inv), s0, s1, j)
                    }
                    _ => mismatch(),
                }
            }
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, _: &mut candle_core::CudaStorage, _: &Layout) -> Result<()> {
        bail!("internal error: the CPU step was called on CUDA storage")
    }
}

/// Updates one var's parameter `p` (its state slices `s0`, `s1`) from its gradient `g`.
fn run<T: Element, C: StateType>(
    p: &mut [T],
    g: GradSlice<'_, T>,
    s0: Option<StateSlice<'_>>,
    s1: Option<StateSlice<'_>>,
    job: &Update<'_>,
) -> Result<()> {
    let Update {
        rule,
        t,
        has_state,
        transform,
        parallel,
        units,
        ..
    } = *job;
    let (s0, s1) = (C::slice(s0)?, C::slice(s1)?);
    let n = p.len();
    let g_len = match &g {
        GradSlice::Read(g) => g.len(),
        GradSlice::Unscale(g, _) => g.len(),
    };
    if g_len != n || (!s0.is_empty() && s0.len() != n) || (!s1.is_empty() && s1.len() != n) {
        bail!("internal error: a var, its gradient and its state differ in length")
    }
    let consts = Consts::<C>::new(rule, t, has_state);
    let kernel = transform.map(ElementKernel::<T>::new);
    // Absent state slices are empty (the rule does not read them).
    let work = |p: &mut [T], g: &[T], s0: &mut [C], s1: &mut [C]| {
        update_block(&consts, p, g, s0, s1, kernel);
    };
    if let Some(units) = units {
        // AGC never runs prescaled (`optim::clip_setting::prescale_supports`).
        let GradSlice::Read(g) = g else {
            bail!("internal error: a prescaled AGC step")
        };
        return run_units(&consts, p, g, s0, s1, units, parallel);
    }
    // Unscaled chunk by chunk, each chunk updated while it is in cache: one read of the
    // gradient from memory.
    let unscale_then_work = |p: &mut [T], g: &mut [T], s0: &mut [C], s1: &mut [C], inv| {
        unscale_in_place(g, inv);
        work(p, g, s0, s1);
    };
    match g {
        GradSlice::Read(g) if parallel && n > PARALLEL_CHUNK => {
            let s0_chunks: Vec<&mut [C]> = chunks_or_empty(s0, n);
            let s1_chunks: Vec<&mut [C]> = chunks_or_empty(s1, n);
            p.par_chunks_mut(PARALLEL_CHUNK)
                .zip(g.par_chunks(PARALLEL_CHUNK))
                .zip(s0_chunks.into_par_iter())
                .zip(s1_chunks.into_par_iter())
                .for_each(|(((p, g), s0), s1)| work(p, g, s0, s1));
        }
        GradSlice::Read(g) => work(p, g, s0, s1),
        GradSlice::Unscale(g, inv) => {
            let s0_chunks: Vec<&mut [C]> = chunks_or_empty(s0, n);
            let s1_chunks: Vec<&mut [C]> = chunks_or_empty(s1, n);
            let chunks = p
                .chunks_mut(PARALLEL_CHUNK)
                .zip(g.chunks_mut(PARALLEL_CHUNK))
                .zip(s0_chunks)
                .zip(s1_chunks);
            if parallel && n > PARALLEL_CHUNK {
                let chunks: Vec<_> = chunks.collect();
                chunks
                    .into_par_iter()
                    .for_each(|(((p, g), s0), s1)| unscale_then_work(p, g, s0, s1, inv));
            } else {
                chunks.for_each(|(((p, g), s0), s1)| unscale_then_work(p, g, s0, s1, inv));
            }
        }
    }
    Ok(())
}

/// [`run`] for AGC: the var cut into pieces of consecutive units that share a clip (runs of
/// untouched units, each clipped unit alone), pieces of at most [`PARALLEL_CHUNK`] elements, each
/// updated with its clip.
fn run_units<T: Element, C: StateType>(
    consts: &Consts<C>,
    mut p: &mut [T],
    mut g: &[T],
    mut s0: &mut [C],
    mut s1: &mut [C],
    units: &[Option<f64>],
    parallel: bool,
) -> Result<()> {
    let n = p.len();
    if units.is_empty() || n % units.len() != 0 {
        bail!(
            "internal error: AGC coefficients for {} units of a var of {n} elements",
            units.len()
        )
    }
    let unit_len = n / units.len();
    // (elements, clip) of each piece, in order.
    let mut pieces: Vec<(usize, Option<f64>)> = Vec::new();
    for &c in units {
        match (pieces.last_mut(), c) {
            (Some((len, None)), None) => *len += unit_len,
            _ => pieces.push((unit_len, c)),
        }
    }
    type Block<'x, T, C> = (&'x mut [T], &'x [T], &'x mut [C], &'x mut [C], Option<f64>);
    let mut blocks: Vec<Block<'_, T, C>> = Vec::new();
    fn take<'x, C>(s: &mut &'x mut [C], len: usize) -> &'x mut [C] {
        if s.is_empty() {
            &mut []
        } else {
            let (head, tail) = std::mem::take(s).split_at_mut(len);
            *s = tail;
            head
        }
    }
    for (mut len, c) in pieces {
        while len > 0 {
            let step = len.min(PARALLEL_CHUNK);
            let (ph, pt) = std::mem::take(&mut p).split_at_mut(step);
            p = pt;
            let (gh, gt) = g.split_at(step);
            g = gt;
            let (a, b) = (take(&mut s0, step), take(&mut s1, step));
            blocks.push((ph, gh, a, b, c));
            len -= step;
        }
    }
    let work = |(p, g, s0, s1, c): Block<'_, T, C>| {
        update_block(consts, p, g, s0, s1, c.map(ElementKernel::Scale));
    };
    if parallel && n > PARALLEL_CHUNK {
        blocks.into_par_iter().for_each(work);
    } else {
        blocks.into_iter().for_each(work);
    }
    Ok(())
}

/// `s` cut into the chunks `p` is cut into, or as many empty slices when `s` is empty.
fn chunks_or_empty<C>(s: &mut [C], n: usize) -> Vec<&mut [C]> {
    if s.is_empty() {
        (0..n.div_ceil(PARALLEL_CHUNK))
            .map(|_| &mut [][..])
            .collect()
    } else {
        s.chunks_mut(PARALLEL_CHUNK).collect()
    }
}
