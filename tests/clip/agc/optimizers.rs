//! AGC through the optimizers: `Clipped` is `adaptive_clip_grad_` then the inner step; the fused
//! optimizers are `adaptive_clip_grad_` then the unclipped fused step (on the CPU and emulated), and
//! they skip non-finite steps.

use super::*;
use crate::common::vars_bits as params_bits;

/// Vars of every dtype and their gradients for `steps` steps, some steps far above the AGC bound
/// (so that some units clip) and some below.
fn training_case(rng: &mut StdRng, dtypes: &[DType]) -> Result<(Vec<Tensor>, Vec<Vec<Tensor>>)> {
    // [40, 150]: units across the 4096-element chunks of the fused step.
    let shapes: [&[usize]; 6] = [&[7, 5], &[5], &[], &[3, 4, 2], &[64, 33], &[40, 150]];
    let mut params = Vec::new();
    for (k, shape) in shapes.iter().enumerate() {
        let n: usize = shape.iter().product();
        params.push(tensor(
            &signed_values(rng, n, 1.0),
            shape,
            dtypes[k % dtypes.len()],
        )?);
    }
    let mut steps = Vec::new();
    for step in 0..4 {
        let scale = [0.01, 1.0, 1e-6, 5.0][step];
        let grads = params
            .iter()
            .map(|p| {
                tensor(
                    &signed_values(rng, p.elem_count(), scale),
                    p.dims(),
                    p.dtype(),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        steps.push(grads);
    }
    Ok((params, steps))
}

fn fresh_vars(params: &[Tensor]) -> Result<Vec<Var>> {
    params
        .iter()
        .map(|p| Var::from_tensor(&p.copy()?))
        .collect()
}

/// Asserts two sets of vars bitwise equal, naming the first differing element.
fn assert_same_params(a: &[Var], b: &[Var], what: &str) -> Result<()> {
    for (k, (x, y)) in a.iter().zip(b).enumerate() {
        let (xb, yb) = (bits(x.as_tensor())?, bits(y.as_tensor())?);
        if let Some(i) = xb.iter().zip(&yb).position(|(p, q)| p != q) {
            panic!(
                "{what}: var {k} {:?} {:?} element {i}: {:x} vs {:x}",
                x.dims(),
                x.dtype(),
                xb[i],
                yb[i]
            );
        }
    }
    Ok(())
}

/// `Clipped<SGD>` and `Clipped<AdamW>` with `ClipSetting::agc` are `adaptive_clip_grad_` then the
/// inner step, bit for bit; `last_norm` is its norm; `clipped_steps` counts the steps where a
/// unit clipped (checked against the reference's verdict); the caller's gradients hold the
/// clipped ones. On the CPU and emulated.
#[test]
fn clipped_optimizers_are_agc_then_step() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(7);
    let clipping = 0.02;
    let adamw = ParamsAdamW {
        lr: 0.01,
        ..Default::default()
    };
    for emulate in [false, true] {
        let (params, steps) = training_case(&mut rng, &[DType::F32, DType::F64])?;
        for inner in 0..2 {
            let (ours, theirs) = (fresh_vars(&params)?, fresh_vars(&params)?);
            let (mut clipped, mut plain): (Box<dyn Step>, Box<dyn Step>) = if inner == 0 {
                (
                    Box::new(Clipped::<SGD>::new(
                        ours.clone(),
                        ClippedConfig::new(0.1, ClipSetting::agc(clipping)),
                    )?),
                    Box::new(SGD::new(theirs.clone(), 0.1)?),
                )
            } else {
                (
                    Box::new(Clipped::<AdamW>::new(
                        ours.clone(),
                        ClippedConfig::new(adamw.clone(), ClipSetting::agc(clipping)),
                    )?),
                    Box::new(AdamW::new(theirs.clone(), adamw.clone())?),
                )
            };
            let emulation = KernelEmulation::new().grid(3).block_order(ORDERS[3]);
            let mut want_clipped = 0;
            for (step, grads) in steps.iter().enumerate() {
                let what = format!("inner {inner} step {step} emulated {emulate}");
                let (ga, mut gb) = (store(&ours, grads)?, store(&theirs, grads)?);
                want_clipped += some_unit_clips(&ours, grads, clipping)? as u64;
                let norm = if emulate {
                    let (_, log) = emulation.run(|| clipped.step(&ga))?;
                    assert_eq!(kernels(&log), ["grad_clip_agc"], "{what}");
                    emulation
                        .run(|| {
                            adaptive_clip_grad_(
                                &theirs,
                                &mut gb,
                                clipping,
                                ClipSetting::AGC_DEFAULT_EPS,
                            )
                        })?
                        .0
                } else {
                    clipped.step(&ga)?;
                    adaptive_clip_grad_(&theirs, &mut gb, clipping, ClipSetting::AGC_DEFAULT_EPS)?
                };
                plain.step(&gb)?;
                assert_eq!(params_bits(&ours)?, params_bits(&theirs)?, "{what}");
                assert_eq!(
                    bits(clipped.last_norm().expect("a norm"))?,
                    bits(&norm)?,
                    "{what}: last_norm"
                );
                for (v, w) in ours.iter().zip(&theirs) {
                    assert_eq!(
                        bits(ga.get(v).expect("g"))?,
                        bits(gb.get(w).expect("g"))?,
                        "{what}"
                    );
                }
            }
            assert_eq!(
                clipped.clipped_steps()?,
                want_clipped,
                "inner {inner} emulated {emulate}"
            );
            assert!(
                want_clipped > 0 && want_clipped < steps.len() as u64,
                "the case clips some steps only"
            );
        }
    }
    Ok(())
}

/// The reference's verdict on one step: some unit of some var clips.
fn some_unit_clips(vars: &[Var], grads: &[Tensor], clipping: f64) -> Result<bool> {
    for (v, g) in vars.iter().zip(grads) {
        let (c, _) = reference(
            &vals(v.as_tensor())?,
            &vals(g)?,
            v.dims(),
            clipping,
            ClipSetting::AGC_DEFAULT_EPS,
        );
        if c.iter().any(Option::is_some) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// `FusedAdamW`/`FusedSgd` with `ClipSetting::agc` (the clip folded into the step, the caller's
/// gradients never written) are bitwise `adaptive_clip_grad_` then the unclipped fused step, for
/// every dtype; `last_norm` is its norm, `clipped_steps` counts the steps where a unit clipped; on
/// the CPU and emulated (several grids and block orders), and the emulated ones bitwise the CPU's.
#[test]
fn fused_optimizers_are_agc_then_unclipped_step() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(8);
    let clipping = 0.02;
    let (params, steps) = training_case(&mut rng, &DTYPES)?;
    let mut cpu_results: Vec<Vec<Vec<u64>>> = Vec::new();
    for (run, emulate) in [false, true, true].into_iter().enumerate() {
        for rule in 0..3 {
            let (ours, theirs) = (fresh_vars(&params)?, fresh_vars(&params)?);
            let sgd = ParamsSgd {
                lr: 0.1,
                momentum: if rule == 2 { 0.9 } else { 0.0 },
                ..Default::default()
            };
            let adamw = ParamsAdamW {
                lr: 0.01,
                ..Default::default()
            };
            let (mut folded, mut unclipped): (Box<dyn Step>, Box<dyn Step>) = if rule == 0 {
                (
                    Box::new(
                        FusedAdamW::new(ours.clone(), adamw.clone())?
                            .with_clip(ClipSetting::agc(clipping))?,
                    ),
                    Box::new(FusedAdamW::new(theirs.clone(), adamw)?),
                )
            } else {
                (
                    Box::new(
                        FusedSgd::new(ours.clone(), sgd.clone())?
                            .with_clip(ClipSetting::agc(clipping))?,
                    ),
                    Box::new(FusedSgd::new(theirs.clone(), sgd)?),
                )
            };
            let grid = [1u32, 3, 7, 64][(run + rule) % 4];
            let order = ORDERS[(run * 2 + rule) % 4];
            let emulation = KernelEmulation::new()
                .grid(grid)
                .block_order(order)
                .seed(rule as u64);
            let mut want_clipped = 0;
            for (step, grads) in steps.iter().enumerate() {
                let what =
                    format!("rule {rule} step {step} emulated {emulate} grid {grid} {order:?}");
                let (ga, mut gb) = (store(&ours, grads)?, store(&theirs, grads)?);
                let before: Vec<Vec<u64>> = ours
                    .iter()
                    .map(|v| bits(ga.get(v).expect("g")))
                    .collect::<Result<_>>()?;
                want_clipped += some_unit_clips(&ours, grads, clipping)? as u64;
                let norm = if emulate {
                    let (_, log) = emulation.run(|| folded.step(&ga))?;
                    assert_eq!(
                        kernels(&log),
                        ["grad_clip_agc", "grad_clip_fused_step"],
                        "{what}"
                    );
                    let (norm, _) = emulation.run(|| {
                        adaptive_clip_grad_(
                            &theirs,
                            &mut gb,
                            clipping,
                            ClipSetting::AGC_DEFAULT_EPS,
                        )
                    })?;
                    emulation.run(|| unclipped.step(&gb))?;
                    norm
                } else {
                    folded.step(&ga)?;
                    let norm = adaptive_clip_grad_(
                        &theirs,
                        &mut gb,
                        clipping,
                        ClipSetting::AGC_DEFAULT_EPS,
                    )?;
                    unclipped.step(&gb)?;
                    norm
                };
                assert_same_params(&ours, &theirs, &what)?;
                assert_eq!(
                    bits(folded.last_norm().expect("a norm"))?,
                    bits(&norm)?,
                    "{what}: last_norm"
                );
                let after: Vec<Vec<u64>> = ours
                    .iter()
                    .map(|v| bits(ga.get(v).expect("g")))
                    .collect::<Result<_>>()?;
                assert_eq!(
                    before, after,
                    "{what}: the fused step wrote the caller's gradients"
                );
            }
            assert_eq!(
                folded.clipped_steps()?,
                want_clipped,
                "rule {rule} emulated {emulate}"
            );
            assert!(want_clipped > 0 && want_clipped < steps.len() as u64);
            // The emulated parameters are bitwise the CPU's.
            if emulate {
                assert_eq!(
                    params_bits(&ours)?,
                    cpu_results[rule],
                    "rule {rule} grid {grid}: emulated vs CPU"
                );
            } else {
                cpu_results.push(params_bits(&ours)?);
            }
        }
    }
    Ok(())
}

/// What the optimizer tests need of the optimizers under test and their references.
trait Step {
    fn step(&mut self, grads: &GradStore) -> Result<()>;
    fn last_norm(&self) -> Option<&Tensor> {
        None
    }
    fn clipped_steps(&self) -> Result<u64> {
        Ok(0)
    }
}

macro_rules! impl_step {
    ($t:ty) => {
        impl Step for $t {
            fn step(&mut self, grads: &GradStore) -> Result<()> {
                Optimizer::step(self, grads)
            }
            fn last_norm(&self) -> Option<&Tensor> {
                <$t>::last_norm(self)
            }
            fn clipped_steps(&self) -> Result<u64> {
                <$t>::clipped_steps(self)
            }
        }
    };
}
impl_step!(FusedAdamW);
impl_step!(FusedSgd);
impl_step!(Clipped<SGD>);
impl_step!(Clipped<AdamW>);

impl Step for SGD {
    fn step(&mut self, grads: &GradStore) -> Result<()> {
        Optimizer::step(self, grads)
    }
}

impl Step for AdamW {
    fn step(&mut self, grads: &GradStore) -> Result<()> {
        Optimizer::step(self, grads)
    }
}

/// With `skip_nonfinite`, a step whose gradients hold a NaN is skipped by the fused optimizers
/// with AGC (the verdict is the global norm's), on the CPU and emulated: nothing changes.
#[test]
fn fused_agc_skips_nonfinite_steps() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(11);
    let (params, steps) = training_case(&mut rng, &DTYPES)?;
    for emulate in [false, true] {
        let vars = fresh_vars(&params)?;
        let mut opt = FusedSgd::new(
            vars.clone(),
            ParamsSgd {
                lr: 0.1,
                momentum: 0.9,
                ..Default::default()
            },
        )?
        .with_clip(ClipSetting::agc(0.02))?
        .with_skip_nonfinite(true);
        let mut grads = steps[1].clone();
        let mut poisoned = vals(&grads[4])?;
        poisoned[100] = f64::NAN;
        grads[4] = tensor(&poisoned, grads[4].dims(), grads[4].dtype())?;
        let before = params_bits(&vars)?;
        let g = store(&vars, &grads)?;
        if emulate {
            KernelEmulation::new()
                .grid(3)
                .run(|| Optimizer::step(&mut opt, &g))?;
        } else {
            Optimizer::step(&mut opt, &g)?;
        }
        assert_eq!(params_bits(&vars)?, before, "emulated {emulate}");
        assert_eq!(
            (opt.steps()?, opt.skipped_steps()?, opt.clipped_steps()?),
            (0, 1, 0)
        );
        assert!(scalar(opt.last_norm().expect("a norm"))?.is_nan());
    }
    Ok(())
}
