//! Adaptive gradient clipping (`adaptive_clip_grad_`, `ClipSetting::Agc`): against an f64
//! transcription of the formula written here (per-unit norms summed in f64 over the values candle
//! reads back), on the CPU and through the emulated kernels (which must equal the CPU bit for bit
//! for every grid and block order), through `Clipped` and the fused optimizers, with the nasty
//! cases (NaN, ±inf, zero parameters, empty tensors, non-contiguous gradients) and the refusals.

mod common;

use candle_core::{backprop::GradStore, DType, Device, Result, Tensor, Var};
use candle_grad_clip::{
    adaptive_clip_grad_, ClipSetting, Clipped, ClippedConfig, FusedAdamW, FusedSgd,
    KernelEmulation, ParamsSgd, AGC_DEFAULT_EPS,
};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, SGD};
use common::{bits, err_msg, kernels, scalar, signed_values, tensor, ulp, vals, DTYPES, ORDERS};
use rand::{rngs::StdRng, Rng, SeedableRng};

/// Shapes of rank 0, 1, 2 and 4, units of 1 element to 4099, empty ones.
const SHAPES: [&[usize]; 12] = [
    &[],
    &[1],
    &[7],
    &[0],
    &[3, 0],
    &[0, 4],
    &[5, 4],
    &[9, 1],
    &[1, 4099],
    &[6, 3, 2, 2],
    &[33, 70],
    &[2, 600],
];

// ---------------------------------------------------------------------------------------------
// The reference.

/// Units of a tensor of `dims`, timm's convention: slices along dim 0 for rank >= 2, the whole
/// tensor otherwise; `(count, length)`.
fn units(dims: &[usize]) -> (usize, usize) {
    let n: usize = dims.iter().product();
    if n == 0 {
        (0, 0)
    } else if dims.len() >= 2 {
        (dims[0], n / dims[0])
    } else {
        (1, n)
    }
}

/// The reference clip of one var: for each unit, `Some(coefficient)` when
/// `‖g‖ > clipping · max(‖w‖, eps)`, with the coefficient `max_norm / max(‖g‖, 1e-6)`, norms in
/// f64 (plain sequential sums); NaN comparisons are false. Also the sum of the squares of `g`.
fn reference(
    p: &[f64],
    g: &[f64],
    dims: &[usize],
    clipping: f64,
    eps: f64,
) -> (Vec<Option<f64>>, f64) {
    let (count, len) = units(dims);
    let mut out = Vec::new();
    let mut total = 0.0;
    for u in 0..count {
        let w: f64 = p[u * len..(u + 1) * len]
            .iter()
            .map(|x| x * x)
            .sum::<f64>()
            .sqrt();
        let gs: f64 = g[u * len..(u + 1) * len].iter().map(|x| x * x).sum();
        total += gs;
        let gn = gs.sqrt();
        let max_norm = clipping * if w.is_nan() { f64::NAN } else { w.max(eps) };
        out.push((gn > max_norm).then(|| max_norm / gn.max(1e-6)));
    }
    (out, total)
}

/// Asserts the clip of one gradient: clipped units within one ulp of `old · coefficient` (F64:
/// also 1e-13 relative, the summation order of the norms), NaN where that product is NaN, the
/// other units bit for bit unchanged.
fn assert_clipped(
    dtype: DType,
    dims: &[usize],
    old: &Tensor,
    new: &Tensor,
    coefficients: &[Option<f64>],
    what: &str,
) -> Result<()> {
    let (_, len) = units(dims);
    let (old_v, new_v) = (vals(old)?, vals(new)?);
    let (old_b, new_b) = (bits(old)?, bits(new)?);
    for (u, c) in coefficients.iter().enumerate() {
        for i in u * len..(u + 1) * len {
            match c {
                None => assert_eq!(
                    old_b[i], new_b[i],
                    "{what}: unit {u} element {i} is not clipped but changed ({} -> {})",
                    old_v[i], new_v[i]
                ),
                Some(c) => {
                    let want = old_v[i] * c;
                    if want.is_nan() {
                        assert!(
                            new_v[i].is_nan(),
                            "{what}: unit {u} element {i}: {} not NaN",
                            new_v[i]
                        );
                        continue;
                    }
                    let tol = ulp(dtype, want)
                        + if dtype == DType::F64 {
                            1e-13 * want.abs()
                        } else {
                            0.0
                        };
                    assert!(
                        (new_v[i] - want).abs() <= tol,
                        "{what}: unit {u} element {i}: {} * {c} = {want}, got {}",
                        old_v[i],
                        new_v[i]
                    );
                }
            }
        }
    }
    Ok(())
}

