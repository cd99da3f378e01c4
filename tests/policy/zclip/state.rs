//! ZClip's state and settings: checkpoints resume bitwise; bad settings and bad states are
//! refused, and nothing changes.

use super::*;

/// Saving in the warm-up or after it and resuming is bitwise the same run: `state_dict` and
/// `save_state`/`load_state`.
#[test]
fn zclip_checkpoints_resume_bitwise() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(14);
    let norms = sequence(&mut rng, 60);
    let w = Var::new(&[0f64], &Device::Cpu)?;
    let setting = ZClip::new().with_warmup_steps(10);
    let mut straight = setting.clone();
    let straight_out: Vec<(f64, f64)> = norms
        .iter()
        .map(|&n| one_element_step(&mut straight, &w, n))
        .collect::<Result<_>>()?;
    let dir = std::env::temp_dir().join(format!("zclip-ckpt-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    for cut in [4, 10, 33] {
        let mut first = setting.clone();
        let mut out = Vec::new();
        for &n in &norms[..cut] {
            out.push(one_element_step(&mut first, &w, n)?);
        }
        let path = dir.join(format!("cut{cut}.safetensors"));
        first.save_state(&path)?;
        let mut resumed = setting.clone();
        if cut % 2 == 0 {
            resumed.load_state(&path)?;
        } else {
            resumed.load_state_dict(&first.state_dict()?)?;
        }
        for &n in &norms[cut..] {
            out.push(one_element_step(&mut resumed, &w, n)?);
        }
        let a: Vec<(u64, u64)> = out
            .iter()
            .map(|(x, y)| (x.to_bits(), y.to_bits()))
            .collect();
        let b: Vec<(u64, u64)> = straight_out
            .iter()
            .map(|(x, y)| (x.to_bits(), y.to_bits()))
            .collect();
        assert_eq!(a, b, "cut at {cut}");
        assert_eq!(resumed.statistics()?, straight.statistics()?);
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// Bad settings are refused naming the setting, by `validate`, `Clipped`, `with_clip` and
/// `clip_`, and nothing changes; bad states are refused whole.
#[test]
fn zclip_refusals() -> Result<()> {
    let bad = [
        (ZClip::new().with_alpha(0.0), "alpha"),
        (ZClip::new().with_alpha(1.0), "alpha"),
        (ZClip::new().with_alpha(f64::NAN), "alpha"),
        (ZClip::new().with_z_threshold(0.0), "z_threshold"),
        (ZClip::new().with_z_threshold(f64::NAN), "z_threshold"),
        (ZClip::new().with_warmup_steps(0), "warmup_steps"),
        (ZClip::new().with_max_grad_norm(-1.0), "max_grad_norm"),
        (ZClip::new().with_max_grad_norm(f64::NAN), "max_grad_norm"),
    ];
    let w = Var::new(&[1f32, 2.], &Device::Cpu)?;
    for (zclip, name) in bad {
        let e = ClipSetting::ZClip(zclip.clone())
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains(name), "{e}");
        assert!(Clipped::<SGD>::new(
            vec![w.clone()],
            ClippedConfig::new(0.1, ClipSetting::ZClip(zclip.clone()))
        )
        .is_err());
        assert!(FusedSgd::new(vec![w.clone()], ParamsSgd::default())?
            .with_clip(ClipSetting::ZClip(zclip.clone()))
            .is_err());
        let mut grads = GradStore::default();
        grads.insert(&w, Tensor::new(&[3f32, 4.], &Device::Cpu)?);
        let mut z = zclip;
        assert!(z.clip_(std::slice::from_ref(&w), &mut grads).is_err());
        assert_eq!(grads.get(&w).expect("g").to_vec1::<f32>()?, [3.0, 4.0]);
        assert_eq!(z.last_coefficient()?, None);
    }
    // States: unknown keys, wrong dtypes, too many warm-up norms, non-finite statistics.
    let good = ZClip::new().with_warmup_steps(3).state_dict()?;
    let mut cases = Vec::new();
    let mut extra = good.clone();
    extra.insert("other".into(), Tensor::new(0f64, &Device::Cpu)?);
    cases.push(extra);
    let mut wrong = good.clone();
    wrong.insert("mean".into(), Tensor::new(0f32, &Device::Cpu)?);
    cases.push(wrong);
    let mut long = good.clone();
    long.insert(
        "warmup_norms".into(),
        Tensor::new(&[1f64, 2., 3.], &Device::Cpu)?,
    );
    cases.push(long);
    let mut nan = good.clone();
    nan.insert("var".into(), Tensor::new(f64::NAN, &Device::Cpu)?);
    cases.push(nan);
    for (i, state) in cases.iter().enumerate() {
        let mut z = ZClip::new().with_warmup_steps(3);
        assert!(z.load_state_dict(state).is_err(), "state case {i}");
        assert_eq!(z.last_coefficient()?, None, "nothing loaded");
    }
    Ok(())
}

/// Settings with an upper bound: a warm-up too long for memory is an error at every entry point
/// (never an index panic or an allocation abort), and so is an AutoClip capacity past its bound.
#[test]
fn warmup_and_capacity_past_their_bounds_are_errors() -> Result<()> {
    let w = Var::new(&[1f32, 2.], &Device::Cpu)?;
    for warmup in [usize::MAX, 1 << 40, ZClip::MAX_WARMUP_STEPS + 1] {
        let mut zclip = ZClip::new().with_warmup_steps(warmup);
        let mut grads = GradStore::default();
        grads.insert(&w, Tensor::new(&[3f32, 4.], &Device::Cpu)?);
        let err = zclip
            .clip_(std::slice::from_ref(&w), &mut grads)
            .expect_err("an unbounded warm-up accepted");
        assert!(
            err.to_string().contains("warmup_steps must be at most"),
            "{err}"
        );
        assert!(zclip.state_dict().is_err());
        assert!(zclip.load_state_dict(&ZClip::new().state_dict()?).is_err());
        let opt = FusedAdamW::new(vec![w.clone()], Default::default())?;
        assert!(opt.with_clip(ClipSetting::ZClip(zclip)).is_err());
    }
    let err = candle_grad_clip::AutoClip::default()
        .with_capacity(usize::MAX)
        .expect_err("an unbounded capacity accepted");
    assert!(
        err.to_string().contains("capacity must be at most"),
        "{err}"
    );
    Ok(())
}
