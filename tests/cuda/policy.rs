//! ZClip's kernel (`grad_clip_zclip`) on the GPU, bitwise the CPU twin.

use super::*;

/// ZClip's kernel (`grad_clip_zclip`) on the GPU computes the CPU twin's bits: a recorded norm
/// sequence (spikes, NaN, infinities) fed exactly through one F64 element, statistics and clipped
/// gradient compared bitwise at every step.
#[test]
fn zclip_on_the_gpu_is_bitwise_the_cpu() -> Result<()> {
    let dev = cuda_or_skip!("zclip_on_the_gpu_is_bitwise_the_cpu");
    let mut rng = StdRng::seed_from_u64(21);
    for setting in [
        ZClip::new().with_warmup_steps(5),
        ZClip::new().with_warmup_steps(3).with_max_grad_norm(2.0),
    ] {
        let (mut gpu, mut cpu) = (setting.clone(), setting);
        let vg = Var::new(&[0f64], &dev)?;
        let vc = Var::new(&[0f64], &Device::Cpu)?;
        for step in 0..80 {
            let n: f64 = match rng.gen_range(0..30) {
                0 => f64::NAN,
                1 => f64::INFINITY,
                2 => 500.0 * rng.gen_range(1.0..2.0),
                _ => rng.gen_range(1.0..2.0),
            };
            let mut gg = GradStore::default();
            gg.insert(&vg, Tensor::new(&[n], &dev)?);
            let mut gc = GradStore::default();
            gc.insert(&vc, Tensor::new(&[n], &Device::Cpu)?);
            gpu.clip_(std::slice::from_ref(&vg), &mut gg)?;
            cpu.clip_(std::slice::from_ref(&vc), &mut gc)?;
            let a = gg.get(&vg).unwrap().to_vec1::<f64>()?[0];
            let b = gc.get(&vc).unwrap().to_vec1::<f64>()?[0];
            assert!(
                a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()),
                "step {step}: {a} vs {b}"
            );
            assert_eq!(gpu.statistics()?, cpu.statistics()?, "step {step}");
            let (ca, cb) = (gpu.last_coefficient()?, cpu.last_coefficient()?);
            assert!(
                ca.map(f64::to_bits) == cb.map(f64::to_bits) || ca.is_some_and(f64::is_nan),
                "step {step}"
            );
        }
    }
    Ok(())
}