/// A var of `shape` and `dtype` whose units have random norms (one unit in five all zeros), and
/// a gradient whose unit norms lie 4× above or 4× below the unit's `clipping · max(‖w‖, eps)`
/// (far from the threshold, so that rounding never decides).
fn case(
    rng: &mut StdRng,
    shape: &[usize],
    dtype: DType,
    clipping: f64,
    eps: f64,
) -> Result<(Var, Tensor)> {
    let n: usize = shape.iter().product();
    let (count, len) = units(shape);
    let mut p = signed_values(rng, n, 1.0);
    for u in 0..count {
        if rng.gen_bool(0.2) {
            p[u * len..(u + 1) * len].iter_mut().for_each(|x| *x = 0.0);
        }
    }
    let param = tensor(&p, shape, dtype)?;
    let p = vals(&param)?;
    let mut g = signed_values(rng, n, 1.0);
    for u in 0..count {
        let unit = &mut g[u * len..(u + 1) * len];
        if unit.iter().all(|&x| x == 0.0) {
            unit[0] = 1.0;
        }
        let w: f64 = p[u * len..(u + 1) * len]
            .iter()
            .map(|x| x * x)
            .sum::<f64>()
            .sqrt();
        let gn: f64 = unit.iter().map(|x| x * x).sum::<f64>().sqrt();
        let ratio = if rng.gen_bool(0.5) { 4.0 } else { 0.25 };
        let k = ratio * clipping * w.max(eps) / gn;
        unit.iter_mut().for_each(|x| *x *= k);
    }
    Ok((Var::from_tensor(&param)?, tensor(&g, shape, dtype)?))
}

/// Runs `adaptive_clip_grad_` on fresh copies of `grads` (the same values), returning the norm and
/// the clipped gradients.
fn clip_copy(
    vars: &[Var],
    grads: &[Tensor],
    clipping: f64,
    eps: f64,
) -> Result<(Tensor, Vec<Tensor>)> {
    let mut store = GradStore::default();
    let copies: Vec<Tensor> = grads.iter().map(|g| g.copy()).collect::<Result<_>>()?;
    for (v, g) in vars.iter().zip(&copies) {
        store.insert(v, g.clone());
    }
    let norm = adaptive_clip_grad_(vars, &mut store, clipping, eps)?;
    let out = vars
        .iter()
        .map(|v| store.get(v).expect("a gradient").clone())
        .collect();
    Ok((norm, out))
}

/// All shapes of one dtype at once: the clip of every unit against the reference, the global
/// norm, on the CPU and emulated; the emulated result bitwise the CPU's.
#[test]
fn matches_the_f64_reference_for_every_dtype_and_shape() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(9);
    for (k, &dtype) in DTYPES.iter().enumerate() {
        for (clipping, eps) in [(0.05, AGC_DEFAULT_EPS), (0.01, 0.0), (1.5, 0.1)] {
            let mut vars = Vec::new();
            let mut grads = Vec::new();
            for shape in SHAPES {
                let (v, g) = case(&mut rng, shape, dtype, clipping, eps)?;
                vars.push(v);
                grads.push(g);
            }
            let what = format!("{dtype:?} clipping {clipping} eps {eps}");
            let (norm, cpu) = clip_copy(&vars, &grads, clipping, eps)?;
            // The reference.
            let mut total = 0.0;
            for ((v, g), new) in vars.iter().zip(&grads).zip(&cpu) {
                let (coefficients, sum) =
                    reference(&vals(v.as_tensor())?, &vals(g)?, v.dims(), clipping, eps);
                total += sum;
                assert_clipped(
                    dtype,
                    v.dims(),
                    g,
                    new,
                    &coefficients,
                    &format!("{what} {:?}", v.dims()),
                )?;
            }
            assert_eq!(
                norm.dtype(),
                if dtype == DType::F64 {
                    DType::F64
                } else {
                    DType::F32
                }
            );
            let (got, want) = (scalar(&norm)?, total.sqrt());
            let tol = if dtype == DType::F64 {
                1e-14
            } else {
                2f64.powi(-23)
            };
            assert!(
                (got - want).abs() <= tol * want,
                "{what}: norm {got}, reference {want}"
            );
            // The kernels, several grids and block orders: bitwise the CPU.
            for (r, grid) in [1u32, 3, 7, 64].into_iter().enumerate() {
                let order = ORDERS[(k + r) % ORDERS.len()];
                let emulation = KernelEmulation::new()
                    .grid(grid)
                    .block_order(order)
                    .seed(r as u64);
                let ((norm_e, emulated), log) =
                    emulation.run(|| clip_copy(&vars, &grads, clipping, eps))?;
                assert_eq!(kernels(&log), ["grad_clip_agc"], "{what}");
                assert_eq!(
                    bits(&norm_e)?,
                    bits(&norm)?,
                    "{what} grid {grid} {order:?}: norm"
                );
                for (a, b) in emulated.iter().zip(&cpu) {
                    assert_eq!(
                        bits(a)?,
                        bits(b)?,
                        "{what} grid {grid} {order:?}: {:?}",
                        a.dims()
                    );
                }
            }
        }
    }
    Ok(())
}

