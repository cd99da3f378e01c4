//! One model, its optimizer and (F16) its GradScaler: a training step as a candle user writes it
//! (`--optimizer candle`) or with `FusedAdamW` (`--optimizer fused`), timed phase by phase, and
//! the held-out accuracy.

use std::time::Instant;

use anyhow::bail;
use candle_core::{backprop::GradStore, DType, Device, Tensor, Var, D};
use candle_grad_clip::{
    adaptive_clip_grad_, clip_grad_norm_, ClipSetting, FusedAdamW, GradAccumulator, GradScaler,
    ZClip,
};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder};

use super::model::{Cache, Config, Llama};
use super::report::{self, Timings};
use super::vars::TrainVars;
use super::{Args, Clip, OptimizerKind, Precision, AGC_CLIPPING};

/// The optimizer side of a trainer.
pub enum Opt {
    /// What a candle user writes today: the crate's clip functions, then `AdamW::step`.
    Candle {
        opt: AdamW,
        vars: Vec<Var>,
        zclip: Option<ZClip>,
    },
    Fused(Box<FusedAdamW>),
}

/// One model, its optimizer and (F16) its GradScaler.
pub struct Trainer {
    pub name: &'static str,
    pub vars: TrainVars,
    pub opt: Opt,
    pub scaler: Option<GradScaler>,
    pub cache: Cache,
    pub cfg: Config,
    pub dtype: DType,
    pub device: Device,
    pub clip: Clip,
    pub max_norm: f64,
    pub timings: Timings,
    /// (step, scale) each time the scale changed, and the steps skipped (overflow).
    pub scale_history: Vec<(u64, f64)>,
    pub skipped: u64,
    /// Back-offs of the scale at consecutive steps (a warning at [`BACKOFFS_WARNING`]; not in
    /// checkpoints: a resumed run counts afresh).
    backoffs_in_a_row: u64,
    /// The scaler's scale before its first step (a back-off at step 1 is one too).
    initial_scale: f64,
    /// The fused optimizer's micro-batch sums (`--accumulate N`, N > 1).
    accumulator: Option<GradAccumulator>,
}

/// What a candle user writes to accumulate: `acc = (acc + g)?` per var, from zeros (so that it is
/// `GradAccumulator::add`'s definition, -0.0 included).
fn candle_sum(
    vars: &[Var],
    mut acc: GradStore,
    grads: &GradStore,
) -> candle_core::Result<GradStore> {
    for v in vars {
        if let Some(g) = grads.get(v) {
            let sum = match acc.get(v) {
                Some(a) => (a + g)?,
                None => (g.zeros_like()? + g)?,
            };
            acc.insert(v, sum);
        }
    }
    Ok(acc)
}

/// Back-offs in a row that cannot come from the loss scale: 10 halvings make it 1024× smaller,
/// and overflows that the scale causes stop long before that.
const BACKOFFS_WARNING: u64 = 10;

