//! The 0.2 conventions where they change results: a `ClipSetting::Norm` carries a whole
//! `ClipGradNorm` (its `eps` and `error_if_nonfinite` reach `Clipped` and the fused optimizers,
//! bitwise as `ClipGradNorm::clip_` then candle's step), and the run of skipped steps is a query
//! (`consecutive_skips`, `last_step_skipped`) on every optimizer.

use crate::common;

use candle_core::{backprop::GradStore, DType, Device, Result, Tensor, Var};
use candle_grad_clip::{
    ClipGradNorm, ClipSetting, Clipped, ClippedConfig, FusedAdamW, FusedSgd, GradScaler,
    KernelEmulation, NormType, ParamsSgd,
};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use common::{assert_same, twin_grads, twin_vars, vars_bits};
use rand::{rngs::StdRng, SeedableRng};

const SHAPES: [&[usize]; 4] = [&[7, 5], &[13], &[], &[3, 4, 2]];

fn params() -> ParamsAdamW {
    ParamsAdamW {
        lr: 0.05,
        weight_decay: 0.01,
        ..Default::default()
    }
}

/// The reference of a clipped step: `clip.clip_` on a copy of the gradients, then candle's own
/// `AdamW::step` (the unfused ops).
fn reference_step(
    reference: &mut AdamW,
    vars: &[Var],
    grads: &GradStore,
    clip: ClipGradNorm,
) -> Result<()> {
    let mut copy = GradStore::default();
    for v in vars {
        if let Some(g) = grads.get(v.as_tensor()) {
            copy.insert(v.as_tensor(), g.copy()?);
        }
    }
    clip.clip_(vars, &mut copy)?;
    reference.step(&copy)
}

/// `eps` (0, the default, large) and the norm type of a `ClipGradNorm` in the setting reach
/// `Clipped<AdamW>`, `FusedAdamW` on the CPU and `FusedAdamW` through the kernels (emulated):
/// every step is bitwise `ClipGradNorm::clip_` with the same settings, then candle's `AdamW`.
/// (Before 0.2 the optimizers used `eps = 1e-6` whatever the setting: a large `eps` tells.)
#[test]
fn a_norm_setting_reaches_every_optimizer_with_its_eps() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(0x0202);
    for (eps, norm_type) in [
        (0.0, NormType::L2),
        (ClipGradNorm::DEFAULT_EPS, NormType::L1),
        (0.75, NormType::L2),
        (3.0, NormType::Inf),
    ] {
        let clip = ClipGradNorm::new(0.5)
            .with_eps(eps)
            .with_norm_type(norm_type);
        let setting = ClipSetting::Norm(clip);
        let (theirs, ours) = twin_vars(&mut rng, &SHAPES, &[DType::F32, DType::F64])?;
        let copy = |vars: &[Var]| -> Result<Vec<Var>> {
            vars.iter()
                .map(|v| Var::from_tensor(&v.as_tensor().copy()?))
                .collect()
        };
        let (fused_vars, emulated_vars) = (copy(&theirs)?, copy(&theirs)?);
        let mut reference = AdamW::new(theirs.clone(), params())?;
        let mut clipped =
            Clipped::<AdamW>::new(ours.clone(), ClippedConfig::new(params(), setting.clone()))?;
        let mut fused =
            FusedAdamW::new(fused_vars.clone(), params())?.with_clip(setting.clone())?;
        let mut emulated = FusedAdamW::new(emulated_vars.clone(), params())?.with_clip(setting)?;
        for step in 0..4 {
            let what = format!("eps {eps}, {norm_type:?}, step {step}");
            let (g_ref, g_ours) = twin_grads(&mut rng, &theirs, &ours, 4.0, None)?;
            // The fused twins get copies of the same gradients.
            let (mut g_fused, mut g_emulated) = (GradStore::default(), GradStore::default());
            for (i, v) in theirs.iter().enumerate() {
                let g = g_ref.get(v.as_tensor()).expect("g");
                g_fused.insert(fused_vars[i].as_tensor(), g.copy()?);
                g_emulated.insert(emulated_vars[i].as_tensor(), g.copy()?);
            }
            reference_step(&mut reference, &theirs, &g_ref, clip)?;
            clipped.step(&g_ours)?;
            fused.step(&g_fused)?;
            KernelEmulation::new().run(|| emulated.step(&g_emulated))?;
            let want = vars_bits(&theirs)?;
            assert_same(&vars_bits(&ours)?, &want, &format!("Clipped, {what}"));
            assert_same(
                &vars_bits(&fused_vars)?,
                &want,
                &format!("FusedAdamW, {what}"),
            );
            assert_same(
                &vars_bits(&emulated_vars)?,
                &want,
                &format!("emulated FusedAdamW, {what}"),
            );
        }
        assert_eq!(
            clipped.clipped_steps()?,
            fused.clipped_steps()?,
            "eps {eps}"
        );
    }
    Ok(())
}

