//! The llama-family transformer, run over a batch of sequence steps at once.
//!
//! A step is a run of new tokens of one sequence starting at some position: one token for a
//! sequence that is decoding, a chunk of the prompt for one that is prefilling. All tokens of all
//! steps go through the weight matrices together (one matrix product per weight, so the weights
//! are read once per batch rather than once per sequence); attention is per token, over the
//! token's own sequence in the paged KV cache.
//!
//! Shapes, with T the tokens in the batch, E the embedding width, H / Hkv the query / key-value
//! heads of width D, F the feed-forward width and V the vocabulary:
//!   x: T×E → per layer: q T×(H·D), k and v T×(Hkv·D), attention T×(H·D), gate and up T×F → logits V
//! per step that asks for them (only from its last token).
//! RoPE rotates adjacent pairs `(2i, 2i+1)`; GGUF conversion permuted the Q and K weights for that.

use std::sync::atomic::{AtomicBool, Ordering};

use rayon::prelude::*;

use crate::EngineError;
use crate::attention::{AttendScratch, Head, SPAN, SpanStats, attend, merge};
use crate::gguf::GgufFile;
use crate::kv_cache::KvCache;
use crate::quant::{BLOCK, BlockQ8, QMatrix, quantize_row};
use crate::sampling::{Sampled, Sampler, TokenScore, score};
use crate::tensor_model::TensorLlama;

/// Where a model runs.
#[derive(Debug, Clone)]
pub enum Backend {
    /// The engine's own quantized CPU kernels: the default, and the fastest on CPUs.
    Cpu,
    /// candle tensors on a device: an NVIDIA GPU (built with the `cuda` feature), or candle's CPU
    /// device, which tests use as the reference for the GPU code.
    Candle(candle_core::Device),
}

impl Backend {
    /// `cpu`, `cuda` (GPU 0), `cuda:N`, or `candle-cpu`.
    pub fn parse(name: &str) -> Result<Self, EngineError> {
        let cuda = |ordinal: usize| {
            candle_core::Device::new_cuda(ordinal).map(Backend::Candle).map_err(|e| {
                EngineError::Device(format!(
                    "CUDA device {ordinal}: {e} (the runner must be built with the cuda feature and see an NVIDIA GPU)"
                ))
            })
        };
        match name {
            "cpu" => Ok(Backend::Cpu),
            "candle-cpu" => Ok(Backend::Candle(candle_core::Device::Cpu)),
            "cuda" => cuda(0),
            other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(ordinal)) => cuda(ordinal),
                _ => Err(EngineError::Device(format!(
                    "unknown device {other:?}: expected cpu, cuda, cuda:N or candle-cpu"
                ))),
            },
        }
    }
}

/// The hyper-parameters read from GGUF metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub n_ff: usize,
    pub vocab: usize,
    pub context_length: usize,
    pub rope_base: f32,
    pub rms_eps: f32,
}

