//! The host emulation against the GPU: the same kernels and tables give the same bits.

use super::*;
use candle_grad_clip::ClipGradNorm;

/// The host emulation computes the GPU's bits: the same kernels, the same tables, and arithmetic
/// that no compiler may contract (L1, L2 and the max; general `p` uses another `pow`). Clipped
/// elements then follow bit for bit.
#[test]
fn emulation_is_bitwise_the_gpu() -> Result<()> {
    let dev = cuda_or_skip!("emulation_is_bitwise_the_gpu");
    let mut rng = StdRng::seed_from_u64(11);
    for case in 0..6 {
        let grads: Vec<Tensor> = (0..1 + case * 3)
            .map(|i| {
                let n = [1, 31, 4095, 4097, 70_001, 300][(i + case) % 6];
                let dtype = if case < 4 {
                    DTYPES[case]
                } else {
                    DTYPES[i % 4]
                };
                tensor(&random_values(&mut rng, n, 1.0), &[n], dtype, &dev)
            })
            .collect::<Result<_>>()?;
        for norm in [NormType::L1, NormType::L2, NormType::Inf, NormType::P(3.0)] {
            let clip = ClipGradNorm::new(0.5).with_norm_type(norm);
            let cpu_grads = to_cpu(&grads)?;
            let gpu_grads: Vec<Tensor> = grads.iter().map(|g| g.copy()).collect::<Result<_>>()?;
            let (vars, mut gs) = store(&gpu_grads)?;
            let (evars, mut egs) = store(&cpu_grads)?;
            let gpu_norm = scalar(&clip.clip_(&vars, &mut gs)?)?;
            let (emu_norm, _) = KernelEmulation::new().run(|| clip.clip_(&evars, &mut egs))?;
            let emu_norm = scalar(&emu_norm)?;
            let what = format!("case {case} {norm}");
            if matches!(norm, NormType::P(_)) {
                assert!(
                    close(gpu_norm, emu_norm, 1e-12),
                    "{what}: gpu {gpu_norm:e} emulated {emu_norm:e}"
                );
                continue;
            }
            assert_eq!(
                gpu_norm.to_bits(),
                emu_norm.to_bits(),
                "{what}: gpu {gpu_norm:e} emulated {emu_norm:e}"
            );
            for (i, (g, e)) in gpu_grads.iter().zip(&cpu_grads).enumerate() {
                assert!(bits_equal(&values(g)?, &values(e)?), "{what}: grad {i}");
            }
        }
    }
    Ok(())
}
