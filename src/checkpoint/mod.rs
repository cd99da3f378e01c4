//! Training checkpoints: the model's vars, the optimizer's state, the clip policy's state, the
//! [`GradScaler`]'s state, the step and user metadata in one safetensors file, saved atomically
//! and loaded all or nothing ([`TrainingCheckpoint`]).
//!
//! `atomic` replaces a file crash-safely (also for the `save_state` methods), `format` turns
//! tensors into the file's bytes and back and computes the digests, `clip` describes a clip
//! setting and carries its state.

mod atomic;
mod clip;
mod format;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use candle_core::{bail, Device, Result, Tensor, Var};
use candle_nn::{Optimizer, VarMap};

use crate::{ClipSetting, FusedAdamW, FusedSgd, GradScaler};
#[allow(unused_imports)] // For the `save_state` methods (wired in separately).
pub(crate) use atomic::{save_safetensors_atomically, save_safetensors_with_metadata_atomically};
use format::Entry;

/// The value of the `format` metadata entry.
const FORMAT: &str = "candle-grad-clip training checkpoint v1";
/// Tensor name prefixes of the sections.
const VARS: &str = "vars/";
const OPTIMIZER: &str = "optimizer/";
const OPTIMIZER_CLIP: &str = "optimizer_clip/";
const CLIP: &str = "clip/";
const SCALER: &str = "grad_scaler/";
/// Metadata keys.
const KEY_FORMAT: &str = "format";
const KEY_STEP: &str = "step";
const KEY_OPTIMIZER: &str = "optimizer";
const KEY_OPTIMIZER_PARAMS: &str = "optimizer.params";
const KEY_OPTIMIZER_CLIP: &str = "optimizer.clip";
const KEY_CLIP: &str = "clip";
const KEY_SCALER: &str = "grad_scaler";
const USER: &str = "user.";
/// The digest of the header, and the prefix of each tensor's digest.
const KEY_DIGEST: &str = "sha256";
const DIGEST_PREFIX: &str = "sha256:";

mod sealed {
    use std::collections::HashMap;

    use candle_core::{Result, Tensor};

    use crate::ClipSetting;

    /// What a checkpoint needs from an optimizer (crate-internal: the trait is sealed).
    pub trait Sealed {
        fn kind(&self) -> &'static str;
        fn describe_params(&self) -> String;
        fn optimizer_state(&self) -> Result<HashMap<String, Tensor>>;
        fn load_optimizer_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()>;
        fn clip(&self) -> Option<&ClipSetting>;
        /// Replaces the clip setting by a validated one of the same kind and parameters.
        fn replace_clip(&mut self, clip: ClipSetting) -> Result<()>;
    }
}

/// An optimizer whose whole state a [`TrainingCheckpoint`] saves and restores: [`FusedAdamW`]
/// and [`FusedSgd`] (sealed). `candle_nn::AdamW` keeps its moments private, so it cannot be
/// checkpointed.
///
/// ```
/// fn takes<O: candle_grad_clip::CheckpointOptimizer>(_: &O) {}
/// let opt = candle_grad_clip::FusedSgd::from_varmap(&candle_nn::VarMap::new(), Default::default())?;
/// takes(&opt);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub trait CheckpointOptimizer: sealed::Sealed {}

macro_rules! checkpoint_optimizer {
    ($ty:ident) => {
        impl sealed::Sealed for $ty {
            fn kind(&self) -> &'static str {
                stringify!($ty)
            }
            fn describe_params(&self) -> String {
                format!("{:?}", self.params())
            }
            fn optimizer_state(&self) -> Result<HashMap<String, Tensor>> {
                self.state_dict()
            }
            fn load_optimizer_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
                self.load_state_dict(state)
            }
            fn clip(&self) -> Option<&ClipSetting> {
                self.clip_setting()
            }
            fn replace_clip(&mut self, clip: ClipSetting) -> Result<()> {
                // `with_clip` takes the optimizer by value: swap a placeholder in for the call.
                // It only fails on an invalid setting, checked first, so the optimizer is
                // always put back.
                clip.validate()?;
                let placeholder = $ty::new(Vec::new(), self.params().clone())?;
                let this = std::mem::replace(self, placeholder);
                *self = this.with_clip(clip)?;
                Ok(())
            }
        }
        impl CheckpointOptimizer for $ty {}
    };
}
checkpoint_optimizer!(FusedAdamW);
checkpoint_optimizer!(FusedSgd);

