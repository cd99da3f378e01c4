//! Every bad input is an error naming the problem, and the accumulator is unchanged: its sums,
//! its count of micro-batches, and whether it may take the next `add`.

use candle_core::{backprop::GradStore, DType, Device, Result, Tensor, Var};
use candle_grad_clip::{GradAccumulator, TrainingCheckpoint};
use candle_nn::VarMap;
use rand::{rngs::StdRng, SeedableRng};

use crate::common::err_msg;
use crate::{assert_same_tensors, candle_loop, micro_batches, store_tensors, vars_of};

/// An accumulator with two micro-batches in it, and those micro-batches.
fn started(requested: Option<DType>) -> Result<(GradAccumulator, Vec<Var>, Vec<GradStore>)> {
    let mut rng = StdRng::seed_from_u64(11);
    let vars = vars_of(
        &[&[3, 4], &[5], &[2, 2]],
        &[DType::F32, DType::BF16, DType::F16],
    )?;
    let micro = micro_batches(&mut rng, &vars, 2, 0.0, None, false)?;
    let mut acc = GradAccumulator::new(&vars)?;
    if let Some(dt) = requested {
        acc = acc.accumulate_in(dt)?;
    }
    for m in &micro {
        acc.add(m)?;
    }
    Ok((acc, vars, micro))
}

/// The accumulator still holds exactly `micro`: its count and its sums.
fn assert_unchanged(
    acc: &mut GradAccumulator,
    vars: &[Var],
    micro: &[GradStore],
    requested: Option<DType>,
    what: &str,
) -> Result<()> {
    assert_eq!(acc.micro_batches(), micro.len() as u64, "{what}: count");
    let got = store_tensors(vars, acc.grads()?);
    assert_same_tensors(&got, &candle_loop(vars, micro, requested)?, what)
}

/// A store whose gradient for var `bad` is `g`, the others valid (so that a partial write would
/// show).
fn store_with(vars: &[Var], bad: usize, g: Tensor) -> Result<GradStore> {
    let mut store = GradStore::default();
    for (i, v) in vars.iter().enumerate() {
        if i == bad {
            store.insert(v, g.clone());
        } else {
            store.insert(v, Tensor::ones(v.shape(), v.dtype(), &Device::Cpu)?);
        }
    }
    Ok(store)
}

#[test]
fn mismatched_gradients_change_nothing() -> Result<()> {
    for requested in [None, Some(DType::F32)] {
        let bad: Vec<(usize, Tensor, &str)> = vec![
            (2, Tensor::zeros((2, 3), DType::F16, &Device::Cpu)?, "shape"),
            (2, Tensor::zeros(4, DType::F16, &Device::Cpu)?, "shape"),
            (0, Tensor::zeros((3, 4), DType::F64, &Device::Cpu)?, "dtype"),
            (1, Tensor::zeros(5, DType::F32, &Device::Cpu)?, "dtype"),
            (1, Tensor::zeros(5, DType::U32, &Device::Cpu)?, "dtype"),
        ];
        for (var, g, word) in bad {
            let (mut acc, vars, micro) = started(requested)?;
            let what = format!("{word} of var {var} ({requested:?})");
            let store = store_with(&vars, var, g)?;
            let msg = err_msg(acc.add(&store), &what);
            assert!(
                msg.contains(&format!("var #{var}")) && msg.contains("nothing was accumulated"),
                "{what}: {msg}"
            );
            let msg = err_msg(acc.add_scaled(&store, 0.5), &what);
            assert!(msg.contains(&format!("var #{var}")), "{what}: {msg}");
            assert_unchanged(&mut acc, &vars, &micro, requested, &what)?;
        }
    }
    Ok(())
}

/// `add` after `grads()` without `zero_` is refused (forgetting `zero_` would carry a step's
/// gradient into the next); after `zero_` it works.
#[test]
fn add_after_grads_needs_zero() -> Result<()> {
    let (mut acc, vars, micro) = started(None)?;
    let before = store_tensors(&vars, acc.grads()?);
    let msg = err_msg(acc.add(&micro[0]), "add after grads");
    assert!(msg.contains("zero_()"), "{msg}");
    let msg = err_msg(acc.add_scaled(&micro[0], 2.0), "add_scaled after grads");
    assert!(msg.contains("zero_()"), "{msg}");
    assert_eq!(acc.micro_batches(), 2);
    assert_same_tensors(
        &store_tensors(&vars, acc.grads()?),
        &before,
        "after the refusals",
    )?;
    acc.zero_()?;
    acc.add(&micro[1])?;
    assert_unchanged(&mut acc, &vars, &micro[1..], None, "after zero_")
}

#[test]
fn bad_settings_and_vars_are_refused() -> Result<()> {
    let ints = Var::zeros(3, DType::U32, &Device::Cpu)?;
    let w = Var::zeros(3, DType::F32, &Device::Cpu)?;
    let msg = err_msg(
        GradAccumulator::new(&[w.clone(), ints]).map(|_| ()),
        "u32 var",
    );
    assert!(msg.contains("var #1") && msg.contains("u32"), "{msg}");
    let varmap = VarMap::new();
    varmap
        .data()
        .lock()
        .unwrap()
        .insert("steps".into(), Var::zeros(1, DType::I64, &Device::Cpu)?);
    assert!(GradAccumulator::from_varmap(&varmap).is_err());
    let msg = err_msg(
        GradAccumulator::new(std::slice::from_ref(&w))?
            .accumulate_in(DType::U8)
            .map(|_| ()),
        "u8",
    );
    assert!(msg.contains("not a float dtype"), "{msg}");
    // The dtype is chosen before the first add.
    let (acc, ..) = started(None)?;
    let msg = err_msg(
        acc.accumulate_in(DType::F32).map(|_| ()),
        "late accumulate_in",
    );
    assert!(msg.contains("before the first add"), "{msg}");
    // A non-finite scale.
    let (mut acc, vars, micro) = started(None)?;
    for alpha in [f64::NAN, f64::INFINITY] {
        let msg = err_msg(acc.add_scaled(&micro[0], alpha), "alpha");
        assert!(msg.contains("alpha"), "{msg}");
    }
    assert_unchanged(&mut acc, &vars, &micro, None, "after a bad alpha")
}

/// A training checkpoint is refused in the middle of an accumulation (micro-batches added that no
/// `grads()` has read), and taken between optimizer steps.
#[test]
fn checkpoint_in_the_middle_of_an_accumulation_is_refused() -> Result<()> {
    let varmap = VarMap::new();
    let w = varmap.get(
        3,
        "w",
        candle_nn::Init::Const(1.0),
        DType::F32,
        &Device::Cpu,
    )?;
    let mut acc = GradAccumulator::from_varmap(&varmap)?;
    TrainingCheckpoint::new(&varmap, 0)?;
    let mut g = GradStore::default();
    g.insert(&w, Tensor::ones(3, DType::F32, &Device::Cpu)?);
    acc.add(&g)?;
    let msg = err_msg(
        TrainingCheckpoint::new(&varmap, 1).map(|_| ()),
        "mid-accumulation",
    );
    assert!(
        msg.contains("\"w\"") && msg.contains("gradaccumulator"),
        "{msg}"
    );
    acc.grads()?; // the step reads the sum: the checkpoint may be taken now
    TrainingCheckpoint::new(&varmap, 1)?;
    acc.zero_()?;
    TrainingCheckpoint::new(&varmap, 1)?;
    acc.add(&g)?;
    assert!(TrainingCheckpoint::new(&varmap, 1).is_err());
    drop(acc);
    TrainingCheckpoint::new(&varmap, 1)?;
    Ok(())
}
