//! The accumulator with the rest of the crate: the PyTorch `GradScaler` pattern over scaled
//! micro-batch losses (unscale once, clip, step, update; `found_inf` decided on the sum), and a
//! fused optimizer with a folded clip stepping on `grads()`, bitwise candle's `AdamW` after
//! `clip_grad_norm_` on candle's summed store.

use candle_core::{backprop::GradStore, DType, Device, Result, Tensor, Var};
use candle_grad_clip::{clip_grad_norm_, ClipSetting, FusedAdamW, GradAccumulator, GradScaler};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use rand::{rngs::StdRng, SeedableRng};

use crate::common::{signed_values, tensor, vars_bits};

/// Two identical sets of vars.
fn twins(dtype: DType) -> Result<(Vec<Var>, Vec<Var>)> {
    let mut rng = StdRng::seed_from_u64(31);
    let shapes: [&[usize]; 3] = [&[8, 4], &[4], &[1, 4]];
    crate::common::twin_vars(&mut rng, &shapes, &[dtype])
}

/// A micro-batch loss of `vars` (a quadratic form with seeded inputs), optionally scaled.
fn loss(rng: &mut StdRng, vars: &[Var], poison: bool) -> Result<Tensor> {
    let x = tensor(&signed_values(rng, 8, 1.0), &[1, 8], vars[0].dtype())?;
    let h = x
        .matmul(vars[0].as_tensor())?
        .broadcast_add(vars[1].as_tensor())?;
    let mut y = h.mul(vars[2].as_tensor())?.sqr()?.sum_all()?;
    if poison {
        y = (y * f64::INFINITY)?;
    }
    Ok(y)
}

/// candle's loop: the summed store of `micro`.
fn summed(vars: &[Var], micro: &[GradStore]) -> Result<GradStore> {
    let mut out = GradStore::default();
    for (v, t) in vars.iter().zip(crate::candle_loop(vars, micro, None)?) {
        if let Some(t) = t {
            out.insert(v, t);
        }
    }
    Ok(out)
}

/// Scaled micro-batch losses accumulated, then `unscale_` once, the clip, `step` and `update`:
/// the same parameters and scale as candle's loop with the same scaler calls, step after step,
/// including a step whose sum holds an infinity (skipped by both).
#[test]
fn grad_scaler_pattern() -> Result<()> {
    let (ours, theirs) = twins(DType::F32)?;
    let mut opt_a = AdamW::new(ours.clone(), ParamsAdamW::default())?;
    let mut opt_b = AdamW::new(theirs.clone(), ParamsAdamW::default())?;
    let mut sa = GradScaler::new()
        .with_init_scale(1024.0)
        .with_growth_interval(2);
    let mut sb = GradScaler::new()
        .with_init_scale(1024.0)
        .with_growth_interval(2);
    let mut acc = GradAccumulator::new(&ours)?;
    let (mut ra, mut rb) = (StdRng::seed_from_u64(1), StdRng::seed_from_u64(1));
    for step in 0..5 {
        let mut micro_b = Vec::new();
        for m in 0..3 {
            let poison = step == 2 && m == 1;
            acc.add(&sa.scale(&loss(&mut ra, &ours, poison)?)?.backward()?)?;
            micro_b.push(sb.scale(&loss(&mut rb, &theirs, poison)?)?.backward()?);
        }
        let grads = acc.grads()?;
        sa.unscale_(&ours, grads)?;
        clip_grad_norm_(&ours, grads, 1.0)?;
        sa.step(&mut opt_a, grads)?;
        sa.update()?;
        acc.zero_()?;
        let mut gb = summed(&theirs, &micro_b)?;
        sb.unscale_(&theirs, &mut gb)?;
        clip_grad_norm_(&theirs, &mut gb, 1.0)?;
        sb.step(&mut opt_b, &gb)?;
        sb.update()?;
        assert_eq!(vars_bits(&ours)?, vars_bits(&theirs)?, "step {step}");
        assert_eq!(sa.scale_value()?, sb.scale_value()?, "step {step}");
    }
    // The poisoned step was skipped: the scale backed off once.
    assert!(sa.scale_value()? < 1024.0 * 4.0);
    Ok(())
}

