//! Training-loop integration: `Clipped`, `grad_norms`, `GradNormStats`, `AutoClip`, and a short
//! run of the `exploding_rnn` example's training code. Every expected value comes from an
//! independent `f64` reference written here, never from the library.

#[path = "../examples/exploding_rnn.rs"]
#[allow(dead_code)]
mod exploding_rnn;

use candle_core::{backprop::GradStore, DType, Device, Result, Tensor, Var};
use candle_grad_clip::{
    grad_norms, AutoClip, ClipSetting, Clipped, ClippedConfig, GradNormStats, NormType,
};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarMap, SGD};
use rand::{rngs::StdRng, Rng, SeedableRng};

const SHAPES: [&[usize]; 3] = [&[4, 3], &[3], &[2, 2, 2]];

fn random(n: usize, scale: f64, rng: &mut StdRng) -> Vec<f64> {
    (0..n)
        .map(|_| scale * (rng.gen::<f64>() * 2.0 - 1.0))
        .collect()
}

fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// Fresh vars with the given initial values (f32).
fn make_vars(init: &[Vec<f64>]) -> Result<Vec<Var>> {
    init.iter()
        .zip(SHAPES)
        .map(|(v, shape)| {
            let data: Vec<f32> = v.iter().map(|&x| x as f32).collect();
            Var::from_tensor(&Tensor::from_vec(data, shape, &Device::Cpu)?)
        })
        .collect()
}

fn store(vars: &[Var], grads: &[Vec<f64>]) -> Result<GradStore> {
    let mut store = GradStore::default();
    for (var, g) in vars.iter().zip(grads) {
        let data: Vec<f32> = g.iter().map(|&x| x as f32).collect();
        store.insert(var, Tensor::from_vec(data, var.shape(), &Device::Cpu)?);
    }
    Ok(store)
}

fn values(var: &Var) -> Result<Vec<f32>> {
    var.flatten_all()?.to_vec1::<f32>()
}

/// The f32 gradients as the library sees them, in f64.
fn as_f32(grads: &[Vec<f64>]) -> Vec<Vec<f64>> {
    grads
        .iter()
        .map(|g| g.iter().map(|&x| x as f32 as f64).collect())
        .collect()
}

/// Reference global p-norm in f64.
fn ref_norm(grads: &[Vec<f64>], norm_type: NormType) -> f64 {
    let all = grads.iter().flatten().copied();
    match norm_type {
        NormType::Inf => all.fold(0.0, |m, x: f64| m.max(x.abs())),
        other => {
            let p = other.order();
            all.map(|x| x.abs().powf(p)).sum::<f64>().powf(1.0 / p)
        }
    }
}

/// Reference norm clipping: PyTorch's `min(1, max_norm / (norm + 1e-6))`.
fn ref_clip_norm(grads: &[Vec<f64>], max_norm: f64, norm_type: NormType) -> Vec<Vec<f64>> {
    let norm = ref_norm(grads, norm_type);
    let c = (max_norm / (norm + 1e-6)).min(1.0);
    grads
        .iter()
        .map(|g| g.iter().map(|x| x * c).collect())
        .collect()
}

fn assert_close(a: &[f32], b: &[f32], tol: f32, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= tol * (1.0 + y.abs()),
            "{what}[{i}]: {x} vs {y}"
        );
    }
}

/// Runs `steps` steps of `Clipped<O>` on random gradients and of the plain `O` on gradients
/// clipped by hand with `reference`; the parameters must agree after every step.
fn clipped_matches_reference<O: Optimizer>(
    make: impl Fn(Vec<Var>) -> Result<O>,
    clip: ClipSetting,
    reference: impl Fn(&[Vec<f64>]) -> Vec<Vec<f64>>,
    grad_scale: f64,
    tol: f32,
) -> Result<()> {
    let mut rng = StdRng::seed_from_u64(11);
    let init: Vec<Vec<f64>> = SHAPES
        .iter()
        .map(|s| random(numel(s), 1.0, &mut rng))
        .collect();
    let wrapped_vars = make_vars(&init)?;
    let plain_vars = make_vars(&init)?;
    let mut wrapped =
        Clipped::from_optimizer(make(wrapped_vars.clone())?, wrapped_vars.clone(), clip)?;
    let mut plain = make(plain_vars.clone())?;
    for step in 0..4 {
        let grads: Vec<Vec<f64>> = SHAPES
            .iter()
            .map(|s| random(numel(s), grad_scale * (1 + step) as f64, &mut rng))
            .collect();
        let clipped = reference(&as_f32(&grads));
        wrapped.step(&store(&wrapped_vars, &grads)?)?;
        plain.step(&store(&plain_vars, &clipped)?)?;
        for (i, (w, p)) in wrapped_vars.iter().zip(&plain_vars).enumerate() {
            assert_close(
                &values(w)?,
                &values(p)?,
                tol,
                &format!("step {step}, var {i}"),
            );
        }
    }
    assert_eq!(wrapped.steps(), 4);
    Ok(())
}

