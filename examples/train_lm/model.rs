//! candle-transformers' llama2-c transformer (`candle_transformers::models::llama2_c`, 0.11.1:
//! the same modules, var names, `Config` and `Cache`), with two changes a training run needs:
//!
//! 1. **RMSNorm through differentiable ops.** candle-nn's `RmsNorm::forward` takes a fused kernel
//!    without a backward pass on contiguous inputs (`apply_op2_no_bwd`, candle issue #2168): with
//!    it every gradient stops at the first norm from the top, and only `lm_head` ever trains.
//!    Here the norms call `RmsNorm::forward_diff` (candle's own op-by-op path, F32 inside).
//! 2. **A mask in the scores' dtype.** llama2_c's `masked_fill` builds an F32 `-inf` and
//!    `where_cond` refuses mixed dtypes, so a BF16/F16 forward pass fails; here `-inf` takes the
//!    scores' dtype.
//!
//! 3. **candle's `silu` op.** llama2_c writes SiLU as `x / (exp(-x) + 1)`: in F16 `exp(-x)`
//!    overflows once a pre-activation is below about -11.1, the forward pass still gives 0, but
//!    the backward pass multiplies a zero gradient by that infinite `exp` and every gradient of the
//!    step turns NaN, whatever the loss scale: a GradScaler then halves the scale at every step
//!    until it reaches 0 and training stops (seen after ~800 steps of `--dtype f16`). candle's
//!    `Tensor::silu` computes the same function with a finite backward pass.
//!
//! In F32 the forward pass equals candle-transformers' `Llama::forward` up to the rounding of
//! the RMSNorm and SiLU implementations (`tests/train_lm` checks it); the weights of a trained
//! model load into candle-transformers' `Llama` unchanged (same names and shapes; with tied
//! embeddings `lm_head.weight` is `model.embed_tokens.weight`, as in llama2.c).

use candle_core::{DType, IndexOp, Result, Tensor, D};
use candle_nn::{embedding, linear_no_bias as linear, rms_norm};
use candle_nn::{Embedding, Linear, Module, RmsNorm, VarBuilder};
pub use candle_transformers::models::llama2_c::{Cache, Config};

#[derive(Debug, Clone)]
struct CausalSelfAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    n_head: usize,
    n_key_value_head: usize,
    head_dim: usize,
}

impl CausalSelfAttention {
    fn apply_rotary_emb(&self, x: &Tensor, index_pos: usize, cache: &Cache) -> Result<Tensor> {
        let (b_sz, seq_len, h, n_embd) = x.dims4()?;
        let cos = cache.cos.i(index_pos..index_pos + seq_len)?;
        let sin = cache.sin.i(index_pos..index_pos + seq_len)?;
        let cos = cos.unsqueeze(1)?;
        let sin = sin.unsqueeze(1)?;
        let cos = cos.broadcast_as((b_sz, seq_len, 1, n_embd / 2, 1))?;
        let sin = sin.broadcast_as((b_sz, seq_len, 1, n_embd / 2, 1))?;
        let x = x.reshape((b_sz, seq_len, h, n_embd / 2, 2))?;
        let x0 = x.narrow(D::Minus1, 0, 1)?;
        let x1 = x.narrow(D::Minus1, 1, 1)?;
        let dst0 = (x0.broadcast_mul(&cos)? - x1.broadcast_mul(&sin)?)?;
        let dst1 = (x0.broadcast_mul(&sin)? + x1.broadcast_mul(&cos)?)?;
        Tensor::cat(&[&dst0, &dst1], D::Minus1)?.reshape((b_sz, seq_len, h, n_embd))
    }

    fn forward(&self, x: &Tensor, index_pos: usize, cache: &mut Cache) -> Result<Tensor> {
        let (b_sz, seq_len, n_embd) = x.dims3()?;
        let q = self.q_proj.forward(x)?;
        let k = self.k_proj.forward(x)?;
        let v = self.v_proj.forward(x)?;
        let q = q.reshape((b_sz, seq_len, self.n_head, self.head_dim))?;
        let k = k.reshape((b_sz, seq_len, self.n_key_value_head, self.head_dim))?;
        let v = v.reshape((b_sz, seq_len, self.n_key_value_head, self.head_dim))?;
        let q = self.apply_rotary_emb(&q, index_pos, cache)?;
        let k = self.apply_rotary_emb(&k, index_pos, cache)?;
        let k = self.repeat_kv(k)?;
        let v = self.repeat_kv(v)?;
        let q = q.transpose(1, 2)?.contiguous()?;
        let k = k.transpose(1, 2)?.contiguous()?;
        let v = v.transpose(1, 2)?.contiguous()?;
        let att = (q.matmul(&k.t()?)? / (self.head_dim as f64).sqrt())?;
        let att = if seq_len <= 1 {
            att
        } else {
            let mask = cache.mask(seq_len, index_pos)?.broadcast_as(att.shape())?;
            masked_fill(&att, &mask, f32::NEG_INFINITY)?
        };
        let att = candle_nn::ops::softmax(&att, D::Minus1)?;
        let y = att.matmul(&v.contiguous()?)?;
        let y = y.transpose(1, 2)?.reshape(&[b_sz, seq_len, n_embd])?;
        self.o_proj.forward(&y)
    }

