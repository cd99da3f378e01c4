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
pub(crate) fn serialize<'a>(
    entries: impl IntoIterator<Item = (&'a str, &'a Entry)>,
    metadata: HashMap<String, String>,
    path: &Path,
) -> Result<Vec<u8>> {
    let metadata = (!metadata.is_empty()).then_some(metadata);
    safetensors::serialize(entries, metadata).map_err(|e| {
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
/// file's length, a shape whose size overflows): a truncated or malformed file is an error, and
/// so is a dtype [`Entry::from_tensor`] does not write (the 8-, 6- and 4-bit floats).
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
        let dtype = match DType::try_from(view.dtype()) {
            Ok(
                d @ (DType::U8
                | DType::U32
                | DType::I16
                | DType::I32
                | DType::I64
                | DType::BF16
                | DType::F16
                | DType::F32
                | DType::F64),
            ) => d,
            _ => bail!(
                "tensor `{name}` has dtype {:?}, which is not supported",
                view.dtype()
            ),
        };
        // safetensors checks the element count, which a zero dimension makes 0 whatever the
        // others; candle's strides multiply the others too, so their product must fit.
        let fits = view
            .shape()
            .iter()
            .filter(|&&d| d != 0)
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .is_some();
        if !fits {
            bail!("tensor `{name}` has shape {:?}, too large", view.shape());
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn file(header: &str, data: &[u8]) -> Vec<u8> {
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(data);
        bytes
    }

    fn parse_err(bytes: &[u8]) -> String {
        match parse(bytes) {
            Ok(_) => panic!("accepted"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn parses_what_it_serializes() -> Result<()> {
        let t = Tensor::new(&[[1f32, -2.], [3., 4.]], &Device::Cpu)?;
        let e = Entry::from_tensor(&t)?;
        let bytes = serialize([("t", &e)], HashMap::new(), Path::new("x"))?;
        let back = parse(&bytes)?;
        assert_eq!(back.entries["t"].shape, [2, 2]);
        assert_eq!(back.entries["t"].bytes, e.bytes);
        Ok(())
    }

    #[test]
    fn refuses_dtypes_it_does_not_write() {
        // Eight elements of each: 8, 6 or 4 bits each, one byte for BOOL.
        for (dtype, len) in [
            ("F8_E4M3", 8),
            ("F8_E5M2", 8),
            ("F8_E8M0", 8),
            ("F6_E2M3", 6),
            ("F6_E3M2", 6),
            ("F4", 4),
            ("BOOL", 8),
        ] {
            let header =
                format!(r#"{{"x":{{"dtype":"{dtype}","shape":[8],"data_offsets":[0,{len}]}}}}"#);
            let msg = parse_err(&file(&header, &vec![0; len]));
            assert!(msg.contains("not supported"), "{dtype}: {msg}");
        }
        // The nine it writes parse.
        for (dtype, size) in [
            ("U8", 1),
            ("U32", 4),
            ("I16", 2),
            ("I32", 4),
            ("I64", 8),
            ("BF16", 2),
            ("F16", 2),
            ("F32", 4),
            ("F64", 8),
        ] {
            let header = format!(
                r#"{{"x":{{"dtype":"{dtype}","shape":[2],"data_offsets":[0,{}]}}}}"#,
                2 * size
            );
            assert!(parse(&file(&header, &vec![0; 2 * size])).is_ok(), "{dtype}");
        }
    }

    #[test]
    fn refuses_shapes_whose_size_overflows() {
        for shape in ["[4294967296,4294967296,16]", "[18446744073709551615,2]"] {
            let header =
                format!(r#"{{"x":{{"dtype":"F32","shape":{shape},"data_offsets":[0,4]}}}}"#);
            let msg = parse_err(&file(&header, &[0; 4]));
            assert!(msg.contains("not a complete safetensors file"), "{msg}");
        }
        // No elements, but strides that overflow: refused before candle computes them.
        for shape in [
            "[0,1099511627776,1099511627776]",
            "[4294967296,0,4294967296,16]",
        ] {
            let header =
                format!(r#"{{"x":{{"dtype":"F32","shape":{shape},"data_offsets":[0,0]}}}}"#);
            let msg = parse_err(&file(&header, &[]));
            assert!(msg.contains("too large"), "{shape}: {msg}");
        }
    }
}
