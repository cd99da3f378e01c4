//! Exploding gradients in a recurrent network, and how gradient-norm clipping tames them.
//!
//! ```text
//! cargo run --release --example exploding_rnn            # about 20 s on 2 CPU cores
//! cargo run --release --example exploding_rnn -- --help  # flags
//! cargo run --release --features cuda --example exploding_rnn -- --device cuda
//! ```
//!
//! 1. **The mechanism.** Backpropagation through time multiplies the gradient by the recurrent
//!    matrix once per step, so its norm grows or shrinks like `ρ^T`. For a linear RNN whose
//!    recurrent matrix is `ρ Q` with `Q` orthogonal (all singular values equal `ρ`) the growth
//!    is exactly `ρ^T`; candle's autograd measures it.
//! 2. **The cure.** A vanilla tanh RNN learns the adding problem (Hochreiter & Schmidhuber 1997;
//!    Pascanu, Mikolov & Bengio 2013) twice, from the same seed, initialisation and batches:
//!    plain SGD, and the same SGD wrapped in `Clipped` (global-norm clipping). It prints a table
//!    and draws loss and gradient norm per step into a PNG.
//!
//! The training code is in functions that `tests/optim/training/` also runs.

use std::path::Path;

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_grad_clip::{
    grad_norms, total_norm, ClipSetting, Clipped, ClippedConfig, FusedAdamW, GradNormStats,
    NormType,
};
use candle_nn::{AdamW, Init, Optimizer, ParamsAdamW, VarBuilder, VarMap, SGD};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use rand::{rngs::StdRng, Rng, SeedableRng};
use rand_distr::StandardNormal;

/// Command-line flags.
#[derive(Parser, Debug, Clone)]
#[command(about = "Exploding gradients in an RNN, and gradient-norm clipping (candle-grad-clip)")]
pub struct Args {
    /// Sequence length of the adding problem.
    #[arg(long, default_value_t = 30)]
    pub seq_len: usize,
    /// Training steps of each run.
    #[arg(long, default_value_t = 3000)]
    pub steps: usize,
    /// SGD learning rate (the same for both runs).
    #[arg(long, default_value_t = 0.1)]
    pub lr: f64,
    /// Global L2 norm to clip the gradients to, in the clipped run.
    #[arg(long, default_value_t = 0.3)]
    pub max_norm: f64,
    /// Spectral radius of the initial recurrent matrix (a scaled random orthogonal matrix).
    #[arg(long, default_value_t = 2.0)]
    pub radius: f64,
    /// Standard deviation of the initial input weights.
    #[arg(long, default_value_t = 1.0)]
    pub input_scale: f64,
    /// Hidden units.
    #[arg(long, default_value_t = 32)]
    pub hidden: usize,
    /// Sequences per batch.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Seed for the initial weights and the data.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// `cpu`, or `cuda` (needs the `cuda` feature).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Where to write the plot.
    #[arg(long, default_value = "exploding_rnn.png")]
    pub output: String,
}

/// Settings of one training run.
#[derive(Debug, Clone)]
pub struct TrainConfig {
    pub seq_len: usize,
    pub steps: usize,
    pub lr: f64,
    pub radius: f64,
    pub input_scale: f64,
    pub hidden: usize,
    pub batch: usize,
    pub seed: u64,
}

impl From<&Args> for TrainConfig {
    fn from(args: &Args) -> Self {
        Self {
            seq_len: args.seq_len,
            steps: args.steps,
            lr: args.lr,
            radius: args.radius,
            input_scale: args.input_scale,
            hidden: args.hidden,
            batch: args.batch,
            seed: args.seed,
        }
    }
}

/// What one run did, step by step.
#[derive(Debug, Clone, Default)]
pub struct RunLog {
    /// Training loss (MSE) of each step's batch, before the update.
    pub losses: Vec<f32>,
    /// Global L2 gradient norm of each step, before clipping.
    pub norms: Vec<f32>,
    /// Global L2 gradient norm of each step before clipping, computed with candle's own ops in
    /// `f64` ([`l2_norm_with_candle_ops`]): an independent check of `norms`.
    pub norms_check: Vec<f64>,
    /// Global L2 gradient norm of each step after clipping (what the optimizer used), computed
    /// with candle's own ops in `f64`, not with this crate.
    pub norms_after: Vec<f64>,
    /// Steps where clipping changed the gradients (from `Clipped::clipped_steps`).
    pub clipped_steps: u64,
    /// The first step whose loss or gradient was NaN or infinite; training stops there.
    pub diverged_at: Option<usize>,
    /// Per-layer gradient norms (`grad_norms`) at the step with the largest gradient norm.
    pub layers_at_max: Vec<(String, f32)>,
    /// Per-layer gradient norms (`grad_norms`) at the first step.
    pub layers_first: Vec<(String, f32)>,
}

