//! Trains candle's llama2-c transformer from random initialisation on byte-level addition
//! problems, with this crate's optimizers and clip policies, and answers three questions: does
//! the fused path give the same result (`params_sha256` on the last line), how much faster is the
//! whole step (the timings summary), and can a run stop and resume exactly (`--checkpoint`,
//! `--resume`).
//!
//! ```sh
//! cargo run --release --example train_lm -- --steps 300 --optimizer fused --clip norm
//! cargo run --release --example train_lm -- --steps 300 --optimizer candle --clip norm  # same last line
//! cargo run --release --example train_lm -- --optimizer both --steps 30   # both, interleaved, timed side by side
//! cargo run --release --example train_lm -- --dtype f16 --clip zclip      # GradScaler + ZClip
//! cargo run --release --example train_lm -- --checkpoint run.safetensors --checkpoint-every 50 --resume
//! cargo run --release --example train_lm -- --accumulate 4 --batch 4  # 4 micro-batches a step
//! ```
//!
//! `--optimizer candle` is what a candle user writes today: `clip_grad_norm_` (or ZClip's /
//! AGC's functions, or nothing), then `candle_nn::AdamW::step`. `--optimizer fused` is
//! `FusedAdamW` with the clip folded in. The model is `examples/train_lm/model.rs`:
//! candle-transformers' `llama2_c` with its RMSNorm made differentiable (see there why).
//! The last line is `final step=N loss=L params_sha256=H`.

#[path = "train_lm/checkpointing.rs"]
mod checkpointing;
#[path = "train_lm/data.rs"]
mod data;
#[path = "train_lm/model.rs"]
mod model;
#[path = "train_lm/report.rs"]
mod report;
#[path = "train_lm/trainer.rs"]
mod trainer;
#[path = "train_lm/vars.rs"]
mod vars;

use std::path::PathBuf;

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};
use candle_grad_clip::{ClipSetting, TrainingCheckpoint, ZClip};
use clap::{Parser, ValueEnum};

