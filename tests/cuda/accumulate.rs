//! `GradAccumulator` on the GPU: `add`, `add_scaled`, the rounding of F32 sums and `zero_` equal
//! the CPU twin bit for bit (the element arithmetic is one rounding of an exact f64 value), in
//! every dtype and in F32 for half precision; a gradient on another device is refused.

use super::*;
use candle_grad_clip::GradAccumulator;

fn sums(acc: &mut GradAccumulator, vars: &[Var]) -> Result<Vec<Option<Vec<f64>>>> {
    let grads = acc.grads()?;
    vars.iter()
        .map(|v| grads.get(v).map(values).transpose())
        .collect()
}

#[test]
fn accumulation_on_the_gpu_is_the_cpu_twin() -> Result<()> {
    let dev = cuda_or_skip!("accumulation_on_the_gpu_is_the_cpu_twin");
    let mut rng = StdRng::seed_from_u64(23);
    let shapes: [&[usize]; 6] = [&[4097], &[33, 65], &[1], &[0], &[4096, 3], &[2, 8193]];
    for requested in [None, Some(DType::F32)] {
        for alpha in [None, Some(1.0 / 3.0)] {
            let mut gpu_vars = Vec::new();
            let mut cpu_vars = Vec::new();
            for (k, s) in shapes.iter().enumerate() {
                let dt = DTYPES[k % DTYPES.len()];
                gpu_vars.push(Var::zeros(s.to_vec(), dt, &dev)?);
                cpu_vars.push(Var::zeros(s.to_vec(), dt, &Device::Cpu)?);
            }
            let build = |vars: &[Var]| -> Result<GradAccumulator> {
                let acc = GradAccumulator::new(vars)?;
                match requested {
                    Some(dt) => acc.accumulate_in(dt),
                    None => Ok(acc),
                }
            };
            let (mut gpu, mut cpu) = (build(&gpu_vars)?, build(&cpu_vars)?);
            for _ in 0..4 {
                let (mut gg, mut gc) = (GradStore::default(), GradStore::default());
                for (vg, vc) in gpu_vars.iter().zip(&cpu_vars) {
                    let v = random_values(&mut rng, vg.elem_count(), 10.0);
                    gg.insert(vg, tensor(&v, vg.dims(), vg.dtype(), &dev)?);
                    gc.insert(vc, tensor(&v, vc.dims(), vc.dtype(), &Device::Cpu)?);
                }
                match alpha {
                    Some(a) => {
                        gpu.add_scaled(&gg, a)?;
                        cpu.add_scaled(&gc, a)?;
                    }
                    None => {
                        gpu.add(&gg)?;
                        cpu.add(&gc)?;
                    }
                }
            }
            let what = format!("{requested:?} alpha {alpha:?}");
            let (a, b) = (sums(&mut gpu, &gpu_vars)?, sums(&mut cpu, &cpu_vars)?);
            for (i, (x, y)) in a.iter().zip(&b).enumerate() {
                let (x, y) = (x.as_ref().expect("a sum"), y.as_ref().expect("a sum"));
                assert!(bits_equal(x, y), "{what}: var {i}");
            }
            gpu.zero_()?;
            assert!(sums(&mut gpu, &gpu_vars)?.iter().all(Option::is_none));
        }
    }
    // A gradient on the CPU for a GPU var is refused, changing nothing.
    let w = Var::zeros(3, DType::F32, &dev)?;
    let mut acc = GradAccumulator::new(std::slice::from_ref(&w))?;
    let mut g = GradStore::default();
    g.insert(&w, Tensor::ones(3, DType::F32, &Device::Cpu)?);
    let msg = acc.add(&g).expect_err("another device").to_string();
    assert!(
        msg.contains("var #0") && msg.contains("nothing was accumulated"),
        "{msg}"
    );
    assert_eq!(acc.micro_batches(), 0);
    Ok(())
}
