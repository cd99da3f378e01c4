//! Restoring a [`TrainingCheckpoint`]: every component checked against the file before any is
//! changed ([`Restore::apply`]).

use std::collections::{HashMap, HashSet};

use candle_core::{Result, Var};
use candle_nn::VarMap;

use super::clip;
use super::file::{
    names_by_id, sorted_vars, var_keys, TrainingCheckpoint, CLIP, KEY_CLIP, KEY_OPTIMIZER,
    KEY_OPTIMIZER_CLIP, KEY_SCALER, OPTIMIZER, OPTIMIZER_CLIP, SCALER, VARS,
};
use super::optimizer::CheckpointOptimizer;
use crate::amp::grad_scaler::GradScaler;
use crate::io::format::Entry;
use crate::optim::clip_setting::ClipSetting;
use crate::optim::fused::state_dict::{StateBackup, StateValue};

impl TrainingCheckpoint {
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
    pub(super) checkpoint: &'a TrainingCheckpoint,
    pub(super) varmap: &'a VarMap,
    pub(super) optimizer: Option<&'a mut dyn CheckpointOptimizer>,
    pub(super) clip: Option<&'a mut ClipSetting>,
    pub(super) grad_scaler: Option<&'a mut GradScaler>,
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
    /// nothing changes. Only a device error while the vars are set can interrupt it after the
    /// checks; then the vars and the optimizer are put back as far as the device allows.
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
        // Every component is checked (and its new state prepared) before any is changed.
        let vars = sorted_vars(varmap)?;
        let new_values = check_vars(ck, &vars)?;
        let optimizer_plan = plan_optimizer(ck, optimizer, &vars)?;
        let clip_plan = plan_clip(ck, clip_target)?;
        let scaler_plan = plan_scaler(ck, grad_scaler)?;

        // Everything checked: apply. The optimizer's load checks its state whole before it
        // changes anything, so it goes first; what follows cannot fail but on a device error,
        // after which the vars and the optimizer are put back (best effort: the device failed).
        // The old values wait on the host, and the new ones go to the device one at a time, so
        // the device holds one tensor more than the vars, not two more copies of the model.
        let old_values = vars
            .iter()
            .map(|(_, v)| Entry::from_tensor(v.as_tensor()))
            .collect::<Result<Vec<_>>>()
            .map_err(|e| {
                refused(format!(
                    "cannot read the vars' old values for a rollback: {e}"
                ))
            })?;
        let rollback = match optimizer_plan {
            Some(plan) => Some(load_optimizer(ck, plan)?),
            None => None,
        };
        set_vars(&vars, &new_values, &old_values, rollback)?;
        if let Some((target, new)) = clip_plan {
            *target = new;
        }
        if let Some((target, new)) = scaler_plan {
            *target = new;
        }
        Ok(())
    }
}

/// The error of a restore refused before anything changed.
fn refused(what: String) -> candle_core::Error {
    candle_core::Error::Msg(format!(
        "TrainingCheckpoint::restore: {what}; nothing was changed"
    ))
}

/// The checkpoint's value of each var of the VarMap (`vars`, sorted by name): the same names,
/// shapes and dtypes on both sides.
fn check_vars<'c>(ck: &'c TrainingCheckpoint, vars: &[(String, Var)]) -> Result<Vec<&'c Entry>> {
    let names: HashSet<&str> = vars.iter().map(|(n, _)| n.as_str()).collect();
    if let Some(extra) = ck.var_names().into_iter().find(|n| !names.contains(n)) {
        return Err(refused(format!(
            "the checkpoint holds var `{extra}`, which the VarMap does not have"
        )));
    }
    let mut new_values: Vec<&Entry> = Vec::with_capacity(vars.len());
    for (name, var) in vars {
        let Some(e) = ck.entries.get(&format!("{VARS}{name}")) else {
            return Err(refused(format!("the checkpoint has no var `{name}`")));
        };
        if e.shape != var.dims() {
            return Err(refused(format!(
                "var `{name}` has shape {:?} in the checkpoint but {:?} in the VarMap",
                e.shape,
                var.dims()
            )));
        }
        if e.dtype != var.dtype() {
            return Err(refused(format!(
                "var `{name}` has dtype {:?} in the checkpoint but {:?} in the VarMap",
                e.dtype,
                var.dtype()
            )));
        }
        new_values.push(e);
    }
    Ok(new_values)
}

/// An optimizer to restore: it, the checkpoint key of each of its vars' state, and its clip
/// setting with the checkpoint's state loaded (a copy).
type OptimizerPlan<'a> = (
    &'a mut dyn CheckpointOptimizer,
    Vec<String>,
    Option<ClipSetting>,
);