#[test]
fn clipped_sgd_equals_sgd_on_hand_clipped_gradients() -> Result<()> {
    for norm_type in [NormType::L2, NormType::L1, NormType::Inf, NormType::P(3.0)] {
        clipped_matches_reference(
            |vars| SGD::new(vars, 0.1),
            ClipSetting::Norm {
                max_norm: 0.5,
                norm_type,
            },
            |g| ref_clip_norm(g, 0.5, norm_type),
            3.0,
            1e-6,
        )?;
    }
    Ok(())
}

#[test]
fn clipped_adamw_equals_adamw_on_hand_clipped_gradients() -> Result<()> {
    // AdamW normalises the step by the second moment, so a clipping error would show through the
    // moments' ratio; weight decay and bias correction run too.
    clipped_matches_reference(
        |vars| {
            AdamW::new(
                vars,
                ParamsAdamW {
                    lr: 0.01,
                    ..Default::default()
                },
            )
        },
        ClipSetting::norm(0.25),
        |g| ref_clip_norm(g, 0.25, NormType::L2),
        5.0,
        1e-5,
    )
}

#[test]
fn clipped_value_equals_sgd_on_hand_clamped_gradients() -> Result<()> {
    clipped_matches_reference(
        |vars| SGD::new(vars, 0.1),
        ClipSetting::value(0.3),
        |g| {
            g.iter()
                .map(|v| v.iter().map(|x| x.clamp(-0.3, 0.3)).collect())
                .collect()
        },
        1.0,
        1e-6,
    )
}

#[test]
fn huge_max_norm_steps_exactly_like_the_inner_optimizer() -> Result<()> {
    for max_norm in [f64::INFINITY, 1e30] {
        let mut rng = StdRng::seed_from_u64(5);
        let init: Vec<Vec<f64>> = SHAPES
            .iter()
            .map(|s| random(numel(s), 1.0, &mut rng))
            .collect();
        let (a_vars, b_vars) = (make_vars(&init)?, make_vars(&init)?);
        let (c_vars, d_vars) = (make_vars(&init)?, make_vars(&init)?);
        let config = ClippedConfig::new(0.05, ClipSetting::norm(max_norm));
        let mut sgd_wrapped = Clipped::<SGD>::new(a_vars.clone(), config)?;
        let mut sgd = SGD::new(b_vars.clone(), 0.05)?;
        let params = ParamsAdamW {
            lr: 0.01,
            ..Default::default()
        };
        let config = ClippedConfig::new(params.clone(), ClipSetting::norm(max_norm));
        let mut adamw_wrapped = Clipped::<AdamW>::new(c_vars.clone(), config)?;
        let mut adamw = AdamW::new(d_vars.clone(), params)?;
        for _ in 0..3 {
            let grads: Vec<Vec<f64>> = SHAPES
                .iter()
                .map(|s| random(numel(s), 100.0, &mut rng))
                .collect();
            let a_grads = store(&a_vars, &grads)?;
            sgd_wrapped.step(&a_grads)?;
            sgd.step(&store(&b_vars, &grads)?)?;
            adamw_wrapped.step(&store(&c_vars, &grads)?)?;
            adamw.step(&store(&d_vars, &grads)?)?;
            // The caller's gradients are untouched too.
            for (var, g) in a_vars.iter().zip(&grads) {
                let expect: Vec<f32> = g.iter().map(|&x| x as f32).collect();
                assert_eq!(
                    a_grads.get(var).unwrap().flatten_all()?.to_vec1::<f32>()?,
                    expect
                );
            }
        }
        for (x, y) in a_vars.iter().zip(&b_vars).chain(c_vars.iter().zip(&d_vars)) {
            assert_eq!(
                values(x)?,
                values(y)?,
                "max_norm {max_norm}: not bitwise equal"
            );
        }
        assert_eq!(sgd_wrapped.clipped_steps()?, 0);
        assert_eq!(adamw_wrapped.clipped_steps()?, 0);
    }
    Ok(())
}

