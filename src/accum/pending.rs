//! Which vars have micro-batches accumulated that no optimizer step has read yet: a process-wide
//! count per var, raised by a [`GradAccumulator`](super::GradAccumulator) at its first `add` after
//! `grads()` or `zero_()` and lowered by the next `grads()`, `zero_()` or its drop. A training
//! checkpoint asks it, to refuse a save in the middle of an accumulation.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use candle_core::{TensorId, Var};

static PENDING: Mutex<Option<HashMap<TensorId, usize>>> = Mutex::new(None);

fn table() -> MutexGuard<'static, Option<HashMap<TensorId, usize>>> {
    // The table holds counts only: a panic elsewhere cannot leave it inconsistent.
    PENDING.lock().unwrap_or_else(|p| p.into_inner())
}

/// Marks `vars` as in the middle of an accumulation (once per call of a pair with [`release`]).
pub(super) fn hold(vars: &[Var]) {
    let mut t = table();
    let t = t.get_or_insert_with(HashMap::new);
    for v in vars {
        *t.entry(v.id()).or_insert(0) += 1;
    }
}

/// Undoes one [`hold`] of `vars`.
pub(super) fn release(vars: &[Var]) {
    let mut t = table();
    let Some(t) = t.as_mut() else { return };
    for v in vars {
        if let Some(n) = t.get_mut(&v.id()) {
            *n -= 1;
            if *n == 0 {
                t.remove(&v.id());
            }
        }
    }
}

/// The position in `vars` of the first var that some accumulator holds micro-batches for.
pub(crate) fn first_pending<'a>(vars: impl IntoIterator<Item = &'a Var>) -> Option<usize> {
    let t = table();
    let t = t.as_ref()?;
    vars.into_iter().position(|v| t.contains_key(&v.id()))
}
