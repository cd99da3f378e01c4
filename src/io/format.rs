//! The bytes of a safetensors file: tensors to little-endian bytes and back, serialisation with
//! file metadata, and the SHA-256 digests a training checkpoint keeps of its contents.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{bail, DType, Device, Result, Tensor};
use safetensors::tensor::{Dtype as StDtype, SafeTensors, View};
use sha2::{Digest, Sha256};

/// One tensor as the file holds it.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub(crate) dtype: DType,
    pub(crate) shape: Vec<usize>,
    pub(crate) bytes: Vec<u8>,
}

fn le_bytes<T, const N: usize>(values: Vec<T>, to_le: impl Fn(T) -> [u8; N]) -> Vec<u8> {
    values.into_iter().flat_map(to_le).collect()
}

impl Entry {
    /// The tensor's elements in row-major order as little-endian bytes (read to the host).
    pub(crate) fn from_tensor(t: &Tensor) -> Result<Self> {
        let flat = t.flatten_all()?;
        let bytes = match t.dtype() {
            DType::U8 => flat.to_vec1::<u8>()?,
            DType::U32 => le_bytes(flat.to_vec1::<u32>()?, u32::to_le_bytes),
            DType::I16 => le_bytes(flat.to_vec1::<i16>()?, i16::to_le_bytes),
            DType::I32 => le_bytes(flat.to_vec1::<i32>()?, i32::to_le_bytes),
            DType::I64 => le_bytes(flat.to_vec1::<i64>()?, i64::to_le_bytes),
            DType::BF16 => le_bytes(flat.to_vec1::<half::bf16>()?, half::bf16::to_le_bytes),
            DType::F16 => le_bytes(flat.to_vec1::<half::f16>()?, half::f16::to_le_bytes),
            DType::F32 => le_bytes(flat.to_vec1::<f32>()?, f32::to_le_bytes),
            DType::F64 => le_bytes(flat.to_vec1::<f64>()?, f64::to_le_bytes),
            other => bail!("checkpoint: tensors of dtype {other:?} cannot be saved"),
        };
        Ok(Self {
            dtype: t.dtype(),
            shape: t.dims().to_vec(),
            bytes,
        })
    }

    /// The tensor on `device`.
    pub(crate) fn to_tensor(&self, device: &Device) -> Result<Tensor> {
        Tensor::from_raw_buffer(&self.bytes, self.dtype, &self.shape, device)
    }

    /// SHA-256 of the bytes, in lowercase hexadecimal.
    pub(crate) fn digest(&self) -> String {
        hex(&Sha256::digest(&self.bytes))
    }
}

impl View for &Entry {
    fn dtype(&self) -> StDtype {
        self.dtype.into()
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The bytes of a safetensors file holding `entries`, with `metadata` (none when empty).
pub(crate) fn serialize(
    entries: Vec<(String, Entry)>,
    metadata: HashMap<String, String>,
    path: &Path,
) -> Result<Vec<u8>> {
    let metadata = (!metadata.is_empty()).then_some(metadata);
    safetensors::serialize(entries.iter().map(|(n, e)| (n.as_str(), e)), metadata).map_err(|e| {
        candle_core::Error::Msg(format!(
            "cannot serialize the tensors for `{}`: {e}",
            path.display()
        ))
    })
}

/// A parsed safetensors file: its tensors and metadata.
pub(crate) struct Parsed {
    pub(crate) entries: BTreeMap<String, Entry>,
    pub(crate) metadata: BTreeMap<String, String>,
}

/// Parses the bytes of a safetensors file (the header, every tensor's place and length, the
/// file's length): a truncated or malformed file is an error.
pub(crate) fn parse(bytes: &[u8]) -> Result<Parsed> {
    let file = SafeTensors::deserialize(bytes)
        .map_err(|e| candle_core::Error::Msg(format!("not a complete safetensors file ({e})")))?;
    let (_, header) = SafeTensors::read_metadata(bytes)
        .map_err(|e| candle_core::Error::Msg(format!("not a complete safetensors file ({e})")))?;
    let metadata = header
        .metadata()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    let mut entries = BTreeMap::new();
    for (name, view) in file.iter() {
        let dtype = DType::try_from(view.dtype())?;
        entries.insert(
            name.to_string(),
            Entry {
                dtype,
                shape: view.shape().to_vec(),
                bytes: view.data().to_vec(),
            },
        );
    }
    Ok(Parsed { entries, metadata })
}

/// The digest of a checkpoint's header: every metadata entry but `skip`, and every tensor's name,
/// dtype and shape, in a canonical order (length-prefixed, so no two headers collide by
/// concatenation).
pub(crate) fn header_digest(
    metadata: &BTreeMap<String, String>,
    entries: &BTreeMap<String, Entry>,
    skip: &str,
) -> String {
    let mut h = Sha256::new();
    let mut put = |s: &[u8]| {
        h.update((s.len() as u64).to_le_bytes());
        h.update(s);
    };
    for (k, v) in metadata.iter().filter(|(k, _)| k.as_str() != skip) {
        put(k.as_bytes());
        put(v.as_bytes());
    }
    for (name, e) in entries {
        put(name.as_bytes());
        put(format!("{:?}", e.dtype).as_bytes());
        put(format!("{:?}", e.shape).as_bytes());
    }
    hex(&h.finalize())
}