impl RunLog {
    pub fn final_loss(&self) -> f32 {
        self.losses.last().copied().unwrap_or(f32::NAN)
    }

    pub fn best_loss(&self) -> f32 {
        self.losses
            .iter()
            .copied()
            .filter(|l| l.is_finite())
            .fold(f32::INFINITY, f32::min)
    }

    pub fn max_norm(&self) -> f32 {
        self.norms.iter().copied().fold(0.0, |a, b| {
            if b.is_nan() || a.is_nan() {
                f32::NAN
            } else {
                a.max(b)
            }
        })
    }

    /// Mean loss of the last `n` steps (the training loss is noisy from batch to batch).
    pub fn tail_loss(&self, n: usize) -> f32 {
        let tail = &self.losses[self.losses.len().saturating_sub(n)..];
        tail.iter().sum::<f32>() / tail.len().max(1) as f32
    }
}

/// The device named by `--device`.
pub fn device_from_name(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        #[cfg(feature = "cuda")]
        "cuda" => Device::new_cuda(0),
        #[cfg(not(feature = "cuda"))]
        "cuda" => {
            candle_core::bail!("this example was built without CUDA: run it with `--features cuda`")
        }
        other => candle_core::bail!("unknown device {other:?}: use cpu or cuda"),
    }
}

/// An `n × n` random orthogonal matrix (Gram–Schmidt on a Gaussian matrix, in `f64`), row-major.
pub fn random_orthogonal(n: usize, rng: &mut StdRng) -> Vec<f64> {
    let mut q: Vec<Vec<f64>> = Vec::with_capacity(n);
    while q.len() < n {
        let mut v: Vec<f64> = (0..n).map(|_| rng.sample(StandardNormal)).collect();
        // Twice is enough (Giraud et al.): re-orthogonalise against rounding.
        for _ in 0..2 {
            for u in &q {
                let dot: f64 = u.iter().zip(&v).map(|(a, b)| a * b).sum();
                v.iter_mut().zip(u).for_each(|(x, a)| *x -= dot * a);
            }
        }
        let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        if norm > 1e-6 {
            q.push(v.into_iter().map(|x| x / norm).collect());
        }
    }
    q.into_iter().flatten().collect()
}

fn gaussian(n: usize, std: f64, rng: &mut StdRng) -> Vec<f32> {
    (0..n)
        .map(|_| (std * rng.sample::<f64, _>(StandardNormal)) as f32)
        .collect()
}

/// Part 1: `‖∂L/∂h₀‖` for the linear RNN `h_t = h_{t-1} W`, `W = ρ Q`, `L = ⟨h_T, u⟩` with
/// `‖u‖ = 1`, computed with candle's autograd. Exactly `ρ^T` in exact arithmetic.
pub fn gradient_growth(
    rho: f64,
    steps: usize,
    hidden: usize,
    seed: u64,
    device: &Device,
) -> Result<f64> {
    let mut rng = StdRng::seed_from_u64(seed);
    let q = random_orthogonal(hidden, &mut rng);
    let w: Vec<f32> = q.iter().map(|x| (rho * x) as f32).collect();
    let w = Tensor::from_vec(w, (hidden, hidden), device)?;
    let h0 = Var::from_tensor(&Tensor::from_vec(
        gaussian(hidden, 1.0, &mut rng),
        (1, hidden),
        device,
    )?)?;
    let u = gaussian(hidden, 1.0, &mut rng);
    let u_norm = u.iter().map(|x| x * x).sum::<f32>().sqrt();
    let u = Tensor::from_vec(u.iter().map(|x| x / u_norm).collect(), (1, hidden), device)?;
    let mut h = h0.as_tensor().clone();
    for _ in 0..steps {
        h = h.matmul(&w)?;
    }
    let loss = (h * u)?.sum_all()?;
    let grads = loss.backward()?;
    let norm = total_norm(std::slice::from_ref(&h0), &grads, NormType::L2, false)?;
    norm.to_dtype(DType::F64)?.to_scalar::<f64>()
}

