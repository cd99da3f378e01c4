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
//! ```
//!
//! `--optimizer candle` is what a candle user writes today: `clip_grad_norm_` (or ZClip's /
//! AGC's functions, or nothing), then `candle_nn::AdamW::step`. `--optimizer fused` is
//! `FusedAdamW` with the clip folded in. The model is `examples/train_lm/model.rs`:
//! candle-transformers' `llama2_c` with its RMSNorm made differentiable (see there why).
//! The last line is `final step=N loss=L params_sha256=H`.

#[path = "train_lm/data.rs"]
mod data;
#[path = "train_lm/model.rs"]
mod model;
#[path = "train_lm/report.rs"]
mod report;
#[path = "train_lm/vars.rs"]
mod vars;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor, Var, D};
use candle_grad_clip::{
    adaptive_clip_grad_, clip_grad_norm_, ClipSetting, FusedAdamW, GradScaler, TrainingCheckpoint,
    ZClip, AGC_DEFAULT_EPS,
};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder};
use clap::{Parser, ValueEnum};

use data::{Corpus, Loader};
use model::{Cache, Config, Llama};
use report::Timings;
use vars::TrainVars;

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
    /// Continue from `--checkpoint` if the file exists.
    #[arg(long)]
    resume: bool,
    /// One line every N steps instead of a progress bar.
    #[arg(long)]
    log_every: Option<u64>,
    /// Draw the loss against the step into this PNG.
    #[arg(long)]
    plot: Option<PathBuf>,
}

