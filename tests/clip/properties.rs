//! Seeded random property tests: many shapes (0-d scalars, empty tensors, views), dtypes,
//! scales from 1e-30 to 1e30 (where representable), norm types, max_norm and eps; plus
//! determinism over the order of the vars and the thread count on inputs large enough for the
//! parallel path.

use crate::common;

use candle_core::{backprop::GradStore, DType, Device, Result, Tensor, Var};
use candle_grad_clip::{clip_grad_value_, total_norm, ClipGradNorm, NormType};
use common::*;
use rand::{rngs::StdRng, seq::SliceRandom, Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};

#[derive(Clone, Debug)]
enum View {
    Contiguous,
    /// The gradient is `base.transpose(r - 2, r - 1)`.
    Transposed,
    /// The gradient is `base.narrow(dim, before, shape[dim])`, base larger along `dim`.
    Narrowed {
        dim: usize,
        before: usize,
        after: usize,
    },
}

#[derive(Clone, Debug)]
struct GradSpec {
    shape: Vec<usize>,
    dtype: DType,
    view: View,
    /// Values of the base tensor, row-major, exactly representable in `dtype`.
    base_values: Vec<f64>,
}

impl GradSpec {
    fn base_shape(&self) -> Vec<usize> {
        let mut s = self.shape.clone();
        match self.view {
            View::Contiguous => {}
            View::Transposed => {
                let r = s.len();
                s.swap(r - 2, r - 1);
            }
            View::Narrowed { dim, before, after } => s[dim] += before + after,
        }
        s
    }

    fn apply_view(&self, base: &Tensor) -> Result<Tensor> {
        match self.view {
            View::Contiguous => Ok(base.clone()),
            View::Transposed => {
                let r = self.shape.len();
                base.transpose(r - 2, r - 1)
            }
            View::Narrowed { dim, before, .. } => base.narrow(dim, before, self.shape[dim]),
        }
    }

    /// Positions in the base storage (row-major) of the view's elements, in logical order,
    /// found by applying the same view to a tensor of indices.
    fn view_positions(&self) -> Result<Vec<usize>> {
        let n: usize = self.base_shape().iter().product();
        let idx: Vec<f64> = (0..n).map(|i| i as f64).collect();
        let t = Tensor::from_vec(idx, self.base_shape(), &Device::Cpu)?;
        Ok(vals(&self.apply_view(&t)?)?
            .into_iter()
            .map(|x| x as usize)
            .collect())
    }
}

#[derive(Clone, Debug)]
struct CaseSpec {
    /// None: a var without gradient.
    grads: Vec<(Vec<usize>, Option<GradSpec>)>,
}

struct Built {
    vars: Vec<Var>,
    store: GradStore,
    /// Base tensor of every gradient (shares storage with the gradient).
    bases: Vec<Option<Tensor>>,
}

fn build(spec: &CaseSpec) -> Result<Built> {
    let mut vars = vec![];
    let mut store = GradStore::default();
    let mut bases = vec![];
    for (shape, g) in &spec.grads {
        let v = var(shape)?;
        match g {
            Some(g) => {
                let base = tensor(&g.base_values, &g.base_shape(), g.dtype)?;
                store.insert(&v, g.apply_view(&base)?);
                bases.push(Some(base));
            }
            None => bases.push(None),
        }
        vars.push(v);
    }
    Ok(Built { vars, store, bases })
}

fn random_shape(rng: &mut StdRng) -> Vec<usize> {
    let rank = [0, 1, 1, 2, 2, 3, 4][rng.gen_range(0..7)];
    let mut shape: Vec<usize> = (0..rank).map(|_| rng.gen_range(1..=6)).collect();
    if rank > 0 && rng.gen_bool(0.08) {
        let d = rng.gen_range(0..rank);
        shape[d] = 0; // empty
    }
    if rank > 0 && rng.gen_bool(0.1) {
        let d = rng.gen_range(0..rank);
        shape[d] = rng.gen_range(100..3000); // larger
        let total: usize = shape.iter().product();
        if total > 20_000 {
            shape[d] = 100;
        }
    }
    shape
}

/// A random value of decimal exponent around `e`, exactly representable in `dtype`.
fn random_values(rng: &mut StdRng, n: usize, e: i32, dtype: DType) -> Result<Vec<f64>> {
    let raw: Vec<f64> = (0..n)
        .map(|_| {
            if rng.gen_bool(0.05) {
                0.0
            } else {
                let z: f64 = StandardNormal.sample(rng);
                z * 10f64.powi(e) * 10f64.powf(rng.gen_range(-1.0..1.0))
            }
        })
        .collect();
    // round to the dtype through candle, read back exactly
    vals(&tensor(&raw, &[n], dtype)?)
}

