//! The fused optimizer step kernel (`grad_clip_fused_step`), run through the host emulation with
//! the crate's own CUDA host code, against the CPU twin (`src/backend/cpu/fused_step/`), which
//! `tests/optim` checks against candle's `AdamW`/`SGD` bitwise. On normal values the kernel's
//! results are the CPU's bit for bit, for every grid size and block order; the one documented
//! difference (F32/F64 follow candle's CUDA sequence, whose affine ops are fused multiply-adds)
//! shows only when a product underflows to zero.

use std::collections::HashMap;

use crate::common;

use candle_core::{backprop::GradStore, DType, Device, Result, Tensor, Var};
use candle_grad_clip::{
    AutoClip, ClipGradNorm, ClipSetting, Clipped, ClippedConfig, FusedAdamW, FusedSgd,
    KernelEmulation, NormType, ParamsSgd,
};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use common::{
    assert_same, bits, kernels, signed_values, state_bits, tensor, twin_grads, twin_vars,
    vars_bits, DTYPES, ORDERS,
};
use rand::{rngs::StdRng, SeedableRng};

const SHAPES: [&[usize]; 6] = [&[7, 5], &[5], &[1], &[3, 4, 2], &[4099], &[64, 33]];
/// Probability that a var is left without a gradient in a step that skips some
/// (`common::twin_grads`).
const SKIP: f64 = 0.25;

/// Every rule and dtype, without a clip and with value clipping (whose result does not depend on
/// how the norm is summed): the emulated kernel equals the CPU twin bit for bit, step after step
/// (parameters and the whole state), for several grids and block orders.
#[test]
fn fused_steps_are_bitwise_the_cpu_twins() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(1);
    let settings: Vec<Option<ClipSetting>> = vec![
        None,
        Some(ClipSetting::value(0.02)),
        Some(ClipSetting::agc(0.02)),
    ];
    for (case, setting) in settings.iter().enumerate() {
        for rule in 0..4 {
            let (ours, theirs) = twin_vars(&mut rng, &SHAPES, &DTYPES)?;
            let grid = [1, 3, 7, 64][(case + rule) % 4];
            let order = ORDERS[(case * 3 + rule) % 4];
            let emulation = KernelEmulation::new()
                .grid(grid)
                .block_order(order)
                .seed(case as u64);
            let what = format!("setting {setting:?} rule {rule} grid {grid} {order:?}");
            let skip = rule % 2 == 0;
            let mut emulated = optimizer(rule, ours.clone(), setting.clone(), skip)?;
            let mut cpu = optimizer(rule, theirs.clone(), setting.clone(), skip)?;
            for step in 0..6 {
                let scale = if step % 3 == 2 { 50.0 } else { 1.0 };
                let (ga, gb) =
                    twin_grads(&mut rng, &ours, &theirs, scale, (step == 1).then_some(SKIP))?;
                let (_, log) = emulation.run(|| emulated.take_step(&ga))?;
                assert_eq!(
                    *kernels(&log).last().expect("a launch"),
                    "grad_clip_fused_step"
                );
                cpu.take_step(&gb)?;
                let what = format!("{what} step {step}");
                assert_same(&vars_bits(&ours)?, &vars_bits(&theirs)?, &what);
                assert_same_state(&emulated.state_dict()?, &cpu.state_dict()?, &what)?;
                assert_same_norm(emulated.last_norm(), cpu.last_norm(), &what)?;
            }
            assert_eq!(emulated.clipped_steps()?, cpu.clipped_steps()?, "{what}");
        }
    }
    Ok(())
}