/// `error_if_nonfinite` in the setting: a step whose norm is NaN or infinite is an error on
/// every optimizer (as `ClipGradNorm::clip_` refuses it), and nothing changes: the vars, the
/// counters, the gradients.
#[test]
fn error_if_nonfinite_in_the_setting_refuses_the_step_on_every_optimizer() -> Result<()> {
    let setting = ClipSetting::Norm(ClipGradNorm::new(1.0).with_error_if_nonfinite(true));
    for bad in [f32::NAN, f32::INFINITY] {
        let w = Var::new(&[1f32, 2., 3.], &Device::Cpu)?;
        let mut grads = GradStore::default();
        grads.insert(&w, Tensor::new(&[0.5f32, bad, 1.0], &Device::Cpu)?);
        let g_before = grads.get(&w).expect("g").to_vec1::<f32>()?;
        let mut clipped = Clipped::<AdamW>::new(
            vec![w.clone()],
            ClippedConfig::new(params(), setting.clone()),
        )?;
        assert!(clipped.step(&grads).is_err(), "Clipped, {bad}");
        assert_eq!(clipped.steps()?, 0);
        let mut fused = FusedAdamW::new(vec![w.clone()], params())?.with_clip(setting.clone())?;
        let err = fused.step(&grads).expect_err("FusedAdamW refuses");
        assert!(err.to_string().contains("non-finite"), "{err}");
        let mut sgd =
            FusedSgd::new(vec![w.clone()], ParamsSgd::default())?.with_clip(setting.clone())?;
        assert!(
            KernelEmulation::new().run(|| sgd.step(&grads)).is_err(),
            "emulated FusedSgd, {bad}"
        );
        assert_eq!((fused.steps()?, sgd.steps()?), (0, 0));
        assert_eq!(
            w.to_vec1::<f32>()?,
            [1.0, 2.0, 3.0],
            "{bad}: the var is unchanged"
        );
        let g_after = grads.get(&w).expect("g").to_vec1::<f32>()?;
        assert_eq!(
            g_before.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            g_after.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            "{bad}: the gradients are unchanged"
        );
    }
    // A finite step goes through, bitwise as without the flag.
    let a = Var::new(&[1f32, 2., 3.], &Device::Cpu)?;
    let b = Var::new(&[1f32, 2., 3.], &Device::Cpu)?;
    let mut with = FusedAdamW::new(vec![a.clone()], params())?.with_clip(setting)?;
    let mut without =
        FusedAdamW::new(vec![b.clone()], params())?.with_clip(ClipSetting::norm(1.0))?;
    for (w, opt) in [(&a, &mut with), (&b, &mut without)] {
        let mut grads = GradStore::default();
        grads.insert(w, Tensor::new(&[3f32, -4.0, 12.0], &Device::Cpu)?);
        opt.step(&grads)?;
    }
    assert_same(&vars_bits(&[a])?, &vars_bits(&[b])?, "finite step");
    Ok(())
}

