//! Parameter shapes shared by the CPU and GPU benchmarks.

/// Set A, shaped like a real model: 4×(4096×4096) + 8×(4096×1024) + 188×4096 ≈ 101M parameters
/// in 200 tensors.
pub fn set_a_shapes() -> Vec<Vec<usize>> {
    let mut shapes: Vec<Vec<usize>> = vec![vec![4096, 4096]; 4];
    shapes.extend(vec![vec![4096, 1024]; 8]);
    shapes.extend(vec![vec![4096]; 188]);
    shapes
}
