//! The cost of the norm across ranks, interleaved with the one-process norm on the same
//! gradients (medians over rounds, so a change in the machine's speed moves every case alike):
//!
//! - `total_norm`: one process, every gradient;
//! - `across_1`: `total_norm_across` with a `LocalGroup` of one rank (the collective's overhead);
//! - `across_2` / `across_4`: the same gradients split over 2 or 4 thread ranks (whole tensors,
//!   round robin), the wall time of the slowest rank (each rank also uses the rayon pool);
//! - `fused step`: a `FusedAdamW` step clipped by the global L2 norm (`ClipSetting::norm`), one
//!   process (`step`) against 4 thread ranks (`step_across`, each rank stepping its round-robin
//!   share of the vars), the slowest rank.
//!
//! ```text
//! cargo bench --bench dist_ratios
//! ```

use std::hint::black_box;
use std::time::Instant;

use candle_core::{backprop::GradStore, DType, Device, Result, Tensor, Var};
use candle_grad_clip::{
    total_norm, total_norm_across, ClipSetting, FusedAdamW, LocalGroup, NormType, ProcessGroup,
};
use candle_nn::{Optimizer, ParamsAdamW};

const ROUNDS: usize = 15;

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    xs[xs.len() / 2]
}

fn model(shapes: &[usize]) -> Result<(Vec<Var>, GradStore)> {
    let mut vars = Vec::new();
    let mut grads = GradStore::default();
    for (i, &n) in shapes.iter().enumerate() {
        let v = Var::zeros(n, DType::F32, &Device::Cpu)?;
        let g = Tensor::arange(0u32, n as u32, &Device::Cpu)?
            .to_dtype(DType::F32)?
            .affine(1e-6, i as f64 * 1e-3)?;
        grads.insert(&v, g);
        vars.push(v);
    }
    Ok((vars, grads))
}

/// Wall time of one `total_norm_across` on every rank of a `world`-rank group.
fn across(world: usize, vars: &[Var], grads: &GradStore) -> f64 {
    let ranks = LocalGroup::new(world).expect("group");
    let start = Instant::now();
    std::thread::scope(|s| {
        for g in &ranks {
            s.spawn(move || {
                let mine: Vec<Var> = vars
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| i % world == g.rank())
                    .map(|(_, v)| v.clone())
                    .collect();
                black_box(total_norm_across(&mine, grads, NormType::L2, g).expect("norm"));
            });
        }
    });
    start.elapsed().as_secs_f64() * 1e3
}

/// Each rank's optimizer over its round-robin share of `vars`, clipped by the global norm.
fn sharded_optimizers(world: usize, vars: &[Var]) -> Result<Vec<FusedAdamW>> {
    (0..world)
        .map(|rank| {
            let mine: Vec<Var> = vars
                .iter()
                .enumerate()
                .filter(|(i, _)| i % world == rank)
                .map(|(_, v)| v.clone())
                .collect();
            FusedAdamW::new(mine, ParamsAdamW::default())?.with_clip(ClipSetting::norm(1.0))
        })
        .collect()
}

/// Wall time of one clipped `step_across` on every rank of a `world`-rank group.
fn step_across(ranks: &[LocalGroup], opts: &mut [FusedAdamW], grads: &GradStore) -> f64 {
    let start = Instant::now();
    std::thread::scope(|s| {
        for (g, opt) in ranks.iter().zip(opts.iter_mut()) {
            s.spawn(move || opt.step_across(grads, g).expect("step"));
        }
    });
    start.elapsed().as_secs_f64() * 1e3
}

/// A clipped fused step: one process against 4 thread ranks.
fn fused_steps() -> Result<()> {
    const WORLD: usize = 4;
    for (name, shapes) in [
        ("1000 x 1K (1M)", vec![1000usize; 1000]),
        ("16 x 1M (16M)", vec![1 << 20; 16]),
    ] {
        let (vars, grads) = model(&shapes)?;
        let mut one = FusedAdamW::new(vars.clone(), ParamsAdamW::default())?
            .with_clip(ClipSetting::norm(1.0))?;
        let ranks = LocalGroup::new(WORLD)?;
        let mut opts = sharded_optimizers(WORLD, &vars)?;
        let mut t: [Vec<f64>; 2] = Default::default();
        for _ in 0..ROUNDS {
            let start = Instant::now();
            one.step(&grads)?;
            t[0].push(start.elapsed().as_secs_f64() * 1e3);
            t[1].push(step_across(&ranks, &mut opts, &grads));
        }
        let m: Vec<f64> = t.into_iter().map(median).collect();
        println!(
            "{name}: fused step {:.3}, step_across_4 {:.3} ({:.2}x)",
            m[0],
            m[1],
            m[1] / m[0]
        );
    }
    Ok(())
}

fn main() -> Result<()> {
    println!(
        "threads: {}, rounds: {ROUNDS}, medians in ms (ratio to total_norm)",
        rayon::current_num_threads()
    );
    for (name, shapes) in [
        ("1000 x 1K (1M)", vec![1000usize; 1000]),
        ("16 x 1M (16M)", vec![1 << 20; 16]),
    ] {
        let (vars, grads) = model(&shapes)?;
        let one = LocalGroup::new(1)?;
        let mut t: [Vec<f64>; 4] = Default::default();
        for _ in 0..ROUNDS {
            let start = Instant::now();
            black_box(total_norm(&vars, &grads, NormType::L2, false)?);
            t[0].push(start.elapsed().as_secs_f64() * 1e3);
            let start = Instant::now();
            black_box(total_norm_across(&vars, &grads, NormType::L2, &one[0])?);
            t[1].push(start.elapsed().as_secs_f64() * 1e3);
            t[2].push(across(2, &vars, &grads));
            t[3].push(across(4, &vars, &grads));
        }
        let m: Vec<f64> = t.into_iter().map(median).collect();
        println!(
            "{name}: total_norm {:.3}, across_1 {:.3} ({:.2}x), across_2 {:.3} ({:.2}x), across_4 {:.3} ({:.2}x)",
            m[0],
            m[1],
            m[1] / m[0],
            m[2],
            m[2] / m[0],
            m[3],
            m[3] / m[0]
        );
    }
    fused_steps()
}
