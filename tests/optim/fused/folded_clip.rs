//! The clip folded into the step: bitwise the clip followed by the step for every setting; SGD with
//! momentum against clipping a copy of the gradients and stepping an unclipped `FusedSgd`.

use super::*;
use candle_grad_clip::ClipGradNorm;

/// For every setting: the fused, clipped step is bitwise the clip followed by candle's step, as
/// `Clipped<AdamW>` does it (clip the store in place, then `AdamW::step`), with the same norm and
/// the same count of clipped steps; and the fused step leaves the `GradStore` unwritten.
#[test]
fn folded_clip_is_bitwise_clip_then_step() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(4);
    let settings = [
        ClipSetting::norm(0.5),
        ClipSetting::norm(1e6),
        ClipSetting::Norm(ClipGradNorm::new(0.3).with_norm_type(NormType::L1)),
        ClipSetting::Norm(ClipGradNorm::new(0.01).with_norm_type(NormType::Inf)),
        ClipSetting::Norm(ClipGradNorm::new(0.7).with_norm_type(NormType::P(3.0))),
        ClipSetting::value(0.05),
        ClipSetting::AutoClip(AutoClip::new(30.0)?),
    ];
    for dtype in [DType::F32, DType::F64] {
        for setting in &settings {
            let params = ParamsAdamW {
                lr: 0.01,
                ..Default::default()
            };
            let (ours, theirs) = twin_vars(&mut rng, &SHAPES, &[dtype])?;
            let mut fused =
                FusedAdamW::new(ours.clone(), params.clone())?.with_clip(setting.clone())?;
            let config = ClippedConfig::new(params, setting.clone());
            let mut reference = Clipped::<AdamW>::new(theirs.clone(), config)?;
            for step in 0..12 {
                let scale = if step % 4 == 3 { 100.0 } else { 1.0 };
                let (ga, gb) = twin_grads(
                    &mut rng,
                    &ours,
                    &theirs,
                    scale,
                    (step % 5 == 2).then_some(SKIP),
                )?;
                let before = store_bits(&ours, &ga)?;
                fused.step(&ga)?;
                assert_eq!(
                    before,
                    store_bits(&ours, &ga)?,
                    "the fused step wrote the GradStore"
                );
                reference.step(&gb)?;
                let what = format!("{dtype:?} {setting:?} step {step}");
                assert_same(&vars_bits(&ours)?, &vars_bits(&theirs)?, &what);
                let (a, b) = (
                    fused.last_norm().expect("a norm"),
                    reference.last_norm().expect("a norm"),
                );
                assert_eq!(bits(a)?, bits(b)?, "{what}: last_norm");
            }
            assert_eq!(
                fused.clipped_steps()?,
                reference.clipped_steps()?,
                "{dtype:?} {setting:?}"
            );
            assert!(
                fused.clipped_steps()? > 0
                    || matches!(setting, ClipSetting::Norm(clip) if clip.max_norm() > 1.0)
            );
        }
    }
    Ok(())
}

/// SGD with momentum has no candle counterpart: its folded clip is checked against clipping a
/// copy of the gradients and stepping an unclipped `FusedSgd`.
#[test]
fn folded_clip_with_momentum_is_clip_then_unclipped_step() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(5);
    let params = ParamsSgd {
        lr: 0.05,
        momentum: 0.9,
        dampening: 0.2,
        weight_decay: 1e-3,
        nesterov: false,
    };
    for dtype in [DType::F32, DType::F64, DType::BF16, DType::F16] {
        for setting in [ClipSetting::norm(0.5), ClipSetting::value(0.02)] {
            let (ours, theirs) = twin_vars(&mut rng, &SHAPES, &[dtype])?;
            let mut fused =
                FusedSgd::new(ours.clone(), params.clone())?.with_clip(setting.clone())?;
            let mut reference = FusedSgd::new(theirs.clone(), params.clone())?;
            for step in 0..10 {
                let (ga, mut gb) = twin_grads(
                    &mut rng,
                    &ours,
                    &theirs,
                    1.0,
                    (step % 4 == 1).then_some(SKIP),
                )?;
                fused.step(&ga)?;
                match &setting {
                    ClipSetting::Value { clip_value } => {
                        clip_grad_value_(&theirs, &mut gb, *clip_value)?
                    }
                    _ => {
                        clip_grad_norm_(&theirs, &mut gb, 0.5)?;
                    }
                }
                reference.step(&gb)?;
                assert_same(
                    &vars_bits(&ours)?,
                    &vars_bits(&theirs)?,
                    &format!("{dtype:?} {setting:?} step {step}"),
                );
            }
            // The whole state (momentum buffers, step count) bitwise, but for the count of
            // clipped steps, which only the folded clip keeps.
            let state = |opt: &FusedSgd| -> Result<Vec<(String, Vec<u64>)>> {
                let mut state = opt.state_dict()?;
                state.remove("clipped_steps");
                state_bits(&state)
            };
            assert_eq!(
                state(&fused)?,
                state(&reference)?,
                "{dtype:?} {setting:?}: state"
            );
        }
    }
    Ok(())
}