#[test]
fn step_clips_the_callers_gradients_and_counts_clipped_steps() -> Result<()> {
    let w = Var::new(&[0f32, 0.], &Device::Cpu)?;
    let config = ClippedConfig::new(1.0, ClipSetting::norm(1.0));
    let mut opt = Clipped::<SGD>::new(vec![w.clone()], config)?;
    let mut expected_clipped = 0;
    for g in [
        [0.3f32, 0.4],
        [3., 4.],
        [0.6, 0.8],
        [f32::NAN, 0.],
        [30., 40.],
    ] {
        let mut grads = GradStore::default();
        grads.insert(&w, Tensor::new(&g, &Device::Cpu)?);
        // A tensor that is not a var's gradient: left alone.
        let other = Var::new(&[7f32], &Device::Cpu)?;
        grads.insert(&other, Tensor::new(&[1e6f32], &Device::Cpu)?);
        opt.step(&grads)?;
        let norm = ((g[0] as f64).powi(2) + (g[1] as f64).powi(2)).sqrt();
        let last = opt
            .last_norm()
            .unwrap()
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
        assert!((last - norm).abs() <= 1e-6 * norm || (last.is_nan() && norm.is_nan()));
        let coefficient = 1.0 / (norm + 1e-6);
        if coefficient.is_nan() || coefficient < 1.0 {
            expected_clipped += 1;
        }
        let after = grads.get(&w).unwrap().to_vec1::<f32>()?;
        if norm > 1.0 {
            let n = ((after[0] as f64).powi(2) + (after[1] as f64).powi(2)).sqrt();
            assert!(
                (n - 1.0).abs() < 1e-5,
                "caller's gradient not clipped: {after:?}"
            );
        }
        assert_eq!(grads.get(&other).unwrap().to_vec1::<f32>()?, [1e6]);
    }
    // Clipped: [3, 4], [NaN, 0] (a NaN norm counts), [30, 40], and [0.6, 0.8]: at norm 1 the
    // coefficient is 1 / (1 + 1e-6) < 1, as in PyTorch. Not clipped: [0.3, 0.4].
    assert_eq!(opt.clipped_steps()?, expected_clipped);
    assert_eq!(expected_clipped, 4);
    assert_eq!(opt.steps(), 5);
    Ok(())
}

#[test]
fn clipped_with_autoclip_follows_the_percentile_of_the_history() -> Result<()> {
    let w = Var::new(&[0f32], &Device::Cpu)?;
    let config = ClippedConfig::new(1.0, ClipSetting::AutoClip(AutoClip::new(50.0)?));
    let mut opt = Clipped::<SGD>::new(vec![w.clone()], config)?;
    let mut position = 0f64;
    let norms = [4.0f64, 2.0, 9.0, 1.0, 100.0];
    // Medians of {4}, {2,4}, {2,4,9}, {1,2,4,9}, {1,2,4,9,100} (numpy's linear percentile).
    let thresholds = [4.0f64, 3.0, 4.0, 3.0, 4.0];
    for (norm, threshold) in norms.iter().zip(thresholds) {
        let mut grads = GradStore::default();
        grads.insert(&w, Tensor::new(&[*norm as f32], &Device::Cpu)?);
        opt.step(&grads)?;
        let c = (threshold / (norm + 1e-6)).min(1.0);
        position -= norm * c;
        assert!((w.to_vec1::<f32>()?[0] as f64 - position).abs() < 1e-4);
    }
    assert_eq!(opt.clipped_steps()?, 3); // 4 (4 / (4 + 1e-6) < 1), 9 and 100
    Ok(())
}

#[test]
fn grad_norms_match_an_f64_reference() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(3);
    let varmap = VarMap::new();
    let names = ["layer2.weight", "layer1.bias", "layer1.weight", "frozen"];
    let mut grads = GradStore::default();
    let mut expected: Vec<(String, Vec<f64>)> = Vec::new();
    let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    for (i, name) in names.iter().enumerate() {
        vb.get(SHAPES[i % SHAPES.len()], name)?;
    }
    let data = varmap.data().lock().unwrap().clone();
    for name in names.iter().filter(|n| **n != "frozen") {
        let var = &data[*name];
        let g = random(var.elem_count(), 2.0, &mut rng);
        let f: Vec<f32> = g.iter().map(|&x| x as f32).collect();
        grads.insert(var, Tensor::from_vec(f, var.shape(), &Device::Cpu)?);
        expected.push((
            name.to_string(),
            g.iter().map(|&x| x as f32 as f64).collect(),
        ));
    }
    expected.sort_by(|a, b| a.0.cmp(&b.0));
    for norm_type in [NormType::L2, NormType::L1, NormType::Inf, NormType::P(3.5)] {
        let got = grad_norms(&varmap, &grads, norm_type)?;
        let names_got: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names_got, ["layer1.bias", "layer1.weight", "layer2.weight"]);
        for ((name, norm), (_, g)) in got.iter().zip(&expected) {
            let reference = ref_norm(std::slice::from_ref(g), norm_type) as f32;
            assert!(
                (norm - reference).abs() <= 1e-6 * reference,
                "{name} {norm_type}: {norm} vs {reference}"
            );
        }
    }
    assert!(grad_norms(&varmap, &grads, NormType::P(-1.0)).is_err());
    Ok(())
}