/// The example of the paper's formula by hand: a Linear weight [2, 3] and its bias.
#[test]
fn units_are_rows_of_a_matrix_and_the_whole_of_a_vector() -> Result<()> {
    let dev = Device::Cpu;
    let w = Var::new(&[[1f64, 2., 2.], [0., 0., 0.]], &dev)?; // row norms 3 and 0
    let b = Var::new(&[3f64, 4.], &dev)?; // norm 5
    let mut grads = GradStore::default();
    grads.insert(
        &w,
        Tensor::new(&[[0.2f64, 0.0, 0.0], [0.0, 0.0, 1e-5]], &dev)?,
    );
    grads.insert(&b, Tensor::new(&[0.6f64, 0.8], &dev)?);
    let norm = adaptive_clip_grad_(&[w.clone(), b.clone()], &mut grads, 0.1, 1e-3)?;
    assert!((norm.to_scalar::<f64>()? - (0.04f64 + 1e-10 + 1.0).sqrt()).abs() < 1e-15);
    // Row 0: 0.2 <= 0.1 · 3: untouched. Row 1 (zero weights): 1e-5 <= 0.1 · eps = 1e-4: untouched.
    // The bias: 1 > 0.1 · 5: scaled by 0.5.
    let g = grads.get(&w).expect("w").to_vec2::<f64>()?;
    assert_eq!(g, [[0.2, 0.0, 0.0], [0.0, 0.0, 1e-5]]);
    let g = grads.get(&b).expect("b").to_vec1::<f64>()?;
    assert_eq!(g, [0.3, 0.4]);
    // With eps = 1e-6 the zero row's bound is 1e-7 < 1e-5: scaled to norm 1e-7.
    let norm2 = adaptive_clip_grad_(std::slice::from_ref(&w), &mut grads, 0.1, 1e-6)?;
    assert!((norm2.to_scalar::<f64>()? - (0.04f64 + 1e-10).sqrt()).abs() < 1e-15);
    let g = grads.get(&w).expect("w").to_vec2::<f64>()?;
    assert_eq!(g[0], [0.2, 0.0, 0.0]);
    assert!((g[1][2] - 1e-7).abs() < 1e-22, "{}", g[1][2]);
    Ok(())
}

/// NaN and ±inf in gradients and parameters, zero parameters with eps = 0, huge and tiny values:
/// CPU against the reference, emulated bitwise the CPU (NaN as NaN).
#[test]
fn nonfinite_zero_and_extreme_values() -> Result<()> {
    let dev = Device::Cpu;
    let nan = f64::NAN;
    let inf = f64::INFINITY;
    for dtype in DTYPES {
        // Rows: [NaN in g], [inf in g], [NaN in p], [inf in p], [zero p], [huge g], [tiny g].
        let p = [
            [1.0, 1.0, 1.0],
            [1.0, 1.0, 1.0],
            [nan, 1.0, 1.0],
            [inf, 1.0, 1.0],
            [0.0, -0.0, 0.0],
            [1.0, 2.0, 2.0],
            [1.0, 2.0, 2.0],
        ];
        let g = [
            [nan, 100.0, 1.0],
            [inf, -3.0, 0.0],
            [100.0, 100.0, 100.0],
            [100.0, 100.0, 100.0],
            [1e-3, -1e-3, 0.0],
            [6e4, -6e4, 3e4],
            [1e-7, 0.0, 0.0],
        ];
        let flat = |a: &[[f64; 3]; 7]| a.iter().flatten().copied().collect::<Vec<f64>>();
        let param = tensor(&flat(&p), &[7, 3], dtype)?;
        let grad = tensor(&flat(&g), &[7, 3], dtype)?;
        let v = Var::from_tensor(&param)?;
        for eps in [0.0, 1e-3] {
            let what = format!("{dtype:?} eps {eps}");
            let (norm, cpu) = clip_copy(
                std::slice::from_ref(&v),
                std::slice::from_ref(&grad),
                0.1,
                eps,
            )?;
            let (coefficients, _) = reference(&vals(&param)?, &vals(&grad)?, &[7, 3], 0.1, eps);
            assert_eq!(coefficients[0], None, "{what}: NaN gradient never clipped");
            assert_eq!(
                coefficients[1],
                Some(0.0),
                "{what}: infinite gradient scaled by 0"
            );
            assert_eq!(coefficients[2], None, "{what}: NaN parameter never clipped");
            assert_eq!(
                coefficients[3], None,
                "{what}: infinite parameter never clipped"
            );
            assert!(coefficients[4].is_some(), "{what}: zero parameters clip");
            assert_clipped(dtype, &[7, 3], &grad, &cpu[0], &coefficients, &what)?;
            if eps == 0.0 {
                // max_norm = 0: the unit becomes zeros.
                assert!(vals(&cpu[0])?[12..15].iter().all(|&x| x == 0.0), "{what}");
            }
            assert!(
                scalar(&norm)?.is_nan(),
                "{what}: the global norm of a NaN gradient"
            );
            for (grid, order) in [(1, ORDERS[0]), (5, ORDERS[3])] {
                let emulation = KernelEmulation::new().grid(grid).block_order(order);
                let ((norm_e, emulated), _) = emulation.run(|| {
                    clip_copy(
                        std::slice::from_ref(&v),
                        std::slice::from_ref(&grad),
                        0.1,
                        eps,
                    )
                })?;
                assert!(scalar(&norm_e)?.is_nan());
                let (a, b) = (vals(&emulated[0])?, vals(&cpu[0])?);
                for (x, y) in a.iter().zip(&b) {
                    assert!(
                        x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()),
                        "{what}: {x} vs {y}"
                    );
                }
            }
        }
    }
    // Without the NaN row, an infinite gradient makes the norm infinite.
    let v = Var::new(&[1f32, 1.], &dev)?;
    let mut grads = GradStore::default();
    grads.insert(&v, Tensor::new(&[f32::INFINITY, 1.], &dev)?);
    let norm = adaptive_clip_grad_(std::slice::from_ref(&v), &mut grads, 0.1, 1e-3)?;
    assert_eq!(norm.to_scalar::<f32>()?, f32::INFINITY);
    let g = grads.get(&v).expect("g").to_vec1::<f32>()?;
    assert!(g[0].is_nan() && g[1] == 0.0, "{g:?}");
    Ok(())
}

