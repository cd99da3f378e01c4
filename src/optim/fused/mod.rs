//! What [`FusedAdamW`](crate::FusedAdamW) and [`FusedSgd`](crate::FusedSgd) share, over one
//! [`FusedCore`]: the vars and their flat state, the clip folded into the step, the counters
//! (this file); the step itself ([`step`]); the state dict ([`state_dict`]); and the public
//! methods both types have, generated once ([`api`]). Each optimizer supplies its update rule
//! (`ops::fused_step::Rule`) and the names of its state tensors.

use std::collections::HashSet;

use candle_core::{bail, DType, Device, Result, Tensor, Var};
use candle_nn::VarMap;

use super::clip_setting::ClipSetting;
use crate::ops::fused_step::{
    state_class, FlatState, Place, Rule, CLIPPED, CONTROL_WORDS, SKIPPED, STEPS,
};

pub(crate) mod api;
pub(crate) mod state_dict;
pub(crate) mod step;

/// The shared core of the fused optimizers.
#[derive(Debug)]
pub(crate) struct FusedCore {
    /// The float vars given at construction, each once.
    pub(super) vars: Vec<Var>,
    /// Each var's key in a state dict: its name (`from_varmap`, `new_named`) or its position.
    pub(super) keys: Vec<String>,
    /// Whether the keys are names (a state file then finds each var's state by name).
    pub(super) named: bool,
    /// The vars' state, flat (slots created for the rule's needs, never dropped).
    pub(super) state: FlatState,
    /// `I64` on the vars' device: steps, clipped steps, skipped steps, then each var's "state
    /// exists" flag (see `ops::fused_step`).
    pub(super) control: Tensor,
    pub(super) device: Device,
    pub(super) clip: Option<ClipSetting>,
    pub(super) skip_nonfinite: bool,
    pub(super) last_norm: Option<Tensor>,
    pub(super) max_consecutive_skips: Option<usize>,
    /// With a limit: the skipped-step count after the last step, and the non-finite steps
    /// skipped in a row up to it (kept on the host; unknown until the first step with a limit).
    pub(super) skip_run: Option<(usize, usize)>,
    /// Why a step across ranks failed on this rank after its collective (the other ranks
    /// stepped): every later `step_across` is refused on every rank.
    pub(super) diverged: Option<String>,
}

impl FusedCore {
    /// The core for `vars` (non-float ones left out, duplicates once), keyed by position.
    pub(crate) fn new(vars: Vec<Var>) -> Result<Self> {
        let mut seen = HashSet::new();
        let vars: Vec<Var> = vars
            .into_iter()
            .filter(|v| v.dtype().is_float() && seen.insert(v.id()))
            .collect();
        let keys = (0..vars.len()).map(|i| i.to_string()).collect();
        Self::with_keys(vars, keys, false)
    }

    /// The core for named vars, in the order given, keyed by name (non-float vars left out). Two
    /// entries with one name, or one var under two names, are an error.
    pub(crate) fn new_named(named: Vec<(String, Var)>) -> Result<Self> {
        let (mut names, mut ids) = (HashSet::new(), HashSet::new());
        for (name, var) in &named {
            if !names.insert(name.as_str()) {
                bail!("new_named: the name `{name}` is given twice")
            }
            if !ids.insert(var.id()) {
                bail!("new_named: the var named `{name}` is given under another name as well")
            }
        }
        let (keys, vars) = named
            .into_iter()
            .filter(|(_, v)| v.dtype().is_float())
            .unzip();
        Self::with_keys(vars, keys, true)
    }

    /// The core for every var of `varmap`, ordered and keyed by name.
    pub(crate) fn from_varmap(varmap: &VarMap) -> Result<Self> {
        let mut named: Vec<(String, Var)> = {
            let data = varmap.data().lock().map_err(|_| {
                candle_core::Error::Msg("from_varmap: the VarMap's lock is poisoned".into())
            })?;
            data.iter()
                .map(|(name, var)| (name.clone(), var.clone()))
                .collect()
        };
        named.sort_by(|a, b| a.0.cmp(&b.0));
        named.retain(|(_, v)| v.dtype().is_float());
        let (keys, vars) = named.into_iter().unzip();
        Self::with_keys(vars, keys, true)
    }

    fn with_keys(vars: Vec<Var>, keys: Vec<String>, named: bool) -> Result<Self> {
        let device = vars.first().map_or(Device::Cpu, |v| v.device().clone());
        for (i, var) in vars.iter().enumerate() {
            if !var.device().same_device(&device) {
                bail!(
                    "fused optimizer: var #{i} is on {:?}, var #0 on {:?}; one optimizer per device",
                    var.device().location(),
                    device.location()
                )
            }
            if !var.is_contiguous() {
                bail!(
                    "fused optimizer: var #{i} (shape {:?}) is not contiguous",
                    var.dims()
                )
            }
        }
        let control = Tensor::zeros(CONTROL_WORDS + vars.len(), DType::I64, &device)?;
        // Each var's place: consecutive in its dtype's buffers, in var order.
        let mut totals = [0usize; 2];
        let places = vars
            .iter()
            .map(|v| {
                let class = state_class(v.dtype());
                let place = Place {
                    class,
                    offset: totals[class],
                    len: v.elem_count(),
                };
                totals[class] += place.len;
                place
            })
            .collect();
        Ok(Self {
            state: FlatState {
                buffers: Vec::new(),
                places,
            },
            vars,
            keys,
            named,
            control,
            device,
            clip: None,
            skip_nonfinite: false,
            last_norm: None,
            max_consecutive_skips: None,
            skip_run: None,
            diverged: None,
        })
    }

