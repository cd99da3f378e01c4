//! `add`, `add_scaled`, `grads` and `zero_` against candle's own ops, bitwise: every float dtype,
//! many shapes (empty, one element, chunk boundaries, views), missing gradients, vars never given
//! one, NaN and infinity, half-precision gradients summed in F32 or F64.

use candle_core::{backprop::GradStore, DType, Device, Result, Tensor, Var};
use candle_grad_clip::{clip_grad_norm_, GradAccumulator};
use candle_nn::{Module, VarBuilder, VarMap};
use rand::{rngs::StdRng, SeedableRng};

use crate::common::{round_to_dtype, tensor, vals, DTYPES};
use crate::{assert_same_tensors, candle_loop, micro_batches, store_tensors, vars_of};

pub const SHAPES: [&[usize]; 9] = [
    &[7, 5],
    &[5],
    &[1],
    &[0],
    &[3, 0],
    &[3, 4, 2],
    &[4099],
    &[64, 33],
    &[2, 8193],
];

fn accumulate(
    vars: &[Var],
    micro: &[GradStore],
    requested: Option<DType>,
) -> Result<Vec<Option<Tensor>>> {
    let mut acc = GradAccumulator::new(vars)?;
    if let Some(dt) = requested {
        acc = acc.accumulate_in(dt)?;
    }
    for store in micro {
        acc.add(store)?;
    }
    assert_eq!(acc.micro_batches(), micro.len() as u64);
    Ok(store_tensors(vars, acc.grads()?))
}

/// `add` is candle's `acc = (acc + g)?` in the gradients' dtype, in call order, for every dtype:
/// with missing gradients, a var never given one, non-contiguous views.
#[test]
fn add_is_candles_loop_bitwise() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(23);
    for (case, dtype) in DTYPES.iter().enumerate() {
        let vars = vars_of(&SHAPES, &[*dtype])?;
        let micro = micro_batches(&mut rng, &vars, 6, 0.2, Some(case % SHAPES.len()), true)?;
        let got = accumulate(&vars, &micro, None)?;
        let want = candle_loop(&vars, &micro, None)?;
        assert!(
            got[case % SHAPES.len()].is_none(),
            "a var never given a gradient has none"
        );
        assert_same_tensors(&got, &want, &format!("{dtype:?}"))?;
    }
    // Mixed dtypes in one accumulator.
    let vars = vars_of(&SHAPES, &DTYPES)?;
    let micro = micro_batches(&mut rng, &vars, 5, 0.25, None, true)?;
    assert_same_tensors(
        &accumulate(&vars, &micro, None)?,
        &candle_loop(&vars, &micro, None)?,
        "mixed dtypes",
    )
}

/// With `accumulate_in(F32)`, F16/BF16 gradients are summed in F32 in call order and rounded
/// once to the var's dtype (candle: the F32 loop over `g.to_dtype(F32)`, then `to_dtype`), which
/// differs from the half-precision loop; F32 and F64 vars are unaffected. Also F64 sums.
#[test]
fn half_gradients_summed_in_f32_are_rounded_once() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(5);
    for requested in [DType::F32, DType::F64] {
        let vars = vars_of(&SHAPES, &DTYPES)?;
        let micro = micro_batches(&mut rng, &vars, 8, 0.1, Some(2), true)?;
        let got = accumulate(&vars, &micro, Some(requested))?;
        let want = candle_loop(&vars, &micro, Some(requested))?;
        assert_same_tensors(&got, &want, &format!("in {requested:?}"))?;
        // The wide sum is not the narrow loop for half precision.
        let narrow = candle_loop(&vars, &micro, None)?;
        let differs = vars.iter().enumerate().any(|(i, v)| {
            matches!(v.dtype(), DType::BF16 | DType::F16)
                && match (&got[i], &narrow[i]) {
                    (Some(a), Some(b)) => vals(a).ok() != vals(b).ok(),
                    _ => false,
                }
        });
        assert!(
            differs,
            "{requested:?}: summing in a wider dtype changed nothing"
        );
    }
    Ok(())
}