/// Non-contiguous gradients (transposed and narrowed views) are clipped in place through their
/// layout, exactly as their contiguous copies; on the CPU and emulated (the strided kernel).
#[test]
fn non_contiguous_gradients_are_clipped_in_place() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(3);
    for dtype in DTYPES {
        let (v1, g1) = case(&mut rng, &[6, 40], dtype, 0.05, 1e-3)?;
        let (v2, g2) = case(&mut rng, &[4, 3, 5], dtype, 0.05, 1e-3)?;
        // The same values behind strided views: g1 as the transpose of a [40, 6] tensor, g2 as a
        // narrow of a [4, 3, 9] tensor.
        let base1 = g1.t()?.contiguous()?;
        let pad = Tensor::zeros((4, 3, 4), dtype, &Device::Cpu)?;
        let base2 = Tensor::cat(&[&g2, &pad], 2)?;
        let want = clip_copy(
            &[v1.clone(), v2.clone()],
            &[g1.clone(), g2.clone()],
            0.05,
            1e-3,
        )?;
        for emulate in [false, true] {
            let (b1, b2) = (base1.copy()?, base2.copy()?);
            let (s1, s2) = (b1.t()?, b2.narrow(2, 0, 5)?);
            assert!(!s1.is_contiguous() && !s2.is_contiguous());
            let mut store = GradStore::default();
            store.insert(&v1, s1.clone());
            store.insert(&v2, s2.clone());
            let vars = [v1.clone(), v2.clone()];
            let norm = if emulate {
                let (norm, log) = KernelEmulation::new()
                    .grid(3)
                    .run(|| adaptive_clip_grad_(&vars, &mut store, 0.05, 1e-3))?;
                assert_eq!(
                    kernels(&log),
                    [
                        "grad_clip_agc",
                        "grad_clip_agc_strided",
                        "grad_clip_agc_strided"
                    ]
                );
                norm
            } else {
                adaptive_clip_grad_(&vars, &mut store, 0.05, 1e-3)?
            };
            let what = format!("{dtype:?} emulated {emulate}");
            assert_eq!(bits(&norm)?, bits(&want.0)?, "{what}: norm");
            // In place: the caller's strided views (and their bases) hold the result.
            assert_eq!(bits(&s1)?, bits(&want.1[0])?, "{what}: transposed");
            assert_eq!(bits(&s2)?, bits(&want.1[1])?, "{what}: narrowed");
            // The padding outside the narrowed view is untouched.
            assert!(
                vals(&b2.narrow(2, 5, 4)?)?.iter().all(|&x| x == 0.0),
                "{what}"
            );
        }
    }
    Ok(())
}

/// Vars without gradients are skipped, a var listed twice is clipped once, no gradient at all
/// gives a 0-d F32 zero.
#[test]
fn missing_repeated_and_no_gradients() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(4);
    let (v, g) = case(&mut rng, &[8, 16], DType::F32, 0.05, 1e-3)?;
    let other = Var::zeros((3, 3), DType::F32, &Device::Cpu)?;
    let once = clip_copy(
        std::slice::from_ref(&v),
        std::slice::from_ref(&g),
        0.05,
        1e-3,
    )?;
    let mut store = GradStore::default();
    store.insert(&v, g.copy()?);
    let norm = adaptive_clip_grad_(
        &[v.clone(), other.clone(), v.clone()],
        &mut store,
        0.05,
        1e-3,
    )?;
    assert_eq!(bits(&norm)?, bits(&once.0)?);
    assert_eq!(bits(store.get(&v).expect("g"))?, bits(&once.1[0])?);
    let norm = adaptive_clip_grad_(&[other], &mut GradStore::default(), 0.05, 1e-3)?;
    assert_eq!((norm.dtype(), norm.to_scalar::<f32>()?), (DType::F32, 0.0));
    Ok(())
}

