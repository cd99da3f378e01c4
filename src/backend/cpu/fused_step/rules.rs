//! The update rules' arithmetic on the CPU, element by element in candle's (AdamW, plain SGD) or
//! PyTorch's (SGD with momentum or weight decay) op sequence, each rounding reproduced: the
//! constants of a rule for one step ([`Consts`]) and the loops over a block of one var.

use std::ops::{Add, Div, Mul, Sub};

use candle_core::{bail, Result};

use super::super::apply::ElementKernel;
use crate::ops::element::{clamp, scale, Element};
use crate::ops::fused_step::Rule;

/// The compute types: `f32` (F32, F16 and BF16 vars) and `f64`.
pub(super) trait Real:
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

/// The constants of a rule in the compute type `C`, for step `t`.
#[derive(Clone, Copy)]
pub(super) enum Consts<C> {
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
    pub(super) fn new(rule: Rule, t: i64, has_state: bool) -> Self {
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

/// [`Consts::update`], compiled a second time for AVX2 and taken when the CPU has it: the same
/// operations in the same order on twice the lanes (Rust never contracts them into FMAs), so the
/// results are bitwise the same.
#[inline(always)]
pub(super) fn update_block<T: Element, C: Real>(
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
pub(super) trait StateType: Real {
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

/// One var's slice of a state buffer.
pub(super) enum StateSlice<'a> {
    F32(&'a mut [f32]),
    F64(&'a mut [f64]),
}