/// One batch of the adding problem: per step the inputs `(value, marker)` as `seq_len` tensors of
/// shape `(batch, 2)`, and the targets `(batch, 1)`: the sum of the two marked values, one marked
/// in the first half of the sequence and one in the second.
pub fn adding_batch(
    seq_len: usize,
    batch: usize,
    rng: &mut StdRng,
    device: &Device,
) -> Result<(Vec<Tensor>, Tensor)> {
    let mut inputs = vec![vec![0f32; batch * 2]; seq_len];
    let mut targets = vec![0f32; batch];
    let half = (seq_len / 2).max(1);
    for b in 0..batch {
        let first = rng.gen_range(0..half);
        let second = rng.gen_range(half..seq_len.max(half + 1)).min(seq_len - 1);
        for (t, step) in inputs.iter_mut().enumerate() {
            let value: f32 = rng.gen();
            step[2 * b] = value;
            if t == first || t == second {
                step[2 * b + 1] = 1.0;
                targets[b] += value;
            }
        }
    }
    let inputs = inputs
        .into_iter()
        .map(|x| Tensor::from_vec(x, (batch, 2), device))
        .collect::<Result<Vec<_>>>()?;
    Ok((inputs, Tensor::from_vec(targets, (batch, 1), device)?))
}

/// The vanilla tanh RNN `h_t = tanh(x_t W_x + h_{t-1} W_h + b)`, read out as `y = h_T w_o + b_o`.
pub struct Rnn {
    w_x: Tensor,
    w_h: Tensor,
    b: Tensor,
    w_o: Tensor,
    b_o: Tensor,
    hidden: usize,
}

impl Rnn {
    /// Builds the RNN in `varmap` with seeded initial weights: `W_h = radius · Q`, `Q` random
    /// orthogonal; `W_x`, `w_o` Gaussian; biases zero. The same seed gives the same weights.
    pub fn new(varmap: &VarMap, cfg: &TrainConfig, device: &Device) -> Result<Self> {
        let h = cfg.hidden;
        let mut rng = StdRng::seed_from_u64(cfg.seed);
        let w_h: Vec<f32> = random_orthogonal(h, &mut rng)
            .iter()
            .map(|x| (cfg.radius * x) as f32)
            .collect();
        let w_x = gaussian(2 * h, cfg.input_scale, &mut rng);
        let w_o = gaussian(h, 1.0 / (h as f64).sqrt(), &mut rng);
        let mut varmap = varmap.clone();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
        let rnn = Self {
            w_x: vb.get_with_hints((2, h), "rnn.w_x", Init::Const(0.))?,
            w_h: vb.get_with_hints((h, h), "rnn.w_h", Init::Const(0.))?,
            b: vb.get_with_hints(h, "rnn.b", Init::Const(0.))?,
            w_o: vb.get_with_hints((h, 1), "out.w", Init::Const(0.))?,
            b_o: vb.get_with_hints(1, "out.b", Init::Const(0.))?,
            hidden: h,
        };
        varmap.set_one("rnn.w_h", Tensor::from_vec(w_h, (h, h), device)?)?;
        varmap.set_one("rnn.w_x", Tensor::from_vec(w_x, (2, h), device)?)?;
        varmap.set_one("out.w", Tensor::from_vec(w_o, (h, 1), device)?)?;
        Ok(rnn)
    }

    /// The prediction `(batch, 1)` for the inputs of [`adding_batch`].
    pub fn forward(&self, inputs: &[Tensor]) -> Result<Tensor> {
        let batch = inputs.first().map_or(1, |x| x.dim(0).unwrap_or(1));
        let device = self.w_h.device();
        let mut h = Tensor::zeros((batch, self.hidden), DType::F32, device)?;
        for x in inputs {
            let pre = (x.matmul(&self.w_x)? + h.matmul(&self.w_h)?)?;
            h = pre.broadcast_add(&self.b)?.tanh()?;
        }
        h.matmul(&self.w_o)?.broadcast_add(&self.b_o)
    }
}

