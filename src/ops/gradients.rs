//! Step one of every operation: collect the gradients of `vars` from a `GradStore` and validate
//! them, before anything is read or written.

use candle_core::{backprop::GradStore, bail, DType, Device, Result, Storage, Tensor, Var};

/// The gradients that one call works on, validated: all on one device, all of a supported float
/// dtype. Vars without a gradient are left out; a var listed twice contributes twice.
pub(crate) struct GradientSet {
    grads: Vec<Tensor>,
    device: Device,
}

impl GradientSet {
    /// Looks up the gradient of every var and checks dtypes and devices. Reads no data.
    pub(crate) fn collect(vars: &[Var], store: &GradStore) -> Result<Self> {
        let mut grads: Vec<Tensor> = Vec::with_capacity(vars.len());
        for (i, var) in vars.iter().enumerate() {
            let Some(grad) = store.get(var.as_tensor()) else {
                continue;
            };
            check_gradient(i, grad, grads.first())?;
            grads.push(grad.clone());
        }
        let device = grads.first().map_or(Device::Cpu, |g| g.device().clone());
        Ok(Self { grads, device })
    }

    /// A set of gradients given directly (a fused optimizer's), validated as [`collect`](Self::collect)
    /// validates.
    pub(crate) fn from_grads(grads: Vec<Tensor>) -> Result<Self> {
        for (i, grad) in grads.iter().enumerate() {
            check_gradient(i, grad, grads.first())?;
        }
        let device = grads.first().map_or(Device::Cpu, |g| g.device().clone());
        Ok(Self { grads, device })
    }

    pub(crate) fn grads(&self) -> &[Tensor] {
        &self.grads
    }

    /// Each gradient as a set of its own, in order.
    pub(crate) fn singles(&self) -> impl Iterator<Item = GradientSet> + '_ {
        self.grads.iter().map(|g| GradientSet {
            grads: vec![g.clone()],
            device: self.device.clone(),
        })
    }

    pub(crate) fn device(&self) -> &Device {
        &self.device
    }

    /// The dtype of the returned norm: `F64` when every gradient is `F64`, else `F32`.
    pub(crate) fn norm_dtype(&self) -> DType {
        if !self.grads.is_empty() && self.grads.iter().all(|g| g.dtype() == DType::F64) {
            DType::F64
        } else {
            DType::F32
        }
    }

    /// Whether sums of `|g|^p` may overflow or underflow `f64`, so that the norm may need the
    /// rescue pass: F64 gradients, or `p > 6` (then even F32/F16/BF16 powers can leave the range).
    /// Both back ends ask this one question.
    pub(crate) fn powers_may_leave_f64_range(&self, p: f64) -> bool {
        p > 6.0 || self.grads.iter().any(|g| g.dtype() == DType::F64)
    }

    /// The gradients grouped by the storage they live in, with no condition on the views (for
    /// reading). Each storage's read lock is taken and released once per gradient here; nothing
    /// is held afterwards.
    pub(crate) fn group_by_storage(&self) -> StorageGroups {
        let keys: Vec<usize> = self.grads.iter().map(storage_key).collect();
        let mut order: Vec<usize> = (0..self.grads.len()).collect();
        order.sort_unstable_by_key(|&i| (keys[i], i));
        StorageGroups { order, keys }
    }

    /// Groups the gradients by the storage they live in, so that a write touches every element
    /// exactly once even when two gradients are views of one buffer.
    ///
    /// Fails, before anything is written, when a group can only be reached through views that
    /// repeat elements (a broadcast gradient with a zero stride): candle cannot write those in place.
    pub(crate) fn storage_groups(&self) -> Result<StorageGroups> {
        let groups = self.group_by_storage();
        for group in groups.iter() {
            let writable = group
                .iter()
                .any(|&i| self.grads[i].elem_count() > 0 && !repeats_elements(&self.grads[i]));
            let has_elements = group.iter().any(|&i| self.grads[i].elem_count() > 0);
            if has_elements && !writable {
                bail!(
                    "a gradient of shape {:?} is a broadcast view (stride {:?}) that repeats elements; it cannot be modified in place, store a contiguous gradient instead",
                    self.grads[group[0]].dims(),
                    self.grads[group[0]].stride()
                )
            }
        }
        Ok(groups)
    }
}

/// The gradient of var #`i` can join a set whose first gradient is `first`: a supported float
/// dtype, on the same device.
fn check_gradient(i: usize, grad: &Tensor, first: Option<&Tensor>) -> Result<()> {
    match grad.dtype() {
        DType::F32 | DType::F64 | DType::F16 | DType::BF16 => {}
        other => bail!(
            "gradient of var #{i} (shape {:?}) has dtype {other:?}; gradient clipping supports F32, F64, F16 and BF16",
            grad.dims()
        ),
    }
    if let Some(first) = first {
        if !first.device().same_device(grad.device()) {
            bail!(
                "gradients are on different devices: {:?} and {:?} (var #{i}); clip each device's gradients separately",
                first.device().location(),
                grad.device().location()
            )
        }
    }
    Ok(())
}

/// The gradient of var #`i` has the var's dtype and shape, as an optimizer step needs; the error
/// names `step` (the caller) and says that nothing was modified.
pub(crate) fn check_matches_var(step: &str, i: usize, var: &Var, grad: &Tensor) -> Result<()> {
    if grad.dtype() != var.dtype() || grad.dims() != var.dims() {
        bail!(
            "{step}: the gradient of var #{i} is {:?} {:?} but the var is {:?} {:?}; nothing was modified",
            grad.dtype(),
            grad.dims(),
            var.dtype(),
            var.dims()
        )
    }
    Ok(())
}

/// Whether a view visits some storage element more than once (a zero or overlapping stride).
/// Non-empty contiguous views never do; candle's own check allocates, so it is only asked for the
/// others. (An empty view can be "contiguous" with a zero stride: never write through one.)
pub(crate) fn repeats_elements(tensor: &Tensor) -> bool {
    let layout = tensor.layout();
    !layout.is_contiguous() && layout.has_internal_overlap()
}

/// The gradients grouped by storage: each group lists indices into [`GradientSet::grads`] of
/// views that share one buffer, in increasing order.
pub(crate) struct StorageGroups {
    /// Gradient indices sorted by storage, then by index.
    order: Vec<usize>,
    /// Storage key of each gradient.
    keys: Vec<usize>,
}

impl StorageGroups {
    pub(crate) fn iter(&self) -> impl Iterator<Item = &[usize]> + '_ {
        self.order.chunk_by(|&a, &b| self.keys[a] == self.keys[b])
    }
}

/// Identity of the buffer a tensor's data lives in: two tensors with the same key share storage.
/// (candle's own `Tensor::storage_key` is crate-private; the address of the locked `Storage` is
/// the same thing.) The read guard is released at once.
pub(crate) fn storage_key(tensor: &Tensor) -> usize {
    let (storage, _) = tensor.storage_and_layout();
    std::ptr::from_ref::<Storage>(&storage) as usize
}
