//! Side-by-side ratios on a noisy machine: the CPU cases of `clip_cpu` run interleaved, one call
//! of each per round, and the medians over the rounds compared, so that a change in the machine's
//! memory bandwidth during the run moves every case alike.
//!
//! ```text
//! cargo bench --bench cpu_ratios
//! ```

mod common;
mod cpu_common;

use std::hint::black_box;
use std::time::Instant;

use candle_core::Result;
use candle_grad_clip::{clip_grad_norm_, total_norm, NormType};
use cpu_common::{
    make_grads, median, naive_clip, read_pass, read_pass_parallel, read_write_pass,
    read_write_pass_parallel,
};

const ROUNDS: usize = 15;

fn main() -> Result<()> {
    // `cargo bench` passes `--bench`; a filter argument selects sets by name.
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with("--"));
    let sets = [
        ("set_A_101M_200", common::set_a_shapes()),
        ("set_C_1M_1000", vec![vec![1000]; 1000]),
    ];
    println!(
        "threads: {}, rounds: {ROUNDS}, medians in ms",
        rayon::current_num_threads()
    );
    for (name, shapes) in sets {
        if filter.as_deref().is_some_and(|f| !name.contains(f)) {
            continue;
        }
        let (vars, mut grads, n) = make_grads(&shapes)?;
        let mut target = total_norm(&vars, &grads, NormType::L2, false)?.to_scalar::<f32>()? as f64;
        let mut buffer = vec![0.01f32; n];
        let mut t: [Vec<f64>; 8] = Default::default();
        let mut time = |slot: usize, f: &mut dyn FnMut() -> Result<()>| -> Result<()> {
            let start = Instant::now();
            f()?;
            t[slot].push(start.elapsed().as_secs_f64() * 1e3);
            Ok(())
        };
        for _ in 0..ROUNDS {
            time(0, &mut || {
                clip_grad_norm_(&vars, &mut grads, 1e30).map(drop)
            })?;
            target *= 0.999;
            time(1, &mut || {
                clip_grad_norm_(&vars, &mut grads, target).map(drop)
            })?;
            time(2, &mut || naive_clip(&vars, &mut grads, 1e30).map(drop))?;
            target *= 0.999;
            time(3, &mut || naive_clip(&vars, &mut grads, target).map(drop))?;
            time(4, &mut || {
                black_box(read_pass(&buffer));
                Ok(())
            })?;
            time(5, &mut || {
                read_write_pass(black_box(&mut buffer), 0.999_999);
                Ok(())
            })?;
            time(6, &mut || {
                black_box(read_pass_parallel(&buffer));
                Ok(())
            })?;
            time(7, &mut || {
                read_write_pass_parallel(black_box(&mut buffer), 0.999_999);
                Ok(())
            })?;
        }
        let m: Vec<f64> = t.into_iter().map(median).collect();
        let (read, rw) = (m[4].min(m[6]), m[5].min(m[7]));
        println!("\n{name} ({n} f32 parameters)");
        println!("  crate  no-clip {:>9.3}   clip {:>9.3}", m[0], m[1]);
        println!("  naive  no-clip {:>9.3}   clip {:>9.3}", m[2], m[3]);
        println!(
            "  floor  read    {:>9.3} (1 thread) {:>9.3} (all threads)",
            m[4], m[6]
        );
        println!(
            "  floor  r/w     {:>9.3} (1 thread) {:>9.3} (all threads)",
            m[5], m[7]
        );
        println!(
            "  ratios: no-clip / best read = {:.2}, clip / (best read + best r/w) = {:.2}, naive clip / clip = {:.1}, naive no-clip / no-clip = {:.1}",
            m[0] / read,
            m[1] / (read + rw),
            m[3] / m[1],
            m[2] / m[0]
        );
    }
    Ok(())
}
