//! The checkpoint file: a [`TrainingCheckpoint`] built from the run's components, saved
//! atomically as one safetensors file, loaded and verified whole.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{bail, Device, Result, Tensor, TensorId, Var};
use candle_nn::VarMap;

use super::clip;
use super::optimizer::CheckpointOptimizer;
use crate::accum::first_pending;
use crate::amp::grad_scaler::GradScaler;
use crate::io::digest::{self, Damage};
use crate::io::format::Entry;
use crate::optim::clip_setting::ClipSetting;

/// The value of the `format` metadata entry. v2 keys the optimizer's state by the vars' `VarMap`
/// names (v1, written by 0.1, keyed it as the optimizer did: by position for `new`).
pub(super) const FORMAT: &str = "candle-grad-clip training checkpoint v2";
/// The format 0.1 wrote.
const FORMAT_V1: &str = "candle-grad-clip training checkpoint v1";
/// Tensor name prefixes of the sections.
pub(super) const VARS: &str = "vars/";
pub(super) const OPTIMIZER: &str = "optimizer/";
pub(super) const OPTIMIZER_CLIP: &str = "optimizer_clip/";
pub(super) const CLIP: &str = "clip/";
pub(super) const SCALER: &str = "grad_scaler/";
/// Metadata keys.
pub(super) const KEY_FORMAT: &str = "format";
pub(super) const KEY_STEP: &str = "step";
pub(super) const KEY_OPTIMIZER: &str = "optimizer";
pub(super) const KEY_OPTIMIZER_PARAMS: &str = "optimizer.params";
pub(super) const KEY_OPTIMIZER_CLIP: &str = "optimizer.clip";
pub(super) const KEY_CLIP: &str = "clip";
pub(super) const KEY_SCALER: &str = "grad_scaler";
pub(super) const USER: &str = "user.";

