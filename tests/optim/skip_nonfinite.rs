//! Skipping non-finite steps (Optax's `apply_if_finite`): `Clipped::skip_nonfinite`,
//! `skipped_steps`, and `max_consecutive_skips` on `Clipped` and the fused optimizers. A skipped
//! step changes nothing but its count; the step past the limit is an error and changes nothing at
//! all; a finite step starts the count again.

use crate::common;

use candle_core::{backprop::GradStore, DType, Device, Result, Tensor, Var};
use candle_grad_clip::{
    AutoClip, ClipGradNorm, ClipSetting, Clipped, ClippedConfig, FusedAdamW, FusedSgd,
    KernelEmulation, NormType, ParamsSgd, ZClip,
};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, SGD};
use common::{assert_same, state_bits, vars_bits};

fn grads_of(w: &Var, values: &[f32]) -> Result<GradStore> {
    let mut g = GradStore::default();
    g.insert(w, Tensor::new(values, &Device::Cpu)?);
    Ok(g)
}

const FINITE: [f32; 3] = [0.5, -2.0, 3.0];
const NAN: [f32; 3] = [0.5, f32::NAN, 3.0];
const INF: [f32; 3] = [f32::NEG_INFINITY, 1.0, 3.0];

/// `Clipped` with every setting: a non-finite step is skipped (the var, the inner optimizer's
/// state, the gradients and the policy's history untouched), counted, and the run goes on as if
/// it had never happened: bitwise the run without it.
#[test]
fn clipped_skips_nonfinite_steps_as_if_they_never_happened() -> Result<()> {
    let settings = [
        ClipSetting::norm(1.0),
        ClipSetting::Norm(ClipGradNorm::new(2.0).with_norm_type(NormType::L1)),
        ClipSetting::value(1.0),
        ClipSetting::AutoClip(AutoClip::new(50.0)?),
        ClipSetting::ZClip(ZClip::new().with_warmup_steps(2)),
    ];
    for setting in settings {
        let what = format!("{setting:?}");
        let a = Var::new(&[1f32, 2., 3.], &Device::Cpu)?;
        let b = Var::new(&[1f32, 2., 3.], &Device::Cpu)?;
        let params = ParamsAdamW {
            lr: 0.1,
            ..Default::default()
        };
        let mut skipping = Clipped::<AdamW>::new(
            vec![a.clone()],
            ClippedConfig::new(params.clone(), setting.clone()),
        )?
        .with_skip_nonfinite(true);
        let mut plain =
            Clipped::<AdamW>::new(vec![b.clone()], ClippedConfig::new(params, setting))?;
        let sequence: [&[f32]; 7] = [
            &FINITE,
            &NAN,
            &[3.0, 4.0, 0.0],
            &INF,
            &NAN,
            &FINITE,
            &[9.0, 1.0, 1.0],
        ];
        for (i, g) in sequence.iter().enumerate() {
            let ga = grads_of(&a, g)?;
            let before = ga.get(&a).expect("g").to_vec1::<f32>()?;
            skipping.step(&ga)?;
            let finite = g.iter().all(|x| x.is_finite());
            if finite {
                plain.step(&grads_of(&b, g)?)?;
            } else {
                let after = ga.get(&a).expect("g").to_vec1::<f32>()?;
                let same = before
                    .iter()
                    .zip(&after)
                    .all(|(x, y)| x.to_bits() == y.to_bits());
                assert!(
                    same,
                    "{what} step {i}: a skipped step leaves the gradients alone"
                );
                let norm = skipping.last_norm().expect("norm").to_dtype(DType::F64)?;
                assert!(!norm.to_scalar::<f64>()?.is_finite(), "{what}");
            }
            assert_same(
                &vars_bits(std::slice::from_ref(&a))?,
                &vars_bits(std::slice::from_ref(&b))?,
                &format!("{what} step {i}"),
            );
        }
        assert_eq!(
            (skipping.steps()?, skipping.skipped_steps()?),
            (4, 3),
            "{what}"
        );
        assert_eq!(skipping.clipped_steps()?, plain.clipped_steps()?, "{what}");
    }
    Ok(())
}

/// Without `skip_nonfinite` a NaN step goes through (NaN poisons, as `clip_grad_norm_`).
#[test]
fn clipped_without_skipping_steps_on_nan() -> Result<()> {
    let w = Var::new(&[1f32, 2., 3.], &Device::Cpu)?;
    let mut opt = Clipped::<SGD>::new(
        vec![w.clone()],
        ClippedConfig::new(0.1, ClipSetting::norm(1.0)),
    )?;
    opt.step(&grads_of(&w, &NAN)?)?;
    assert!(w.to_vec1::<f32>()?.iter().all(|x| x.is_nan()));
    assert_eq!((opt.steps()?, opt.skipped_steps()?), (1, 0));
    Ok(())
}

