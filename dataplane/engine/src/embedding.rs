//! Sentence embeddings with BERT-family encoders (all-MiniLM-L6-v2 and kin): safetensors weights
//! and `tokenizer.json` from a model directory, run with candle tensors, mean-pooled over the
//! real (unpadded) tokens and L2-normalised.
//!
//! Shapes, with B texts padded to L tokens, width E, H heads of width D:
//!   embeddings B×L×E → per layer: q, k, v B×H×L×D, scores B×H×L×L, feed-forward B×L×4E → pooled B×E.
//!
//! Why not candle-transformers' `models::bert` (evaluated 2026-12-04): it loads this model as is
//! and would replace about 100 of these lines, but it is a 83,000-line crate whose ~120 model
//! modules all compile (no features to leave them out), plus candle-nn (10,500 lines) and a fourth
//! `fancy-regex` — about twice candle-core's compile time again on the 2-core CI machines, for
//! no change in speed (the work is candle-core's matrix products either way). Pooling,
//! normalisation and tokenization would stay ours.

use std::path::Path;

use candle_core::{D, DType, Device, Tensor};
use serde::Deserialize;
use tokenizers::{PaddingParams, TruncationParams};

use crate::EngineError;

#[derive(Debug, Clone, Deserialize)]
struct BertConfig {
    hidden_size: usize,
    num_attention_heads: usize,
    num_hidden_layers: usize,
    max_position_embeddings: usize,
    #[serde(default = "default_eps")]
    layer_norm_eps: f64,
    #[serde(default)]
    model_type: String,
}

fn default_eps() -> f64 {
    1e-12
}

struct Linear {
    weight_t: Tensor,
    bias: Tensor,
}

impl Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.broadcast_matmul(&self.weight_t)?.broadcast_add(&self.bias)
    }
}

struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let centered = x.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
        centered.broadcast_div(&(var + self.eps)?.sqrt()?)?.broadcast_mul(&self.weight)?.broadcast_add(&self.bias)
    }
}

struct Layer {
    query: Linear,
    key: Linear,
    value: Linear,
    attention_out: Linear,
    attention_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    output_norm: LayerNorm,
}

pub struct EmbeddingModel {
    config: BertConfig,
    tokenizer: tokenizers::Tokenizer,
    word: Tensor,
    position: Tensor,
    token_type: Tensor,
    embedding_norm: LayerNorm,
    layers: Vec<Layer>,
    max_tokens: usize,
}

/// Embeddings of a batch and the tokens they took.
pub struct Embeddings {
    pub vectors: Vec<Vec<f32>>,
    pub input_tokens: usize,
}

fn model_error(e: impl std::fmt::Display) -> EngineError {
    EngineError::InvalidModel(e.to_string())
}