/// A training checkpoint: everything a run needs to resume bitwise, in one safetensors file.
///
/// It holds copies (taken when it is built, so the run may go on while it is saved) of
/// - the model's vars, every var of a [`VarMap`] by name (tensors `vars/<name>`);
/// - optionally a fused optimizer's state ([`FusedAdamW`], [`FusedSgd`]: moments or momentum
///   buffers and counters, `optimizer/…`), its kind, its hyper-parameters (for information) and
///   its clip setting with the state of an AutoClip or ZClip (`optimizer_clip/…`);
/// - optionally a separate clip setting and its state (for loops with [`Clipped`](crate::Clipped)
///   or the clip functions, `clip/…`) and a [`GradScaler`]'s state (`grad_scaler/…`);
/// - the step, and user metadata (strings: a data position, a seed, …).
///
/// **Saving** ([`save`](Self::save)) is atomic and durable: the file is written whole to a
/// temporary file in the same folder, fsynced, renamed over the old checkpoint, and the folder
/// fsynced. A crash at any moment leaves either the old checkpoint or the new one, never a torn
/// one (a crash during the write leaves a temporary `.<name>.tmp-*` file, removed by the next
/// save). The file holds the SHA-256 of every tensor and of its header.
///
/// **Loading** ([`load`](Self::load)) reads and verifies the whole file: a truncated file, a
/// flipped byte (a digest mismatch, naming the tensor), a file of another format is an error.
/// **Restoring** ([`restore`](Self::restore)) checks every component before it changes any: the
/// var names, shapes and dtypes, the optimizer's kind, its clip setting (kind and parameters), the
/// state of each component; any mismatch is an error naming it, and nothing changes. Every
/// component in the file must be restored, and every component given must be in the file.
///
/// Saving keeps about two copies of the state in memory (the snapshot and the file's bytes);
/// loading reads the whole file into memory.
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
    step: u64,
    /// Every tensor, named with its section's prefix.
    entries: BTreeMap<String, Entry>,
    /// The metadata entries (not the digests).
    meta: BTreeMap<String, String>,
}

impl TrainingCheckpoint {
    /// A checkpoint of every var of `varmap` (copied now, whatever their dtype and device) at
    /// training step `step`.
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
        })
    }

    fn add_section(&mut self, prefix: &str, state: HashMap<String, Tensor>) -> Result<()> {
        for (key, t) in state {
            self.entries
                .insert(format!("{prefix}{key}"), Entry::from_tensor(&t)?);
        }
        Ok(())
    }

    /// Adds the state of a fused optimizer (copied now), its kind and hyper-parameters, its
    /// clip setting and that setting's state (AutoClip, ZClip). At most one optimizer.
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
        self.add_section(OPTIMIZER, optimizer.optimizer_state()?)?;
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

    /// Adds a [`GradScaler`]'s state (scale and growth tracker, copied now; take it between
    /// `update` and the next step). At most one.
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
        let path = path.as_ref();
        let mut meta = self.meta.clone();
        for (name, e) in &self.entries {
            meta.insert(format!("{DIGEST_PREFIX}{name}"), e.digest());
        }
        let digest = format::header_digest(&meta, &self.entries, KEY_DIGEST);
        meta.insert(KEY_DIGEST.to_string(), digest);
        let entries = self
            .entries
            .iter()
            .map(|(n, e)| (n.clone(), e.clone()))
            .collect();
        let bytes = format::serialize(entries, meta.into_iter().collect(), path)?;
        atomic::write_atomically(path, &bytes)
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
        let bytes = std::fs::read(path).map_err(|e| fail(format!("cannot be read ({e})")))?;
        let parsed = format::parse(&bytes).map_err(|e| fail(format!("is {e}")))?;
        let (entries, mut meta) = (parsed.entries, parsed.metadata);
        match meta.get(KEY_FORMAT) {
            Some(f) if f == FORMAT => {}
            Some(f) => return Err(fail(format!("has format `{f}`, not `{FORMAT}`"))),
            None => {
                return Err(fail(
                    "is not a training checkpoint (no `format` entry)".into(),
                ))
            }
        }
        let expected = format::header_digest(&meta, &entries, KEY_DIGEST);
        match meta.get(KEY_DIGEST) {
            Some(d) if *d == expected => {}
            Some(_) => {
                return Err(fail(
                    "is corrupt: the digest of its header does not match".into(),
                ))
            }
            None => return Err(fail("has no digest".into())),
        }
        for (name, e) in &entries {
            match meta.get(&format!("{DIGEST_PREFIX}{name}")) {
                Some(d) if *d == e.digest() => {}
                Some(_) => {
                    return Err(fail(format!(
                        "is corrupt: tensor `{name}` does not match its digest"
                    )))
                }
                None => return Err(fail(format!("has no digest for tensor `{name}`"))),
            }
        }
        meta.retain(|k, _| k != KEY_DIGEST && !k.starts_with(DIGEST_PREFIX));
        let step = meta
            .get(KEY_STEP)
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or_else(|| fail("has no valid `step` entry".into()))?;
        for name in entries.keys() {
            let known = [VARS, OPTIMIZER, OPTIMIZER_CLIP, CLIP, SCALER]
                .iter()
                .any(|p| name.starts_with(p));
            if !known {
                return Err(fail(format!("holds an unknown tensor `{name}`")));
            }
        }
        Ok(Self {
            step,
            entries,
            meta,
        })
    }

    /// Starts restoring it into `varmap` (whose vars it sets) and the components given to the
    /// returned [`Restore`]; [`Restore::apply`] checks everything, then changes everything.
    ///
    /// ```
    /// use candle_core::{DType, Device};
    /// let varmap = candle_nn::VarMap::new();
    /// let w = varmap.get(2, "w", candle_nn::Init::Const(1.0), DType::F32, &Device::Cpu)?;
    /// let checkpoint = candle_grad_clip::TrainingCheckpoint::new(&varmap, 0)?;
    /// varmap.data().lock().unwrap()["w"].set(&candle_core::Tensor::new(&[5f32, 5.], &Device::Cpu)?)?;
    /// assert_eq!(w.to_vec1::<f32>()?, [5.0, 5.0]);
    /// checkpoint.restore(&varmap).apply()?;
    /// assert_eq!(w.to_vec1::<f32>()?, [1.0, 1.0]);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn restore<'a>(&'a self, varmap: &'a VarMap) -> Restore<'a> {
        Restore {
            checkpoint: self,
            varmap,
            optimizer: None,
            clip: None,
            grad_scaler: None,
        }
    }

    /// The tensors of a section, on the CPU, with the prefix removed.
    fn section(&self, prefix: &str) -> Result<HashMap<String, Tensor>> {
        self.entries
            .iter()
            .filter_map(|(k, e)| k.strip_prefix(prefix).map(|k| (k, e)))
            .map(|(k, e)| Ok((k.to_string(), e.to_tensor(&Device::Cpu)?)))
            .collect()
    }
}

