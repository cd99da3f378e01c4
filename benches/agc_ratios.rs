//! Adaptive gradient clipping on set A (CPU), interleaved with the floors of its traffic: one read
//! of every parameter and gradient (nothing clipped), plus one read-write pass over the gradients
//! (every unit clipped). Then `FusedAdamW` steps with AGC folded in, against the same optimizer
//! with global-norm clipping and without a clip. Medians over the rounds.
//!
//! ```text
//! cargo bench --bench agc_ratios            # both parts
//! cargo bench --bench agc_ratios -- clip    # the clip alone
//! ```

mod common;
mod cpu_common;

use std::hint::black_box;
use std::time::Instant;

use candle_core::{Result, Var};
use candle_grad_clip::{adaptive_clip_grad_, ClipSetting, FusedAdamW};
use candle_nn::{Optimizer, ParamsAdamW};
use cpu_common::{make_grads, median, read_pass_parallel, read_write_pass_parallel};

const ROUNDS: usize = 15;

fn main() -> Result<()> {
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with("--"));
    let shapes = common::set_a_shapes();
    let (zeros, grads, n) = make_grads(&shapes)?;
    // Parameters N(0, 0.01) like the gradients (the same draws are fine: only norms matter).
    let vars: Vec<Var> = zeros
        .iter()
        .map(|v| Var::from_tensor(&grads.get(v).expect("a gradient").copy()?))
        .collect::<Result<_>>()?;
    let mut grads = common::rekey(&grads, &zeros, &vars);
    let (mut p_buffer, mut g_buffer) = (vec![0.01f32; n], vec![0.02f32; n]);
    println!(
        "set A ({n} f32 parameters, {} tensors), threads: {}, rounds: {ROUNDS}, medians in ms",
        shapes.len(),
        rayon::current_num_threads()
    );
    // Every unit's ‖g‖ equals its ‖w‖: clipping 1e6 clips none; clipping below 1, every one (the
    // ratio shrinks each round, so that the units clipped last round clip again).
    let mut clipping = 0.5;
    let mut t: [Vec<f64>; 7] = Default::default();
    let mut time = |slot: usize, f: &mut dyn FnMut() -> Result<()>| -> Result<()> {
        let start = Instant::now();
        f()?;
        t[slot].push(start.elapsed().as_secs_f64() * 1e3);
        Ok(())
    };
    for _ in 0..ROUNDS {
        time(0, &mut || {
            adaptive_clip_grad_(&vars, &mut grads, 1e6, 1e-3).map(drop)
        })?;
        clipping *= 0.99;
        time(1, &mut || {
            adaptive_clip_grad_(&vars, &mut grads, clipping, 1e-3).map(drop)
        })?;
        time(2, &mut || {
            black_box(read_pass_parallel(&p_buffer) + read_pass_parallel(&g_buffer));
            Ok(())
        })?;
        time(3, &mut || {
            read_write_pass_parallel(black_box(&mut g_buffer), 0.999_999);
            black_box(&mut p_buffer);
            Ok(())
        })?;
    }
    if filter.as_deref() != Some("clip") {
        // Fused AdamW over the same vars: AGC folded in (some units clip), global-norm clipping,
        // no clip. The parameters drift; only the times matter.
        let params = ParamsAdamW {
            lr: 1e-6,
            ..Default::default()
        };
        let mut agc =
            FusedAdamW::new(vars.clone(), params.clone())?.with_clip(ClipSetting::agc(0.5))?;
        let mut norm =
            FusedAdamW::new(vars.clone(), params.clone())?.with_clip(ClipSetting::norm(1.0))?;
        let mut plain = FusedAdamW::new(vars.clone(), params)?;
        for _ in 0..5 {
            time(4, &mut || agc.step(&grads))?;
            time(5, &mut || norm.step(&grads))?;
            time(6, &mut || plain.step(&grads))?;
        }
    }
    let m: Vec<f64> = t
        .into_iter()
        .map(|v| if v.is_empty() { f64::NAN } else { median(v) })
        .collect();
    if !m[4].is_nan() {
        println!(
            "  fused AdamW  agc {:>9.3}   norm clip {:>9.3}   no clip {:>9.3}",
            m[4], m[5], m[6]
        );
        println!(
            "  ratios: agc / norm clip = {:.2}, agc / no clip = {:.2}",
            m[4] / m[5],
            m[4] / m[6]
        );
    }
    println!(
        "  agc    none clipped {:>9.3}   all clipped {:>9.3}",
        m[0], m[1]
    );
    println!(
        "  floor  read p + g   {:>9.3}   r/w g       {:>9.3}",
        m[2], m[3]
    );
    println!(
        "  ratios: none clipped / (read p + g) = {:.2}, all clipped / (read p + g + r/w g) = {:.2}",
        m[0] / m[2],
        m[1] / (m[2] + m[3])
    );
    Ok(())
}
