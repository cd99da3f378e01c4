//! The CPU twin of the fused optimizer step (`backend::update`): the clip's norm through this
//! back end's reduction, then one pass over every var that reads the gradient, forms the clipped
//! gradient exactly as the clip's own element pass does (the same kernel, on a copy in a small
//! buffer: the `GradStore` is never written), and updates the parameter and its state in place.
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

use std::cell::RefCell;
use std::ops::{Add, Div, Mul, Sub};

use candle_core::{bail, CpuStorage, DType, InplaceOp1, Layout, Result, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;

use super::{norm, norm_tensor, run_kernel, Data, Element, ElementKernel, PARALLEL_MIN_ELEMENTS};
use crate::backend::update::{
    Outcome, Rule, Step, StepClip, Target, CLIPPED, CONTROL_WORDS, SKIPPED, STEPS,
};
use crate::backend::{clip_coefficient, needs_scaling, ElementwiseOp};
use crate::gradients::GradientSet;
use crate::NormType;

/// Elements of a var updated together: the clipped gradient is formed into a stack buffer of this
/// many elements.
const BLOCK: usize = 1024;
/// Elements per parallel work item within one large var.
const PARALLEL_CHUNK: usize = 1 << 15;

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
}

fn decide(step: &Step, set: &GradientSet) -> Result<Decision> {
    let groups = set.group_by_storage();
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
            }
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
            }
        }
        StepClip::None => Decision {
            transform: None,
            clipped: false,
            nonfinite: step.skip_nonfinite && !norm(set, &groups, NormType::Inf)?.is_finite(),
            norm: None,
        },
    })
}

/// Runs the step on the CPU.
pub(crate) fn step(step: &Step) -> Result<Outcome> {
    let set = GradientSet::from_grads(step.targets.iter().map(|t| t.grad.clone()).collect())?;
    let decision = decide(step, &set)?;
    let mut control = step.control.to_vec1::<i64>()?;
    if step.skip_nonfinite && decision.nonfinite {
        control[SKIPPED] += 1;
    } else {
        let t = control[STEPS] + 1;
        let elements: usize = step.targets.iter().map(|t| t.param.elem_count()).sum();
        let parallel = elements >= PARALLEL_MIN_ELEMENTS && rayon::current_num_threads() > 1;
        let run = |target: &Target| {
            let has_state = control[CONTROL_WORDS + target.index] != 0;
            update_target(
                target,
                step.rule,
                t,
                has_state,
                decision.transform,
                parallel,
            )
        };
        if parallel {
            step.targets.par_iter().try_for_each(run)?;
        } else {
            step.targets.iter().try_for_each(run)?;
        }
        control[STEPS] = t;
        control[CLIPPED] += decision.clipped as i64;
        if step.rule.state_count() > 0 {
            for target in &step.targets {
                control[CONTROL_WORDS + target.index] = 1;
            }
        }
    }
    step.control.inplace_op1(&WriteControl(&control))?;
    Ok(Outcome {
        norm: decision.norm,
    })
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
            Rule::Sgd {
                lr,
                momentum,
                weight_decay,
                ..
            } if momentum == 0.0 && weight_decay == 0.0 => Consts::PlainSgd { lr: c(lr) },
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

    /// Updates `p` (and the state) from the gradient `g`, element by element.
    #[inline(always)]
    fn update<T: Element>(&self, p: &mut [T], g: &[T], s0: &mut [C], s1: &mut [C]) {
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
                    let g = to_c(g);
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
                    *p = T::from_f64((to_c(*p) - (to_c(g) * lr + zero)).to_f64());
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
                for (i, (p, &g)) in p.iter_mut().zip(g).enumerate() {
                    let x = to_c(*p);
                    // PyTorch: d_p = g + weight_decay * p.
                    let mut d = to_c(g);
                    if let Some(wd) = weight_decay {
                        d = d + wd * x;
                    }
                    if let Some(mu) = momentum {
                        // buf = d_p at the first step, then mu * buf + (1 - dampening) * d_p.
                        let b = if has_buffer {
                            s0[i] * mu + one_minus_dampening * d
                        } else {
                            d
                        };
                        s0[i] = b;
                        d = if nesterov { d + mu * b } else { b };
                    }
                    *p = T::from_f64((x - lr * d).to_f64());
                }
            }
        }
    }
}

