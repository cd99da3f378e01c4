//! Side-by-side optimizer step times on a noisy machine: every case once per round, medians over
//! the rounds. `FusedAdamW` / `FusedSgd` against candle's `AdamW` / `SGD` and against the floor: a
//! plain rayon loop doing the same arithmetic over flat buffers of the same length (read p, g, m, v;
//! write p, m, v for AdamW: 28 bytes a parameter). The floors are compiled for the baseline
//! x86-64 target (SSE2); the crate's loops also have an AVX2 version chosen at run time.
//!
//! ```text
//! cargo bench --bench optim_ratios            # set A (101M f32 in 200 tensors) and set C (1000 x 1000)
//! cargo bench --bench optim_ratios -- set_C   # one set
//! ```

mod common;
mod cpu_common;

use std::hint::black_box;
use std::time::Instant;

use candle_core::{Result, Var};
use candle_grad_clip::{ClipSetting, FusedAdamW, FusedSgd, ParamsSgd, ZClip};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, SGD};
use common::rekey;
use cpu_common::{make_grads, median, read_pass_parallel};
use rayon::prelude::*;

/// The floor of an AdamW step: the same arithmetic over flat buffers, in blocks of 32K over
/// rayon's threads.
fn adamw_floor(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
    let (b1, b2, lr, eps, decay, sm, sv) = (
        0.9f32, 0.999f32, 1e-3f32, 1e-8f32, 0.99999f32, 10f32, 1000f32,
    );
    p.par_chunks_mut(1 << 15)
        .zip(g.par_chunks(1 << 15))
        .zip(m.par_chunks_mut(1 << 15))
        .zip(v.par_chunks_mut(1 << 15))
        .for_each(|(((p, g), m), v)| {
            for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
                *m = *m * b1 + g * (1.0 - b1);
                *v = *v * b2 + g * g * (1.0 - b2);
                *p = *p * decay - lr * (*m * sm) / ((*v * sv).sqrt() + eps);
            }
        });
}

/// The floor of a plain SGD step: read p, g; write p.
fn plain_sgd_floor(p: &mut [f32], g: &[f32]) {
    p.par_chunks_mut(1 << 15)
        .zip(g.par_chunks(1 << 15))
        .for_each(|(p, g)| {
            for (p, &g) in p.iter_mut().zip(g) {
                *p -= 0.01 * g;
            }
        });
}

/// The floor of an SGD step with momentum: read p, g, b; write p, b.
fn sgd_floor(p: &mut [f32], g: &[f32], b: &mut [f32]) {
    p.par_chunks_mut(1 << 15)
        .zip(g.par_chunks(1 << 15))
        .zip(b.par_chunks_mut(1 << 15))
        .for_each(|((p, g), b)| {
            for ((p, &g), b) in p.iter_mut().zip(g).zip(b.iter_mut()) {
                *b = *b * 0.9 + g;
                *p -= 0.01 * *b;
            }
        });
}

