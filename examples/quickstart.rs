//! The two-line integration: a small MLP trained for a few steps with global-norm clipping,
//! printing the gradient norm before clipping at each step.
//!
//! ```text
//! cargo run --release --example quickstart
//! ```

use candle_core::{DType, Device, Result, Tensor, D};
use candle_grad_clip::{clip_grad_norm_, total_norm, NormType};
use candle_nn::{linear, AdamW, Module, Optimizer, ParamsAdamW, VarBuilder, VarMap};

fn main() -> Result<()> {
    let device = Device::Cpu;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &device);
    let hidden = linear(8, 32, vb.pp("hidden"))?;
    let output = linear(32, 1, vb.pp("output"))?;
    let mut optimizer = AdamW::new(
        varmap.all_vars(),
        ParamsAdamW {
            lr: 1e-2,
            ..Default::default()
        },
    )?;

    // Regression target: the sum of the inputs, scaled up so that early gradients are large.
    let x = Tensor::arange(0f32, 256.0, &device)?
        .reshape((32, 8))?
        .affine(0.1, -12.0)?;
    let y = (x.sum_keepdim(D::Minus1)? * 10.0)?;
    let max_norm = 1.0;

    println!("step  loss        norm before  norm after (max {max_norm})");
    for step in 0..10 {
        let prediction = output.forward(&hidden.forward(&x)?.relu()?)?;
        let loss = (prediction - &y)?.sqr()?.mean_all()?;
        let mut grads = loss.backward()?;
        // The two lines: clip all gradients of the model in place, then step.
        let norm = clip_grad_norm_(&varmap.all_vars(), &mut grads, max_norm)?;
        optimizer.step(&grads)?;

        let after = total_norm(&varmap.all_vars(), &grads, NormType::L2)?;
        println!(
            "{step:>4}  {:<10.4}  {:<11.4}  {:.4}",
            loss.to_scalar::<f32>()?,
            norm.to_scalar::<f32>()?,
            after.to_scalar::<f32>()?
        );
    }
    Ok(())
}
