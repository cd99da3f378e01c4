//! The norm across ranks is the one-process norm, bitwise: every split, dtype and norm (the cases
//! of `dist_cases`), under the emulation too (the rescue pass included); an independent f64
//! reference; empty ranks; the optimizers stepping across ranks like the one-process step.

use super::*;

#[test]
fn every_rank_gets_the_one_process_bits_for_every_split_dtype_and_norm() {
    let cases = dist_cases::all_cases();
    for world in 1..=4 {
        let counts = on_ranks(world, |g| dist_cases::run_cases(g, &cases));
        assert!(counts.iter().all(|&c| c == cases.len()));
    }
}

#[test]
fn under_the_emulation_every_rank_gets_the_one_process_kernel_bits() {
    // Every case whose sums of powers stay in the f64 range (normal values, and infinities or
    // NaNs among them), against the one-process call under the same emulation: the first sum is
    // made of the kernels' own chunk partials, and the scale pass runs in the kernels; several
    // grids and block orders.
    let cases: Vec<_> = dist_cases::all_cases()
        .into_iter()
        .filter(|c| {
            matches!(
                c.3,
                dist_cases::Values::Normal | dist_cases::Values::Specials
            )
        })
        .collect();
    for (world, grid, order) in [
        (1, 3, BlockOrder::InOrder),
        (2, 1, BlockOrder::InOrder),
        (3, 7, BlockOrder::Shuffled),
        (4, 64, BlockOrder::Reversed),
    ] {
        let within = move |f: &mut dyn FnMut() -> Result<()>| -> Result<()> {
            KernelEmulation::new()
                .grid(grid)
                .block_order(order)
                .run(f)
                .map(|(r, _)| r)
        };
        let counts = on_ranks(world, |g| dist_cases::run_cases_within(g, &cases, &within));
        assert!(counts.iter().all(|&c| c == cases.len()));
    }
}

#[test]
fn under_the_emulation_the_rescue_pass_agrees_across_ranks() {
    // Huge and tiny values, where the rescue pass (on the CPU, divided by the global max) may
    // run: every rank returns the same bits, close to the one-process CPU norm.
    for dtype in dist_cases::DTYPES {
        for norm_type in [NormType::L2, NormType::P(7.0)] {
            for kind in [dist_cases::Values::Huge, dist_cases::Values::Tiny] {
                let model = dist_cases::model(3, dtype, kind).expect("model");
                let mut all = GradStore::default();
                for (v, g) in model.vars.iter().zip(&model.grads) {
                    all.insert(v, g.clone());
                }
                let want = candle_grad_clip::total_norm(&model.vars, &all, norm_type, false)
                    .and_then(|n| n.to_dtype(DType::F64)?.to_scalar::<f64>())
                    .expect("one-process norm");
                let got = on_ranks(3, |g| -> Result<u64> {
                    let mine: Vec<Var> = model
                        .vars
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| i % 3 == g.rank())
                        .map(|(_, v)| v.clone())
                        .collect();
                    let (norm, _) = KernelEmulation::new()
                        .run(|| total_norm_across(&mine, &all, norm_type, g))?;
                    Ok(norm.to_dtype(DType::F64)?.to_scalar::<f64>()?.to_bits())
                });
                let got: Vec<u64> = got.into_iter().map(|r| r.expect("a norm")).collect();
                let what = format!("{dtype:?} {norm_type:?} {kind:?}");
                assert!(got.iter().all(|&b| b == got[0]), "{what}: ranks disagree");
                let got = f64::from_bits(got[0]);
                // (An F32 norm above f32::MAX is inf on both sides.)
                assert!(
                    got == want || (got - want).abs() <= want * 1e-6,
                    "{what}: {got:e}, one process {want:e}"
                );
            }
        }
    }
}

#[test]
fn norms_match_an_independent_f64_reference() {
    // F64 values over 3 ranks against common::ref_norm (double-double sums of the values that
    // candle reads back), for L1, L2, p = 3 and Inf.
    let mut rng = StdRng::seed_from_u64(11);
    let shards: Vec<Vec<f64>> = (0..3)
        .map(|r| common::signed_values(&mut rng, 1000 + 777 * r, 10f64.powi(r as i32 - 1)))
        .collect();
    let all: Vec<f64> = shards.concat();
    for (norm_type, p) in [
        (NormType::L1, 1.0),
        (NormType::L2, 2.0),
        (NormType::P(3.0), 3.0),
        (NormType::Inf, f64::INFINITY),
    ] {
        let want = common::ref_norm(&all, p);
        let got = on_ranks(3, |g| -> Result<f64> {
            let values = &shards[g.rank()];
            let w = Var::zeros(values.len(), DType::F64, &Device::Cpu)?;
            let mut grads = GradStore::default();
            grads.insert(&w, Tensor::new(values.as_slice(), &Device::Cpu)?);
            total_norm_across(&[w], &grads, norm_type, g)?.to_scalar::<f64>()
        });
        for (rank, got) in got.into_iter().enumerate() {
            let got = got.expect("a norm");
            assert!(
                (got - want).abs() <= want * 4e-16,
                "{norm_type:?} rank {rank}: {got:e}, reference {want:e}"
            );
        }
    }
}

#[test]
fn empty_ranks_get_the_norm_with_the_global_dtype() {
    // Only rank 2 holds gradients, all F64: every rank returns an F64 norm (rank 0 and 1 on
    // the group's device, the CPU), and error_if_nonfinite fails every rank alike.
    let results = on_ranks(3, |g| -> Result<(DType, f64)> {
        let mut grads = GradStore::default();
        let mut vars = Vec::new();
        if g.rank() == 2 {
            let w = Var::zeros(2, DType::F64, &Device::Cpu)?;
            grads.insert(&w, Tensor::new(&[6f64, 8.], &Device::Cpu)?);
            vars.push(w);
        }
        let norm = clip_grad_norm_across_(&vars, &mut grads, 1.0, g)?;
        Ok((norm.dtype(), norm.to_scalar::<f64>()?))
    });
    for r in results {
        assert_eq!(r.expect("a norm"), (DType::F64, 10.0));
    }
    let results = on_ranks(2, |g| {
        let (w, mut grads) = one_var(&[if g.rank() == 0 { f32::INFINITY } else { 1.0 }])?;
        ClipGradNorm::new(1.0)
            .with_error_if_nonfinite(true)
            .clip_across_(std::slice::from_ref(&w), &mut grads, g)?;
        grads.get(&w).expect("grad").to_vec1::<f32>()
    });
    for r in results {
        assert!(r.is_err_and(|e| e.to_string().contains("non-finite")));
    }
}

#[test]
fn optimizers_step_across_like_the_one_process_step() {
    // Clipped<SGD> (norm, p = 3, value, AutoClip) and FusedAdamW (norm, Inf, AutoClip,
    // skip_nonfinite with and without a clip, a NaN on one rank): three steps on 2 and 3 ranks,
    // every var and every last norm bitwise the one-process run's (see dist_cases).
    for world in [2, 3] {
        let counts = on_ranks(world, |g| dist_cases::check_optimizers(g));
        assert!(counts.iter().all(|&c| c == counts[0] && c > 0));
    }
}