impl LlamaConfig {
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self, EngineError> {
        let arch = gguf.string("general.architecture")?;
        if arch != "llama" {
            return Err(EngineError::InvalidModel(format!(
                "architecture {arch:?} is not supported; this engine runs llama"
            )));
        }
        let u = |k: &str| gguf.u32(&format!("llama.{k}")).map(|v| v as usize);
        let n_embd = u("embedding_length")?;
        let n_head = u("attention.head_count")?;
        let n_head_kv = u("attention.head_count_kv").unwrap_or(n_head);
        if n_head == 0 || n_head_kv == 0 || n_embd % n_head != 0 || n_head % n_head_kv != 0 {
            return Err(EngineError::InvalidModel(format!(
                "inconsistent heads: {n_head} query, {n_head_kv} key-value, width {n_embd}"
            )));
        }
        let vocab = match u("vocab_size") {
            Ok(v) => v,
            Err(_) => gguf.strings("tokenizer.ggml.tokens")?.len(),
        };
        Ok(Self {
            n_layer: u("block_count")?,
            n_embd,
            n_head,
            n_head_kv,
            head_dim: n_embd / n_head,
            n_ff: u("feed_forward_length")?,
            vocab,
            context_length: u("context_length")?,
            rope_base: gguf.f32("llama.rope.freq_base").unwrap_or(10_000.0),
            rms_eps: gguf.f32("llama.attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
        })
    }

    /// Floats of key (or value) per token per layer.
    pub fn kv_dim(&self) -> usize {
        self.n_head_kv * self.head_dim
    }
}

struct Layer {
    attn_norm: Vec<f32>,
    wq: QMatrix,
    wk: QMatrix,
    wv: QMatrix,
    wo: QMatrix,
    ffn_norm: Vec<f32>,
    gate: QMatrix,
    up: QMatrix,
    down: QMatrix,
}

pub struct LlamaModel {
    pub config: LlamaConfig,
    /// The threads a forward pass (on the CPU) and sampling run on; the pass itself runs inside
    /// the pool so that its parallel loops split work between workers instead of waking them
    /// from outside.
    pool: rayon::ThreadPool,
    weights: Weights,
}

enum Weights {
    Cpu(CpuWeights),
    Tensors(TensorLlama),
}

/// The weights laid out for the engine's CPU kernels.
struct CpuWeights {
    token_embd: QMatrix,
    layers: Vec<Layer>,
    output_norm: Vec<f32>,
    output: QMatrix,
    /// `[position][pair]` cos and sin of the rotary angles.
    rope_cos: Vec<f32>,
    rope_sin: Vec<f32>,
}

/// `[position][pair]` cos and sin of the rotary angles of every position of the context.
pub(crate) fn rope_tables(c: &LlamaConfig) -> (Vec<f32>, Vec<f32>) {
    let pairs = c.head_dim / 2;
    let mut rope_cos = Vec::with_capacity(c.context_length * pairs);
    let mut rope_sin = Vec::with_capacity(c.context_length * pairs);
    for pos in 0..c.context_length {
        for i in 0..pairs {
            let theta = pos as f32 * c.rope_base.powf(-2.0 * i as f32 / c.head_dim as f32);
            rope_cos.push(theta.cos());
            rope_sin.push(theta.sin());
        }
    }
    (rope_cos, rope_sin)
}

/// New tokens of one sequence to run.
pub struct Step<'a> {
    pub tokens: &'a [u32],
    /// Position of `tokens[0]` in the sequence.
    pub start: usize,
    /// The sequence's blocks; must already cover `start + tokens.len()` positions.
    pub blocks: &'a [u32],
    /// Whether to compute logits for the step's last token.
    pub logits: bool,
    /// Whether to compute logits for every token of the step (to score a prompt), in which case
    /// the step gives one row per token.
    pub all_logits: bool,
}

impl Step<'_> {
    /// Rows of logits the step gives.
    pub fn rows(&self) -> usize {
        if self.all_logits { self.tokens.len() } else { usize::from(self.logits) }
    }
}

/// Buffers reused across forward passes.
#[derive(Default)]
pub struct Scratch {
    x: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    proj: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    xq: Vec<BlockQ8>,
    attention: AttentionBuffers,
    logits: Vec<f32>,
}

/// The logits of a forward pass: [`Step::rows`] rows of vocabulary-size values per step, in
/// step order; borrowed from the [`Scratch`] until its next pass.
pub struct Logits<'a> {
    values: &'a [f32],
    vocab: usize,
}

impl<'a> Logits<'a> {
    pub fn len(&self) -> usize {
        self.values.len() / self.vocab
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    pub fn iter(&self) -> std::slice::ChunksExact<'a, f32> {
        self.values.chunks_exact(self.vocab)
    }
}

impl<'a> IntoIterator for &Logits<'a> {
    type Item = &'a [f32];
    type IntoIter = std::slice::ChunksExact<'a, f32>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl std::ops::Index<usize> for Logits<'_> {
    type Output = [f32];

    fn index(&self, i: usize) -> &[f32] {
        &self.values[i * self.vocab..(i + 1) * self.vocab]
    }
}

/// Attention's output, and its per-span outputs and statistics before they are merged.
#[derive(Default)]
struct AttentionBuffers {
    out: Vec<f32>,
    spans: Vec<f32>,
    stats: Vec<SpanStats>,
}

impl LlamaModel {
    /// Loads the weights for the CPU kernels; `threads` is the size of the compute pool (0: one
    /// per core).
    pub fn load(gguf: &GgufFile, threads: usize) -> Result<Self, EngineError> {
        Self::load_on(gguf, threads, &Backend::Cpu)
    }