use checkpointing::{checkpoint_of, resume};
use data::{Corpus, Loader};
use model::Config;
use trainer::Trainer;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ConfigName {
    #[value(name = "260k")]
    Tiny260k,
    #[value(name = "15m")]
    Tiny15m,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum OptimizerKind {
    /// `clip_grad_norm_` (or none) then `candle_nn::AdamW::step`.
    Candle,
    /// `FusedAdamW` with the clip folded in.
    Fused,
    /// Both, on twin models from the same initialisation and batches, interleaved step by step.
    Both,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Clip {
    None,
    Norm,
    Zclip,
    Agc,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Precision {
    F32,
    Bf16,
    F16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum DeviceName {
    Cpu,
    Cuda,
}

/// Train candle's llama2-c transformer on byte-level addition with candle-grad-clip.
#[derive(Debug, Clone, Parser)]
struct Args {
    /// Training steps (in all, a resumed run included).
    #[arg(long, default_value_t = 300)]
    steps: u64,
    /// Seed of the initialisation and of the data.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Sequences per batch.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Micro-batches of `--batch` sequences per optimizer step: their gradients are summed
    /// (`GradAccumulator` with `--optimizer fused`, candle's `(acc + g)?` with `candle`) and
    /// clipped once; the loss is their mean.
    #[arg(long, default_value_t = 1)]
    accumulate: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 64)]
    seq_len: usize,
    /// AdamW learning rate (constant; the other AdamW settings are candle's defaults).
    #[arg(long, default_value_t = 3e-3)]
    lr: f64,
    /// The model: candle's `Config::tiny_260k()` or `Config::tiny_15m()` (vocabulary 256 bytes).
    #[arg(long, value_enum, default_value = "260k")]
    config: ConfigName,
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceName,
    #[arg(long, value_enum, default_value = "fused")]
    optimizer: OptimizerKind,
    /// Gradient clipping: global L2 norm at most `--max-norm`, ZClip, AGC (0.01), or none.
    #[arg(long, value_enum, default_value = "norm")]
    clip: Clip,
    #[arg(long, default_value_t = 1.0)]
    max_norm: f64,
    /// The forward pass's dtype (vars are F32 always); F16 uses a GradScaler.
    #[arg(long, value_enum, default_value = "f32")]
    dtype: Precision,
    /// Digits of each operand.
    #[arg(long, default_value_t = 2)]
    digits: u32,
    /// Held-out problems for the exact-match accuracy.
    #[arg(long, default_value_t = 256)]
    eval_size: usize,
    /// Separate input and output embeddings (llama2.c, and by default this example, tie them).
    #[arg(long)]
    untied: bool,
    /// Save a training checkpoint here every `--checkpoint-every` steps (`--optimizer fused`).
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    #[arg(long, default_value_t = 50)]
    checkpoint_every: u64,
    /// Save each checkpoint on another thread while training goes on (the checkpoint holds
    /// host copies taken at its step); at most one save in flight.
    #[arg(long)]
    checkpoint_async: bool,
    /// Continue from `--checkpoint` if the file exists.
    #[arg(long)]
    resume: bool,
    /// One line every N steps instead of a progress bar.
    #[arg(long)]
    log_every: Option<u64>,
    /// Also print the held-out accuracy every N steps.
    #[arg(long)]
    eval_every: Option<u64>,
    /// Draw the loss against the step into this PNG.
    #[arg(long)]
    plot: Option<PathBuf>,
}

impl Args {
    /// The settings a resumed run must share with the saved one. Not the device: a checkpoint
    /// taken on one device resumes on another (the same run, but not bitwise the same).
    fn run_key(&self) -> String {
        format!(
            "config={:?} batch={} accumulate={} seq_len={} lr={:?} optimizer={:?} clip={:?} max_norm={:?} dtype={:?} digits={} seed={} untied={}",
            self.config, self.batch, self.accumulate, self.seq_len, self.lr, self.optimizer, self.clip,
            self.max_norm, self.dtype, self.digits, self.seed, self.untied
        )
    }

    fn compute_dtype(&self) -> DType {
        match self.dtype {
            Precision::F32 => DType::F32,
            Precision::Bf16 => DType::BF16,
            Precision::F16 => DType::F16,
        }
    }

    fn model_config(&self) -> Config {
        let mut cfg = match self.config {
            ConfigName::Tiny260k => Config::tiny_260k(),
            ConfigName::Tiny15m => Config::tiny_15m(),
        };
        cfg.vocab_size = 256; // byte-level tokens
        cfg
    }

    fn clip_setting(&self) -> Option<ClipSetting> {
        match self.clip {
            Clip::None => None,
            Clip::Norm => Some(ClipSetting::norm(self.max_norm)),
            Clip::Zclip => Some(ClipSetting::ZClip(ZClip::new())),
            Clip::Agc => Some(ClipSetting::agc(AGC_CLIPPING)),
        }
    }
}

const AGC_CLIPPING: f64 = 0.01;

impl Args {
    /// Refuses flags that do not go together.
    fn check(&self) -> anyhow::Result<()> {
        if self.checkpoint.is_some() && self.optimizer != OptimizerKind::Fused {
            bail!(
                "--checkpoint needs --optimizer fused: candle_nn::AdamW keeps its moments private, so its state cannot be saved, and a resume without them would not be the same run"
            )
        }
        if self.resume && self.checkpoint.is_none() {
            bail!("--resume needs --checkpoint PATH")
        }
        if self.checkpoint_every == 0 {
            bail!("--checkpoint-every must be at least 1")
        }
        if self.accumulate == 0 {
            bail!("--accumulate must be at least 1")
        }
        Ok(())
    }
}

/// The next optimizer step's `--accumulate` micro-batches of `--batch` sequences each.
fn micro_batches(
    loader: &mut Loader,
    args: &Args,
    device: &Device,
) -> anyhow::Result<Vec<(Tensor, Tensor)>> {
    (0..args.accumulate)
        .map(|_| {
            let (inputs, targets) = loader.next_batch(args.batch, args.seq_len);
            Ok((
                Tensor::from_vec(inputs, (args.batch, args.seq_len), device)?,
                Tensor::from_vec(targets, (args.batch, args.seq_len), device)?,
            ))
        })
        .collect()
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    args.check()?;
    let device = match args.device {
        DeviceName::Cpu => Device::Cpu,
        DeviceName::Cuda => Device::new_cuda(0)?,
    };
    let kinds: &[OptimizerKind] = match args.optimizer {
        OptimizerKind::Both => &[OptimizerKind::Candle, OptimizerKind::Fused],
        k => std::slice::from_ref(match k {
            OptimizerKind::Candle => &OptimizerKind::Candle,
            _ => &OptimizerKind::Fused,
        }),
    };
    let mut trainers = kinds
        .iter()
        .map(|&k| Trainer::new(&args, k, &device))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let corpus = Corpus {
        seed: args.seed,
        digits: args.digits,
    };
    let mut loader = Loader {
        corpus,
        position: 0,
    };
    let problems = corpus.held_out_problems(args.eval_size);
    let mut first = 0u64;
    let mut losses: Vec<Vec<(u64, f32)>> = vec![Vec::new(); trainers.len()];
    if let (true, Some(path)) = (args.resume, &args.checkpoint) {
        if path.exists() {
            let ck = TrainingCheckpoint::load(path)?;
            let (step, position, history) = resume(&mut trainers[0], &args, &ck)
                .with_context(|| format!("resuming from {}", path.display()))?;
            (first, loader.position, losses[0]) = (step, position, history);
            eprintln!("resumed from {} at step {first}", path.display());
        }
    }

    let n_params: usize = report::sorted_vars(&trainers[0].vars.varmap)?
        .iter()
        .map(|(_, v)| v.elem_count())
        .sum();
    let n_tensors = trainers[0]
        .vars
        .varmap
        .data()
        .lock()
        .map(|d| d.len())
        .unwrap_or(0);
    println!(
        "llama2-c {:?} (vocabulary 256 bytes{}): {n_params} parameters in {n_tensors} tensors; batch {} x {} x {} tokens; {:?} forward; optimizer {:?}, clip {:?}",
        args.config,
        if args.untied { "" } else { ", tied embeddings" },
        args.accumulate,
        args.batch,
        args.seq_len,
        args.dtype,
        args.optimizer,
        args.clip
    );

    let bar = match args.log_every {
        Some(_) => None,
        None => {
            let bar = indicatif::ProgressBar::new(args.steps);
            bar.set_position(first);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:40} {pos}/{len} {msg} [{elapsed} < {eta}]",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            Some(bar)
        }
    };
    let mut saves = SaveTimes::default();
    let mut pending: Option<candle_grad_clip::PendingSave> = None;
    for step in first + 1..=args.steps {
        let started = std::time::Instant::now();
        let in_flight = pending.as_ref().is_some_and(|p| !p.is_finished());
        let micro = micro_batches(&mut loader, &args, &device)?;
        // Interleaved: the order alternates, so neither optimizer always runs on a warm cache.
        let n = trainers.len();
        for k in 0..n {
            let i = if step % 2 == 0 { k } else { n - 1 - k };
            let loss = trainers[i].step(step, &micro)?;
            losses[i].push((step, loss));
        }
        let loss = losses[n - 1].last().map_or(f32::NAN, |l| l.1);
        if let Some(bar) = &bar {
            bar.set_position(step);
            bar.set_message(format!("loss {loss:.4}"));
        }
        if let Some(every) = args.log_every {
            if step % every == 0 || step == args.steps {
                let t = &trainers[n - 1].timings;
                println!(
                    "step {step} loss {loss:.6} ms fwd+bwd {:.1} optimizer {:.1}",
                    t.forward_backward.last().unwrap_or(&0.0),
                    t.optimizer.last().unwrap_or(&0.0)
                );
            }
        }
        if let Some(every) = args.eval_every {
            if step % every == 0 {
                for (i, t) in trainers.iter_mut().enumerate() {
                    let (exact, bytes) = t.accuracy(&problems)?;
                    let line = format!(
                        "eval [{}] step {step} loss {:.6}: held-out exact match {:.1}%, answer bytes {:.1}%",
                        t.name,
                        losses[i].last().map_or(f32::NAN, |l| l.1),
                        exact * 100.0,
                        bytes * 100.0
                    );
                    match &bar {
                        Some(bar) => bar.suspend(|| println!("{line}")),
                        None => println!("{line}"),
                    }
                }
            }
        }
        let mut took_checkpoint = false;
        if let Some(path) = &args.checkpoint {
            if step % args.checkpoint_every == 0 {
                took_checkpoint = true;
                // One save in flight at most: the previous one ends first.
                if let Some(previous) = pending.take() {
                    previous
                        .wait()
                        .with_context(|| format!("saving {}", path.display()))?;
                }
                let built = std::time::Instant::now();
                let ck = checkpoint_of(&trainers[0], &args, step, loader.position, &losses[0])?;
                saves.build_ms.push(built.elapsed().as_secs_f64() * 1e3);
                if args.checkpoint_async {
                    pending = Some(ck.save_in_background(path)?);
                } else {
                    let saving = std::time::Instant::now();
                    ck.save(path)
                        .with_context(|| format!("saving {}", path.display()))?;
                    saves.save_ms.push(saving.elapsed().as_secs_f64() * 1e3);
                }
            }
        }
        let ms = started.elapsed().as_secs_f64() * 1e3;
        match (took_checkpoint, in_flight) {
            (true, _) => saves.checkpoint_steps_ms.push(ms),
            (false, true) => saves.in_flight_ms.push(ms),
            (false, false) => saves.plain_ms.push(ms),
        }
    }
    if let (Some(previous), Some(path)) = (pending.take(), &args.checkpoint) {
        previous
            .wait()
            .with_context(|| format!("saving {}", path.display()))?;
    }
    if args.checkpoint.is_some() {
        saves.report(args.checkpoint_async);
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }

    let last = args.steps.max(first);
    for trainer in &mut trainers {
        let accuracy = trainer.accuracy(&problems)?;
        trainer.summary(&args, first, last, accuracy);
    }
    if trainers.len() == 2 {
        let (c, f) = (&trainers[0].timings, &trainers[1].timings);
        let ((cfb, cclip, copt), (ffb, _, fopt)) = (c.means(), f.means());
        println!(
            "speedup of fused over candle: clip+optimizer {:.1}x ({:.2} ms -> {:.2} ms), whole step {:.3}x ({:.2} ms -> {:.2} ms)",
            (cclip + copt) / fopt,
            cclip + copt,
            fopt,
            (cfb + cclip + copt) / (ffb + fopt),
            cfb + cclip + copt,
            ffb + fopt
        );
        let (hc, hf) = (
            report::params_sha256(&trainers[0].vars.varmap)?,
            report::params_sha256(&trainers[1].vars.varmap)?,
        );
        println!(
            "params_sha256 candle={hc} fused={hf}: {}",
            if hc == hf {
                "bitwise equal"
            } else {
                "DIFFERENT"
            }
        );
    }
    if let Some(path) = &args.plot {
        let runs: Vec<(String, Vec<(u64, f32)>)> = trainers
            .iter()
            .zip(&losses)
            .map(|(t, l)| {
                (
                    format!("{} ({:?}, clip {:?})", t.name, args.dtype, args.clip),
                    l.clone(),
                )
            })
            .collect();
        report::plot(
            path,
            &runs,
            &format!("llama2-c {:?} on addition: training loss", args.config),
        )?;
        println!("loss plot: {}", path.display());
    }
    let trainer = &trainers[trainers.len() - 1];
    let loss = losses[trainers.len() - 1].last().map_or(f32::NAN, |l| l.1);
    println!(
        "final step={last} loss={loss:.6} params_sha256={}",
        report::params_sha256(&trainer.vars.varmap)?
    );
    Ok(())
}

/// Step times around checkpoints (ms): steps that took one (building it, and saving it unless
/// `--checkpoint-async`), steps while a save was in flight, and the others.
#[derive(Default)]
struct SaveTimes {
    build_ms: Vec<f64>,
    save_ms: Vec<f64>,
    checkpoint_steps_ms: Vec<f64>,
    in_flight_ms: Vec<f64>,
    plain_ms: Vec<f64>,
}

impl SaveTimes {
    fn report(&self, asynchronous: bool) {
        let median = |v: &[f64]| -> String {
            let mut v = v.to_vec();
            v.sort_by(f64::total_cmp);
            match v.get(v.len() / 2) {
                Some(m) => format!("{m:.1} ms ({} steps)", v.len()),
                None => "- (no step)".to_string(),
            }
        };
        println!(
            "checkpoint step times (median): without a save {}, with a save in flight {}, taking a checkpoint {} of which building it {}{}",
            median(&self.plain_ms),
            median(&self.in_flight_ms),
            median(&self.checkpoint_steps_ms),
            median(&self.build_ms),
            if asynchronous {
                " (saved on another thread)".to_string()
            } else {
                format!(" and saving it {}", median(&self.save_ms))
            }
        );
    }
}