/// numpy's default (linear) quantile of sorted data.
fn ref_quantile(sorted: &[f64], q: f64) -> f64 {
    let h = (sorted.len() - 1) as f64 * q;
    let (lo, hi) = (h.floor() as usize, h.ceil() as usize);
    sorted[lo] + (h - lo as f64) * (sorted[hi] - sorted[lo])
}

#[test]
fn grad_norm_stats_match_a_sorted_reference() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(9);
    let mut stats = GradNormStats::new();
    let mut reference = Vec::new();
    for i in 0..257 {
        let x = rng.gen::<f64>() * 10.0;
        if i % 50 == 7 {
            stats.record(&Tensor::new(f32::NAN, &Device::Cpu)?)?;
        }
        // Mix dtypes: F64 norms and F32 ones.
        if i % 2 == 0 {
            stats.record(&Tensor::new(x, &Device::Cpu)?)?;
            reference.push(x);
        } else {
            stats.record(&Tensor::new(x as f32, &Device::Cpu)?)?;
            reference.push(x as f32 as f64);
        }
    }
    stats.record(&Tensor::new(f32::INFINITY, &Device::Cpu)?)?;
    assert_eq!(stats.count(), 257 + 5 + 1);
    assert_eq!(stats.nonfinite()?, 6);
    let mean = reference.iter().sum::<f64>() / reference.len() as f64;
    let std =
        (reference.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / reference.len() as f64).sqrt();
    reference.sort_by(f64::total_cmp);
    assert!((stats.mean()? - mean).abs() < 1e-12);
    assert!((stats.suggest_max_norm()? - mean).abs() < 1e-12);
    assert!((stats.std()? - std).abs() < 1e-12);
    assert_eq!(stats.min()?, reference[0]);
    assert_eq!(stats.max()?, reference[reference.len() - 1]);
    for q in [0.0, 0.1, 0.25, 0.5, 0.9, 0.99, 1.0, 1.0 / 3.0] {
        assert!(
            (stats.quantile(q)? - ref_quantile(&reference, q)).abs() < 1e-12,
            "q = {q}"
        );
    }
    // Errors change nothing.
    assert!(stats.quantile(-0.1).is_err());
    assert!(stats.quantile(f64::NAN).is_err());
    assert!(stats
        .record(&Tensor::new(&[1f32, 2.], &Device::Cpu)?)
        .is_err());
    assert!(stats.record(&Tensor::new(3u32, &Device::Cpu)?).is_err());
    assert_eq!(stats.count(), 263);
    assert!(GradNormStats::new().mean().is_err());
    Ok(())
}

/// The paper's reference: append the norm to the full history, then `np.percentile`.
fn ref_autoclip(norms: &[f64], p: f64) -> Vec<f64> {
    let mut history = Vec::new();
    norms
        .iter()
        .map(|&n| {
            history.push(n);
            let mut sorted = history.clone();
            sorted.sort_by(f64::total_cmp);
            ref_quantile(&sorted, p / 100.0)
        })
        .collect()
}

#[test]
fn autoclip_threshold_sequence_matches_the_paper_while_exact() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(21);
    let norms: Vec<f64> = (0..500).map(|_| rng.gen::<f64>().powi(3) * 50.0).collect();
    for p in [10.0, 50.0, 90.0, 100.0, 0.5] {
        let mut autoclip = AutoClip::new(p)?.with_capacity(500)?;
        let got: Vec<f64> = norms.iter().map(|&n| autoclip.observe(n)).collect();
        for (i, (g, r)) in got.iter().zip(ref_autoclip(&norms, p)).enumerate() {
            assert!(
                (g - r).abs() <= 1e-12 * r.abs(),
                "p = {p}, step {i}: {g} vs {r}"
            );
        }
        assert_eq!(autoclip.observed(), 500);
    }
    // A hand-checked sequence at the paper's p = 10.
    let mut autoclip = AutoClip::default();
    let got: Vec<f64> = [10.0, 20.0, 30.0, 5.0]
        .iter()
        .map(|&n| autoclip.observe(n))
        .collect();
    // {10}: 10; {10,20}: 11; {10,20,30}: 12; {5,10,20,30}: 5 + 0.3 * 5 = 6.5.
    let expected = [10.0, 11.0, 12.0, 6.5];
    for (g, e) in got.iter().zip(expected) {
        assert!((g - e).abs() < 1e-12, "{got:?}");
    }
    Ok(())
}

