//! The fused optimizers' state as named tensors: [`FusedCore::state_dict`] (each entry holds
//! exactly its var's elements), the host entries of a checkpoint or state file (each buffer read
//! to the host once, [`FusedCore::state_entries`]), and a checked load from either
//! ([`FusedCore::load_state_values`]) that builds each new buffer once and keeps the old buffers
//! for a rollback, copying nothing.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use candle_core::{bail, DType, Device, Result, Tensor, WithDType};

use super::FusedCore;
use crate::io::format::{self, host_bytes, Entry};
use crate::io::state_file;
use crate::ops::fused_step::{state_dtype, CLIPPED, CONTROL_WORDS, SKIPPED, STEPS};

/// Keys of the counters in a state dict.
const KEY_STEPS: &str = "step";
const KEY_CLIPPED: &str = "clipped_steps";
const KEY_SKIPPED: &str = "skipped_steps";

/// The largest step count a state may hold: the update computes the bias correction with the
/// next step as an `i32` (CPU twin and kernels alike), so the count must stay below `i32::MAX`.
const MAX_STEPS: i64 = i32::MAX as i64 - 1;

/// State tensors whose values cannot be negative (AdamW's second moment).
const NONNEGATIVE: [&str; 1] = ["exp_avg_sq"];

/// A state tensor to load: from a state dict, or from a checkpoint or state file.
#[derive(Clone, Copy)]
pub enum StateValue<'a> {
    Tensor(&'a Tensor),
    Entry(&'a Entry),
}

impl StateValue<'_> {
    fn dims(&self) -> &[usize] {
        match self {
            StateValue::Tensor(t) => t.dims(),
            StateValue::Entry(e) => &e.shape,
        }
    }

    fn dtype(&self) -> DType {
        match self {
            StateValue::Tensor(t) => t.dtype(),
            StateValue::Entry(e) => e.dtype,
        }
    }

    /// Its elements into `values` (dims and dtype checked by the caller).
    fn read_into<T: WithDType + bytemuck::Pod>(&self, values: &mut [T]) -> Result<()> {
        match self {
            StateValue::Tensor(t) => values.copy_from_slice(&t.flatten_all()?.to_vec1::<T>()?),
            StateValue::Entry(e) => format::read_into(values, e.bytes()),
        }
        Ok(())
    }

    /// Its value as a 0-d I64 counter.
    fn counter(&self) -> Result<i64> {
        match self {
            StateValue::Tensor(t) => t.to_scalar::<i64>(),
            StateValue::Entry(e) => {
                Ok(i64::from_le_bytes(e.bytes().try_into().map_err(|_| {
                    candle_core::Error::Msg("a counter of the wrong length".into())
                })?))
            }
        }
    }
}

/// What [`FusedCore::load_state_values`] replaced, to put back if a later part of a restore
/// fails: the old buffers themselves, not copies.
#[derive(Debug)]
pub struct StateBackup {
    control: Tensor,
    buffers: Vec<[Option<Tensor>; 2]>,
    skip_run: Option<(u64, u64)>,
    run: Option<Tensor>,
    diverged: Option<String>,
}

impl FusedCore {
    /// The state as named tensors, each its var's elements only (a copy on the vars' device):
    /// the counters, and each var's state tensors under `<key>.<name>` with the rule's `names`.
    /// With `optional` (SGD's momentum buffer), a var whose state has not started yet (no
    /// gradient since momentum was on) has none.
    pub(crate) fn state_dict(
        &self,
        names: &[&str],
        optional: bool,
    ) -> Result<HashMap<String, Tensor>> {
        let control = self.control.to_device(&Device::Cpu)?.to_vec1::<i64>()?;
        let mut dict = HashMap::new();
        for (key, index) in counters() {
            dict.insert(key.to_string(), Tensor::new(control[index], &Device::Cpu)?);
        }
        for (i, key) in self.keys.iter().enumerate() {
            if optional && control[CONTROL_WORDS + i] == 0 {
                continue;
            }
            let place = self.state.places[i];
            for (name, slot) in names.iter().zip(&self.state.buffers) {
                if let Some(buffer) = &slot[place.class] {
                    // `force_contiguous` copies the view; `copy` would clone the whole buffer.
                    let t = buffer.narrow(0, place.offset, place.len)?;
                    dict.insert(
                        format!("{key}.{name}"),
                        t.reshape(self.vars[i].shape())?.force_contiguous()?,
                    );
                }
            }
        }
        Ok(dict)
    }

