//! A short run of the `exploding_rnn` example's training code, checked against the norms it logs
//! with candle's own ops.

use super::*;

#[path = "../../../examples/exploding_rnn.rs"]
#[allow(dead_code)]
mod exploding_rnn;

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
        assert_eq!(log.clipped_steps, counts[1] as u64, "max_norm {max_norm}");
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
