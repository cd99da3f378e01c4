//! Every `save_state` file is verified on loading (the digests of its tensors and header, its
//! kind), and every loaded optimizer value is checked against what the update can take (issue
//! 21, scenario 5).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Result, Tensor};
use candle_grad_clip::{FusedAdamW, FusedSgd, GradScaler, ParamsSgd, ZClip};
use candle_nn::Optimizer;

use crate::common::{seeded_varmap, state_bits};
use crate::{grads, params, temp_dir};

const SPECS: [(&str, &[usize], DType); 2] = [("w", &[6, 5], DType::F32), ("v", &[3], DType::F64)];

/// Loads `path` with every byte in turn flipped (a stride of bytes, to keep it short) and
/// expects each load to fail; then a flipped tensor byte must be named.
fn every_flip_is_refused(path: &Path, load: &dyn Fn(&Path) -> Result<()>) -> Result<()> {
    let good = std::fs::read(path)?;
    load(path)?;
    for i in (0..good.len()).step_by(7) {
        let mut bytes = good.clone();
        bytes[i] ^= 0x04;
        std::fs::write(path, &bytes)?;
        assert!(
            load(path).is_err(),
            "byte {i} of {} flipped: loaded",
            good.len()
        );
    }
    let mut bytes = good.clone();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    std::fs::write(path, &bytes)?;
    let err = load(path)
        .expect_err("a flipped tensor byte loaded")
        .to_string();
    assert!(err.contains("does not match its digest"), "{err}");
    std::fs::write(path, &good)?;
    Ok(())
}

#[test]
fn every_state_file_refuses_a_flipped_byte() -> Result<()> {
    let dir = temp_dir("flips");
    let vm = seeded_varmap(2, &SPECS)?;
    let mut adamw = FusedAdamW::from_varmap(&vm, params())?;
    let sgd_params = ParamsSgd {
        momentum: 0.9,
        ..Default::default()
    };
    let mut sgd = FusedSgd::from_varmap(&vm, sgd_params.clone())?;
    for k in 0..2 {
        adamw.step(&grads(&vm, k)?)?;
        sgd.step(&grads(&vm, k)?)?;
    }
    let path = dir.join("adamw.safetensors");
    adamw.save_state(&path)?;
    every_flip_is_refused(&path, &|p| {
        FusedAdamW::from_varmap(&vm, params())?.load_state(p)
    })?;
    let path = dir.join("sgd.safetensors");
    sgd.save_state(&path)?;
    every_flip_is_refused(&path, &|p| {
        FusedSgd::from_varmap(&vm, sgd_params.clone())?.load_state(p)
    })?;
    let path = dir.join("zclip.safetensors");
    let zclip = ZClip::new();
    zclip.save_state(&path)?;
    every_flip_is_refused(&path, &|p| ZClip::new().load_state(p))?;
    let path = dir.join("scaler.safetensors");
    GradScaler::new().save_state(&path)?;
    every_flip_is_refused(&path, &|p| GradScaler::new().load_state(p))?;
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn a_state_file_of_another_kind_or_without_digests_is_refused() -> Result<()> {
    let dir = temp_dir("kinds");
    let vm = seeded_varmap(2, &SPECS)?;
    let path = dir.join("state.safetensors");
    FusedAdamW::from_varmap(&vm, params())?.save_state(&path)?;
    let err = FusedSgd::from_varmap(&vm, Default::default())?
        .load_state(&path)
        .expect_err("AdamW's state loaded into SGD");
    assert!(
        err.to_string()
            .contains("holds the state of a FusedAdamW, not of a FusedSgd"),
        "{err}"
    );
    let err = GradScaler::new().load_state(&path).expect_err("loaded");
    assert!(err.to_string().contains("not of a GradScaler"), "{err}");
    // A plain safetensors file of the right tensors (what 0.1 wrote): no digests, refused.
    let state = FusedAdamW::from_varmap(&vm, params())?.state_dict()?;
    candle_core::safetensors::save(&state, &path)?;
    let err = FusedAdamW::from_varmap(&vm, params())?
        .load_state(&path)
        .expect_err("an unverifiable file loaded");
    assert!(err.to_string().contains("has no digests"), "{err}");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// A trained AdamW's state with one entry replaced.
fn adamw_state_with(key: &str, value: Tensor) -> Result<(FusedAdamW, HashMap<String, Tensor>)> {
    let vm = seeded_varmap(2, &SPECS)?;
    let mut opt = FusedAdamW::from_varmap(&vm, params())?;
    opt.step(&grads(&vm, 0)?)?;
    let mut state = opt.state_dict()?;
    assert!(state.contains_key(key), "{key}");
    state.insert(key.to_string(), value);
    Ok((opt, state))
}

#[test]
fn values_the_update_cannot_take_are_refused() -> Result<()> {
    let cpu = &Device::Cpu;
    let cases: Vec<(&str, Tensor, &str)> = vec![
        // t as i32 would wrap to 0: the bias correction divides by zero.
        (
            "step",
            Tensor::new(1i64 << 32, cpu)?,
            "past the 2147483646 steps",
        ),
        (
            "step",
            Tensor::new(i32::MAX as i64, cpu)?,
            "past the 2147483646 steps",
        ),
        ("skipped_steps", Tensor::new(-1i64, cpu)?, "is negative"),
        (
            "w.exp_avg_sq",
            Tensor::full(-1e-3f32, (6, 5), cpu)?,
            "holds a negative value",
        ),
        (
            "w.exp_avg",
            Tensor::full(f32::NAN, (6, 5), cpu)?,
            "non-finite value",
        ),
        (
            "v.exp_avg_sq",
            Tensor::new(&[1f64, f64::INFINITY, 0.], cpu)?,
            "non-finite value",
        ),
    ];
    for (key, value, needle) in cases {
        let (mut opt, state) = adamw_state_with(key, value)?;
        let before = opt.state_dict()?;
        let err = opt.load_state_dict(&state).expect_err("accepted");
        assert!(err.to_string().contains(needle), "{key}: {err}");
        assert!(
            err.to_string().contains(&format!("`{key}`")),
            "{key}: {err}"
        );
        let after = state_bits(&opt.state_dict()?)?;
        assert_eq!(after, state_bits(&before)?, "{key}: the state changed");
    }
    // The largest step count the update takes loads, and the next step runs to finite values.
    let (mut opt, state) = adamw_state_with("step", Tensor::new(i32::MAX as i64 - 1, cpu)?)?;
    opt.load_state_dict(&state)?;
    let grads = {
        let mut g = candle_core::backprop::GradStore::default();
        for v in opt.vars() {
            g.insert(v, v.ones_like()?);
        }
        g
    };
    opt.step(&grads)?;
    assert_eq!(opt.steps()?, i32::MAX as u64);
    for v in opt.vars() {
        let values = v.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        assert!(values.iter().all(|x| x.is_finite()), "{values:?}");
    }
    Ok(())
}
