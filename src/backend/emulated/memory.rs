//! The emulated device's memory: 256-byte aligned allocations between guard zones, and storages
//! as bytes.

use candle_core::{bail, CpuStorage, Result, Storage};

use crate::backend::kernels::abi::{DT_BF16, DT_F16, DT_F32, DT_F64, DT_I64};

/// Alignment of every allocation, as `cudaMalloc`'s.
const ALIGN: usize = 256;
/// Bytes of guard before every allocation, filled with [`GUARD_BYTE`].
const GUARD: usize = 256;
/// Bytes of guard after the last allocation of an arena: more than a warp's chunk of F64
/// (32 KiB), so that a kernel that overruns a buffer by a whole chunk writes into the guard (and
/// is caught) instead of into the process's heap.
const TAIL_GUARD: usize = 64 << 10;
/// All-ones bytes read as NaN in every float dtype, so that a kernel that reads past a buffer
/// makes the norm NaN; a write there is caught by [`Arena::guards_intact`].
pub(super) const GUARD_BYTE: u8 = 0xff;

/// Emulated device memory: allocations ("regions") at 256-byte aligned addresses inside one `Vec`
/// that is never resized (so the addresses are stable), each after a guard zone, and a large guard
/// zone at the end. Kernels write it through raw device addresses while no Rust reference to it
/// exists; the host reads it only between launches.
pub(super) struct Arena {
    bytes: Vec<u8>,
    /// (start, len) of each region, in address order.
    regions: Vec<(usize, usize)>,
}

impl Arena {
    /// Regions of the given lengths, zeroed; everything else is guard.
    pub(super) fn new(lens: &[usize]) -> Self {
        Self::filled(lens, 0)
    }

    /// Regions of the given lengths filled with `byte`; everything else is guard.
    pub(super) fn filled(lens: &[usize], byte: u8) -> Self {
        let mut offsets = Vec::with_capacity(lens.len());
        let mut end = 0;
        for &len in lens {
            let start = (end + GUARD).next_multiple_of(ALIGN);
            offsets.push(start);
            end = start + len;
        }
        let mut bytes = vec![GUARD_BYTE; end + TAIL_GUARD + ALIGN];
        // Shift everything so that offset 0 sits at an aligned address.
        let shift = (ALIGN - bytes.as_ptr() as usize % ALIGN) % ALIGN;
        let regions: Vec<(usize, usize)> = offsets
            .iter()
            .zip(lens)
            .map(|(&o, &len)| (o + shift, len))
            .collect();
        for &(start, len) in &regions {
            bytes[start..start + len].fill(byte);
        }
        Self { bytes, regions }
    }

    pub(super) fn with_data(data: &[&[u8]]) -> Self {
        let lens: Vec<usize> = data.iter().map(|d| d.len()).collect();
        let mut a = Self::new(&lens);
        for (r, d) in data.iter().enumerate() {
            a.data_mut(r).copy_from_slice(d);
        }
        a
    }

    /// The device address of region `r`.
    pub(super) fn ptr(&mut self, r: usize) -> u64 {
        let (start, _) = self.regions[r];
        self.bytes[start..].as_mut_ptr() as u64
    }

    pub(super) fn data(&self, r: usize) -> &[u8] {
        let (start, len) = self.regions[r];
        &self.bytes[start..start + len]
    }

    pub(super) fn data_mut(&mut self, r: usize) -> &mut [u8] {
        let (start, len) = self.regions[r];
        &mut self.bytes[start..start + len]
    }

    pub(super) fn guards_intact(&self) -> bool {
        let mut from = 0;
        for &(start, len) in &self.regions {
            if self.bytes[from..start].iter().any(|&b| b != GUARD_BYTE) {
                return false;
            }
            from = start + len;
        }
        self.bytes[from..].iter().all(|&b| b == GUARD_BYTE)
    }

    pub(super) fn words(&self, r: usize) -> Vec<u64> {
        decode(self.data(r), u64::from_ne_bytes).collect()
    }
}

/// The bytes of a CPU storage and its dtype code.
pub(super) fn storage_bytes(storage: &Storage) -> Result<(Vec<u8>, u64)> {
    Ok(match storage {
        Storage::Cpu(CpuStorage::F32(v)) => {
            (v.iter().flat_map(|x| x.to_ne_bytes()).collect(), DT_F32)
        }
        Storage::Cpu(CpuStorage::F64(v)) => {
            (v.iter().flat_map(|x| x.to_ne_bytes()).collect(), DT_F64)
        }
        Storage::Cpu(CpuStorage::F16(v)) => (
            v.iter().flat_map(|x| x.to_bits().to_ne_bytes()).collect(),
            DT_F16,
        ),
        Storage::Cpu(CpuStorage::BF16(v)) => (
            v.iter().flat_map(|x| x.to_bits().to_ne_bytes()).collect(),
            DT_BF16,
        ),
        // The fused optimizers' control tensor.
        Storage::Cpu(CpuStorage::I64(v)) => {
            (v.iter().flat_map(|x| x.to_ne_bytes()).collect(), DT_I64)
        }
        other => bail!(
            "the kernel emulation needs F32, F64, F16 or BF16 CPU storage, got {:?} on {:?}",
            other.dtype(),
            other.device().location()
        ),
    })
}

/// One storage copied to the device (region `r` of the session's storage arena).
pub(super) struct StorageCopy {
    pub(super) original: Vec<u8>,
    pub(super) dtype: u64,
    /// A tensor of this storage (the first listed).
    pub(super) first_tensor: usize,
}

/// The values of `N` bytes each in `bytes`.
pub(super) fn decode<'a, T, const N: usize>(
    bytes: &'a [u8],
    from: impl Fn([u8; N]) -> T + 'a,
) -> impl Iterator<Item = T> + 'a {
    bytes
        .chunks_exact(N)
        .map(move |c| from(c.try_into().expect("chunks of N bytes")))
}

pub(super) fn copy_from<T, const N: usize>(
    dst: &mut [T],
    bytes: &[u8],
    from: impl Fn([u8; N]) -> T,
) {
    for (x, v) in dst.iter_mut().zip(decode(bytes, from)) {
        *x = v;
    }
}