impl Args {
    /// What a resumed run must share with the saved one.
    fn run_key(&self) -> String {
        format!(
            "config={:?} batch={} seq_len={} lr={:?} optimizer={:?} clip={:?} max_norm={:?} dtype={:?} digits={} seed={} untied={}",
            self.config, self.batch, self.seq_len, self.lr, self.optimizer, self.clip,
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

/// The optimizer side of a trainer.
enum Opt {
    /// What a candle user writes today: the crate's clip functions, then `AdamW::step`.
    Candle {
        opt: AdamW,
        vars: Vec<Var>,
        zclip: Option<ZClip>,
    },
    Fused(Box<FusedAdamW>),
}

/// One model, its optimizer and (F16) its GradScaler.
struct Trainer {
    name: &'static str,
    vars: TrainVars,
    opt: Opt,
    scaler: Option<GradScaler>,
    cache: Cache,
    cfg: Config,
    dtype: DType,
    device: Device,
    clip: Clip,
    max_norm: f64,
    timings: Timings,
    /// (step, scale) each time the scale changed, and the steps skipped (overflow).
    scale_history: Vec<(u64, f64)>,
    skipped: u64,
}

impl Trainer {
    fn new(args: &Args, kind: OptimizerKind, device: &Device) -> anyhow::Result<Self> {
        let cfg = args.model_config();
        let dtype = args.compute_dtype();
        let vars = TrainVars::new(args.seed, cfg.n_layers, !args.untied);
        // Creates every var (seeded initialisation).
        Llama::load(vars.builder(dtype, device), &cfg)?;
        // The rotary tables: computed by candle's Cache (no such vars), in the compute dtype.
        let empty = VarBuilder::from_tensors(Default::default(), DType::F32, device);
        let mut cache = Cache::new(false, &cfg, empty)?;
        cache.cos = cache.cos.to_dtype(dtype)?;
        cache.sin = cache.sin.to_dtype(dtype)?;
        let params = ParamsAdamW {
            lr: args.lr,
            ..Default::default()
        };
        let (name, opt) = match kind {
            OptimizerKind::Candle => {
                let all: Vec<Var> = report::sorted_vars(&vars.varmap)?
                    .into_iter()
                    .map(|(_, v)| v)
                    .collect();
                let zclip = (args.clip == Clip::Zclip).then(ZClip::new);
                (
                    "candle",
                    Opt::Candle {
                        opt: AdamW::new(all.clone(), params)?,
                        vars: all,
                        zclip,
                    },
                )
            }
            _ => {
                let mut opt = FusedAdamW::from_varmap(&vars.varmap, params)?;
                if let Some(clip) = args.clip_setting() {
                    opt = opt.with_clip(clip)?;
                }
                ("fused", Opt::Fused(Box::new(opt)))
            }
        };
        let scaler = (args.dtype == Precision::F16).then(GradScaler::new);
        Ok(Self {
            name,
            vars,
            opt,
            scaler,
            cache,
            cfg,
            dtype,
            device: device.clone(),
            clip: args.clip,
            max_norm: args.max_norm,
            timings: Timings::default(),
            scale_history: Vec::new(),
            skipped: 0,
        })
    }

    fn model(&self) -> candle_core::Result<Llama> {
        Llama::load(self.vars.builder(self.dtype, &self.device), &self.cfg)
    }

    fn ms_since(&self, t: Instant) -> candle_core::Result<f64> {
        self.device.synchronize()?;
        Ok(t.elapsed().as_secs_f64() * 1e3)
    }

    /// One training step (`step` is its 1-based number); returns the loss.
    fn step(&mut self, step: u64, inputs: &Tensor, targets: &Tensor) -> anyhow::Result<f32> {
        let t = Instant::now();
        let model = self.model()?;
        let logits = model.forward(inputs, 0, &mut self.cache)?;
        let loss = candle_nn::loss::cross_entropy(&logits.flatten_to(1)?, &targets.flatten_all()?)?;
        let mut grads = match &self.scaler {
            Some(scaler) => scaler.scale(&loss)?.backward()?,
            None => loss.backward()?,
        };
        let fb = self.ms_since(t)?;
        let (clip_ms, opt_ms) = match &mut self.opt {
            Opt::Candle { opt, vars, zclip } => {
                let t = Instant::now();
                if let Some(scaler) = &mut self.scaler {
                    scaler.unscale_(vars, &mut grads)?;
                }
                match (self.clip, zclip) {
                    (Clip::None, _) => {}
                    (Clip::Norm, _) => {
                        clip_grad_norm_(vars, &mut grads, self.max_norm)?;
                    }
                    (Clip::Zclip, Some(z)) => {
                        z.clip_(vars, &mut grads)?;
                    }
                    (Clip::Zclip, None) => bail!("internal error: ZClip without its state"),
                    (Clip::Agc, _) => {
                        adaptive_clip_grad_(vars, &mut grads, AGC_CLIPPING, AGC_DEFAULT_EPS)?;
                    }
                }
                self.device.synchronize()?;
                let clip_ms = t.elapsed().as_secs_f64() * 1e3;
                let t = Instant::now();
                match &mut self.scaler {
                    Some(scaler) => {
                        scaler.step(opt, &grads)?;
                        scaler.update()?;
                    }
                    None => opt.step(&grads)?,
                }
                (clip_ms, self.ms_since(t)?)
            }
            Opt::Fused(opt) => {
                let t = Instant::now();
                match &mut self.scaler {
                    Some(scaler) => {
                        scaler.step(opt.as_mut(), &grads)?;
                        scaler.update()?;
                    }
                    None => opt.step(&grads)?,
                }
                (f64::NAN, self.ms_since(t)?)
            }
        };
        self.timings.forward_backward.push(fb);
        self.timings.clip.push(clip_ms);
        self.timings.optimizer.push(opt_ms);
        if let Some(scaler) = &self.scaler {
            let scale = scaler.scale_value()?;
            match self.scale_history.last() {
                Some(&(_, last)) if last == scale => {}
                Some(&(_, last)) => {
                    if scale < last {
                        self.skipped += 1;
                    }
                    self.scale_history.push((step, scale));
                }
                None => self.scale_history.push((step, scale)),
            }
        }
        Ok(loss.to_scalar::<f32>()?)
    }

    /// Exact-match accuracy on held-out problems: every answer byte (and the newline) is the
    /// model's top choice given the prompt and the answer so far, i.e. greedy decoding after the
    /// prompt writes exactly the answer.
    /// Also returns the fraction of answer bytes predicted right (teacher-forced).
    fn accuracy(&mut self, problems: &[(String, String)]) -> anyhow::Result<(f64, f64)> {
        let model = self.model()?;
        let (mut correct, mut bytes, mut bytes_right) = (0usize, 0usize, 0usize);
        for chunk in problems.chunks(128) {
            let width = chunk
                .iter()
                .map(|(p, a)| p.len() + a.len())
                .max()
                .unwrap_or(1);
            let mut ids = Vec::with_capacity(chunk.len() * width);
            for (p, a) in chunk {
                let mut line: Vec<u32> = p.bytes().chain(a.bytes()).map(u32::from).collect();
                line.resize(width, u32::from(b'\n'));
                ids.extend(line);
            }
            let input = Tensor::from_vec(ids.clone(), (chunk.len(), width), &self.device)?;
            let predicted = model
                .forward(&input, 0, &mut self.cache)?
                .argmax(D::Minus1)?
                .to_vec2::<u32>()?;
            for (row, (p, a)) in chunk.iter().enumerate() {
                let right = (p.len()..p.len() + a.len())
                    .filter(|&i| predicted[row][i - 1] == ids[row * width + i])
                    .count();
                correct += usize::from(right == a.len());
                (bytes, bytes_right) = (bytes + a.len(), bytes_right + right);
            }
        }
        Ok((
            correct as f64 / problems.len().max(1) as f64,
            bytes_right as f64 / bytes.max(1) as f64,
        ))
    }

    fn summary(&self, args: &Args, first: u64, last: u64, accuracy: (f64, f64)) {
        let (fb, clip, opt) = self.timings.means();
        let tokens_per_step = (args.batch * args.seq_len) as f64;
        let clip_text = if clip.is_nan() {
            "folded into the optimizer step".to_string()
        } else {
            format!("{clip:.2} ms")
        };
        let clip_opt = if clip.is_nan() { opt } else { clip + opt };
        println!(
            "[{}] steps {}..{}: {:.0} tokens/s (training steps only); mean per step: forward+backward {fb:.2} ms, clip {clip_text}, optimizer {opt:.2} ms (clip+optimizer {clip_opt:.2} ms, whole step {:.2} ms)",
            self.name,
            first + 1,
            last,
            tokens_per_step / ((fb + clip_opt) / 1e3).max(1e-9),
            fb + clip_opt
        );
        println!(
            "[{}] held-out exact match: {:.1}% of {} problems ({:.1}% of the answer bytes right)",
            self.name,
            accuracy.0 * 100.0,
            args.eval_size,
            accuracy.1 * 100.0
        );
        if self.scaler.is_some() {
            let history: Vec<String> = self
                .scale_history
                .iter()
                .map(|(s, v)| format!("{v} (step {s})"))
                .collect();
            println!(
                "[{}] GradScaler: scale history {}; skipped steps (overflow): {}",
                self.name,
                history.join(" -> "),
                self.skipped
            );
        }
    }
}

fn checkpoint_of(
    trainer: &Trainer,
    args: &Args,
    step: u64,
    position: u64,
    losses: &[(u64, f32)],
) -> anyhow::Result<TrainingCheckpoint> {
    let Opt::Fused(opt) = &trainer.opt else {
        bail!("internal error: a checkpoint needs the fused optimizer")
    };
    let mut ck =
        TrainingCheckpoint::new(&trainer.vars.varmap, step)?.with_optimizer(opt.as_ref())?;
    if let Some(scaler) = &trainer.scaler {
        ck = ck.with_grad_scaler(scaler)?;
    }
    let losses: Vec<String> = losses
        .iter()
        .map(|(s, l)| format!("{s}:{:08x}", l.to_bits()))
        .collect();
    Ok(ck
        .with_metadata("run", args.run_key())
        .with_metadata("seed", args.seed.to_string())
        .with_metadata("data_position", position.to_string())
        .with_metadata("losses", losses.join(","))
        .with_metadata("skipped", format!("{}", trainer.skipped))
        .with_metadata(
            "scale_history",
            trainer
                .scale_history
                .iter()
                .map(|(s, v)| format!("{s}:{v}"))
                .collect::<Vec<_>>()
                .join(","),
        ))
}

/// (step, loss) of every step.
type LossHistory = Vec<(u64, f32)>;

/// Restores a checkpoint into `trainer`; returns (step, data position, losses).
fn resume(
    trainer: &mut Trainer,
    args: &Args,
    ck: &TrainingCheckpoint,
) -> anyhow::Result<(u64, u64, LossHistory)> {
    let saved = ck.metadata("run").unwrap_or("");
    if saved != args.run_key() {
        bail!(
            "the checkpoint is of another run:\n  saved: {saved}\n  now:   {}",
            args.run_key()
        )
    }
    let Opt::Fused(opt) = &mut trainer.opt else {
        bail!("internal error: resume needs the fused optimizer")
    };
    let restore = ck.restore(&trainer.vars.varmap).optimizer(opt.as_mut());
    match &mut trainer.scaler {
        Some(scaler) => restore.grad_scaler(scaler).apply()?,
        None => restore.apply()?,
    }
    let position = ck
        .metadata("data_position")
        .and_then(|p| p.parse().ok())
        .context("the checkpoint has no data position")?;
    let mut losses = Vec::new();
    for item in ck
        .metadata("losses")
        .unwrap_or("")
        .split(',')
        .filter(|s| !s.is_empty())
    {
        let (s, bits) = item.split_once(':').context("malformed loss history")?;
        losses.push((s.parse()?, f32::from_bits(u32::from_str_radix(bits, 16)?)));
    }
    trainer.skipped = ck
        .metadata("skipped")
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    for item in ck
        .metadata("scale_history")
        .unwrap_or("")
        .split(',')
        .filter(|s| !s.is_empty())
    {
        let (s, v) = item.split_once(':').context("malformed scale history")?;
        trainer.scale_history.push((s.parse()?, v.parse()?));
    }
    Ok((ck.step(), position, losses))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.checkpoint.is_some() && args.optimizer != OptimizerKind::Fused {
        bail!(
            "--checkpoint needs --optimizer fused: candle_nn::AdamW keeps its moments private, so its state cannot be saved, and a resume without them would not be the same run"
        )
    }
    if args.resume && args.checkpoint.is_none() {
        bail!("--resume needs --checkpoint PATH")
    }
    if args.checkpoint_every == 0 {
        bail!("--checkpoint-every must be at least 1")
    }
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
        "llama2-c {:?} (vocabulary 256 bytes{}): {n_params} parameters in {n_tensors} tensors; batch {} x {} tokens; {:?} forward; optimizer {:?}, clip {:?}",
        args.config,
        if args.untied { "" } else { ", tied embeddings" },
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
    for step in first + 1..=args.steps {
        let (inputs, targets) = loader.next_batch(args.batch, args.seq_len);
        let inputs = Tensor::from_vec(inputs, (args.batch, args.seq_len), &device)?;
        let targets = Tensor::from_vec(targets, (args.batch, args.seq_len), &device)?;
        // Interleaved: the order alternates, so neither optimizer always runs on a warm cache.
        let n = trainers.len();
        for k in 0..n {
            let i = if step % 2 == 0 { k } else { n - 1 - k };
            let loss = trainers[i].step(step, &inputs, &targets)?;
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
        if let Some(path) = &args.checkpoint {
            if step % args.checkpoint_every == 0 {
                checkpoint_of(&trainers[0], &args, step, loader.position, &losses[0])?
                    .save(path)
                    .with_context(|| format!("saving {}", path.display()))?;
            }
        }
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }

    let problems = corpus.held_out_problems(args.eval_size);
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
