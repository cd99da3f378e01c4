//! ZClip (`ZClip`, `ClipSetting::ZClip`) against an independent transcription of the paper's
//! reference implementation (`zclip.py`: a Python list for the warm-up, `mean`/`var` floats), on
//! recorded norm sequences with spikes, NaN and infinite steps; the kernel (`grad_clip_zclip`)
//! under the host emulation against the CPU path, bitwise; `Clipped` and the fused optimizers with
//! ZClip against `ZClip::clip_` followed by the unclipped step; checkpoints.

mod common;

use candle_core::{backprop::GradStore, DType, Device, Result, Tensor, Var};
use candle_grad_clip::{
    ClipSetting, Clipped, ClippedConfig, FusedAdamW, FusedSgd, KernelEmulation, ParamsSgd, ZClip,
    ZClipMode,
};
use candle_nn::{Optimizer, ParamsAdamW, SGD};
use common::{assert_same, bits, kernels, state_bits, vars_bits, ORDERS};
use rand::{rngs::StdRng, Rng, SeedableRng};

/// The reference, transcribed from `zclip.py` (the `zscore` mode with its two `clip_option`s and
/// the optional `max_grad_norm`) in the order. `step` takes the norm and returns the
/// factor the gradients are multiplied by (`None`: untouched).
struct Reference {
    alpha: f64,
    z_thresh: f64,
    warmup_steps: usize,
    mean_mode: bool,
    max_grad_norm: Option<f64>,
    buffer: Vec<f64>,
    stats: Option<(f64, f64)>,
}

impl Reference {
    fn new(z: &ZClip) -> Self {
        Self {
            alpha: z.ema_alpha(),
            z_thresh: z.threshold_z(),
            warmup_steps: z.warmup(),
            mean_mode: z.clip_mode() == ZClipMode::Mean,
            max_grad_norm: z.max_norm(),
            buffer: Vec::new(),
            stats: None,
        }
    }

    /// `torch.nn.utils.clip_grad_norm_`'s factor (its `clip_coef_clamped`), `None` when 1.
    fn clip_grad_norm(max_norm: Option<f64>, total: f64) -> Option<f64> {
        let max_norm = max_norm?;
        let coef = max_norm / (total + 1e-6);
        if total.is_nan() {
            return Some(f64::NAN);
        }
        (coef < 1.0).then_some(coef)
    }

    fn step(&mut self, total_norm: f64) -> Option<f64> {
        if !total_norm.is_finite() {
            // Not a statistic; the gradients as under clip_grad_norm_ (an infinite norm with no
            // bound is left alone, as our clip_grad_norm_(inf) leaves it).
            return Self::clip_grad_norm(self.max_grad_norm, total_norm);
        }
        let Some((mean, var)) = self.stats else {
            self.buffer.push(total_norm);
            if self.buffer.len() >= self.warmup_steps {
                let n = self.buffer.len() as f64;
                let mut s = 0.0;
                for x in &self.buffer {
                    s += x;
                }
                let mean = s / n;
                let mut v = 0.0;
                for x in &self.buffer {
                    v += (x - mean) * (x - mean);
                }
                self.stats = Some((mean, v / n));
                self.buffer.clear();
            }
            return Self::clip_grad_norm(self.max_grad_norm, total_norm);
        };
        let std = var.sqrt();
        let z = (total_norm - mean) / (std + 1e-6);
        let clip_val = if z > self.z_thresh {
            if self.mean_mode {
                Some(mean)
            } else {
                let eta = z / self.z_thresh;
                Some(mean + (self.z_thresh * std) / eta)
            }
        } else {
            None
        };
        // _apply_clipping: the adaptive value (or the norm), capped by max_grad_norm.
        let adaptive = clip_val.unwrap_or(total_norm);
        let effective = match self.max_grad_norm {
            Some(m) if m < adaptive => m,
            _ => adaptive,
        };
        let factor = (total_norm > effective).then(|| effective / (total_norm + 1e-6));
        // _update_ema with the ZClip value (never the capped one).
        let g = clip_val.unwrap_or(total_norm);
        let new_mean = self.alpha * mean + (1.0 - self.alpha) * g;
        let new_var = self.alpha * var + (1.0 - self.alpha) * ((g - new_mean) * (g - new_mean));
        self.stats = Some((new_mean, new_var));
        factor
    }
}