/// The vars of a VarMap sorted by name.
fn sorted_vars(varmap: &VarMap) -> Result<Vec<(String, Var)>> {
    let data = varmap.data().lock().map_err(|_| {
        candle_core::Error::Msg("TrainingCheckpoint: the VarMap's lock is poisoned".into())
    })?;
    let mut vars: Vec<(String, Var)> = data.iter().map(|(n, v)| (n.clone(), v.clone())).collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(vars)
}

/// A restore in preparation (from [`TrainingCheckpoint::restore`]): name the components, then
/// [`apply`](Self::apply).
///
/// ```
/// use candle_grad_clip::{GradScaler, TrainingCheckpoint};
/// let varmap = candle_nn::VarMap::new();
/// let checkpoint = TrainingCheckpoint::new(&varmap, 0)?.with_grad_scaler(&GradScaler::new())?;
/// let mut scaler = GradScaler::new();
/// checkpoint.restore(&varmap).grad_scaler(&mut scaler).apply()?;
/// # Ok::<(), candle_core::Error>(())
/// ```
pub struct Restore<'a> {
    checkpoint: &'a TrainingCheckpoint,
    varmap: &'a VarMap,
    optimizer: Option<&'a mut dyn CheckpointOptimizer>,
    clip: Option<&'a mut ClipSetting>,
    grad_scaler: Option<&'a mut GradScaler>,
}

impl std::fmt::Debug for Restore<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Restore")
            .field("step", &self.checkpoint.step)
            .field("optimizer", &self.optimizer.as_ref().map(|o| o.kind()))
            .field("clip", &self.clip)
            .field("grad_scaler", &self.grad_scaler.is_some())
            .finish()
    }
}

impl<'a> Restore<'a> {
    /// The fused optimizer to restore (its kind and clip setting must be the checkpoint's).
    ///
    /// ```
    /// use candle_grad_clip::{FusedAdamW, FusedSgd, TrainingCheckpoint};
    /// let varmap = candle_nn::VarMap::new();
    /// let sgd = FusedSgd::from_varmap(&varmap, Default::default())?;
    /// let checkpoint = TrainingCheckpoint::new(&varmap, 0)?.with_optimizer(&sgd)?;
    /// let mut adamw = FusedAdamW::from_varmap(&varmap, Default::default())?;
    /// let err = checkpoint.restore(&varmap).optimizer(&mut adamw).apply().unwrap_err();
    /// assert!(err.to_string().contains("FusedSgd"));
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn optimizer<O: CheckpointOptimizer>(mut self, optimizer: &'a mut O) -> Self {
        self.optimizer = Some(optimizer);
        self
    }