/// The global L2 norm of the gradients of `vars` with candle's own ops, accumulated in `f64`:
/// `sqrt(Σ g²)` over every element. Independent of this crate, for checking it.
pub fn l2_norm_with_candle_ops(
    vars: &[Var],
    grads: &candle_core::backprop::GradStore,
) -> Result<f64> {
    let mut sum = 0f64;
    for var in vars {
        if let Some(g) = grads.get(var) {
            sum += g
                .to_dtype(DType::F64)?
                .sqr()?
                .sum_all()?
                .to_scalar::<f64>()?;
        }
    }
    Ok(sum.sqrt())
}

/// Part 3: the time of one optimizer step with the clip, the recommended fused loop against
/// candle's `AdamW` behind `Clipped`, on the RNN's parameters and one batch's gradients; medians
/// of interleaved steps, in seconds.
pub fn step_times(cfg: &TrainConfig, max_norm: f64, device: &Device) -> Result<(f64, f64)> {
    let varmap = VarMap::new();
    let rnn = Rnn::new(&varmap, cfg, device)?;
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let (inputs, targets) = adding_batch(cfg.seq_len, cfg.batch, &mut rng, device)?;
    let grads = (rnn.forward(&inputs)? - &targets)?
        .sqr()?
        .mean_all()?
        .backward()?;
    let params = ParamsAdamW::default();
    let mut fused =
        FusedAdamW::from_varmap(&varmap, params.clone())?.with_clip(ClipSetting::norm(max_norm))?;
    let config = ClippedConfig::new(params, ClipSetting::norm(max_norm));
    let mut candle = Clipped::<AdamW>::new(varmap.all_vars(), config)?;
    let (mut a, mut b) = (Vec::new(), Vec::new());
    // Both clip on every round: `FusedAdamW` never writes `grads`, and `Clipped` scales them in
    // place to a norm of `max_norm * n / (n + 1e-6)`, which still exceeds `max_norm - 1e-6`, so
    // its coefficient stays below 1 and every round writes the scaled gradients again.
    for round in 0..320 {
        let t = std::time::Instant::now();
        fused.step(&grads)?;
        device.synchronize()?;
        let fused_time = t.elapsed().as_secs_f64();
        let t = std::time::Instant::now();
        candle.step(&grads)?;
        device.synchronize()?;
        let candle_time = t.elapsed().as_secs_f64();
        if round >= 20 {
            a.push(fused_time);
            b.push(candle_time);
        }
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    Ok((median(a), median(b)))
}

/// Part 2: trains the RNN on the adding problem with SGD, clipping the global L2 gradient norm to
/// `max_norm` (`None`: no clipping). Same `cfg` → same initial weights and same batches.
pub fn train(
    cfg: &TrainConfig,
    max_norm: Option<f64>,
    device: &Device,
    progress: &ProgressBar,
) -> Result<RunLog> {
    let varmap = VarMap::new();
    let rnn = Rnn::new(&varmap, cfg, device)?;
    let vars = varmap.all_vars();
    // No clipping is an infinite threshold: the same code path, and `Clipped` then steps exactly
    // as the plain SGD does (tests/optim/training/ checks it).
    let clip = ClipSetting::norm(max_norm.unwrap_or(f64::INFINITY));
    let mut opt = Clipped::<SGD>::new(vars.clone(), ClippedConfig::new(cfg.lr, clip))?;
    let mut data_rng = StdRng::seed_from_u64(cfg.seed ^ 0xDA7A);
    let mut log = RunLog::default();
    for step in 0..cfg.steps {
        let (inputs, targets) = adding_batch(cfg.seq_len, cfg.batch, &mut data_rng, device)?;
        let loss = (rnn.forward(&inputs)? - &targets)?.sqr()?.mean_all()?;
        let grads = loss.backward()?;
        let loss = loss.to_scalar::<f32>()?;
        // Per-layer norms, before `step` clips the gradients in place.
        let layers = grad_norms(&varmap, &grads, NormType::L2)?;
        let check = l2_norm_with_candle_ops(&vars, &grads)?;
        opt.step(&grads)?;
        let norm = opt
            .last_norm()
            .map_or(Ok(0.0), |n| n.to_dtype(DType::F32)?.to_scalar::<f32>())?;
        let after = l2_norm_with_candle_ops(&vars, &grads)?;
        if log.norms.is_empty() {
            log.layers_first = layers.clone();
        }
        if log.norms.is_empty() || norm.is_nan() || norm > log.max_norm() {
            log.layers_at_max = layers;
        }
        log.losses.push(loss);
        log.norms.push(norm);
        log.norms_check.push(check);
        log.norms_after.push(after);
        progress.inc(1);
        if !loss.is_finite() || !norm.is_finite() {
            log.diverged_at = Some(step);
            break;
        }
    }
    log.clipped_steps = opt.clipped_steps()?;
    Ok(log)
}

/// Draws loss and gradient norm per step of both runs into a PNG: two panels, log-log axes (the
/// run without clipping may last only a few dozen steps), long runs drawn faint with a 25-step moving
/// average on top. Losses above `1e3` are drawn at the top edge.
pub fn plot(
    path: &Path,
    unclipped: &RunLog,
    clipped: &RunLog,
    max_norm: f64,
    title: &str,
) -> anyhow::Result<()> {
    use plotters::prelude::*;

    // A font compiled into the binary: no system font or font library needed.
    plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular())
        .map_err(|_| anyhow::anyhow!("could not load the embedded DejaVu Sans font"))?;

    let root = BitMapBackend::new(path, (1200, 900)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(title, ("sans-serif", 22))?;
    let (top, bottom) = root.split_vertically(430);
    let steps = unclipped.losses.len().max(clipped.losses.len()).max(2);
    let red = RGBColor(214, 39, 40);
    let blue = RGBColor(31, 119, 180);

    type Series = fn(&RunLog) -> &[f32];
    let panels: [(&DrawingArea<_, _>, &str, Series, f64); 2] = [
        (
            &top,
            "training loss (MSE; values above 1e3 drawn at 1e3)",
            |r| &r.losses,
            1e3,
        ),
        (
            &bottom,
            "global gradient norm before clipping",
            |r| &r.norms,
            f64::INFINITY,
        ),
    ];
    for (i, (area, caption, series, cap)) in panels.into_iter().enumerate() {
        let values = |r: &RunLog| -> Vec<(usize, f64)> {
            series(r)
                .iter()
                .enumerate()
                .filter(|(_, v)| v.is_finite() && **v > 0.0)
                .map(|(s, v)| (s + 1, (*v as f64).min(cap)))
                .collect()
        };
        let all: Vec<f64> = values(unclipped)
            .into_iter()
            .chain(values(clipped))
            .map(|(_, v)| v)
            .collect();
        let lo = all.iter().copied().fold(f64::INFINITY, f64::min).max(1e-12);
        let hi = all.iter().copied().fold(0f64, f64::max).max(lo * 10.0);
        let mut chart = ChartBuilder::on(area)
            .caption(caption, ("sans-serif", 19))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d((1..steps + 1).log_scale(), (lo / 1.5..hi * 1.5).log_scale())?;
        chart
            .configure_mesh()
            .x_desc("step (log scale)")
            .y_desc("log scale")
            .y_label_formatter(&|v| format!("{v:.0e}"))
            .label_style(("sans-serif", 15))
            .light_line_style(WHITE.mix(0.0))
            .draw()?;
        for (run, color, label) in [
            (unclipped, red, "without clipping".to_string()),
            (clipped, blue, format!("clip_grad_norm to {max_norm}")),
        ] {
            // Non-finite values (a diverged step) are left out.
            let points = values(run);
            // Long runs: raw values faint, a trailing 25-step (geometric) moving average on top.
            let line: Vec<(usize, f64)> = if points.len() > 200 {
                chart.draw_series(LineSeries::new(
                    points.iter().copied(),
                    color.mix(0.3).stroke_width(1),
                ))?;
                (0..points.len())
                    .map(|i| {
                        let w = &points[i.saturating_sub(24)..=i];
                        let mean = w.iter().map(|(_, v)| v.ln()).sum::<f64>() / w.len() as f64;
                        (points[i].0, mean.exp())
                    })
                    .collect()
            } else {
                points
            };
            chart
                .draw_series(LineSeries::new(line, color.stroke_width(2)))?
                .label(label)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3))
                });
        }
        if i == 1 {
            chart
                .draw_series(LineSeries::new(
                    [(1, max_norm), (steps, max_norm)],
                    BLACK.stroke_width(1),
                ))?
                .label(format!("max_norm = {max_norm}"))
                .legend(|(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], BLACK.stroke_width(1))
                });
        }
        chart
            .configure_series_labels()
            .label_font(("sans-serif", 16))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperRight)
            .draw()?;
    }
    root.present()?;
    Ok(())
}

