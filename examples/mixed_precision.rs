//! Mixed-precision training with dynamic loss scaling: F32 vars, an F16 forward pass,
//! `GradScaler` + `FusedAdamW` with gradient-norm clipping.
//!
//! ```text
//! cargo run --release --example mixed_precision                 # a few seconds on 2 CPU cores
//! cargo run --release --example mixed_precision -- --help       # flags
//! cargo run --release --features cuda --example mixed_precision -- --device cuda
//! ```
//!
//! The recipe, as PyTorch's automatic mixed precision:
//! 1. the vars (the *master* weights) stay in F32; the forward pass casts them to F16 and computes
//!    in F16; the loss is computed in F32;
//! 2. `scaler.scale(&loss)` multiplies the loss by the scale (2^16 at first) before `backward()`,
//!    so that small F16 gradients do not flush to zero; the vars' gradients come back in F32;
//! 3. `scaler.step(&mut opt, &grads)` divides them by the scale and takes the fused AdamW step
//!    with its clip, unless a gradient overflowed F16's range (65504): then the step is skipped,
//!    on the device, with no host synchronisation;
//! 4. `scaler.update()` halves the scale after an overflow and doubles it after
//!    `growth_interval` clean steps in a row.
//!
//! It prints the loss, the scale and the skipped steps every tenth of the run, and the scale's
//! history as seen at those rows (read back only there: each read is a host synchronisation on
//! CUDA).

use candle_core::{DType, Device, Result, Tensor, D};
use candle_grad_clip::{ClipSetting, FusedAdamW, GradScaler};
use candle_nn::{Init, ParamsAdamW, VarBuilder, VarMap};
use clap::Parser;
use rand::{rngs::StdRng, Rng, SeedableRng};