    /// The separate clip setting to restore (see [`TrainingCheckpoint::with_clip`]).
    ///
    /// ```
    /// use candle_grad_clip::{AutoClip, ClipSetting, TrainingCheckpoint};
    /// let varmap = candle_nn::VarMap::new();
    /// let mut clip = ClipSetting::AutoClip(AutoClip::default());
    /// let checkpoint = TrainingCheckpoint::new(&varmap, 0)?.with_clip(&clip)?;
    /// checkpoint.restore(&varmap).clip(&mut clip).apply()?;
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn clip(mut self, clip: &'a mut ClipSetting) -> Self {
        self.clip = Some(clip);
        self
    }

    /// The [`GradScaler`] to restore (between `update` and the next step).
    ///
    /// ```
    /// use candle_grad_clip::{GradScaler, TrainingCheckpoint};
    /// let varmap = candle_nn::VarMap::new();
    /// let checkpoint = TrainingCheckpoint::new(&varmap, 0)?;
    /// let mut scaler = GradScaler::new();
    /// // The checkpoint holds no GradScaler: refused.
    /// assert!(checkpoint.restore(&varmap).grad_scaler(&mut scaler).apply().is_err());
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn grad_scaler(mut self, scaler: &'a mut GradScaler) -> Self {
        self.grad_scaler = Some(scaler);
        self
    }