fn bar(steps: usize, label: &str) -> ProgressBar {
    let progress = ProgressBar::new(steps as u64);
    if let Ok(style) = ProgressStyle::with_template(
        "{prefix:>18} [{elapsed_precise}] {wide_bar} {pos}/{len} steps ({per_sec})",
    ) {
        progress.set_style(style);
    }
    progress.set_prefix(label.to_string());
    progress
}

/// Median of `values[start..end]` (`end` clamped to the run's length), `None` for no values.
fn median(values: &[f32], start: usize, end: usize) -> Result<Option<f64>> {
    let end = end.min(values.len());
    if start >= end {
        return Ok(None);
    }
    let mut stats = GradNormStats::new();
    for v in &values[start..end] {
        stats.record(&Tensor::new(*v, &Device::Cpu)?)?;
    }
    stats.quantile(0.5).map(Some)
}

/// Prints every number that the README's account of the two runs quotes, so that a reader can
/// check it.
fn narrative(cfg: &TrainConfig, max_norm: f64, unclipped: &RunLog, clipped: &RunLog) -> Result<()> {
    let per_layer = |layers: &[(String, f32)]| -> String {
        let parts: Vec<String> = layers
            .iter()
            .map(|(name, norm)| format!("{name} {norm:.3e}"))
            .collect();
        parts.join(", ")
    };
    println!("What the runs did, step by step (steps count from 0):");
    if let (Some(loss), Some(norm)) = (unclipped.losses.first(), unclipped.norms.first()) {
        println!(
            "- Step 0, both runs: loss {loss:.4}, gradient norm {norm:.3e} (grad_norms: {}).",
            per_layer(&unclipped.layers_first)
        );
        println!(
            "- Without clipping, the first SGD step has length lr * norm = {:.3} in weight space.",
            cfg.lr * *norm as f64
        );
    }
    let first_losses: Vec<String> = unclipped
        .losses
        .iter()
        .take(6)
        .enumerate()
        .map(|(i, l)| format!("{i}: {l:.3e}"))
        .collect();
    println!("  Its loss at steps {}.", first_losses.join(", "));
    // A spike: a gradient norm at least 100 times that of the step before.
    let spikes: Vec<String> = unclipped
        .norms
        .windows(2)
        .enumerate()
        .filter(|(_, w)| w[1] >= 100.0 * w[0])
        .map(|(i, w)| format!("step {} {:.2e}", i + 1, w[1]))
        .collect();
    println!(
        "  Gradient-norm spikes (at least 100x the step before): {}.",
        spikes.join(", ")
    );
    if let Some(step) = unclipped.diverged_at {
        println!(
            "  Step {step}: loss {:.3e}, gradient norm {:.3e}; training stops there.",
            unclipped.losses[step], unclipped.norms[step]
        );
    }
    let largest = unclipped.max_norm();
    if let Some((name, norm)) = unclipped
        .layers_at_max
        .iter()
        .max_by(|a, b| a.1.total_cmp(&b.1))
    {
        let share = (*norm as f64 / largest as f64).powi(2);
        println!(
            "  The largest gradient norm, {largest:.3e}, is {:.1} % in {name} (its share of the squared norm).",
            100.0 * share
        );
    }
    if let Some(norm) = clipped.norms.first() {
        let coefficient = max_norm / (*norm as f64 + 1e-6);
        println!(
            "- With clipping, the first gradient is scaled by max_norm / (norm + 1e-6) = {coefficient:.4e} \
             (1/{:.1}); every step has length at most lr * max_norm = {:.3}.",
            1.0 / coefficient,
            cfg.lr * max_norm
        );
    }
    let mut medians = Vec::new();
    for (start, end) in [(0, 100), (100, 300), (300, 1000), (1000, cfg.steps)] {
        if let Some(m) = median(&clipped.norms, start, end)? {
            let last = end.min(clipped.norms.len()) - 1;
            medians.push(format!("steps {start}-{last}: {m:.3}"));
        }
    }
    println!(
        "  Median gradient norm before clipping, {}.",
        medians.join("; ")
    );
    Ok(())
}