/// `FusedAdamW` with a folded norm clip stepping on `grads()` is candle's `AdamW` on candle's
/// summed store after `clip_grad_norm_`, bitwise, in F32 and F64.
#[test]
fn fused_adamw_on_the_sum_is_candles_adamw_after_the_clip() -> Result<()> {
    for (dtype, requested) in [(DType::F32, None), (DType::F64, None)] {
        let (ours, theirs) = twins(dtype)?;
        let params = ParamsAdamW {
            lr: 0.01,
            ..Default::default()
        };
        let mut fused =
            FusedAdamW::new(ours.clone(), params.clone())?.with_clip(ClipSetting::norm(0.5))?;
        let mut candle = AdamW::new(theirs.clone(), params)?;
        let mut acc = GradAccumulator::new(&ours)?;
        if let Some(dt) = requested {
            acc = acc.accumulate_in(dt)?;
        }
        let (mut ra, mut rb) = (StdRng::seed_from_u64(2), StdRng::seed_from_u64(2));
        for step in 0..4 {
            let mut micro_b = Vec::new();
            for _ in 0..4 {
                acc.add(&loss(&mut ra, &ours, false)?.backward()?)?;
                micro_b.push(loss(&mut rb, &theirs, false)?.backward()?);
            }
            fused.step(acc.grads()?)?;
            acc.zero_()?;
            let mut gb = GradStore::default();
            for (v, t) in theirs
                .iter()
                .zip(crate::candle_loop(&theirs, &micro_b, requested)?)
            {
                if let Some(t) = t {
                    gb.insert(v, t);
                }
            }
            clip_grad_norm_(&theirs, &mut gb, 0.5)?;
            candle.step(&gb)?;
            assert_eq!(
                vars_bits(&ours)?,
                vars_bits(&theirs)?,
                "{dtype:?} step {step}"
            );
        }
    }
    Ok(())
}

/// `zero_` on a fresh accumulator, `grads()` before any add: nothing to do, no error.
#[test]
fn empty_accumulator() -> Result<()> {
    let w = Var::zeros(2, DType::F32, &Device::Cpu)?;
    let mut acc = GradAccumulator::new(std::slice::from_ref(&w))?;
    acc.zero_()?;
    assert!(acc.grads()?.get(&w).is_none());
    acc.zero_()?;
    acc.add(&GradStore::default())?; // a micro-batch without gradients for these vars
    assert_eq!(acc.micro_batches(), 1);
    assert!(acc.grads()?.get(&w).is_none());
    Ok(())
}

/// Data parallel with sharded vars: each rank accumulates its micro-batches locally, then one
/// `clip_grad_norm_across_` per optimizer step; the result is bitwise the one-process clip of all
/// the summed gradients (candle's loop), and the norm the same on every rank.
#[test]
fn across_ranks_once_per_step() -> Result<()> {
    use candle_grad_clip::{clip_grad_norm_across_, LocalGroup};
    let mut rng = StdRng::seed_from_u64(12);
    let ranks = 2;
    let mut shards = Vec::new();
    for r in 0..ranks {
        let shapes: [&[usize]; 2] = [&[17, 3], &[40 + r]];
        let vars = crate::vars_of(&shapes, &[DType::F32, DType::BF16])?;
        let micro = crate::micro_batches(&mut rng, &vars, 3, 0.1, None, false)?;
        shards.push((vars, micro));
    }
    // One process holding every rank's gradients.
    let all_vars: Vec<Var> = shards.iter().flat_map(|(v, _)| v.clone()).collect();
    let mut all = GradStore::default();
    for (vars, micro) in &shards {
        for (v, t) in vars.iter().zip(crate::candle_loop(vars, micro, None)?) {
            if let Some(t) = t {
                all.insert(v, t);
            }
        }
    }
    let want_norm = clip_grad_norm_(&all_vars, &mut all, 0.5)?.to_scalar::<f32>()?;
    let want = crate::store_tensors(&all_vars, &all);
    let results = std::thread::scope(|s| {
        let handles: Vec<_> = LocalGroup::new(ranks)?
            .into_iter()
            .zip(&shards)
            .map(|(group, (vars, micro))| {
                s.spawn(move || -> Result<(f32, Vec<Option<Tensor>>)> {
                    let mut acc = GradAccumulator::new(vars)?;
                    for m in micro {
                        acc.add(m)?;
                    }
                    let grads = acc.grads()?;
                    let norm = clip_grad_norm_across_(vars, grads, 0.5, &group)?;
                    Ok((norm.to_scalar::<f32>()?, crate::store_tensors(vars, grads)))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a rank"))
            .collect::<Result<Vec<_>>>()
    })?;
    let mut got = Vec::new();
    for (norm, tensors) in results {
        assert_eq!(
            norm.to_bits(),
            want_norm.to_bits(),
            "the norm on every rank"
        );
        got.extend(tensors);
    }
    crate::assert_same_tensors(&got, &want, "clipped across ranks")
}