/// Every clip setting, on the emulated device: the folded clip is bitwise `Clipped` around the
/// unclipped fused optimizer (clip the store with the kernels, then step), both emulated, with the
/// same norm and the same count of clipped steps.
#[test]
fn folded_clip_under_emulation_is_clip_then_step() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(5);
    let settings = [
        ClipSetting::norm(0.5),
        ClipSetting::Norm(ClipGradNorm::new(0.3).with_norm_type(NormType::L1)),
        ClipSetting::Norm(ClipGradNorm::new(0.2).with_norm_type(NormType::P(7.5))),
        ClipSetting::Norm(ClipGradNorm::new(0.05).with_norm_type(NormType::Inf)),
        ClipSetting::value(0.02),
        ClipSetting::AutoClip(AutoClip::new(25.0)?),
        ClipSetting::agc(0.02),
    ];
    for (case, setting) in settings.iter().enumerate() {
        for rule in 0..4 {
            let (ours, theirs) = twin_vars(&mut rng, &SHAPES, &DTYPES)?;
            let grid = [1, 3, 7, 64][(case + rule) % 4];
            let order = ORDERS[(case + rule * 3) % 4];
            let emulation = KernelEmulation::new()
                .grid(grid)
                .block_order(order)
                .seed(case as u64);
            let what = format!("{setting:?} rule {rule} grid {grid} {order:?}");
            let mut folded = optimizer(rule, ours.clone(), Some(setting.clone()), false)?;
            let mut clipped = clipped_optimizer(rule, theirs.clone(), setting.clone())?;
            for step in 0..6 {
                let scale = if step % 3 == 2 { 50.0 } else { 1.0 };
                let (ga, gb) =
                    twin_grads(&mut rng, &ours, &theirs, scale, (step == 1).then_some(SKIP))?;
                emulation.run(|| folded.take_step(&ga))?;
                emulation.run(|| clipped.take_step(&gb))?;
                let what = format!("{what} step {step}");
                assert_same(&vars_bits(&ours)?, &vars_bits(&theirs)?, &what);
                assert_same_norm(folded.last_norm(), clipped.last_norm(), &what)?;
            }
            assert_eq!(folded.clipped_steps()?, clipped.clipped_steps()?, "{what}");
        }
    }
    Ok(())
}

/// The AdamW config of rule 0.
fn adamw_params() -> ParamsAdamW {
    ParamsAdamW {
        lr: 0.01,
        weight_decay: 0.05,
        ..Default::default()
    }
}

/// The SGD config of rule `rule` (1-3: plain, with momentum and weight decay, Nesterov).
fn sgd_params(rule: usize) -> ParamsSgd {
    let sgd = [
        ParamsSgd {
            lr: 0.1,
            ..Default::default()
        },
        ParamsSgd {
            lr: 0.05,
            momentum: 0.9,
            dampening: 0.1,
            weight_decay: 1e-3,
            nesterov: false,
        },
        ParamsSgd {
            lr: 0.05,
            momentum: 0.9,
            nesterov: true,
            ..Default::default()
        },
    ];
    sgd[rule - 1].clone()
}

/// The optimizer of rule `rule` (0: AdamW; 1-3: SGD plain, with momentum and weight decay,
/// Nesterov) over `vars`.
fn optimizer(
    rule: usize,
    vars: Vec<Var>,
    clip: Option<ClipSetting>,
    skip: bool,
) -> Result<Box<dyn Fused>> {
    Ok(match rule {
        0 => {
            let mut o = FusedAdamW::new(vars, adamw_params())?.with_skip_nonfinite(skip);
            if let Some(c) = clip {
                o = o.with_clip(c)?;
            }
            Box::new(o)
        }
        r => {
            let mut o = FusedSgd::new(vars, sgd_params(r))?.with_skip_nonfinite(skip);
            if let Some(c) = clip {
                o = o.with_clip(c)?;
            }
            Box::new(o)
        }
    })
}

/// The crate's `Clipped` around the unclipped optimizer of rule `rule`: clip the store with the
/// public functions (the kernels, under emulation), then step.
fn clipped_optimizer(rule: usize, vars: Vec<Var>, clip: ClipSetting) -> Result<Box<dyn Fused>> {
    Ok(match rule {
        0 => Box::new(Clipped::<FusedAdamW>::new(
            vars,
            ClippedConfig::new(adamw_params(), clip),
        )?),
        r => Box::new(Clipped::<FusedSgd>::new(
            vars,
            ClippedConfig::new(sgd_params(r), clip),
        )?),
    })
}

/// What the tests ask of an optimizer.
trait Fused {
    fn take_step(&mut self, grads: &GradStore) -> Result<()>;
    fn state_dict(&self) -> Result<HashMap<String, Tensor>>;
    fn last_norm(&self) -> Option<&Tensor>;
    fn clipped_steps(&self) -> Result<u64>;
}