/// The optimizer's restore, checked: the same kind and clip setting as the checkpoint's, its
/// clip's state prepared on a copy, each var's state found under its VarMap name.
fn plan_optimizer<'a>(
    ck: &TrainingCheckpoint,
    optimizer: Option<&'a mut dyn CheckpointOptimizer>,
    vars: &[(String, Var)],
) -> Result<Option<OptimizerPlan<'a>>> {
    let opt = match (optimizer, ck.meta.get(KEY_OPTIMIZER)) {
        (None, None) => return Ok(None),
        (None, Some(kind)) => {
            return Err(refused(format!(
                "the checkpoint holds the state of a {kind}: pass the optimizer to restore"
            )))
        }
        (Some(opt), None) => {
            return Err(refused(format!(
                "the checkpoint holds no optimizer state, but a {} was given",
                opt.kind()
            )))
        }
        (Some(opt), Some(kind)) if kind != opt.kind() => {
            return Err(refused(format!(
                "the checkpoint holds the state of a {kind}, not of a {}",
                opt.kind()
            )))
        }
        (Some(opt), Some(_)) => opt,
    };
    let saved = ck
        .meta
        .get(KEY_OPTIMIZER_CLIP)
        .map_or("none", String::as_str);
    let ours = clip::describe(opt.clip());
    if saved != ours {
        return Err(refused(format!(
            "the checkpoint's {} clips with {saved}, this one with {ours}",
            opt.kind()
        )));
    }
    let clip_state = ck.section(OPTIMIZER_CLIP)?;
    let new_clip = match opt.clip() {
        Some(c) => Some(
            clip::with_state(c, &clip_state)
                .map_err(|e| refused(format!("the optimizer's clip state: {e}")))?,
        ),
        None => None,
    };
    let keys = var_keys(
        &names_by_id(vars),
        opt.optimizer_vars(),
        "TrainingCheckpoint::restore",
    )
    .map_err(|e| refused(e.to_string()))?;
    Ok(Some((opt, keys, new_clip)))
}

/// The separate clip setting's restore, checked: the same setting, its state on a copy.
fn plan_clip<'a>(
    ck: &TrainingCheckpoint,
    target: Option<&'a mut ClipSetting>,
) -> Result<Option<(&'a mut ClipSetting, ClipSetting)>> {
    match (target, ck.meta.get(KEY_CLIP)) {
        (None, None) => Ok(None),
        (None, Some(saved)) => Err(refused(format!(
            "the checkpoint holds a clip setting ({saved}): pass it to restore"
        ))),
        (Some(_), None) => Err(refused("the checkpoint holds no clip setting".into())),
        (Some(target), Some(saved)) => {
            let ours = clip::describe(Some(target));
            if *saved != ours {
                return Err(refused(format!(
                    "the checkpoint's clip setting is {saved}, this one is {ours}"
                )));
            }
            let new = clip::with_state(target, &ck.section(CLIP)?)
                .map_err(|e| refused(format!("the clip state: {e}")))?;
            Ok(Some((target, new)))
        }
    }
}

/// The scaler's restore, checked: its state loaded into a copy.
fn plan_scaler<'a>(
    ck: &TrainingCheckpoint,
    target: Option<&'a mut GradScaler>,
) -> Result<Option<(&'a mut GradScaler, GradScaler)>> {
    match (target, ck.meta.contains_key(KEY_SCALER)) {
        (None, false) => Ok(None),
        (None, true) => Err(refused(
            "the checkpoint holds a GradScaler's state: pass the scaler to restore".into(),
        )),
        (Some(_), false) => Err(refused("the checkpoint holds no GradScaler state".into())),
        (Some(target), true) => {
            let mut new = target.clone();
            new.load_state_dict(&ck.section(SCALER)?)
                .map_err(|e| refused(format!("the GradScaler state: {e}")))?;
            Ok(Some((target, new)))
        }
    }
}

/// What puts an optimizer back: it, its old state and its old clip setting.
type OptimizerRollback<'a> = (
    &'a mut dyn CheckpointOptimizer,
    StateBackup,
    Option<ClipSetting>,
);

/// Loads the optimizer's state and clip (checked whole first: a refusal changes nothing).
fn load_optimizer<'a>(
    ck: &TrainingCheckpoint,
    (opt, keys, new_clip): OptimizerPlan<'a>,
) -> Result<OptimizerRollback<'a>> {
    let values: HashMap<&str, StateValue<'_>> = ck
        .section_entries(OPTIMIZER)
        .map(|(k, e)| (k, StateValue::Entry(e)))
        .collect();
    let old_state = opt
        .load_optimizer_values(&values, &keys)
        .map_err(|e| refused(format!("the optimizer state: {e}")))?;
    let old_clip = opt.clip().cloned();
    if let Some(c) = new_clip {
        if let Err(e) = opt.replace_clip(c) {
            let outcome = match opt.put_back_state(old_state) {
                Ok(()) => "nothing was changed",
                Err(_) => "putting the optimizer's state back failed as well",
            };
            return Err(candle_core::Error::Msg(format!(
                "TrainingCheckpoint::restore: the optimizer's clip setting: {e}; {outcome}"
            )));
        }
    }
    Ok((opt, old_state, old_clip))
}

/// Sets every var to its new value; on a device error, puts the vars (and the optimizer, from
/// `rollback`) back as far as the device allows, and says how far.
fn set_vars(
    vars: &[(String, Var)],
    new_values: &[&Entry],
    old_values: &[Entry],
    rollback: Option<OptimizerRollback<'_>>,
) -> Result<()> {
    for (i, ((name, var), value)) in vars.iter().zip(new_values).enumerate() {
        let Err(e) = value.to_tensor(var.device()).and_then(|t| var.set(&t)) else {
            continue;
        };
        // Var `i` may be half written: it is put back too.
        let mut put_back = true;
        for ((_, var), old) in vars.iter().zip(old_values).take(i + 1) {
            put_back &= old
                .to_tensor(var.device())
                .and_then(|t| var.set(&t))
                .is_ok();
        }
        if let Some((opt, state, clip)) = rollback {
            put_back &= opt.put_back_state(state).is_ok();
            if let Some(c) = clip {
                put_back &= opt.replace_clip(c).is_ok();
            }
        }
        let outcome = if put_back {
            "the vars and the optimizer were put back as they were"
        } else {
            "putting the vars and the optimizer back failed as well: they are partly \
             restored, load the checkpoint again or start afresh"
        };
        return Err(candle_core::Error::Msg(format!(
            "TrainingCheckpoint::restore: cannot set var `{name}` ({e}); {outcome}"
        )));
    }
    Ok(())
}
