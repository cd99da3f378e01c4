//! A 1000x gradient spike injected into a stable training run, and what each clip does with it.
//!
//! ```sh
//! cargo run --release --example loss_spike              # writes loss_spike.png
//! ```
//!
//! A small MLP learns a fixed teacher network with `FusedAdamW`. At one step the loss is
//! multiplied by 1000 (a bad batch, an overflowing reduction: the gradients come out 1000x
//! larger). Four runs from the same start on the same batches: no clipping, a fixed
//! `clip_grad_norm_` threshold, AutoClip (10th percentile of the norms so far) and ZClip (z-score
//! of an EMA of the norm, its statistics on the device). Without clipping, AdamW's second moment
//! absorbs the spike and every later step is a thousand times too small for thousands of steps:
//! the loss stalls. The clips cut the spike down before the optimizer sees it.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::Result;
use candle_core::{DType, Device, Module, Tensor};
use candle_grad_clip::{AutoClip, ClipSetting, FusedAdamW, ZClip};
use candle_nn::{linear, ops, Linear, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use clap::Parser;
use rand::{rngs::StdRng, Rng, SeedableRng};

#[derive(Parser, Debug)]
#[command(about = "Inject a 1000x gradient spike into a stable run; compare the clips")]
struct Args {
    /// Training steps.
    #[arg(long, default_value_t = 600)]
    steps: usize,
    /// The step whose gradients are multiplied by `--factor`.
    #[arg(long, default_value_t = 300)]
    spike_at: usize,
    /// How much larger the gradients of the spiked step are.
    #[arg(long, default_value_t = 1000.0)]
    factor: f64,
    /// The threshold of the fixed clip.
    #[arg(long, default_value_t = 1.0)]
    max_norm: f64,
    /// Where to draw the losses.
    #[arg(long, default_value = "loss_spike.png")]
    plot: PathBuf,
}

const INPUTS: usize = 32;
const HIDDEN: usize = 128;
const BATCH: usize = 128;

struct Mlp {
    first: Linear,
    second: Linear,
}

impl Mlp {
    fn new(vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            first: linear(INPUTS, HIDDEN, vb.pp("first"))?,
            second: linear(HIDDEN, 1, vb.pp("second"))?,
        })
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.second.forward(&ops::silu(&self.first.forward(x)?)?)
    }
}

/// One run's record.
struct Run {
    label: String,
    losses: Vec<f32>,
    norms: Vec<f32>,
    clipped: u64,
}

fn batches(steps: usize) -> candle_core::Result<Vec<(Tensor, Tensor)>> {
    // The teacher: a fixed random MLP.
    let teacher_map = VarMap::new();
    let teacher = Mlp::new(VarBuilder::from_varmap(
        &teacher_map,
        DType::F32,
        &Device::Cpu,
    ))?;
    let mut rng = StdRng::seed_from_u64(3);
    (0..steps)
        .map(|_| {
            let x: Vec<f32> = (0..BATCH * INPUTS)
                .map(|_| rng.gen_range(-1.0..1.0))
                .collect();
            let x = Tensor::from_vec(x, (BATCH, INPUTS), &Device::Cpu)?;
            let y = teacher.forward(&x)?;
            Ok((x, y))
        })
        .collect()
}

fn train(
    args: &Args,
    data: &[(Tensor, Tensor)],
    start: &HashMap<String, Tensor>,
    label: &str,
    clip: Option<ClipSetting>,
) -> Result<Run> {
    let varmap = VarMap::new();
    let model = Mlp::new(VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu))?;
    // The same start for every run.
    for (name, var) in varmap.data().lock().expect("the VarMap's lock").iter() {
        var.set(&start[name])?;
    }
    let params = ParamsAdamW {
        lr: 3e-3,
        ..Default::default()
    };
    let mut opt = FusedAdamW::from_varmap(&varmap, params)?;
    if let Some(clip) = clip {
        opt = opt.with_clip(clip)?;
    }
    let mut run = Run {
        label: label.to_string(),
        losses: Vec::new(),
        norms: Vec::new(),
        clipped: 0,
    };
    for (step, (x, y)) in data.iter().enumerate() {
        let loss = (model.forward(x)? - y)?.sqr()?.mean_all()?;
        run.losses.push(loss.to_scalar::<f32>()?);
        // The spike: the loss (so every gradient) multiplied by `factor` for one step.
        let scaled = if step == args.spike_at {
            loss.affine(args.factor, 0.0)?
        } else {
            loss
        };
        let grads = scaled.backward()?;
        let norm = candle_grad_clip::total_norm(
            opt.vars(),
            &grads,
            candle_grad_clip::NormType::L2,
            false,
        )?;
        run.norms.push(norm.to_scalar::<f32>()?);
        opt.step(&grads)?;
    }
    run.clipped = opt.clipped_steps()?;
    Ok(run)
}

