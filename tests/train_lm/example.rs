//! The example binary `train_lm`, run as a user runs it: the candle and fused optimizers give
//! the same parameters bitwise, and a run killed with SIGKILL at several moments (a save
//! included) and restarted with `--resume` ends exactly as the uninterrupted run.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use candle_grad_clip::TrainingCheckpoint;
use rand::{rngs::StdRng, Rng, SeedableRng};

/// The release build of the example (built once if needed: `cargo test --test train_lm` alone
/// does not build examples). Release whatever the test profile: a debug model trains far slower.
fn binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        let exe = std::env::current_exe().expect("the test's path");
        // <target>/<profile>/deps/train_lm-<hash>
        let target = exe
            .parent()
            .and_then(Path::parent)
            .and_then(Path::parent)
            .expect("the target folder");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args([
                "build",
                "--release",
                "--example",
                "train_lm",
                "--target-dir",
            ])
            .arg(target)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("cargo build --release --example train_lm");
        assert!(status.success(), "building the example failed");
        target
            .join("release")
            .join("examples")
            .join(format!("train_lm{}", std::env::consts::EXE_SUFFIX))
    })
}

/// A short run of the 260k config.
const SHORT: [&str; 8] = [
    "--batch",
    "4",
    "--seq-len",
    "32",
    "--eval-size",
    "16",
    "--seed",
    "3",
];

fn command(args: &[&str]) -> Command {
    let mut cmd = Command::new(binary());
    cmd.args(SHORT)
        .args(args)
        .env_remove("CANDLE_GRAD_CLIP_TEST_SAVE_PAUSE_MS");
    cmd
}

/// Runs to the end; the last line of stdout.
fn final_line(args: &[&str]) -> String {
    let out = command(args).output().expect("run train_lm");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "train_lm {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last = stdout.lines().last().unwrap_or("").to_string();
    assert!(last.starts_with("final step="), "{last}");
    last
}

#[test]
fn candle_and_fused_optimizers_give_the_same_parameters() {
    for clip in ["norm", "none"] {
        let candle = final_line(&["--steps", "8", "--clip", clip, "--optimizer", "candle"]);
        let fused = final_line(&["--steps", "8", "--clip", clip, "--optimizer", "fused"]);
        assert!(candle.starts_with("final step=8 loss="), "{candle}");
        assert_eq!(candle, fused, "--clip {clip}");
    }
}

/// `--accumulate 4` in F32: candle's `(acc + g)?` loop and `GradAccumulator` (micro-batches summed,
/// clipped once) print the same `params_sha256` and loss, and the run is not the one-batch run.
#[test]
fn accumulated_micro_batches_give_the_same_parameters_for_both_optimizers() {
    let args = ["--steps", "3", "--accumulate", "4", "--dtype", "f32"];
    let candle = final_line(&[&args[..], &["--optimizer", "candle"]].concat());
    let fused = final_line(&[&args[..], &["--optimizer", "fused"]].concat());
    assert!(candle.starts_with("final step=3 loss="), "{candle}");
    assert_eq!(candle, fused);
    let single = final_line(&["--steps", "3", "--optimizer", "fused"]);
    assert_ne!(
        single, fused,
        "--accumulate 4 trains on four micro-batches a step"
    );
}

#[test]
fn checkpoint_needs_the_fused_optimizer() {
    let out = command(&[
        "--steps",
        "1",
        "--optimizer",
        "candle",
        "--checkpoint",
        "x.safetensors",
    ])
    .output()
    .expect("run train_lm");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("moments private"));
}

const STEPS: &str = "24";
const EVERY: u64 = 4;

fn resumable(path: &Path) -> Command {
    let mut cmd = command(&[
        "--steps",
        STEPS,
        "--log-every",
        "1",
        "--checkpoint-every",
        "4",
        "--resume",
    ]);
    cmd.arg("--checkpoint")
        .arg(path)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// The checkpoint's step, checking that it loads whole (never torn); 0 when there is none.
fn saved_step(path: &Path) -> u64 {
    if !path.exists() {
        return 0;
    }
    match TrainingCheckpoint::load(path) {
        Ok(ck) => ck.step(),
        Err(e) => panic!("the checkpoint is torn after a kill: {e}"),
    }
}

/// Every file in `dir` but the checkpoint `run.safetensors`: a temporary file left behind.
fn temp_files(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .expect("read the folder")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().is_some_and(|n| n != "run.safetensors"))
        .collect()
}

/// Kills `child` once it has printed step `step`, then after `delay` (mid-step).
fn kill_after_step(mut child: Child, step: u64, delay: Duration) -> bool {
    let stdout = child.stdout.take().expect("piped stdout");
    let mut reached = false;
    for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
        if line.starts_with(&format!("step {step} ")) {
            reached = true;
            break;
        }
    }
    std::thread::sleep(delay);
    child.kill().expect("SIGKILL");
    child.wait().expect("reap");
    reached
}

