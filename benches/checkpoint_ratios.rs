//! Training checkpoints against the disk's floor, side by side on a noisy machine: every case
//! once per round, medians over the rounds. A checkpoint here is a `VarMap` and a `FusedAdamW`'s
//! state (12 bytes a parameter for F32 vars).
//!
//! - **build**: `TrainingCheckpoint::new(..).with_optimizer(..)`, the host copy (a memcpy of the
//!   state into fresh memory; on the training thread, also with `save_in_background`);
//! - **save**: `save(..)` of that checkpoint, against a floor of one SHA-256 pass over as many
//!   bytes (one thread) plus writing them to a file and fsyncing it;
//! - **load + restore**: `TrainingCheckpoint::load(..)` and `restore(..).optimizer(..).apply()`,
//!   against a floor of reading the file and one SHA-256 pass over it;
//! - **extra peak memory** of a save and of a load + restore, each measured in a fresh process
//!   (this binary run again) that holds the model, its gradients and the optimizer's state after
//!   one step: the peak RSS (`VmHWM`, reset through `/proc/self/clear_refs`) above the RSS before.
//!
//! ```text
//! cargo bench --bench checkpoint_ratios                # 8M params in 25/100/400 tensors, 101M in 200
//! cargo bench --bench checkpoint_ratios -- 8M          # the cases whose name contains "8M"
//! ```

mod common;
mod cpu_common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use candle_core::{backprop::GradStore, DType, Device, Result, Tensor};
use candle_grad_clip::{FusedAdamW, TrainingCheckpoint};
use candle_nn::{Optimizer, ParamsAdamW, VarMap};
use cpu_common::median;
use sha2::{Digest, Sha256};

/// A case: its name and its vars' shapes.
struct Case {
    name: String,
    shapes: Vec<Vec<usize>>,
}

fn cases() -> Vec<Case> {
    let mut cases: Vec<Case> = [25usize, 100, 400]
        .into_iter()
        .map(|n| Case {
            name: format!("8M/{n}"),
            shapes: vec![vec![8_000_000 / n]; n],
        })
        .collect();
    cases.push(Case {
        name: "101M/200".into(),
        shapes: common::set_a_shapes(),
    });
    cases
}

/// The model (seeded values), its gradients and a `FusedAdamW` after one step.
fn training_state(shapes: &[Vec<usize>]) -> Result<(VarMap, FusedAdamW, GradStore)> {
    let varmap = VarMap::new();
    let mut grads = GradStore::default();
    for (i, shape) in shapes.iter().enumerate() {
        let init = candle_nn::Init::Uniform { lo: -1.0, up: 1.0 };
        let var = varmap.get(
            shape.clone(),
            &format!("layer{i:03}"),
            init,
            DType::F32,
            &Device::Cpu,
        )?;
        grads.insert(&var, Tensor::rand(-1f32, 1., shape.clone(), &Device::Cpu)?);
    }
    let mut opt = FusedAdamW::from_varmap(&varmap, ParamsAdamW::default())?;
    opt.step(&grads)?;
    Ok((varmap, opt, grads))
}

fn save(varmap: &VarMap, opt: &FusedAdamW, path: &Path) -> Result<()> {
    build(varmap, opt)?.save(path)
}

/// The checkpoint's host copy of the vars and the optimizer's state.
fn build(varmap: &VarMap, opt: &FusedAdamW) -> Result<TrainingCheckpoint> {
    TrainingCheckpoint::new(varmap, 1)?.with_optimizer(opt)
}

fn load_and_restore(varmap: &VarMap, opt: &mut FusedAdamW, path: &Path) -> Result<()> {
    TrainingCheckpoint::load(path)?
        .restore(varmap)
        .optimizer(opt)
        .apply()
}

/// The floor of a save: one SHA-256 pass over `bytes`, then writing them to a file and fsyncing.
fn save_floor(bytes: &[u8], path: &Path) -> std::io::Result<()> {
    std::hint::black_box(Sha256::digest(bytes));
    write_and_sync(bytes, path)
}