#[test]
fn autoclip_memory_is_bounded_and_the_percentile_stays_close() -> Result<()> {
    // Uniform norms on [0, 1): the 10th percentile is 0.1. With 1000 kept, DKW gives a rank error
    // above 0.062 with probability below 1e-3 (and the generator is seeded: deterministic).
    let mut autoclip = AutoClip::new(10.0)?.with_capacity(1000)?;
    let mut rng = StdRng::seed_from_u64(1);
    for _ in 0..50_000 {
        autoclip.observe(rng.gen::<f64>());
    }
    assert_eq!(autoclip.observed(), 50_000);
    let t = autoclip.threshold().unwrap();
    assert!((t - 0.1).abs() < 0.062, "threshold {t}");
    // Non-finite norms are not recorded.
    let before = autoclip.threshold();
    assert_eq!(autoclip.observe(f64::NAN), t);
    assert_eq!(autoclip.threshold(), before);
    Ok(())
}

/// The reservoir is a uniform sample of *all* norms seen, on a non-stationary stream: the norm
/// of step `i` is `i` (1, 2, …, N), so the sample's percentiles say which steps were kept. For a
/// uniform sample of k = 1000 of the N steps, the sample's p-th percentile `t` lies in step
/// `p/100 · N ± ε N`: that fails only if the sample's share of the first `(p/100 ± ε) N` steps
/// is off by more than ε, which by Hoeffding's inequality (valid for sampling without
/// replacement) has probability below `exp(-2 k ε²)` per side. With ε = 0.08 (1/k of that for
/// the interpolation) that is 2.8e-6 per side, below 2.1e-4 for all 36 checks together: the
/// seeded run is deterministic, and a correct reservoir passes it for all but a 2e-4 fraction of
/// seeds. A reservoir that stops updating once full keeps the first k steps (the median is step
/// 500, share 0.25 of N = 2000); one that keeps the most recent keeps the last k (the 1st
/// percentile is step 1010, share 0.5).
#[test]
fn autoclip_reservoir_is_a_uniform_sample_of_a_growing_stream() -> Result<()> {
    const K: usize = 1000;
    const EPS: f64 = 0.08;
    let percentiles = [1.0, 5.0, 10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0];
    let checkpoints = [2_000u64, 5_000, 20_000, 60_000];
    let mut autoclips: Vec<AutoClip> = percentiles
        .iter()
        .map(|&p| AutoClip::new(p)?.with_capacity(K))
        .collect::<Result<_>>()?;
    let mut step = 0u64;
    for n in checkpoints {
        while step < n {
            step += 1;
            for autoclip in &mut autoclips {
                autoclip.observe(step as f64);
            }
        }
        for (autoclip, p) in autoclips.iter().zip(percentiles) {
            assert_eq!(autoclip.observed(), n);
            let t = autoclip.threshold().expect("a threshold");
            let share = t / n as f64;
            assert!(
                (share - p / 100.0).abs() <= EPS,
                "after {n} steps the sample's {p}th percentile is step {t:.0}: a share {share:.3} \
                 of the steps, not {:.2} ± {EPS}",
                p / 100.0
            );
        }
    }
    Ok(())
}

/// The reservoir's generator has a fixed seed: two AutoClips fed the same norms long past their
/// capacity give bitwise the same threshold at every step, and a clone taken mid-way goes on
/// exactly like the original (the generator's state travels with it).
#[test]
fn autoclip_reservoir_is_reproducible() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(33);
    let norms: Vec<f64> = (0..20_000)
        .map(|i| rng.gen::<f64>() * (1.0 + i as f64 / 1000.0))
        .collect();
    let mut a = AutoClip::new(10.0)?.with_capacity(200)?;
    let mut b = AutoClip::new(10.0)?.with_capacity(200)?;
    let mut clone: Option<AutoClip> = None;
    let mut differs_from_the_exact_percentile = false;
    for (i, &n) in norms.iter().enumerate() {
        if i == 7_000 {
            clone = Some(a.clone());
        }
        let (ta, tb) = (a.observe(n), b.observe(n));
        assert_eq!(ta.to_bits(), tb.to_bits(), "step {i}: {ta} vs {tb}");
        if let Some(c) = clone.as_mut() {
            let tc = c.observe(n);
            assert_eq!(ta.to_bits(), tc.to_bits(), "clone, step {i}");
        }
        if i == norms.len() - 1 {
            let mut sorted = norms.clone();
            sorted.sort_by(f64::total_cmp);
            differs_from_the_exact_percentile = ref_quantile(&sorted, 0.1) != ta;
        }
    }
    // Past capacity the threshold is that of a sample, not the exact percentile of all norms:
    // the reproducibility above is not the trivial one of an exact history.
    assert!(differs_from_the_exact_percentile);
    Ok(())
}