fn random_case(rng: &mut StdRng) -> Result<CaseSpec> {
    let n_vars = rng.gen_range(0..=5);
    let base_exp = rng.gen_range(-30..=30);
    let mut grads = vec![];
    for _ in 0..n_vars {
        let shape = random_shape(rng);
        if rng.gen_bool(0.12) {
            grads.push((shape, None));
            continue;
        }
        let dtype = DTYPES[rng.gen_range(0..4)];
        let e = base_exp + rng.gen_range(-2..=2);
        let e = match dtype {
            DType::F16 => e.clamp(-3, 2),
            _ => e.clamp(-29, 29),
        };
        let rank = shape.len();
        let view = if rank >= 2 && rng.gen_bool(0.25) {
            View::Transposed
        } else if rank >= 1 && rng.gen_bool(0.3) {
            let before = rng.gen_range(0..3);
            View::Narrowed {
                dim: rng.gen_range(0..rank),
                before,
                after: if before == 0 {
                    rng.gen_range(1..3)
                } else {
                    rng.gen_range(0..3)
                },
            }
        } else {
            View::Contiguous
        };
        let mut g = GradSpec {
            shape: shape.clone(),
            dtype,
            view,
            base_values: vec![],
        };
        let n: usize = g.base_shape().iter().product();
        g.base_values = random_values(rng, n, e, dtype)?;
        grads.push((shape, Some(g)));
    }
    Ok(CaseSpec { grads })
}

/// Logical (view) values of every gradient of the case, concatenated in var order.
fn logical_values(spec: &CaseSpec) -> Result<Vec<Vec<f64>>> {
    spec.grads
        .iter()
        .filter_map(|(_, g)| g.as_ref())
        .map(|g| {
            Ok(g.view_positions()?
                .into_iter()
                .map(|i| g.base_values[i])
                .collect())
        })
        .collect()
}

const NORMS: [NormType; 8] = [
    NormType::L1,
    NormType::L2,
    NormType::Inf,
    NormType::P(0.5),
    NormType::P(1.5),
    NormType::P(3.0),
    NormType::P(1.0),
    NormType::P(2.0),
];

