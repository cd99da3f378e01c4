//! `ZClip::clip_` on the CPU against the transcription of `zclip.py`, step by step and bitwise,
//! on F64 and F32 gradients; and a planted-bug check of the transcription itself.

use super::*;

/// The recorded sequences through `ZClip::clip_` (CPU) equal the transcription step by step: the
/// gradient after clipping bitwise (`g · factor`, one rounding), the statistics bitwise.
#[test]
fn zclip_matches_the_reference_on_recorded_norm_sequences() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(7);
    for (case, setting) in settings().into_iter().enumerate() {
        let mut zclip = setting.clone();
        let mut reference = Reference::new(&setting);
        let w = Var::new(&[0f64], &Device::Cpu)?;
        let mut clipped = 0;
        for (i, n) in sequence(&mut rng, 120).into_iter().enumerate() {
            let g = if i % 2 == 0 { n } else { -n };
            let (norm, after) = one_element_step(&mut zclip, &w, g)?;
            let what = format!("case {case} step {i} norm {n}");
            assert_eq!(norm.to_bits(), n.abs().to_bits(), "{what}: the norm");
            let want = match reference.step(n) {
                Some(f) => {
                    clipped += 1;
                    g * f
                }
                None => g,
            };
            if want.is_nan() {
                assert!(after.is_nan(), "{what}: NaN poisons");
            } else {
                assert_eq!(
                    after.to_bits(),
                    want.to_bits(),
                    "{what}: gradient {after} vs {want}"
                );
            }
            let stats = zclip.statistics()?;
            match (stats, reference.stats) {
                (Some(stats), Some((rm, rv))) => {
                    assert_eq!(stats.mean.to_bits(), rm.to_bits(), "{what}: mean");
                    assert_eq!(stats.std.to_bits(), rv.sqrt().to_bits(), "{what}: std");
                }
                (None, None) => {}
                (a, b) => panic!("{what}: statistics {a:?} vs {b:?}"),
            }
        }
        assert!(clipped > 0, "case {case}: some step must be clipped");
    }
    Ok(())
}

/// An F32 model: the norm ZClip takes is the F32 norm as returned (the reference's `.item()` of
/// a float32 norm); the clipped gradients are `g · factor` rounded once to f32.
#[test]
fn zclip_on_f32_gradients_uses_the_returned_norm() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(8);
    let setting = ZClip::new().with_warmup_steps(4);
    let mut zclip = setting.clone();
    let mut reference = Reference::new(&setting);
    let w = Var::zeros(3, DType::F32, &Device::Cpu)?;
    for (i, n) in sequence(&mut rng, 60).into_iter().enumerate() {
        let g: Vec<f32> = (0..3)
            .map(|k| (n * [0.6, 0.0, -0.8][k] * rng.gen_range(0.9..1.1)) as f32)
            .collect();
        let mut grads = GradStore::default();
        grads.insert(&w, Tensor::new(g.as_slice(), &Device::Cpu)?);
        let norm = zclip.clip_(std::slice::from_ref(&w), &mut grads)?;
        assert_eq!(norm.dtype(), DType::F32);
        let norm = norm.to_scalar::<f32>()? as f64;
        let exact = g
            .iter()
            .map(|&x| (x as f64) * (x as f64))
            .sum::<f64>()
            .sqrt();
        if exact.is_finite() {
            assert_eq!(norm, exact as f32 as f64, "step {i}: the norm");
        }
        let after = grads.get(&w).expect("gradient").to_vec1::<f32>()?;
        let want: Vec<f32> = match reference.step(norm) {
            Some(f) => g.iter().map(|&x| (x as f64 * f) as f32).collect(),
            None => g.clone(),
        };
        let (a, b): (Vec<u32>, Vec<u32>) = (
            after.iter().map(|x| x.to_bits()).collect(),
            want.iter().map(|x| x.to_bits()).collect(),
        );
        if want.iter().all(|x| !x.is_nan()) {
            assert_eq!(a, b, "step {i}");
        } else {
            assert!(after.iter().all(|x| x.is_nan()), "step {i}: NaN poisons");
        }
    }
    Ok(())
}

/// Planted-bug check of the transcription itself: a ZClip that updates the EMA with the norm
/// instead of the clipped value drifts away from the reference after the first spike.
#[test]
fn the_reference_tells_the_ema_input_apart() {
    let setting = ZClip::new().with_warmup_steps(3);
    let mut a = Reference::new(&setting);
    let norms = [1.0, 1.2, 0.8, 1.1, 50.0, 1.0];
    for n in norms {
        a.step(n);
    }
    let (mean, _) = a.stats.expect("ready");
    // With the raw 50 in the EMA the mean would exceed 2.
    assert!(mean < 1.5, "{mean}");
}