/// The run of skipped steps, queried: after each step of FINITE, NaN, inf, FINITE, NaN the run is
/// 0, 1, 2, 0, 1 and `last_step_skipped` says whether it is not 0, on `Clipped`, `FusedAdamW` on
/// the CPU and through the kernels, and `FusedSgd`; a step refused by `max_consecutive_skips`
/// leaves the run as it was; a `GradScaler` step skipped after `unscale_` counts too.
#[test]
fn the_run_of_skipped_steps_is_a_query_on_every_optimizer() -> Result<()> {
    let sequence: [[f32; 2]; 5] = [
        [1.0, 2.0],
        [f32::NAN, 1.0],
        [f32::INFINITY, 1.0],
        [0.5, -0.5],
        [1.0, f32::NAN],
    ];
    let want = [(false, 0), (true, 1), (true, 2), (false, 0), (true, 1)];
    type Query = Box<dyn FnMut(&Var, &GradStore) -> Result<(bool, u64)>>;
    let mut clipped: Option<Clipped<AdamW>> = None;
    let mut adamw: Option<FusedAdamW> = None;
    let mut emulated: Option<FusedAdamW> = None;
    let mut sgd: Option<FusedSgd> = None;
    let optimizers: Vec<(&str, Query)> = vec![
        (
            "Clipped",
            Box::new(move |w: &Var, g: &GradStore| {
                let opt = match &mut clipped {
                    Some(o) => o,
                    None => clipped.insert(
                        Clipped::<AdamW>::new(
                            vec![w.clone()],
                            ClippedConfig::new(params(), ClipSetting::norm(1.0)),
                        )?
                        .with_skip_nonfinite(true),
                    ),
                };
                opt.step(g)?;
                Ok((opt.last_step_skipped()?, opt.consecutive_skips()?))
            }),
        ),
        (
            "FusedAdamW",
            Box::new(move |w: &Var, g: &GradStore| {
                let opt = match &mut adamw {
                    Some(o) => o,
                    None => adamw.insert(
                        FusedAdamW::new(vec![w.clone()], params())?.with_skip_nonfinite(true),
                    ),
                };
                opt.step(g)?;
                Ok((opt.last_step_skipped()?, opt.consecutive_skips()?))
            }),
        ),
        (
            "emulated FusedAdamW",
            Box::new(move |w: &Var, g: &GradStore| {
                let opt = match &mut emulated {
                    Some(o) => o,
                    None => emulated.insert(
                        FusedAdamW::new(vec![w.clone()], params())?
                            .with_skip_nonfinite(true)
                            .with_clip(ClipSetting::value(1.0))?,
                    ),
                };
                KernelEmulation::new().run(|| opt.step(g))?;
                Ok((opt.last_step_skipped()?, opt.consecutive_skips()?))
            }),
        ),
        (
            "FusedSgd",
            Box::new(move |w: &Var, g: &GradStore| {
                let opt = match &mut sgd {
                    Some(o) => o,
                    None => sgd.insert(
                        FusedSgd::new(vec![w.clone()], ParamsSgd::default())?
                            .with_skip_nonfinite(true)
                            .with_max_consecutive_skips(5),
                    ),
                };
                opt.step(g)?;
                Ok((opt.last_step_skipped()?, opt.consecutive_skips()?))
            }),
        ),
    ];
    for (name, mut query) in optimizers {
        let w = Var::new(&[1f32, 1.0], &Device::Cpu)?;
        for (i, (g, want)) in sequence.iter().zip(want).enumerate() {
            let mut grads = GradStore::default();
            grads.insert(&w, Tensor::new(g, &Device::Cpu)?);
            assert_eq!(query(&w, &grads)?, want, "{name}, step {i}");
        }
    }

    // A refused step (past the limit) leaves the run as it was.
    let w = Var::new(&[1f32, 1.0], &Device::Cpu)?;
    let mut opt = FusedAdamW::new(vec![w.clone()], params())?
        .with_skip_nonfinite(true)
        .with_max_consecutive_skips(1);
    let mut nan = GradStore::default();
    nan.insert(&w, Tensor::new(&[f32::NAN, 1.0], &Device::Cpu)?);
    opt.step(&nan)?;
    assert!(opt.step(&nan).is_err());
    assert_eq!(
        (opt.last_step_skipped()?, opt.consecutive_skips()?),
        (true, 1)
    );

    // GradScaler after `unscale_`: a found-inf step is recorded as a skip without running.
    let w = Var::new(&[1f32, 1.0], &Device::Cpu)?;
    let mut opt = FusedAdamW::new(vec![w.clone()], params())?;
    let mut scaler = GradScaler::new();
    for (i, g) in [
        [1f32, 2.0],
        [f32::INFINITY, 0.0],
        [f32::NAN, 0.0],
        [1.0, 1.0],
    ]
    .iter()
    .enumerate()
    {
        let mut grads = GradStore::default();
        grads.insert(&w, Tensor::new(g, &Device::Cpu)?);
        scaler.unscale_(std::slice::from_ref(&w), &mut grads)?;
        scaler.step(&mut opt, &grads)?;
        scaler.update()?;
        let want = [(false, 0), (true, 1), (true, 2), (false, 0)][i];
        assert_eq!(
            (opt.last_step_skipped()?, opt.consecutive_skips()?),
            want,
            "GradScaler step {i}"
        );
    }
    Ok(())
}

