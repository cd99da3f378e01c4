//! The example's model against candle-transformers' `llama2_c::Llama`: the same forward pass in
//! F32, and the two changes it makes (gradients through RMSNorm, a BF16 forward pass).

use std::collections::HashMap;

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::llama2_c as upstream;

use crate::model::{Cache, Config, Llama};
use crate::vars::TrainVars;

fn config() -> Config {
    let mut cfg = Config::tiny_260k();
    cfg.vocab_size = 256;
    cfg.n_layers = 2;
    cfg
}

fn cache(cfg: &Config, dtype: DType) -> Result<Cache> {
    let empty = VarBuilder::from_tensors(HashMap::new(), DType::F32, &Device::Cpu);
    let mut cache = Cache::new(false, cfg, empty)?;
    cache.cos = cache.cos.to_dtype(dtype)?;
    cache.sin = cache.sin.to_dtype(dtype)?;
    Ok(cache)
}

fn tokens() -> Result<Tensor> {
    let ids: Vec<u32> = b"12+34=46\n5+67=72\n8+9=17\n40+2=42\n"
        .iter()
        .map(|&b| u32::from(b))
        .collect();
    Tensor::from_vec(ids, (2, 16), &Device::Cpu)
}

#[test]
fn forward_matches_candle_transformers_llama2_c() -> Result<()> {
    let cfg = config();
    let vars = TrainVars::new(5, cfg.n_layers, false); // untied, as upstream builds it
    let ours = Llama::load(vars.builder(DType::F32, &Device::Cpu), &cfg)?;
    let n_vars = vars.varmap.data().lock().expect("lock").len();
    let theirs = upstream::Llama::load(
        VarBuilder::from_varmap(&vars.varmap, DType::F32, &Device::Cpu),
        cfg.clone(),
    )?;
    // Upstream found every var it needs among ours: the same names and shapes.
    assert_eq!(vars.varmap.data().lock().expect("lock").len(), n_vars);
    let mut c = cache(&cfg, DType::F32)?;
    let x = tokens()?;
    let a = ours.forward(&x, 0, &mut c)?;
    let b = theirs.forward(&x, 0, &mut c)?;
    let diff = (&a - &b)?.abs()?.max_all()?.to_scalar::<f32>()?;
    let scale = b.abs()?.max_all()?.to_scalar::<f32>()?;
    // The two RMSNorm implementations round differently; nothing else differs.
    assert!(
        diff <= 1e-5 * scale.max(1.0),
        "max difference {diff} (logits up to {scale})"
    );

    // Change 1: every var gets a gradient through our model; upstream's fused RMSNorm has no
    // backward pass (candle issue #2168), so only `lm_head` gets one. When candle fixes it this
    // fails: the example's copy of the model can then go.
    let target = x.narrow(1, 1, 15)?.flatten_all()?;
    let loss = |logits: &Tensor| -> Result<Tensor> {
        candle_nn::loss::cross_entropy(&logits.narrow(1, 0, 15)?.flatten_to(1)?, &target)
    };
    let g_ours = loss(&a)?.backward()?;
    let g_theirs = loss(&b)?.backward()?;
    let data = vars.varmap.data().lock().expect("lock");
    let mut upstream_trained = Vec::new();
    for (name, var) in data.iter() {
        let g = g_ours
            .get(var)
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        assert!(
            g.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0,
            "{name}: zero gradient"
        );
        if g_theirs.get(var).is_some() {
            upstream_trained.push(name.clone());
        }
    }
    assert_eq!(upstream_trained, ["lm_head.weight"]);
    Ok(())
}