    /// The state as host entries under `<keys[i]>.<name>` for var `i` (the checkpoint passes the
    /// vars' `VarMap` names): each state buffer is read to the host once, and every var's entry
    /// is a range of that one host copy.
    pub(crate) fn state_entries(
        &self,
        names: &[&str],
        optional: bool,
        keys: &[String],
    ) -> Result<BTreeMap<String, Entry>> {
        self.check_keys(keys)?;
        let control = self.control.to_device(&Device::Cpu)?.to_vec1::<i64>()?;
        let mut entries = BTreeMap::new();
        for (key, index) in counters() {
            let value = Tensor::new(control[index], &Device::Cpu)?;
            entries.insert(key.to_string(), Entry::from_tensor(&value)?);
        }
        for (name, slot) in names.iter().zip(&self.state.buffers) {
            for (class, buffer) in slot.iter().enumerate() {
                let Some(buffer) = buffer else { continue };
                let host = Arc::new(host_bytes(buffer)?);
                let size = buffer.dtype().size_in_bytes();
                for (i, place) in self.state.places.iter().enumerate() {
                    let absent = optional && control[CONTROL_WORDS + i] == 0;
                    if place.class != class || absent {
                        continue;
                    }
                    let range = place.offset * size..(place.offset + place.len) * size;
                    let entry =
                        Entry::in_buffer(&host, range, buffer.dtype(), self.vars[i].dims())?;
                    entries.insert(format!("{}.{name}", keys[i]), entry);
                }
            }
        }
        Ok(entries)
    }

    /// Loads a state saved by [`state_dict`](Self::state_dict) or
    /// [`state_entries`](Self::state_entries) of an optimizer of the same kind over vars of the
    /// same shapes and dtypes, var `i`'s state under `<keys[i]>.<name>`. Everything is checked
    /// before anything changes: the entries' names, shapes and dtypes, the counters (not
    /// negative, the step count within [`MAX_STEPS`]), every value finite and second moments not
    /// negative. Each new buffer is built once on the host and moved to the device; the old ones
    /// are returned, for [`put_back`](Self::put_back).
    pub(crate) fn load_state_values(
        &mut self,
        dict: &HashMap<&str, StateValue<'_>>,
        names: &[&str],
        optional: bool,
        keys: &[String],
    ) -> Result<StateBackup> {
        self.check_keys(keys)?;
        let mut control = Vec::with_capacity(CONTROL_WORDS + self.vars.len());
        for (key, _) in counters() {
            control.push(counter(dict, key)?);
        }
        // Which var has which state tensors, checked for shape and dtype.
        let present = self.check_entries(dict, names, optional, keys)?;
        control.extend(present.iter().map(|&p| i64::from(p)));
        // Checked: build each new buffer once (zeros for a var without a saved state), checking
        // its values as they arrive, then apply.
        let buffers = self.fill_buffers(dict, names, keys, &present)?;
        // Checked. The old buffers go to the host for the rollback (no copy on the CPU; on a
        // device one host copy, before anything changes), then the new ones go up one at a time
        // after the old ones are dropped: the device never holds two states.
        let control = Tensor::new(control, &self.device)?;
        let old_on_host = on_host(&self.state.buffers)?;
        let backup = StateBackup {
            control: std::mem::replace(&mut self.control, control),
            buffers: old_on_host,
            skip_run: self.skip_run.take(),
            run: self.run.take(),
            // A loaded state supersedes a failed step across ranks (every rank reloads).
            diverged: self.diverged.take(),
        };
        self.state.buffers.clear();
        match to_device(buffers, &self.device) {
            Ok(new) => {
                self.state.buffers = new;
                Ok(backup)
            }
            Err(e) => {
                let outcome = match self.put_back(backup) {
                    Ok(()) => "the old state was put back",
                    Err(_) => "putting the old state back failed as well: load a state again",
                };
                bail!("load_state_dict: cannot move the state to the device ({e}); {outcome}")
            }
        }
    }