/// `add_scaled` with a scale exact in every dtype is candle's `(acc + (g * alpha)?)?`; with one
/// that is not (1/3), the f64 transcription: the product rounded once, then the sum.
#[test]
fn add_scaled_rounds_the_product_then_the_sum() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(9);
    let vars = vars_of(&SHAPES, &DTYPES)?;
    let micro = micro_batches(&mut rng, &vars, 4, 0.2, None, true)?;
    for alpha in [0.25, -3.0, 1.0 / 3.0] {
        for requested in [None, Some(DType::F32)] {
            let mut acc = GradAccumulator::new(&vars)?;
            if let Some(dt) = requested {
                acc = acc.accumulate_in(dt)?;
            }
            for store in &micro {
                acc.add_scaled(store, alpha)?;
            }
            let got = store_tensors(&vars, acc.grads()?);
            let what = format!("alpha {alpha} in {requested:?}");
            // The transcription, element by element in f64.
            for (i, v) in vars.iter().enumerate() {
                let dt = crate::sum_dtype(v.dtype(), requested);
                let mut sum = vec![0f64; v.elem_count()];
                let mut seen = false;
                for store in &micro {
                    if let Some(g) = store.get(v) {
                        seen = true;
                        for (s, g) in sum.iter_mut().zip(vals(g)?) {
                            let product = round_to_dtype(dt, g * alpha);
                            *s = round_to_dtype(dt, *s + product);
                        }
                    }
                }
                let want: Option<Vec<f64>> =
                    seen.then(|| sum.iter().map(|&s| round_to_dtype(v.dtype(), s)).collect());
                let got: Option<Vec<f64>> = got[i].as_ref().map(vals).transpose()?;
                assert_eq!(got, want, "{what}: var {i} {:?}", v.dtype());
            }
            // candle's ops where alpha is exact in the dtype.
            if alpha != 1.0 / 3.0 {
                let scaled: Vec<GradStore> = micro
                    .iter()
                    .map(|store| {
                        let mut s = GradStore::default();
                        for v in &vars {
                            if let Some(g) = store.get(v) {
                                let dt = crate::sum_dtype(v.dtype(), requested);
                                let a = Tensor::new(alpha, &Device::Cpu)?.to_dtype(dt)?;
                                let p = g.to_dtype(dt)?.broadcast_mul(&a)?.to_dtype(dt)?;
                                // Held in the sum dtype: the loop below converts nothing.
                                s.insert(v, p);
                            }
                        }
                        Ok(s)
                    })
                    .collect::<Result<_>>()?;
                // Held in the sum dtype, the reference loop's conversion is the identity.
                let want = candle_loop(&vars, &scaled, requested)?;
                assert_same_tensors(&got, &want, &format!("{what} (candle)"))?;
            }
        }
    }
    Ok(())
}

/// NaN and infinities are summed like any value (inf + -inf = NaN), in every dtype.
#[test]
fn nonfinite_values_are_summed() -> Result<()> {
    for dtype in DTYPES {
        for requested in [None, Some(DType::F32)] {
            let w = Var::zeros(4, dtype, &Device::Cpu)?;
            let specials = [
                [f64::NAN, 1.0, f64::INFINITY, f64::INFINITY],
                [2.0, f64::NEG_INFINITY, -1.0, f64::NEG_INFINITY],
            ];
            let micro: Vec<GradStore> = specials
                .iter()
                .map(|v| {
                    let mut s = GradStore::default();
                    s.insert(&w, tensor(v, &[4], dtype)?);
                    Ok(s)
                })
                .collect::<Result<_>>()?;
            let got = accumulate(std::slice::from_ref(&w), &micro, requested)?;
            let want = candle_loop(std::slice::from_ref(&w), &micro, requested)?;
            assert_same_tensors(&got, &want, &format!("{dtype:?} {requested:?}"))?;
            let v = vals(got[0].as_ref().expect("a sum"))?;
            assert!(
                v[0].is_nan()
                    && v[1] == f64::NEG_INFINITY
                    && v[2] == f64::INFINITY
                    && v[3].is_nan()
            );
        }
    }
    Ok(())
}