/// `max_consecutive_skips(k)` on `Clipped`: k skips in a row pass, the (k+1)-th is an error that
/// says the training is broken and changes nothing (var, counts, gradients); a finite step
/// resets the run, so k more are allowed; `0` refuses the first non-finite step.
#[test]
fn clipped_max_consecutive_skips() -> Result<()> {
    for limit in [0usize, 1, 3] {
        let w = Var::new(&[1f32, 2., 3.], &Device::Cpu)?;
        let mut opt = Clipped::<SGD>::new(
            vec![w.clone()],
            ClippedConfig::new(0.1, ClipSetting::norm(1.0)),
        )?
        .with_skip_nonfinite(true)
        .with_max_consecutive_skips(limit);
        for round in 0..2 {
            for k in 0..limit {
                opt.step(&grads_of(&w, if k % 2 == 0 { &NAN } else { &INF })?)?;
            }
            let before = w.to_vec1::<f32>()?;
            let g = grads_of(&w, &NAN)?;
            let e = opt.step(&g).unwrap_err().to_string();
            assert!(
                e.contains("training is broken")
                    && e.contains(&format!("max_consecutive_skips = {limit}")),
                "{e}"
            );
            assert_eq!(w.to_vec1::<f32>()?, before);
            assert_eq!(opt.skipped_steps()?, (limit * (round + 1)) as u64);
            // A finite step resets the run.
            opt.step(&grads_of(&w, &FINITE)?)?;
            assert_eq!(opt.steps()?, (round + 1) as u64);
        }
    }
    Ok(())
}

trait Fused {
    fn take(&mut self, grads: &GradStore) -> Result<()>;
    fn counts(&self) -> Result<(u64, u64, u64)>;
    fn state(&self) -> Result<Vec<(String, Vec<u64>)>>;
}

macro_rules! fused {
    ($ty:ty) => {
        impl Fused for $ty {
            fn take(&mut self, grads: &GradStore) -> Result<()> {
                self.step(grads)
            }
            fn counts(&self) -> Result<(u64, u64, u64)> {
                Ok((self.steps()?, self.clipped_steps()?, self.skipped_steps()?))
            }
            fn state(&self) -> Result<Vec<(String, Vec<u64>)>> {
                state_bits(&self.state_dict()?)
            }
        }
    };
}
fused!(FusedAdamW);
fused!(FusedSgd);

fn fused_pair(kind: usize, w: &Var, limit: usize) -> Result<Box<dyn Fused>> {
    Ok(match kind {
        0 => Box::new(
            FusedAdamW::new(vec![w.clone()], ParamsAdamW::default())?
                .with_clip(ClipSetting::norm(1.0))?
                .with_skip_nonfinite(true)
                .with_max_consecutive_skips(limit),
        ),
        1 => Box::new(
            FusedSgd::new(
                vec![w.clone()],
                ParamsSgd {
                    lr: 0.1,
                    momentum: 0.9,
                    ..Default::default()
                },
            )?
            .with_skip_nonfinite(true)
            .with_max_consecutive_skips(limit),
        ),
        _ => Box::new(
            FusedAdamW::new(vec![w.clone()], ParamsAdamW::default())?
                .with_clip(ClipSetting::ZClip(ZClip::new().with_warmup_steps(1)))?
                .with_skip_nonfinite(true)
                .with_max_consecutive_skips(limit),
        ),
    })
}

/// `max_consecutive_skips` on the fused optimizers, on the CPU and under the emulation: the step
/// past the limit is an error, and the counters, the state and the var are exactly what they were
/// before it; a finite step resets the run; a state loaded later starts a new run.
#[test]
fn fused_max_consecutive_skips() -> Result<()> {
    for emulated in [false, true] {
        for kind in 0..3 {
            for limit in [0usize, 2] {
                let what = format!("emulated {emulated} kind {kind} limit {limit}");
                let w = Var::new(&[1f32, 2., 3.], &Device::Cpu)?;
                let mut opt = fused_pair(kind, &w, limit)?;
                let run = |f: &mut dyn FnMut() -> Result<()>| -> Result<()> {
                    if emulated {
                        KernelEmulation::new().grid(2).run(f)?;
                        Ok(())
                    } else {
                        f()
                    }
                };
                run(&mut || opt.take(&grads_of(&w, &FINITE)?))?;
                for round in 0..2 {
                    for k in 0..limit {
                        run(&mut || {
                            opt.take(&grads_of(&w, if k % 2 == 0 { &INF } else { &NAN })?)
                        })?;
                    }
                    let (vars, counts, state) = (w.to_vec1::<f32>()?, opt.counts()?, opt.state()?);
                    let e = run(&mut || opt.take(&grads_of(&w, &NAN)?))
                        .unwrap_err()
                        .to_string();
                    assert!(e.contains("training is broken"), "{what}: {e}");
                    assert_eq!(w.to_vec1::<f32>()?, vars, "{what}");
                    assert_eq!(opt.counts()?, counts, "{what}");
                    assert_eq!(opt.state()?, state, "{what}");
                    // Again: still refused (the run did not grow).
                    assert!(
                        run(&mut || opt.take(&grads_of(&w, &INF)?)).is_err(),
                        "{what}"
                    );
                    run(&mut || opt.take(&grads_of(&w, &FINITE)?))?;
                    assert_eq!(opt.counts()?.2, (limit * (round + 1)) as u64, "{what}");
                }
                assert_eq!(opt.counts()?.0, 3, "{what}");
            }
        }
    }
    Ok(())
}

/// Without a limit the fused optimizers skip any number of non-finite steps in a row.
#[test]
fn fused_without_limit_skips_every_nonfinite_step() -> Result<()> {
    let w = Var::new(&[1f32, 2., 3.], &Device::Cpu)?;
    let mut opt = FusedSgd::new(vec![w.clone()], ParamsSgd::default())?.with_skip_nonfinite(true);
    for _ in 0..50 {
        opt.step(&grads_of(&w, &NAN)?)?;
    }
    assert_eq!((opt.steps()?, opt.skipped_steps()?), (0, 50));
    assert_eq!(w.to_vec1::<f32>()?, [1.0, 2.0, 3.0]);
    Ok(())
}
