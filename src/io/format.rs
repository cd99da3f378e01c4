//! The bytes of a safetensors file: tensors to little-endian host bytes and back, a file written
//! as a stream (header, then each tensor's bytes, never the whole file in memory), a file parsed
//! without copying its tensors, and the SHA-256 digests a checkpoint or state file keeps of its
//! contents (computed in parallel, one tensor per task).

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::ops::Range;
use std::sync::Arc;

use candle_core::cpu_backend::CpuStorage;
use candle_core::{bail, DType, Device, Result, Storage, Tensor};
use rayon::prelude::*;
use safetensors::tensor::{Metadata, SafeTensors, TensorInfo};
use sha2::{Digest, Sha256};

// Files are little-endian; host bytes are taken and read by casting, as candle's own
// safetensors code does.
const _: () = assert!(
    cfg!(target_endian = "little"),
    "candle-grad-clip reads and writes safetensors files on little-endian machines only"
);

/// One tensor as the file holds it: a range of a shared host buffer (a tensor's own host copy,
/// an optimizer buffer read once for all its vars, or a whole file read once), so that a
/// checkpoint holds each byte once.
#[derive(Clone)]
pub struct Entry {
    pub(crate) dtype: DType,
    pub(crate) shape: Vec<usize>,
    buffer: Arc<Vec<u8>>,
    range: Range<usize>,
}

/// Its dtype, shape and place, not its bytes (the buffer may be a whole file).
impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry")
            .field("dtype", &self.dtype)
            .field("shape", &self.shape)
            .field("bytes", &self.range)
            .finish()
    }
}

/// The elements of a CPU storage from `start` to `end` as little-endian bytes (one copy).
fn cpu_bytes(storage: &CpuStorage, start: usize, end: usize) -> Result<Vec<u8>> {
    fn cast<T: bytemuck::Pod>(values: &[T]) -> Vec<u8> {
        bytemuck::cast_slice(values).to_vec()
    }
    Ok(match storage {
        CpuStorage::U8(v) => v[start..end].to_vec(),
        CpuStorage::U32(v) => cast(&v[start..end]),
        CpuStorage::I16(v) => cast(&v[start..end]),
        CpuStorage::I32(v) => cast(&v[start..end]),
        CpuStorage::I64(v) => cast(&v[start..end]),
        CpuStorage::BF16(v) => cast(&v[start..end]),
        CpuStorage::F16(v) => cast(&v[start..end]),
        CpuStorage::F32(v) => cast(&v[start..end]),
        CpuStorage::F64(v) => cast(&v[start..end]),
        _ => bail!("checkpoint: tensors of this dtype (8-, 6- or 4-bit floats) cannot be saved"),
    })
}

/// The elements of `t` in row-major order as little-endian host bytes: on the CPU one copy, of
/// the view only (never of the storage under it). Elsewhere the storage is read to the host once
/// (candle's `to_device` reads a view's whole storage; nothing is allocated on the device) and
/// the view copied from there: the vars and the optimizer's flat buffers are their whole storage.
pub(crate) fn host_bytes(t: &Tensor) -> Result<Vec<u8>> {
    if !t.device().is_cpu() {
        return host_bytes(&t.to_device(&Device::Cpu)?);
    }
    {
        let (storage, layout) = t.storage_and_layout();
        if let (Storage::Cpu(cpu), Some((start, end))) = (&*storage, layout.contiguous_offsets()) {
            return cpu_bytes(cpu, start, end);
        }
    }
    host_bytes(&t.force_contiguous()?)
}

/// Copies little-endian `bytes` into `values` (their lengths must agree).
pub(crate) fn read_into<T: bytemuck::Pod>(values: &mut [T], bytes: &[u8]) {
    bytemuck::cast_slice_mut::<T, u8>(values).copy_from_slice(bytes)
}

impl Entry {
    /// The tensor read to the host (see [`host_bytes`]).
    pub(crate) fn from_tensor(t: &Tensor) -> Result<Self> {
        let bytes = host_bytes(t)?;
        let range = 0..bytes.len();
        Ok(Self {
            dtype: t.dtype(),
            shape: t.dims().to_vec(),
            buffer: Arc::new(bytes),
            range,
        })
    }

    /// A tensor of `dtype` and `shape` whose bytes are `buffer[range]`.
    pub(crate) fn in_buffer(
        buffer: &Arc<Vec<u8>>,
        range: Range<usize>,
        dtype: DType,
        shape: &[usize],
    ) -> Result<Self> {
        let elements: usize = shape.iter().product();
        if range.end > buffer.len() || range.len() != elements * dtype.size_in_bytes() {
            bail!("checkpoint: {range:?} of a buffer of {} bytes cannot hold a {dtype:?} tensor of shape {shape:?}", buffer.len())
        }
        Ok(Self {
            dtype,
            shape: shape.to_vec(),
            buffer: buffer.clone(),
            range,
        })
    }

