//! Optimizer state belongs to a var by name, never by position alone: an optimizer built from
//! `varmap.all_vars()` in another process gets the vars in another order, and must still resume
//! bitwise (issue 21, scenario 1).

use candle_core::{DType, Result, Var};
use candle_grad_clip::{FusedAdamW, FusedSgd, ParamsSgd, TrainingCheckpoint};
use candle_nn::{Optimizer, ParamsAdamW, VarMap};

use crate::common::{seeded_varmap, state_bits};
use crate::{grads, params, temp_dir, var, var_bits};

/// `a` and `b` share shape and dtype: a state put on the wrong one of them goes unnoticed by any
/// shape check.
const SPECS: [(&str, &[usize], DType); 3] = [
    ("a", &[4, 3], DType::F32),
    ("b", &[4, 3], DType::F32),
    ("c", &[5], DType::F32),
];

fn in_order(varmap: &VarMap, names: &[&str]) -> Vec<Var> {
    names.iter().map(|n| var(varmap, n)).collect()
}

fn steps(varmap: &VarMap, opt: &mut FusedAdamW, from: u64, count: u64) -> Result<()> {
    for k in from..from + count {
        opt.step(&grads(varmap, k)?)?;
    }
    Ok(())
}

#[test]
fn a_checkpoint_resumes_an_optimizer_built_from_the_vars_in_another_order() -> Result<()> {
    let dir = temp_dir("by-name");
    let path = dir.join("ckpt.safetensors");
    // The uninterrupted run: 6 steps.
    let reference = seeded_varmap(1, &SPECS)?;
    let mut opt = FusedAdamW::new(in_order(&reference, &["a", "b", "c"]), params())?;
    steps(&reference, &mut opt, 0, 6)?;

    // The interrupted run: 3 steps, a checkpoint, then a "new process" whose optimizer lists
    // the vars in another order.
    let first = seeded_varmap(1, &SPECS)?;
    let mut opt = FusedAdamW::new(in_order(&first, &["a", "b", "c"]), params())?;
    steps(&first, &mut opt, 0, 3)?;
    TrainingCheckpoint::new(&first, 3)?
        .with_optimizer(&opt)?
        .save(&path)?;
    for order in [["b", "a", "c"], ["c", "b", "a"]] {
        let second = seeded_varmap(99, &SPECS)?;
        let mut opt = FusedAdamW::new(in_order(&second, &order), params())?;
        TrainingCheckpoint::load(&path)?
            .restore(&second)
            .optimizer(&mut opt)
            .apply()?;
        steps(&second, &mut opt, 3, 3)?;
        assert_eq!(var_bits(&second)?, var_bits(&reference)?, "order {order:?}");
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn an_optimizer_var_outside_the_varmap_is_named() -> Result<()> {
    let vm = seeded_varmap(1, &SPECS)?;
    let stranger = Var::zeros(7, DType::F32, &candle_core::Device::Cpu)?;
    let mut vars = in_order(&vm, &["a", "b", "c"]);
    vars.push(stranger);
    let opt = FusedAdamW::new(vars, params())?;
    let err = TrainingCheckpoint::new(&vm, 0)?
        .with_optimizer(&opt)
        .expect_err("a var outside the VarMap accepted")
        .to_string();
    assert!(
        err.contains("var #3 (shape [7]") && err.contains("not a var of the VarMap"),
        "{err}"
    );
    // On restore too, and nothing changes.
    let saved = FusedAdamW::new(in_order(&vm, &["a", "b", "c"]), params())?;
    let ck = TrainingCheckpoint::new(&vm, 0)?.with_optimizer(&saved)?;
    let mut vars = in_order(&vm, &["a", "b", "c"]);
    vars.push(Var::zeros(7, DType::F32, &candle_core::Device::Cpu)?);
    let mut opt = FusedAdamW::new(vars, params())?;
    let before = var_bits(&vm)?;
    let err = ck
        .restore(&vm)
        .optimizer(&mut opt)
        .apply()
        .expect_err("accepted");
    assert!(err.to_string().contains("not a var of the VarMap"), "{err}");
    assert_eq!(var_bits(&vm)?, before);
    Ok(())
}

#[test]
fn state_files_of_named_optimizers_follow_the_names() -> Result<()> {
    let dir = temp_dir("state-file-names");
    let path = dir.join("opt.safetensors");
    let named = |vm: &VarMap, order: &[&str]| -> Vec<(String, Var)> {
        order.iter().map(|n| (n.to_string(), var(vm, n))).collect()
    };
    let reference = seeded_varmap(1, &SPECS)?;
    let mut opt = FusedAdamW::new_named(named(&reference, &["a", "b", "c"]), params())?;
    steps(&reference, &mut opt, 0, 4)?;

    let first = seeded_varmap(1, &SPECS)?;
    let mut opt = FusedAdamW::new_named(named(&first, &["a", "b", "c"]), params())?;
    steps(&first, &mut opt, 0, 2)?;
    opt.save_state(&path)?;
    let second = seeded_varmap(1, &SPECS)?;
    // The vars' values as in the first run at step 2, the state from its file, another order.
    for name in ["a", "b", "c"] {
        var(&second, name).set(&var(&first, name))?;
    }
    let mut opt = FusedAdamW::new_named(named(&second, &["b", "c", "a"]), params())?;
    opt.load_state(&path)?;
    steps(&second, &mut opt, 2, 2)?;
    assert_eq!(var_bits(&second)?, var_bits(&reference)?);
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn a_positional_state_file_is_refused_when_two_vars_could_swap() -> Result<()> {
    let dir = temp_dir("state-file-positions");
    let path = dir.join("opt.safetensors");
    let vm = seeded_varmap(1, &SPECS)?;
    let opt = FusedAdamW::new(in_order(&vm, &["a", "b", "c"]), params())?;
    opt.save_state(&path)?;
    let mut other = FusedAdamW::new(in_order(&vm, &["b", "a", "c"]), params())?;
    other.step(&grads(&vm, 0)?)?;
    let before = state_bits(&other.state_dict()?)?;
    let err = other
        .load_state(&path)
        .expect_err("loaded by position")
        .to_string();
    assert!(
        err.contains("vars #0 and #1 have the same shape") && err.contains("new_named"),
        "{err}"
    );
    assert_eq!(state_bits(&other.state_dict()?)?, before);
    // An F32 and a BF16 var of one shape keep their state in the same dtype (F32): they could
    // swap as well.
    let mixed = seeded_varmap(
        1,
        &[("x", &[4, 3], DType::F32), ("y", &[4, 3], DType::BF16)],
    )?;
    FusedAdamW::new(in_order(&mixed, &["x", "y"]), params())?.save_state(&path)?;
    let err = FusedAdamW::new(in_order(&mixed, &["y", "x"]), params())?
        .load_state(&path)
        .expect_err("an F32 and a BF16 var loaded by position");
    assert!(
        err.to_string()
            .contains("same shape [4, 3] and state dtype F32"),
        "{err}"
    );
    // The same for FusedSgd; and vars that cannot be confused load by position as before.
    let sgd_path = dir.join("sgd.safetensors");
    FusedSgd::new(in_order(&vm, &["a", "b"]), sgd())?.save_state(&sgd_path)?;
    let err = FusedSgd::new(in_order(&vm, &["a", "b"]), sgd())?
        .load_state(&sgd_path)
        .expect_err("loaded by position");
    assert!(err.to_string().contains("from_varmap"), "{err}");
    FusedAdamW::new(in_order(&vm, &["a", "c"]), params())?.save_state(&path)?;
    FusedAdamW::new(in_order(&vm, &["a", "c"]), params())?.load_state(&path)?;
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn new_named_refuses_a_name_or_a_var_given_twice() -> Result<()> {
    let vm = seeded_varmap(1, &SPECS)?;
    let (a, b) = (var(&vm, "a"), var(&vm, "b"));
    let err = FusedAdamW::new_named(
        vec![("x".into(), a.clone()), ("x".into(), b)],
        ParamsAdamW::default(),
    )
    .expect_err("a name twice");
    assert!(err.to_string().contains("`x` is given twice"), "{err}");
    let err = FusedSgd::new_named(vec![("x".into(), a.clone()), ("y".into(), a)], sgd())
        .expect_err("a var twice");
    assert!(err.to_string().contains("under another name"), "{err}");
    Ok(())
}

fn sgd() -> ParamsSgd {
    ParamsSgd {
        lr: 0.1,
        momentum: 0.9,
        ..Default::default()
    }
}

#[test]
fn a_loaded_checkpoint_cannot_take_an_optimizer() -> Result<()> {
    let dir = temp_dir("loaded-with-optimizer");
    let path = dir.join("ckpt.safetensors");
    let vm = seeded_varmap(1, &SPECS)?;
    TrainingCheckpoint::new(&vm, 0)?.save(&path)?;
    let opt = FusedAdamW::from_varmap(&vm, params())?;
    let err = TrainingCheckpoint::load(&path)?
        .with_optimizer(&opt)
        .expect_err("a loaded checkpoint took an optimizer");
    assert!(err.to_string().contains("loaded from a file"), "{err}");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
