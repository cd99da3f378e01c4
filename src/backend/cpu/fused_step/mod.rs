//! The CPU twin of the fused optimizer step (`ops::fused_step`): the clip's norm through this
//! back end's reduction, then one pass over every var that reads the gradient, forms the clipped
//! gradient exactly as the clip's own element pass does (the same `scale` / `clamp` functions, on
//! the value read: the `GradStore` is never written), and updates the parameter and its state in
//! place.
//!
//! Arithmetic, element by element:
//! - F32 and F64 vars compute in their own type with candle's CPU op sequence, each rounding
//!   reproduced, so that a step is bitwise `candle_nn::AdamW::step` / `SGD::step`: an affine
//!   `x * c` of candle is `x * c + 0` (which turns `-0` into `+0`), a scalar add `x + c` is
//!   `x * 1 + c`;
//! - F16 and BF16 vars compute in `f32` with `f32` state, the same sequence, and round the new
//!   parameter once to their dtype;
//! - SGD with momentum or weight decay follows PyTorch's `torch.optim.SGD`, one rounding per
//!   operation, in the same compute type.
//!
//! With a `prescale` (GradScaler's one-read path, `cpu::prescale`), the gradients hold scaled
//! values: the reduction unscales each element as it reads it, and the update unscales each chunk
//! of a gradient in place (written back: the store then holds unscaled gradients) just before
//! reading it from cache; a skipped step unscales them too.

use std::cell::RefCell;
use std::ops::{Add, Div, Mul, Sub};