    /// Loads the weights for `backend`.
    pub fn load_on(gguf: &GgufFile, threads: usize, backend: &Backend) -> Result<Self, EngineError> {
        let config = LlamaConfig::from_gguf(gguf)?;
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("mantle-engine-{i}"))
            .build()
            .map_err(|e| EngineError::Io(format!("starting the engine threads: {e}")))?;
        let weights = match backend {
            Backend::Cpu => Weights::Cpu(CpuWeights::load(gguf, &config, &pool)?),
            Backend::Candle(device) => Weights::Tensors(TensorLlama::load(gguf, &config, device)?),
        };
        Ok(Self { config, pool, weights })
    }

    /// An empty KV cache of `num_blocks` blocks of `block_size` tokens where this model's
    /// forward pass reads it (host memory, or the device's).
    pub fn new_cache(&self, block_size: usize, num_blocks: usize) -> Result<KvCache, EngineError> {
        let c = &self.config;
        match &self.weights {
            Weights::Cpu(_) => Ok(KvCache::new(c.n_layer, c.n_head_kv, c.head_dim, block_size, num_blocks)),
            Weights::Tensors(t) => {
                KvCache::on_device(c.n_layer, c.n_head_kv, c.head_dim, block_size, num_blocks, t.device())
            }
        }
    }

    /// Runs the steps, writing their keys and values into `cache` (made by
    /// [`new_cache`](Self::new_cache)), and returns their logits ([`Step::rows`] each), in step
    /// order. Fails only on a device error.
    pub fn forward<'s>(
        &self,
        steps: &[Step<'_>],
        cache: &mut KvCache,
        s: &'s mut Scratch,
    ) -> Result<Logits<'s>, EngineError> {
        let logits = self.forward_unless(steps, cache, s, None)?;
        Ok(logits.expect("a forward pass without an interrupt runs to its end"))
    }

    /// [`forward`](Self::forward), except that on the CPU kernels it gives up between two layers
    /// of its first half once `interrupt` is set, and returns `None`: the keys and values it wrote
    /// are at positions the steps compute again when they are run next. (The tensor backend runs to its end: its
    /// launches are asynchronous, and a GPU's step is short.)
    pub fn forward_unless<'s>(
        &self,
        steps: &[Step<'_>],
        cache: &mut KvCache,
        s: &'s mut Scratch,
        interrupt: Option<&AtomicBool>,
    ) -> Result<Option<Logits<'s>>, EngineError> {
        match &self.weights {
            Weights::Cpu(w) => {
                if cache.device_kv().is_some() {
                    return Err(EngineError::Device("a device KV cache given to the CPU kernels".into()));
                }
                if !self.pool.install(|| w.forward(&self.config, steps, cache, s, interrupt)) {
                    return Ok(None);
                }
            }
            Weights::Tensors(t) => {
                let kv = cache
                    .device_kv()
                    .ok_or_else(|| EngineError::Device("a host KV cache given to the tensor forward pass".into()))?;
                t.forward(&self.config, steps, kv, cache.block_size(), &mut s.logits)?;
            }
        }
        Ok(Some(Logits { values: &s.logits, vocab: self.config.vocab }))
    }

    /// Samples the next token of each sequence, `samplers[i]` from row `rows[i]` of `logits`, in
    /// parallel on the engine's threads (a vocabulary-wide pass per sequence adds up in a large
    /// batch).
    pub fn sample(&self, logits: &Logits<'_>, rows: &[usize], samplers: &mut [&mut Sampler]) -> Vec<Sampled> {
        assert_eq!(rows.len(), samplers.len(), "one sampler per row");
        self.pool.install(|| samplers.par_iter_mut().zip(rows).map(|(s, &row)| s.sample(&logits[row])).collect())
    }

    /// Scores `(row, token)` pairs: each token's log-probability under its row of `logits`, with
    /// the `top` most likely tokens there, in parallel on the engine's threads.
    pub fn score(&self, logits: &Logits<'_>, pairs: &[(usize, u32)], top: usize) -> Vec<TokenScore> {
        self.pool.install(|| pairs.par_iter().map(|&(row, token)| score(&logits[row], token, top)).collect())
    }

    /// Threads the forward pass uses.
    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }

    /// Where the model runs: `cpu`, or candle's name of the device.
    pub fn device_name(&self) -> String {
        match &self.weights {
            Weights::Cpu(_) => "cpu".into(),
            Weights::Tensors(t) => match t.device() {
                candle_core::Device::Cpu => "candle-cpu".into(),
                other => format!("{:?}", other.location()),
            },
        }
    }
}