    /// Checks every component against the checkpoint, then sets them all: the vars (in place:
    /// every tensor holding them sees the values), the optimizer's state and clip state, the
    /// separate clip setting's state, the scaler's state. Any mismatch (a var missing on either
    /// side, a shape or dtype, another optimizer kind, another clip setting, a component given
    /// but not saved or saved but not given, a malformed state) is an error naming it, and
    /// nothing changes.
    ///
    /// ```
    /// use candle_core::{DType, Device};
    /// let varmap = candle_nn::VarMap::new();
    /// varmap.get(2, "w", candle_nn::Init::Const(1.0), DType::F32, &Device::Cpu)?;
    /// let checkpoint = candle_grad_clip::TrainingCheckpoint::new(&varmap, 0)?;
    /// let other = candle_nn::VarMap::new();
    /// let v = other.get(3, "w", candle_nn::Init::Const(2.0), DType::F32, &Device::Cpu)?;
    /// let err = checkpoint.restore(&other).apply().unwrap_err();
    /// assert!(err.to_string().contains("shape"));
    /// assert_eq!(v.to_vec1::<f32>()?, [2.0; 3]); // unchanged
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn apply(self) -> Result<()> {
        let Restore {
            checkpoint: ck,
            varmap,
            optimizer,
            clip: clip_target,
            grad_scaler,
        } = self;
        let fail = |what: String| -> candle_core::Error {
            candle_core::Error::Msg(format!(
                "TrainingCheckpoint::restore: {what}; nothing was changed"
            ))
        };

        // The vars: the same names, shapes and dtypes.
        let vars = sorted_vars(varmap)?;
        let names: HashSet<&str> = vars.iter().map(|(n, _)| n.as_str()).collect();
        if let Some(extra) = ck.var_names().into_iter().find(|n| !names.contains(n)) {
            return Err(fail(format!(
                "the checkpoint holds var `{extra}`, which the VarMap does not have"
            )));
        }
        let mut new_values = Vec::with_capacity(vars.len());
        for (name, var) in &vars {
            let Some(e) = ck.entries.get(&format!("{VARS}{name}")) else {
                return Err(fail(format!("the checkpoint has no var `{name}`")));
            };
            if e.shape != var.dims() {
                return Err(fail(format!(
                    "var `{name}` has shape {:?} in the checkpoint but {:?} in the VarMap",
                    e.shape,
                    var.dims()
                )));
            }
            if e.dtype != var.dtype() {
                return Err(fail(format!(
                    "var `{name}` has dtype {:?} in the checkpoint but {:?} in the VarMap",
                    e.dtype,
                    var.dtype()
                )));
            }
            new_values.push(e.to_tensor(var.device())?);
        }

        // The optimizer: the same kind and clip setting; its clip's state prepared on a copy.
        let saved_kind = ck.meta.get(KEY_OPTIMIZER);
        let optimizer_plan = match (optimizer, saved_kind) {
            (None, None) => None,
            (None, Some(kind)) => {
                return Err(fail(format!(
                    "the checkpoint holds the state of a {kind}: pass the optimizer to restore"
                )))
            }
            (Some(opt), None) => {
                return Err(fail(format!(
                    "the checkpoint holds no optimizer state, but a {} was given",
                    opt.kind()
                )))
            }
            (Some(opt), Some(kind)) => {
                if kind != opt.kind() {
                    return Err(fail(format!(
                        "the checkpoint holds the state of a {kind}, not of a {}",
                        opt.kind()
                    )));
                }
                let saved = ck
                    .meta
                    .get(KEY_OPTIMIZER_CLIP)
                    .map_or("none", String::as_str);
                let ours = clip::describe(opt.clip());
                if saved != ours {
                    return Err(fail(format!(
                        "the checkpoint's {kind} clips with {saved}, this one with {ours}"
                    )));
                }
                let clip_state = ck.section(OPTIMIZER_CLIP)?;
                let new_clip = match opt.clip() {
                    Some(c) => Some(
                        clip::with_state(c, &clip_state)
                            .map_err(|e| fail(format!("the optimizer's clip state: {e}")))?,
                    ),
                    None => None,
                };
                Some((opt, ck.section(OPTIMIZER)?, new_clip))
            }
        };

        // The separate clip setting.
        let clip_plan = match (clip_target, ck.meta.get(KEY_CLIP)) {
            (None, None) => None,
            (None, Some(saved)) => {
                return Err(fail(format!(
                    "the checkpoint holds a clip setting ({saved}): pass it to restore"
                )))
            }
            (Some(_), None) => return Err(fail("the checkpoint holds no clip setting".into())),
            (Some(target), Some(saved)) => {
                let ours = clip::describe(Some(target));
                if *saved != ours {
                    return Err(fail(format!(
                        "the checkpoint's clip setting is {saved}, this one is {ours}"
                    )));
                }
                let new = clip::with_state(target, &ck.section(CLIP)?)
                    .map_err(|e| fail(format!("the clip state: {e}")))?;
                Some((target, new))
            }
        };

        // The scaler, loaded into a copy.
        let scaler_plan = match (grad_scaler, ck.meta.contains_key(KEY_SCALER)) {
            (None, false) => None,
            (None, true) => {
                return Err(fail(
                    "the checkpoint holds a GradScaler's state: pass the scaler to restore".into(),
                ))
            }
            (Some(_), false) => {
                return Err(fail("the checkpoint holds no GradScaler state".into()))
            }
            (Some(target), true) => {
                let mut new = target.clone();
                new.load_state_dict(&ck.section(SCALER)?)
                    .map_err(|e| fail(format!("the GradScaler state: {e}")))?;
                Some((target, new))
            }
        };

        // Everything checked: apply. The optimizer's load checks its state whole before it
        // changes anything, so it goes first; what follows cannot fail but on a device error,
        // after which the vars and the optimizer are put back.
        let old_values = vars
            .iter()
            .map(|(_, v)| v.as_tensor().copy())
            .collect::<Result<Vec<_>>>()?;
        let mut rollback_optimizer = None;
        if let Some((opt, state, new_clip)) = optimizer_plan {
            let old_state = opt.optimizer_state()?;
            let old_clip = opt.clip().cloned();
            opt.load_optimizer_state(&state)
                .map_err(|e| fail(format!("the optimizer state: {e}")))?;
            if let Some(c) = new_clip {
                if let Err(e) = opt.replace_clip(c) {
                    let _ = opt.load_optimizer_state(&old_state);
                    return Err(e);
                }
            }
            rollback_optimizer = Some((opt, old_state, old_clip));
        }
        for (i, ((_, var), value)) in vars.iter().zip(&new_values).enumerate() {
            if let Err(e) = var.set(value) {
                for ((_, var), old) in vars.iter().zip(&old_values).take(i) {
                    let _ = var.set(old);
                }
                if let Some((opt, state, clip)) = rollback_optimizer {
                    let _ = opt.load_optimizer_state(&state);
                    if let Some(c) = clip {
                        let _ = opt.replace_clip(c);
                    }
                }
                return Err(e);
            }
        }
        if let Some((target, new)) = clip_plan {
            *target = new;
        }
        if let Some((target, new)) = scaler_plan {
            *target = new;
        }
        Ok(())
    }
}