/// Bad settings and bad gradients are refused with an error naming the problem, and nothing
/// changes.
#[test]
fn refusals_change_nothing() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(6);
    let (v, g) = case(&mut rng, &[5, 7], DType::F32, 0.05, 1e-3)?;
    let (w, h) = case(&mut rng, &[9], DType::F32, 0.05, 1e-3)?;
    let before = (bits(&g)?, bits(&h)?);
    let vars = [v.clone(), w.clone()];
    let fresh = || -> Result<GradStore> {
        let mut s = GradStore::default();
        s.insert(&v, g.clone());
        s.insert(&w, h.clone());
        Ok(s)
    };
    let unchanged = |what: &str| -> Result<()> {
        assert_eq!((bits(&g)?, bits(&h)?), before, "{what}: a gradient changed");
        Ok(())
    };
    for (clipping, eps, word) in [
        (0.0, 1e-3, "clipping"),
        (-1.0, 1e-3, "clipping"),
        (f64::NAN, 1e-3, "clipping"),
        (f64::INFINITY, 1e-3, "clipping"),
        (0.05, -1.0, "eps"),
        (0.05, f64::NAN, "eps"),
    ] {
        let what = format!("clipping {clipping} eps {eps}");
        let msg = err_msg(
            adaptive_clip_grad_(&vars, &mut fresh()?, clipping, eps),
            &what,
        );
        assert!(msg.contains(word), "{what}: {msg}");
        unchanged(&what)?;
        let setting = ClipSetting::Agc { clipping, eps };
        assert!(setting.validate().is_err(), "{what}");
        assert!(
            Clipped::<SGD>::new(vars.to_vec(), ClippedConfig::new(0.1, setting.clone())).is_err()
        );
        assert!(FusedAdamW::new(vars.to_vec(), ParamsAdamW::default())?
            .with_clip(setting.clone())
            .is_err());
        assert!(FusedSgd::new(vars.to_vec(), ParamsSgd::default())?
            .with_clip(setting)
            .is_err());
    }
    assert!(ClipSetting::agc(0.01).validate().is_ok());
    assert!(ClipSetting::Agc {
        clipping: 0.01,
        eps: 0.0
    }
    .validate()
    .is_ok());
    // A gradient of the wrong shape (the second var's), after a good one: nothing is clipped.
    let mut store = fresh()?;
    store.insert(&w, Tensor::zeros(4, DType::F32, &Device::Cpu)?);
    let msg = err_msg(adaptive_clip_grad_(&vars, &mut store, 0.05, 1e-3), "shape");
    assert!(msg.contains("shape") || msg.contains("[4]"), "{msg}");
    unchanged("shape")?;
    // The wrong dtype.
    let mut store = fresh()?;
    store.insert(&w, h.to_dtype(DType::F64)?);
    err_msg(adaptive_clip_grad_(&vars, &mut store, 0.05, 1e-3), "dtype");
    unchanged("dtype")?;
    // A broadcast gradient.
    let mut store = fresh()?;
    let row = Tensor::ones((1, 7), DType::F32, &Device::Cpu)?.broadcast_as((5, 7))?;
    store.insert(&v, row);
    let msg = err_msg(
        adaptive_clip_grad_(&vars, &mut store, 0.05, 1e-3),
        "broadcast",
    );
    assert!(msg.contains("broadcast"), "{msg}");
    unchanged("broadcast")?;
    // A gradient that is its own parameter.
    let mut store = fresh()?;
    store.insert(&w, w.as_tensor().clone());
    let msg = err_msg(
        adaptive_clip_grad_(&vars, &mut store, 0.05, 1e-3),
        "aliasing",
    );
    assert!(msg.contains("storage"), "{msg}");
    unchanged("aliasing")?;
    // The same under emulation.
    KernelEmulation::new().run(|| -> Result<()> {
        let mut store = fresh()?;
        store.insert(&w, h.to_dtype(DType::F64)?);
        err_msg(adaptive_clip_grad_(&vars, &mut store, 0.05, 1e-3), "dtype");
        err_msg(
            adaptive_clip_grad_(&vars, &mut fresh()?, 0.0, 1e-3),
            "clipping",
        );
        Ok(())
    })?;
    unchanged("emulated")?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Optimizers.