/// Updates one var: its parameter and state written in place, its gradient read (through a
/// contiguous copy when it is a strided view), clipped on the way through `transform`.
fn update_target(
    target: &Target,
    rule: Rule,
    t: i64,
    has_state: bool,
    transform: Option<ElementwiseOp>,
    parallel: bool,
) -> Result<()> {
    let grad = if target.grad.layout().contiguous_offsets().is_some() {
        target.grad.clone()
    } else {
        target.grad.contiguous()?
    };
    let (g_storage, g_layout) = grad.storage_and_layout();
    let Some((g_start, g_end)) = g_layout.contiguous_offsets() else {
        bail!("internal error: a contiguous copy is not contiguous")
    };
    let g = Data::of(&g_storage)?.range(g_start, g_end);
    let Some((p_start, p_end)) = target.param.layout().contiguous_offsets() else {
        bail!("fused optimizer steps need contiguous vars")
    };
    let mut tensors: Vec<&Tensor> = vec![&target.param];
    tensors.extend(target.state.iter());
    with_storages_mut(&tensors, &mut |storages: &mut [&mut CpuStorage]| {
        let (param, state) = storages
            .split_first_mut()
            .expect("the param is listed first");
        let mut state = state.iter_mut();
        let s0 = state.next().map(|s| &mut **s);
        let s1 = state.next().map(|s| &mut **s);
        match (&mut **param, g) {
            (CpuStorage::F32(p), Data::F32(g)) => run::<f32, f32>(
                &mut p[p_start..p_end],
                g,
                s0,
                s1,
                rule,
                t,
                has_state,
                transform,
                parallel,
            ),
            (CpuStorage::F64(p), Data::F64(g)) => run::<f64, f64>(
                &mut p[p_start..p_end],
                g,
                s0,
                s1,
                rule,
                t,
                has_state,
                transform,
                parallel,
            ),
            (CpuStorage::F16(p), Data::F16(g)) => run::<f16, f32>(
                &mut p[p_start..p_end],
                g,
                s0,
                s1,
                rule,
                t,
                has_state,
                transform,
                parallel,
            ),
            (CpuStorage::BF16(p), Data::BF16(g)) => run::<bf16, f32>(
                &mut p[p_start..p_end],
                g,
                s0,
                s1,
                rule,
                t,
                has_state,
                transform,
                parallel,
            ),
            _ => bail!("fused optimizer step: a var and its gradient differ in dtype"),
        }
    })
}

/// The state slices of compute type `C` from their storages (absent ones empty).
trait StateSlice: Real {
    fn slice(storage: Option<&mut CpuStorage>) -> Result<&mut [Self]>;
}

impl StateSlice for f32 {
    fn slice(storage: Option<&mut CpuStorage>) -> Result<&mut [Self]> {
        match storage {
            None => Ok(&mut []),
            Some(CpuStorage::F32(v)) => Ok(v),
            Some(_) => bail!("internal error: optimizer state of the wrong dtype (want F32)"),
        }
    }
}

impl StateSlice for f64 {
    fn slice(storage: Option<&mut CpuStorage>) -> Result<&mut [Self]> {
        match storage {
            None => Ok(&mut []),
            Some(CpuStorage::F64(v)) => Ok(v),
            Some(_) => bail!("internal error: optimizer state of the wrong dtype (want F64)"),
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn run<T: Element, C: StateSlice>(
    p: &mut [T],
    g: &[T],
    s0: Option<&mut CpuStorage>,
    s1: Option<&mut CpuStorage>,
    rule: Rule,
    t: i64,
    has_state: bool,
    transform: Option<ElementwiseOp>,
    parallel: bool,
) -> Result<()> {
    let (s0, s1) = (C::slice(s0)?, C::slice(s1)?);
    let n = p.len();
    if g.len() != n || (!s0.is_empty() && s0.len() != n) || (!s1.is_empty() && s1.len() != n) {
        bail!("internal error: a var, its gradient and its state differ in length")
    }
    let consts = Consts::<C>::new(rule, t, has_state);
    let kernel = transform.map(ElementKernel::<T>::new);
    // Absent state slices are empty: each block then gets an empty slice.
    let work = |p: &mut [T], g: &[T], s0: &mut [C], s1: &mut [C]| {
        let mut buffer = [T::from_f64(0.0); BLOCK];
        let mut start = 0;
        while start < p.len() {
            let end = (start + BLOCK).min(p.len());
            let len = end - start;
            let g_block: &[T] = match kernel {
                Some(k) => {
                    buffer[..len].copy_from_slice(&g[start..end]);
                    run_kernel(k, &mut buffer[..len]);
                    &buffer[..len]
                }
                None => &g[start..end],
            };
            let s0_block = if s0.is_empty() {
                &mut [][..]
            } else {
                &mut s0[start..end]
            };
            let s1_block = if s1.is_empty() {
                &mut [][..]
            } else {
                &mut s1[start..end]
            };
            consts.update(&mut p[start..end], g_block, s0_block, s1_block);
            start = end;
        }
    };
    if parallel && n > PARALLEL_CHUNK {
        let s0_chunks: Vec<&mut [C]> = chunks_or_empty(s0, n);
        let s1_chunks: Vec<&mut [C]> = chunks_or_empty(s1, n);
        p.par_chunks_mut(PARALLEL_CHUNK)
            .zip(g.par_chunks(PARALLEL_CHUNK))
            .zip(s0_chunks.into_par_iter())
            .zip(s1_chunks.into_par_iter())
            .for_each(|(((p, g), s0), s1)| work(p, g, s0, s1));
    } else {
        work(p, g, s0, s1);
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
