//! CUDA back end tests (feature `cuda`): the fused kernels against the CPU back end, an `f64`
//! reference and the host emulation of the same kernels.
//!
//! No usable GPU is a **failure**, not a pass: every test calls [`cuda`], which panics when
//! `Device::new_cuda(0)` fails, unless `CANDLE_GRAD_CLIP_ALLOW_NO_GPU=1` is set (then each test
//! prints `SKIPPED (no GPU): …` to stderr and returns). A test that cannot run one of its parts on
//! this GPU (too little memory, …) prints `SKIPPED: <test>: <reason>` to stderr; `scripts/gpu-check.sh
//! run` counts those lines and fails if there is any. All tests share one device (one PTX load and
//! JIT per process). Built with the feature on a machine without a driver, the binary cannot even
//! start: it links libcuda.
//!
//! By concern, as the CPU targets are: [`norms`], [`clip`] (AGC included), [`device`] (what only a
//! GPU can show), [`emulation`] (the host emulation against the GPU), [`optim`], [`policy`]
//! (ZClip), [`distributed`], [`grad_scaler`], [`accumulate`] (`GradAccumulator`). Here the device and the helpers they share.
#![cfg(feature = "cuda")]

use std::sync::OnceLock;
use std::time::{Duration, Instant};

// By name: this target has its own `tensor`, `scalar` and `random_values` (on a device).
#[path = "../common/mod.rs"]
mod common;

use candle_core::{backprop::GradStore, DType, Device, Result, Tensor, Var};
use candle_grad_clip::{
    clip_grad_norm_, clip_grad_value_, clip_grads_with_norm_, grad_norms, total_norm, ClipGradNorm,
    KernelEmulation, NormType, ZClip,
};
use common::{assert_named_norms, ulp, DTYPES};
use rand::{rngs::StdRng, Rng, SeedableRng};
use rand_distr::{Distribution, Normal};

const NORMS: [NormType; 7] = [
    NormType::L1,
    NormType::L2,
    NormType::Inf,
    NormType::P(3.0),
    NormType::P(0.5),
    NormType::P(7.5),
    NormType::P(2.0),
];

/// Set to 1 to let the CUDA tests pass without a GPU (each prints why it skipped).
const ALLOW_NO_GPU: &str = "CANDLE_GRAD_CLIP_ALLOW_NO_GPU";

/// The GPU shared by every test, or `None` (after saying so on stderr) when there is none and
/// [`ALLOW_NO_GPU`] allows that. Panics when there is none and skipping is not allowed.
fn cuda(test: &str) -> Option<Device> {
    static DEVICE: OnceLock<std::result::Result<Device, String>> = OnceLock::new();
    match DEVICE.get_or_init(|| Device::new_cuda(0).map_err(|e| e.to_string())) {
        Ok(d) => Some(d.clone()),
        Err(e) if std::env::var(ALLOW_NO_GPU).is_ok_and(|v| v == "1") => {
            loud(&format!("SKIPPED (no GPU): {test}: {e}"));
            None
        }
        Err(e) => panic!(
            "no usable CUDA device ({e}); the CUDA tests need a GPU (set {ALLOW_NO_GPU}=1 to skip them)"
        ),
    }
}

macro_rules! cuda_or_skip {
    ($test:expr) => {
        match cuda($test) {
            Some(d) => d,
            None => return Ok(()),
        }
    };
}

// The tests, by concern (declared after `cuda_or_skip!`, which they use).
mod accumulate;
mod clip;
mod device;
mod distributed;
mod emulation;
mod grad_scaler;
mod norms;
mod optim;
mod policy;

/// Reports a part of a test that could not run here, loudly (scripts/gpu-check.sh counts these).
fn skipped(test: &str, reason: &str) {
    loud(&format!("SKIPPED: {test}: {reason}"));
}

/// A line on the process's stderr that the test harness does not capture (it captures only the
/// print macros), so a skip shows even when the test passes.
fn loud(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Random values, seeded, of magnitudes spread over a few decades.
fn random_values(rng: &mut StdRng, n: usize, scale: f64) -> Vec<f64> {
    let normal = Normal::new(0.0, 1.0).unwrap();
    (0..n)
        .map(|_| normal.sample(rng) * scale * 10f64.powi(rng.gen_range(-2..3)))
        .collect()
}

/// A tensor with the given values rounded to `dtype` on the host, then moved to `dev`.
fn tensor(values: &[f64], shape: &[usize], dtype: DType, dev: &Device) -> Result<Tensor> {
    Tensor::from_vec(values.to_vec(), shape, &Device::Cpu)?
        .to_dtype(dtype)?
        .to_device(dev)
}

/// Vars (tiny: they are only keys) and a store holding `grads` as their gradients.
fn store(grads: &[Tensor]) -> Result<(Vec<Var>, GradStore)> {
    let mut store = GradStore::default();
    let mut vars = Vec::with_capacity(grads.len());
    for g in grads {
        let v = Var::zeros(1, g.dtype(), g.device())?;
        store.insert(v.as_tensor(), g.clone());
        vars.push(v);
    }
    Ok((vars, store))
}

fn values(t: &Tensor) -> Result<Vec<f64>> {
    t.to_device(&Device::Cpu)?
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()
}

fn scalar(t: &Tensor) -> Result<f64> {
    t.to_device(&Device::Cpu)?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()
}

fn close(a: f64, b: f64, rel: f64) -> bool {
    (a.is_nan() && b.is_nan()) || a == b || (a - b).abs() <= rel * a.abs().max(b.abs())
}

/// Elements scaled on two back ends whose norms (and so coefficients) may differ in their last
/// bits: both products are rounded once from f64 (the CPU's conversions round correctly too), so
/// they differ by at most one unit in the last place of `dtype` (F64: the norms' own 1e-12).
fn assert_within_one_ulp(got: &[f64], want: &[f64], dtype: DType, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let tol = if dtype == DType::F64 {
            w.abs() * 1e-12
        } else {
            ulp(dtype, *w)
        };
        assert!(
            (g.is_nan() && w.is_nan()) || g == w || (g - w).abs() <= tol,
            "{what}: element {i}: got {g:e}, want {w:e} ({dtype:?}, tol {tol:e})"
        );
    }
}

