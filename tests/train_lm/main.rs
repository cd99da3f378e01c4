//! The train_lm work: the training checkpoint at library level (round trips, every refusal
//! changing nothing), the example's model against candle-transformers', and the example binary
//! itself (the candle and fused optimizers give the same parameters; a run killed with SIGKILL at
//! several moments and resumed ends as the uninterrupted run).

#[path = "../common/mod.rs"]
mod common;

// The example's modules, for the model checks.
#[path = "../../examples/train_lm/data.rs"]
#[allow(dead_code)]
mod data;
#[path = "../../examples/train_lm/model.rs"]
#[allow(dead_code)]
mod model;
#[path = "../../examples/train_lm/vars.rs"]
#[allow(dead_code)]
mod vars;

mod checkpoint;
mod example;
mod llama;
