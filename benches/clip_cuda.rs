//! GPU benchmarks (feature `cuda`). Filled in by the CUDA path.
fn main() {}