/// The first step after the spike from which the loss stays within 1.5x of its level before it;
/// `None` if it never does.
fn recovery(run: &Run, spike_at: usize) -> Option<usize> {
    let before = run.losses[spike_at.saturating_sub(20)..spike_at]
        .iter()
        .copied()
        .fold(0f32, f32::max);
    let after = &run.losses[spike_at + 1..];
    (0..after.len())
        .find(|&i| after[i..].iter().all(|&l| l <= 1.5 * before))
        .map(|i| i + 1)
}

fn main() -> Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.spike_at + 20 < args.steps && args.spike_at >= 20,
        "--spike-at must leave 20 steps on each side"
    );
    let data = batches(args.steps)?;
    let start: HashMap<String, Tensor> = {
        let varmap = VarMap::new();
        Mlp::new(VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu))?;
        let vars = varmap.data().lock().expect("the VarMap's lock");
        vars.iter()
            .map(|(name, var)| (name.clone(), var.as_tensor().copy()))
            .map(|(name, t)| Ok((name, t?)))
            .collect::<candle_core::Result<_>>()?
    };
    let runs = [
        train(&args, &data, &start, "no clipping", None)?,
        train(
            &args,
            &data,
            &start,
            &format!("clip_grad_norm to {}", args.max_norm),
            Some(ClipSetting::norm(args.max_norm)),
        )?,
        train(
            &args,
            &data,
            &start,
            "AutoClip (10th percentile)",
            Some(ClipSetting::AutoClip(AutoClip::default())),
        )?,
        train(
            &args,
            &data,
            &start,
            "ZClip (defaults)",
            Some(ClipSetting::ZClip(ZClip::new())),
        )?,
    ];
    let s = args.spike_at;
    println!(
        "{:<28} {:>12} {:>12} {:>12} {:>14} {:>10}",
        "run", "loss before", "worst after", "final loss", "recovered in", "clipped"
    );
    for run in &runs {
        let worst = run.losses[s + 1..].iter().copied().fold(0f32, f32::max);
        let recovered = match recovery(run, s) {
            Some(k) => format!("{k} steps"),
            None => "never".to_string(),
        };
        println!(
            "{:<28} {:>12.3e} {:>12.3e} {:>12.3e} {:>14} {:>10}",
            run.label,
            run.losses[s - 1],
            worst,
            run.losses[args.steps - 1],
            recovered,
            run.clipped
        );
    }
    println!(
        "the spiked step's gradient norm: {:.3e} (the step before: {:.3e})",
        runs[0].norms[s],
        runs[0].norms[s - 1]
    );
    plot(&args, &runs)?;
    println!("plot: {}", args.plot.display());
    Ok(())
}

fn plot(args: &Args, runs: &[Run]) -> Result<()> {
    use plotters::prelude::*;
    plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular())
        .map_err(|_| anyhow::anyhow!("could not load the embedded DejaVu Sans font"))?;
    let root = BitMapBackend::new(&args.plot, (1200, 700)).into_drawing_area();
    root.fill(&WHITE)?;
    let title = format!(
        "A {}x gradient spike at step {} (FusedAdamW, lr 3e-3)",
        args.factor, args.spike_at
    );
    let root = root.titled(&title, ("sans-serif", 22))?;
    let all = runs.iter().flat_map(|r| r.losses.iter().copied());
    let finite: Vec<f64> = all
        .filter(|v| v.is_finite() && *v > 0.0)
        .map(f64::from)
        .collect();
    let lo = finite
        .iter()
        .copied()
        .fold(f64::INFINITY, f64::min)
        .max(1e-9);
    let hi = finite.iter().copied().fold(0f64, f64::max).max(lo * 10.0);
    let mut chart = ChartBuilder::on(&root)
        .margin(14)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0..args.steps, (lo / 1.5..hi * 1.5).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("training loss (MSE, log scale)")
        .y_label_formatter(&|v| format!("{v:.0e}"))
        .label_style(("sans-serif", 15))
        .light_line_style(WHITE.mix(0.0))
        .draw()?;
    let colors = [
        RGBColor(214, 39, 40),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(31, 119, 180),
    ];
    for (run, color) in runs.iter().zip(colors) {
        let points = run
            .losses
            .iter()
            .enumerate()
            .filter(|(_, v)| v.is_finite() && **v > 0.0)
            .map(|(i, v)| (i, f64::from(*v)));
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))?
            .label(run.label.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3))
            });
    }
    chart.draw_series(LineSeries::new(
        [(args.spike_at, lo / 1.5), (args.spike_at, hi * 1.5)],
        BLACK.mix(0.4).stroke_width(1),
    ))?;
    chart
        .configure_series_labels()
        .label_font(("sans-serif", 16))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()?;
    root.present()?;
    Ok(())
}
