//! What [`FusedAdamW`](crate::FusedAdamW) and [`FusedSgd`](crate::FusedSgd) share: the vars and
//! their state, the clip folded into the step, the counters, and the state's I/O. Each optimizer
//! supplies its update [`Rule`] and the names of its state tensors.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use candle_core::{backprop::GradStore, bail, DType, Device, Result, Tensor, Var};
use candle_nn::VarMap;

use super::clip_setting::ClipSetting;
use crate::dispatch;
use crate::dist;
use crate::dist::ProcessGroup;
use crate::ops::clip::returned_norm;
use crate::ops::clip::DEFAULT_EPS;
use crate::ops::fused_step::{
    state_class, state_dtype, FlatState, Place, Rule, Step, StepClip, Target, CLIPPED,
    CONTROL_WORDS, SKIPPED, STEPS,
};
use crate::ops::gradients::{check_matches_var, storage_key, GradientSet};
use crate::ops::norm_type::NormType;

/// Keys of the counters in a state dict.
const KEY_STEPS: &str = "step";
const KEY_CLIPPED: &str = "clipped_steps";
const KEY_SKIPPED: &str = "skipped_steps";

/// The shared core of the fused optimizers.
#[derive(Debug)]
pub(crate) struct FusedCore {
    /// The float vars given at construction, each once.
    vars: Vec<Var>,
    /// Each var's key in a state dict: its name (`from_varmap`) or its position.
    keys: Vec<String>,
    /// The vars' state, flat (slots created for the rule's needs, never dropped).
    state: FlatState,
    /// `I64` on the vars' device: steps, clipped steps, skipped steps, then each var's "state
    /// exists" flag (see `backend::update`).
    control: Tensor,
    device: Device,
    clip: Option<ClipSetting>,
    skip_nonfinite: bool,
    last_norm: Option<Tensor>,
    max_consecutive_skips: Option<usize>,
    /// With a limit: the skipped-step count after the last step, and the non-finite steps
    /// skipped in a row up to it (kept on the host; unknown until the first step with a limit).
    skip_run: Option<(usize, usize)>,
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
        Self::with_keys(vars, keys)
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
        Self::with_keys(vars, keys)
    }

    fn with_keys(vars: Vec<Var>, keys: Vec<String>) -> Result<Self> {
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
            control,
            device,
            clip: None,
            skip_nonfinite: false,
            last_norm: None,
            max_consecutive_skips: None,
            skip_run: None,
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
    fn skip_run_so_far(&self) -> Result<(usize, usize)> {
        match self.skip_run {
            Some(known) => Ok(known),
            None => Ok((self.skipped_steps()?, 0)),
        }
    }

    /// Adds 1 to the skipped-step count, on the device (a new control tensor).
    fn bump_skipped(&mut self) -> Result<()> {
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

    fn counter(&self, index: usize) -> Result<usize> {
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
        self.control.narrow(0, SKIPPED, 1)?.copy()
    }

    /// Total elements of each state dtype's buffers.
    fn totals(&self) -> [usize; 2] {
        let mut totals = [0; 2];
        for p in &self.state.places {
            totals[p.class] += p.len;
        }
        totals
    }

    /// Creates the state slots a rule needs that do not exist yet (zeros).
    fn ensure_state(&mut self, count: usize) -> Result<()> {
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

    /// One step: collect and check the gradients, decide the clip, run the fused update.
    /// Nothing changes when it fails. With a `group`, the norm of the clip (and the finite check
    /// of `skip_nonfinite` without a clip) is the one over every rank's gradients (see
    /// `step_across`). With `max_consecutive_skips`, one host read of the skip count after the
    /// step; a skip beyond the limit is undone (a skipped step changed only the counters and the
    /// clip's bookkeeping) and reported.
    pub(crate) fn step(
        &mut self,
        grads: &GradStore,
        rule: Rule,
        group: Option<&dyn ProcessGroup>,
    ) -> Result<()> {
        self.step_limited(grads, rule, None, group)
    }

    /// [`step`](Self::step) with GradScaler's `prescale` (see `backend::update::Step`), and
    /// `max_consecutive_skips` enforced.
    fn step_limited(
        &mut self,
        grads: &GradStore,
        rule: Rule,
        prescale: Option<&Tensor>,
        group: Option<&dyn ProcessGroup>,
    ) -> Result<()> {
        let Some(limit) = self.max_consecutive_skips.filter(|_| self.skip_nonfinite) else {
            self.skip_run = None;
            return self.step_with(grads, rule, prescale, group);
        };
        let (skipped_before, run) = self.skip_run_so_far()?;
        let saved = (
            self.control.copy()?,
            self.clip.clone(),
            self.last_norm.clone(),
        );
        self.step_with(grads, rule, prescale, group)?;
        let skipped = self.skipped_steps()?;
        if skipped == skipped_before {
            self.skip_run = Some((skipped, 0));
            return Ok(());
        }
        if run >= limit {
            (self.control, self.clip, self.last_norm) = saved;
            self.skip_run = Some((skipped_before, run));
            return Err(too_many_skips(run, limit));
        }
        self.skip_run = Some((skipped, run + 1));
        Ok(())
    }

    /// One step, with GradScaler's `prescale` and a process group.
    fn step_with(
        &mut self,
        grads: &GradStore,
        rule: Rule,
        prescale: Option<&Tensor>,
        group: Option<&dyn ProcessGroup>,
    ) -> Result<()> {
        self.ensure_state(rule.state_count())?;
        let mut targets = Vec::with_capacity(self.vars.len());
        let mut step_grads = Vec::with_capacity(self.vars.len());
        let collected = (|| {
            for (i, var) in self.vars.iter().enumerate() {
                let Some(grad) = grads.get(var.as_tensor()) else {
                    continue;
                };
                check_gradient(i, var, grad)?;
                targets.push(Target {
                    param: var.as_tensor().clone(),
                    index: i,
                });
                step_grads.push(grad.clone());
            }
            GradientSet::from_grads(step_grads)
        })();
        // Across ranks: the global norm, computed first (a rank whose gradients were refused
        // still takes part, so that every rank fails with it).
        let global_norm = match (group, self.across_norm_type()) {
            (Some(group), Some(norm_type)) => {
                let local = collected
                    .as_ref()
                    .map(|set| GradientSet::from_grads(set.grads().to_vec()))
                    .map_err(|e| candle_core::Error::Msg(e.to_string()))
                    .and_then(|r| r);
                Some(dist::set_norm_across(
                    "step_across",
                    local,
                    norm_type,
                    group,
                )?)
            }
            _ => None,
        };
        let set = collected?;
        // Value clipping across ranks with skipping on: the largest |g| over every rank decides
        // the skip (known on the host: the collective returned it), so every rank skips together.
        if let (Some(ClipSetting::Value { .. }), Some((value, norm))) = (&self.clip, &global_norm) {
            if !value.is_finite() {
                self.bump_skipped()?;
                self.last_norm = Some(norm.clone());
                return Ok(());
            }
        }
        // The exact global norm (F64) that the step's coefficient is computed from; for ZClip
        // across ranks, the norm that gives its coefficient (`ZClip::step_for_norm`).
        // AutoClip takes the norm as returned (rounded to its dtype), as in one process. On the
        // vars' device (a rank without gradients has a CPU `set`).
        let mut given = match &global_norm {
            Some((value, norm)) => {
                let value = if matches!(self.clip, Some(ClipSetting::AutoClip(_))) {
                    returned_norm(*value, norm.dtype())
                } else {
                    *value
                };
                Some(Tensor::new(value, &self.device)?)
            }
            None => None,
        };
        // ZClip's state changes before the step: put it back if the step fails.
        let saved_zclip =
            matches!(self.clip, Some(ClipSetting::ZClip(_))).then(|| self.clip.clone());
        let mut zclip_given: Option<(f64, f64)> = None;
        if let (Some(ClipSetting::ZClip(zclip)), Some((value, norm))) =
            (&mut self.clip, &global_norm)
        {
            let (norm_value, max_norm, eps) =
                zclip.step_for_norm(*value, norm.dtype(), &self.device)?;
            given = Some(Tensor::new(norm_value, &self.device)?);
            zclip_given = Some((max_norm, eps));
        }
        // AutoClip's norm of this step (kept for `last_norm` and its history), read to the host
        // for its percentile.
        let mut autoclip_norm: Option<(Tensor, f64)> = None;
        let mut zclip_state: Option<Tensor> = None;
        let clip = match (&self.clip, &given, &global_norm) {
            (Some(ClipSetting::Norm { max_norm, .. }), Some(given), _) => StepClip::GivenNorm {
                norm: given,
                max_norm: *max_norm,
                eps: DEFAULT_EPS,
            },
            (Some(ClipSetting::AutoClip(autoclip)), Some(given), Some((value, norm))) => {
                let value = returned_norm(*value, norm.dtype());
                let threshold = autoclip.threshold_with(value);
                autoclip_norm = Some((norm.clone(), value));
                StepClip::GivenNorm {
                    norm: given,
                    max_norm: threshold,
                    eps: DEFAULT_EPS,
                }
            }
            (Some(ClipSetting::ZClip(_)), Some(given), _) => {
                let Some((max_norm, eps)) = zclip_given else {
                    bail!("internal error: ZClip across ranks without its clip")
                };
                StepClip::GivenNorm {
                    norm: given,
                    max_norm,
                    eps,
                }
            }
            // skip_nonfinite without a clip: the global max |g| decides; a finite one gives the
            // coefficient 1 (no write), a non-finite one skips the step on every rank.
            (None, Some(given), _) => StepClip::GivenNorm {
                norm: given,
                max_norm: f64::INFINITY,
                eps: 0.0,
            },
            (None, _, _) => StepClip::None,
            (
                Some(ClipSetting::Norm {
                    max_norm,
                    norm_type,
                }),
                _,
                _,
            ) => StepClip::Norm {
                norm_type: *norm_type,
                max_norm: *max_norm,
                eps: DEFAULT_EPS,
            },
            (Some(ClipSetting::Value { clip_value }), _, _) => StepClip::Value(*clip_value),
            // A step without gradients leaves the statistics alone.
            (Some(ClipSetting::ZClip(_)), _, _) if set.grads().is_empty() => StepClip::None,
            (Some(ClipSetting::ZClip(zclip)), _, _) => StepClip::ZClip {
                state: zclip_state.insert(zclip.state_on(&self.device)?),
                params: zclip.params(),
            },
            (Some(ClipSetting::Agc { clipping, eps }), _, _) => StepClip::Agc {
                clipping: *clipping,
                eps: *eps,
            },
            (Some(ClipSetting::AutoClip(autoclip)), _, _) => {
                let norm = dispatch::norm::total_norm(&set, NormType::L2)?;
                let value = norm.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                let threshold = autoclip.threshold_with(value);
                StepClip::GivenNorm {
                    norm: &autoclip_norm.insert((norm, value)).0,
                    max_norm: threshold,
                    eps: DEFAULT_EPS,
                }
            }
        };
        let outcome = match dispatch::fused_step::fused_step(&Step {
            targets,
            grads: &set,
            rule,
            clip,
            skip_nonfinite: self.skip_nonfinite,
            prescale,
            control: &self.control,
            state: &self.state,
        }) {
            Ok(outcome) => outcome,
            Err(e) => {
                if let Some(clip) = saved_zclip {
                    self.clip = clip;
                }
                return Err(e);
            }
        };
        self.last_norm = match autoclip_norm {
            Some((norm, value)) => {
                if let Some(ClipSetting::AutoClip(autoclip)) = &mut self.clip {
                    autoclip.record(value);
                }
                Some(norm)
            }
            // Across ranks, the clip's norm is the global one (GivenNorm reports none; AGC's
            // own pass measures only this rank's gradients).
            None if global_norm.is_some() && self.clip.is_some() => {
                global_norm.map(|(_, norm)| norm)
            }
            None => outcome.norm,
        };
        if let (Some(ClipSetting::ZClip(zclip)), Some(state)) =
            (&mut self.clip, outcome.policy_state)
        {
            zclip.set_state(state);
        }
        Ok(())
    }

    /// The norm a step across ranks needs from the group: the clip's norm (AutoClip, ZClip and
    /// AGC, for `last_norm`: L2), or for `skip_nonfinite` without a clip the largest `|g|`; none
    /// for value clipping (element-wise: each rank clamps and checks its own gradients).
    fn across_norm_type(&self) -> Option<NormType> {
        match &self.clip {
            Some(ClipSetting::Norm { norm_type, .. }) => Some(*norm_type),
            Some(ClipSetting::AutoClip(_) | ClipSetting::ZClip(_) | ClipSetting::Agc { .. }) => {
                Some(NormType::L2)
            }
            // Element-wise; with skipping on, the global largest |g| decides the skip.
            Some(ClipSetting::Value { .. }) if self.skip_nonfinite => Some(NormType::Inf),
            Some(ClipSetting::Value { .. }) => None,
            None if self.skip_nonfinite => Some(NormType::Inf),
            None => None,
        }
    }

    /// [`step`](Self::step) with non-finite steps skipped whatever the setting: the step of
    /// [`GradScaler`](crate::GradScaler), whose found-inf the fused step decides on the device.
    /// With `prescale` (`inv_scale`, 0-d F32 on the device), the gradients are still scaled: the
    /// step unscales them as it reads them and writes them back unscaled (GradScaler's one-read
    /// path; only where `backend::update::runs_prescaled`, with a clip that `prescale_supports`:
    /// not AutoClip, ZClip or AGC, which decide from the gradients before the step).
    pub(crate) fn step_skipping_nonfinite(
        &mut self,
        grads: &GradStore,
        rule: Rule,
        prescale: Option<&Tensor>,
    ) -> Result<()> {
        if prescale.is_some() && !prescale_supports(self.clip.as_ref()) {
            bail!("internal error: a prescaled step with a clip that decides before the step")
        }
        let setting = std::mem::replace(&mut self.skip_nonfinite, true);
        let result = self.step_limited(grads, rule, prescale, None);
        self.skip_nonfinite = setting;
        result
    }

    /// The device of the vars.
    pub(crate) fn device(&self) -> &Device {
        &self.device
    }

    // -----------------------------------------------------------------------------------------
    // State.

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
        candle_core::safetensors::save(&self.state_dict(names, optional)?, path)
    }

    pub(crate) fn load_state(&mut self, path: &Path, names: &[&str], optional: bool) -> Result<()> {
        let dict = candle_core::safetensors::load(path, &Device::Cpu)?;
        self.load_state_dict(&dict, names, optional)
    }
}

/// Whether GradScaler's one-read path (the gradients unscaled as the step reads them) can run with
/// this clip: not with those that decide from the gradients before the step (AutoClip's host
/// percentile, ZClip's statistics, AGC's per-unit pass), which then see unscaled gradients only
/// if `unscale_` ran first.
pub(crate) fn prescale_supports(clip: Option<&ClipSetting>) -> bool {
    !matches!(
        clip,
        Some(ClipSetting::AutoClip(_) | ClipSetting::ZClip(_) | ClipSetting::Agc { .. })
    )
}

/// The error of a non-finite step past `max_consecutive_skips = limit`, `run` skipped before it.
fn too_many_skips(run: usize, limit: usize) -> candle_core::Error {
    candle_core::Error::Msg(format!(
        "fused optimizer step: {} non-finite steps in a row, more than max_consecutive_skips = {limit}: the training is broken (a diverged model, a bad batch, a loss scale out of range); nothing was changed",
        run + 1
    ))
    .bt()
}

/// A gradient the fused step can use for var #`i`: same dtype, shape and device, and not sharing
/// the var's storage (the step writes the var while it reads the gradient).
fn check_gradient(i: usize, var: &Var, grad: &Tensor) -> Result<()> {
    check_matches_var("fused optimizer step", i, var, grad)?;
    if !grad.device().same_device(var.device()) {
        bail!(
            "fused optimizer step: the gradient of var #{i} is on {:?} but the var on {:?}; nothing was modified",
            grad.device().location(),
            var.device().location()
        )
    }
    if storage_key(grad) == storage_key(var.as_tensor()) {
        bail!("fused optimizer step: the gradient of var #{i} shares the var's storage; nothing was modified")
    }
    Ok(())
}

/// The methods [`FusedAdamW`](crate::FusedAdamW) and [`FusedSgd`](crate::FusedSgd) share, over
/// their `core: FusedCore` and `params` fields, with doc examples for each type. Arguments: the
/// type, its config type, the `use` line that brings the config into a doc example, the state's
/// names and whether a var's state may be absent, and the state's description.
macro_rules! fused_optimizer_api {
    ($ty:ident, $params:ident, $import:literal, $state:expr, $optional:expr, $state_doc:literal) => {
        impl $ty {
            /// A step with non-finite steps skipped on the device whatever
            /// [`skip_nonfinite`](Self::skip_nonfinite) says ([`GradScaler`](crate::GradScaler)'s
            /// step). With `prescale`, the step unscales the gradients itself (see `FusedCore`).
            pub(crate) fn step_skipping_nonfinite(
                &mut self,
                grads: &GradStore,
                prescale: Option<&Tensor>,
            ) -> Result<()> {
                validate(&self.params)?;
                self.core
                    .step_skipping_nonfinite(grads, rule(&self.params), prescale)
            }

            /// The core's device and clip, for GradScaler's choice of path.
            pub(crate) fn core(&self) -> &crate::optim::fused::FusedCore {
                &self.core
            }

            /// A step skipped without running, counted in `skipped_steps` (GradScaler's step
            /// after an `unscale_` that found a non-finite gradient).
            pub(crate) fn record_skip(&mut self) -> Result<()> {
                self.core.record_skip()
            }

            #[doc = concat!("The optimizer for every var of `varmap`, ordered by name, its state keyed by name: the way
to save in one process and resume in another (`varmap.all_vars()` comes in a `HashMap`'s
order, which differs between processes).

```
use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
", $import, "
# fn main() -> candle_core::Result<()> {
let varmap = VarMap::new();
let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
vb.get(3, \"b\")?;
vb.get(2, \"a\")?;
let opt = candle_grad_clip::", stringify!($ty), "::from_varmap(&varmap, ", stringify!($params), "::default())?;
assert_eq!(opt.vars()[0].dims(), [2]); // \"a\" first
# Ok(()) }
```")]
            pub fn from_varmap(varmap: &VarMap, params: $params) -> Result<Self> {
                validate(&params)?;
                let mut core = FusedCore::from_varmap(varmap)?;
                core.init_state(rule(&params))?;
                Ok(Self { core, params })
            }

            #[doc = concat!("The hyper-parameters.

```
use candle_nn::Optimizer;
", $import, "
let opt = candle_grad_clip::", stringify!($ty), "::new(vec![], ", stringify!($params), "::default())?;
assert_eq!(opt.params().lr, ", stringify!($params), "::default().lr);
# Ok::<(), candle_core::Error>(())
```")]
            pub fn params(&self) -> &$params {
                &self.params
            }

            #[doc = concat!("Changes the hyper-parameters from the next step on; a bad config is refused and the old one
kept.

```
use candle_nn::Optimizer;
", $import, "
let mut opt = candle_grad_clip::", stringify!($ty), "::new(vec![], ", stringify!($params), "::default())?;
assert!(opt.set_params(", stringify!($params), " { lr: -1.0, ..Default::default() }).is_err());
opt.set_params(", stringify!($params), " { lr: 0.5, ..Default::default() })?;
assert_eq!(opt.learning_rate(), 0.5);
# Ok::<(), candle_core::Error>(())
```")]
            pub fn set_params(&mut self, params: $params) -> Result<()> {
                validate(&params)?;
                self.params = params;
                Ok(())
            }

            #[doc = concat!("Folds clipping into every step (validated as [`Clipped`](crate::Clipped) validates it).

```
use candle_nn::Optimizer;
use candle_grad_clip::{ClipSetting, ", stringify!($ty), "};
", $import, "
let opt = ", stringify!($ty), "::new(vec![], ", stringify!($params), "::default())?.with_clip(ClipSetting::value(0.5))?;
assert!(opt.clip_setting().is_some());
assert!(", stringify!($ty), "::new(vec![], ", stringify!($params), "::default())?.with_clip(ClipSetting::norm(-1.0)).is_err());
# Ok::<(), candle_core::Error>(())
```")]
            pub fn with_clip(mut self, clip: ClipSetting) -> Result<Self> {
                self.core.set_clip(clip)?;
                Ok(self)
            }

            #[doc = concat!("Whether to skip steps whose gradients are not all finite (see the type's documentation).

```
use candle_nn::Optimizer;
", $import, "
let opt = candle_grad_clip::", stringify!($ty), "::new(vec![], ", stringify!($params), "::default())?.skip_nonfinite(true);
assert_eq!(opt.skipped_steps()?, 0);
# Ok::<(), candle_core::Error>(())
```")]
            pub fn skip_nonfinite(mut self, skip: bool) -> Self {
                self.core.set_skip_nonfinite(skip);
                self
            }

            #[doc = concat!("With [`skip_nonfinite`](Self::skip_nonfinite): skip at most `limit` non-finite steps in a
row; the next non-finite one in the run returns an error saying that the training is broken, and
changes nothing. A finite step starts the count again. Without a limit a step reads nothing back;
with one, each step reads the skipped-step count (one transfer; on CUDA, one synchronisation). The
run length is kept on the host: a state loaded with `load_state_dict` starts a new run.

```
use candle_core::{backprop::GradStore, DType, Device, Tensor, Var};
use candle_nn::Optimizer;
", $import, "
let w = Var::zeros(2, DType::F32, &Device::Cpu)?;
let mut opt = candle_grad_clip::", stringify!($ty), "::new(vec![w.clone()], ", stringify!($params), "::default())?
    .skip_nonfinite(true)
    .max_consecutive_skips(1);
let mut grads = GradStore::default();
grads.insert(&w, Tensor::new(&[f32::NAN, 0.0], &Device::Cpu)?);
opt.step(&grads)?; // skipped
assert!(opt.step(&grads).is_err()); // the second in a row
assert_eq!(opt.skipped_steps()?, 1);
# Ok::<(), candle_core::Error>(())
```")]
            pub fn max_consecutive_skips(mut self, limit: usize) -> Self {
                self.core.set_max_consecutive_skips(limit);
                self
            }

            #[doc = concat!("The clip setting (for AutoClip and ZClip, with their current state), if any: ZClip's
statistics for a checkpoint are `clip_setting()` → [`ZClip::state_dict`](crate::ZClip::state_dict).

```
use candle_nn::Optimizer;
", $import, "
assert!(candle_grad_clip::", stringify!($ty), "::new(vec![], ", stringify!($params), "::default())?.clip_setting().is_none());
# Ok::<(), candle_core::Error>(())
```")]
            pub fn clip_setting(&self) -> Option<&ClipSetting> {
                self.core.clip()
            }

            #[doc = concat!("The norm of the last step's gradients before clipping, in the norm the setting bounds (the
largest `|g|` for value clipping, L2 for AutoClip and for AGC), as a 0-d tensor on their device; `None`
without a clip or before the first step.

```
use candle_nn::Optimizer;
", $import, "
assert!(candle_grad_clip::", stringify!($ty), "::new(vec![], ", stringify!($params), "::default())?.last_norm().is_none());
# Ok::<(), candle_core::Error>(())
```")]
            pub fn last_norm(&self) -> Option<&Tensor> {
                self.core.last_norm()
            }

            #[doc = concat!("Steps taken (skipped ones not counted). Reads the device (one synchronisation on CUDA).

```
use candle_nn::Optimizer;
", $import, "
assert_eq!(candle_grad_clip::", stringify!($ty), "::new(vec![], ", stringify!($params), "::default())?.steps()?, 0);
# Ok::<(), candle_core::Error>(())
```")]
            pub fn steps(&self) -> Result<usize> {
                self.core.steps()
            }

            #[doc = concat!("Steps whose gradients the clip changed (a NaN or infinite norm counts; for AGC, steps
where some unit was clipped; skipped steps do not). Reads the device (one synchronisation on CUDA).

```
use candle_nn::Optimizer;
", $import, "
assert_eq!(candle_grad_clip::", stringify!($ty), "::new(vec![], ", stringify!($params), "::default())?.clipped_steps()?, 0);
# Ok::<(), candle_core::Error>(())
```")]
            pub fn clipped_steps(&self) -> Result<usize> {
                self.core.clipped_steps()
            }

            #[doc = concat!("Steps skipped because a gradient was not finite. Reads the device (one synchronisation on
CUDA).

```
use candle_nn::Optimizer;
", $import, "
assert_eq!(candle_grad_clip::", stringify!($ty), "::new(vec![], ", stringify!($params), "::default())?.skipped_steps()?, 0);
# Ok::<(), candle_core::Error>(())
```")]
            pub fn skipped_steps(&self) -> Result<usize> {
                self.core.skipped_steps()
            }

            #[doc = concat!("The vars it updates (the float vars given at construction, each once, in order).

```
use candle_core::{DType, Device, Var};
use candle_nn::Optimizer;
", $import, "
let w = Var::zeros(2, DType::F32, &Device::Cpu)?;
let opt = candle_grad_clip::", stringify!($ty), "::new(vec![w.clone(), w], ", stringify!($params), "::default())?;
assert_eq!(opt.vars().len(), 1);
# Ok::<(), candle_core::Error>(())
```")]
            pub fn vars(&self) -> &[Var] {
                self.core.vars()
            }

            #[doc = concat!("The state, as copies: `step`, `clipped_steps`, `skipped_steps` (0-d `I64`), and per var ",
$state_doc, " (F32, or F64 for F64 vars), `<key>` the var's position in the list given to
[`new`](Optimizer::new), or its name with [`from_varmap`](Self::from_varmap). The settings
(learning rate and the rest, the clip) are not state.

```
use candle_core::{DType, Device, Var};
use candle_nn::Optimizer;
", $import, "
let w = Var::zeros(2, DType::F32, &Device::Cpu)?;
let state = candle_grad_clip::", stringify!($ty), "::new(vec![w], ", stringify!($params), "::default())?.state_dict()?;
assert_eq!(state[\"step\"].to_scalar::<i64>()?, 0);
# Ok::<(), candle_core::Error>(())
```")]
            pub fn state_dict(&self) -> Result<HashMap<String, Tensor>> {
                self.core.state_dict(&$state, $optional)
            }

            #[doc = concat!("Loads a state from [`state_dict`](Self::state_dict) of an optimizer over vars of the same
shapes and dtypes; a mismatch (count, shape, dtype, a missing or unknown entry) is an error
and nothing changes.

```
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::Optimizer;
use candle_grad_clip::", stringify!($ty), ";
", $import, "
let w = Var::zeros(2, DType::F32, &Device::Cpu)?;
let mut state = ", stringify!($ty), "::new(vec![w.clone()], ", stringify!($params), "::default())?.state_dict()?;
let mut other = ", stringify!($ty), "::new(vec![w], ", stringify!($params), "::default())?;
other.load_state_dict(&state)?;
state.insert(\"1.unknown\".into(), Tensor::zeros(2, DType::F32, &Device::Cpu)?);
assert!(other.load_state_dict(&state).is_err());
# Ok::<(), candle_core::Error>(())
```")]
            pub fn load_state_dict(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
                self.core.load_state_dict(state, &$state, $optional)
            }

            #[doc = concat!("Saves [`state_dict`](Self::state_dict) as a safetensors file.

```no_run
use candle_nn::Optimizer;
", $import, "
let opt = candle_grad_clip::", stringify!($ty), "::new(vec![], ", stringify!($params), "::default())?;
opt.save_state(\"optimizer.safetensors\")?;
# Ok::<(), candle_core::Error>(())
```")]
            pub fn save_state(&self, path: impl AsRef<Path>) -> Result<()> {
                self.core.save_state(path.as_ref(), &$state, $optional)
            }

            #[doc = concat!("Loads a state saved by [`save_state`](Self::save_state), as
[`load_state_dict`](Self::load_state_dict).

```no_run
use candle_nn::Optimizer;
", $import, "
let mut opt = candle_grad_clip::", stringify!($ty), "::new(vec![], ", stringify!($params), "::default())?;
opt.load_state(\"optimizer.safetensors\")?;
# Ok::<(), candle_core::Error>(())
```")]
            pub fn load_state(&mut self, path: impl AsRef<Path>) -> Result<()> {
                self.core.load_state(path.as_ref(), &$state, $optional)
            }

            #[doc = concat!("One step of a sharded model: this rank's vars, with the clip's norm taken over the gradients
of every rank of `group` (see [`total_norm_across`](crate::total_norm_across)), so every rank
scales by the same coefficient; AutoClip's norm and history are the global L2 norm's; ZClip
runs on the global L2 norm (its statistics updated on the host, where that norm is); AGC is
unit-wise (each rank clips its own units; `last_norm` is the global L2 norm); and
`skip_nonfinite` without a clip skips on every rank when any rank's gradients are not finite.
Value clipping is element-wise (each rank clamps its own gradients); with `skip_nonfinite` the
largest `|g|` over every rank decides the skip (so every rank skips together) and is `last_norm`.
Every rank must step together with the same settings.

```
use candle_core::{backprop::GradStore, Device, Tensor, Var};
use candle_nn::Optimizer;
use candle_grad_clip::{ClipSetting, LocalGroup, ", stringify!($ty), "};
", $import, "
# fn main() -> candle_core::Result<()> {
let norms = std::thread::scope(|s| {
    let handles: Vec<_> = LocalGroup::new(2)?
        .into_iter()
        .zip([3f32, 4.])
        .map(|(group, g)| {
            s.spawn(move || -> candle_core::Result<f32> {
                let w = Var::new(&[0f32], &Device::Cpu)?;
                let mut opt = ", stringify!($ty), "::new(vec![w.clone()], ", stringify!($params), "::default())?
                    .with_clip(ClipSetting::norm(1.0))?;
                let mut grads = GradStore::default();
                grads.insert(&w, Tensor::new(&[g], &Device::Cpu)?);
                opt.step_across(&grads, &group)?;
                opt.last_norm().unwrap().to_scalar::<f32>()
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect::<candle_core::Result<Vec<_>>>()
})?;
assert_eq!(norms, [5.0, 5.0]); // the norm of both ranks' gradients, on both
# Ok(()) }
```")]
            pub fn step_across(
                &mut self,
                grads: &GradStore,
                group: &dyn crate::dist::ProcessGroup,
            ) -> Result<()> {
                validate(&self.params)?;
                self.core.step(grads, rule(&self.params), Some(group))
            }
        }
    };
}
pub(crate) use fused_optimizer_api;