fn bits_equal(a: &[f64], b: &[f64]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| (x.is_nan() && y.is_nan()) || x.to_bits() == y.to_bits())
}

/// The norm in plain f64 (sum of |x|^p in f64, the reference).
fn reference_norm(all: &[Vec<f64>], norm: NormType) -> f64 {
    let xs = all.iter().flatten().map(|x| x.abs());
    match norm {
        NormType::Inf => xs.fold(0.0, |m: f64, x| {
            if x.is_nan() || m.is_nan() {
                f64::NAN
            } else {
                m.max(x)
            }
        }),
        NormType::L1 => xs.sum(),
        NormType::L2 => xs.map(|x| x * x).sum::<f64>().sqrt(),
        NormType::P(p) => xs.map(|x| x.powf(p)).sum::<f64>().powf(1.0 / p),
    }
}

fn to_cpu(grads: &[Tensor]) -> Result<Vec<Tensor>> {
    grads.iter().map(|g| g.to_device(&Device::Cpu)).collect()
}

const SIZES: [usize; 9] = [1, 3, 7, 31, 4095, 4096, 4097, 70_001, 0];

/// Clips on the GPU and on the CPU from the same values, compares the norms and every element.
fn check_clip(grads: &[Tensor], clip: ClipGradNorm, what: &str) -> Result<()> {
    let cpu_grads = to_cpu(grads)?;
    let (vars, mut gs) = store(grads)?;
    let (cvars, mut cgs) = store(&cpu_grads)?;
    let gpu_norm = clip.clip_(&vars, &mut gs)?;
    let cpu_norm = clip.clip_(&cvars, &mut cgs)?;
    assert_eq!(gpu_norm.dtype(), cpu_norm.dtype(), "{what}: norm dtype");
    let (g, c) = (scalar(&gpu_norm)?, scalar(&cpu_norm)?);
    assert!(close(g, c, 1e-6), "{what}: norm gpu {g} cpu {c}");
    for (i, (v, cv)) in vars.iter().zip(&cvars).enumerate() {
        let got = values(gs.get(v.as_tensor()).unwrap())?;
        let want = values(cgs.get(cv.as_tensor()).unwrap())?;
        assert_within_one_ulp(&got, &want, grads[i].dtype(), &format!("{what}: grad {i}"));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// For the fused optimizers and GradScaler.

/// Vars on `dev` (and a twin set with the same values) for the optimizer tests.
fn optimizer_vars(rng: &mut StdRng, dtype: DType, dev: &Device) -> Result<(Vec<Var>, Vec<Var>)> {
    let mut a = Vec::new();
    let mut b = Vec::new();
    for n in [5000usize, 1, 70_001, 4096, 333] {
        let t = tensor(&random_values(rng, n, 1.0), &[n], dtype, dev)?;
        a.push(Var::from_tensor(&t)?);
        b.push(Var::from_tensor(&t)?);
    }
    Ok((a, b))
}

fn optimizer_grads(
    rng: &mut StdRng,
    a: &[Var],
    b: &[Var],
    scale: f64,
) -> Result<(GradStore, GradStore)> {
    let (mut ga, mut gb) = (GradStore::default(), GradStore::default());
    for (va, vb) in a.iter().zip(b) {
        let g = random_values(rng, va.elem_count(), scale);
        ga.insert(va, tensor(&g, va.dims(), va.dtype(), va.device())?);
        gb.insert(vb, tensor(&g, vb.dims(), vb.dtype(), vb.device())?);
    }
    Ok((ga, gb))
}

fn all_bits_equal(a: &[Var], b: &[Var]) -> Result<bool> {
    for (x, y) in a.iter().zip(b) {
        if !bits_equal(&values(x.as_tensor())?, &values(y.as_tensor())?) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Queues 200 matmuls of `a` (4096 x 4096) on `dev`, then runs `call`: it must return while they
/// are still running (before half of the whole), or it waited for the device.
fn returns_before_the_device(
    dev: &Device,
    a: &Tensor,
    what: &str,
    call: impl FnOnce() -> Result<()>,
) -> Result<()> {
    let _ = a.matmul(a)?;
    dev.synchronize()?;
    let start = Instant::now();
    let mut m = a.clone();
    for _ in 0..200 {
        m = m.matmul(a)?;
    }
    let queued = start.elapsed();
    let t = Instant::now();
    call()?;
    let returned = queued + t.elapsed();
    dev.synchronize()?;
    drop(m);
    let total = start.elapsed();
    assert!(
        returned < total / 2,
        "{what} seems to wait for the device: returned at {returned:?} of {total:?}"
    );
    Ok(())
}
