//! What the CPU and GPU benchmarks share: the parameter shapes, and the gradients re-keyed for
//! other vars. (Each bench uses some of it.)
#![allow(dead_code)]

use candle_core::{backprop::GradStore, Var};

/// Set A, shaped like a real model: 4×(4096×4096) + 8×(4096×1024) + 188×4096 ≈ 101M parameters
/// in 200 tensors.
pub fn set_a_shapes() -> Vec<Vec<usize>> {
    let mut shapes: Vec<Vec<usize>> = vec![vec![4096, 4096]; 4];
    shapes.extend(vec![vec![4096, 1024]; 8]);
    shapes.extend(vec![vec![4096]; 188]);
    shapes
}

/// The gradients of `from` in `grads`, keyed by the vars of `to` (position by position): the same
/// gradient tensors for the parameters of another optimizer.
pub fn rekey(grads: &GradStore, from: &[Var], to: &[Var]) -> GradStore {
    let mut store = GradStore::default();
    for (to, from) in to.iter().zip(from) {
        store.insert(to, grads.get(from).expect("a gradient").clone());
    }
    store
}
