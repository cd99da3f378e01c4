//! The fused optimizers' state as named tensors: [`FusedCore::state_dict`], its checked load,
//! and the safetensors file.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use candle_core::{bail, DType, Device, Result, Tensor};

use super::FusedCore;
use crate::io::atomic::save_safetensors_atomically;
use crate::ops::fused_step::{state_dtype, CLIPPED, CONTROL_WORDS, SKIPPED, STEPS};

/// Keys of the counters in a state dict.
const KEY_STEPS: &str = "step";
const KEY_CLIPPED: &str = "clipped_steps";
const KEY_SKIPPED: &str = "skipped_steps";

impl FusedCore {
    /// The state as named tensors (copies): the counters, and each var's state tensors under
    /// `<key>.<name>` with the rule's `names`. With `optional` (SGD's momentum buffer), a var
    /// whose state has not started yet (no gradient since momentum was on) has none.
    pub(crate) fn state_dict(
        &self,
        names: &[&str],
        optional: bool,
    ) -> Result<HashMap<String, Tensor>> {
        let control = self.control.to_device(&Device::Cpu)?.to_vec1::<i64>()?;
        let mut dict = HashMap::new();
        for (key, index) in [
            (KEY_STEPS, STEPS),
            (KEY_CLIPPED, CLIPPED),
            (KEY_SKIPPED, SKIPPED),
        ] {
            dict.insert(key.to_string(), Tensor::new(control[index], &Device::Cpu)?);
        }
        for (i, key) in self.keys.iter().enumerate() {
            if optional && control[CONTROL_WORDS + i] == 0 {
                continue;
            }
            let place = self.state.places[i];
            for (name, slot) in names.iter().zip(&self.state.buffers) {
                if let Some(buffer) = &slot[place.class] {
                    let t = buffer.narrow(0, place.offset, place.len)?;
                    dict.insert(
                        format!("{key}.{name}"),
                        t.reshape(self.vars[i].shape())?.copy()?,
                    );
                }
            }
        }
        Ok(dict)
    }

    /// Loads a state saved by [`state_dict`](Self::state_dict) of an optimizer of the same kind
    /// over vars of the same shapes and dtypes. Everything is checked before anything changes.
    pub(crate) fn load_state_dict(
        &mut self,
        dict: &HashMap<String, Tensor>,
        names: &[&str],
        optional: bool,
    ) -> Result<()> {
        let counter = |key: &str| -> Result<i64> {
            let Some(t) = dict.get(key) else {
                bail!("load_state_dict: the state has no `{key}`")
            };
            if t.rank() != 0 || t.dtype() != DType::I64 {
                bail!(
                    "load_state_dict: `{key}` must be a 0-d I64 tensor, got {:?} {:?}",
                    t.dtype(),
                    t.dims()
                )
            }
            let v = t.to_scalar::<i64>()?;
            if v < 0 {
                bail!("load_state_dict: `{key}` is negative ({v})")
            }
            Ok(v)
        };
        let mut control = vec![
            counter(KEY_STEPS)?,
            counter(KEY_CLIPPED)?,
            counter(KEY_SKIPPED)?,
        ];
        let mut expected: HashSet<String> = [KEY_STEPS, KEY_CLIPPED, KEY_SKIPPED]
            .iter()
            .map(|k| k.to_string())
            .collect();
        let mut new_state = Vec::with_capacity(self.vars.len());
        for (i, (var, key)) in self.vars.iter().zip(&self.keys).enumerate() {
            let dtype = state_dtype(var.dtype());
            let mut tensors = Vec::new();
            for name in names {
                let full = format!("{key}.{name}");
                match dict.get(&full) {
                    Some(t) => {
                        if t.dims() != var.dims() {
                            bail!(
                                "load_state_dict: `{full}` has shape {:?}, but var #{i} has shape {:?}; nothing was loaded",
                                t.dims(),
                                var.dims()
                            )
                        }
                        if t.dtype() != dtype {
                            bail!(
                                "load_state_dict: `{full}` has dtype {:?}, but var #{i} ({:?}) keeps its state in {dtype:?}; nothing was loaded",
                                t.dtype(),
                                var.dtype()
                            )
                        }
                        tensors.push(t.to_device(&self.device)?);
                        expected.insert(full);
                    }
                    None if optional => {}
                    None => bail!(
                        "load_state_dict: the state has no `{full}` (var #{i}); was it saved by an optimizer over other vars? nothing was loaded"
                    ),
                }
            }
            if optional && !tensors.is_empty() && tensors.len() != names.len() {
                bail!("load_state_dict: var #{i} has only part of its state; nothing was loaded")
            }
            control.push(!tensors.is_empty() as i64);
            new_state.push(tensors);
        }
        if let Some(extra) = dict.keys().find(|k| !expected.contains(*k)) {
            bail!(
                "load_state_dict: unexpected `{extra}`: the state has {} entries this optimizer ({} vars) does not know; nothing was loaded",
                dict.keys().filter(|k| !expected.contains(*k)).count(),
                self.vars.len()
            )
        }
        // Checked: build the new buffers (zeros for a var without a saved state), then apply.
        let mut buffers = Vec::with_capacity(names.len());
        for slot in 0..names.len() {
            let mut pieces: [Vec<Tensor>; 2] = [Vec::new(), Vec::new()];
            for (i, var) in self.vars.iter().enumerate() {
                let place = self.state.places[i];
                let piece = match new_state[i].get(slot) {
                    Some(t) => t.flatten_all()?,
                    None => Tensor::zeros(place.len, state_dtype(var.dtype()), &self.device)?,
                };
                pieces[place.class].push(piece);
            }
            let mut buffer = [None, None];
            for class in 0..2 {
                if !pieces[class].is_empty() {
                    // A fresh storage (`cat` of one piece may share the caller's).
                    buffer[class] = Some(Tensor::cat(&pieces[class], 0)?.copy()?);
                }
            }
            buffers.push(buffer);
        }
        self.control = Tensor::new(control, &self.device)?;
        self.state.buffers = buffers;
        self.skip_run = None;
        Ok(())
    }

    pub(crate) fn save_state(&self, path: &Path, names: &[&str], optional: bool) -> Result<()> {
        save_safetensors_atomically(&self.state_dict(names, optional)?, path)
    }

    pub(crate) fn load_state(&mut self, path: &Path, names: &[&str], optional: bool) -> Result<()> {
        let dict = candle_core::safetensors::load(path, &Device::Cpu)?;
        self.load_state_dict(&dict, names, optional)
    }
}
