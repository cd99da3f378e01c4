//! Training checkpoints of the example: the library's `TrainingCheckpoint` with the fused
//! optimizer, the GradScaler, and the example's own metadata (its run settings, the data position,
//! the seed, the loss and scale histories).

use anyhow::{bail, Context};
use candle_grad_clip::TrainingCheckpoint;

use super::trainer::{Opt, Trainer};
use super::Args;

pub fn checkpoint_of(
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
    // The loss of every step, bit-exact, so that a resumed run prints and plots the same
    // history: about 14 bytes of header per step (1.4 MB after 100,000 steps, well under
    // safetensors' 100 MB header limit; a longer run would keep it in a file of its own).
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
pub type LossHistory = Vec<(u64, f32)>;

/// Restores a checkpoint into `trainer`; returns (step, data position, losses).
pub fn resume(
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
    // Every entry of the example's own is read before anything is restored, so that a
    // checkpoint missing one changes nothing.
    let position = ck
        .metadata("data_position")
        .and_then(|p| p.parse().ok())
        .context("the checkpoint has no data position")?;
    let losses = history(ck, "losses", |bits| {
        Ok(f32::from_bits(u32::from_str_radix(bits, 16)?))
    })?;
    let skipped = ck
        .metadata("skipped")
        .and_then(|s| s.parse().ok())
        .context("the checkpoint has no count of skipped steps")?;
    let scale_history = history(ck, "scale_history", |v| Ok(v.parse()?))?;
    let Opt::Fused(opt) = &mut trainer.opt else {
        bail!("internal error: resume needs the fused optimizer")
    };
    let restore = ck.restore(&trainer.vars.varmap).optimizer(opt.as_mut());
    match &mut trainer.scaler {
        Some(scaler) => restore.grad_scaler(scaler).apply()?,
        None => restore.apply()?,
    }
    trainer.skipped = skipped;
    trainer.scale_history = scale_history;
    Ok((ck.step(), position, losses))
}

/// A metadata entry `step:value,step:value,…` read back as (step, value) pairs.
fn history<T>(
    ck: &TrainingCheckpoint,
    key: &str,
    value: impl Fn(&str) -> anyhow::Result<T>,
) -> anyhow::Result<Vec<(u64, T)>> {
    let entry = ck
        .metadata(key)
        .with_context(|| format!("the checkpoint has no `{key}` entry"))?;
    entry
        .split(',')
        .filter(|item| !item.is_empty())
        .map(|item| {
            let (step, v) = item
                .split_once(':')
                .with_context(|| format!("malformed `{key}` entry: `{item}`"))?;
            let step = step
                .parse()
                .with_context(|| format!("malformed step in the `{key}` entry: `{item}`"))?;
            let v = value(v)
                .with_context(|| format!("malformed value in the `{key}` entry: `{item}`"))?;
            Ok((step, v))
        })
        .collect()
}