#[test]
fn bf16_and_f16_forward_passes_run() -> Result<()> {
    let cfg = config();
    let vars = TrainVars::new(5, cfg.n_layers, true);
    let x = tokens()?;
    let f32_logits = {
        let model = Llama::load(vars.builder(DType::F32, &Device::Cpu), &cfg)?;
        model.forward(&x, 0, &mut cache(&cfg, DType::F32)?)?
    };
    for dtype in [DType::BF16, DType::F16] {
        let model = Llama::load(vars.builder(dtype, &Device::Cpu), &cfg)?;
        let logits = model.forward(&x, 0, &mut cache(&cfg, dtype)?)?;
        let diff = (&logits - &f32_logits)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(diff < 0.1, "{dtype:?}: {diff}");
        // Change 2: upstream's mask is F32 whatever the scores' dtype.
        let theirs = upstream::Llama::load(vars.builder(dtype, &Device::Cpu), cfg.clone())?;
        let err = theirs.forward(&x, 0, &mut cache(&cfg, dtype)?);
        assert!(
            err.is_err(),
            "{dtype:?}: upstream's forward pass now runs: drop change 2"
        );
        // The gradient of the F32 vars comes back in F32.
        let grads = logits.sum_all()?.backward()?;
        for (name, var) in vars.varmap.data().lock().expect("lock").iter() {
            let g = grads
                .get(var)
                .unwrap_or_else(|| panic!("{name}: no gradient"));
            assert_eq!(g.dtype(), DType::F32);
        }
    }
    Ok(())
}

/// Change 3: with pre-activations of the MLP's gate far below -11 (where `exp(-x)` overflows
/// F16), an F16 forward and backward pass still gives finite gradients, and they agree in sign
/// and size with the F32 pass (upstream's `x / (exp(-x) + 1)` gives NaN gradients here).
#[test]
fn f16_gradients_stay_finite_when_the_gate_saturates() -> Result<()> {
    let cfg = config();
    let vars = TrainVars::new(7, cfg.n_layers, true);
    Llama::load(vars.builder(DType::F32, &Device::Cpu), &cfg)?; // creates the vars
    for (name, var) in vars.varmap.data().lock().expect("lock").iter() {
        if name.contains("gate_proj") {
            var.set(&(var.as_tensor() * 400.0)?)?;
        }
    }
    let x = tokens()?;
    let grads_in = |dtype: DType| -> Result<HashMap<String, Tensor>> {
        let model = Llama::load(vars.builder(dtype, &Device::Cpu), &cfg)?;
        let grads = model
            .forward(&x, 0, &mut cache(&cfg, dtype)?)?
            .mean_all()?
            .affine(65536.0, 0.0)? // a GradScaler's initial scale: no F16 underflow
            .backward()?;
        let mut out = HashMap::new();
        for (name, var) in vars.varmap.data().lock().expect("lock").iter() {
            let g = grads.get(var).expect("every var has a gradient");
            out.insert(name.clone(), g.clone());
        }
        Ok(out)
    };
    // The gate's pre-activations really reach the range where exp(-x) overflows F16: the first
    // layer's, for the tokens of `x` (their embedding rows, RMS-normalised as the first norm
    // does with its weights at 1, times the gate).
    let var = |name: &str| -> Tensor {
        vars.varmap.data().lock().expect("lock")[name]
            .as_tensor()
            .clone()
    };
    let gate = var("model.layers.0.mlp.gate_proj.weight");
    let rows = var("model.embed_tokens.weight").index_select(&x.flatten_all()?, 0)?;
    let rows = rows.broadcast_div(&(rows.sqr()?.mean_keepdim(1)? + cfg.norm_eps)?.sqrt()?)?;
    let pre = rows.matmul(&gate.t()?)?.flatten_all()?.to_vec1::<f32>()?;
    let saturated = pre.iter().filter(|&&p| p < -11.2).count();
    assert!(
        saturated * 20 >= pre.len(),
        "only {saturated} of {} gate pre-activations below -11.2",
        pre.len()
    );

    let reference = grads_in(DType::F32)?;
    let half = grads_in(DType::F16)?;
    for (name, g) in &half {
        let g = g.to_dtype(DType::F64)?;
        let values = g.flatten_all()?.to_vec1::<f64>()?;
        assert!(
            values.iter().all(|v| v.is_finite()),
            "{name}: F16 gradient is not finite"
        );
        let r = reference[name].to_dtype(DType::F64)?;
        let scale = r.abs()?.max_all()?.to_scalar::<f64>()?.max(1e-6);
        let diff = (&g - &r)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(
            diff <= 0.1 * scale,
            "{name}: F16 {diff} vs F32 scale {scale}"
        );
    }
    Ok(())
}
