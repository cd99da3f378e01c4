//! The recommended training loop: `FusedAdamW` with the clip folded in, on a small MLP. Each
//! step is one read of the gradients for the norm and one fused pass over the parameters and
//! moments; it prints the loss and the gradient norm before clipping.
//!
//! ```text
//! cargo run --release --example quickstart
//! ```

use candle_core::{DType, Device, Tensor, D};
use candle_grad_clip::{ClipSetting, FusedAdamW};
use candle_nn::{linear, Module, Optimizer, ParamsAdamW, VarBuilder, VarMap};

fn main() -> anyhow::Result<()> {
    let device = Device::Cpu;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &device);
    let hidden = linear(8, 32, vb.pp("hidden"))?;
    let output = linear(32, 1, vb.pp("output"))?;
    let params = ParamsAdamW {
        lr: 1e-2,
        ..Default::default()
    };
    // The vars ordered by name, so that a saved state resumes in another process.
    let mut optimizer =
        FusedAdamW::from_varmap(&varmap, params)?.with_clip(ClipSetting::norm(1.0))?;

    // Regression target: the sum of the inputs, scaled up so that early gradients are large.
    let x = Tensor::arange(0f32, 256.0, &device)?
        .reshape((32, 8))?
        .affine(0.1, -12.0)?;
    let y = (x.sum_keepdim(D::Minus1)? * 10.0)?;

    println!("step  loss        gradient norm before clipping (max 1)");
    for step in 0..10 {
        let prediction = output.forward(&hidden.forward(&x)?.relu()?)?;
        let loss = (prediction - &y)?.sqr()?.mean_all()?;
        optimizer.backward_step(&loss)?; // backward, clip (folded in), AdamW: one fused pass
        let norm = optimizer
            .last_norm()
            .expect("a clip setting")
            .to_scalar::<f32>()?;
        println!("{step:>4}  {:<10.4}  {norm:.4}", loss.to_scalar::<f32>()?);
    }
    println!("clipped {} of 10 steps", optimizer.clipped_steps()?);
    Ok(())
}
