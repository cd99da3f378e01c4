//! Cases for the norm across ranks, shared by the in-process tests (`tests/distributed`, threads
//! through `LocalGroup`) and the MPI driver (`tests/mpi_driver`, processes under `mpirun`).
//!
//! Every rank builds the same random model from the case's seed, computes the one-process
//! reference (`total_norm` and `ClipGradNorm::clip_` over every gradient: the call whose bits the
//! norm across ranks promises), then takes its own share of the gradients (split in several ways:
//! whole tensors, pieces cut at multiples of 2^15 elements, empty ranks, a replicated var) and
//! checks that the norm across ranks and its clipped gradients are bitwise the reference's.
#![allow(dead_code)]

use candle_core::{backprop::GradStore, DType, Device, Result, Tensor, Var};
use candle_grad_clip::{total_norm, total_norm_across, ClipGradNorm, NormType, ProcessGroup};
use rand::{rngs::StdRng, Rng, SeedableRng};

/// The CPU back end's work-item length: pieces cut at multiples of it keep the bitwise promise.
pub const CUT: usize = 1 << 15;

/// Every float dtype a gradient may have (the suites' shared constant).
pub use crate::common::DTYPES;

pub const NORMS: [NormType; 5] = [
    NormType::L1,
    NormType::L2,
    NormType::Inf,
    NormType::P(3.0),
    NormType::P(7.0),
];

/// What the gradient values look like.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Values {
    /// Uniform in (-1, 1).
    Normal,
    /// One +inf, and (odd seeds) one NaN, among normal values.
    Specials,
    /// Near the dtype's largest finite value: sums of powers overflow f64 for F64 (and `p = 7`).
    Huge,
    /// Near the dtype's smallest values: sums of powers underflow for F64 (and `p = 7`).
    Tiny,
}

pub const VALUES: [Values; 4] = [Values::Normal, Values::Specials, Values::Huge, Values::Tiny];

/// How the model's gradients are shared out over the ranks.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Split {
    /// Whole tensors, tensor `i` to rank `i % world`.
    RoundRobin,
    /// Whole tensors in contiguous blocks of the list.
    Blocks,
    /// Everything on the last rank: the others pass no gradient at all.
    AllOnLast,
    /// Whole tensors to random ranks.
    Random,
    /// The big tensor cut into pieces at multiples of [`CUT`], each piece its own var on its own
    /// rank; the other tensors whole, round robin.
    ChunkCuts,
    /// Tensor 1 replicated on every rank (`clip_replicated_across_`), the others round robin.
    Replicated,
}

pub const SPLITS: [Split; 6] = [
    Split::RoundRobin,
    Split::Blocks,
    Split::AllOnLast,
    Split::Random,
    Split::ChunkCuts,
    Split::Replicated,
];

/// Shapes of the model: a tensor of more than two work items, small ones, an empty one, and one
/// whose gradient is a transposed (strided) view.
const SHAPES: [&[usize]; 6] = [&[70_001], &[7, 5], &[0], &[4, 3], &[1], &[129, 33]];
const BIG: usize = 0;
const TRANSPOSED: usize = 3;

fn values(rng: &mut StdRng, n: usize, dtype: DType, kind: Values) -> Vec<f64> {
    let (max, tiny) = match dtype {
        DType::F64 => (1e300, 1e-300),
        DType::F32 => (3e38, 1e-40),
        DType::F16 => (6e4, 1e-7),
        _ => (3e38, 1e-40),
    };
    (0..n)
        .map(|_| {
            let sign = if rng.gen_bool(0.5) { -1.0 } else { 1.0 };
            sign * match kind {
                Values::Normal | Values::Specials => rng.gen_range(0.0..1.0),
                Values::Huge => max * rng.gen_range(0.01..1.0),
                Values::Tiny => tiny * rng.gen_range(1.0..100.0),
            }
        })
        .collect()
}

/// The model of one case: vars and their gradients (rank-independent: built from the seed).
pub struct Model {
    pub vars: Vec<Var>,
    pub grads: Vec<Tensor>,
}

