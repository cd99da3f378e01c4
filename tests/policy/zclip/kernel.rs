//! The ZClip kernel (`grad_clip_zclip`) under the host emulation: bitwise the CPU path, for every
//! grid and block order and on mixed dtypes; an F32 norm overflow is a spike on both.

use super::*;

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
    let setting = ZClip::new().with_warmup_steps(3).with_z_threshold(1.0);
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
        let mut z = ZClip::new().with_warmup_steps(3);
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