use candle_core::{bail, CpuStorage, DType, InplaceOp1, Layout, Result, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;

use super::apply::ElementKernel;
use super::grad_scaler::{norm_unscaled, unscale_all_in_place, unscale_in_place};
use super::reduce::{norm, norm_tensor};
use super::Data;
use crate::ops::clip::{clip_coefficient, needs_scaling, ElementwiseOp};
use crate::ops::element::{clamp, scale, Element};
use crate::ops::fused_step::{
    Outcome, Place, Rule, Step, StepClip, Target, CLIPPED, CONTROL_WORDS, SKIPPED, STEPS,
};
use crate::ops::gradients::GradientSet;
use crate::ops::norm_type::NormType;
use crate::ops::zclip::update_on_host;

/// Elements per parallel work item within one large var.
const PARALLEL_CHUNK: usize = 1 << 15;
/// Below this many elements a step runs on the calling thread. Lower than the clip's threshold:
/// an update does ten times the arithmetic of a read pass per element.
const PARALLEL_MIN_STEP_ELEMENTS: usize = 1 << 16;

/// The compute types: `f32` (F32, F16 and BF16 vars) and `f64`.
trait Real:
    Element + Add<Output = Self> + Sub<Output = Self> + Mul<Output = Self> + Div<Output = Self>
{
    fn sqrt(self) -> Self;
}

impl Real for f32 {
    #[inline(always)]
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
}

impl Real for f64 {
    #[inline(always)]
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
}

/// The step's decision before the update: what to do to the gradients, whether they were
/// clipped, whether they are all finite.
struct Decision {
    transform: Option<ElementwiseOp>,
    clipped: bool,
    nonfinite: bool,
    norm: Option<Tensor>,
    policy_state: Option<Tensor>,
    /// AGC: each target's unit coefficients (`None`: the unit is untouched).
    units: Option<Vec<Vec<Option<f64>>>>,
}

fn decide(step: &Step, set: &GradientSet, prescale: Option<f32>) -> Result<Decision> {
    let groups = set.group_by_storage();
    // The norm of the gradients, or of the unscaled gradients (GradScaler's one read).
    let norm = |set: &GradientSet, groups: &_, norm_type| match prescale {
        Some(inv) => norm_unscaled(set, groups, norm_type, inv),
        None => norm(set, groups, norm_type),
    };
    Ok(match step.clip {
        StepClip::Norm {
            norm_type,
            max_norm,
            eps,
        } => {
            let n = norm(set, &groups, norm_type)?;
            let c = clip_coefficient(n, max_norm, eps);
            Decision {
                transform: needs_scaling(c).then_some(ElementwiseOp::Scale(c)),
                clipped: needs_scaling(c),
                nonfinite: !n.is_finite(),
                norm: Some(norm_tensor(n, set.norm_dtype())?),
                policy_state: None,
                units: None,
            }
        }
        StepClip::ZClip { state, params } => {
            let n = norm(set, &groups, NormType::L2)?;
            let (c, state) = update_on_host(n, set.norm_dtype(), state, &params)?;
            Decision {
                transform: needs_scaling(c).then_some(ElementwiseOp::Scale(c)),
                clipped: needs_scaling(c),
                nonfinite: !n.is_finite(),
                norm: Some(norm_tensor(n, set.norm_dtype())?),
                policy_state: Some(state),
                units: None,
            }
        }
        StepClip::Agc { clipping, eps } => {
            let params: Vec<Tensor> = step.targets.iter().map(|t| t.param.clone()).collect();
            let (n, units) = super::agc::coefficients(&params, set.grads(), clipping, eps)?;
            let clipped = units.iter().any(|u| u.iter().any(Option::is_some));
            Decision {
                transform: None,
                clipped,
                nonfinite: !n.is_finite(),
                norm: Some(norm_tensor(n, set.norm_dtype())?),
                policy_state: None,
                units: Some(units),
            }
        }
        StepClip::Value(v) => {
            let n = norm(set, &groups, NormType::Inf)?;
            Decision {
                transform: Some(ElementwiseOp::Clamp(v)),
                // Some |g| above the bound, or NaN.
                clipped: n > v || n.is_nan(),
                nonfinite: !n.is_finite(),
                norm: Some(norm_tensor(n, set.norm_dtype())?),
                policy_state: None,
                units: None,
            }
        }
        StepClip::GivenNorm { .. } if step.prescale.is_some() => {
            bail!("internal error: a prescaled step with a given norm")
        }
        StepClip::GivenNorm {
            norm: given,
            max_norm,
            eps,
        } => {
            let n = given.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            let c = clip_coefficient(n, max_norm, eps);
            Decision {
                transform: needs_scaling(c).then_some(ElementwiseOp::Scale(c)),
                clipped: needs_scaling(c),
                nonfinite: !n.is_finite(),
                norm: None,
                policy_state: None,
                units: None,
            }
        }
        StepClip::None => Decision {
            transform: None,
            clipped: false,
            nonfinite: step.skip_nonfinite && !norm(set, &groups, NormType::Inf)?.is_finite(),
            norm: None,
            policy_state: None,
            units: None,
        },
    })
}

/// Runs the step on the CPU.
pub(crate) fn step(step: &Step) -> Result<Outcome> {
    let prescale = step.inv_scale_on_host()?;
    let decision = decide(step, step.grads, prescale)?;
    let mut control = step.control.to_vec1::<i64>()?;
    if step.skip_nonfinite && decision.nonfinite {
        control[SKIPPED] += 1;
        // The store holds unscaled gradients after a skipped step too.
        if let Some(inv) = prescale {
            unscale_all_in_place(step.grads.grads(), inv)?;
        }
    } else {
        let t = control[STEPS] + 1;
        let elements: usize = step.targets.iter().map(|t| t.param.elem_count()).sum();
        let parallel = elements >= PARALLEL_MIN_STEP_ELEMENTS && rayon::current_num_threads() > 1;
        // Every state buffer the rule uses, locked once for the whole step.
        let count = step.rule.state_count();
        let buffers: Vec<(usize, usize, &Tensor)> = step.state.buffers[..count]
            .iter()
            .enumerate()
            .flat_map(|(slot, b)| {
                b.iter()
                    .enumerate()
                    .filter_map(move |(class, t)| t.as_ref().map(|t| (slot, class, t)))
            })
            .collect();
        let tensors: Vec<&Tensor> = buffers.iter().map(|(_, _, t)| *t).collect();
        with_storages_mut(&tensors, &mut |storages: &mut [&mut CpuStorage]| {
            // Each target's slices of the state buffers (disjoint: the vars' places).
            let mut slices: Vec<[Option<StateSlice<'_>>; 2]> =
                step.targets.iter().map(|_| [None, None]).collect();
            for ((slot, class, _), storage) in buffers.iter().zip(storages.iter_mut()) {
                let places = step
                    .targets
                    .iter()
                    .enumerate()
                    .map(|(k, t)| (k, step.state.places[t.index]))
                    .filter(|(_, p)| p.class == *class);
                match &mut **storage {
                    CpuStorage::F32(v) => {
                        for (k, s) in split_places(v, places)? {
                            slices[k][*slot] = Some(StateSlice::F32(s));
                        }
                    }
                    CpuStorage::F64(v) => {
                        for (k, s) in split_places(v, places)? {
                            slices[k][*slot] = Some(StateSlice::F64(s));
                        }
                    }
                    _ => bail!("internal error: optimizer state is not F32 or F64"),
                }
            }
            let run = |(((target, grad), state), units): (((&Target, &Tensor), _), _)| {
                let has_state = control[CONTROL_WORDS + target.index] != 0;
                let job = Update {
                    state: RefCell::new(Some(state)),
                    rule: step.rule,
                    t,
                    has_state,
                    transform: decision.transform,
                    unscale: prescale,
                    parallel,
                    units,
                };
                update_target(target, grad, &job)
            };
            let grads = step.grads.grads();
            let units: Vec<Option<&[Option<f64>]>> = match &decision.units {
                Some(units) => units.iter().map(|u| Some(u.as_slice())).collect(),
                None => vec![None; step.targets.len()],
            };
            if parallel {
                (step.targets.par_iter().zip(grads))
                    .zip(slices)
                    .zip(units)
                    .try_for_each(run)
            } else {
                (step.targets.iter().zip(grads))
                    .zip(slices)
                    .zip(units)
                    .try_for_each(run)
            }
        })?;
        control[STEPS] = t;
        control[CLIPPED] += decision.clipped as i64;
        if count > 0 {
            for target in &step.targets {
                control[CONTROL_WORDS + target.index] = 1;
            }
        }
    }
    step.control.inplace_op1(&WriteControl(&control))?;
    Ok(Outcome {
        norm: decision.norm,
        policy_state: decision.policy_state,
    })
}

/// One var's slice of a state buffer.
enum StateSlice<'a> {
    F32(&'a mut [f32]),
    F64(&'a mut [f64]),
}

/// `data` cut at the given places (ascending, disjoint): each target's slice, by target index.
fn split_places<C>(
    mut data: &mut [C],
    places: impl Iterator<Item = (usize, Place)>,
) -> Result<Vec<(usize, &mut [C])>> {
    let mut consumed = 0;
    let mut out = Vec::new();
    for (k, place) in places {
        if place.offset < consumed || place.offset + place.len - consumed > data.len() {
            bail!("internal error: optimizer state places out of order or out of bounds")
        }
        let (_, rest) = std::mem::take(&mut data).split_at_mut(place.offset - consumed);
        let (mine, rest) = rest.split_at_mut(place.len);
        out.push((k, mine));
        data = rest;
        consumed = place.offset + place.len;
    }
    Ok(out)
}

/// Replaces the control tensor's values.
struct WriteControl<'a>(&'a [i64]);

impl InplaceOp1 for WriteControl<'_> {
    fn name(&self) -> &'static str {
        "candle-grad-clip-control"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, _: &Layout) -> Result<()> {
        match storage {
            CpuStorage::I64(v) if v.len() == self.0.len() => {
                v.copy_from_slice(self.0);
                Ok(())
            }
            _ => {
                bail!("internal error: the control tensor is not an I64 vector of the right length")
            }
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, _: &mut candle_core::CudaStorage, _: &Layout) -> Result<()> {
        bail!("internal error: the CPU step was called on CUDA storage")
    }
}

// ---------------------------------------------------------------------------------------------
// One var.

/// The constants of a rule in the compute type `C`, for step `t`.
#[derive(Clone, Copy)]
enum Consts<C> {
    AdamW {
        beta1: C,
        one_minus_beta1: C,
        beta2: C,
        one_minus_beta2: C,
        scale_m: C,
        scale_v: C,
        eps: C,
        decay: C,
        lr: C,
    },
    /// `p - g * lr` as candle's `SGD` (momentum and weight decay off).
    PlainSgd { lr: C },
    Sgd {
        lr: C,
        momentum: Option<C>,
        one_minus_dampening: C,
        weight_decay: Option<C>,
        nesterov: bool,
        /// The momentum buffer exists (else this step starts it with the gradient).
        has_buffer: bool,
    },
}

impl<C: Real> Consts<C> {
    fn new(rule: Rule, t: i64, has_state: bool) -> Self {
        let c = C::from_f64;
        match rule {
            Rule::AdamW {
                lr,
                beta1,
                beta2,
                eps,
                weight_decay,
            } => {
                // As candle_nn::AdamW::step, in f64, then one rounding to `C` per constant.
                let scale_m = 1f64 / (1f64 - beta1.powi(t as i32));
                let scale_v = 1f64 / (1f64 - beta2.powi(t as i32));
                Consts::AdamW {
                    beta1: c(beta1),
                    one_minus_beta1: c(1.0 - beta1),
                    beta2: c(beta2),
                    one_minus_beta2: c(1.0 - beta2),
                    scale_m: c(scale_m),
                    scale_v: c(scale_v),
                    eps: c(eps),
                    decay: c(1f64 - lr * weight_decay),
                    lr: c(lr),
                }
            }
            Rule::Sgd { lr, .. } if rule.is_plain_sgd() => Consts::PlainSgd { lr: c(lr) },
            Rule::Sgd {
                lr,
                momentum,
                dampening,
                weight_decay,
                nesterov,
            } => Consts::Sgd {
                lr: c(lr),
                momentum: (momentum != 0.0).then(|| c(momentum)),
                one_minus_dampening: c(1.0 - dampening),
                weight_decay: (weight_decay != 0.0).then(|| c(weight_decay)),
                nesterov,
                has_buffer: has_state,
            },
        }
    }

    /// Updates `p` (and the state) from the gradient `g`, element by element, each gradient
    /// element first through `clip` (the clip's own element kernel, or the identity).
    #[inline(always)]
    fn update<T: Element>(
        &self,
        p: &mut [T],
        g: &[T],
        s0: &mut [C],
        s1: &mut [C],
        clip: impl Fn(T) -> T + Copy,
    ) {
        let zero = C::from_f64(0.0);
        let one = C::from_f64(1.0);
        let to_c = |x: T| C::from_f64(x.to_f64());
        match *self {
            Consts::AdamW {
                beta1,
                one_minus_beta1,
                beta2,
                one_minus_beta2,
                scale_m,
                scale_v,
                eps,
                decay,
                lr,
            } => {
                for (((p, &g), m), v) in p.iter_mut().zip(g).zip(s0.iter_mut()).zip(s1.iter_mut()) {
                    let g = to_c(clip(g));
                    // candle: m * beta1 + g * (1 - beta1), v * beta2 + g² * (1 - beta2), each
                    // `tensor * scalar` an affine `x * c + 0`.
                    let next_m = (*m * beta1 + zero) + (g * one_minus_beta1 + zero);
                    let next_v = (*v * beta2 + zero) + ((g * g) * one_minus_beta2 + zero);
                    let m_hat = next_m * scale_m + zero;
                    let v_hat = next_v * scale_v + zero;
                    // sqrt(v_hat) + eps is the affine `x * 1 + eps`.
                    let adjusted = m_hat / (v_hat.sqrt() * one + eps);
                    let next_p = (to_c(*p) * decay + zero) - (adjusted * lr + zero);
                    *m = next_m;
                    *v = next_v;
                    *p = T::from_f64(next_p.to_f64());
                }
            }
            Consts::PlainSgd { lr } => {
                for (p, &g) in p.iter_mut().zip(g) {
                    *p = T::from_f64((to_c(*p) - (to_c(clip(g)) * lr + zero)).to_f64());
                }
            }
            Consts::Sgd {
                lr,
                momentum,
                one_minus_dampening,
                weight_decay,
                nesterov,
                has_buffer,
            } => {
                // One loop per combination, so that none branches per element (and each
                // vectorises).
                let k = SgdConsts {
                    lr,
                    mu: momentum.unwrap_or(zero),
                    one_minus_dampening,
                    weight_decay: weight_decay.unwrap_or(zero),
                };
                match (weight_decay.is_some(), momentum, nesterov, has_buffer) {
                    // Without momentum, Nesterov and the buffer play no part.
                    (false, None, _, _) => {
                        sgd::<T, C, false, false, false, false>(k, p, g, s0, clip)
                    }
                    (true, None, _, _) => sgd::<T, C, true, false, false, false>(k, p, g, s0, clip),
                    (false, Some(_), false, false) => {
                        sgd::<T, C, false, true, false, false>(k, p, g, s0, clip)
                    }
                    (false, Some(_), false, true) => {
                        sgd::<T, C, false, true, false, true>(k, p, g, s0, clip)
                    }
                    (false, Some(_), true, false) => {
                        sgd::<T, C, false, true, true, false>(k, p, g, s0, clip)
                    }
                    (false, Some(_), true, true) => {
                        sgd::<T, C, false, true, true, true>(k, p, g, s0, clip)
                    }
                    (true, Some(_), false, false) => {
                        sgd::<T, C, true, true, false, false>(k, p, g, s0, clip)
                    }
                    (true, Some(_), false, true) => {
                        sgd::<T, C, true, true, false, true>(k, p, g, s0, clip)
                    }
                    (true, Some(_), true, false) => {
                        sgd::<T, C, true, true, true, false>(k, p, g, s0, clip)
                    }
                    (true, Some(_), true, true) => {
                        sgd::<T, C, true, true, true, true>(k, p, g, s0, clip)
                    }
                }
            }
        }
    }
}

/// SGD's constants in the compute type.
#[derive(Clone, Copy)]
struct SgdConsts<C> {
    lr: C,
    mu: C,
    one_minus_dampening: C,
    weight_decay: C,
}

/// `torch.optim.SGD` on a block: `d = g (+ wd·p)`; with momentum `b = d` (first gradient) or
/// `b = μ·b + (1 − dampening)·d`, then `d = d + μ·b` (Nesterov) or `d = b`; `p = p − lr·d`.
#[inline(always)]
fn sgd<
    T: Element,
    C: Real,
    const WD: bool,
    const MOMENTUM: bool,
    const NESTEROV: bool,
    const BUFFER: bool,
>(
    k: SgdConsts<C>,
    p: &mut [T],
    g: &[T],
    s0: &mut [C],
    clip: impl Fn(T) -> T,
) {
    let to_c = |x: T| C::from_f64(x.to_f64());
    let step = |p: &mut T, g: T, b: Option<&mut C>| {
        let x = to_c(*p);
        let mut d = to_c(clip(g));
        if WD {
            d = d + k.weight_decay * x;
        }
        if let Some(b) = b {
            let nb = if BUFFER {
                *b * k.mu + k.one_minus_dampening * d
            } else {
                d
            };
            *b = nb;
            d = if NESTEROV { d + k.mu * nb } else { nb };
        }
        *p = T::from_f64((x - k.lr * d).to_f64());
    };
    if MOMENTUM {
        for ((p, &g), b) in p.iter_mut().zip(g).zip(s0.iter_mut()) {
            step(p, g, Some(b));
        }
    } else {
        for (p, &g) in p.iter_mut().zip(g) {
            step(p, g, None);
        }
    }
}

/// One var's update, as candle's in-place op on its parameter (the state slices are already
/// held).
struct Update<'a> {
    state: RefCell<Option<[Option<StateSlice<'a>>; 2]>>,
    rule: Rule,
    t: i64,
    has_state: bool,
    transform: Option<ElementwiseOp>,
    /// GradScaler's `inv_scale`: each gradient element is unscaled in place, then read.
    unscale: Option<f32>,
    parallel: bool,
    /// AGC: the var's unit coefficients (the unit's gradient scaled as it is read, or untouched).
    units: Option<&'a [Option<f64>]>,
}

/// Updates one var: its parameter written in place, its gradient `grad` read (through a contiguous copy
/// when it is a strided view), clipped on the way through `transform`.
fn update_target(target: &Target, grad: &Tensor, job: &Update<'_>) -> Result<()> {
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

/// [`Consts::update`], compiled a second time for AVX2 and taken when the CPU has it: the same
/// operations in the same order on twice the lanes (Rust never contracts them into FMAs), so the
/// results are bitwise the same.
#[inline(always)]
fn update_block<T: Element, C: Real>(
    consts: &Consts<C>,
    p: &mut [T],
    g: &[T],
    s0: &mut [C],
    s1: &mut [C],
    clip: Option<ElementKernel<T>>,
) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: `update_block_avx2` only assumes AVX2, which the CPU was just found to support.
        unsafe { update_block_avx2(consts, p, g, s0, s1, clip) };
        return;
    }
    update_with(consts, p, g, s0, s1, clip)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn update_block_avx2<T: Element, C: Real>(
    consts: &Consts<C>,
    p: &mut [T],
    g: &[T],
    s0: &mut [C],
    s1: &mut [C],
    clip: Option<ElementKernel<T>>,
) {
    update_with(consts, p, g, s0, s1, clip)
}

/// One loop per clip kind, so that none decides per element.
#[inline(always)]
fn update_with<T: Element, C: Real>(
    consts: &Consts<C>,
    p: &mut [T],
    g: &[T],
    s0: &mut [C],
    s1: &mut [C],
    clip: Option<ElementKernel<T>>,
) {
    match clip {
        None => consts.update(p, g, s0, s1, |x| x),
        Some(ElementKernel::Scale(c)) => consts.update(p, g, s0, s1, move |x| scale(x, c)),
        Some(ElementKernel::Clamp { bound, lo, hi }) => {
            consts.update(p, g, s0, s1, move |x| clamp(x, bound, lo, hi))
        }
    }
}

/// The state slices of compute type `C` (absent ones empty).
trait StateType: Real {
    fn slice(state: Option<StateSlice<'_>>) -> Result<&mut [Self]>;
}

impl StateType for f32 {
    fn slice(state: Option<StateSlice<'_>>) -> Result<&mut [Self]> {
        match state {
            None => Ok(&mut []),
            Some(StateSlice::F32(v)) => Ok(v),
            Some(_) => bail!("internal error: optimizer state of the wrong dtype (want F32)"),
        }
    }
}

impl StateType for f64 {
    fn slice(state: Option<StateSlice<'_>>) -> Result<&mut [Self]> {
        match state {
            None => Ok(&mut []),
            Some(StateSlice::F64(v)) => Ok(v),
            Some(_) => bail!("internal error: optimizer state of the wrong dtype (want F64)"),
        }
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
        // AGC never runs prescaled (`optim::fused::prescale_supports`).
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

// ---------------------------------------------------------------------------------------------
// Writing several tensors at once.

/// What runs with the storages of several tensors.
type StoragesFn<'f> = dyn FnMut(&mut [&mut CpuStorage]) -> Result<()> + 'f;

/// Runs `f` with the storages of `tensors` (distinct storages, each write-locked once) mutably,
/// in order: candle's `inplace_op1`, nested.
fn with_storages_mut(tensors: &[&Tensor], f: &mut StoragesFn<'_>) -> Result<()> {
    nest(tensors, Vec::new(), f)
}

fn nest(rest: &[&Tensor], mut taken: Vec<&mut CpuStorage>, f: &mut StoragesFn<'_>) -> Result<()> {
    match rest.split_first() {
        None => f(&mut taken),
        Some((first, rest)) => first.inplace_op1(&Level {
            rest,
            taken: RefCell::new(Some(taken)),
            f: RefCell::new(f),
        }),
    }
}

/// One level of [`with_storages_mut`]: holds the storages taken so far while candle hands it the
/// next one.
struct Level<'r, 's, 'f> {
    rest: &'r [&'r Tensor],
    taken: RefCell<Option<Vec<&'s mut CpuStorage>>>,
    f: RefCell<&'f mut StoragesFn<'f>>,
}

impl InplaceOp1 for Level<'_, '_, '_> {
    fn name(&self) -> &'static str {
        "candle-grad-clip-fused-step"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, _: &Layout) -> Result<()> {
        let Some(taken) = self.taken.borrow_mut().take() else {
            bail!("internal error: a storage level was entered twice")
        };
        let mut taken: Vec<&mut CpuStorage> = taken;
        taken.push(storage);
        let mut f = self.f.borrow_mut();
        nest(self.rest, taken, &mut **f)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, _: &mut candle_core::CudaStorage, _: &Layout) -> Result<()> {
        bail!("internal error: the CPU step was called on CUDA storage")
    }
}