    /// The tensor's bytes.
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.buffer[self.range.clone()]
    }

    /// The tensor on `device` (one copy).
    pub(crate) fn to_tensor(&self, device: &Device) -> Result<Tensor> {
        Tensor::from_raw_buffer(self.bytes(), self.dtype, &self.shape, device)
    }

    /// SHA-256 of the bytes, in lowercase hexadecimal.
    pub(crate) fn digest(&self) -> String {
        hex(&Sha256::digest(self.bytes()))
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The digests of `entries`, one task per tensor on rayon's pool.
pub(crate) fn digests<'a>(
    entries: impl IntoParallelIterator<Item = (&'a String, &'a Entry)>,
) -> BTreeMap<&'a str, String> {
    entries
        .into_par_iter()
        .map(|(name, e)| (name.as_str(), e.digest()))
        .collect()
}

/// A safetensors file ready to be written: its header, then the tensors' bytes in file order.
pub(crate) struct FileWriter<'a> {
    header: Vec<u8>,
    tensors: Vec<&'a Entry>,
}

impl<'a> FileWriter<'a> {
    /// The file holding `entries` with `metadata` (none when empty), laid out as the safetensors
    /// crate lays it out: by descending dtype alignment, then by name, the header padded to 8
    /// bytes.
    pub(crate) fn new(
        entries: impl IntoIterator<Item = (&'a str, &'a Entry)>,
        metadata: HashMap<String, String>,
    ) -> Result<Self> {
        let mut entries: Vec<(&str, &Entry)> = entries.into_iter().collect();
        entries.sort_by(|(ln, le), (rn, re)| {
            let (l, r): (safetensors::Dtype, safetensors::Dtype) =
                (le.dtype.into(), re.dtype.into());
            r.cmp(&l).then(ln.cmp(rn))
        });
        let mut offset = 0;
        let mut infos = Vec::with_capacity(entries.len());
        for (name, e) in &entries {
            let n = e.bytes().len();
            infos.push((
                name.to_string(),
                TensorInfo {
                    dtype: e.dtype.into(),
                    shape: e.shape.clone(),
                    data_offsets: (offset, offset + n),
                },
            ));
            offset += n;
        }
        let metadata = (!metadata.is_empty()).then_some(metadata);
        let fail = |e: &dyn std::fmt::Display| {
            candle_core::Error::Msg(format!("cannot lay out the safetensors header: {e}"))
        };
        let layout = Metadata::new(metadata, infos).map_err(|e| fail(&e))?;
        let mut json = serde_json::to_vec(&layout).map_err(|e| fail(&e))?;
        json.resize(json.len().next_multiple_of(8), b' ');
        let mut header = (json.len() as u64).to_le_bytes().to_vec();
        header.extend_from_slice(&json);
        Ok(Self {
            header,
            tensors: entries.into_iter().map(|(_, e)| e).collect(),
        })
    }

    /// The file's length in bytes.
    pub(crate) fn len(&self) -> u64 {
        (self.header.len() + self.tensors.iter().map(|e| e.bytes().len()).sum::<usize>()) as u64
    }

    /// Writes the file to `out`: the header, then each tensor's bytes straight from its buffer.
    pub(crate) fn write_to(&self, out: &mut dyn Write) -> std::io::Result<()> {
        out.write_all(&self.header)?;
        for e in &self.tensors {
            out.write_all(e.bytes())?;
        }
        Ok(())
    }
}

/// A parsed safetensors file: its tensors (ranges of the file's bytes) and metadata.
pub(crate) struct Parsed {
    pub(crate) entries: BTreeMap<String, Entry>,
    pub(crate) metadata: BTreeMap<String, String>,
}

/// Parses the bytes of a safetensors file (the header, every tensor's place and length, the
/// file's length, a shape whose size overflows) without copying its tensors: a truncated or
/// malformed file is an error, and so is a dtype [`Entry::from_tensor`] does not write (the 8-,
/// 6- and 4-bit floats).
pub(crate) fn parse(bytes: Arc<Vec<u8>>) -> Result<Parsed> {
    let incomplete = |e| candle_core::Error::Msg(format!("not a complete safetensors file ({e})"));
    let file = SafeTensors::deserialize(&bytes).map_err(incomplete)?;
    let (_, header) = SafeTensors::read_metadata(&bytes).map_err(incomplete)?;
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
        // The view is a slice of `bytes`: its place in the file.
        let start = view.data().as_ptr() as usize - bytes.as_ptr() as usize;
        let range = start..start + view.data().len();
        entries.insert(
            name.to_string(),
            Entry::in_buffer(&bytes, range, dtype, view.shape())?,
        );
    }
    Ok(Parsed { entries, metadata })
}

