//! The norm across MPI processes (feature `mpi`): `cargo test --release --features mpi --test
//! mpi_driver` launches this very binary under `mpirun` with 1, 2, 3 and 4 ranks
//! (oversubscribed, allowed to run as root), and each rank checks every case of `dist_cases`:
//! the norm and the clipped gradients bitwise those of the one-process call, for every dtype,
//! norm and split (whole tensors, pieces at multiples of 2^15 elements, empty ranks, a
//! replicated var), and `Clipped` / `FusedAdamW` stepping across ranks like the one-process step.
//! Then error cases: a rank that refuses its gradients makes every rank fail.
//!
//! Set `MPIRUN` to use another launcher binary (default `mpirun`).

#[path = "../common/mod.rs"]
mod common;
#[path = "../distributed/dist_cases.rs"]
mod dist_cases;

use std::process::Command;

use candle_core::{backprop::GradStore, Device, Tensor, Var};
use candle_grad_clip::{clip_grad_norm_across, ProcessGroup};
use mpi::traits::Communicator;

/// Set in the environment of the ranks this driver launches.
const CHILD: &str = "CANDLE_GRAD_CLIP_MPI_CHILD";

fn main() {
    if std::env::var_os(CHILD).is_some() {
        rank_main();
    } else {
        driver_main();
    }
}

fn driver_main() {
    let exe = std::env::current_exe().expect("the test binary's path");
    let mpirun = std::env::var("MPIRUN").unwrap_or_else(|_| "mpirun".to_string());
    for ranks in 1..=4 {
        let started = std::time::Instant::now();
        let status = Command::new(&mpirun)
            .args(["--allow-run-as-root", "--oversubscribe", "-np"])
            .arg(ranks.to_string())
            .arg(&exe)
            .env(CHILD, "1")
            // Open MPI refuses root without these (the flag alone is not enough for every version).
            .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
            .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
            .status()
            .unwrap_or_else(|e| panic!("could not start {mpirun}: {e}"));
        assert!(
            status.success(),
            "{ranks} MPI ranks: {status} (see the ranks' messages above)"
        );
        println!(
            "mpi_driver: {ranks} ranks passed in {:.1} s",
            started.elapsed().as_secs_f64()
        );
    }
    println!("mpi_driver: ok");
}

fn rank_main() {
    let universe = mpi::initialize().expect("MPI initialised once");
    let world = universe.world();
    let cases = dist_cases::all_cases();
    let n = dist_cases::run_cases(&world, &cases);
    let optimizers = dist_cases::check_optimizers(&world);
    refusal_fails_every_rank(&world);
    if Communicator::rank(&world) == 0 {
        println!(
            "mpi_driver: {} ranks agree with the one-process call bitwise on {n} cases and {optimizers} optimizer runs",
            world.size()
        );
    }
}

/// The last rank passes a broadcast gradient (which cannot be written in place): it fails with
/// its own error, every other rank with one naming the refusal, and no gradient changes.
fn refusal_fails_every_rank(world: &mpi::topology::SimpleCommunicator) {
    let rank = ProcessGroup::rank(world);
    let last = ProcessGroup::world_size(world) - 1;
    let w = Var::zeros(4, candle_core::DType::F32, &Device::Cpu).expect("var");
    let grad = if rank == last {
        Tensor::new(&[100f32], &Device::Cpu)
            .and_then(|t| t.broadcast_as(4))
            .expect("broadcast")
    } else {
        Tensor::new(&[100f32; 4], &Device::Cpu).expect("tensor")
    };
    let mut grads = GradStore::default();
    grads.insert(&w, grad);
    let err = clip_grad_norm_across(std::slice::from_ref(&w), &mut grads, 1.0, world)
        .expect_err("a refused rank fails every rank");
    let message = err.to_string();
    if rank == last {
        assert!(message.contains("broadcast"), "rank {rank}: {message}");
    } else {
        assert!(
            message.contains(&format!("rank {rank}")) && message.contains("refused"),
            "rank {rank}: {message}"
        );
    }
    let after = grads
        .get(&w)
        .expect("grad")
        .to_vec1::<f32>()
        .expect("values");
    assert_eq!(after, [100f32; 4], "rank {rank}: a gradient was modified");
}