fn write_and_sync(bytes: &[u8], path: &Path) -> std::io::Result<()> {
    let mut f = std::fs::File::create(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// The disk alone: write + fsync, and read, of 512 MB; and SHA-256 on one thread.
fn disk_rates(dir: &Path) -> Result<()> {
    let bytes = vec![0x5au8; 512 << 20];
    let floor_path = dir.join("disk.bin");
    let (mut w, mut r) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        let t = Instant::now();
        write_and_sync(&bytes, &floor_path)?;
        w.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        std::hint::black_box(std::fs::read(&floor_path)?);
        r.push(t.elapsed().as_secs_f64());
    }
    let t = Instant::now();
    std::hint::black_box(Sha256::digest(&bytes));
    let sha = t.elapsed().as_secs_f64();
    println!(
        "disk: write + fsync {:.2} GB/s, read {:.2} GB/s (page cache: the file was just written); SHA-256 one thread {:.2} GB/s",
        0.537 / median(w),
        0.537 / median(r),
        0.537 / sha
    );
    Ok(())
}

/// The floor of a load: reading the file, then one SHA-256 pass over it.
fn load_floor(path: &Path) -> std::io::Result<()> {
    let bytes = std::fs::read(path)?;
    std::hint::black_box(Sha256::digest(&bytes));
    Ok(())
}

fn status_kb(key: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("a /proc/self/status entry")
}

/// The peak RSS `f` adds above the RSS before it, in bytes.
fn extra_peak(f: impl FnOnce() -> Result<()>) -> Result<u64> {
    std::fs::write("/proc/self/clear_refs", "5").expect("reset the peak RSS");
    let before = status_kb("VmRSS:");
    f()?;
    Ok(status_kb("VmHWM:").saturating_sub(before) * 1024)
}

/// In a child process: the extra peak memory of a save (`save`) or of a load + restore
/// (`restore`, of the file at `path`) of case `index`; printed as `peak <bytes>`.
fn child(mode: &str, index: usize, path: &Path) -> Result<()> {
    let case = &cases()[index];
    let (varmap, mut opt, grads) = training_state(&case.shapes)?;
    let peak = match mode {
        "save" => extra_peak(|| save(&varmap, &opt, path))?,
        _ => extra_peak(|| load_and_restore(&varmap, &mut opt, path))?,
    };
    drop(grads);
    println!("peak {peak}");
    Ok(())
}

fn child_peak(mode: &str, index: usize, path: &Path) -> u64 {
    let out = Command::new(std::env::current_exe().expect("this binary"))
        .env(
            "CHECKPOINT_BENCH_CHILD",
            format!("{mode} {index} {}", path.display()),
        )
        .output()
        .expect("run the child");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("peak "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "child {mode} {index}: {text} {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
}

fn main() -> Result<()> {
    if let Ok(spec) = std::env::var("CHECKPOINT_BENCH_CHILD") {
        let mut parts = spec.splitn(3, ' ');
        let (mode, index, path) = (
            parts.next().unwrap_or("save"),
            parts.next().and_then(|i| i.parse().ok()).unwrap_or(0),
            PathBuf::from(parts.next().unwrap_or("")),
        );
        return child(mode, index, &path);
    }
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let dir = std::env::temp_dir().join(format!("cgc-checkpoint-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let rounds = 5;
    println!(
        "{:<10} {:>9} {:>7} {:>8} {:>9} {:>6} {:>10} {:>9} {:>6} {:>9} {:>9} {:>13} {:>13}",
        "case",
        "file MB",
        "build s",
        "save s",
        "floor s",
        "ratio",
        "load+rst s",
        "floor s",
        "ratio",
        "save GB/s",
        "load GB/s",
        "save peak",
        "restore peak"
    );
    // Every case's state built first, then every case once per round: the cases and their
    // floors are measured side by side, under the same drift of the machine.
    let chosen: Vec<(usize, Case)> = cases()
        .into_iter()
        .enumerate()
        .filter(|(_, c)| filter.as_ref().is_none_or(|f| c.name.contains(f.as_str())))
        .collect();
    let mut runs = Vec::new();
    for (index, case) in &chosen {
        let (varmap, opt, grads) = training_state(&case.shapes)?;
        let path = dir.join(format!("ckpt-{index}.safetensors"));
        save(&varmap, &opt, &path)?;
        let file = std::fs::metadata(&path)?.len();
        runs.push((varmap, opt, grads, path, file, [(); 5].map(|()| Vec::new())));
    }
    let floor_path = dir.join("floor.bin");
    for _ in 0..rounds {
        for (varmap, opt, _, path, file, times) in runs.iter_mut() {
            let bytes = vec![0x5au8; *file as usize];
            let t = Instant::now();
            let checkpoint = build(varmap, opt)?;
            times[4].push(t.elapsed().as_secs_f64());
            let t = Instant::now();
            checkpoint.save(&**path)?;
            times[0].push(t.elapsed().as_secs_f64());
            drop(checkpoint);
            let t = Instant::now();
            save_floor(&bytes, &floor_path)?;
            times[1].push(t.elapsed().as_secs_f64());
            drop(bytes);
            let t = Instant::now();
            load_and_restore(varmap, opt, path)?;
            times[2].push(t.elapsed().as_secs_f64());
            let t = Instant::now();
            load_floor(&floor_path)?;
            times[3].push(t.elapsed().as_secs_f64());
        }
    }
    let mut rows = Vec::new();
    for ((index, case), (varmap, opt, grads, path, file, times)) in chosen.iter().zip(runs) {
        drop((varmap, opt, grads));
        let [s, sf, l, lf, b] = times.map(median);
        rows.push((*index, case.name.clone(), path, file, s, sf, l, lf, b));
    }
    for (index, name, path, file, s, sf, l, lf, b) in rows {
        let save_peak = child_peak("save", index, &dir.join("child.safetensors"));
        let restore_peak = child_peak("restore", index, &path);
        let gb = file as f64 / 1e9;
        println!(
            "{:<10} {:>9.1} {:>7.3} {:>8.3} {:>9.3} {:>6.2} {:>10.3} {:>9.3} {:>6.2} {:>9.2} {:>9.2} {:>8.0} MB {:>4.2}x {:>5.0} MB {:>4.2}x",
            name,
            file as f64 / 1e6,
            b,
            s,
            sf,
            s / sf,
            l,
            lf,
            l / lf,
            gb / s,
            gb / l,
            save_peak as f64 / 1e6,
            save_peak as f64 / file as f64,
            restore_peak as f64 / 1e6,
            restore_peak as f64 / file as f64,
        );
    }
    disk_rates(&dir)?;
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