#[test]
fn random_total_norm_and_clip() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(20240611);
    let mut scaled_cases = 0;
    let mut untouched_cases = 0;
    for case in 0..160 {
        let spec = random_case(&mut rng)?;
        let logical = logical_values(&spec)?;
        let all: Vec<f64> = logical.iter().flatten().copied().collect();
        let present: Vec<&GradSpec> = spec.grads.iter().filter_map(|(_, g)| g.as_ref()).collect();
        let all_f64 = !present.is_empty() && present.iter().all(|g| g.dtype == DType::F64);
        let expected_dtype = if all_f64 { DType::F64 } else { DType::F32 };

        for nt in NORMS {
            let what = format!(
                "case {case} {nt}: {:?}",
                spec.grads
                    .iter()
                    .map(|(s, g)| (s, g.as_ref().map(|g| (g.dtype, &g.view))))
                    .collect::<Vec<_>>()
            );
            let reference = ref_norm(&all, nt.order());

            // total_norm: value, dtype, 0-d, no side effect, order independence
            let b = build(&spec)?;
            let bases_before: Vec<Option<Vec<u64>>> = b
                .bases
                .iter()
                .map(|t| t.as_ref().map(bits).transpose())
                .collect::<Result<_>>()?;
            let n = total_norm(&b.vars, &b.store, nt, false)?;
            if !present.is_empty() {
                assert_eq!(n.dtype(), expected_dtype, "{what}");
            }
            assert_norm(&n, reference, rel64(nt.order()), &what)?;
            if nt == NormType::Inf && (all_f64 || present.iter().all(|g| g.dtype != DType::F64)) {
                assert_eq!(scalar(&n)?, reference, "{what}: the infinity norm is exact");
            }
            let mut shuffled = b.vars.clone();
            shuffled.shuffle(&mut rng);
            let n2 = total_norm(&shuffled, &b.store, nt, false)?;
            assert_eq!(
                scalar(&n2)?.to_bits(),
                scalar(&n)?.to_bits(),
                "{what}: the order of vars changed the norm"
            );
            for (t, old) in b.bases.iter().zip(&bases_before) {
                assert_eq!(
                    &t.as_ref().map(bits).transpose()?,
                    old,
                    "{what}: total_norm wrote"
                );
            }

            // clip_
            let factor = [0.0, 1e-3, 0.1, 0.5, 0.9, 2.0, 100.0][rng.gen_range(0..7)];
            let max_norm = if reference > 0.0 {
                factor * reference
            } else {
                factor
            };
            let eps = [1e-6, 1e-6, 0.0, 1e-3][rng.gen_range(0..4)];
            let coef = ref_coef(max_norm, reference, eps);
            if (coef - 1.0).abs() < 1e-4 && coef != 1.0 {
                continue; // too close to call
            }
            let mut b = build(&spec)?;
            let held: Vec<Option<Tensor>> =
                b.vars.iter().map(|v| b.store.get(v).cloned()).collect();
            let n3 = ClipGradNorm::new(max_norm)
                .with_norm_type(nt)
                .with_eps(eps)
                .clip_(&b.vars, &mut b.store)?;
            assert_eq!(
                scalar(&n3)?.to_bits(),
                scalar(&n)?.to_bits(),
                "{what}: clip_ and total_norm disagree"
            );
            for (v, h) in b.vars.iter().zip(&held) {
                assert_eq!(
                    b.store.get(v).map(|t| t.id()),
                    h.as_ref().map(|t| t.id()),
                    "{what}: the store's tensors must keep their identity"
                );
            }
            let mut k = 0;
            for ((_, g), base) in spec.grads.iter().zip(&b.bases) {
                let (Some(g), Some(base)) = (g, base) else {
                    continue;
                };
                let positions = g.view_positions()?;
                let new_base = vals(base)?;
                let new_bits = bits(base)?;
                let old_bits = bits(&tensor(&g.base_values, &g.base_shape(), g.dtype)?)?;
                assert_eq!(base.dtype(), g.dtype);
                let inside: std::collections::HashSet<usize> = positions.iter().copied().collect();
                if coef >= 1.0 {
                    assert_eq!(
                        new_bits, old_bits,
                        "{what}: coefficient >= 1 must write nothing"
                    );
                } else {
                    let old_view: Vec<f64> = positions.iter().map(|&i| g.base_values[i]).collect();
                    let new_view: Vec<f64> = positions.iter().map(|&i| new_base[i]).collect();
                    assert_scaled(
                        g.dtype,
                        &old_view,
                        &new_view,
                        coef,
                        if all_f64 {
                            rel64(nt.order())
                        } else {
                            REL_MIXED
                        },
                        &format!("{what} grad {k}"),
                    );
                    for i in 0..new_bits.len() {
                        if !inside.contains(&i) {
                            assert_eq!(
                                new_bits[i], old_bits[i],
                                "{what}: wrote outside the view at {i}"
                            );
                        }
                    }
                }
                k += 1;
            }
            if coef >= 1.0 {
                untouched_cases += 1;
            } else {
                scaled_cases += 1;
                // the norm after clipping is (about) max_norm * norm / (norm + eps), unless
                // some scaled elements fell into their dtype's subnormal range (rounding there
                // is coarse)
                let subnormal = present.iter().zip(&logical).any(|(g, vals)| {
                    let min_normal = match g.dtype {
                        DType::F16 => f64::powi(2.0, -14),
                        DType::BF16 | DType::F32 => f64::powi(2.0, -126),
                        _ => f64::MIN_POSITIVE,
                    };
                    vals.iter()
                        .any(|&x| x != 0.0 && (x * coef).abs() < min_normal)
                });
                if subnormal {
                    continue;
                }
                let after = ref_norm(&grad_values(&b.vars, &b.store)?, nt.order());
                let worst = present
                    .iter()
                    .map(|g| match g.dtype {
                        DType::F16 => f64::powi(2.0, -10),
                        DType::BF16 => f64::powi(2.0, -7),
                        DType::F32 => f64::powi(2.0, -21),
                        _ => 1e-12,
                    })
                    .fold(0f64, f64::max);
                assert!(
                    after <= max_norm * (1.0 + worst) + f64::MIN_POSITIVE,
                    "{what}: norm after clipping {after:e} > max_norm {max_norm:e}"
                );
            }
        }
    }
    // the generator must exercise both branches
    assert!(
        scaled_cases > 200 && untouched_cases > 100,
        "{scaled_cases} {untouched_cases}"
    );
    Ok(())
}

