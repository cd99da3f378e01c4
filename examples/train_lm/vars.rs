//! The model's vars: a `VarMap` of F32 vars created with a seeded initialisation (candle's own
//! initialisers draw from an unseeded generator), seen by the model through a `VarBuilder` whose
//! backend hands out each var converted to the compute dtype (`to_dtype` is differentiable: the
//! gradient reaches the F32 var; in F32 it is the var itself). The model is built again from it
//! at every step, so a BF16/F16 copy always reflects the latest update.
//!
//! Initialisation as llama2.c's `_init_weights`: normal(0, 0.02) for every linear and embedding
//! weight, 0.02/sqrt(2·n_layers) for the attention output (`o_proj`) and `up_proj` (llama2.c's
//! `wo` and `w3`), ones for the RMSNorm weights. With `tie`, `lm_head.weight` is
//! `model.embed_tokens.weight` (llama2.c ties them).

use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use candle_nn::{Init, VarBuilder, VarMap};
use rand::{rngs::StdRng, SeedableRng};
use rand_distr::{Distribution, Normal};

use super::data::SplitMix;

pub struct TrainVars {
    pub varmap: VarMap,
    seed: u64,
    n_layers: usize,
    tie: bool,
}

impl TrainVars {
    pub fn new(seed: u64, n_layers: usize, tie: bool) -> Self {
        Self {
            varmap: VarMap::new(),
            seed,
            n_layers,
            tie,
        }
    }

    /// A `VarBuilder` handing out the vars in `dtype` (created on first use).
    pub fn builder(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        let backend = Backend {
            varmap: self.varmap.clone(),
            seed: self.seed,
            n_layers: self.n_layers,
            tie: self.tie,
            compute: dtype,
        };
        VarBuilder::from_backend(Box::new(backend), DType::F32, device.clone())
    }
}

struct Backend {
    varmap: VarMap,
    seed: u64,
    n_layers: usize,
    tie: bool,
    compute: DType,
}

fn name_seed(seed: u64, name: &str) -> u64 {
    let mut h = 0xCBF2_9CE4_8422_2325u64 ^ seed;
    for b in name.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01B3);
    }
    SplitMix::new(h).next_u64()
}

impl Backend {
    fn init(&self, shape: &Shape, name: &str, hint: Init, device: &Device) -> Result<Tensor> {
        if let Init::Const(c) = hint {
            return Tensor::full(c as f32, shape, device);
        }
        let std = if name.ends_with("o_proj.weight") || name.ends_with("up_proj.weight") {
            0.02 / (2.0 * self.n_layers as f64).sqrt()
        } else {
            0.02
        };
        let normal = Normal::new(0.0, std as f32)
            .map_err(|e| candle_core::Error::Msg(format!("init of {name}: {e}")))?;
        let mut rng = StdRng::seed_from_u64(name_seed(self.seed, name));
        let values: Vec<f32> = (0..shape.elem_count())
            .map(|_| normal.sample(&mut rng))
            .collect();
        Tensor::from_vec(values, shape, device)
    }
}

impl candle_nn::var_builder::SimpleBackend for Backend {
    fn get(&self, shape: Shape, name: &str, hint: Init, _: DType, dev: &Device) -> Result<Tensor> {
        let name = if self.tie && name == "lm_head.weight" {
            "model.embed_tokens.weight"
        } else {
            name
        };
        let mut data = self
            .varmap
            .data()
            .lock()
            .map_err(|_| candle_core::Error::Msg("the VarMap's lock is poisoned".into()))?;
        let var = match data.get(name) {
            Some(var) => {
                if var.shape() != &shape {
                    candle_core::bail!("shape mismatch on {name}: {shape:?} <> {:?}", var.shape())
                }
                var.clone()
            }
            None => {
                let var = Var::from_tensor(&self.init(&shape, name, hint, dev)?)?;
                data.insert(name.to_string(), var.clone());
                var
            }
        };
        var.as_tensor().to_dtype(self.compute)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> Result<Tensor> {
        candle_core::bail!("train_lm: `get_unchecked({name})` is not supported")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.varmap
            .data()
            .lock()
            .map(|d| d.contains_key(name))
            .unwrap_or(false)
    }
}
