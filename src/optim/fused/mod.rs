//! What [`FusedAdamW`](crate::FusedAdamW) and [`FusedSgd`](crate::FusedSgd) share, over one
//! [`FusedCore`]: the vars and their flat state, the clip folded into the step, the counters
//! (this file); the step itself ([`step`]); the state dict ([`state_dict`]); and the public
//! methods both types have, generated once ([`api`]). Each optimizer supplies its update rule
//! (`ops::fused_step::Rule`) and the names of its state tensors.

use std::collections::HashSet;

use candle_core::{bail, DType, Device, Result, Tensor, Var};
use candle_nn::VarMap;

use super::clip_setting::ClipSetting;
use super::skip::SkipSetting;
use crate::ops::fused_step::{
    state_class, FlatState, Place, Rule, CLIPPED, CONTROL_WORDS, SKIPPED, STEPS,
};
use crate::ops::varmap::sorted_vars;

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
    pub(crate) skip: SkipSetting,
    pub(super) last_norm: Option<Tensor>,
    /// With a limit: the skipped-step count after the last step, and the non-finite steps
    /// skipped in a row up to it (kept on the host; unknown until the first step with a limit).
    pub(super) skip_run: Option<(u64, u64)>,
    /// The non-finite steps skipped in a row up to the last step, kept lazily on the device
    /// (0-d `I64`; `None`: 0).
    pub(super) run: Option<Tensor>,
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
        let mut named = sorted_vars(varmap, "from_varmap")?;
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
            skip: SkipSetting::default(),
            last_norm: None,
            skip_run: None,
            run: None,
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
        self.skip.skip_nonfinite = skip;
        self.skip_run = None;
    }

    pub(crate) fn set_max_consecutive_skips(&mut self, limit: usize) {
        self.skip.max_consecutive_skips = Some(limit);
        self.skip_run = None;
    }

    pub(crate) fn last_norm(&self) -> Option<&Tensor> {
        self.last_norm.as_ref()
    }

    /// Whether `max_consecutive_skips` is set (GradScaler then keeps off the one-read path,
    /// whose gradients a refused skip would leave unscaled).
    pub(crate) fn has_skip_limit(&self) -> bool {
        self.skip.max_consecutive_skips.is_some()
    }

    /// A step skipped without running ([`GradScaler`](crate::GradScaler)'s step after an
    /// `unscale_` that found a non-finite gradient): adds 1 to the skipped-step count on the
    /// device (no host read), and counts towards `max_consecutive_skips` as a skip of
    /// `step_skipping_nonfinite` does (with a limit, a skip beyond it is refused and changes
    /// nothing).
    pub(crate) fn record_skip(&mut self) -> Result<()> {
        let run = match self.skip.max_consecutive_skips {
            Some(_) => {
                let (skipped_before, run) = self.skip_run_so_far()?;
                // GradScaler's skips count whatever `skip_nonfinite` says.
                let forced = SkipSetting {
                    skip_nonfinite: true,
                    ..self.skip
                };
                if let Err(e) = forced.check_run(CALLER, run) {
                    self.skip_run = Some((skipped_before, run));
                    return Err(e);
                }
                Some((skipped_before + 1, run + 1))
            }
            None => None,
        };
        let before = self.skipped_steps_on_device()?;
        self.bump_skipped()?;
        self.note_run(&before)?;
        self.skip_run = run;
        Ok(())
    }

    /// Updates the lazy run of skips after a step: one longer when the skipped count moved
    /// from `before`, else 0 (a few tiny device ops; nothing is read back).
    pub(super) fn note_run(&mut self, before: &Tensor) -> Result<()> {
        let skipped = (self.skipped_steps_on_device()? - before)?.squeeze(0)?;
        self.run = Some(match &self.run {
            Some(run) => ((run + Tensor::new(1i64, &self.device)?)? * skipped)?,
            None => skipped,
        });
        Ok(())
    }

    /// The non-finite steps skipped in a row up to the last step.
    pub(crate) fn consecutive_skips(&self) -> Result<u64> {
        match &self.run {
            Some(run) => Ok(run.to_scalar::<i64>()?.max(0) as u64),
            None => Ok(0),
        }
    }

    pub(super) fn skip_run_so_far(&self) -> Result<(u64, u64)> {
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

    pub(super) fn counter(&self, index: usize) -> Result<u64> {
        Ok(self.control.narrow(0, index, 1)?.to_vec1::<i64>()?[0].max(0) as u64)
    }

    pub(crate) fn steps(&self) -> Result<u64> {
        self.counter(STEPS)
    }

    pub(crate) fn clipped_steps(&self) -> Result<u64> {
        self.counter(CLIPPED)
    }

    pub(crate) fn skipped_steps(&self) -> Result<u64> {
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

/// The caller named in the errors of a fused optimizer's step.
pub(super) const CALLER: &str = "fused optimizer step";