/// A training checkpoint: everything a run needs to resume bitwise, in one safetensors file.
///
/// It holds copies (taken when it is built, so the run may go on while it is saved) of
/// - the model's vars, every var of a [`VarMap`] by name (tensors `vars/<name>`);
/// - optionally a fused optimizer's state ([`FusedAdamW`](crate::FusedAdamW), [`FusedSgd`](crate::FusedSgd): moments or momentum
///   buffers and counters, `optimizer/…`), its kind, its hyper-parameters (for information) and
///   its clip setting with the state of an AutoClip or ZClip (`optimizer_clip/…`);
/// - optionally a separate clip setting and its state (for loops with [`Clipped`](crate::Clipped)
///   or the clip functions, `clip/…`) and a [`GradScaler`]'s state (`grad_scaler/…`);
/// - the step, and user metadata (strings: a data position, a seed, …).
///
/// **Saving** ([`save`](Self::save)) is atomic and durable (the `atomic-write-file` crate): the
/// file is streamed to an unnamed temporary file in the same folder (`O_TMPFILE` on Linux), fsynced,
/// renamed over the old checkpoint, and the folder fsynced. A crash at any moment leaves either
/// the old checkpoint or the new one, never a torn one (and, but for a crash in the instant
/// between linking the file and renaming it, or on a file system without `O_TMPFILE`, no
/// temporary file). Several threads or
/// processes may save to one path at once: each save succeeds, the last rename wins. The file
/// holds the SHA-256 of every tensor and of its header.
///
/// **Loading** ([`load`](Self::load)) reads and verifies the whole file: a truncated file, a
/// flipped byte (a digest mismatch, naming the tensor), a file of another format is an error.
/// **Restoring** ([`restore`](Self::restore)) checks every component before it changes any: the
/// var names, shapes and dtypes, the optimizer's kind, its clip setting (kind and parameters), the
/// state of each component; any mismatch is an error naming it, and nothing changes. Every
/// component in the file must be restored, and every component given must be in the file.
///
/// **Memory and time.** Building it reads each var, and each of the optimizer's state buffers,
/// to the host once: the checkpoint is one host copy of the state (cloning it shares that copy).
/// Saving adds a bounded write buffer: the digests are computed in parallel, then the header and
/// the tensors are streamed to the file from that copy. Loading reads the file once into one
/// buffer, which the loaded checkpoint's tensors are ranges of, and verifies the digests in
/// parallel. Restoring moves one tensor at a time to the vars' device and keeps a host copy of
/// the vars' old values (to put them back if a device error interrupts it); the optimizer's new
/// state is built once per buffer, its old buffers kept as they are for that rollback.
///
/// **Saving in the background.** A checkpoint owns its copy, so the run may go on while it is
/// saved: [`save_in_background`](Self::save_in_background) writes it on another thread.
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use candle_nn::{linear, Module, Optimizer, ParamsAdamW, VarBuilder, VarMap};
/// use candle_grad_clip::{ClipSetting, FusedAdamW, TrainingCheckpoint, ZClip};
/// # fn main() -> candle_core::Result<()> {
/// let varmap = VarMap::new();
/// let model = linear(4, 1, VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu).pp("fc"))?;
/// let mut opt = FusedAdamW::from_varmap(&varmap, ParamsAdamW::default())?
///     .with_clip(ClipSetting::ZClip(ZClip::new()))?;
/// let x = Tensor::ones((8, 4), DType::F32, &Device::Cpu)?;
/// opt.backward_step(&model.forward(&x)?.sqr()?.mean_all()?)?;
///
/// let path = std::env::temp_dir().join(format!("doc-ckpt-{}.safetensors", std::process::id()));
/// TrainingCheckpoint::new(&varmap, 1)?
///     .with_optimizer(&opt)?
///     .with_metadata("data_position", "8")
///     .save(&path)?;
///
/// // Later, maybe in another process: the same model and optimizer, then the state.
/// let checkpoint = TrainingCheckpoint::load(&path)?;
/// checkpoint.restore(&varmap).optimizer(&mut opt).apply()?;
/// assert_eq!((checkpoint.step(), checkpoint.metadata("data_position")), (1, Some("8")));
/// # std::fs::remove_file(&path)?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct TrainingCheckpoint {
    pub(super) step: u64,
    /// Every tensor, named with its section's prefix (host bytes; cloning shares them).
    pub(super) entries: BTreeMap<String, Entry>,
    /// The metadata entries (not the digests).
    pub(super) meta: BTreeMap<String, String>,
    /// The `VarMap` name of each var, by identity, for the optimizer's state (empty once loaded).
    names_by_id: HashMap<TensorId, String>,
}

