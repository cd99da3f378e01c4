//! Side-by-side gradient accumulation times on a noisy machine: every case once per round,
//! medians over the rounds. `GradAccumulator::add` against the floor of the same memory traffic
//! (a plain rayon loop `acc += g` over flat buffers of the same length: read both, write the sum,
//! 12 bytes a parameter) and against candle's `(acc + g)?` per var; `zero_` against a 4-byte
//! write per parameter; BF16 gradients summed in F32 buffers against the F32 path. The floors are
//! compiled for the baseline x86-64 target (SSE2); the crate's loops also have an AVX2 version
//! chosen at run time.
//!
//! ```text
//! cargo bench --bench accum_ratios            # set A (101M f32 in 200 tensors) and 10,000 x 1,000
//! cargo bench --bench accum_ratios -- set_A   # one set
//! ```

mod common;
mod cpu_common;

use std::hint::black_box;
use std::time::Instant;

use candle_core::{backprop::GradStore, DType, Result, Tensor, Var};
use candle_grad_clip::GradAccumulator;
use cpu_common::{make_grads, median};
use rayon::prelude::*;

/// The floor of `add`: `acc += g` over flat buffers, in blocks of 32K over rayon's threads.
fn add_floor(acc: &mut [f32], g: &[f32]) {
    acc.par_chunks_mut(1 << 15)
        .zip(g.par_chunks(1 << 15))
        .for_each(|(a, g)| a.iter_mut().zip(g).for_each(|(a, &g)| *a += g));
}

/// The floor of `zero_`: a write of zeros.
fn zero_floor(acc: &mut [f32]) {
    acc.par_chunks_mut(1 << 15).for_each(|a| a.fill(0.0));
}

/// What a candle user writes today: a new tensor per var, `(acc + g)?`.
fn candle_add(vars: &[Var], acc: &mut GradStore, grads: &GradStore) -> Result<()> {
    for v in vars {
        if let Some(g) = grads.get(v) {
            let sum = (acc.get(v).expect("started") + g)?;
            acc.insert(v, sum);
        }
    }
    Ok(())
}

/// The gradients in BF16.
fn to_bf16(vars: &[Var], grads: &GradStore) -> Result<(Vec<Var>, GradStore)> {
    let mut out = GradStore::default();
    let mut bf = Vec::with_capacity(vars.len());
    for v in vars {
        let w = Var::zeros(v.shape(), DType::BF16, v.device())?;
        out.insert(&w, grads.get(v).expect("a gradient").to_dtype(DType::BF16)?);
        bf.push(w);
    }
    Ok((bf, out))
}

fn main() -> Result<()> {
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with("--"));
    let sets = [
        ("set_A_101M_200", common::set_a_shapes(), 7, true),
        ("small_10000x1000", vec![vec![1000]; 10_000], 15, false),
    ];
    println!("threads: {}, medians in ms", rayon::current_num_threads());
    for (name, shapes, rounds, with_bf16) in sets {
        if filter.as_deref().is_some_and(|f| !name.contains(f)) {
            continue;
        }
        let (vars, grads, n) = make_grads(&shapes)?;
        let mut acc = GradAccumulator::new(&vars)?;
        acc.add(&grads)?; // allocates the buffers
        let mut candle = GradStore::default();
        for v in &vars {
            candle.insert(v, Tensor::zeros(v.shape(), DType::F32, v.device())?);
        }
        let mut bf16 = if with_bf16 {
            let (bvars, bgrads) = to_bf16(&vars, &grads)?;
            let mut wide = GradAccumulator::new(&bvars)?.accumulate_in(DType::F32)?;
            wide.add(&bgrads)?;
            Some((wide, bgrads))
        } else {
            None
        };
        let (mut flat, g) = (vec![0f32; n], vec![0.01f32; n]);
        let mut t: [Vec<f64>; 6] = Default::default();
        let mut time = |slot: usize, f: &mut dyn FnMut() -> Result<()>| -> Result<()> {
            let start = Instant::now();
            f()?;
            t[slot].push(start.elapsed().as_secs_f64() * 1e3);
            Ok(())
        };
        for _ in 0..rounds {
            time(0, &mut || acc.add(&grads))?;
            time(1, &mut || {
                add_floor(black_box(&mut flat), &g);
                Ok(())
            })?;
            time(2, &mut || candle_add(&vars, &mut candle, &grads))?;
            time(3, &mut || acc.zero_())?;
            time(4, &mut || {
                zero_floor(black_box(&mut flat));
                Ok(())
            })?;
            if let Some((wide, bgrads)) = &mut bf16 {
                time(5, &mut || wide.add(bgrads))?;
            }
        }
        let m: Vec<f64> = t
            .into_iter()
            .map(|v| if v.is_empty() { f64::NAN } else { median(v) })
            .collect();
        println!(
            "\n{name} ({n} f32 parameters in {} tensors, {rounds} rounds)",
            vars.len()
        );
        println!(
            "  add {:>9.3}  floor (12 B/param) {:>9.3}  candle (acc + g)? {:>9.3}   zero_ {:>9.3}  floor (4 B/param) {:>9.3}",
            m[0], m[1], m[2], m[3], m[4]
        );
        println!(
            "  ratios: add / floor = {:.2}, candle / add = {:.1}, zero_ / floor = {:.2}; fixed cost per var above the floor: {:.2} us",
            m[0] / m[1],
            m[2] / m[0],
            m[3] / m[4],
            (m[0] - m[1]) * 1e3 / vars.len() as f64
        );
        if with_bf16 {
            println!(
                "  BF16 gradients into F32 buffers {:>9.3}: / F32 add = {:.2} (reads 2 B instead of 4 B a parameter: floor 10/12 = 0.83)",
                m[5],
                m[5] / m[0]
            );
        }
    }
    Ok(())
}
