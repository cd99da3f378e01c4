//! Exact reads of tensors (values as f64, raw bits), and the small builders the tests share.

use candle_core::{backprop::GradStore, DType, Device, Result, Tensor, Var};
use half::{bf16, f16};

/// Every element of `t` (any float dtype, any layout, any rank) as exact f64, in logical
/// row-major order.
pub fn vals(t: &Tensor) -> Result<Vec<f64>> {
    t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()
}

/// The raw bit patterns of every element of `t`, in logical order: "bitwise unchanged" checks.
pub fn bits(t: &Tensor) -> Result<Vec<u64>> {
    let f = t.flatten_all()?;
    Ok(match t.dtype() {
        DType::F32 => f
            .to_vec1::<f32>()?
            .iter()
            .map(|x| x.to_bits() as u64)
            .collect(),
        DType::F64 => f.to_vec1::<f64>()?.iter().map(|x| x.to_bits()).collect(),
        DType::F16 => f
            .to_vec1::<f16>()?
            .iter()
            .map(|x| x.to_bits() as u64)
            .collect(),
        DType::BF16 => f
            .to_vec1::<bf16>()?
            .iter()
            .map(|x| x.to_bits() as u64)
            .collect(),
        DType::U8 => f.to_vec1::<u8>()?.iter().map(|&x| x as u64).collect(),
        DType::U32 => f.to_vec1::<u32>()?.iter().map(|&x| x as u64).collect(),
        DType::I64 => f.to_vec1::<i64>()?.iter().map(|&x| x as u64).collect(),
        d => panic!("bits: unsupported dtype {d:?}"),
    })
}

/// A tensor of `dtype` holding `values` (row-major) in `shape`. Values that are not
/// representable are rounded by candle; read them back with [`vals`] for exact expectations.
pub fn tensor(values: &[f64], shape: &[usize], dtype: DType) -> Result<Tensor> {
    Tensor::from_vec(values.to_vec(), shape.to_vec(), &Device::Cpu)?.to_dtype(dtype)
}

/// A var of the given shape (its value is irrelevant to clipping).
pub fn var(shape: &[usize]) -> Result<Var> {
    Var::zeros(shape.to_vec(), DType::F32, &Device::Cpu)
}

/// Bits of the gradient of each var (None where there is none).
pub fn store_bits(vars: &[Var], grads: &GradStore) -> Result<Vec<Option<Vec<u64>>>> {
    vars.iter()
        .map(|v| grads.get(v).map(bits).transpose())
        .collect()
}

/// The scalar held by a 0-d float tensor, as f64.
pub fn scalar(t: &Tensor) -> Result<f64> {
    assert_eq!(
        t.rank(),
        0,
        "expected a 0-d tensor, got shape {:?}",
        t.dims()
    );
    t.to_dtype(DType::F64)?.to_scalar::<f64>()
}

/// Concatenated values of the gradients of `vars` (vars without gradient skipped).
pub fn grad_values(vars: &[Var], grads: &GradStore) -> Result<Vec<f64>> {
    let mut out = vec![];
    for v in vars {
        if let Some(g) = grads.get(v) {
            out.extend(vals(g)?);
        }
    }
    Ok(out)
}

/// Bits of every var's value.
pub fn vars_bits(vars: &[Var]) -> Result<Vec<Vec<u64>>> {
    vars.iter().map(|v| bits(v.as_tensor())).collect()
}

/// Bits of every tensor of an optimizer state, sorted by key.
pub fn state_bits(
    state: &std::collections::HashMap<String, Tensor>,
) -> Result<Vec<(String, Vec<u64>)>> {
    let mut keys: Vec<&String> = state.keys().collect();
    keys.sort();
    keys.into_iter()
        .map(|k| Ok((k.clone(), bits(&state[k])?)))
        .collect()
}