macro_rules! fused {
    ($t:ty) => {
        impl Fused for $t {
            fn take_step(&mut self, grads: &GradStore) -> Result<()> {
                Optimizer::step(self, grads)
            }
            fn state_dict(&self) -> Result<HashMap<String, Tensor>> {
                <$t>::state_dict(self)
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
fused!(FusedAdamW);
fused!(FusedSgd);

/// `Clipped` keeps its own norm and count of clipped steps; the state is the inner optimizer's.
impl<O: Fused + Optimizer> Fused for Clipped<O> {
    fn take_step(&mut self, grads: &GradStore) -> Result<()> {
        Optimizer::step(self, grads)
    }
    fn state_dict(&self) -> Result<HashMap<String, Tensor>> {
        self.inner().state_dict()
    }
    fn last_norm(&self) -> Option<&Tensor> {
        Clipped::<O>::last_norm(self)
    }
    fn clipped_steps(&self) -> Result<u64> {
        Clipped::<O>::clipped_steps(self)
    }
}

fn assert_same_state(
    a: &HashMap<String, Tensor>,
    b: &HashMap<String, Tensor>,
    what: &str,
) -> Result<()> {
    let (a, b) = (state_bits(a)?, state_bits(b)?);
    let names: Vec<&String> = a.iter().map(|(k, _)| k).collect();
    assert_eq!(
        names,
        b.iter().map(|(k, _)| k).collect::<Vec<_>>(),
        "{what}: state keys"
    );
    let values = |s: &[(String, Vec<u64>)]| s.iter().map(|(_, v)| v.clone()).collect::<Vec<_>>();
    assert_same(&values(&a), &values(&b), &format!("{what}: state"));
    Ok(())
}

fn assert_same_norm(a: Option<&Tensor>, b: Option<&Tensor>, what: &str) -> Result<()> {
    match (a, b) {
        (Some(a), Some(b)) => assert_eq!(bits(a)?, bits(b)?, "{what}: last_norm"),
        (None, None) => {}
        (a, b) => panic!("{what}: last_norm {a:?} vs {b:?}"),
    }
    Ok(())
}

/// The launches of a step: the reduction the clip needs, then one fused update for all vars;
/// without a clip and without the finite check, the update alone. One table upload.
#[test]
fn a_step_is_at_most_three_launches_and_one_table() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(2);
    let (vars, _) = twin_vars(&mut rng, &SHAPES, &[DType::F32])?;
    let (ga, _) = twin_grads(&mut rng, &vars, &vars, 1.0, None)?;
    let cases: [(Option<ClipSetting>, bool, &[&str]); 6] = [
        (None, false, &["grad_clip_fused_step"]),
        (
            None,
            true,
            &["grad_clip_reduce_inf", "grad_clip_fused_step"],
        ),
        (
            Some(ClipSetting::norm(1.0)),
            false,
            &["grad_clip_reduce_sq", "grad_clip_fused_step"],
        ),
        (
            Some(ClipSetting::value(1.0)),
            true,
            &["grad_clip_reduce_inf", "grad_clip_fused_step"],
        ),
        (
            Some(ClipSetting::Norm(
                ClipGradNorm::new(1.0).with_norm_type(NormType::P(8.0)),
            )),
            true,
            &[
                "grad_clip_reduce_pow",
                "grad_clip_reduce_pow",
                "grad_clip_fused_step",
            ],
        ),
        (
            Some(ClipSetting::agc(0.02)),
            true,
            &["grad_clip_agc", "grad_clip_fused_step"],
        ),
    ];
    for (clip, skip, want) in cases {
        let mut opt =
            FusedAdamW::new(vars.clone(), ParamsAdamW::default())?.with_skip_nonfinite(skip);
        if let Some(c) = &clip {
            opt = opt.with_clip(c.clone())?;
        }
        let (_, log) = KernelEmulation::new().run(|| opt.step(&ga))?;
        assert_eq!(kernels(&log), want, "{clip:?} skip {skip}");
        assert_eq!(log.table_uploads.len(), 1);
    }
    Ok(())
}

/// A non-finite gradient under emulation: the step is skipped on the device (no host read of the
/// verdict), parameters and state bitwise unchanged, for every grid.
#[test]
fn skipped_steps_change_nothing_on_the_device() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(3);
    for grid in [1, 3, 64] {
        for clip in [
            None,
            Some(ClipSetting::norm(1.0)),
            Some(ClipSetting::value(0.1)),
            Some(ClipSetting::agc(0.02)),
        ] {
            let (vars, _) = twin_vars(&mut rng, &SHAPES, &DTYPES)?;
            let mut opt =
                FusedAdamW::new(vars.clone(), ParamsAdamW::default())?.with_skip_nonfinite(true);
            if let Some(c) = &clip {
                opt = opt.with_clip(c.clone())?;
            }
            let (mut grads, _) = twin_grads(&mut rng, &vars, &vars, 1.0, None)?;
            KernelEmulation::new().grid(grid).run(|| opt.step(&grads))?;
            let v = &vars[4];
            let mut g = signed_values(&mut rng, v.elem_count(), 1.0);
            g[4000] = f64::NAN;
            grads.insert(v, tensor(&g, v.dims(), v.dtype())?);
            let before = (vars_bits(&vars)?, state_bits(&opt.state_dict()?)?);
            KernelEmulation::new().grid(grid).run(|| opt.step(&grads))?;
            let mut after_state = opt.state_dict()?;
            assert_eq!(
                after_state
                    .remove("skipped_steps")
                    .map(|t| t.to_scalar::<i64>())
                    .transpose()?,
                Some(1)
            );
            let mut before_state: Vec<(String, Vec<u64>)> = before.1;
            before_state.retain(|(k, _)| k != "skipped_steps");
            assert_eq!(
                (vars_bits(&vars)?, state_bits(&after_state)?),
                (before.0, before_state),
                "grid {grid} {clip:?}"
            );
            assert_eq!(opt.steps()?, 1);
        }
    }
    Ok(())
}

/// The bias corrections at a large step count (loaded from a state): the kernel's `powi` is the
/// host's `f64::powi`, bit for bit.
#[test]
fn bias_corrections_at_large_step_counts() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(4);
    for t in [7i64, 100, 12_345, 999_999, i32::MAX as i64 - 1] {
        let (ours, theirs) = twin_vars(&mut rng, &SHAPES, &[DType::F32, DType::F64])?;
        let params = ParamsAdamW {
            beta1: 0.9999,
            beta2: 0.99999,
            ..Default::default()
        };
        let mut emulated = FusedAdamW::new(ours.clone(), params.clone())?;
        let mut cpu = FusedAdamW::new(theirs.clone(), params.clone())?;
        let mut state = cpu.state_dict()?;
        state.insert("step".into(), Tensor::new(t, &Device::Cpu)?);
        emulated.load_state_dict(&state)?;
        cpu.load_state_dict(&state)?;
        for _ in 0..2 {
            let (ga, gb) = twin_grads(&mut rng, &ours, &theirs, 1.0, None)?;
            KernelEmulation::new().run(|| emulated.step(&ga))?;
            cpu.step(&gb)?;
            assert_same(&vars_bits(&ours)?, &vars_bits(&theirs)?, &format!("t {t}"));
        }
        assert_eq!(emulated.steps()?, t as u64 + 2);
    }
    Ok(())
}

/// Where candle's CPU and CUDA AdamW differ, the kernel follows candle's CUDA sequence: its affine
/// `x * c + 0` is one fma, so a product that underflows keeps its sign (-0), where the CPU's
/// separate `+ 0` makes it +0. Everything else in these tests is bitwise the CPU's.
#[test]
fn the_kernel_follows_candles_cuda_sequence_where_cpu_and_cuda_differ() -> Result<()> {
    let tiny = -f32::from_bits(1) as f64; // -1.4e-45
                                          // decay = 1 - lr * wd = 0.4: p * 0.4 is below half the smallest subnormal.
    let params = ParamsAdamW {
        lr: 0.1,
        weight_decay: 6.0,
        ..Default::default()
    };
    let make = || -> Result<(Var, GradStore)> {
        let v = Var::new(&[tiny as f32], &Device::Cpu)?;
        let mut g = GradStore::default();
        g.insert(&v, Tensor::new(&[0f32], &Device::Cpu)?);
        Ok((v, g))
    };
    // The update is 0 (zero gradient and moments): p' = p * 0.4 - 0.
    let (cpu_var, g) = make()?;
    AdamW::new(vec![cpu_var.clone()], params.clone())?.step(&g)?;
    let (emu_var, g) = make()?;
    let mut opt = FusedAdamW::new(vec![emu_var.clone()], params)?;
    KernelEmulation::new().run(|| opt.step(&g))?;
    assert_eq!(
        cpu_var.to_vec1::<f32>()?[0].to_bits(),
        0.0f32.to_bits(),
        "candle CPU: +0"
    );
    assert_eq!(
        emu_var.to_vec1::<f32>()?[0].to_bits(),
        (-0.0f32).to_bits(),
        "kernel: -0, as fma"
    );
    Ok(())
}