/// `Clipped::last_norm` is the norm the setting bounds, against f64 references: the largest
/// `|g|` for value clipping, the L2 norm for AutoClip, the setting's norm type for `Norm`. The
/// gradients are random over three vars, so L1, L2 and the largest `|g|` all differ.
#[test]
fn clipped_last_norm_is_the_norm_the_setting_bounds() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(17);
    let norm = |max_norm, norm_type| ClipSetting::Norm {
        max_norm,
        norm_type,
    };
    for (setting, reference) in [
        (ClipSetting::value(0.5), NormType::Inf),
        (ClipSetting::AutoClip(AutoClip::default()), NormType::L2),
        (ClipSetting::AutoClip(AutoClip::new(90.0)?), NormType::L2),
        (ClipSetting::norm(0.5), NormType::L2),
        (norm(0.5, NormType::L1), NormType::L1),
        (norm(0.5, NormType::Inf), NormType::Inf),
        (norm(0.5, NormType::P(3.0)), NormType::P(3.0)),
    ] {
        let init: Vec<Vec<f64>> = SHAPES
            .iter()
            .map(|s| random(numel(s), 1.0, &mut rng))
            .collect();
        let vars = make_vars(&init)?;
        let sgd = SGD::new(vars.clone(), 0.1)?;
        let mut opt = Clipped::from_optimizer(sgd, vars.clone(), setting.clone())?;
        for step in 0..3 {
            let grads: Vec<Vec<f64>> = SHAPES
                .iter()
                .map(|s| random(numel(s), 2.0, &mut rng))
                .collect();
            opt.step(&store(&vars, &grads)?)?;
            let want = ref_norm(&as_f32(&grads), reference);
            let last = opt.last_norm().expect("a norm");
            assert_eq!(last.dtype(), DType::F32);
            let got = last.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            // The F32 norm tensor holds the norm rounded to nearest.
            assert!(
                (got - want).abs() <= want * (f64::powi(2.0, -24) + 1e-12),
                "{setting:?}, step {step}: last_norm {got} vs the {reference} norm {want}"
            );
        }
    }
    Ok(())
}

/// An infinite norm counts as clipped under every setting with a finite threshold (AutoClip's
/// once a finite norm is in its history); `last_norm` is then `inf`. A fresh AutoClip has no
/// finite threshold (`+inf`): it neither clips nor counts that step.
#[test]
fn clipped_counts_an_infinite_norm_as_clipped() -> Result<()> {
    let norm = |norm_type| ClipSetting::Norm {
        max_norm: 1.0,
        norm_type,
    };
    for (setting, warm_up) in [
        (ClipSetting::norm(1.0), false),
        (norm(NormType::L1), false),
        (norm(NormType::Inf), false),
        (norm(NormType::P(3.0)), false),
        (ClipSetting::value(1.0), false),
        (ClipSetting::AutoClip(AutoClip::default()), true),
        (ClipSetting::AutoClip(AutoClip::new(100.0)?), true),
    ] {
        let w = Var::new(&[0f32, 0., 0.], &Device::Cpu)?;
        let mut opt =
            Clipped::<SGD>::new(vec![w.clone()], ClippedConfig::new(0.1, setting.clone()))?;
        let step = |opt: &mut Clipped<SGD>, g: [f32; 3]| -> Result<GradStore> {
            let mut grads = GradStore::default();
            grads.insert(&w, Tensor::new(&g, &Device::Cpu)?);
            opt.step(&grads)?;
            Ok(grads)
        };
        if warm_up {
            // Norm 0.05: the first norm is its own threshold; 0.05 / (0.05 + 1e-6) < 1 clips.
            step(&mut opt, [0.03, 0.04, 0.0])?;
            assert_eq!(opt.clipped_steps()?, 1, "{setting:?}: warm-up");
        }
        let before = opt.clipped_steps()?;
        let grads = step(&mut opt, [f32::INFINITY, 0.5, -0.25])?;
        let last = opt.last_norm().expect("a norm").to_scalar::<f32>()?;
        assert_eq!(last, f32::INFINITY, "{setting:?}: last_norm");
        assert_eq!(
            opt.clipped_steps()?,
            before + 1,
            "{setting:?}: an infinite norm was not counted as clipped"
        );
        // And the gradients were indeed changed.
        let g = grads.get(&w).expect("gradient").to_vec1::<f32>()?;
        assert_ne!(g[0], f32::INFINITY, "{setting:?}: {g:?}");
    }
    // A fresh AutoClip: no finite norm seen, threshold +inf: untouched and not counted.
    let w = Var::new(&[0f32, 0.], &Device::Cpu)?;
    let config = ClippedConfig::new(0.1, ClipSetting::AutoClip(AutoClip::default()));
    let mut opt = Clipped::<SGD>::new(vec![w.clone()], config)?;
    let mut grads = GradStore::default();
    grads.insert(&w, Tensor::new(&[f32::INFINITY, 1.0], &Device::Cpu)?);
    opt.step(&grads)?;
    let g = grads.get(&w).expect("gradient").to_vec1::<f32>()?;
    assert_eq!(g, [f32::INFINITY, 1.0]);
    assert_eq!((opt.steps(), opt.clipped_steps()?), (1, 0));
    Ok(())
}