impl CpuWeights {
    fn load(gguf: &GgufFile, config: &LlamaConfig, pool: &rayon::ThreadPool) -> Result<Self, EngineError> {
        let layers = (0..config.n_layer)
            .map(|i| {
                let m = |n: &str| gguf.matrix(&format!("blk.{i}.{n}.weight"));
                Ok(Layer {
                    attn_norm: gguf.vector(&format!("blk.{i}.attn_norm.weight"))?,
                    wq: m("attn_q")?,
                    wk: m("attn_k")?,
                    wv: m("attn_v")?,
                    wo: m("attn_output")?,
                    ffn_norm: gguf.vector(&format!("blk.{i}.ffn_norm.weight"))?,
                    gate: m("ffn_gate")?,
                    up: m("ffn_up")?,
                    down: m("ffn_down")?,
                })
            })
            .collect::<Result<Vec<_>, EngineError>>()?;
        let token_embd = gguf.matrix("token_embd.weight")?;
        // Small models tie the output projection to the token embedding.
        let output = gguf.matrix("output.weight").unwrap_or_else(|_| token_embd.clone());
        let c = config;
        let shape_ok = token_embd.rows == c.vocab
            && token_embd.cols == c.n_embd
            && output.rows == c.vocab
            && layers.iter().all(|l| {
                l.wq.rows == c.n_head * c.head_dim
                    && l.wk.rows == c.kv_dim()
                    && l.wv.rows == c.kv_dim()
                    && l.gate.rows == c.n_ff
                    && l.down.cols == c.n_ff
                    && l.attn_norm.len() == c.n_embd
            });
        if !shape_ok {
            return Err(EngineError::InvalidModel("tensor shapes do not match the model's metadata".into()));
        }
        let (rope_cos, rope_sin) = rope_tables(c);
        // Lay the weights out for this CPU's kernels once, now, on the engine's threads.
        pool.install(|| {
            let matrices = layers.iter().flat_map(|l| [&l.wq, &l.wk, &l.wv, &l.wo, &l.gate, &l.up, &l.down]);
            matrices.chain([&output]).collect::<Vec<_>>().into_par_iter().for_each(QMatrix::prepare);
        });
        Ok(Self { output_norm: gguf.vector("output_norm.weight")?, token_embd, layers, output, rope_cos, rope_sin })
    }