/// Command-line flags.
#[derive(Parser, Debug)]
#[command(about = "Mixed-precision training with GradScaler + FusedAdamW (candle-grad-clip)")]
struct Args {
    /// Training steps.
    #[arg(long, default_value_t = 600)]
    steps: usize,
    /// Clean steps in a row before the scale doubles.
    #[arg(long, default_value_t = 50)]
    growth_interval: usize,
    /// AdamW learning rate.
    #[arg(long, default_value_t = 3e-3)]
    lr: f64,
    /// Global L2 norm the unscaled gradients are clipped to.
    #[arg(long, default_value_t = 1.0)]
    max_norm: f64,
    /// `cpu`, or `cuda` (needs the `cuda` feature).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Seed of the data and the initialisation.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

const INPUTS: usize = 32;
const HIDDEN: usize = 128;
const BATCH: usize = 256;

fn device_from_name(name: &str) -> Result<Device> {
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

/// A two-layer MLP whose vars are F32 and whose forward pass runs in F16.
struct Mlp {
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
}

impl Mlp {
    /// The vars in `varmap`, the weights uniform in `±sqrt(3 / fan_in)` from `rng` (seeded, so
    /// that runs repeat), the biases zero.
    fn new(varmap: &mut VarMap, rng: &mut StdRng, device: &Device) -> Result<Self> {
        let vb = VarBuilder::from_varmap(varmap, DType::F32, device);
        let model = Self {
            w1: vb.get_with_hints((HIDDEN, INPUTS), "w1", Init::Const(0.0))?,
            b1: vb.get_with_hints(HIDDEN, "b1", Init::Const(0.0))?,
            w2: vb.get_with_hints((1, HIDDEN), "w2", Init::Const(0.0))?,
            b2: vb.get_with_hints(1, "b2", Init::Const(0.0))?,
        };
        for (name, rows, fan_in) in [("w1", HIDDEN, INPUTS), ("w2", 1, HIDDEN)] {
            let bound = (3.0 / fan_in as f32).sqrt();
            let w: Vec<f32> = (0..rows * fan_in)
                .map(|_| rng.gen_range(-bound..bound))
                .collect();
            varmap.set_one(name, Tensor::from_vec(w, (rows, fan_in), device)?)?;
        }
        Ok(model)
    }

    /// The prediction, in F16: each var cast to F16 inside the pass (its gradient comes back to
    /// the F32 var through the cast).
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let half = |t: &Tensor| t.to_dtype(DType::F16);
        let h = x
            .matmul(&half(&self.w1)?.t()?)?
            .broadcast_add(&half(&self.b1)?)?
            .relu()?;
        h.matmul(&half(&self.w2)?.t()?)?
            .broadcast_add(&half(&self.b2)?)
    }
}

/// A batch of a smooth regression target: `y = sin(x · a) + 0.5 · x_0 x_1`.
fn batch(rng: &mut StdRng, a: &[f32], device: &Device) -> Result<(Tensor, Tensor)> {
    let x: Vec<f32> = (0..BATCH * INPUTS)
        .map(|_| rng.gen_range(-1.0..1.0))
        .collect();
    let y: Vec<f32> = x
        .chunks(INPUTS)
        .map(|row| {
            let dot: f32 = row.iter().zip(a).map(|(x, a)| x * a).sum();
            dot.sin() + 0.5 * row[0] * row[1]
        })
        .collect();
    Ok((
        Tensor::from_vec(x, (BATCH, INPUTS), device)?.to_dtype(DType::F16)?,
        Tensor::from_vec(y, (BATCH, 1), device)?,
    ))
}

fn main() -> Result<()> {
    let args = Args::parse();
    let device = device_from_name(&args.device)?;
    let mut rng = StdRng::seed_from_u64(args.seed);
    let a: Vec<f32> = (0..INPUTS).map(|_| rng.gen_range(-1.0..1.0)).collect();

    let mut varmap = VarMap::new();
    let model = Mlp::new(&mut varmap, &mut rng, &device)?;
    let params = ParamsAdamW {
        lr: args.lr,
        ..Default::default()
    };
    let mut opt =
        FusedAdamW::from_varmap(&varmap, params)?.with_clip(ClipSetting::norm(args.max_norm))?;
    let mut scaler = GradScaler::new().with_growth_interval(args.growth_interval);

    println!(
        "MLP {INPUTS}-{HIDDEN}-1, F32 vars, F16 forward pass, batch {BATCH}, {} steps on {:?}",
        args.steps,
        device.location()
    );
    println!(
        "{:>6} {:>12} {:>10} {:>8}",
        "step", "loss", "scale", "skipped"
    );
    let start = std::time::Instant::now();
    let mut history: Vec<(usize, f64)> = vec![(0, scaler.scale_value()?)];
    let mut first_loss = None;
    let mut last_loss = 0.0;
    for step in 1..=args.steps {
        let (x, y) = batch(&mut rng, &a, &device)?;
        // The loss in F32 from the F16 prediction.
        let prediction = model.forward(&x)?.to_dtype(DType::F32)?;
        let loss = (prediction - &y)?.sqr()?.mean(D::Minus1)?.mean_all()?;
        let grads = scaler.scale(&loss)?.backward()?;
        scaler.step(&mut opt, &grads)?;
        scaler.update()?;

        // Reading the loss, the scale and the counters back is for the printout only (one
        // transfer each, on the rows printed).
        if step == 1 || step % (args.steps / 10).max(1) == 0 || step == args.steps {
            let scale = scaler.scale_value()?;
            if scale != history.last().map_or(f64::NAN, |h| h.1) {
                history.push((step, scale));
            }
            let value = loss.to_scalar::<f32>()? as f64;
            first_loss.get_or_insert(value);
            last_loss = value;
            println!(
                "{step:>6} {value:>12.6} {scale:>10} {:>8}",
                opt.skipped_steps()?
            );
        }
    }
    println!(
        "\nloss {:.6} -> {last_loss:.6}; {} steps taken, {} skipped (overflow), {:.1} s",
        first_loss.unwrap_or(f64::NAN),
        opt.steps()?,
        opt.skipped_steps()?,
        start.elapsed().as_secs_f64()
    );
    println!("scale history at the printed rows (step: new scale):");
    let line: Vec<String> = history
        .iter()
        .map(|(step, scale)| format!("{step}: {scale}"))
        .collect();
    println!("  {}", line.join(", "));
    Ok(())
}