/// A norm sequence: a noisy plateau, spikes of 3x to 1000x, NaN and infinite steps (also during
/// the warm-up), and a slow drift.
fn sequence(rng: &mut StdRng, len: usize) -> Vec<f64> {
    (0..len)
        .map(|i| {
            let base = 2.0 + 0.002 * i as f64 + rng.gen_range(-0.3..0.3);
            match rng.gen_range(0..40) {
                0 => f64::NAN,
                1 => f64::INFINITY,
                2 | 3 => base * [3.0, 10.0, 1000.0][rng.gen_range(0..3)],
                _ => base,
            }
        })
        .collect()
}

fn settings() -> Vec<ZClip> {
    vec![
        ZClip::new(),
        ZClip::new().mode(ZClipMode::Mean).warmup_steps(5),
        ZClip::new().alpha(0.9).z_threshold(1.5).warmup_steps(3),
        ZClip::new().warmup_steps(1).max_grad_norm(2.5),
        ZClip::new().warmup_steps(4).max_grad_norm(0.0),
        ZClip::new().warmup_steps(7).max_grad_norm(1e9),
    ]
}

/// One F64 element whose gradient is the norm itself (sign alternating): the global L2 norm is
/// exactly `|g|` on every back end, so each step of the sequence feeds the exact recorded norm.
fn one_element_step(zclip: &mut ZClip, w: &Var, g: f64) -> Result<(f64, f64)> {
    let mut grads = GradStore::default();
    grads.insert(w, Tensor::new(&[g], &Device::Cpu)?);
    let norm = zclip
        .clip_(std::slice::from_ref(w), &mut grads)?
        .to_scalar::<f64>()?;
    let after = grads.get(w).expect("gradient").to_vec1::<f64>()?[0];
    Ok((norm, after))
}

/// The recorded sequences through `ZClip::clip_` (CPU) equal the transcription step by step: the
/// gradient after clipping bitwise (`g · factor`, one rounding), the statistics bitwise.
#[test]
fn zclip_matches_the_reference_on_recorded_norm_sequences() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(7);
    for (case, setting) in settings().into_iter().enumerate() {
        let mut zclip = setting.clone();
        let mut reference = Reference::new(&setting);
        let w = Var::new(&[0f64], &Device::Cpu)?;
        let mut clipped = 0;
        for (i, n) in sequence(&mut rng, 120).into_iter().enumerate() {
            let g = if i % 2 == 0 { n } else { -n };
            let (norm, after) = one_element_step(&mut zclip, &w, g)?;
            let what = format!("case {case} step {i} norm {n}");
            assert_eq!(norm.to_bits(), n.abs().to_bits(), "{what}: the norm");
            let want = match reference.step(n) {
                Some(f) => {
                    clipped += 1;
                    g * f
                }
                None => g,
            };
            if want.is_nan() {
                assert!(after.is_nan(), "{what}: NaN poisons");
            } else {
                assert_eq!(
                    after.to_bits(),
                    want.to_bits(),
                    "{what}: gradient {after} vs {want}"
                );
            }
            let stats = zclip.statistics()?;
            match (stats, reference.stats) {
                (Some((m, s)), Some((rm, rv))) => {
                    assert_eq!(m.to_bits(), rm.to_bits(), "{what}: mean");
                    assert_eq!(s.to_bits(), rv.sqrt().to_bits(), "{what}: std");
                }
                (None, None) => {}
                (a, b) => panic!("{what}: statistics {a:?} vs {b:?}"),
            }
        }
        assert!(clipped > 0, "case {case}: some step must be clipped");
    }
    Ok(())
}