#[test]
fn bad_settings_are_refused_and_change_nothing() -> Result<()> {
    for bad in [
        ClipSetting::norm(-1.0),
        ClipSetting::norm(f64::NAN),
        ClipSetting::Norm {
            max_norm: 1.0,
            norm_type: NormType::P(0.0),
        },
        ClipSetting::Norm {
            max_norm: 1.0,
            norm_type: NormType::P(f64::INFINITY),
        },
        ClipSetting::value(-0.5),
        ClipSetting::value(f64::NAN),
    ] {
        let err = Clipped::<SGD>::new(vec![], ClippedConfig::new(0.1, bad.clone()));
        assert!(err.is_err(), "{bad:?} accepted");
    }
    for p in [0.0, -5.0, 100.5, f64::NAN, f64::INFINITY] {
        let err = AutoClip::new(p).unwrap_err().to_string();
        assert!(err.contains("percentile"), "{err}");
    }
    let mut autoclip = AutoClip::new(20.0)?;
    autoclip.observe(1.0);
    assert!(autoclip.clone().with_capacity(10).is_err());
    assert!(AutoClip::default().with_capacity(0).is_err());
    assert_eq!(
        (autoclip.observed(), autoclip.capacity()),
        (1, AutoClip::DEFAULT_CAPACITY)
    );

    // A refused setting keeps the old one.
    let w = Var::new(&[1f32, 1.], &Device::Cpu)?;
    let config = ClippedConfig::new(0.1, ClipSetting::AutoClip(AutoClip::default()));
    let mut opt = Clipped::<SGD>::new(vec![w.clone()], config)?;
    assert!(opt.set_clip_setting(ClipSetting::norm(-2.0)).is_err());
    assert!(matches!(opt.clip_setting(), ClipSetting::AutoClip(_)));

    // A step that fails (an integer gradient) changes no parameter, count or history.
    let mut grads = GradStore::default();
    grads.insert(&w, Tensor::new(&[1u32, 2], &Device::Cpu)?);
    assert!(opt.step(&grads).is_err());
    assert_eq!(w.to_vec1::<f32>()?, [1.0, 1.0]);
    assert_eq!((opt.steps(), opt.clipped_steps()?), (0, 0));
    assert!(opt.last_norm().is_none());
    match opt.clip_setting() {
        ClipSetting::AutoClip(a) => assert_eq!(a.observed(), 0),
        other => panic!("setting changed to {other:?}"),
    }
    Ok(())
}

#[test]
fn example_training_clips_as_an_independent_reference_says() -> Result<()> {
    use exploding_rnn::{train, TrainConfig};
    let cfg = TrainConfig {
        seq_len: 12,
        steps: 25,
        lr: 0.1,
        radius: 2.0,
        input_scale: 1.0,
        hidden: 16,
        batch: 8,
        seed: 3,
    };
    let hidden = indicatif::ProgressBar::hidden();
    let clipped = train(&cfg, Some(0.3), &Device::Cpu, &hidden)?;
    assert_eq!(clipped.losses.len(), cfg.steps);
    assert!(clipped.diverged_at.is_none());
    assert!(clipped.losses.iter().all(|l| l.is_finite()));
    let mut branches = [0; 2];
    for (max_norm, log) in [
        (0.3, &clipped),
        (2.0, &train(&cfg, Some(2.0), &Device::Cpu, &hidden)?),
    ] {
        let counts = check_example_clipping(log, max_norm);
        assert_eq!(log.clipped_steps, counts[1], "max_norm {max_norm}");
        branches = [branches[0] + counts[0], branches[1] + counts[1]];
    }
    assert!(
        branches[0] > 0 && branches[1] > 0,
        "{branches:?}: both cases checked"
    );
    // Same seed, same initialisation and batches: the first step is identical in both runs.
    let unclipped = train(&cfg, None, &Device::Cpu, &hidden)?;
    assert_eq!(unclipped.losses[0], clipped.losses[0]);
    assert_eq!(unclipped.norms[0], clipped.norms[0]);
    assert_eq!(unclipped.clipped_steps, 0);
    assert_eq!(check_example_clipping(&unclipped, f64::INFINITY)[1], 0);
    Ok(())
}