/// The defaults the docs claim, against PyTorch's published ones (`torch.optim.SGD`: lr 1e-3;
/// `clip_grad_norm_`: eps 1e-6; `torch.amp.GradScaler`: 2^16, 2, 0.5, 2000) and candle's
/// (`AdamW::new_lr`), and every setting read back under the name it was set with.
#[test]
fn defaults_match_pytorch_and_settings_read_back_by_name() -> Result<()> {
    use candle_grad_clip::{AutoClip, ZClip, ZClipMode};
    let sgd = ParamsSgd::default();
    assert_eq!(
        (
            sgd.lr,
            sgd.momentum,
            sgd.dampening,
            sgd.weight_decay,
            sgd.nesterov
        ),
        (1e-3, 0.0, 0.0, 0.0, false)
    );
    assert_eq!(ClipGradNorm::DEFAULT_EPS, 1e-6);
    assert_eq!(ClipSetting::AGC_DEFAULT_EPS, 1e-3);
    let scaler = GradScaler::new();
    assert_eq!(
        (
            scaler.init_scale(),
            scaler.growth_factor(),
            scaler.backoff_factor(),
            scaler.growth_interval()
        ),
        (65536.0, 2.0, 0.5, 2000)
    );
    let ours = FusedAdamW::new_lr(vec![], 0.25)?;
    let theirs = AdamW::new_lr(vec![], 0.25)?;
    let (p, q) = (ours.params(), theirs.params());
    assert_eq!(
        (p.lr, p.beta1, p.beta2, p.eps, p.weight_decay),
        (q.lr, q.beta1, q.beta2, q.eps, q.weight_decay)
    );

    let clip = ClipGradNorm::new(2.0)
        .with_norm_type(NormType::L1)
        .with_eps(0.5)
        .with_error_if_nonfinite(true);
    assert_eq!(
        (
            clip.max_norm(),
            clip.norm_type(),
            clip.eps(),
            clip.error_if_nonfinite()
        ),
        (2.0, NormType::L1, 0.5, true)
    );
    let zclip = ZClip::new()
        .with_alpha(0.9)
        .with_z_threshold(3.0)
        .with_warmup_steps(7)
        .with_mode(ZClipMode::Mean)
        .with_max_grad_norm(4.0);
    assert_eq!(
        (
            zclip.alpha(),
            zclip.z_threshold(),
            zclip.warmup_steps(),
            zclip.mode(),
            zclip.max_grad_norm()
        ),
        (0.9, 3.0, 7, ZClipMode::Mean, Some(4.0))
    );
    let scaler = GradScaler::new()
        .with_init_scale(8.0)
        .with_growth_factor(3.0)
        .with_backoff_factor(0.25)
        .with_growth_interval(5);
    assert_eq!(
        (
            scaler.init_scale(),
            scaler.growth_factor(),
            scaler.backoff_factor(),
            scaler.growth_interval()
        ),
        (8.0, 3.0, 0.25, 5)
    );
    let autoclip = AutoClip::new(25.0)?.with_capacity(9)?;
    assert_eq!((autoclip.percentile(), autoclip.capacity()), (25.0, 9));
    let fused = FusedSgd::new(vec![], ParamsSgd::default())?
        .with_skip_nonfinite(true)
        .with_max_consecutive_skips(2);
    assert_eq!(
        (fused.skip_nonfinite(), fused.max_consecutive_skips()),
        (true, Some(2))
    );
    let clipped =
        Clipped::<AdamW>::new(vec![], ClippedConfig::new(params(), ClipSetting::norm(1.0)))?
            .with_skip_nonfinite(true)
            .with_max_consecutive_skips(3);
    assert_eq!(
        (clipped.skip_nonfinite(), clipped.max_consecutive_skips()),
        (true, Some(3))
    );
    // Bad settings are refused on use, naming the setting, and change nothing.
    let err = ZClip::new()
        .with_alpha(1.5)
        .validate()
        .expect_err("alpha")
        .to_string();
    assert!(err.contains("alpha"), "{err}");
    let err = GradScaler::new()
        .with_growth_factor(0.5)
        .scale_value()
        .expect_err("growth")
        .to_string();
    assert!(err.contains("growth_factor"), "{err}");
    Ok(())
}