/// Vars of every dtype and their gradients for `steps` steps, some steps far above the AGC bound
/// (so that some units clip) and some below.
fn training_case(rng: &mut StdRng, dtypes: &[DType]) -> Result<(Vec<Tensor>, Vec<Vec<Tensor>>)> {
    // [40, 150]: units across the 4096-element chunks of the fused step.
    let shapes: [&[usize]; 6] = [&[7, 5], &[5], &[], &[3, 4, 2], &[64, 33], &[40, 150]];
    let mut params = Vec::new();
    for (k, shape) in shapes.iter().enumerate() {
        let n: usize = shape.iter().product();
        params.push(tensor(
            &signed_values(rng, n, 1.0),
            shape,
            dtypes[k % dtypes.len()],
        )?);
    }
    let mut steps = Vec::new();
    for step in 0..4 {
        let scale = [0.01, 1.0, 1e-6, 5.0][step];
        let grads = params
            .iter()
            .map(|p| {
                tensor(
                    &signed_values(rng, p.elem_count(), scale),
                    p.dims(),
                    p.dtype(),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        steps.push(grads);
    }
    Ok((params, steps))
}

fn store(vars: &[Var], grads: &[Tensor]) -> Result<GradStore> {
    let mut s = GradStore::default();
    for (v, g) in vars.iter().zip(grads) {
        s.insert(v, g.copy()?);
    }
    Ok(s)
}

fn fresh_vars(params: &[Tensor]) -> Result<Vec<Var>> {
    params
        .iter()
        .map(|p| Var::from_tensor(&p.copy()?))
        .collect()
}

/// Asserts two sets of vars bitwise equal, naming the first differing element.
fn assert_same_params(a: &[Var], b: &[Var], what: &str) -> Result<()> {
    for (k, (x, y)) in a.iter().zip(b).enumerate() {
        let (xb, yb) = (bits(x.as_tensor())?, bits(y.as_tensor())?);
        if let Some(i) = xb.iter().zip(&yb).position(|(p, q)| p != q) {
            panic!(
                "{what}: var {k} {:?} {:?} element {i}: {:x} vs {:x}",
                x.dims(),
                x.dtype(),
                xb[i],
                yb[i]
            );
        }
    }
    Ok(())
}

fn params_bits(vars: &[Var]) -> Result<Vec<Vec<u64>>> {
    vars.iter().map(|v| bits(v.as_tensor())).collect()
}

/// `Clipped<SGD>` and `Clipped<AdamW>` with `ClipSetting::agc` are `adaptive_clip_grad_` then the
/// inner step, bit for bit; `last_norm` is its norm; `clipped_steps` counts the steps where a
/// unit clipped (checked against the reference's verdict); the caller's gradients hold the
/// clipped ones. On the CPU and emulated.
#[test]
fn clipped_optimizers_are_agc_then_step() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(7);
    let clipping = 0.02;
    let adamw = ParamsAdamW {
        lr: 0.01,
        ..Default::default()
    };
    for emulate in [false, true] {
        let (params, steps) = training_case(&mut rng, &[DType::F32, DType::F64])?;
        for inner in 0..2 {
            let (ours, theirs) = (fresh_vars(&params)?, fresh_vars(&params)?);
            let (mut clipped, mut plain): (Box<dyn Step>, Box<dyn Step>) = if inner == 0 {
                (
                    Box::new(Clipped::<SGD>::new(
                        ours.clone(),
                        ClippedConfig::new(0.1, ClipSetting::agc(clipping)),
                    )?),
                    Box::new(SGD::new(theirs.clone(), 0.1)?),
                )
            } else {
                (
                    Box::new(Clipped::<AdamW>::new(
                        ours.clone(),
                        ClippedConfig::new(adamw.clone(), ClipSetting::agc(clipping)),
                    )?),
                    Box::new(AdamW::new(theirs.clone(), adamw.clone())?),
                )
            };
            let emulation = KernelEmulation::new().grid(3).block_order(ORDERS[3]);
            let mut want_clipped = 0;
            for (step, grads) in steps.iter().enumerate() {
                let what = format!("inner {inner} step {step} emulated {emulate}");
                let (ga, mut gb) = (store(&ours, grads)?, store(&theirs, grads)?);
                want_clipped += some_unit_clips(&ours, grads, clipping)? as usize;
                let norm = if emulate {
                    let (_, log) = emulation.run(|| clipped.step(&ga))?;
                    assert_eq!(kernels(&log), ["grad_clip_agc"], "{what}");
                    emulation
                        .run(|| adaptive_clip_grad_(&theirs, &mut gb, clipping, AGC_DEFAULT_EPS))?
                        .0
                } else {
                    clipped.step(&ga)?;
                    adaptive_clip_grad_(&theirs, &mut gb, clipping, AGC_DEFAULT_EPS)?
                };
                plain.step(&gb)?;
                assert_eq!(params_bits(&ours)?, params_bits(&theirs)?, "{what}");
                assert_eq!(
                    bits(clipped.last_norm().expect("a norm"))?,
                    bits(&norm)?,
                    "{what}: last_norm"
                );
                for (v, w) in ours.iter().zip(&theirs) {
                    assert_eq!(
                        bits(ga.get(v).expect("g"))?,
                        bits(gb.get(w).expect("g"))?,
                        "{what}"
                    );
                }
            }
            assert_eq!(
                clipped.clipped_steps()?,
                want_clipped,
                "inner {inner} emulated {emulate}"
            );
            assert!(
                want_clipped > 0 && want_clipped < steps.len(),
                "the case clips some steps only"
            );
        }
    }
    Ok(())
}

/// The reference's verdict on one step: some unit of some var clips.
fn some_unit_clips(vars: &[Var], grads: &[Tensor], clipping: f64) -> Result<bool> {
    for (v, g) in vars.iter().zip(grads) {
        let (c, _) = reference(
            &vals(v.as_tensor())?,
            &vals(g)?,
            v.dims(),
            clipping,
            AGC_DEFAULT_EPS,
        );
        if c.iter().any(Option::is_some) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// `FusedAdamW`/`FusedSgd` with `ClipSetting::agc` (the clip folded into the step, the caller's
/// gradients never written) are bitwise `adaptive_clip_grad_` then the unclipped fused step, for
/// every dtype; `last_norm` is its norm, `clipped_steps` counts the steps where a unit clipped; on
/// the CPU and emulated (several grids and block orders), and the emulated ones bitwise the CPU's.
#[test]
fn fused_optimizers_are_agc_then_unclipped_step() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(8);
    let clipping = 0.02;
    let (params, steps) = training_case(&mut rng, &DTYPES)?;
    let mut cpu_results: Vec<Vec<Vec<u64>>> = Vec::new();
    for (run, emulate) in [false, true, true].into_iter().enumerate() {
        for rule in 0..3 {
            let (ours, theirs) = (fresh_vars(&params)?, fresh_vars(&params)?);
            let sgd = ParamsSgd {
                lr: 0.1,
                momentum: if rule == 2 { 0.9 } else { 0.0 },
                ..Default::default()
            };
            let adamw = ParamsAdamW {
                lr: 0.01,
                ..Default::default()
            };
            let (mut folded, mut unclipped): (Box<dyn Step>, Box<dyn Step>) = if rule == 0 {
                (
                    Box::new(
                        FusedAdamW::new(ours.clone(), adamw.clone())?
                            .with_clip(ClipSetting::agc(clipping))?,
                    ),
                    Box::new(FusedAdamW::new(theirs.clone(), adamw)?),
                )
            } else {
                (
                    Box::new(
                        FusedSgd::new(ours.clone(), sgd.clone())?
                            .with_clip(ClipSetting::agc(clipping))?,
                    ),
                    Box::new(FusedSgd::new(theirs.clone(), sgd)?),
                )
            };
            let grid = [1u32, 3, 7, 64][(run + rule) % 4];
            let order = ORDERS[(run * 2 + rule) % 4];
            let emulation = KernelEmulation::new()
                .grid(grid)
                .block_order(order)
                .seed(rule as u64);
            let mut want_clipped = 0;
            for (step, grads) in steps.iter().enumerate() {
                let what =
                    format!("rule {rule} step {step} emulated {emulate} grid {grid} {order:?}");
                let (ga, mut gb) = (store(&ours, grads)?, store(&theirs, grads)?);
                let before: Vec<Vec<u64>> = ours
                    .iter()
                    .map(|v| bits(ga.get(v).expect("g")))
                    .collect::<Result<_>>()?;
                want_clipped += some_unit_clips(&ours, grads, clipping)? as usize;
                let norm = if emulate {
                    let (_, log) = emulation.run(|| folded.step(&ga))?;
                    assert_eq!(
                        kernels(&log),
                        ["grad_clip_agc", "grad_clip_fused_step"],
                        "{what}"
                    );
                    let (norm, _) = emulation
                        .run(|| adaptive_clip_grad_(&theirs, &mut gb, clipping, AGC_DEFAULT_EPS))?;
                    emulation.run(|| unclipped.step(&gb))?;
                    norm
                } else {
                    folded.step(&ga)?;
                    let norm = adaptive_clip_grad_(&theirs, &mut gb, clipping, AGC_DEFAULT_EPS)?;
                    unclipped.step(&gb)?;
                    norm
                };
                assert_same_params(&ours, &theirs, &what)?;
                assert_eq!(
                    bits(folded.last_norm().expect("a norm"))?,
                    bits(&norm)?,
                    "{what}: last_norm"
                );
                let after: Vec<Vec<u64>> = ours
                    .iter()
                    .map(|v| bits(ga.get(v).expect("g")))
                    .collect::<Result<_>>()?;
                assert_eq!(
                    before, after,
                    "{what}: the fused step wrote the caller's gradients"
                );
            }
            assert_eq!(
                folded.clipped_steps()?,
                want_clipped,
                "rule {rule} emulated {emulate}"
            );
            assert!(want_clipped > 0 && want_clipped < steps.len());
            // The emulated parameters are bitwise the CPU's.
            if emulate {
                assert_eq!(
                    params_bits(&ours)?,
                    cpu_results[rule],
                    "rule {rule} grid {grid}: emulated vs CPU"
                );
            } else {
                cpu_results.push(params_bits(&ours)?);
            }
        }
    }
    Ok(())
}

/// What the optimizer tests need of the optimizers under test and their references.
trait Step {
    fn step(&mut self, grads: &GradStore) -> Result<()>;
    fn last_norm(&self) -> Option<&Tensor> {
        None
    }
    fn clipped_steps(&self) -> Result<usize> {
        Ok(0)
    }
}

macro_rules! impl_step {
    ($t:ty) => {
        impl Step for $t {
            fn step(&mut self, grads: &GradStore) -> Result<()> {
                Optimizer::step(self, grads)
            }
            fn last_norm(&self) -> Option<&Tensor> {
                <$t>::last_norm(self)
            }
            fn clipped_steps(&self) -> Result<usize> {
                <$t>::clipped_steps(self)
            }
        }
    };
}
impl_step!(FusedAdamW);
impl_step!(FusedSgd);
impl_step!(Clipped<SGD>);
impl_step!(Clipped<AdamW>);

impl Step for SGD {
    fn step(&mut self, grads: &GradStore) -> Result<()> {
        Optimizer::step(self, grads)
    }
}

impl Step for AdamW {
    fn step(&mut self, grads: &GradStore) -> Result<()> {
        Optimizer::step(self, grads)
    }
}

/// Vars large enough for the CPU's parallel paths (units summed and scaled on several threads):
/// the reference, and the emulated kernel bitwise.
#[test]
fn large_vars_match_the_reference_and_the_kernel() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(10);
    for dtype in [DType::F32, DType::BF16] {
        let shapes: [&[usize]; 3] = [&[600, 500], &[300_000], &[2, 150_001]];
        let mut vars = Vec::new();
        let mut grads = Vec::new();
        for shape in shapes {
            let (v, g) = case(&mut rng, shape, dtype, 0.05, 1e-3)?;
            vars.push(v);
            grads.push(g);
        }
        let (norm, cpu) = clip_copy(&vars, &grads, 0.05, 1e-3)?;
        for ((v, g), new) in vars.iter().zip(&grads).zip(&cpu) {
            let (c, _) = reference(&vals(v.as_tensor())?, &vals(g)?, v.dims(), 0.05, 1e-3);
            assert_clipped(
                dtype,
                v.dims(),
                g,
                new,
                &c,
                &format!("{dtype:?} {:?}", v.dims()),
            )?;
        }
        let ((norm_e, emulated), _) = KernelEmulation::new()
            .grid(5)
            .block_order(ORDERS[2])
            .run(|| clip_copy(&vars, &grads, 0.05, 1e-3))?;
        assert_eq!(bits(&norm_e)?, bits(&norm)?, "{dtype:?}");
        for (a, b) in emulated.iter().zip(&cpu) {
            assert_eq!(bits(a)?, bits(b)?, "{dtype:?} {:?}", a.dims());
        }
    }
    Ok(())
}

/// With `skip_nonfinite`, a step whose gradients hold a NaN is skipped by the fused optimizers
/// with AGC (the verdict is the global norm's), on the CPU and emulated: nothing changes.
#[test]
fn fused_agc_skips_nonfinite_steps() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(11);
    let (params, steps) = training_case(&mut rng, &DTYPES)?;
    for emulate in [false, true] {
        let vars = fresh_vars(&params)?;
        let mut opt = FusedSgd::new(
            vars.clone(),
            ParamsSgd {
                lr: 0.1,
                momentum: 0.9,
                ..Default::default()
            },
        )?
        .with_clip(ClipSetting::agc(0.02))?
        .skip_nonfinite(true);
        let mut grads = steps[1].clone();
        let mut poisoned = vals(&grads[4])?;
        poisoned[100] = f64::NAN;
        grads[4] = tensor(&poisoned, grads[4].dims(), grads[4].dtype())?;
        let before = params_bits(&vars)?;
        let g = store(&vars, &grads)?;
        if emulate {
            KernelEmulation::new()
                .grid(3)
                .run(|| Optimizer::step(&mut opt, &g))?;
        } else {
            Optimizer::step(&mut opt, &g)?;
        }
        assert_eq!(params_bits(&vars)?, before, "emulated {emulate}");
        assert_eq!(
            (opt.steps()?, opt.skipped_steps()?, opt.clipped_steps()?),
            (0, 1, 0)
        );
        assert!(scalar(opt.last_norm().expect("a norm"))?.is_nan());
    }
    Ok(())
}
