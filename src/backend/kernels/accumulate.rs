//! Gradient accumulation on a kernel device (`ops::accumulate`): one table of (buffer, source)
//! pairs and one launch of `grad_clip_accumulate` over all of them, whatever their number and
//! dtypes. A source that is not contiguous is read through a contiguous copy made by candle first
//! (the slow path: one copy per such gradient).

use candle_core::{bail, Result, Tensor};

use super::launch;
use super::table::{PairEntry, Table};
use super::{launch_all, KernelDevice};
use crate::ops::accumulate::{AccumulateOp, PairSet};

/// Runs `op` over every pair of `set` with one launch (none when every buffer is empty).
pub(crate) fn accumulate(dev: &impl KernelDevice, set: &PairSet, op: AccumulateOp) -> Result<()> {
    dev.check_ready()?;
    // The sources, contiguous (copies only for the strided ones).
    let sources: Vec<Option<Tensor>> = set
        .pairs()
        .iter()
        .map(|p| match &p.src {
            Some(src) if op.reads_source() => {
                if src.layout().contiguous_offsets().is_some() || src.elem_count() == 0 {
                    Ok(Some(src.clone()))
                } else {
                    src.contiguous().map(Some)
                }
            }
            _ => Ok(None),
        })
        .collect::<Result<_>>()?;
    // The buffers first (written), then the sources (read).
    let mut tensors: Vec<&Tensor> = set.pairs().iter().map(|p| &p.dst).collect();
    let buffers = tensors.len();
    let source_index: Vec<Option<usize>> = sources
        .iter()
        .map(|s| {
            s.as_ref().map(|s| {
                tensors.push(s);
                tensors.len() - 1
            })
        })
        .collect();
    dev.with_session(&tensors, 0..buffers, |s, bases| {
        let mut entries = Vec::with_capacity(buffers);
        for (i, pair) in set.pairs().iter().enumerate() {
            let Some((start, _)) = pair.dst.layout().contiguous_offsets() else {
                bail!("internal error: an accumulation buffer is not contiguous")
            };
            let dst = bases[i];
            let (src, src_dtype) = match (source_index[i], &sources[i]) {
                (Some(index), Some(tensor)) => {
                    let start = tensor.layout().contiguous_offsets().map_or(0, |(s, _)| s);
                    (bases[index].at(start), bases[index].dtype)
                }
                _ if op.reads_source() => {
                    bail!("internal error: an accumulation pair without a source")
                }
                _ => (0, dst.dtype),
            };
            entries.push(PairEntry {
                dst: dst.at(start),
                src,
                len: pair.dst.elem_count() as u64,
                dst_dtype: dst.dtype,
                src_dtype,
            });
        }
        let mut table = Table::default();
        let part = table.push_pairs(&entries);
        if part.segments == 0 {
            return Ok(());
        }
        let t = s.upload(&table.words)?;
        launch_all(s, launch::accumulate(t, part, op))
    })
}