/// The digest of a file's header: every metadata entry but `skip`, and every tensor's name,
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
        // The safetensors format's name of the dtype ("F32", "BF16", ...), not candle's.
        put(format!("{:?}", safetensors::Dtype::from(e.dtype)).as_bytes());
        put(format!("{:?}", e.shape).as_bytes());
    }
    hex(&h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(header: &str, data: &[u8]) -> Arc<Vec<u8>> {
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(data);
        Arc::new(bytes)
    }

    fn parse_err(bytes: Arc<Vec<u8>>) -> String {
        match parse(bytes) {
            Ok(_) => panic!("accepted"),
            Err(e) => e.to_string(),
        }
    }

    fn written(entries: &BTreeMap<String, Entry>, meta: HashMap<String, String>) -> Vec<u8> {
        let writer =
            FileWriter::new(entries.iter().map(|(n, e)| (n.as_str(), e)), meta).expect("laid out");
        let mut bytes = Vec::new();
        writer.write_to(&mut bytes).expect("written");
        assert_eq!(bytes.len() as u64, writer.len());
        bytes
    }

    #[test]
    fn writes_what_the_safetensors_crate_writes_and_parses_it_back() -> Result<()> {
        let dev = &Device::Cpu;
        let tensors = [
            ("b", Tensor::new(&[[1f32, -2.], [3., 4.]], dev)?),
            ("a", Tensor::new(&[1u8, 2, 3], dev)?),
            ("c", Tensor::new(&[0.5f64], dev)?),
            (
                "d",
                Tensor::new(&[1.5f32, 2.5], dev)?.to_dtype(DType::BF16)?,
            ),
            ("e", Tensor::zeros((0, 3), DType::F16, dev)?),
        ];
        let entries: BTreeMap<String, Entry> = tensors
            .iter()
            .map(|(n, t)| Ok((n.to_string(), Entry::from_tensor(t)?)))
            .collect::<Result<_>>()?;
        let meta = HashMap::from([("k".to_string(), "v".to_string())]);
        let ours = written(&entries, meta.clone());
        let reference =
            safetensors::serialize(tensors.iter().map(|(n, t)| (*n, t)), Some(meta)).expect("ok");
        assert_eq!(ours, reference);
        let back = parse(Arc::new(ours))?;
        for (name, t) in &tensors {
            let e = &back.entries[*name];
            assert_eq!((e.dtype, e.shape.as_slice()), (t.dtype(), t.dims()));
            assert_eq!(e.bytes(), entries[*name].bytes());
        }
        assert_eq!(back.metadata["k"], "v");
        Ok(())
    }

    #[test]
    fn host_bytes_copy_the_view_only() -> Result<()> {
        let t = Tensor::arange(0f32, 12., &Device::Cpu)?.reshape((3, 4))?;
        let cases = [
            (t.narrow(0, 1, 1)?, vec![4f32, 5., 6., 7.]),
            (t.narrow(1, 1, 2)?, vec![1., 2., 5., 6., 9., 10.]),
            (t.t()?.narrow(0, 3, 1)?, vec![3., 7., 11.]),
        ];
        for (view, expected) in cases {
            let bytes = host_bytes(&view)?;
            let expected: Vec<u8> = expected.iter().flat_map(|x| x.to_le_bytes()).collect();
            assert_eq!(bytes, expected);
        }
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
            let msg = parse_err(file(&header, &vec![0; len]));
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
            assert!(parse(file(&header, &vec![0; 2 * size])).is_ok(), "{dtype}");
        }
    }

    #[test]
    fn refuses_shapes_whose_size_overflows() {
        for shape in ["[4294967296,4294967296,16]", "[18446744073709551615,2]"] {
            let header =
                format!(r#"{{"x":{{"dtype":"F32","shape":{shape},"data_offsets":[0,4]}}}}"#);
            let msg = parse_err(file(&header, &[0; 4]));
            assert!(msg.contains("not a complete safetensors file"), "{msg}");
        }
        // No elements, but strides that overflow: refused before candle computes them.
        for shape in [
            "[0,1099511627776,1099511627776]",
            "[4294967296,0,4294967296,16]",
        ] {
            let header =
                format!(r#"{{"x":{{"dtype":"F32","shape":{shape},"data_offsets":[0,0]}}}}"#);
            let msg = parse_err(file(&header, &[]));
            assert!(msg.contains("too large"), "{shape}: {msg}");
        }
    }
}