    pub(crate) fn vars(&self) -> &[Var] {
        &self.vars
    }

    pub(crate) fn set_clip(&mut self, clip: ClipSetting) -> Result<()> {
        clip.validate()?;
        self.clip = Some(clip);
        Ok(())
    }

    pub(crate) fn clip(&self) -> Option<&ClipSetting> {
        self.clip.as_ref()
    }

    pub(crate) fn set_skip_nonfinite(&mut self, skip: bool) {
        self.skip_nonfinite = skip;
        self.skip_run = None;
    }

    pub(crate) fn set_max_consecutive_skips(&mut self, limit: usize) {
        self.max_consecutive_skips = Some(limit);
        self.skip_run = None;
    }

    pub(crate) fn last_norm(&self) -> Option<&Tensor> {
        self.last_norm.as_ref()
    }

    /// Whether `max_consecutive_skips` is set (GradScaler then keeps off the one-read path,
    /// whose gradients a refused skip would leave unscaled).
    pub(crate) fn has_skip_limit(&self) -> bool {
        self.max_consecutive_skips.is_some()
    }

    /// A step skipped without running ([`GradScaler`](crate::GradScaler)'s step after an
    /// `unscale_` that found a non-finite gradient): adds 1 to the skipped-step count on the
    /// device (no host read), and counts towards `max_consecutive_skips` as a skip of
    /// `step_skipping_nonfinite` does (with a limit, a skip beyond it is refused and changes
    /// nothing).
    pub(crate) fn record_skip(&mut self) -> Result<()> {
        let run = match self.max_consecutive_skips {
            Some(limit) => {
                let (skipped_before, run) = self.skip_run_so_far()?;
                if run >= limit {
                    self.skip_run = Some((skipped_before, run));
                    return Err(too_many_skips(run, limit));
                }
                Some((skipped_before + 1, run + 1))
            }
            None => None,
        };
        self.bump_skipped()?;
        self.skip_run = run;
        Ok(())
    }

    /// The skipped-step count after the last step and the non-finite steps skipped in a row up to
    /// it: kept on the host, read once (the count) when unknown.
    pub(super) fn skip_run_so_far(&self) -> Result<(usize, usize)> {
        match self.skip_run {
            Some(known) => Ok(known),
            None => Ok((self.skipped_steps()?, 0)),
        }
    }

    /// Adds 1 to the skipped-step count, on the device (a new control tensor).
    pub(super) fn bump_skipped(&mut self) -> Result<()> {
        let words = self.control.dim(0)?;
        let skipped = self.control.narrow(0, SKIPPED, 1)?;
        let one = Tensor::ones(1, DType::I64, &self.device)?;
        let mut pieces = vec![self.control.narrow(0, 0, SKIPPED)?, (skipped + one)?];
        if words > SKIPPED + 1 {
            pieces.push(self.control.narrow(0, SKIPPED + 1, words - SKIPPED - 1)?);
        }
        self.control = Tensor::cat(&pieces, 0)?;
        Ok(())
    }

    pub(super) fn counter(&self, index: usize) -> Result<usize> {
        Ok(self.control.narrow(0, index, 1)?.to_vec1::<i64>()?[0] as usize)
    }

    pub(crate) fn steps(&self) -> Result<usize> {
        self.counter(STEPS)
    }

    pub(crate) fn clipped_steps(&self) -> Result<usize> {
        self.counter(CLIPPED)
    }

    pub(crate) fn skipped_steps(&self) -> Result<usize> {
        self.counter(SKIPPED)
    }

    /// The skipped-step count as a 1-element `I64` tensor on the device: a copy, not read back
    /// (GradScaler's found-inf after a step on the one-read path, with no host read).
    pub(crate) fn skipped_steps_on_device(&self) -> Result<Tensor> {
        // `force_contiguous` copies the one word; `copy` would clone the whole control tensor.
        self.control.narrow(0, SKIPPED, 1)?.force_contiguous()
    }

    /// Total elements of each state dtype's buffers.
    pub(super) fn totals(&self) -> [usize; 2] {
        let mut totals = [0; 2];
        for p in &self.state.places {
            totals[p.class] += p.len;
        }
        totals
    }

    /// Creates the state slots a rule needs that do not exist yet (zeros).
    pub(super) fn ensure_state(&mut self, count: usize) -> Result<()> {
        let totals = self.totals();
        while self.state.buffers.len() < count {
            let mut slot = [None, None];
            for (class, dtype) in [(0, DType::F32), (1, DType::F64)] {
                if totals[class] > 0 {
                    slot[class] = Some(Tensor::zeros(totals[class], dtype, &self.device)?);
                }
            }
            self.state.buffers.push(slot);
        }
        Ok(())
    }

    /// Creates the state of a rule at construction (AdamW's moments, as candle's `AdamW::new`).
    pub(crate) fn init_state(&mut self, rule: Rule) -> Result<()> {
        self.ensure_state(rule.state_count())
    }

    /// The device of the vars.
    pub(crate) fn device(&self) -> &Device {
        &self.device
    }
}

/// The error of a non-finite step past `max_consecutive_skips = limit`, `run` skipped before it.
fn too_many_skips(run: usize, limit: usize) -> candle_core::Error {
    candle_core::Error::Msg(format!(
        "fused optimizer step: {} non-finite steps in a row, more than max_consecutive_skips = {limit}: the training is broken (a diverged model, a bad batch, a loss scale out of range); nothing was changed",
        run + 1
    ))
    .bt()
}