/// What a save paused by CANDLE_GRAD_CLIP_TEST_SAVE_PAUSE_MS prints to stderr.
const PAUSE_MARK: &str = "candle-grad-clip test hook: save paused half-way";

/// Kills `child` while it writes a checkpoint (saves pause half-way through their temporary file
/// under CANDLE_GRAD_CLIP_TEST_SAVE_PAUSE_MS, and say so on stderr); returns whether it did.
fn kill_during_save(mut child: Child) -> bool {
    let stderr = child.stderr.take().expect("piped stderr");
    let (paused, seen) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
            if line.contains(PAUSE_MARK) {
                let _ = paused.send(());
            }
        }
    });
    let hit = seen.recv_timeout(Duration::from_secs(60)).is_ok();
    if hit {
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    child.wait().expect("reap");
    hit
}

#[test]
fn a_killed_run_resumes_to_the_uninterrupted_result() {
    let reference = final_line(&["--steps", STEPS]);
    let dir = std::env::temp_dir().join(format!("cgc-train-lm-kill-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("run.safetensors");
    let mut rng = StdRng::seed_from_u64(2024);
    let mut resumed_from = Vec::new();

    // 1. Before the first checkpoint.
    assert!(kill_after_step(
        resumable(&path).spawn().expect("spawn"),
        2,
        Duration::ZERO
    ));
    assert_eq!(saved_step(&path), 0, "no checkpoint yet");
    // 2.-5. After a step, mid-step, or during a save (the temporary file half written).
    for attempt in 0..4 {
        let before = saved_step(&path);
        if attempt % 2 == 1 {
            let mut cmd = resumable(&path);
            cmd.env("CANDLE_GRAD_CLIP_TEST_SAVE_PAUSE_MS", "400");
            assert!(
                kill_during_save(cmd.spawn().expect("spawn")),
                "no save seen"
            );
            // The half-written temporary file had no name (O_TMPFILE): nothing is left.
            let torn = temp_files(&dir);
            assert!(torn.is_empty(), "a torn temporary file: {torn:?}");
            // The checkpoint is still the previous one (or the first save has not landed yet).
            let after = saved_step(&path);
            assert!(
                after == before || after == before + EVERY,
                "{before} -> {after}"
            );
        } else {
            // At least one more save lands before the kill: the run makes progress.
            let step = before + EVERY + 1 + rng.gen_range(0..EVERY);
            let delay = Duration::from_millis(rng.gen_range(0..40));
            assert!(kill_after_step(
                resumable(&path).spawn().expect("spawn"),
                step,
                delay
            ));
            let after = saved_step(&path);
            assert!(
                after >= before && after <= step,
                "{before} -> {after} (killed after {step})"
            );
        }
        resumed_from.push(saved_step(&path));
    }
    // 6. To the end.
    let out = resumable(&path).output().expect("run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stderr.contains("resumed from"), "{stderr}");
    assert!(
        temp_files(&dir).is_empty(),
        "a file besides the checkpoint was left behind"
    );
    assert!(
        resumed_from.iter().any(|&s| s > 0),
        "resumed only from scratch: {resumed_from:?}"
    );
    assert_eq!(
        stdout.lines().last().unwrap_or(""),
        reference,
        "resumed from {resumed_from:?}"
    );
    std::fs::remove_dir_all(&dir).expect("clean up");
}

#[test]
fn a_resumed_f16_zclip_run_keeps_the_scaler_and_zclip_state() {
    // GradScaler and ZClip state in the checkpoint: killed after step 29 (ZClip's 25-step warm-up
    // over, the last save at step 28), resumed, the same end as the uninterrupted run.
    let args = ["--steps", "32", "--dtype", "f16", "--clip", "zclip"];
    let reference = final_line(&args);
    let dir = std::env::temp_dir().join(format!("cgc-train-lm-f16-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("run.safetensors");
    let resumable = || {
        let mut cmd = command(&args);
        cmd.args([
            "--log-every",
            "1",
            "--checkpoint-every",
            "4",
            "--resume",
            "--checkpoint",
        ])
        .arg(&path)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        cmd
    };
    assert!(kill_after_step(
        resumable().spawn().expect("spawn"),
        29,
        Duration::ZERO
    ));
    assert_eq!(saved_step(&path), 28);
    let out = resumable().output().expect("run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("at step 28"));
    assert_eq!(stdout.lines().last().unwrap_or(""), reference);
    std::fs::remove_dir_all(&dir).expect("clean up");
}
