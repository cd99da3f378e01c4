//! A checkpoint saved on another thread while the optimizer steps: the file holds the state at
//! build time, and the run goes on exactly as without the save.

use candle_core::{DType, Result};
use candle_grad_clip::{ClipSetting, FusedAdamW, TrainingCheckpoint};
use candle_nn::{Optimizer, VarMap};

use crate::common::{seeded_varmap, state_bits};
use crate::{grads, params, temp_dir, var_bits};

/// Large enough that the save overlaps several steps.
const SPECS: [(&str, &[usize], DType); 4] = [
    ("w1", &[512, 512], DType::F32),
    ("w2", &[512, 512], DType::F32),
    ("b", &[512], DType::F64),
    ("h", &[256, 64], DType::BF16),
];

fn optimizer(vm: &VarMap) -> Result<FusedAdamW> {
    FusedAdamW::from_varmap(vm, params())?.with_clip(ClipSetting::norm(1.0))
}

#[test]
fn a_save_on_another_thread_holds_the_state_at_build_time() -> Result<()> {
    let dir = temp_dir("background");
    let path = dir.join("ckpt.safetensors");
    // Without saves.
    let plain = seeded_varmap(3, &SPECS)?;
    let mut opt = optimizer(&plain)?;
    for k in 0..8 {
        opt.step(&grads(&plain, k)?)?;
    }
    let plain_end = var_bits(&plain)?;

    // With a save in flight from step 3 on.
    let vm = seeded_varmap(3, &SPECS)?;
    let mut opt = optimizer(&vm)?;
    for k in 0..3 {
        opt.step(&grads(&vm, k)?)?;
    }
    let (vars_at_3, state_at_3) = (var_bits(&vm)?, state_bits(&opt.state_dict()?)?);
    let pending = TrainingCheckpoint::new(&vm, 3)?
        .with_optimizer(&opt)?
        .with_metadata("at", "3")
        .save_in_background(&path)?;
    let mut stepped_during_save = 0;
    for k in 3..8 {
        stepped_during_save += usize::from(!pending.is_finished());
        opt.step(&grads(&vm, k)?)?;
    }
    pending.wait()?;
    assert_eq!(var_bits(&vm)?, plain_end, "the save changed the run");

    // The file: the state at step 3, restored into a fresh run.
    let fresh = seeded_varmap(77, &SPECS)?;
    let mut restored = optimizer(&fresh)?;
    let ck = TrainingCheckpoint::load(&path)?;
    assert_eq!((ck.step(), ck.metadata("at")), (3, Some("3")));
    ck.restore(&fresh).optimizer(&mut restored).apply()?;
    assert_eq!(var_bits(&fresh)?, vars_at_3);
    assert_eq!(state_bits(&restored.state_dict()?)?, state_at_3);
    // How many steps overlapped the save depends on the machine; the file is checked either way.
    eprintln!("steps started while the save was in flight: {stepped_during_save} of 5");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn a_failed_background_save_reports_through_wait() -> Result<()> {
    let dir = temp_dir("background-fail");
    let vm = seeded_varmap(3, &SPECS[..1])?;
    let pending = TrainingCheckpoint::new(&vm, 0)?
        .save_in_background(dir.join("no-such-folder").join("ckpt.safetensors"))?;
    let err = pending
        .wait()
        .expect_err("a save into a missing folder succeeded");
    assert!(err.to_string().contains("no-such-folder"), "{err}");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