    fn repeat_kv(&self, x: Tensor) -> Result<Tensor> {
        let n_rep = self.n_head / self.n_key_value_head;
        if n_rep == 1 {
            return Ok(x);
        }
        let (b_sz, seq_len, n_kv_head, head_dim) = x.dims4()?;
        x.unsqueeze(3)?
            .expand((b_sz, seq_len, n_kv_head, n_rep, head_dim))?
            .reshape((b_sz, seq_len, n_kv_head * n_rep, head_dim))
    }

    fn load(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        let size_in = cfg.dim;
        let size_q = (cfg.dim / cfg.n_heads) * cfg.n_heads;
        let size_kv = (cfg.dim / cfg.n_heads) * cfg.n_kv_heads;
        Ok(Self {
            q_proj: linear(size_in, size_q, vb.pp("q_proj"))?,
            k_proj: linear(size_in, size_kv, vb.pp("k_proj"))?,
            v_proj: linear(size_in, size_kv, vb.pp("v_proj"))?,
            o_proj: linear(size_q, size_in, vb.pp("o_proj"))?,
            n_head: cfg.n_heads,
            n_key_value_head: cfg.n_kv_heads,
            head_dim: cfg.dim / cfg.n_heads,
        })
    }
}

/// `-inf` where `mask` is set, in the dtype of `on_false` (change 2).
fn masked_fill(on_false: &Tensor, mask: &Tensor, on_true: f32) -> Result<Tensor> {
    let on_true = Tensor::new(on_true, on_false.device())?
        .to_dtype(on_false.dtype())?
        .broadcast_as(mask.shape().dims())?;
    mask.where_cond(&on_true, on_false)
}

#[derive(Debug, Clone)]
struct Mlp {
    c_fc1: Linear,
    c_fc2: Linear,
    c_proj: Linear,
}

impl Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = (self.c_fc1.forward(x)?.silu()? * self.c_fc2.forward(x)?)?; // change 3
        self.c_proj.forward(&x)
    }

    fn load(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        Ok(Self {
            c_fc1: linear(cfg.dim, cfg.hidden_dim, vb.pp("gate_proj"))?,
            c_fc2: linear(cfg.dim, cfg.hidden_dim, vb.pp("up_proj"))?,
            c_proj: linear(cfg.hidden_dim, cfg.dim, vb.pp("down_proj"))?,
        })
    }
}

#[derive(Debug, Clone)]
struct Block {
    rms_1: RmsNorm,
    attn: CausalSelfAttention,
    rms_2: RmsNorm,
    mlp: Mlp,
}

impl Block {
    fn forward(&self, x: &Tensor, index_pos: usize, cache: &mut Cache) -> Result<Tensor> {
        let residual = x;
        let x = self.rms_1.forward_diff(x)?; // change 1
        let x = (self.attn.forward(&x, index_pos, cache)? + residual)?;
        let residual = &x;
        let x = (self.mlp.forward(&self.rms_2.forward_diff(&x)?)? + residual)?;
        Ok(x)
    }

    fn load(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        Ok(Self {
            attn: CausalSelfAttention::load(vb.pp("self_attn"), cfg)?,
            mlp: Mlp::load(vb.pp("mlp"), cfg)?,
            rms_1: rms_norm(cfg.dim, cfg.norm_eps, vb.pp("input_layernorm"))?,
            rms_2: rms_norm(cfg.dim, cfg.norm_eps, vb.pp("post_attention_layernorm"))?,
        })
    }
}

/// The llama2-c transformer (see the module's documentation).
#[derive(Debug, Clone)]
pub struct Llama {
    wte: Embedding,
    blocks: Vec<Block>,
    ln_f: RmsNorm,
    lm_head: Linear,
}

impl Llama {
    /// Logits `(batch, seq, vocab)` in F32 for token ids `x` `(batch, seq)`.
    pub fn forward(&self, x: &Tensor, index_pos: usize, cache: &mut Cache) -> Result<Tensor> {
        let mut x = self.wte.forward(x)?;
        for block in &self.blocks {
            x = block.forward(&x, index_pos, cache)?;
        }
        let x = self.ln_f.forward_diff(&x)?; // change 1
        self.lm_head.forward(&x)?.to_dtype(DType::F32)
    }

    pub fn load(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        Ok(Self {
            wte: embedding(cfg.vocab_size, cfg.dim, vb.pp("model.embed_tokens"))?,
            lm_head: linear(cfg.dim, cfg.vocab_size, vb.pp("lm_head"))?,
            ln_f: rms_norm(cfg.dim, cfg.norm_eps, vb.pp("model.norm"))?,
            blocks: (0..cfg.n_layers)
                .map(|i| Block::load(vb.pp(format!("model.layers.{i}")), cfg))
                .collect::<Result<_>>()?,
        })
    }
}