/// With the gradients' own dtype, `grads()` hands out the buffers themselves: an in-place clip of
/// the store clips the sums (a second `grads()` returns it clipped), and the next step reuses the
/// same buffers (no new allocation): a tensor taken in step 1 reads the sums of step 2.
#[test]
fn grads_are_the_buffers_and_zero_reuses_them() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(3);
    let vars = vars_of(&[&[6, 7], &[300]], &[DType::F32, DType::BF16])?;
    let mut acc = GradAccumulator::new(&vars)?;
    let mut held: Option<Vec<Option<Tensor>>> = None;
    for step in 0..3 {
        let micro = micro_batches(&mut rng, &vars, 3, 0.0, None, false)?;
        for store in &micro {
            acc.add(store)?;
        }
        let grads = acc.grads()?;
        let now = store_tensors(&vars, grads);
        assert_same_tensors(
            &now,
            &candle_loop(&vars, &micro, None)?,
            &format!("step {step}"),
        )?;
        if let Some(held) = &held {
            // The tensors taken in step 0 are this step's buffers.
            assert_same_tensors(held, &now, "held from step 0")?;
        } else {
            held = Some(now.clone());
        }
        clip_grad_norm_(&vars, grads, 1e-3)?;
        let clipped = store_tensors(&vars, grads);
        assert_same_tensors(
            &store_tensors(&vars, acc.grads()?),
            &clipped,
            "grads() again",
        )?;
        acc.zero_()?;
        assert_eq!(acc.micro_batches(), 0);
        for t in held.as_ref().expect("held").iter().flatten() {
            assert!(
                vals(t)?.iter().all(|&x| x == 0.0 && x.is_sign_positive()),
                "zero_ clears"
            );
        }
        assert!(store_tensors(&vars, acc.grads()?)
            .iter()
            .all(Option::is_none));
        acc.zero_()?;
    }
    Ok(())
}

/// With sums in F32, `grads()` rounds once per step into var-dtype buffers reused across steps;
/// a second `grads()` returns the store as left (an in-place clip is kept).
#[test]
fn rounded_copies_are_reused_and_kept() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(4);
    let vars = vars_of(&[&[33, 3], &[4097]], &[DType::BF16, DType::F16])?;
    let mut acc = GradAccumulator::new(&vars)?.accumulate_in(DType::F32)?;
    let mut held: Option<Vec<Option<Tensor>>> = None;
    for step in 0..2 {
        let micro = micro_batches(&mut rng, &vars, 4, 0.0, None, true)?;
        for store in &micro {
            acc.add(store)?;
        }
        let now = store_tensors(&vars, acc.grads()?);
        let want = candle_loop(&vars, &micro, Some(DType::F32))?;
        assert_same_tensors(&now, &want, &format!("step {step}"))?;
        match &held {
            Some(h) => assert_same_tensors(h, &now, "held from step 0")?,
            None => held = Some(now),
        }
        clip_grad_norm_(&vars, acc.grads()?, 1e-2)?;
        let clipped = store_tensors(&vars, acc.grads()?);
        assert_same_tensors(&store_tensors(&vars, acc.grads()?), &clipped, "kept")?;
        acc.zero_()?;
    }
    Ok(())
}

/// A store taken from `grads()` and added back after `zero_` (its tensors are the buffers
/// themselves) is read through a copy: the sum of a buffer with itself, no deadlock.
#[test]
fn adding_the_accumulators_own_store_back() -> Result<()> {
    let w = Var::zeros(3, DType::F32, &Device::Cpu)?;
    let mut acc = GradAccumulator::new(std::slice::from_ref(&w))?;
    let mut g = GradStore::default();
    g.insert(&w, Tensor::new(&[1f32, 2., 3.], &Device::Cpu)?);
    acc.add(&g)?;
    acc.add(&g)?;
    let own = acc.grads()?.get(&w).cloned().expect("a sum");
    let mut again = GradStore::default();
    again.insert(&w, own);
    acc.zero_()?;
    acc.add(&g)?;
    acc.add(&again)?; // the buffer (now [1, 2, 3]) added to itself
    assert_eq!(
        acc.grads()?.get(&w).expect("a sum").to_vec1::<f32>()?,
        [2., 4., 6.]
    );
    Ok(())
}

/// A real model: micro-batch losses through `backward()`, accumulated, equal candle's loop over
/// the same `GradStore`s; `from_varmap` takes every var once.
#[test]
fn backward_micro_batches_of_a_model() -> Result<()> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let l1 = candle_nn::linear(8, 16, vb.pp("l1"))?;
    let l2 = candle_nn::linear(16, 1, vb.pp("l2"))?;
    let mut acc = GradAccumulator::from_varmap(&varmap)?;
    assert_eq!(acc.vars().len(), 4);
    let mut rng = StdRng::seed_from_u64(8);
    let mut stores = Vec::new();
    for _ in 0..4 {
        let x = tensor(
            &crate::common::signed_values(&mut rng, 32, 1.0),
            &[4, 8],
            DType::F32,
        )?;
        let loss = l2.forward(&l1.forward(&x)?.tanh()?)?.sqr()?.mean_all()?;
        let grads = loss.backward()?;
        acc.add(&grads)?;
        stores.push(grads);
    }
    let vars = acc.vars().to_vec();
    let got = store_tensors(&vars, acc.grads()?);
    assert_same_tensors(&got, &candle_loop(&vars, &stores, None)?, "model")
}