/// An F32 model: the norm ZClip takes is the F32 norm as returned (the reference's `.item()` of
/// a float32 norm); the clipped gradients are `g · factor` rounded once to f32.
#[test]
fn zclip_on_f32_gradients_uses_the_returned_norm() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(8);
    let setting = ZClip::new().warmup_steps(4);
    let mut zclip = setting.clone();
    let mut reference = Reference::new(&setting);
    let w = Var::zeros(3, DType::F32, &Device::Cpu)?;
    for (i, n) in sequence(&mut rng, 60).into_iter().enumerate() {
        let g: Vec<f32> = (0..3)
            .map(|k| (n * [0.6, 0.0, -0.8][k] * rng.gen_range(0.9..1.1)) as f32)
            .collect();
        let mut grads = GradStore::default();
        grads.insert(&w, Tensor::new(g.as_slice(), &Device::Cpu)?);
        let norm = zclip.clip_(std::slice::from_ref(&w), &mut grads)?;
        assert_eq!(norm.dtype(), DType::F32);
        let norm = norm.to_scalar::<f32>()? as f64;
        let exact = g
            .iter()
            .map(|&x| (x as f64) * (x as f64))
            .sum::<f64>()
            .sqrt();
        if exact.is_finite() {
            assert_eq!(norm, exact as f32 as f64, "step {i}: the norm");
        }
        let after = grads.get(&w).expect("gradient").to_vec1::<f32>()?;
        let want: Vec<f32> = match reference.step(norm) {
            Some(f) => g.iter().map(|&x| (x as f64 * f) as f32).collect(),
            None => g.clone(),
        };
        let (a, b): (Vec<u32>, Vec<u32>) = (
            after.iter().map(|x| x.to_bits()).collect(),
            want.iter().map(|x| x.to_bits()).collect(),
        );
        if want.iter().all(|x| !x.is_nan()) {
            assert_eq!(a, b, "step {i}");
        } else {
            assert!(after.iter().all(|x| x.is_nan()), "step {i}: NaN poisons");
        }
    }
    Ok(())
}

/// The kernel under the emulation equals the CPU path bitwise: the same sequences (each norm fed
/// exactly through one F64 element), every grid and block order, statistics and gradients; and
/// a ZClip step is three launches: reduction, `grad_clip_zclip`, scaling.
#[test]
fn emulated_zclip_kernel_is_bitwise_the_cpu_twin() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(9);
    for (case, setting) in settings().into_iter().enumerate() {
        let norms = sequence(&mut rng, 80);
        let grid = [1, 2, 3, 7, 64][case % 5];
        let emulation = KernelEmulation::new()
            .grid(grid)
            .block_order(ORDERS[case % 4]);
        let (mut cpu, mut emu) = (setting.clone(), setting.clone());
        let w = Var::new(&[0f64], &Device::Cpu)?;
        for (i, &n) in norms.iter().enumerate() {
            let what = format!("case {case} step {i} norm {n}");
            let a = one_element_step(&mut cpu, &w, n)?;
            let (b, log) = emulation.run(|| one_element_step(&mut emu, &w, n))?;
            assert_eq!(
                kernels(&log),
                [
                    "grad_clip_reduce_sq",
                    "grad_clip_reduce_pow",
                    "grad_clip_zclip",
                    "grad_clip_apply"
                ],
                "{what}: launches (F64: the rescue launch too)"
            );
            assert_eq!(
                (a.0.to_bits(), a.1.to_bits()),
                (b.0.to_bits(), b.1.to_bits()),
                "{what}: norm and gradient"
            );
            let (sa, sb) = (cpu.state_dict()?, emu.state_dict()?);
            for key in ["mean", "var", "warmup_norms", "ready"] {
                assert_eq!(
                    bits(&sa[key].to_dtype(DType::F64)?.flatten_all()?)?,
                    bits(&sb[key].to_dtype(DType::F64)?.flatten_all()?)?,
                    "{what}: {key}"
                );
            }
            assert_eq!(
                cpu.last_coefficient()?.map(f64::to_bits),
                emu.last_coefficient()?.map(f64::to_bits),
                "{what}: coefficient"
            );
        }
    }
    Ok(())
}