pub fn model(seed: u64, dtype: DType, kind: Values) -> Result<Model> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut vars = Vec::new();
    let mut grads = Vec::new();
    for (i, shape) in SHAPES.iter().enumerate() {
        let n: usize = shape.iter().product();
        let mut v = values(&mut rng, n, dtype, kind);
        if kind == Values::Specials && n > 0 {
            if i == BIG {
                v[n / 2] = f64::INFINITY;
            }
            if i == 5 && seed % 2 == 1 {
                v[7] = f64::NAN;
            }
        }
        let grad = if i == TRANSPOSED {
            let (r, c) = (shape[0], shape[1]);
            Tensor::from_vec(v, (c, r), &Device::Cpu)?
                .to_dtype(dtype)?
                .t()?
        } else {
            Tensor::from_vec(v, shape.to_vec(), &Device::Cpu)?.to_dtype(dtype)?
        };
        vars.push(Var::zeros(shape.to_vec(), dtype, &Device::Cpu)?);
        grads.push(grad);
    }
    Ok(Model { vars, grads })
}

fn store(vars: &[Var], grads: &[Tensor]) -> GradStore {
    let mut store = GradStore::default();
    for (v, g) in vars.iter().zip(grads) {
        store.insert(v, g.clone());
    }
    store
}

/// The raw bits of every element, in logical order (the suites' shared helper).
pub use crate::common::bits;

/// Whether `bits` are a NaN of `dtype`.
fn is_nan(dtype: DType, bits: u64) -> bool {
    match dtype {
        DType::F64 => f64::from_bits(bits).is_nan(),
        DType::F32 => f32::from_bits(bits as u32).is_nan(),
        DType::F16 => half::f16::from_bits(bits as u16).is_nan(),
        _ => half::bf16::from_bits(bits as u16).is_nan(),
    }
}

fn norm_bits(t: &Tensor) -> Result<(DType, u64)> {
    Ok((t.dtype(), bits(t)?[0]))
}

/// One rank's share: its vars and their gradients, and for each, where its elements sit in the
/// reference (tensor index, first element in logical order).
struct Share {
    /// Every var this rank holds, its gradient, where its elements sit in the reference, and
    /// whether it is replicated (on every rank) rather than owned.
    entries: Vec<(Var, Tensor, (usize, usize), bool)>,
}

impl Share {
    fn vars(&self, replicated: bool) -> Vec<Var> {
        self.entries
            .iter()
            .filter(|e| e.3 == replicated)
            .map(|e| e.0.clone())
            .collect()
    }
}

fn share(model: &Model, split: Split, seed: u64, rank: usize, world: usize) -> Result<Share> {
    let n = model.vars.len();
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
    let random: Vec<usize> = (0..n).map(|_| rng.gen_range(0..world)).collect();
    let owner = |i: usize| -> usize {
        match split {
            Split::RoundRobin | Split::ChunkCuts | Split::Replicated => i % world,
            Split::Blocks => i * world / n,
            Split::AllOnLast => world - 1,
            Split::Random => random[i],
        }
    };
    let mut s = Share {
        entries: Vec::new(),
    };
    for i in 0..n {
        if split == Split::Replicated && i == 1 {
            s.entries
                .push((model.vars[i].clone(), model.grads[i].clone(), (i, 0), true));
            continue;
        }
        if split == Split::ChunkCuts && i == BIG {
            let len = model.grads[i].elem_count();
            for (k, start) in (0..len).step_by(CUT).enumerate() {
                // Pieces go round the ranks starting from the last one, each a copy of its own.
                if (world - 1 + k) % world != rank {
                    continue;
                }
                let piece_len = CUT.min(len - start);
                let g = model.grads[i].narrow(0, start, piece_len)?.copy()?;
                let v = Var::zeros(piece_len, g.dtype(), &Device::Cpu)?;
                s.entries.push((v, g, (i, start), false));
            }
            continue;
        }
        if owner(i) == rank {
            s.entries
                .push((model.vars[i].clone(), model.grads[i].clone(), (i, 0), false));
        }
    }
    Ok(s)
}

/// Runs the calls of a case (the one-process reference, then the calls across ranks): to run
/// them under the kernel emulation, say.
pub type Within<'a> = &'a dyn Fn(&mut dyn FnMut() -> Result<()>) -> Result<()>;

/// Runs its argument as it is.
pub fn plain(f: &mut dyn FnMut() -> Result<()>) -> Result<()> {
    f()
}

