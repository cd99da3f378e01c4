//! The norm across MPI processes (feature `mpi`): `cargo test --release --features mpi --test
//! mpi_driver` launches this very binary under `mpirun` with 1, 2, 3 and 4 ranks
//! (oversubscribed, allowed to run as root), and each rank checks every case of `dist_cases`:
//! the norm and the clipped gradients bitwise those of the one-process call, for every dtype,
//! norm and split (whole tensors, pieces at multiples of 2^15 elements, empty ranks, a
//! replicated var), and `Clipped` / `FusedAdamW` stepping across ranks like the one-process step.
//! Then error and disagreement cases, where every rank must return an error or agree and none may
//! hang: a rank that refuses its gradients or its settings makes every rank fail; a different
//! `max_norm` on one rank is refused on every rank; a NaN on one rank with AGC and
//! `skip_nonfinite` skips the step on every rank. Each `mpirun` runs under a deadline
//! ([`DEADLINE`]): a hanging rank fails the test (the job is killed) instead of hanging it.
//!
//! Set `MPIRUN` to use another launcher binary (default `mpirun`).

#[path = "../common/mod.rs"]
mod common;
#[path = "../distributed/dist_cases.rs"]
mod dist_cases;

use std::process::Command;
use std::time::{Duration, Instant};

use candle_core::{backprop::GradStore, Device, Tensor, Var};
use candle_grad_clip::{
    clip_grad_norm_across_, ClipGradNorm, ClipSetting, FusedAdamW, ProcessGroup,
};
use candle_nn::{Optimizer, ParamsAdamW};
use mpi::traits::Communicator;

/// Set in the environment of the ranks this driver launches.
const CHILD: &str = "CANDLE_GRAD_CLIP_MPI_CHILD";

/// How long one `mpirun` (every case on 1 to 4 ranks) may take before the driver kills it and
/// fails: a rank left waiting in a collective hangs its job.
const DEADLINE: Duration = Duration::from_secs(600);

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
        let started = Instant::now();
        let mut child = Command::new(&mpirun)
            .args(["--allow-run-as-root", "--oversubscribe", "-np"])
            .arg(ranks.to_string())
            .arg(&exe)
            .env(CHILD, "1")
            // Open MPI refuses root without these (the flag alone is not enough for every version).
            .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
            .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
            .spawn()
            .unwrap_or_else(|e| panic!("could not start {mpirun}: {e}"));
        let status = loop {
            if let Some(status) = child.try_wait().expect("the mpirun child's status") {
                break status;
            }
            if started.elapsed() > DEADLINE {
                // mpirun forwards the kill to its ranks.
                let _ = child.kill();
                let _ = child.wait();
                panic!("{ranks} MPI ranks still running after {DEADLINE:?}: a rank hangs (see the ranks' messages above)");
            }
            std::thread::sleep(Duration::from_millis(100));
        };
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
    refused_settings_fail_every_rank(&world);
    different_max_norm_is_refused_on_every_rank(&world);
    nan_on_one_rank_with_agc_skips_on_every_rank(&world);
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
    let err = clip_grad_norm_across_(std::slice::from_ref(&w), &mut grads, 1.0, world)
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

/// The last rank calls `ClipGradNorm::new(-1.0).clip_across_`: its settings are refused before
/// the collective, which it still joins, so every rank fails (the others naming it) and no
/// gradient changes. (Before issue 21, the other ranks waited forever.)
fn refused_settings_fail_every_rank(world: &mpi::topology::SimpleCommunicator) {
    let rank = ProcessGroup::rank(world);
    let last = ProcessGroup::world_size(world) - 1;
    let w = Var::zeros(2, candle_core::DType::F32, &Device::Cpu).expect("var");
    let mut grads = GradStore::default();
    grads.insert(&w, Tensor::new(&[30f32, 40.], &Device::Cpu).expect("grad"));
    let max_norm = if rank == last { -1.0 } else { 1.0 };
    let message = ClipGradNorm::new(max_norm)
        .clip_across_(std::slice::from_ref(&w), &mut grads, world)
        .expect_err("a refused rank fails every rank")
        .to_string();
    if rank == last {
        assert!(message.contains("max_norm"), "rank {rank}: {message}");
    } else {
        assert!(
            message.contains(&format!("rank {last} (invalid settings)")),
            "rank {rank}: {message}"
        );
    }
    let after = grads.get(&w).expect("grad").to_vec1::<f32>().expect("v");
    assert_eq!(after, [30.0, 40.0], "rank {rank}: a gradient was modified");
}

/// `max_norm` 2 on the last rank and 1 on the others: every rank fails naming the setting (with
/// one rank, nothing differs: it clips).
fn different_max_norm_is_refused_on_every_rank(world: &mpi::topology::SimpleCommunicator) {
    let rank = ProcessGroup::rank(world);
    let size = ProcessGroup::world_size(world);
    let w = Var::zeros(2, candle_core::DType::F32, &Device::Cpu).expect("var");
    let mut grads = GradStore::default();
    grads.insert(&w, Tensor::new(&[30f32, 40.], &Device::Cpu).expect("grad"));
    let max_norm = if size > 1 && rank == size - 1 {
        2.0
    } else {
        1.0
    };
    let result =
        ClipGradNorm::new(max_norm).clip_across_(std::slice::from_ref(&w), &mut grads, world);
    if size == 1 {
        assert!(result.is_ok(), "one rank agrees with itself: {result:?}");
        return;
    }
    let message = result
        .expect_err("ranks that differ are refused")
        .to_string();
    assert!(
        message.contains("settings differ") && message.contains("max_norm"),
        "rank {rank}: {message}"
    );
    let after = grads.get(&w).expect("grad").to_vec1::<f32>().expect("v");
    assert_eq!(after, [30.0, 40.0], "rank {rank}: a gradient was modified");
}

/// `FusedAdamW` with AGC and `skip_nonfinite` on every rank, a NaN in the last rank's gradient:
/// every rank skips (before issue 21, the last rank skipped and the others stepped).
fn nan_on_one_rank_with_agc_skips_on_every_rank(world: &mpi::topology::SimpleCommunicator) {
    let rank = ProcessGroup::rank(world);
    let last = ProcessGroup::world_size(world) - 1;
    let w = Var::zeros(2, candle_core::DType::F32, &Device::Cpu).expect("var");
    let mut opt = FusedAdamW::new(vec![w.clone()], ParamsAdamW::default())
        .and_then(|o| o.with_clip(ClipSetting::agc(0.01)))
        .expect("optimizer")
        .with_skip_nonfinite(true);
    let g = if rank == last { f32::NAN } else { 1.0 };
    let mut grads = GradStore::default();
    grads.insert(&w, Tensor::new(&[g, 2.0], &Device::Cpu).expect("grad"));
    opt.step_across(&grads, world)
        .expect("a skipped step is not an error");
    assert_eq!(
        (
            opt.steps().expect("steps"),
            opt.skipped_steps().expect("skipped")
        ),
        (0, 1),
        "rank {rank}: every rank skips"
    );
    assert_eq!(
        w.to_vec1::<f32>().expect("var"),
        [0.0, 0.0],
        "rank {rank} stepped"
    );
}