/// Several vars of every dtype whose squares sum exactly (small multiples of powers of two): the
/// norm is the same on both back ends, so the whole clip is bitwise, F32 gradients included.
#[test]
fn emulated_zclip_on_mixed_dtypes_is_bitwise_the_cpu() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(10);
    let shapes: [&[usize]; 4] = [&[5, 3], &[4099], &[1], &[2, 2, 2]];
    let dtypes = [DType::F32, DType::F64, DType::F16, DType::BF16];
    let vars: Vec<Var> = shapes
        .iter()
        .zip(dtypes)
        .map(|(s, d)| Var::zeros(*s, d, &Device::Cpu))
        .collect::<Result<_>>()?;
    let setting = ZClip::new().warmup_steps(3).z_threshold(1.0);
    let (mut cpu, mut emu) = (setting.clone(), setting);
    for step in 0..12 {
        let spike = if step % 4 == 3 { 64.0 } else { 1.0 };
        let grads_for = |rng: &mut StdRng| -> Result<Vec<Tensor>> {
            vars.iter()
                .map(|v| {
                    let vals: Vec<f64> = (0..v.elem_count())
                        .map(|_| spike * rng.gen_range(-8i32..=8) as f64 / 8.0)
                        .collect();
                    Tensor::new(vals, &Device::Cpu)?
                        .reshape(v.shape())?
                        .to_dtype(v.dtype())
                })
                .collect()
        };
        let values = grads_for(&mut rng)?;
        let store = |vals: &[Tensor]| -> Result<GradStore> {
            let mut g = GradStore::default();
            for (v, t) in vars.iter().zip(vals) {
                g.insert(v, t.copy()?);
            }
            Ok(g)
        };
        let (mut ga, mut gb) = (store(&values)?, store(&values)?);
        let na = cpu.clip_(&vars, &mut ga)?;
        let (nb, _) = KernelEmulation::new()
            .grid(3)
            .run(|| emu.clip_(&vars, &mut gb))?;
        assert_eq!(bits(&na)?, bits(&nb)?, "step {step}: norm");
        for v in &vars {
            assert_eq!(
                bits(ga.get(v).expect("g"))?,
                bits(gb.get(v).expect("g"))?,
                "step {step}: {:?} gradient",
                v.dtype()
            );
        }
        assert_eq!(cpu.last_coefficient()?, emu.last_coefficient()?);
    }
    assert!(
        cpu.last_coefficient()? < Some(1.0),
        "the last spike is clipped"
    );
    Ok(())
}

fn random_grads(rng: &mut StdRng, vars: &[Var], scale: f64) -> Result<GradStore> {
    let mut grads = GradStore::default();
    for v in vars {
        let vals: Vec<f64> = (0..v.elem_count())
            .map(|_| scale * rng.gen_range(-1.0..1.0))
            .collect();
        grads.insert(
            v,
            Tensor::new(vals, &Device::Cpu)?
                .reshape(v.shape())?
                .to_dtype(v.dtype())?,
        );
    }
    Ok(grads)
}

fn copy_store(vars: &[Var], grads: &GradStore) -> Result<GradStore> {
    let mut out = GradStore::default();
    for v in vars {
        if let Some(g) = grads.get(v) {
            out.insert(v, g.copy()?);
        }
    }
    Ok(out)
}

