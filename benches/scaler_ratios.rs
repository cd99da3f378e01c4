//! GradScaler's one-read path on the CPU, interleaved (every case once per round, medians over
//! the rounds, so that a change in the machine's memory bandwidth moves every case alike):
//!
//! 1. the reduction alone: unscale + finite check + L2 norm in one read-only pass
//!    (`__unscaled_norm_cpu`, the fused step's reduction with the prescale) against the plain norm
//!    pass (`total_norm`) and the read floor (a plain rayon sum over a flat buffer);
//! 2. the whole step: `scaler.step` on a clipped `FusedSgd` with the one-read path, against
//!    `unscale_` then `step` (an unscale pass first), and against the clipped step alone on
//!    gradients that need no unscaling.
//!
//! ```text
//! cargo bench --bench scaler_ratios            # set A (101M f32 in 200 tensors) and set C (1000 x 1000)
//! cargo bench --bench scaler_ratios -- set_A   # one set
//! ```

mod common;
mod cpu_common;

use std::hint::black_box;
use std::time::Instant;

use candle_core::{Result, Var};
use candle_grad_clip::{
    __unscaled_norm_cpu, total_norm, ClipSetting, FusedSgd, GradScaler, NormType, ParamsSgd,
};
use candle_nn::Optimizer;
use common::rekey;
use cpu_common::{make_grads, median, read_pass_parallel};

fn main() -> Result<()> {
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with("--"));
    let sets = [
        ("set_A_101M_200", common::set_a_shapes(), 15),
        ("set_C_1M_1000", vec![vec![1000]; 1000], 25),
    ];
    println!("threads: {}, medians in ms", rayon::current_num_threads());
    for (name, shapes, rounds) in sets {
        if filter.as_deref().is_some_and(|f| !name.contains(f)) {
            continue;
        }
        let (vars, grads, n) = make_grads(&shapes)?;
        let flat = vec![0.01f32; n];
        // Plain SGD (no state) with a norm clip that clips: the step is one reduction and one
        // update pass. Scale 1 keeps the gradients' values from drifting round after round (the
        // unscale does the same arithmetic whatever the scale).
        let copy = |vars: &[Var]| -> Result<Vec<Var>> {
            vars.iter()
                .map(|v| Var::from_tensor(&v.as_tensor().copy()?))
                .collect()
        };
        let sgd = |vars: &[Var]| -> Result<FusedSgd> {
            FusedSgd::new(vars.to_vec(), ParamsSgd::default())?.with_clip(ClipSetting::norm(1e-3))
        };
        let (one_vars, two_vars) = (copy(&vars)?, copy(&vars)?);
        let mut plain = sgd(&vars)?;
        let mut one_read = sgd(&one_vars)?;
        let mut two_pass = sgd(&two_vars)?;
        let g_one = rekey(&grads, &vars, &one_vars);
        let mut g_two = rekey(&grads, &vars, &two_vars);
        let new_scaler = || {
            GradScaler::new()
                .with_init_scale(1.0)
                .with_growth_interval(1 << 30)
        };
        let (mut scaler_one, mut scaler_two) = (new_scaler(), new_scaler());
        let inv_scale = 1.0 / 65536.0;

        let mut t: [Vec<f64>; 6] = Default::default();
        let mut time = |slot: usize, f: &mut dyn FnMut() -> Result<()>| -> Result<()> {
            let start = Instant::now();
            f()?;
            t[slot].push(start.elapsed().as_secs_f64() * 1e3);
            Ok(())
        };
        for round in 0..rounds {
            // The two reductions compared, in alternating order (no bias from which runs first).
            for slot in [round % 2, 1 - round % 2] {
                time(slot, &mut || {
                    if slot == 0 {
                        black_box(total_norm(&vars, &grads, NormType::L2, false)?);
                    } else {
                        black_box(__unscaled_norm_cpu(&vars, &grads, inv_scale, NormType::L2)?);
                    }
                    Ok(())
                })?;
            }
            time(2, &mut || {
                black_box(read_pass_parallel(&flat));
                Ok(())
            })?;
            time(3, &mut || plain.step(&grads))?;
            time(4, &mut || {
                scaler_one.step(&mut one_read, &g_one)?;
                scaler_one.update()
            })?;
            time(5, &mut || {
                scaler_two.unscale_(&two_vars, &mut g_two)?;
                scaler_two.step(&mut two_pass, &g_two)?;
                scaler_two.update()
            })?;
        }
        let m: Vec<f64> = t.into_iter().map(median).collect();
        println!("\n{name} ({n} f32 parameters, {rounds} rounds)");
        println!(
            "  reduction: plain norm {:>9.3}  unscale+finite+norm {:>9.3}  read floor {:>9.3}",
            m[0], m[1], m[2]
        );
        println!(
            "  ratio: one pass / plain norm = {:.3} (target <= 1.1), plain norm / read floor = {:.2}",
            m[1] / m[0],
            m[0] / m[2]
        );
        println!(
            "  clipped FusedSgd step: alone {:>9.3}  scaler one-read {:>9.3}  unscale_ then step {:>9.3}",
            m[3], m[4], m[5]
        );
        println!(
            "  ratios: one-read / alone = {:.2}, unscale_ then step / one-read = {:.2}",
            m[4] / m[3],
            m[5] / m[4]
        );
    }
    Ok(())
}