/// Runs every case on this rank of `group`; returns how many ran. Panics with the case on a
/// mismatch. Every rank must call this with the same `cases`.
pub fn run_cases(
    group: &dyn ProcessGroup,
    cases: &[(u64, DType, NormType, Values, Split)],
) -> usize {
    run_cases_within(group, cases, &plain)
}

/// [`run_cases`] with the calls across ranks run by `within`.
pub fn run_cases_within(
    group: &dyn ProcessGroup,
    cases: &[(u64, DType, NormType, Values, Split)],
    within: Within<'_>,
) -> usize {
    for &(seed, dtype, norm_type, kind, split) in cases {
        let what = format!(
            "rank {} of {}: seed {seed} {dtype:?} {norm_type:?} {kind:?} {split:?}",
            group.rank(),
            group.world_size()
        );
        check_case(group, seed, dtype, norm_type, kind, split, within)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
    }
    cases.len()
}

/// Every combination of dtype, norm, values and split, with a seed each.
pub fn all_cases() -> Vec<(u64, DType, NormType, Values, Split)> {
    let mut cases = Vec::new();
    let mut seed = 1;
    for dtype in DTYPES {
        for norm_type in NORMS {
            for kind in VALUES {
                for split in SPLITS {
                    cases.push((seed, dtype, norm_type, kind, split));
                    seed += 1;
                }
            }
        }
    }
    cases
}