/// A `Clipped` step whose inner optimizer fails leaves the policy as it was: AutoClip's history
/// (the norm is recorded only once the step succeeded) and ZClip's statistics, so that a retry
/// decides as the first attempt did.
#[test]
fn a_failed_inner_step_leaves_the_policy_as_it_was() -> Result<()> {
    use candle_grad_clip::{AutoClip, ZClip};
    use std::cell::Cell;
    use std::rc::Rc;

    /// SGD that refuses its step while `fail` is set.
    struct Flaky {
        sgd: candle_nn::SGD,
        fail: Rc<Cell<bool>>,
    }
    impl Optimizer for Flaky {
        type Config = (f64, Rc<Cell<bool>>);
        fn new(vars: Vec<Var>, (lr, fail): Self::Config) -> Result<Self> {
            Ok(Self {
                sgd: candle_nn::SGD::new(vars, lr)?,
                fail,
            })
        }
        fn step(&mut self, grads: &GradStore) -> Result<()> {
            if self.fail.get() {
                candle_core::bail!("flaky: refused")
            }
            self.sgd.step(grads)
        }
        fn learning_rate(&self) -> f64 {
            self.sgd.learning_rate()
        }
        fn set_learning_rate(&mut self, lr: f64) {
            self.sgd.set_learning_rate(lr)
        }
    }

    for setting in [
        ClipSetting::AutoClip(AutoClip::new(50.0)?),
        ClipSetting::ZClip(ZClip::new().with_warmup_steps(2)),
    ] {
        let fail = Rc::new(Cell::new(false));
        let w = Var::new(&[1f32, 1.0], &Device::Cpu)?;
        let mut opt = Clipped::<Flaky>::new(
            vec![w.clone()],
            ClippedConfig::new((0.1, fail.clone()), setting.clone()),
        )?;
        let state = |opt: &Clipped<Flaky>| -> Result<Vec<(String, Vec<u64>)>> {
            match opt.clip_setting() {
                ClipSetting::AutoClip(a) => common::state_bits(&a.state_dict()?),
                ClipSetting::ZClip(z) => common::state_bits(&z.state_dict()?),
                _ => unreachable!(),
            }
        };
        for g in [[3f32, 4.0], [1.0, 0.5], [6.0, 8.0]] {
            let mut grads = GradStore::default();
            grads.insert(&w, Tensor::new(&g, &Device::Cpu)?);
            let before = state(&opt)?;
            fail.set(true);
            assert!(opt.step(&grads).is_err(), "{setting:?}");
            assert_eq!(
                state(&opt)?,
                before,
                "{setting:?}: the policy moved on a failed step"
            );
            fail.set(false);
            let mut fresh = GradStore::default();
            fresh.insert(&w, Tensor::new(&g, &Device::Cpu)?);
            opt.step(&fresh)?;
        }
        assert_eq!(opt.steps()?, 3);
    }
    Ok(())
}
