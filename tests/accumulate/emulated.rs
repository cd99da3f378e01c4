//! The kernel `grad_clip_accumulate`, run through the host emulation with the crate's own CUDA
//! host code: every pass (`add`, `add_scaled`, the rounding of F32 sums in `grads()`, `zero_`) is
//! one launch over every var, and its results are the CPU twin's and candle's, bit for bit, for
//! every dtype pair, grid and block order, at chunk boundaries, for views and empty tensors.

use candle_core::{backprop::GradStore, DType, Result, Tensor, Var};
use candle_grad_clip::{GradAccumulator, KernelEmulation};
use rand::{rngs::StdRng, SeedableRng};

use crate::common::{kernels, DTYPES, ORDERS};
use crate::semantics::SHAPES;
use crate::{assert_same_tensors, candle_loop, micro_batches, store_tensors, vars_of};

/// Shapes around the kernel's chunk of 4096 elements.
const CHUNKY: [&[usize]; 6] = [&[4095], &[4096], &[4097], &[2, 4096], &[3, 2731], &[8193]];

/// The same micro-batches through the emulated kernels and through the CPU twin, step after step,
/// with `add` or `add_scaled`: equal to each other and to candle's loop.
fn run_case(
    vars: &[Var],
    micro: &[GradStore],
    requested: Option<DType>,
    alpha: Option<f64>,
    emulation: &KernelEmulation,
    what: &str,
) -> Result<()> {
    let build = || -> Result<GradAccumulator> {
        let acc = GradAccumulator::new(vars)?;
        match requested {
            Some(dt) => acc.accumulate_in(dt),
            None => Ok(acc),
        }
    };
    let (mut emulated, mut cpu) = (build()?, build()?);
    for _step in 0..2 {
        for store in micro {
            let (_, log) = emulation.run(|| match alpha {
                Some(a) => emulated.add_scaled(store, a),
                None => emulated.add(store),
            })?;
            assert_eq!(
                kernels(&log),
                ["grad_clip_accumulate"],
                "{what}: one launch per add"
            );
            match alpha {
                Some(a) => cpu.add_scaled(store, a)?,
                None => cpu.add(store)?,
            }
        }
        let (got, log) = emulation.run(|| Ok(store_tensors(vars, emulated.grads()?)))?;
        let widened = vars
            .iter()
            .any(|v| crate::sum_dtype(v.dtype(), requested) != v.dtype());
        let launches = if widened { 1 } else { 0 };
        assert_eq!(log.launches.len(), launches, "{what}: grads() launches");
        let twin = store_tensors(vars, cpu.grads()?);
        assert_same_tensors(&got, &twin, &format!("{what}: kernel vs CPU twin"))?;
        if alpha.is_none() {
            let want = candle_loop(vars, micro, requested)?;
            assert_same_tensors(&got, &want, &format!("{what}: kernel vs candle"))?;
        }
        let (_, log) = emulation.run(|| emulated.zero_())?;
        assert_eq!(
            kernels(&log),
            ["grad_clip_accumulate"],
            "{what}: zero_ is one launch"
        );
        cpu.zero_()?;
        for t in got.iter().flatten() {
            assert!(
                crate::common::vals(t)?.iter().all(|&x| x == 0.0),
                "{what}: zero_"
            );
        }
    }
    Ok(())
}

#[test]
fn kernel_is_candles_loop_and_the_cpu_twin() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(17);
    let mut case = 0;
    for requested in [None, Some(DType::F32), Some(DType::F64)] {
        for alpha in [None, Some(0.5), Some(1.0 / 3.0)] {
            let shapes: Vec<&[usize]> = SHAPES.iter().chain(&CHUNKY).copied().collect();
            let vars = vars_of(&shapes, &DTYPES)?;
            let micro = micro_batches(&mut rng, &vars, 3, 0.2, Some(case % shapes.len()), true)?;
            let grid = [1, 3, 7, 64][case % 4];
            let order = ORDERS[(case / 2) % 4];
            let emulation = KernelEmulation::new()
                .grid(grid)
                .block_order(order)
                .seed(case as u64);
            let what = format!("{requested:?} alpha {alpha:?} grid {grid} {order:?}");
            run_case(&vars, &micro, requested, alpha, &emulation, &what)?;
            case += 1;
        }
    }
    Ok(())
}

/// Non-finite values and half-precision NaN through the kernel.
#[test]
fn kernel_sums_nonfinite_values() -> Result<()> {
    for dtype in DTYPES {
        let w = Var::zeros(5, dtype, &candle_core::Device::Cpu)?;
        let values = [
            [f64::NAN, 1.0, f64::INFINITY, f64::INFINITY, 65504.0],
            [2.0, f64::NEG_INFINITY, -1.0, f64::NEG_INFINITY, 65504.0],
        ];
        let micro: Vec<GradStore> = values
            .iter()
            .map(|v| {
                let mut s = GradStore::default();
                s.insert(&w, crate::common::tensor(v, &[5], dtype)?);
                Ok(s)
            })
            .collect::<Result<_>>()?;
        for requested in [None, Some(DType::F32)] {
            run_case(
                std::slice::from_ref(&w),
                &micro,
                requested,
                None,
                &KernelEmulation::new(),
                &format!("{dtype:?} {requested:?}"),
            )?;
        }
    }
    Ok(())
}

/// Many small vars, one launch: 3,000 vars of 1 to 40 elements.
#[test]
fn many_small_vars_are_one_launch() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(2);
    let shapes: Vec<Vec<usize>> = (0..3000).map(|i| vec![1 + i % 40]).collect();
    let shapes: Vec<&[usize]> = shapes.iter().map(|s| s.as_slice()).collect();
    let vars = vars_of(&shapes, &[DType::F32, DType::BF16])?;
    let micro = micro_batches(&mut rng, &vars, 2, 0.1, None, false)?;
    run_case(
        &vars,
        &micro,
        Some(DType::F32),
        None,
        &KernelEmulation::new().grid(5),
        "small",
    )?;
    // Nothing at all to add (every var empty): no launch.
    let empty = vars_of(&[&[0], &[2, 0]], &[DType::F32])?;
    let mut acc = GradAccumulator::new(&empty)?;
    let mut g = GradStore::default();
    g.insert(
        &empty[0],
        Tensor::zeros(0, DType::F32, &candle_core::Device::Cpu)?,
    );
    let (_, log) = KernelEmulation::new().run(|| acc.add(&g))?;
    assert!(log.launches.is_empty());
    Ok(())
}