fn check_case(
    group: &dyn ProcessGroup,
    seed: u64,
    dtype: DType,
    norm_type: NormType,
    kind: Values,
    split: Split,
    within: Within<'_>,
) -> Result<()> {
    let model = model(seed, dtype, kind)?;
    let max_norm = 1.0;
    let clip = ClipGradNorm::new(max_norm).with_norm_type(norm_type);
    // The one-process reference over every gradient (under `within` too).
    let all = store(&model.vars, &model.grads);
    let mut clipped = store(
        &model.vars,
        &model
            .grads
            .iter()
            .map(|g| g.copy())
            .collect::<Result<Vec<_>>>()?,
    );
    let (mut reference, mut reference_clip) = (None, None);
    within(&mut || {
        reference = Some(total_norm(&model.vars, &all, norm_type, false)?);
        reference_clip = Some(clip.clip_(&model.vars, &mut clipped)?);
        Ok(())
    })?;
    let want_norm = norm_bits(reference.as_ref().expect("ran"))?;
    let want_clip_norm = norm_bits(reference_clip.as_ref().expect("ran"))?;
    assert_eq!(want_norm, want_clip_norm, "reference norms disagree");
    let want: Vec<Vec<u64>> = model
        .vars
        .iter()
        .map(|v| bits(clipped.get(v).expect("a clipped gradient")))
        .collect::<Result<_>>()?;

    // This rank's share, through the norm across ranks.
    let share = share(&model, split, seed, group.rank(), group.world_size())?;
    let (owned, replicated) = (share.vars(false), share.vars(true));
    let mut grads = GradStore::default();
    for (v, g, _, _) in &share.entries {
        grads.insert(v, g.clone());
    }
    // Before clipping: total_norm_across, with the replicated var passed on rank 0 only.
    let mut counted = owned.clone();
    if group.rank() == 0 {
        counted.extend(replicated.iter().cloned());
    }
    let (mut before, mut after) = (None, None);
    within(&mut || {
        before = Some(total_norm_across(&counted, &grads, norm_type, group)?);
        after = Some(clip.clip_replicated_across_(&owned, &replicated, &mut grads, group)?);
        Ok(())
    })?;
    let got = norm_bits(before.as_ref().expect("ran"))?;
    if got != want_norm {
        candle_core::bail!("total_norm_across {got:?}, one process {want_norm:?}")
    }
    let got = norm_bits(after.as_ref().expect("ran"))?;
    if got != want_norm {
        candle_core::bail!("clip_replicated_across_ returned {got:?}, one process {want_norm:?}")
    }
    for (var, _, (tensor, start), _) in &share.entries {
        let (tensor, start) = (*tensor, *start);
        let got = bits(grads.get(var).expect("a gradient"))?;
        let want = &want[tensor][start..start + got.len()];
        // NaN payloads are not compared: the emulated kernels and the CPU write different NaNs
        // (the norm across ranks always runs the CPU reduction: its norm NaN is compared).
        let same = |a: u64, b: u64| a == b || (is_nan(dtype, a) && is_nan(dtype, b));
        if let Some(k) = (0..got.len()).find(|&k| !same(got[k], want[k])) {
            candle_core::bail!(
                "clipped gradient of tensor {tensor} (piece at {start}), element {k}: bits {:#x}, one process {:#x}",
                got[k],
                want[k]
            )
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Optimizers stepping across ranks (`Clipped::step_across`, `FusedAdamW::step_across`).

/// Gradients of step `step` for var `i` (shape `[7 * i + 3]`), F32; `nan_at` poisons one var.
fn step_grads(vars: &[(usize, Var)], step: usize, nan_at: Option<usize>) -> Result<GradStore> {
    let mut grads = GradStore::default();
    for (i, var) in vars {
        let n = var.elem_count();
        let values: Vec<f32> = (0..n)
            .map(|k| {
                if nan_at == Some(*i) && k == 0 {
                    f32::NAN
                } else {
                    (((k * 31 + i * 17 + step * 7) as f32) * 0.61).sin() * (1.0 + *i as f32)
                }
            })
            .collect();
        grads.insert(var, Tensor::from_vec(values, n, &Device::Cpu)?);
    }
    Ok(grads)
}

const VARS: usize = 7;

/// The vars `i` with `i % world == rank` (all of them for `world = 1`), with fixed start values.
fn owned_vars(rank: usize, world: usize) -> Result<Vec<(usize, Var)>> {
    (0..VARS)
        .filter(|i| i % world == rank)
        .map(|i| {
            let n = 7 * i + 3;
            let start: Vec<f32> = (0..n).map(|k| (k as f32 * 0.1).cos()).collect();
            Ok((
                i,
                Var::from_tensor(&Tensor::from_vec(start, n, &Device::Cpu)?)?,
            ))
        })
        .collect()
}

/// What an optimizer run leaves: each var's bits by index, the last norm's bits per step, and
/// the skipped steps.
type Run = (Vec<(usize, Vec<u64>)>, Vec<Option<u64>>, u64);

/// Three steps over this rank's vars (`group = None`: one process, every var); `step` makes the
/// optimizer on its first call and steps it, returning its last norm and skipped steps.
fn run_steps(
    group: Option<&dyn ProcessGroup>,
    nan_step: Option<usize>,
    mut step: impl FnMut(&[Var], &GradStore, Option<&dyn ProcessGroup>) -> Result<(Option<Tensor>, u64)>,
) -> Result<Run> {
    let (rank, world) = group.map_or((0, 1), |g| (g.rank(), g.world_size()));
    let vars = owned_vars(rank, world)?;
    let plain: Vec<Var> = vars.iter().map(|(_, v)| v.clone()).collect();
    let mut norms = Vec::new();
    let mut skipped = 0;
    for s in 0..3 {
        let grads = step_grads(&vars, s, (nan_step == Some(s)).then_some(5))?;
        let (norm, skips) = step(&plain, &grads, group)?;
        skipped = skips;
        norms.push(match norm {
            Some(n) => Some(bits(&n)?[0]),
            None => None,
        });
    }
    let params = vars
        .iter()
        .map(|(i, v)| Ok((*i, bits(v.as_tensor())?)))
        .collect::<Result<_>>()?;
    Ok((params, norms, skipped))
}

/// Every optimizer case on this rank of `group`, each against the one-process run of the same
/// case (computed here); returns how many cases ran. Every rank must call it.
pub fn check_optimizers(group: &dyn ProcessGroup) -> usize {
    use candle_grad_clip::{
        AutoClip, ClipSetting, Clipped, FusedAdamW, FusedSgd, ParamsSgd, ZClip,
    };
    use candle_nn::{Optimizer, ParamsAdamW, SGD};
    let autoclip = |p| ClipSetting::AutoClip(AutoClip::new(p).expect("autoclip"));
    let mut cases = 0;
    let mut check = |what: String,
                     nan_step: Option<usize>,
                     run: &dyn Fn(Option<&dyn ProcessGroup>) -> Result<Run>| {
        let want = run(None).unwrap_or_else(|e| panic!("{what}, one process: {e}"));
        let (params, norms, skipped) = run(Some(group)).unwrap_or_else(|e| {
            panic!(
                "{what}, rank {} of {}: {e}",
                group.rank(),
                group.world_size()
            )
        });
        let at = format!("{what}: rank {} of {}", group.rank(), group.world_size());
        assert_eq!(norms, want.1, "{at}: the norms");
        assert_eq!(skipped, want.2, "{at}: skipped steps");
        if nan_step.is_some() {
            assert_eq!(skipped, 1, "{at}: the NaN step is skipped");
        }
        for (i, b) in params {
            let w = &want.0.iter().find(|(j, _)| *j == i).expect("var").1;
            assert_eq!(&b, w, "{at}: var {i}");
        }
        cases += 1;
    };
    for clip in [
        ClipSetting::norm(1.0),
        ClipSetting::Norm(ClipGradNorm::new(2.0).with_norm_type(NormType::P(3.0))),
        ClipSetting::value(0.5),
        autoclip(50.0),
        // ZClip on the global norm (statistics on the host across ranks); AGC per rank.
        ClipSetting::ZClip(ZClip::new().with_warmup_steps(2).with_z_threshold(0.5)),
        ClipSetting::agc(0.01),
    ] {
        check(format!("Clipped<SGD> {clip:?}"), None, &|group| {
            let mut opt: Option<Clipped<SGD>> = None;
            run_steps(group, None, |vars, grads, group| {
                let opt = match &mut opt {
                    Some(o) => o,
                    None => opt.insert(Clipped::from_optimizer(
                        SGD::new(vars.to_vec(), 0.1)?,
                        vars.to_vec(),
                        clip.clone(),
                    )?),
                };
                match group {
                    Some(g) => opt.step_across(grads, g)?,
                    None => opt.step(grads)?,
                }
                Ok((opt.last_norm().cloned(), 0))
            })
        });
    }
    for (clip, skip, nan_step) in [
        (Some(ClipSetting::norm(1.0)), false, None),
        (
            Some(ClipSetting::Norm(
                ClipGradNorm::new(0.5).with_norm_type(NormType::Inf),
            )),
            false,
            None,
        ),
        (Some(autoclip(30.0)), false, None),
        (
            Some(ClipSetting::ZClip(
                ZClip::new().with_warmup_steps(2).with_z_threshold(0.5),
            )),
            false,
            None,
        ),
        (Some(ClipSetting::agc(0.01)), false, None),
        // A NaN on one rank at step 1: every rank skips that step.
        (None, true, Some(1)),
        (Some(ClipSetting::norm(1.0)), true, Some(1)),
        (Some(ClipSetting::value(0.5)), true, Some(1)),
    ] {
        let what = format!("FusedAdamW {clip:?} skip_nonfinite {skip}");
        check(what, nan_step, &|group| {
            let mut opt: Option<FusedAdamW> = None;
            run_steps(group, nan_step, |vars, grads, group| {
                let opt = match &mut opt {
                    Some(o) => o,
                    None => {
                        let mut o = FusedAdamW::new(vars.to_vec(), ParamsAdamW::default())?
                            .with_skip_nonfinite(skip);
                        if let Some(c) = &clip {
                            o = o.with_clip(c.clone())?;
                        }
                        opt.insert(o)
                    }
                };
                match group {
                    Some(g) => opt.step_across(grads, g)?,
                    None => opt.step(grads)?,
                }
                Ok((opt.last_norm().cloned(), opt.skipped_steps()?))
            })
        });
    }
    // SGD is not scale-invariant as AdamW nearly is: the coefficient's bits show in the vars.
    for clip in [autoclip(30.0), ClipSetting::norm(1.0)] {
        check(format!("FusedSgd {clip:?}"), None, &|group| {
            let mut opt: Option<FusedSgd> = None;
            run_steps(group, None, |vars, grads, group| {
                let opt = match &mut opt {
                    Some(o) => o,
                    None => opt.insert(
                        FusedSgd::new(
                            vars.to_vec(),
                            ParamsSgd {
                                lr: 0.1,
                                ..Default::default()
                            },
                        )?
                        .with_clip(clip.clone())?,
                    ),
                };
                match group {
                    Some(g) => opt.step_across(grads, g)?,
                    None => opt.step(grads)?,
                }
                Ok((opt.last_norm().cloned(), opt.skipped_steps()?))
            })
        });
    }
    cases
}
