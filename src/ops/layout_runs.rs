//! Walking a strided view as a sequence of contiguous runs of its storage.

use candle_core::Layout;

/// Calls `f(start, len)` for each maximal run of consecutive storage elements that `layout`
/// visits, in the view's logical (row-major) order. The innermost dimensions that are laid out
/// contiguously form one run; the outer dimensions are walked with an odometer. Empty views make
/// no call.
///
/// A broadcast view (zero stride) yields the same storage range more than once.
pub(crate) fn for_each_run(layout: &Layout, mut f: impl FnMut(usize, usize)) {
    let dims = layout.dims();
    let strides = layout.stride();
    if dims.contains(&0) {
        return;
    }
    // Fold the innermost dimensions into one run while they are contiguous.
    let mut run = 1usize;
    let mut outer = dims.len();
    while outer > 0 && (dims[outer - 1] == 1 || strides[outer - 1] == run) {
        run *= dims[outer - 1];
        outer -= 1;
    }
    let mut index = vec![0usize; outer];
    let mut offset = layout.start_offset();
    loop {
        f(offset, run);
        // Advance the odometer over the outer dimensions.
        let mut d = outer;
        loop {
            if d == 0 {
                return;
            }
            d -= 1;
            index[d] += 1;
            offset += strides[d];
            if index[d] < dims[d] {
                break;
            }
            offset -= strides[d] * dims[d];
            index[d] = 0;
        }
    }
}

/// The storage ranges `[start, end)` that a set of views visit, merged into sorted, disjoint
/// ranges: writing each once writes every element of every view exactly once, however the views
/// overlap (aliasing gradients, broadcast views).
pub(crate) fn union_of_runs<'a>(
    layouts: impl IntoIterator<Item = &'a Layout>,
) -> Vec<(usize, usize)> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for layout in layouts {
        for_each_run(layout, |start, len| runs.push((start, start + len)));
    }
    runs.sort_unstable();
    let mut merged: Vec<(usize, usize)> = Vec::with_capacity(runs.len());
    for (s, e) in runs {
        match merged.last_mut() {
            Some((_, last_end)) if s <= *last_end => *last_end = (*last_end).max(e),
            _ => merged.push((s, e)),
        }
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runs(layout: &Layout) -> Vec<(usize, usize)> {
        let mut v = Vec::new();
        for_each_run(layout, |s, l| v.push((s, l)));
        v
    }

    #[test]
    fn contiguous_is_one_run() {
        assert_eq!(
            runs(&Layout::contiguous_with_offset((3, 4), 5)),
            vec![(5, 12)]
        );
        assert_eq!(runs(&Layout::contiguous(())), vec![(0, 1)]);
        assert!(runs(&Layout::contiguous((3, 0))).is_empty());
    }

    #[test]
    fn transposed_and_narrowed() {
        let t = Layout::contiguous((2, 3)).transpose(0, 1).unwrap();
        assert_eq!(
            runs(&t),
            vec![(0, 1), (3, 1), (1, 1), (4, 1), (2, 1), (5, 1)]
        );
        let n = Layout::contiguous((3, 4)).narrow(1, 1, 2).unwrap();
        assert_eq!(runs(&n), vec![(1, 2), (5, 2), (9, 2)]);
    }

    #[test]
    fn union_merges_overlaps_once() {
        let whole = Layout::contiguous((4, 4));
        let row = Layout::contiguous((4, 4)).narrow(0, 1, 1).unwrap();
        let col = Layout::contiguous((4, 4)).narrow(1, 3, 1).unwrap();
        assert_eq!(
            union_of_runs([&row, &col]),
            vec![(3, 8), (11, 12), (15, 16)]
        );
        assert_eq!(union_of_runs([&whole, &row, &col]), vec![(0, 16)]);
        let b = Layout::contiguous((1, 3)).broadcast_as((2, 3)).unwrap();
        assert_eq!(union_of_runs([&b]), vec![(0, 3)]);
    }

    #[test]
    fn broadcast_repeats() {
        let b = Layout::contiguous((1, 3)).broadcast_as((2, 3)).unwrap();
        assert_eq!(runs(&b), vec![(0, 3), (0, 3)]);
    }
}