/// Checks one run of the example against the norms it logs with candle's own ops in f64
/// (`l2_norm_with_candle_ops`, no code of this crate) before and after each step's clipping:
/// the returned norm, and the norm after clipping, `min(1, max_norm / (norm + 1e-6))` times the
/// norm before. Returns how many finite steps were below the threshold, and how many above.
fn check_example_clipping(log: &exploding_rnn::RunLog, max_norm: f64) -> [usize; 2] {
    let half_ulp = f64::powi(2.0, -24);
    let mut counts = [0; 2];
    let steps = log.norms.iter().zip(&log.norms_check);
    for (step, ((&norm, &before), &after)) in steps.zip(&log.norms_after).enumerate() {
        if !before.is_finite() {
            assert_eq!(log.diverged_at, Some(step));
            break;
        }
        // The returned F32 norm is the f64 norm rounded to f32.
        assert!(
            (norm as f64 - before).abs() <= before * (half_ulp + 1e-12),
            "max_norm {max_norm}, step {step}: last_norm {norm} vs {before}"
        );
        let coef = (max_norm / (before + 1e-6)).min(1.0);
        if coef >= 1.0 {
            assert_eq!(
                before, after,
                "step {step}: clipped although below max_norm"
            );
            counts[0] += 1;
        } else {
            // Every element rounded to f32 after scaling: within 2^-24 relative each (the same
            // 1e-12 of slack as the norm above; measured: at most 8.5e-9 relative).
            let want = before * coef;
            assert!(
                (after - want).abs() <= want * (half_ulp + 1e-12),
                "max_norm {max_norm}, step {step}: norm after clipping {after} vs {want}"
            );
            counts[1] += 1;
        }
    }
    counts
}

#[test]
fn example_gradient_growth_is_rho_to_the_t() -> Result<()> {
    for (rho, t) in [(0.9, 30), (1.1, 30), (1.0, 50)] {
        let measured = exploding_rnn::gradient_growth(rho, t, 16, 1, &Device::Cpu)?;
        let expected = f64::powi(rho, t as i32);
        assert!(
            (measured / expected - 1.0).abs() < 1e-4,
            "rho {rho}, T {t}: {measured} vs {expected}"
        );
    }
    Ok(())
}

/// A gradient the inner optimizer would refuse (wrong dtype) is refused before anything changes:
/// no gradient clipped, no AutoClip history recorded, no step counted.
#[test]
fn clipped_step_refuses_bad_gradients_before_changing_anything() -> Result<()> {
    let w = Var::new(&[0f32, 0.], &Device::Cpu)?;
    let config = ClippedConfig::new(0.1, ClipSetting::AutoClip(AutoClip::default()));
    let mut opt = Clipped::<SGD>::new(vec![w.clone()], config)?;
    let mut grads = GradStore::default();
    grads.insert(&w, Tensor::new(&[30f64, 40.], &Device::Cpu)?);
    assert!(opt.step(&grads).is_err());
    let g = grads.get(&w).expect("gradient").to_vec1::<f64>()?;
    assert_eq!(g, [30.0, 40.0]);
    assert_eq!(w.to_vec1::<f32>()?, [0.0, 0.0]);
    assert_eq!(opt.steps(), 0);
    match opt.clip_setting() {
        ClipSetting::AutoClip(autoclip) => assert_eq!(autoclip.observed(), 0),
        other => panic!("setting changed: {other:?}"),
    }
    Ok(())
}

/// `max_norm = inf` never clips, even an infinite norm: nothing written, nothing counted.
#[test]
fn clipped_with_infinite_max_norm_never_clips() -> Result<()> {
    let w = Var::new(&[0f32, 0.], &Device::Cpu)?;
    let config = ClippedConfig::new(0.0, ClipSetting::norm(f64::INFINITY));
    let mut opt = Clipped::<SGD>::new(vec![w.clone()], config)?;
    let mut grads = GradStore::default();
    grads.insert(&w, Tensor::new(&[f32::INFINITY, 3.], &Device::Cpu)?);
    opt.step(&grads)?;
    let g = grads.get(&w).expect("gradient").to_vec1::<f32>()?;
    assert_eq!(g, [f32::INFINITY, 3.0]);
    assert_eq!((opt.steps(), opt.clipped_steps()?), (1, 0));
    Ok(())
}