    /// The forward pass (inside the engine's pool), leaving the logits in `s.logits`.
    /// False when `interrupt` stopped it between two layers.
    fn forward(
        &self,
        c: &LlamaConfig,
        steps: &[Step<'_>],
        cache: &mut KvCache,
        s: &mut Scratch,
        interrupt: Option<&AtomicBool>,
    ) -> bool {
        let (e, kv_dim, hd) = (c.n_embd, c.kv_dim(), c.head_dim);
        // (step, position) of every token in the batch.
        let tokens: Vec<(usize, usize)> =
            steps.iter().enumerate().flat_map(|(i, st)| (0..st.tokens.len()).map(move |j| (i, st.start + j))).collect();
        let t_count = tokens.len();

        s.x.resize(t_count * e, 0.0);
        let ids = steps.iter().flat_map(|st| st.tokens.iter());
        for (row, &id) in s.x.chunks_exact_mut(e).zip(ids) {
            self.token_embd.dequantize_row(id as usize, row);
        }

        // Each step between two matrix products is one parallel pass over the tokens (the
        // residual add, the norm and the quantization together; the gated activation and its
        // quantization; attention's merge and its quantization), so the worker threads are not
        // left idle, and put to sleep, by serial work between products.
        for (li, layer) in self.layers.iter().enumerate() {
            // Past half way, finishing is cheaper for everyone than starting again.
            if li < self.layers.len() / 2 && interrupt.is_some_and(|i| i.load(Ordering::Relaxed)) {
                return false;
            }
            // The previous layer's feed-forward output joins the residual stream here.
            let residual = (li > 0).then_some(&s.proj[..]);
            add_norm_quantize(&mut s.x, residual, &layer.attn_norm, c.rms_eps, &mut s.xq);
            QMatrix::matmul_all(&[&layer.wq, &layer.wk, &layer.wv], &s.xq, &mut [&mut s.q, &mut s.k, &mut s.v]);
            for (t, &(si, pos)) in tokens.iter().enumerate() {
                self.rope(c, &mut s.q[t * c.n_head * hd..(t + 1) * c.n_head * hd], pos);
                self.rope(c, &mut s.k[t * kv_dim..(t + 1) * kv_dim], pos);
                let blocks = steps[si].blocks;
                let bs = cache.block_size();
                cache.write(
                    li,
                    blocks[pos / bs],
                    pos % bs,
                    &s.k[t * kv_dim..(t + 1) * kv_dim],
                    &s.v[t * kv_dim..(t + 1) * kv_dim],
                );
            }
            self.attention(c, li, steps, &tokens, cache, s);
            layer.wo.matmul(&s.xq, &mut s.proj);
            add_norm_quantize(&mut s.x, Some(&s.proj), &layer.ffn_norm, c.rms_eps, &mut s.xq);
            QMatrix::matmul_all(&[&layer.gate, &layer.up], &s.xq, &mut [&mut s.gate, &mut s.up]);
            silu_quantize(&mut s.gate, &s.up, c.n_ff, &mut s.xq);
            layer.down.matmul(&s.xq, &mut s.proj);
        }
        // Logits only for the tokens whose steps want them (the last, or all); the last layer's
        // feed-forward output joins the residual stream here, for those tokens only.
        let mut last = Vec::new();
        let mut offset = 0;
        for st in steps {
            offset += st.tokens.len();
            let first = offset - st.rows();
            let (at, rows) = (last.len(), first * e..offset * e);
            last.extend_from_slice(&s.x[rows.clone()]);
            if let Some(proj) = s.proj.get(rows).filter(|_| !self.layers.is_empty()) {
                add_in_place(&mut last[at..], proj);
            }
        }
        if last.is_empty() {
            s.logits.clear();
            return true;
        }
        add_norm_quantize(&mut last, None, &self.output_norm, c.rms_eps, &mut s.xq);
        self.output.matmul(&s.xq, &mut s.logits);
        true
    }

    /// Rotates each head's adjacent pairs by the angles of `pos`.
    fn rope(&self, c: &LlamaConfig, heads: &mut [f32], pos: usize) {
        let pairs = c.head_dim / 2;
        let (cos, sin) =
            (&self.rope_cos[pos * pairs..(pos + 1) * pairs], &self.rope_sin[pos * pairs..(pos + 1) * pairs]);
        for head in heads.chunks_exact_mut(c.head_dim) {
            for (i, pair) in head.chunks_exact_mut(2).enumerate() {
                let (a, b) = (pair[0], pair[1]);
                pair[0] = a * cos[i] - b * sin[i];
                pair[1] = a * sin[i] + b * cos[i];
            }
        }
    }

    /// Causal attention of the queries `s.q` of every batch token over its own sequence, into
    /// `s.attention.out` and, quantized, `s.xq` (the input of the output projection). One task
    /// per (token, KV head, span of at most [`SPAN`] positions) serves the query heads that share
    /// that KV head, so each cached key and value is read once per task rather than once per
    /// query head; a long context's spans run in parallel and are merged.
    fn attention(
        &self,
        c: &LlamaConfig,
        layer: usize,
        steps: &[Step<'_>],
        tokens: &[(usize, usize)],
        cache: &KvCache,
        s: &mut Scratch,
    ) {
        let Scratch { q, attention: AttentionBuffers { out, spans, stats }, xq, .. } = s;
        let (hd, group) = (c.head_dim, c.n_head / c.n_head_kv);
        let width = group * hd;
        let scale = 1.0 / (hd as f32).sqrt();
        out.resize(tokens.len() * c.n_head * hd, 0.0);
        // Tasks (token, KV head, span), spans of a (token, KV head) consecutive. Query heads
        // h of a KV head g are g*group .. (g+1)*group, contiguous in q and out.
        let tasks: Vec<(usize, usize, std::ops::Range<usize>)> = (0..tokens.len() * c.n_head_kv)
            .flat_map(|i| {
                let positions = tokens[i / c.n_head_kv].1 + 1;
                (0..positions).step_by(SPAN).map(move |start| (i, start, start + SPAN.min(positions - start)))
            })
            .map(|(i, start, end)| (i / c.n_head_kv, i % c.n_head_kv, start..end))
            .collect();
        let wide = crate::attention::wide_supported();
        spans.resize(tasks.len() * width, 0.0);
        stats.resize(tasks.len() * group, SpanStats::default());
        spans.par_chunks_mut(width).zip(stats.par_chunks_mut(group)).zip(tasks.par_iter()).for_each_init(
            AttendScratch::default,
            |worker, ((o, st), (t, g, span))| {
                let i = t * c.n_head_kv + g;
                let head = Head {
                    layer,
                    blocks: steps[tokens[*t].0].blocks,
                    queries: &q[i * width..(i + 1) * width],
                    kv_head: *g,
                    span: span.clone(),
                    scale,
                };
                attend(&head, cache, worker, o, st, wide);
            },
        );
        // Each token's (KV head, spans) into its output row, then quantized; the tasks of token
        // t are `first[t]..first[t + 1]`, in KV head order.
        let first: Vec<usize> =
            (0..=tokens.len()).map(|t| tasks.partition_point(|(task_token, _, _)| *task_token < t)).collect();
        let row = c.n_head * hd;
        xq.resize(out.len() / BLOCK, BlockQ8::default());
        out.par_chunks_mut(row).zip(xq.par_chunks_mut(row / BLOCK)).enumerate().for_each(|(t, (o, q))| {
            let mut at = first[t];
            for (g, o) in o.chunks_exact_mut(width).enumerate() {
                let n = tasks[at..first[t + 1]].iter().take_while(|(_, task_g, _)| *task_g == g).count();
                merge(&spans[at * width..(at + n) * width], &stats[at * group..(at + n) * group], o);
                at += n;
            }
            quantize_row(o, q);
        });
    }
}

/// Per token row, in parallel: `x += residual` (when there is one), then the row RMS-normalised,
/// scaled by `weight` and quantized into `xq`.
fn add_norm_quantize(x: &mut [f32], residual: Option<&[f32]>, weight: &[f32], eps: f32, xq: &mut Vec<BlockQ8>) {
    let e = weight.len();
    xq.resize(x.len() / BLOCK, BlockQ8::default());
    x.par_chunks_mut(e).zip(xq.par_chunks_mut(e / BLOCK)).enumerate().for_each_init(Vec::new, |h, (t, (row, q))| {
        if let Some(residual) = residual {
            add_in_place(row, &residual[t * e..(t + 1) * e]);
        }
        rms_norm(row, weight, eps, h);
        quantize_row(h, q);
    });
}

/// Per token row of `n_ff` values, in parallel: `gate = silu(gate) * up`, quantized into `xq`.
fn silu_quantize(gate: &mut [f32], up: &[f32], n_ff: usize, xq: &mut Vec<BlockQ8>) {
    xq.resize(gate.len() / BLOCK, BlockQ8::default());
    gate.par_chunks_mut(n_ff).zip(up.par_chunks(n_ff)).zip(xq.par_chunks_mut(n_ff / BLOCK)).for_each(|((g, u), q)| {
        crate::vmath::silu_mul(g, u);
        quantize_row(g, q);
    });
}

fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut Vec<f32>) {
    let e = weight.len();
    out.resize(x.len(), 0.0);
    for (row, o) in x.chunks_exact(e).zip(out.chunks_exact_mut(e)) {
        let mean_sq = row.iter().map(|v| v * v).sum::<f32>() / e as f32;
        let inv = 1.0 / (mean_sq + eps).sqrt();
        for ((o, v), w) in o.iter_mut().zip(row).zip(weight) {
            *o = v * inv * w;
        }
    }
}

fn add_in_place(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}