impl EmbeddingModel {
    /// Loads `config.json`, `model.safetensors` and `tokenizer.json` (and `max_seq_length` from
    /// `sentence_bert_config.json` when present) from `dir`.
    pub fn load(dir: &Path) -> Result<Self, EngineError> {
        let read = |name: &str| {
            std::fs::read_to_string(dir.join(name))
                .map_err(|e| EngineError::Io(format!("{}: {e}", dir.join(name).display())))
        };
        let config: BertConfig =
            serde_json::from_str(&read("config.json")?).map_err(|e| model_error(format!("config.json: {e}")))?;
        if config.model_type != "bert" && !config.model_type.is_empty() {
            return Err(model_error(format!(
                "model type {:?} is not supported; this engine embeds with BERT encoders",
                config.model_type
            )));
        }
        if config.num_attention_heads == 0 || !config.hidden_size.is_multiple_of(config.num_attention_heads) {
            return Err(model_error("hidden_size is not a multiple of num_attention_heads"));
        }
        let max_tokens = read("sentence_bert_config.json")
            .ok()
            .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
            .and_then(|v| v["max_seq_length"].as_u64())
            .map_or(config.max_position_embeddings, |m| (m as usize).min(config.max_position_embeddings));

        let mut tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json"))
            .map_err(|e| EngineError::UnsupportedTokenizer(format!("tokenizer.json: {e}")))?;
        tokenizer
            .with_truncation(Some(TruncationParams { max_length: max_tokens, ..Default::default() }))
            .map_err(|e| EngineError::UnsupportedTokenizer(e.to_string()))?;
        tokenizer.with_padding(Some(PaddingParams::default()));

        let path = dir.join("model.safetensors");
        let weights = candle_core::safetensors::load(&path, &Device::Cpu)
            .map_err(|e| model_error(format!("{}: {e}", path.display())))?;
        let get = |name: &str| {
            weights
                .get(name)
                .or_else(|| weights.get(&format!("bert.{name}")))
                .cloned()
                .ok_or_else(|| model_error(format!("tensor {name} is missing")))
                .and_then(|t| t.to_dtype(DType::F32).map_err(model_error))
        };
        let linear = |prefix: &str| -> Result<Linear, EngineError> {
            Ok(Linear {
                weight_t: get(&format!("{prefix}.weight"))?.t().and_then(|t| t.contiguous()).map_err(model_error)?,
                bias: get(&format!("{prefix}.bias"))?,
            })
        };
        let norm = |prefix: &str| -> Result<LayerNorm, EngineError> {
            Ok(LayerNorm {
                weight: get(&format!("{prefix}.weight"))?,
                bias: get(&format!("{prefix}.bias"))?,
                eps: config.layer_norm_eps,
            })
        };
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let p = format!("encoder.layer.{i}");
                Ok(Layer {
                    query: linear(&format!("{p}.attention.self.query"))?,
                    key: linear(&format!("{p}.attention.self.key"))?,
                    value: linear(&format!("{p}.attention.self.value"))?,
                    attention_out: linear(&format!("{p}.attention.output.dense"))?,
                    attention_norm: norm(&format!("{p}.attention.output.LayerNorm"))?,
                    intermediate: linear(&format!("{p}.intermediate.dense"))?,
                    output: linear(&format!("{p}.output.dense"))?,
                    output_norm: norm(&format!("{p}.output.LayerNorm"))?,
                })
            })
            .collect::<Result<Vec<_>, EngineError>>()?;
        Ok(Self {
            word: get("embeddings.word_embeddings.weight")?,
            position: get("embeddings.position_embeddings.weight")?,
            token_type: get("embeddings.token_type_embeddings.weight")?,
            embedding_norm: norm("embeddings.LayerNorm")?,
            layers,
            tokenizer,
            max_tokens,
            config,
        })
    }

    /// Width of the vectors.
    pub fn dimensions(&self) -> usize {
        self.config.hidden_size
    }

    /// Longest input in tokens; longer texts are truncated, as sentence-transformers does.
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// Tokens `text` would use (after truncation), special tokens included.
    pub fn count_tokens(&self, text: &str) -> Result<usize, EngineError> {
        Ok(self.tokenizer.encode_fast(text, true).map_err(|e| EngineError::Tokenizer(e.to_string()))?.get_ids().len())
    }

    /// L2-normalised embeddings of `texts`, in order.
    pub fn embed(&self, texts: &[String]) -> Result<Embeddings, EngineError> {
        if texts.is_empty() {
            return Ok(Embeddings { vectors: Vec::new(), input_tokens: 0 });
        }
        if let Some(i) = texts.iter().position(|t| t.is_empty()) {
            return Err(EngineError::Tokenizer(format!("text {i} is empty")));
        }
        let encodings = self
            .tokenizer
            .encode_batch_fast(texts.iter().map(String::as_str).collect::<Vec<_>>(), true)
            .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        let input_tokens = encodings.iter().map(|e| e.get_attention_mask().iter().filter(|&&m| m == 1).count()).sum();
        self.forward(&encodings).map(|vectors| Embeddings { vectors, input_tokens }).map_err(model_error)
    }

    fn forward(&self, encodings: &[tokenizers::Encoding]) -> candle_core::Result<Vec<Vec<f32>>> {
        let (b, l) = (encodings.len(), encodings[0].get_ids().len());
        let (e, h) = (self.config.hidden_size, self.config.num_attention_heads);
        let d = e / h;
        let dev = &Device::Cpu;
        let ids: Vec<u32> = encodings.iter().flat_map(|x| x.get_ids().iter().copied()).collect();
        let types: Vec<u32> = encodings.iter().flat_map(|x| x.get_type_ids().iter().copied()).collect();
        let mask: Vec<f32> = encodings.iter().flat_map(|x| x.get_attention_mask().iter().map(|&m| m as f32)).collect();
        let ids = Tensor::from_vec(ids, (b * l,), dev)?;
        let types = Tensor::from_vec(types, (b * l,), dev)?;
        let mask = Tensor::from_vec(mask, (b, l), dev)?;

        let x = self.word.index_select(&ids, 0)?.reshape((b, l, e))?;
        let x = x.broadcast_add(&self.position.narrow(0, 0, l)?)?;
        let x = (x + self.token_type.index_select(&types, 0)?.reshape((b, l, e))?)?;
        let mut x = self.embedding_norm.forward(&x)?;
        // Padding positions get a large negative score: B×1×1×L.
        let mask_bias = ((mask.clone() - 1.0)? * 1e9)?.reshape((b, 1, 1, l))?;
        let heads = |t: Tensor| t.reshape((b, l, h, d))?.transpose(1, 2)?.contiguous();
        for layer in &self.layers {
            let q = heads(layer.query.forward(&x)?)?;
            let k = heads(layer.key.forward(&x)?)?;
            let v = heads(layer.value.forward(&x)?)?;
            let scores = (q.matmul(&k.t()?)? / (d as f64).sqrt())?.broadcast_add(&mask_bias)?;
            let max = scores.max_keepdim(D::Minus1)?;
            let exp = scores.broadcast_sub(&max)?.exp()?;
            let probs = exp.broadcast_div(&exp.sum_keepdim(D::Minus1)?)?;
            let context = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, l, e))?;
            let attended = layer.attention_norm.forward(&(layer.attention_out.forward(&context)? + &x)?)?;
            let inner = layer.intermediate.forward(&attended)?.gelu_erf()?;
            x = layer.output_norm.forward(&(layer.output.forward(&inner)? + &attended)?)?;
        }
        // Mean over real tokens, then unit length.
        let weights = mask.reshape((b, l, 1))?;
        let summed = x.broadcast_mul(&weights)?.sum(1)?;
        let pooled = summed.broadcast_div(&weights.sum(1)?)?;
        let norms = pooled.sqr()?.sum_keepdim(1)?.sqrt()?;
        pooled.broadcast_div(&norms)?.to_vec2::<f32>()
    }
}