#[test]
fn random_clip_grad_value() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(77);
    for case in 0..150 {
        let spec = random_case(&mut rng)?;
        let logical = logical_values(&spec)?;
        let all: Vec<f64> = logical.iter().flatten().copied().collect();
        let m = all.iter().fold(0f64, |a, x| a.max(x.abs()));
        let clip = m * [0.0, 0.01, 0.3, 0.7, 1.5][rng.gen_range(0..5)];
        let mut b = build(&spec)?;
        clip_grad_value_(&b.vars, &mut b.store, clip)?;
        for ((_, g), base) in spec.grads.iter().zip(&b.bases) {
            let (Some(g), Some(base)) = (g, base) else {
                continue;
            };
            let positions = g.view_positions()?;
            let new_base = vals(base)?;
            let new_bits = bits(base)?;
            let old_bits = bits(&tensor(&g.base_values, &g.base_shape(), g.dtype)?)?;
            let inside: std::collections::HashSet<usize> = positions.iter().copied().collect();
            for i in 0..new_base.len() {
                let (old, new) = (g.base_values[i], new_base[i]);
                let what = format!(
                    "case {case} {:?} clip {clip:e}: {old:e} -> {new:e}",
                    g.dtype
                );
                if !inside.contains(&i) || old.abs() <= clip {
                    assert_eq!(new_bits[i], old_bits[i], "{what}: must be unchanged");
                } else {
                    assert!(new.abs() <= clip, "{what}: above the bound");
                    assert!(new == 0.0 || new.signum() == old.signum(), "{what}: sign");
                    assert!(
                        clip - new.abs() <= ulp(g.dtype, clip),
                        "{what}: not clamped to the bound"
                    );
                }
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Determinism on large inputs (parallel path).

fn large_case(
    seed: u64,
    dtypes: &[DType],
    sizes: &[usize],
) -> Result<(Vec<Var>, GradStore, Vec<f64>)> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut vars = vec![];
    let mut store = GradStore::default();
    let mut all = vec![];
    for (&dtype, &n) in dtypes.iter().zip(sizes) {
        // magnitudes spanning many decades so that the summation order matters
        let raw: Vec<f64> = (0..n)
            .map(|i| {
                let z: f64 = StandardNormal.sample(&mut rng);
                let e = if dtype == DType::F16 {
                    (i % 7) as i32 - 3
                } else {
                    (i % 21) as i32 - 10
                };
                z * 10f64.powi(e)
            })
            .collect();
        let g = tensor(&raw, &[n], dtype)?;
        all.extend(vals(&g)?);
        let v = var(&[n])?;
        store.insert(&v, g);
        vars.push(v);
    }
    Ok((vars, store, all))
}

fn norms_bits(vars: &[Var], store: &GradStore) -> Result<Vec<u64>> {
    [NormType::L1, NormType::L2, NormType::Inf, NormType::P(3.0)]
        .iter()
        .map(|&nt| Ok(scalar(&total_norm(vars, store, nt, false)?)?.to_bits()))
        .collect()
}

#[test]
fn large_norms_are_deterministic_over_var_order_and_threads() -> Result<()> {
    let cases: [(&[DType], &[usize]); 2] = [
        (
            &[DType::F32, DType::BF16, DType::F32, DType::F16, DType::F64],
            &[600_000, 300_000, 250_000, 100_000, 50_000],
        ),
        (&[DType::F64, DType::F64], &[1_000_000, 200_000]),
    ];
    for (seed, (dtypes, sizes)) in cases.into_iter().enumerate() {
        let (vars, store, all) = large_case(seed as u64, dtypes, sizes)?;
        let all_f64 = dtypes.iter().all(|&d| d == DType::F64);
        let reference_bits = norms_bits(&vars, &store)?;
        for (i, nt) in [NormType::L1, NormType::L2, NormType::Inf, NormType::P(3.0)]
            .into_iter()
            .enumerate()
        {
            let got = f64::from_bits(reference_bits[i]);
            let r = ref_norm(&all, nt.order());
            let tol = if all_f64 {
                rel64(nt.order())
            } else {
                f64::powi(2.0, -23)
            };
            assert!((got - r).abs() <= r * tol, "{nt}: {got:e} vs {r:e}");
        }
        let mut rev = vars.clone();
        rev.reverse();
        assert_eq!(norms_bits(&rev, &store)?, reference_bits, "reversed vars");
        let mut rot = vars.clone();
        rot.rotate_left(2);
        assert_eq!(norms_bits(&rot, &store)?, reference_bits, "rotated vars");
        for threads in [1, 2, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("thread pool");
            let got = pool.install(|| norms_bits(&rev, &store))?;
            assert_eq!(got, reference_bits, "{threads} threads");
        }
        // clipping through the parallel path: the same bits whatever the thread count
        let mut results = vec![];
        for threads in [1, 2] {
            let (vars, mut store, _) = large_case(seed as u64, dtypes, sizes)?;
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("thread pool");
            let n = pool.install(|| {
                ClipGradNorm::new(1.0)
                    .with_norm_type(NormType::L2)
                    .clip_(&vars, &mut store)
            })?;
            assert_eq!(scalar(&n)?.to_bits(), reference_bits[1]);
            results.push(store_bits(&vars, &store)?);
        }
        assert_eq!(
            results[0], results[1],
            "scaled gradients differ between thread counts"
        );
    }
    Ok(())
}
