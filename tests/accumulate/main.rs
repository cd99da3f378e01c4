//! `GradAccumulator` (gradient accumulation): its semantics against candle's own `(acc + g)?`
//! loop, bitwise, in every dtype and in F32 for half-precision gradients ([`semantics`]); every
//! bad input refused with nothing changed ([`errors`]); the kernel `grad_clip_accumulate` under
//! the host emulation against the CPU twin and candle ([`emulated`]); with the rest of the crate:
//! `GradScaler`, the fused optimizers, checkpoints ([`with_crate`]).

#[path = "../common/mod.rs"]
mod common;

mod emulated;
mod errors;
mod semantics;
mod with_crate;

use candle_core::{backprop::GradStore, DType, Device, Result, Tensor, Var};
use rand::{rngs::StdRng, Rng};

use common::{bits, signed_values, tensor};

/// The dtype a var's sum is kept in (the rule `accumulate_in` documents): `requested` when it is
/// wider, else the var's own.
pub fn sum_dtype(var: DType, requested: Option<DType>) -> DType {
    let rank = |d: DType| match d {
        DType::F64 => 3,
        DType::F32 => 2,
        _ => 1,
    };
    match requested {
        Some(r) if rank(r) > rank(var) => r,
        _ => var,
    }
}

/// candle's own accumulation, the reference: per var, `acc = zeros` in the sum dtype, then
/// `acc = (acc + g.to_dtype(sum)?)?` for every micro-batch that has a gradient for it, finally
/// `acc.to_dtype(var)`; `None` for a var no micro-batch has a gradient for.
pub fn candle_loop(
    vars: &[Var],
    micro: &[GradStore],
    requested: Option<DType>,
) -> Result<Vec<Option<Tensor>>> {
    vars.iter()
        .map(|v| {
            let dt = sum_dtype(v.dtype(), requested);
            let mut acc = Tensor::zeros(v.shape(), dt, v.device())?;
            let mut seen = false;
            for store in micro {
                if let Some(g) = store.get(v) {
                    acc = (acc + g.to_dtype(dt)?)?;
                    seen = true;
                }
            }
            seen.then(|| round_once(&acc, v.dtype())).transpose()
        })
        .collect()
}

/// `t` rounded once to `dtype`: candle's `to_dtype`, except from F64 to F16/BF16, where candle
/// (half's `from_f64`) rounds through F32 and misrounds some near-ties; there the exact rounding
/// of the test's reference.
pub fn round_once(t: &Tensor, dtype: DType) -> Result<Tensor> {
    if t.dtype() == DType::F64 && matches!(dtype, DType::F16 | DType::BF16) {
        let values: Vec<f64> = common::vals(t)?
            .into_iter()
            .map(|x| common::round_to_dtype(dtype, x))
            .collect();
        return tensor(&values, t.dims(), dtype);
    }
    t.to_dtype(dtype)
}

/// The gradients `store` holds for `vars`.
pub fn store_tensors(vars: &[Var], store: &GradStore) -> Vec<Option<Tensor>> {
    vars.iter().map(|v| store.get(v).cloned()).collect()
}

/// Bits of a tensor with every NaN made one pattern (NaN payloads differ between candle's
/// half-precision arithmetic, ours and the kernels').
pub fn canonical_bits(t: &Tensor) -> Result<Vec<u64>> {
    let values = common::vals(t)?;
    Ok(bits(t)?
        .into_iter()
        .zip(values)
        .map(|(b, v)| if v.is_nan() { u64::MAX } else { b })
        .collect())
}

/// Asserts two lists of optional tensors are equal: same presence, dtype, shape and bits (NaN
/// as NaN).
pub fn assert_same_tensors(
    got: &[Option<Tensor>],
    want: &[Option<Tensor>],
    what: &str,
) -> Result<()> {
    assert_eq!(got.len(), want.len(), "{what}: number of vars");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        match (g, w) {
            (None, None) => {}
            (Some(g), Some(w)) => {
                assert_eq!(g.dtype(), w.dtype(), "{what}: var {i} dtype");
                assert_eq!(g.dims(), w.dims(), "{what}: var {i} shape");
                let (gb, wb) = (canonical_bits(g)?, canonical_bits(w)?);
                if let Some(j) = gb.iter().zip(&wb).position(|(a, b)| a != b) {
                    panic!(
                        "{what}: var {i} ({:?} {:?}) element {j}: got {} want {}",
                        g.dtype(),
                        g.dims(),
                        common::vals(g)?[j],
                        common::vals(w)?[j]
                    );
                }
            }
            _ => panic!(
                "{what}: var {i}: got {} gradient, want {}",
                g.is_some(),
                w.is_some()
            ),
        }
    }
    Ok(())
}

/// One var per shape, its dtype `dtypes[k % len]`.
pub fn vars_of(shapes: &[&[usize]], dtypes: &[DType]) -> Result<Vec<Var>> {
    shapes
        .iter()
        .enumerate()
        .map(|(k, s)| Var::zeros(s.to_vec(), dtypes[k % dtypes.len()], &Device::Cpu))
        .collect()
}

/// Seeded micro-batch gradients for `vars`: magnitudes that vary by micro-batch (so that sums
/// round), each var left out with probability `skip`, and `never` (an index) never given one.
/// With `views`, some gradients are transposed or narrowed views of a larger tensor.
pub fn micro_batches(
    rng: &mut StdRng,
    vars: &[Var],
    count: usize,
    skip: f64,
    never: Option<usize>,
    views: bool,
) -> Result<Vec<GradStore>> {
    (0..count)
        .map(|m| {
            let mut store = GradStore::default();
            for (i, v) in vars.iter().enumerate() {
                if Some(i) == never || rng.gen_bool(skip) {
                    continue;
                }
                let scale = 10f64.powi(rng.gen_range(-3..4)) * (m + 1) as f64;
                let g = gradient(rng, v, scale, views && i % 3 == 1)?;
                store.insert(v, g);
            }
            Ok(store)
        })
        .collect()
}

/// A gradient for `v`: a fresh contiguous tensor, or (with `view`, for a 2-d var) a
/// non-contiguous view: a transposed tensor, columns narrowed out of a wider one, or a broadcast
/// row.
pub fn gradient(rng: &mut StdRng, v: &Var, scale: f64, view: bool) -> Result<Tensor> {
    let dims = v.dims().to_vec();
    let n: usize = dims.iter().product();
    if !view || dims.len() != 2 || n == 0 {
        return tensor(&signed_values(rng, n, scale), &dims, v.dtype());
    }
    let (r, c) = (dims[0], dims[1]);
    let g = if rng.gen_bool(0.5) {
        tensor(&signed_values(rng, n, scale), &[c, r], v.dtype())?.t()?
    } else {
        tensor(
            &signed_values(rng, r * (c + 2), scale),
            &[r, c + 2],
            v.dtype(),
        )?
        .narrow(1, 1, c)?
    };
    assert!(g.layout().contiguous_offsets().is_none() || r == 1 || c == 1);
    Ok(g)
}