fn main() -> Result<()> {
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with("--"));
    let sets = [
        ("set_A_101M_200", common::set_a_shapes(), 5),
        ("set_C_1M_1000", vec![vec![1000]; 1000], 15),
    ];
    println!("threads: {}, medians in ms", rayon::current_num_threads());
    for (name, shapes, rounds) in sets {
        if filter.as_deref().is_some_and(|f| !name.contains(f)) {
            continue;
        }
        let (vars, grads, n) = make_grads(&shapes)?;
        // Separate parameters for each optimizer (their values do not matter for the time).
        let copy = |vars: &[Var]| -> Result<Vec<Var>> {
            vars.iter()
                .map(|v| Var::from_tensor(v.as_tensor()))
                .collect()
        };
        let params = ParamsAdamW::default();
        let mut fused = FusedAdamW::new(vars.clone(), params.clone())?;
        let clipped_vars = copy(&vars)?;
        let mut fused_clip = FusedAdamW::new(clipped_vars.clone(), params.clone())?
            .with_clip(ClipSetting::norm(1.0))?;
        // ZClip capped by max_grad_norm = 1: it scales every step as the norm clip does (the
        // gradients are the same each step, so no z-score spike), so the difference is ZClip's
        // own work: its statistics, on the host here (the kernel on a GPU).
        let zclip_vars = copy(&vars)?;
        let mut fused_zclip = FusedAdamW::new(zclip_vars.clone(), params.clone())?
            .with_clip(ClipSetting::ZClip(ZClip::new().with_max_grad_norm(1.0)))?;
        let candle_vars = copy(&vars)?;
        let mut candle = AdamW::new(candle_vars.clone(), params)?;
        let sgd_vars = copy(&vars)?;
        let mut fused_sgd = FusedSgd::new(
            sgd_vars.clone(),
            ParamsSgd {
                lr: 0.01,
                momentum: 0.9,
                ..Default::default()
            },
        )?;
        let candle_sgd_vars = copy(&vars)?;
        let mut candle_sgd = SGD::new(candle_sgd_vars.clone(), 0.01)?;
        let plain_sgd_vars = copy(&vars)?;
        let mut plain_sgd = FusedSgd::new(plain_sgd_vars.clone(), ParamsSgd::default())?;
        // The gradients keyed by each optimizer's vars (`fused` has `vars` themselves).
        let g_fused = &grads;
        let (g_clip, g_zclip, g_candle, g_sgd, g_candle_sgd, g_plain) = (
            rekey(&grads, &vars, &clipped_vars),
            rekey(&grads, &vars, &zclip_vars),
            rekey(&grads, &vars, &candle_vars),
            rekey(&grads, &vars, &sgd_vars),
            rekey(&grads, &vars, &candle_sgd_vars),
            rekey(&grads, &vars, &plain_sgd_vars),
        );
        let (mut p, g, mut m, mut v) = (
            vec![0.5f32; n],
            vec![0.01f32; n],
            vec![0f32; n],
            vec![0f32; n],
        );
        let mut t: [Vec<f64>; 11] = Default::default();
        let mut time = |slot: usize, f: &mut dyn FnMut() -> Result<()>| -> Result<()> {
            let start = Instant::now();
            f()?;
            t[slot].push(start.elapsed().as_secs_f64() * 1e3);
            Ok(())
        };
        for _ in 0..rounds {
            time(0, &mut || fused.step(g_fused))?;
            time(1, &mut || fused_clip.step(&g_clip))?;
            // Right after the clipped step it is compared with (timed at the end of the round it
            // read 1.3x, an artefact of the order on this VM).
            time(10, &mut || fused_zclip.step(&g_zclip))?;
            time(2, &mut || candle.step(&g_candle))?;
            time(3, &mut || {
                adamw_floor(black_box(&mut p), &g, &mut m, &mut v);
                Ok(())
            })?;
            time(4, &mut || {
                black_box(read_pass_parallel(&g));
                Ok(())
            })?;
            time(5, &mut || fused_sgd.step(&g_sgd))?;
            time(6, &mut || candle_sgd.step(&g_candle_sgd))?;
            time(7, &mut || {
                sgd_floor(black_box(&mut p), &g, &mut m);
                Ok(())
            })?;
            time(8, &mut || plain_sgd.step(&g_plain))?;
            time(9, &mut || {
                plain_sgd_floor(black_box(&mut p), &g);
                Ok(())
            })?;
        }
        let m: Vec<f64> = t.into_iter().map(median).collect();
        println!("\n{name} ({n} f32 parameters, {rounds} rounds)");
        println!(
            "  AdamW  fused {:>9.3}  fused+clip {:>9.3}  candle {:>9.3}  floor {:>9.3}  read floor {:>9.3}",
            m[0], m[1], m[2], m[3], m[4]
        );
        println!(
            "  ratios: fused / floor = {:.2}, fused+clip / (read + floor) = {:.2}, candle / fused = {:.1}",
            m[0] / m[3],
            m[1] / (m[4] + m[3]),
            m[2] / m[0]
        );
        println!(
            "  ZClip  fused+zclip {:>9.3}: fused+zclip / fused+clip = {:.3}",
            m[10],
            m[10] / m[1]
        );
        println!(
            "  SGD    fused momentum 0.9 {:>9.3}  floor {:>9.3}   fused plain {:>9.3}  candle (plain) {:>9.3}  floor {:>9.3}",
            m[5], m[7], m[8], m[6], m[9]
        );
        println!(
            "  ratios: momentum / its floor = {:.2}, plain / its floor = {:.2}, candle / fused plain = {:.1}, candle / fused momentum = {:.1}",
            m[5] / m[7],
            m[8] / m[9],
            m[6] / m[8],
            m[6] / m[5]
        );
    }
    Ok(())
}