fn twin_models(dtype: DType) -> Result<(Vec<Var>, Vec<Var>)> {
    let mut rng = StdRng::seed_from_u64(11);
    let shapes: [&[usize]; 3] = [&[6, 5], &[5], &[300]];
    let mut a = Vec::new();
    let mut b = Vec::new();
    for s in shapes {
        let n: usize = s.iter().product();
        let vals: Vec<f64> = (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let t = Tensor::new(vals, &Device::Cpu)?
            .reshape(s)?
            .to_dtype(dtype)?;
        a.push(Var::from_tensor(&t)?);
        b.push(Var::from_tensor(&t.copy()?)?);
    }
    Ok((a, b))
}

/// A spike every 7th step (20x), 30 steps, warm-up 5.
fn spike_scale(step: usize) -> f64 {
    if step % 7 == 6 {
        20.0
    } else {
        1.0
    }
}

/// `Clipped<SGD>` with ZClip is `ZClip::clip_` then `SGD::step`, bitwise, and counts the steps
/// ZClip clipped (the spikes after the warm-up).
#[test]
fn clipped_with_zclip_is_zclip_then_the_step() -> Result<()> {
    let (ours, theirs) = twin_models(DType::F32)?;
    let setting = ZClip::new().warmup_steps(5);
    let mut opt = Clipped::<SGD>::new(
        ours.clone(),
        ClippedConfig::new(0.05, ClipSetting::ZClip(setting.clone())),
    )?;
    let mut zclip = setting;
    let mut sgd = SGD::new(theirs.clone(), 0.05)?;
    let mut rng = StdRng::seed_from_u64(12);
    let mut expected_clipped = 0;
    for step in 0..30 {
        let ga = random_grads(&mut rng, &ours, spike_scale(step))?;
        let mut gb = GradStore::default();
        for (a, b) in ours.iter().zip(&theirs) {
            gb.insert(b, ga.get(a).expect("g").copy()?);
        }
        opt.step(&ga)?;
        let norm = zclip.clip_(&theirs, &mut gb)?;
        sgd.step(&gb)?;
        assert_same(
            &vars_bits(&ours)?,
            &vars_bits(&theirs)?,
            &format!("step {step}"),
        );
        assert_eq!(bits(opt.last_norm().expect("norm"))?, bits(&norm)?);
        expected_clipped += usize::from(zclip.last_coefficient()? < Some(1.0));
    }
    assert!(
        expected_clipped >= 3,
        "the spikes after the warm-up are clipped"
    );
    assert_eq!(opt.clipped_steps()?, expected_clipped);
    let ClipSetting::ZClip(inner) = opt.clip_setting() else {
        panic!("the setting is kept")
    };
    assert_eq!(inner.statistics()?, zclip.statistics()?);
    Ok(())
}

/// The fused optimizers with ZClip folded in are `ZClip::clip_` then the unclipped fused step,
/// bitwise (F32 and F64), on the CPU and under the emulation; `clipped_steps` and `last_norm`
/// follow ZClip; a NaN step is skipped with `skip_nonfinite` and leaves the statistics alone.
#[test]
fn fused_optimizers_with_zclip_are_zclip_then_the_step() -> Result<()> {
    for dtype in [DType::F32, DType::F64] {
        for emulated in [false, true] {
            for adamw in [true, false] {
                let what = format!("{dtype:?} emulated {emulated} adamw {adamw}");
                let (ours, theirs) = twin_models(dtype)?;
                let setting = ZClip::new().warmup_steps(5);
                let mut zclip = setting.clone();
                let (mut fused, mut plain): (Box<dyn StepWith>, Box<dyn StepWith>) = if adamw {
                    let p = ParamsAdamW {
                        lr: 0.01,
                        ..Default::default()
                    };
                    (
                        Box::new(
                            FusedAdamW::new(ours.clone(), p.clone())?
                                .with_clip(ClipSetting::ZClip(setting))?
                                .skip_nonfinite(true),
                        ),
                        Box::new(FusedAdamW::new(theirs.clone(), p)?.skip_nonfinite(true)),
                    )
                } else {
                    let p = ParamsSgd {
                        lr: 0.05,
                        momentum: 0.9,
                        ..Default::default()
                    };
                    (
                        Box::new(
                            FusedSgd::new(ours.clone(), p.clone())?
                                .with_clip(ClipSetting::ZClip(setting))?
                                .skip_nonfinite(true),
                        ),
                        Box::new(FusedSgd::new(theirs.clone(), p)?.skip_nonfinite(true)),
                    )
                };
                let mut rng = StdRng::seed_from_u64(13);
                let mut clipped = 0;
                for step in 0..30 {
                    let mut ga = random_grads(&mut rng, &ours, spike_scale(step))?;
                    if step == 9 {
                        // A NaN step: skipped by both, the statistics untouched.
                        ga.insert(
                            &ours[1],
                            Tensor::full(f64::NAN, 5, &Device::Cpu)?.to_dtype(dtype)?,
                        );
                    }
                    let mut gb = GradStore::default();
                    for (a, b) in ours.iter().zip(&theirs) {
                        gb.insert(b, ga.get(a).expect("g").copy()?);
                    }
                    let before = zclip.state_dict()?;
                    let run = |f: &mut dyn FnMut() -> Result<()>| -> Result<()> {
                        if emulated {
                            KernelEmulation::new().grid(5).run(f)?;
                            Ok(())
                        } else {
                            f()
                        }
                    };
                    run(&mut || fused.take(&ga))?;
                    if step == 9 {
                        // What ZClip::clip_ would do to the statistics: nothing (NaN norm).
                        let probe = zclip
                            .clone()
                            .clip_(&theirs, &mut copy_store(&theirs, &gb)?)?;
                        assert!(probe.to_dtype(DType::F64)?.to_scalar::<f64>()?.is_nan());
                        assert_eq!(
                            fused.zclip().state_dict()?["mean"]
                                .to_scalar::<f64>()?
                                .to_bits(),
                            before["mean"].to_scalar::<f64>()?.to_bits()
                        );
                    } else {
                        // Under the same back end: the kernels' norm is not bitwise the CPU's.
                        run(&mut || zclip.clip_(&theirs, &mut gb).map(|_| ()))?;
                        clipped += usize::from(zclip.last_coefficient()? < Some(1.0));
                    }
                    run(&mut || plain.take(&gb))?;
                    let what = format!("{what} step {step}");
                    assert_same(&vars_bits(&ours)?, &vars_bits(&theirs)?, &what);
                    assert_eq!(fused.state()?, plain.state()?, "{what}: state");
                }
                assert!(clipped >= 3, "{what}");
                assert_eq!(fused.counts()?, (29, clipped, 1), "{what}: counts");
                assert_eq!(
                    fused.zclip().statistics()?,
                    zclip.statistics()?,
                    "{what}: statistics"
                );
            }
        }
    }
    Ok(())
}

/// What the fused test needs of both optimizers.
trait StepWith {
    fn take(&mut self, grads: &GradStore) -> Result<()>;
    fn state(&self) -> Result<Vec<(String, Vec<u64>)>>;
    fn counts(&self) -> Result<(usize, usize, usize)>;
    fn zclip(&self) -> &ZClip;
}

macro_rules! step_with {
    ($ty:ty) => {
        impl StepWith for $ty {
            fn take(&mut self, grads: &GradStore) -> Result<()> {
                self.step(grads)
            }
            fn state(&self) -> Result<Vec<(String, Vec<u64>)>> {
                let mut dict = self.state_dict()?;
                dict.remove("clipped_steps");
                state_bits(&dict)
            }
            fn counts(&self) -> Result<(usize, usize, usize)> {
                Ok((self.steps()?, self.clipped_steps()?, self.skipped_steps()?))
            }
            fn zclip(&self) -> &ZClip {
                match self.clip_setting() {
                    Some(ClipSetting::ZClip(z)) => z,
                    _ => panic!("no ZClip"),
                }
            }
        }
    };
}
step_with!(FusedAdamW);
step_with!(FusedSgd);

/// Saving in the warm-up or after it and resuming is bitwise the same run: `state_dict` and
/// `save_state`/`load_state`.
#[test]
fn zclip_checkpoints_resume_bitwise() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(14);
    let norms = sequence(&mut rng, 60);
    let w = Var::new(&[0f64], &Device::Cpu)?;
    let setting = ZClip::new().warmup_steps(10);
    let mut straight = setting.clone();
    let straight_out: Vec<(f64, f64)> = norms
        .iter()
        .map(|&n| one_element_step(&mut straight, &w, n))
        .collect::<Result<_>>()?;
    let dir = std::env::temp_dir().join(format!("zclip-ckpt-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    for cut in [4, 10, 33] {
        let mut first = setting.clone();
        let mut out = Vec::new();
        for &n in &norms[..cut] {
            out.push(one_element_step(&mut first, &w, n)?);
        }
        let path = dir.join(format!("cut{cut}.safetensors"));
        first.save_state(&path)?;
        let mut resumed = setting.clone();
        if cut % 2 == 0 {
            resumed.load_state(&path)?;
        } else {
            resumed.load_state_dict(&first.state_dict()?)?;
        }
        for &n in &norms[cut..] {
            out.push(one_element_step(&mut resumed, &w, n)?);
        }
        let a: Vec<(u64, u64)> = out
            .iter()
            .map(|(x, y)| (x.to_bits(), y.to_bits()))
            .collect();
        let b: Vec<(u64, u64)> = straight_out
            .iter()
            .map(|(x, y)| (x.to_bits(), y.to_bits()))
            .collect();
        assert_eq!(a, b, "cut at {cut}");
        assert_eq!(resumed.statistics()?, straight.statistics()?);
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// Bad settings are refused naming the setting, by `validate`, `Clipped`, `with_clip` and
/// `clip_`, and nothing changes; bad states are refused whole.
#[test]
fn zclip_refusals() -> Result<()> {
    let bad = [
        (ZClip::new().alpha(0.0), "alpha"),
        (ZClip::new().alpha(1.0), "alpha"),
        (ZClip::new().alpha(f64::NAN), "alpha"),
        (ZClip::new().z_threshold(0.0), "z_threshold"),
        (ZClip::new().z_threshold(f64::NAN), "z_threshold"),
        (ZClip::new().warmup_steps(0), "warmup_steps"),
        (ZClip::new().max_grad_norm(-1.0), "max_grad_norm"),
        (ZClip::new().max_grad_norm(f64::NAN), "max_grad_norm"),
    ];
    let w = Var::new(&[1f32, 2.], &Device::Cpu)?;
    for (zclip, name) in bad {
        let e = ClipSetting::ZClip(zclip.clone())
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains(name), "{e}");
        assert!(Clipped::<SGD>::new(
            vec![w.clone()],
            ClippedConfig::new(0.1, ClipSetting::ZClip(zclip.clone()))
        )
        .is_err());
        assert!(FusedSgd::new(vec![w.clone()], ParamsSgd::default())?
            .with_clip(ClipSetting::ZClip(zclip.clone()))
            .is_err());
        let mut grads = GradStore::default();
        grads.insert(&w, Tensor::new(&[3f32, 4.], &Device::Cpu)?);
        let mut z = zclip;
        assert!(z.clip_(std::slice::from_ref(&w), &mut grads).is_err());
        assert_eq!(grads.get(&w).expect("g").to_vec1::<f32>()?, [3.0, 4.0]);
        assert_eq!(z.last_coefficient()?, None);
    }
    // States: unknown keys, wrong dtypes, too many warm-up norms, non-finite statistics.
    let good = ZClip::new().warmup_steps(3).state_dict()?;
    let mut cases = Vec::new();
    let mut extra = good.clone();
    extra.insert("other".into(), Tensor::new(0f64, &Device::Cpu)?);
    cases.push(extra);
    let mut wrong = good.clone();
    wrong.insert("mean".into(), Tensor::new(0f32, &Device::Cpu)?);
    cases.push(wrong);
    let mut long = good.clone();
    long.insert(
        "warmup_norms".into(),
        Tensor::new(&[1f64, 2., 3.], &Device::Cpu)?,
    );
    cases.push(long);
    let mut nan = good.clone();
    nan.insert("var".into(), Tensor::new(f64::NAN, &Device::Cpu)?);
    cases.push(nan);
    for (i, state) in cases.iter().enumerate() {
        let mut z = ZClip::new().warmup_steps(3);
        assert!(z.load_state_dict(state).is_err(), "state case {i}");
        assert_eq!(z.last_coefficient()?, None, "nothing loaded");
    }
    Ok(())
}

/// Planted-bug check of the transcription itself: a ZClip that updates the EMA with the norm
/// instead of the clipped value drifts away from the reference after the first spike.
#[test]
fn the_reference_tells_the_ema_input_apart() {
    let setting = ZClip::new().warmup_steps(3);
    let mut a = Reference::new(&setting);
    let norms = [1.0, 1.2, 0.8, 1.1, 50.0, 1.0];
    for n in norms {
        a.step(n);
    }
    let (mean, _) = a.stats.expect("ready");
    // With the raw 50 in the EMA the mean would exceed 2.
    assert!(mean < 1.5, "{mean}");
}

/// `Clipped` with ZClip: a step without any gradient leaves the statistics alone and is not
/// counted as clipped (the last step's coefficient is not reused).
#[test]
fn an_empty_step_is_not_clipped() -> Result<()> {
    let w = Var::new(&[0f32, 0.], &Device::Cpu)?;
    let setting = ZClip::new().warmup_steps(1).max_grad_norm(1.0);
    let mut opt = Clipped::<SGD>::new(
        vec![w.clone()],
        ClippedConfig::new(0.1, ClipSetting::ZClip(setting)),
    )?;
    let mut grads = GradStore::default();
    grads.insert(&w, Tensor::new(&[30f32, 40.], &Device::Cpu)?);
    opt.step(&grads)?; // warm-up step, capped by max_grad_norm: clipped
    assert_eq!(opt.clipped_steps()?, 1);
    let before = match opt.clip_setting() {
        ClipSetting::ZClip(z) => z.state_dict()?,
        _ => unreachable!(),
    };
    opt.step(&GradStore::default())?;
    assert_eq!((opt.steps(), opt.clipped_steps()?), (2, 1));
    let ClipSetting::ZClip(z) = opt.clip_setting() else {
        unreachable!()
    };
    assert_eq!(
        bits(&z.state_dict()?["mean"])?,
        bits(&before["mean"])?,
        "statistics untouched"
    );
    Ok(())
}

/// Finite F32 gradients whose norm overflows the F32 norm tensor: ZClip takes the norm as
/// `f32::MAX` (a spike, clipped towards the mean), on the CPU and in the kernel alike; it does not
/// pass them through as a non-finite step would.
#[test]
fn an_f32_norm_overflow_is_a_spike_not_a_nonfinite_step() -> Result<()> {
    let w = Var::zeros(4, DType::F32, &Device::Cpu)?;
    let step = |z: &mut ZClip, scale: f32| -> Result<Vec<f32>> {
        let mut grads = GradStore::default();
        grads.insert(
            &w,
            Tensor::new(&[scale, -scale, scale, scale], &Device::Cpu)?,
        );
        z.clip_(std::slice::from_ref(&w), &mut grads)?;
        grads.get(&w).expect("g").to_vec1::<f32>()
    };
    for emulated in [false, true] {
        let mut z = ZClip::new().warmup_steps(3);
        for s in [1.0, 1.1, 0.9] {
            step(&mut z, s)?;
        }
        let run = |z: &mut ZClip| -> Result<Vec<f32>> {
            if emulated {
                Ok(KernelEmulation::new().run(|| step(z, f32::MAX))?.0)
            } else {
                step(z, f32::MAX)
            }
        };
        let g = run(&mut z)?;
        // The norm (2 · f32::MAX) overflows its F32 tensor; ZClip clipped the step hard.
        assert!(
            g.iter().all(|x| x.is_finite() && x.abs() < 10.0),
            "emulated {emulated}: {g:?}"
        );
        let c = z.last_coefficient()?.expect("a step");
        assert!(c > 0.0 && c < 1e-37, "emulated {emulated}: {c}");
    }
    Ok(())
}