impl TrainingCheckpoint {
    /// A checkpoint of every var of `varmap` (copied now to the host, whatever their dtype and
    /// device) at training step `step`.
    ///
    /// ```
    /// use candle_core::{DType, Device};
    /// let varmap = candle_nn::VarMap::new();
    /// varmap.get(3, "w", candle_nn::Init::Const(1.0), DType::F32, &Device::Cpu)?;
    /// let checkpoint = candle_grad_clip::TrainingCheckpoint::new(&varmap, 10)?;
    /// assert_eq!(checkpoint.var_names(), ["w"]);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn new(varmap: &VarMap, step: u64) -> Result<Self> {
        let vars = sorted_vars(varmap)?;
        if let Some(i) = first_pending(vars.iter().map(|(_, v)| v)) {
            let name = &vars[i].0;
            bail!("TrainingCheckpoint::new: a GradAccumulator holds micro-batches of var {name:?} that no optimizer step has read (add since the last grads() or zero_()); save between optimizer steps, when the accumulator is empty")
        }
        let mut entries = BTreeMap::new();
        for (name, var) in &vars {
            entries.insert(
                format!("{VARS}{name}"),
                Entry::from_tensor(var.as_tensor())?,
            );
        }
        let meta = BTreeMap::from([
            (KEY_FORMAT.to_string(), FORMAT.to_string()),
            (KEY_STEP.to_string(), step.to_string()),
        ]);
        Ok(Self {
            step,
            entries,
            meta,
            names_by_id: names_by_id(&vars),
        })
    }

    fn add_section(&mut self, prefix: &str, state: HashMap<String, Tensor>) -> Result<()> {
        for (key, t) in state {
            self.entries
                .insert(format!("{prefix}{key}"), Entry::from_tensor(&t)?);
        }
        Ok(())
    }

    /// Adds the state of a fused optimizer (copied now: each state buffer read to the host
    /// once), its kind and hyper-parameters, its clip setting and that setting's state (AutoClip,
    /// ZClip). At most one optimizer. Each var's state is saved under the var's `VarMap` name,
    /// found by identity, so that an optimizer built in another process from the vars in another
    /// order (`VarMap::all_vars()` iterates a `HashMap`) gets each var's own state back; an
    /// optimizer var that is not in the `VarMap` is an error naming it.
    ///
    /// ```
    /// use candle_grad_clip::{FusedSgd, TrainingCheckpoint};
    /// let varmap = candle_nn::VarMap::new();
    /// let opt = FusedSgd::from_varmap(&varmap, Default::default())?;
    /// let checkpoint = TrainingCheckpoint::new(&varmap, 0)?.with_optimizer(&opt)?;
    /// assert_eq!(checkpoint.optimizer_kind(), Some("FusedSgd"));
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn with_optimizer<O: CheckpointOptimizer>(mut self, optimizer: &O) -> Result<Self> {
        if self.meta.contains_key(KEY_OPTIMIZER) {
            bail!("TrainingCheckpoint::with_optimizer: the checkpoint already holds an optimizer")
        }
        if self.names_by_id.is_empty() && self.entries.keys().any(|k| k.starts_with(VARS)) {
            bail!("TrainingCheckpoint::with_optimizer: this checkpoint was loaded from a file, and knows its vars by name only; build a new one with TrainingCheckpoint::new(&varmap, step)")
        }
        let keys = var_keys(
            &self.names_by_id,
            optimizer.optimizer_vars(),
            "TrainingCheckpoint::with_optimizer",
        )?;
        for (key, e) in optimizer.optimizer_entries(&keys)? {
            self.entries.insert(format!("{OPTIMIZER}{key}"), e);
        }
        self.add_section(OPTIMIZER_CLIP, clip::state(optimizer.clip())?)?;
        self.meta
            .insert(KEY_OPTIMIZER.to_string(), optimizer.kind().to_string());
        self.meta.insert(
            KEY_OPTIMIZER_PARAMS.to_string(),
            optimizer.describe_params(),
        );
        self.meta.insert(
            KEY_OPTIMIZER_CLIP.to_string(),
            clip::describe(optimizer.clip()),
        );
        Ok(self)
    }

    /// Adds a clip setting used outside a fused optimizer (with [`Clipped`](crate::Clipped) or
    /// the clip functions) and its state (AutoClip, ZClip; copied now). At most one.
    ///
    /// ```
    /// use candle_grad_clip::{AutoClip, ClipSetting, TrainingCheckpoint};
    /// let varmap = candle_nn::VarMap::new();
    /// let clip = ClipSetting::AutoClip(AutoClip::default());
    /// let checkpoint = TrainingCheckpoint::new(&varmap, 0)?.with_clip(&clip)?;
    /// # let _ = checkpoint;
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn with_clip(mut self, clip: &ClipSetting) -> Result<Self> {
        if self.meta.contains_key(KEY_CLIP) {
            bail!("TrainingCheckpoint::with_clip: the checkpoint already holds a clip setting")
        }
        self.add_section(CLIP, clip::state(Some(clip))?)?;
        self.meta
            .insert(KEY_CLIP.to_string(), clip::describe(Some(clip)));
        Ok(self)
    }

    /// Adds a [`GradScaler`]'s state (scale and growth tracker, copied now). At most one. Take it
    /// between `update` and the next step: during a step (after `unscale_` or `step`, before
    /// `update`) it is an error, since the scale would not yet reflect that step.
    ///
    /// ```
    /// use candle_grad_clip::{GradScaler, TrainingCheckpoint};
    /// let varmap = candle_nn::VarMap::new();
    /// let checkpoint = TrainingCheckpoint::new(&varmap, 0)?.with_grad_scaler(&GradScaler::new())?;
    /// # let _ = checkpoint;
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn with_grad_scaler(mut self, scaler: &GradScaler) -> Result<Self> {
        if self.meta.contains_key(KEY_SCALER) {
            bail!("TrainingCheckpoint::with_grad_scaler: the checkpoint already holds a GradScaler")
        }
        if scaler.step_in_progress() {
            bail!("TrainingCheckpoint::with_grad_scaler: a step is in progress (unscale_ or step since the last update()): take the checkpoint after update(), so that the scale matches the optimizer's state")
        }
        self.add_section(SCALER, scaler.state_dict()?)?;
        self.meta.insert(KEY_SCALER.to_string(), "1".to_string());
        Ok(self)
    }

    /// Adds (or replaces) a user metadata entry, e.g. the position in the data.
    ///
    /// ```
    /// let checkpoint = candle_grad_clip::TrainingCheckpoint::new(&candle_nn::VarMap::new(), 0)?
    ///     .with_metadata("seed", "42");
    /// assert_eq!(checkpoint.metadata("seed"), Some("42"));
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn with_metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.meta
            .insert(format!("{USER}{}", key.into()), value.into());
        self
    }

    /// The training step it was taken at.
    ///
    /// ```
    /// let checkpoint = candle_grad_clip::TrainingCheckpoint::new(&candle_nn::VarMap::new(), 7)?;
    /// assert_eq!(checkpoint.step(), 7);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn step(&self) -> u64 {
        self.step
    }

    /// A user metadata entry (see [`with_metadata`](Self::with_metadata)).
    ///
    /// ```
    /// let checkpoint = candle_grad_clip::TrainingCheckpoint::new(&candle_nn::VarMap::new(), 0)?;
    /// assert_eq!(checkpoint.metadata("data_position"), None);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn metadata(&self, key: &str) -> Option<&str> {
        self.meta.get(&format!("{USER}{key}")).map(String::as_str)
    }

    /// The kind of the optimizer whose state it holds (`"FusedAdamW"`, `"FusedSgd"`), if any.
    ///
    /// ```
    /// let checkpoint = candle_grad_clip::TrainingCheckpoint::new(&candle_nn::VarMap::new(), 0)?;
    /// assert_eq!(checkpoint.optimizer_kind(), None);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn optimizer_kind(&self) -> Option<&str> {
        self.meta.get(KEY_OPTIMIZER).map(String::as_str)
    }

    /// The names of the vars it holds, sorted.
    ///
    /// ```
    /// let checkpoint = candle_grad_clip::TrainingCheckpoint::new(&candle_nn::VarMap::new(), 0)?;
    /// assert!(checkpoint.var_names().is_empty());
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn var_names(&self) -> Vec<&str> {
        self.entries
            .keys()
            .filter_map(|k| k.strip_prefix(VARS))
            .collect()
    }

    /// The saved value of a var, as a tensor on `device` (e.g. to evaluate a checkpoint without
    /// restoring a run).
    ///
    /// ```
    /// use candle_core::{DType, Device};
    /// let varmap = candle_nn::VarMap::new();
    /// varmap.get(2, "w", candle_nn::Init::Const(3.0), DType::F32, &Device::Cpu)?;
    /// let checkpoint = candle_grad_clip::TrainingCheckpoint::new(&varmap, 0)?;
    /// assert_eq!(checkpoint.var("w", &Device::Cpu)?.to_vec1::<f32>()?, [3.0, 3.0]);
    /// assert!(checkpoint.var("v", &Device::Cpu).is_err());
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn var(&self, name: &str, device: &Device) -> Result<Tensor> {
        match self.entries.get(&format!("{VARS}{name}")) {
            Some(e) => e.to_tensor(device),
            None => bail!("TrainingCheckpoint::var: the checkpoint has no var `{name}`"),
        }
    }

    /// Saves it as one safetensors file at `path`, atomically (see the type's documentation):
    /// the old file at `path`, if any, is replaced only by a complete, fsynced new one.
    ///
    /// ```
    /// let path = std::env::temp_dir().join(format!("doc-save-{}.safetensors", std::process::id()));
    /// candle_grad_clip::TrainingCheckpoint::new(&candle_nn::VarMap::new(), 3)?.save(&path)?;
    /// assert_eq!(candle_grad_clip::TrainingCheckpoint::load(&path)?.step(), 3);
    /// # std::fs::remove_file(&path)?;
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        digest::save(path.as_ref(), &self.entries, &self.meta)
    }

    /// Reads a checkpoint saved by [`save`](Self::save) and verifies it whole: a file that is
    /// missing, truncated, corrupt (a digest that does not match: the header or a named tensor)
    /// or not a training checkpoint is an error naming the problem. Nothing is restored yet:
    /// see [`restore`](Self::restore).
    ///
    /// ```
    /// let path = std::env::temp_dir().join(format!("doc-load-{}.safetensors", std::process::id()));
    /// candle_grad_clip::TrainingCheckpoint::new(&candle_nn::VarMap::new(), 0)?.save(&path)?;
    /// let bytes = std::fs::read(&path)?;
    /// std::fs::write(&path, &bytes[..bytes.len() - 1])?; // truncated
    /// assert!(candle_grad_clip::TrainingCheckpoint::load(&path).is_err());
    /// # std::fs::remove_file(&path)?;
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let fail = |what: String| -> candle_core::Error {
            candle_core::Error::Msg(format!(
                "TrainingCheckpoint::load: `{}` {what}; nothing was loaded",
                path.display()
            ))
        };
        let mut parsed = digest::read(path).map_err(fail)?;
        // The digests first: a damaged header must read as damaged, whatever entry (or key)
        // the damage hit.
        match digest::verify(&mut parsed) {
            Ok(()) => {}
            Err(Damage::NoDigest) if !parsed.metadata.contains_key(KEY_FORMAT) => {
                return Err(fail(
                    "is not a training checkpoint (no `format` entry)".into(),
                ))
            }
            Err(damage) => return Err(fail(damage.to_string())),
        }
        let (entries, meta) = (parsed.entries, parsed.metadata);
        match meta.get(KEY_FORMAT) {
            Some(f) if f == FORMAT => {}
            Some(f) if f == FORMAT_V1 => {
                return Err(fail(format!(
                    "has format `{f}`, written by candle-grad-clip 0.1, which keyed the \
                     optimizer's state by position; this version reads `{FORMAT}` only: resume \
                     that run with 0.1, or start from its vars (`TrainingCheckpoint::var`)"
                )))
            }
            Some(f) => return Err(fail(format!("has format `{f}`, not `{FORMAT}`"))),
            None => {
                return Err(fail(
                    "is not a training checkpoint (no `format` entry)".into(),
                ))
            }
        }
        let step = meta
            .get(KEY_STEP)
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or_else(|| fail("has no valid `step` entry".into()))?;
        // Every tensor belongs to a section whose metadata entry says the section is there; a
        // clip setting without state ("none", norm, value, AGC) has no tensors.
        let stateless_clip = |key: &str| meta.get(key).is_some_and(|d| !clip::has_state(d));
        for name in entries.keys() {
            let (key, stateless) = if name.starts_with(VARS) {
                continue;
            } else if name.starts_with(OPTIMIZER) {
                (KEY_OPTIMIZER, false)
            } else if name.starts_with(OPTIMIZER_CLIP) {
                (KEY_OPTIMIZER_CLIP, stateless_clip(KEY_OPTIMIZER_CLIP))
            } else if name.starts_with(CLIP) {
                (KEY_CLIP, stateless_clip(KEY_CLIP))
            } else if name.starts_with(SCALER) {
                (KEY_SCALER, false)
            } else {
                return Err(fail(format!("holds an unknown tensor `{name}`")));
            };
            let Some(section) = meta.get(key) else {
                return Err(fail(format!(
                    "holds tensor `{name}` but no `{key}` entry for its section"
                )));
            };
            if name.starts_with(OPTIMIZER_CLIP) && !meta.contains_key(KEY_OPTIMIZER) {
                return Err(fail(format!(
                    "holds tensor `{name}` but no `{KEY_OPTIMIZER}` entry for its optimizer"
                )));
            }
            if stateless {
                return Err(fail(format!(
                    "holds tensor `{name}` for the clip setting {section}, which has no state"
                )));
            }
        }
        Ok(Self {
            step,
            entries,
            meta,
            names_by_id: HashMap::new(),
        })
    }

    /// The entries of a section, with the prefix removed.
    pub(super) fn section_entries<'a>(
        &'a self,
        prefix: &'a str,
    ) -> impl Iterator<Item = (&'a str, &'a Entry)> {
        self.entries
            .iter()
            .filter_map(move |(k, e)| k.strip_prefix(prefix).map(|k| (k, e)))
    }

    /// The tensors of a section, on the CPU, with the prefix removed.
    pub(super) fn section(&self, prefix: &str) -> Result<HashMap<String, Tensor>> {
        self.entries
            .iter()
            .filter_map(|(k, e)| k.strip_prefix(prefix).map(|k| (k, e)))
            .map(|(k, e)| Ok((k.to_string(), e.to_tensor(&Device::Cpu)?)))
            .collect()
    }
}

