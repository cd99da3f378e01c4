//! Clipping a sharded model with the global norm, over MPI:
//!
//! ```text
//! cargo build --release --features mpi --example sharded_clip
//! mpirun -np 4 target/release/examples/sharded_clip
//! ```
//!
//! (As root, add `--allow-run-as-root`; with fewer cores than ranks, `--oversubscribe`.)
//!
//! A model of 8 layers; each of the 4 ranks owns a quarter of them: it keeps their gradients and
//! steps their optimizer. (For brevity every rank runs the whole forward and backward pass; in
//! pipeline or tensor parallelism each rank would compute only its own part.) Each rank clips its
//! own gradients with the norm over all ranks, so every rank prints the same norm, bit for bit,
//! and rank 0 checks it against the norm of all 8 layers computed in one process.

use candle_core::{DType, Device, Module, Result, Tensor, Var};
use candle_grad_clip::{clip_grad_norm_across_, total_norm, ProcessGroup};
use candle_nn::{Linear, Optimizer, SGD};
use mpi::traits::Communicator;

const LAYERS: usize = 8;
const WIDTH: usize = 64;

/// Layer `l`'s weight and bias, the same on every rank (no random seed to share).
fn layer(l: usize) -> Result<(Var, Var)> {
    let w: Vec<f32> = (0..WIDTH * WIDTH)
        .map(|i| ((i * 7 + l * 13) as f32 * 0.37).sin() * 0.3)
        .collect();
    let b: Vec<f32> = (0..WIDTH).map(|i| ((i + l) as f32).cos() * 0.1).collect();
    Ok((
        Var::from_tensor(&Tensor::from_vec(w, (WIDTH, WIDTH), &Device::Cpu)?)?,
        Var::from_tensor(&Tensor::from_vec(b, WIDTH, &Device::Cpu)?)?,
    ))
}

fn main() -> Result<()> {
    let universe = mpi::initialize().ok_or_else(|| candle_core::Error::Msg("MPI init".into()))?;
    let world = universe.world();
    let (rank, size) = (Communicator::rank(&world) as usize, world.size() as usize);

    let layers: Vec<(Var, Var)> = (0..LAYERS).map(layer).collect::<Result<_>>()?;
    // This rank's layers: a contiguous quarter (for 4 ranks) of the model.
    let mine = rank * LAYERS / size..(rank + 1) * LAYERS / size;
    let my_vars: Vec<Var> = layers[mine.clone()]
        .iter()
        .flat_map(|(w, b)| [w.clone(), b.clone()])
        .collect();
    let mut opt = SGD::new(my_vars.clone(), 0.01)?;

    let x = Tensor::ones((16, WIDTH), DType::F32, &Device::Cpu)?;
    let mut h = x;
    for (w, b) in &layers {
        h = Linear::new(w.as_tensor().clone(), Some(b.as_tensor().clone()))
            .forward(&h)?
            .tanh()?;
    }
    let loss = (h - 3.0)?.sqr()?.mean_all()?;
    let mut grads = loss.backward()?;

    // Rank 0 keeps the one-process norm of every layer for the check below.
    let all_vars: Vec<Var> = layers
        .iter()
        .flat_map(|(w, b)| [w.clone(), b.clone()])
        .collect();
    let one_process = total_norm(&all_vars, &grads, candle_grad_clip::NormType::L2, false)?;

    let norm = clip_grad_norm_across_(&my_vars, &mut grads, 0.5, &world)?;
    let value = norm.to_scalar::<f32>()?;
    println!(
        "rank {rank} of {size}: layers {mine:?}, global L2 norm {value} (bits {:#010x})",
        value.to_bits()
    );
    if ProcessGroup::rank(&world) == 0 {
        let want = one_process.to_scalar::<f32>()?;
        assert_eq!(
            value.to_bits(),
            want.to_bits(),
            "the one-process norm is {want}"
        );
        println!("rank 0: the same bits as the one-process norm of all {LAYERS} layers");
    }
    opt.step(&grads)
}