    /// Checks the state entries of every var (shape, state dtype, all or none of a var's with
    /// `optional`, none missing without it) and refuses an entry no var or counter owns; returns
    /// which vars have a saved state.
    fn check_entries(
        &self,
        dict: &HashMap<&str, StateValue<'_>>,
        names: &[&str],
        optional: bool,
        keys: &[String],
    ) -> Result<Vec<bool>> {
        let mut expected: HashSet<String> = counters().iter().map(|(k, _)| k.to_string()).collect();
        let mut present = Vec::with_capacity(self.vars.len());
        for (i, (var, key)) in self.vars.iter().zip(keys).enumerate() {
            let dtype = state_dtype(var.dtype());
            let mut found = 0;
            for name in names {
                let full = format!("{key}.{name}");
                match dict.get(full.as_str()) {
                    Some(v) => {
                        if v.dims() != var.dims() {
                            bail!(
                                "load_state_dict: `{full}` has shape {:?}, but var #{i} (`{key}`) has shape {:?}; nothing was loaded",
                                v.dims(),
                                var.dims()
                            )
                        }
                        if v.dtype() != dtype {
                            bail!(
                                "load_state_dict: `{full}` has dtype {:?}, but var #{i} (`{key}`, {:?}) keeps its state in {dtype:?}; nothing was loaded",
                                v.dtype(),
                                var.dtype()
                            )
                        }
                        found += 1;
                        expected.insert(full);
                    }
                    None if optional => {}
                    None => bail!(
                        "load_state_dict: the state has no `{full}` (var #{i}); was it saved by an optimizer over other vars? nothing was loaded"
                    ),
                }
            }
            if optional && found != 0 && found != names.len() {
                bail!("load_state_dict: var #{i} (`{key}`) has only part of its state; nothing was loaded")
            }
            present.push(found != 0);
        }
        if let Some(extra) = dict.keys().find(|k| !expected.contains(**k)) {
            bail!(
                "load_state_dict: unexpected `{extra}`: the state has {} entries this optimizer ({} vars) does not know; nothing was loaded",
                dict.keys().filter(|k| !expected.contains(**k)).count(),
                self.vars.len()
            )
        }
        Ok(present)
    }

    /// The new state buffers, one per state name and state class, each built once on the host
    /// from the entries (zeros for a var without a saved state), its values checked as they
    /// arrive.
    fn fill_buffers(
        &self,
        dict: &HashMap<&str, StateValue<'_>>,
        names: &[&str],
        keys: &[String],
        present: &[bool],
    ) -> Result<Vec<[Option<Tensor>; 2]>> {
        let totals = self.totals();
        let mut buffers = Vec::with_capacity(names.len());
        for name in names {
            let mut slot = [None, None];
            for (class, total) in totals.iter().enumerate() {
                if *total == 0 {
                    continue;
                }
                let filled = if class == 0 {
                    self.fill_buffer::<f32>(dict, keys, name, class, *total, present)?
                } else {
                    self.fill_buffer::<f64>(dict, keys, name, class, *total, present)?
                };
                slot[class] = Some(filled);
            }
            buffers.push(slot);
        }
        Ok(buffers)
    }

    /// One state buffer of `class` for the state tensor `name`, on the host.
    fn fill_buffer<T: WithDType + bytemuck::Pod + std::fmt::Debug>(
        &self,
        dict: &HashMap<&str, StateValue<'_>>,
        keys: &[String],
        name: &str,
        class: usize,
        total: usize,
        present: &[bool],
    ) -> Result<Tensor> {
        let mut values = vec![T::zero(); total];
        for (i, place) in self.state.places.iter().enumerate() {
            if place.class != class || !present[i] {
                continue;
            }
            let full = format!("{}.{name}", keys[i]);
            let Some(value) = dict.get(full.as_str()) else {
                continue;
            };
            let part = &mut values[place.offset..place.offset + place.len];
            value.read_into(part)?;
            if let Some(bad) = part.iter().find(|x| !x.to_f64().is_finite()) {
                bail!("load_state_dict: `{full}` holds a non-finite value ({bad:?}); nothing was loaded")
            }
            if NONNEGATIVE.contains(&name) {
                if let Some(bad) = part.iter().find(|x| x.to_f64() < 0.0) {
                    bail!("load_state_dict: `{full}` is a second moment but holds a negative value ({bad:?}); nothing was loaded")
                }
            }
        }
        Tensor::from_vec(values, total, &Device::Cpu)
    }

    /// One key per var, or an error (a caller's mistake, not the user's).
    fn check_keys(&self, keys: &[String]) -> Result<()> {
        if keys.len() != self.vars.len() {
            bail!(
                "fused optimizer: {} keys for {} vars",
                keys.len(),
                self.vars.len()
            )
        }
        Ok(())
    }

    /// Puts back what [`load_state_values`](Self::load_state_values) replaced (its buffers moved
    /// back to the device: an error only if the device fails).
    pub(crate) fn put_back(&mut self, backup: StateBackup) -> Result<()> {
        self.control = backup.control;
        self.skip_run = backup.skip_run;
        self.run = backup.run;
        self.diverged = backup.diverged;
        self.state.buffers.clear();
        self.state.buffers = to_device(backup.buffers, &self.device)?;
        Ok(())
    }