/// The `VarMap` name of each var, by identity.
pub(super) fn names_by_id(vars: &[(String, Var)]) -> HashMap<TensorId, String> {
    vars.iter().map(|(n, v)| (v.id(), n.clone())).collect()
}

/// The `VarMap` name of each of an optimizer's vars, in its order: the keys of its state in a
/// checkpoint. A var that is not in the `VarMap` is an error naming its position and shape.
pub(super) fn var_keys(
    names_by_id: &HashMap<TensorId, String>,
    vars: &[Var],
    context: &str,
) -> Result<Vec<String>> {
    vars.iter()
        .enumerate()
        .map(|(i, v)| match names_by_id.get(&v.id()) {
            Some(name) => Ok(name.clone()),
            None => bail!(
                "{context}: the optimizer's var #{i} (shape {:?}, {:?}) is not a var of the VarMap: a checkpoint keeps each var's state under its VarMap name",
                v.dims(),
                v.dtype()
            ),
        })
        .collect()
}

/// The vars of a VarMap sorted by name.
pub(super) fn sorted_vars(varmap: &VarMap) -> Result<Vec<(String, Var)>> {
    crate::ops::varmap::sorted_vars(varmap, "TrainingCheckpoint")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::clip_setting::ClipSetting;
    use candle_core::DType;

    fn temp(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!(
            "cgc-ckpt-{name}-{}.safetensors",
            std::process::id()
        ))
    }

    fn checkpoint() -> Result<TrainingCheckpoint> {
        let varmap = VarMap::new();
        varmap.get(
            3,
            "w",
            candle_nn::Init::Const(1.0),
            DType::F32,
            &Device::Cpu,
        )?;
        TrainingCheckpoint::new(&varmap, 2)?.with_clip(&ClipSetting::norm(1.0))
    }

    fn entry() -> Result<Entry> {
        Entry::from_tensor(&Tensor::new(&[1f32], &Device::Cpu)?)
    }

    /// The error of loading a saved checkpoint with the first occurrence of `find` in its bytes
    /// changed at `offset` to `byte`.
    fn load_flipped(name: &str, find: &str, offset: usize, byte: u8) -> Result<String> {
        let path = temp(name);
        checkpoint()?.save(&path)?;
        let mut bytes = std::fs::read(&path)?;
        let at = bytes
            .windows(find.len())
            .position(|w| w == find.as_bytes())
            .expect("the bytes to change");
        bytes[at + offset] = byte;
        std::fs::write(&path, &bytes)?;
        let err = TrainingCheckpoint::load(&path).map(|_| ());
        std::fs::remove_file(&path)?;
        Ok(err.expect_err("accepted").to_string())
    }

    /// Saved with valid digests, so only the section check can refuse it.
    fn load_err(ck: &TrainingCheckpoint, name: &str) -> Result<String> {
        let path = temp(name);
        ck.save(&path)?;
        let err = TrainingCheckpoint::load(&path).map(|_| ());
        std::fs::remove_file(&path)?;
        Ok(err.expect_err("accepted").to_string())
    }

    #[test]
    fn refuses_tensors_of_a_section_without_its_entry() -> Result<()> {
        let path = temp("sections-ok");
        checkpoint()?.save(&path)?;
        TrainingCheckpoint::load(&path)?;
        std::fs::remove_file(&path)?;
        for (section, key) in [
            (SCALER, KEY_SCALER),
            (OPTIMIZER, KEY_OPTIMIZER),
            (OPTIMIZER_CLIP, KEY_OPTIMIZER_CLIP),
        ] {
            let mut ck = checkpoint()?;
            ck.entries.insert(format!("{section}x"), entry()?);
            let msg = load_err(&ck, "sections")?;
            assert!(msg.contains(&format!("no `{key}` entry")), "{msg}");
        }
        Ok(())
    }

    #[test]
    fn refuses_state_for_a_clip_setting_without_state() -> Result<()> {
        let mut ck = checkpoint()?;
        ck.entries.insert(format!("{CLIP}ema"), entry()?);
        let msg = load_err(&ck, "stateless")?;
        assert!(msg.contains("which has no state"), "{msg}");
        // The optimizer's clip "none" as well.
        let mut ck = checkpoint()?;
        ck.meta.insert(KEY_OPTIMIZER.into(), "FusedSgd".into());
        ck.meta.insert(KEY_OPTIMIZER_CLIP.into(), "none".into());
        ck.entries.insert(format!("{OPTIMIZER_CLIP}ema"), entry()?);
        let msg = load_err(&ck, "stateless-none")?;
        assert!(
            msg.contains("clip setting none, which has no state"),
            "{msg}"
        );
        Ok(())
    }

    #[test]
    fn a_corrupt_format_entry_reads_as_corrupt() -> Result<()> {
        // Another format with valid digests: named as such.
        let mut ck = checkpoint()?;
        ck.meta
            .insert(KEY_FORMAT.into(), FORMAT.replace("v2", "v3"));
        let msg = load_err(&ck, "format")?;
        assert!(msg.contains("has format"), "{msg}");
        // The format entry changed on disk: the header digest says corrupt.
        let msg = load_flipped("format-flip", FORMAT, FORMAT.len() - 1, b'3')?;
        assert!(msg.contains("digest of its header"), "{msg}");
        // The key `format` itself damaged: corrupt too, not "not a training checkpoint".
        let key = format!("\"{KEY_FORMAT}\":");
        let msg = load_flipped("format-key-flip", &key, 1, b'F')?;
        assert!(msg.contains("digest of its header"), "{msg}");
        Ok(())
    }

    #[test]
    fn refuses_an_optimizer_clip_state_without_an_optimizer() -> Result<()> {
        let mut ck = checkpoint()?;
        ck.meta.insert(KEY_OPTIMIZER_CLIP.into(), "zclip(…)".into());
        ck.entries.insert(format!("{OPTIMIZER_CLIP}ema"), entry()?);
        let msg = load_err(&ck, "clip-without-optimizer")?;
        assert!(msg.contains("no `optimizer` entry"), "{msg}");
        Ok(())
    }
}
