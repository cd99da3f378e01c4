//! AutoClip: the threshold sequence against the paper's reference (the percentile of the whole
//! history) while the history is exact, a bounded memory whose reservoir is a uniform and
//! reproducible sample past its capacity, and `Clipped` following the percentile. Every expected
//! value comes from an independent `f64` reference written here, never from the library.

use crate::common::ref_quantile;
use candle_core::{backprop::GradStore, Device, Result, Tensor, Var};
use candle_grad_clip::{AutoClip, ClipSetting, Clipped, ClippedConfig};
use candle_nn::{Optimizer, SGD};
use rand::{rngs::StdRng, Rng, SeedableRng};

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

/// `AutoClip::save_state` / `load_state`, as the other stateful types have them: the history
/// and sampler resume bitwise (the resumed policy gives the same thresholds as the original),
/// a damaged file and another kind's file are refused, and a refused load changes nothing.
#[test]
fn autoclip_state_files_resume_bitwise_and_refuse_other_files() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("cgc-autoclip-state-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("autoclip.safetensors");
    let mut original = AutoClip::new(30.0)?.with_capacity(16)?;
    for i in 0..40 {
        original.observe(1.0 + (i as f64 * 0.37).sin().abs() * 10.0);
    }
    original.save_state(&path)?;
    let mut resumed = AutoClip::new(30.0)?.with_capacity(16)?;
    resumed.load_state(&path)?;
    assert_eq!(resumed.observed(), original.observed());
    for i in 0..40 {
        let norm = 2.0 + (i as f64 * 0.11).cos() * 5.0;
        assert_eq!(
            resumed.observe(norm).to_bits(),
            original.observe(norm).to_bits(),
            "threshold {i}"
        );
    }
    // A flipped byte in the data: refused, nothing changed.
    let mut bytes = std::fs::read(&path)?;
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&path, &bytes)?;
    let before = resumed.observed();
    assert!(resumed.load_state(&path).is_err());
    assert_eq!(resumed.observed(), before);
    // Another kind's file.
    candle_grad_clip::ZClip::new().save_state(&path)?;
    let err = resumed
        .load_state(&path)
        .expect_err("a ZClip file")
        .to_string();
    assert!(err.contains("ZClip") || err.contains("kind"), "{err}");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