    /// [`load_state_values`](Self::load_state_values) of a state dict keyed as this optimizer
    /// keys its vars.
    pub(crate) fn load_state_dict(
        &mut self,
        dict: &HashMap<String, Tensor>,
        names: &[&str],
        optional: bool,
    ) -> Result<()> {
        let values = dict
            .iter()
            .map(|(k, t)| (k.as_str(), StateValue::Tensor(t)))
            .collect();
        let keys = self.keys.clone();
        self.load_state_values(&values, names, optional, &keys)?;
        Ok(())
    }

    /// Saves the state as a verified state file of a `kind` (each buffer read once).
    pub(crate) fn save_state(
        &self,
        path: &Path,
        kind: &str,
        names: &[&str],
        optional: bool,
    ) -> Result<()> {
        let entries = self.state_entries(names, optional, &self.keys)?;
        state_file::save_entries(&entries, kind, path)
    }

    /// Loads a state file saved by [`save_state`](Self::save_state) of a `kind`, verified. An
    /// optimizer keyed by position (built with `new`) refuses it when two of its vars share a
    /// shape and dtype: another process may list them in another order (`VarMap::all_vars`),
    /// and the state would go onto the wrong var without an error.
    pub(crate) fn load_state(
        &mut self,
        path: &Path,
        kind: &str,
        names: &[&str],
        optional: bool,
    ) -> Result<()> {
        if !self.named {
            let mut seen = HashMap::new();
            for (i, var) in self.vars.iter().enumerate() {
                // F16, BF16 and F32 vars all keep F32 state: the state's dtype decides.
                let state = state_dtype(var.dtype());
                if let Some(j) = seen.insert((var.dims().to_vec(), state), i) {
                    bail!(
                        "{kind}::load_state: vars #{j} and #{i} have the same shape {:?} and state dtype {state:?}, and this optimizer knows them by position only: a state saved by another process may belong to them in the other order. Build the optimizer with `{kind}::from_varmap` or `{kind}::new_named` (state keyed by name), or use a TrainingCheckpoint; nothing was loaded",
                        var.dims()
                    )
                }
            }
        }
        let entries = state_file::load_entries(path, kind)?;
        let values = entries
            .iter()
            .map(|(k, e)| (k.as_str(), StateValue::Entry(e)))
            .collect();
        let keys = self.keys.clone();
        self.load_state_values(&values, names, optional, &keys)?;
        Ok(())
    }
}

/// State buffers read to the host (the same tensors on the CPU: no copy).
fn on_host(buffers: &[[Option<Tensor>; 2]]) -> Result<Vec<[Option<Tensor>; 2]>> {
    buffers
        .iter()
        .map(|[a, b]| {
            let host =
                |t: &Option<Tensor>| t.as_ref().map(|t| t.to_device(&Device::Cpu)).transpose();
            Ok([host(a)?, host(b)?])
        })
        .collect()
}

/// Host state buffers moved to `device` one at a time, each host buffer dropped once it is up
/// (no copy on the CPU).
fn to_device(
    buffers: Vec<[Option<Tensor>; 2]>,
    device: &Device,
) -> Result<Vec<[Option<Tensor>; 2]>> {
    let mut moved = Vec::with_capacity(buffers.len());
    for [a, b] in buffers {
        let up = |t: Option<Tensor>| t.map(|t| t.to_device(device)).transpose();
        moved.push([up(a)?, up(b)?]);
    }
    Ok(moved)
}

/// The counters' keys and their words in the control tensor.
fn counters() -> [(&'static str, usize); 3] {
    [
        (KEY_STEPS, STEPS),
        (KEY_CLIPPED, CLIPPED),
        (KEY_SKIPPED, SKIPPED),
    ]
}

/// A counter of a state: a 0-d I64, not negative; the step count within [`MAX_STEPS`].
fn counter(dict: &HashMap<&str, StateValue<'_>>, key: &str) -> Result<i64> {
    let Some(v) = dict.get(key) else {
        bail!("load_state_dict: the state has no `{key}`")
    };
    if !v.dims().is_empty() || v.dtype() != DType::I64 {
        bail!(
            "load_state_dict: `{key}` must be a 0-d I64 tensor, got {:?} {:?}",
            v.dtype(),
            v.dims()
        )
    }
    let value = v.counter()?;
    if value < 0 {
        bail!("load_state_dict: `{key}` is negative ({value})")
    }
    if key == KEY_STEPS && value > MAX_STEPS {
        bail!("load_state_dict: `{key}` is {value}, past the {MAX_STEPS} steps the update can count (its bias correction takes the step as an i32); nothing was loaded")
    }
    Ok(value)
}