impl Trainer {
    pub fn new(args: &Args, kind: OptimizerKind, device: &Device) -> anyhow::Result<Self> {
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
        let accumulator = match (&opt, args.accumulate) {
            (Opt::Fused(_), n) if n > 1 => Some(GradAccumulator::from_varmap(&vars.varmap)?),
            _ => None,
        };
        let initial_scale = match &scaler {
            Some(s) => s.scale_value()?,
            None => f64::NAN,
        };
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
            backoffs_in_a_row: 0,
            initial_scale,
            accumulator,
        })
    }

    fn model(&self) -> candle_core::Result<Llama> {
        Llama::load(self.vars.builder(self.dtype, &self.device), &self.cfg)
    }

    fn ms_since(&self, t: Instant) -> candle_core::Result<f64> {
        self.device.synchronize()?;
        Ok(t.elapsed().as_secs_f64() * 1e3)
    }

    /// One training step (`step` is its 1-based number) over its micro-batches (one, or
    /// `--accumulate N`); returns the loss (the mean over the micro-batches).
    pub fn step(&mut self, step: u64, micro: &[(Tensor, Tensor)]) -> anyhow::Result<f32> {
        let t = Instant::now();
        let (mut summed, loss) = self.backward(micro)?;
        let fb = self.ms_since(t)?;
        let grads: &mut GradStore = match (&mut summed, &mut self.accumulator) {
            (Some(grads), _) => grads,
            (None, Some(acc)) => acc.grads()?,
            (None, None) => bail!("internal error: no gradients"),
        };
        let (clip_ms, opt_ms) = match &mut self.opt {
            Opt::Candle { opt, vars, zclip } => {
                let t = Instant::now();
                if let Some(scaler) = &mut self.scaler {
                    scaler.unscale_(vars, grads)?;
                }
                match (self.clip, zclip) {
                    (Clip::None, _) => {}
                    (Clip::Norm, _) => {
                        clip_grad_norm_(vars, grads, self.max_norm)?;
                    }
                    (Clip::Zclip, Some(z)) => {
                        z.clip_(vars, grads)?;
                    }
                    (Clip::Zclip, None) => bail!("internal error: ZClip without its state"),
                    (Clip::Agc, _) => {
                        adaptive_clip_grad_(
                            vars,
                            grads,
                            AGC_CLIPPING,
                            ClipSetting::AGC_DEFAULT_EPS,
                        )?;
                    }
                }
                self.device.synchronize()?;
                let clip_ms = t.elapsed().as_secs_f64() * 1e3;
                let t = Instant::now();
                match &mut self.scaler {
                    Some(scaler) => {
                        scaler.step(opt, grads)?;
                        scaler.update()?;
                    }
                    None => opt.step(grads)?,
                }
                (clip_ms, self.ms_since(t)?)
            }
            Opt::Fused(opt) => {
                let t = Instant::now();
                match &mut self.scaler {
                    Some(scaler) => {
                        scaler.step(opt.as_mut(), grads)?;
                        scaler.update()?;
                    }
                    None => opt.step(grads)?,
                }
                (f64::NAN, self.ms_since(t)?)
            }
        };
        // Empty between optimizer steps (and so nothing a checkpoint needs).
        if let Some(acc) = &mut self.accumulator {
            acc.zero_()?;
        }
        self.timings.forward_backward.push(fb);
        self.timings.clip.push(clip_ms);
        self.timings.optimizer.push(opt_ms);
        if let Some(scaler) = &self.scaler {
            let scale = scaler.scale_value()?;
            let last = self.scale_history.last().map(|&(_, s)| s);
            if last != Some(scale) {
                self.scale_history.push((step, scale));
            }
            if scale < last.unwrap_or(self.initial_scale) {
                self.skipped += 1;
                self.backoffs_in_a_row += 1;
                if self.backoffs_in_a_row == BACKOFFS_WARNING {
                    eprintln!(
                        "[{}] warning: the GradScaler backed off at {BACKOFFS_WARNING} steps in a row \
                         (scale now {scale}): the gradients overflow whatever the scale, so an op of \
                         the F16 forward or backward pass overflows by itself",
                        self.name
                    );
                }
            } else {
                self.backoffs_in_a_row = 0;
            }
            if scale == 0.0 {
                anyhow::bail!(
                    "[{}] step {step}: the GradScaler's scale reached 0 after overflows at every \
                     step: training cannot go on (an op of the F16 pass overflows whatever the scale)",
                    self.name
                )
            }
        }
        Ok(loss)
    }

    /// Forward and backward passes over the micro-batches. One: its gradients. Several: each loss
    /// divided by their number (so that the sum is the gradient of the mean loss), and the
    /// gradients summed: by `GradAccumulator` for the fused optimizer (`None` is returned: the
    /// accumulator holds them), by candle's `(acc + g)?` per var otherwise. Returns the mean loss.
    fn backward(&mut self, micro: &[(Tensor, Tensor)]) -> anyhow::Result<(Option<GradStore>, f32)> {
        let model = self.model()?;
        let n = micro.len();
        let (mut summed, mut total) = (None, 0f64);
        for (inputs, targets) in micro {
            let logits = model.forward(inputs, 0, &mut self.cache)?;
            let loss =
                candle_nn::loss::cross_entropy(&logits.flatten_to(1)?, &targets.flatten_all()?)?;
            total += f64::from(loss.to_scalar::<f32>()?);
            let loss = if n > 1 { (loss / n as f64)? } else { loss };
            let grads = match &self.scaler {
                Some(scaler) => scaler.scale(&loss)?.backward()?,
                None => loss.backward()?,
            };
            match (&mut self.accumulator, &self.opt) {
                (Some(acc), _) => acc.add(&grads)?,
                (None, Opt::Candle { vars, .. }) if n > 1 => {
                    summed = Some(candle_sum(vars, summed.unwrap_or_default(), &grads)?)
                }
                (None, _) => summed = Some(grads),
            }
        }
        Ok((summed, (total / n as f64) as f32))
    }

    /// Exact-match accuracy on held-out problems: every answer byte (and the newline) is the
    /// model's top choice given the prompt and the answer so far, i.e. greedy decoding after the
    /// prompt writes exactly the answer.
    /// Also returns the fraction of answer bytes predicted right (teacher-forced).
    pub fn accuracy(&mut self, problems: &[(String, String)]) -> anyhow::Result<(f64, f64)> {
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

    pub fn summary(&self, args: &Args, first: u64, last: u64, accuracy: (f64, f64)) {
        let (fb, clip, opt) = self.timings.means();
        let tokens_per_step = (args.accumulate * args.batch * args.seq_len) as f64;
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