fn yes_no(log: &RunLog) -> String {
    match log.diverged_at {
        Some(step) => format!("yes, NaN/inf at step {step}"),
        None => "no".to_string(),
    }
}

pub fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let device = device_from_name(&args.device)?;
    let cfg = TrainConfig::from(&args);

    println!("1. The mechanism: backpropagation through time multiplies the gradient by the");
    println!(
        "   recurrent matrix once per step. Linear RNN, W = rho * (random orthogonal), {} units:",
        16
    );
    println!();
    println!(
        "   {:>5} {:>4} {:>16} {:>16}",
        "rho", "T", "|dL/dh0| (autograd)", "rho^T"
    );
    for rho in [0.9, 1.0, 1.1] {
        for steps in [10, 20, 30, 50] {
            let measured = gradient_growth(rho, steps, 16, args.seed, &device)?;
            println!(
                "   {rho:>5.1} {steps:>4} {measured:>19.4e} {:>16.4e}",
                rho.powi(steps as i32)
            );
        }
    }
    println!();
    println!(
        "2. The cure: vanilla tanh RNN, {} units, on the adding problem (T = {}), SGD lr = {},",
        cfg.hidden, cfg.seq_len, cfg.lr
    );
    println!(
        "   recurrent matrix initialised with spectral radius {}, batch {}, {} steps, seed {}.",
        cfg.radius, cfg.batch, cfg.steps, cfg.seed
    );
    println!("   Predicting the mean (1.0) gives MSE 1/6 = 0.167.");
    println!();

    let progress = bar(cfg.steps, "without clipping");
    let unclipped = train(&cfg, None, &device, &progress)?;
    progress.finish();
    let progress = bar(cfg.steps, "clipped");
    let clipped = train(&cfg, Some(args.max_norm), &device, &progress)?;
    progress.finish();

    println!();
    println!(
        "| run | final loss (mean of last 50 steps) | best loss | largest gradient norm | steps clipped | diverged |"
    );
    println!("|---|---|---|---|---|---|");
    for (name, log) in [
        ("without clipping".to_string(), &unclipped),
        (format!("clip_grad_norm {}", args.max_norm), &clipped),
    ] {
        println!(
            "| {name} | {:.4} | {:.4} | {:.3e} | {} / {} | {} |",
            log.tail_loss(50),
            log.best_loss(),
            log.max_norm(),
            log.clipped_steps,
            log.losses.len(),
            yes_no(log)
        );
    }

    println!();
    for (name, log) in [("without clipping", &unclipped), ("clipped", &clipped)] {
        // GradNormStats keeps the norms and reads them only when asked (here: already on the host).
        let mut stats = GradNormStats::new();
        for norm in &log.norms {
            stats.record(&Tensor::new(*norm, &Device::Cpu)?)?;
        }
        println!(
            "Gradient norms before clipping, {name}: median {:.3e}, 90th percentile {:.3e}, max {:.3e}",
            stats.quantile(0.5)?,
            stats.quantile(0.9)?,
            stats.max()?,
        );
    }
    let layers: Vec<String> = unclipped
        .layers_at_max
        .iter()
        .map(|(name, norm)| format!("{name} {norm:.2e}"))
        .collect();
    println!(
        "Per-layer gradient norms at the largest step without clipping (grad_norms): {}",
        layers.join(", ")
    );
    println!();
    narrative(&cfg, args.max_norm, &unclipped, &clipped)?;
    println!();
    let (fused, candle) = step_times(&cfg, args.max_norm, &device)?;
    println!(
        "3. The step itself, on this RNN's parameters and one batch's gradients (median of 300):"
    );
    println!(
        "   FusedAdamW::from_varmap(..)?.with_clip(ClipSetting::norm({})): {:.1} us per step",
        args.max_norm,
        fused * 1e6
    );
    println!(
        "   candle_nn::AdamW behind Clipped (clip_grad_norm_, then AdamW::step): {:.1} us per step ({:.1}x)",
        candle * 1e6,
        candle / fused
    );
    println!();

    let title = format!(
        "tanh RNN on the adding problem, T = {}, SGD lr = {}, initial spectral radius {}",
        cfg.seq_len, cfg.lr, cfg.radius
    );
    plot(
        Path::new(&args.output),
        &unclipped,
        &clipped,
        args.max_norm,
        &title,
    )?;
    println!("Plot written to {}", args.output);
    Ok(())
}
