//! The llama forward pass in candle tensors, for accelerators: with the `cuda` feature the same
//! code runs on an NVIDIA GPU (quantized matrix products from candle's CUDA kernels, the rest
//! through cuBLAS and candle's element-wise kernels); on candle's CPU device it is what the tests
//! compare against the engine's own CPU kernels ([`crate::model`]), which stay the CPU path.
//!
//! Same batch of steps, same paged KV cache bookkeeping as the CPU path; the keys and values live
//! in the cache's device tensors ([`DeviceKv`]): each new token's key and value are scattered
//! into its slot (block × block size + offset), and attention gathers a sequence's slots from its
//! block table. Decoding sequences (one new token each) attend together, padded to the longest
//! and masked; each prefill chunk attends on its own, causally.

use candle_core::quantized::QMatMul;
use candle_core::{D, DType, Device, Module, Tensor};

use crate::EngineError;
use crate::gguf::GgufFile;
use crate::kv_cache::{DeviceKv, device_error};
use crate::model::{LlamaConfig, Step, rope_tables};

struct Layer {
    attn_norm: Tensor,
    wq: QMatMul,
    wk: QMatMul,
    wv: QMatMul,
    wo: QMatMul,
    ffn_norm: Tensor,
    gate: QMatMul,
    up: QMatMul,
    down: QMatMul,
}

pub struct TensorLlama {
    device: Device,
    token_embd: QMatMul,
    layers: Vec<Layer>,
    output_norm: Tensor,
    output: QMatMul,
    /// `[position, pair]` cos and sin of the rotary angles.
    rope_cos: Tensor,
    rope_sin: Tensor,
}

type Result<T> = std::result::Result<T, candle_core::Error>;

impl TensorLlama {
    /// Loads the weights onto `device`, quantized as they are in the file.
    pub fn load(gguf: &GgufFile, c: &LlamaConfig, device: &Device) -> std::result::Result<Self, EngineError> {
        let vector = |name: &str| -> std::result::Result<Tensor, EngineError> {
            let v = gguf.vector(name)?;
            let n = v.len();
            Tensor::from_vec(v, n, device).map_err(device_error)
        };
        let matrix = |name: &str| gguf.qtensor(name, device).and_then(|q| QMatMul::from_arc(q).map_err(device_error));
        let layers = (0..c.n_layer)
            .map(|i| {
                let m = |n: &str| matrix(&format!("blk.{i}.{n}.weight"));
                Ok(Layer {
                    attn_norm: vector(&format!("blk.{i}.attn_norm.weight"))?,
                    wq: m("attn_q")?,
                    wk: m("attn_k")?,
                    wv: m("attn_v")?,
                    wo: m("attn_output")?,
                    ffn_norm: vector(&format!("blk.{i}.ffn_norm.weight"))?,
                    gate: m("ffn_gate")?,
                    up: m("ffn_up")?,
                    down: m("ffn_down")?,
                })
            })
            .collect::<std::result::Result<Vec<_>, EngineError>>()?;
        let token_embd = matrix("token_embd.weight")?;
        // Small models tie the output projection to the token embedding.
        let output = if gguf.has_tensor("output.weight") { matrix("output.weight")? } else { token_embd.clone() };
        let (cos, sin) = rope_tables(c);
        let pairs = c.head_dim / 2;
        let table = |v: Vec<f32>| Tensor::from_vec(v, (c.context_length, pairs), device).map_err(device_error);
        Ok(Self {
            device: device.clone(),
            token_embd,
            layers,
            output_norm: vector("output_norm.weight")?,
            output,
            rope_cos: table(cos)?,
            rope_sin: table(sin)?,
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Runs the steps, writing their keys and values into `kv`, and returns their logits
    /// ([`Step::rows`] rows of `vocab` values each, in step order) in `logits`.
    pub fn forward(
        &self,
        c: &LlamaConfig,
        steps: &[Step<'_>],
        kv: &DeviceKv,
        block_size: usize,
        logits: &mut Vec<f32>,
    ) -> std::result::Result<(), EngineError> {
        logits.clear();
        let values = self.forward_tensors(c, steps, kv, block_size)?;
        if let Some(values) = values {
            logits.extend(values.flatten_all().and_then(|v| v.to_vec1::<f32>()).map_err(device_error)?);
        }
        Ok(())
    }

    fn forward_tensors(
        &self,
        c: &LlamaConfig,
        steps: &[Step<'_>],
        kv: &DeviceKv,
        bs: usize,
    ) -> std::result::Result<Option<Tensor>, EngineError> {
        let layers = (0..c.n_layer).map(|l| kv.layer(l)).collect::<std::result::Result<Vec<_>, _>>()?;
        self.run(c, steps, &layers, bs).map_err(device_error)
    }

    fn run(&self, c: &LlamaConfig, steps: &[Step<'_>], kv: &[(Tensor, Tensor)], bs: usize) -> Result<Option<Tensor>> {
        let dev = &self.device;
        let slot = |st: &Step<'_>, pos: usize| st.blocks[pos / bs] * bs as u32 + (pos % bs) as u32;
        let (mut ids, mut positions, mut slots) = (Vec::new(), Vec::new(), Vec::new());
        for st in steps {
            for (j, &id) in st.tokens.iter().enumerate() {
                ids.push(id);
                positions.push((st.start + j) as u32);
                slots.push(slot(st, st.start + j));
            }
        }
        let t = ids.len();
        if t == 0 {
            return Ok(None);
        }
        let positions = Tensor::from_vec(positions, t, dev)?;
        let pairs = c.head_dim / 2;
        let cos = self.rope_cos.index_select(&positions, 0)?.reshape((t, 1, pairs))?;
        let sin = self.rope_sin.index_select(&positions, 0)?.reshape((t, 1, pairs))?;
        let kv_dim = c.kv_dim();
        let slots = Tensor::from_vec(slots, (t, 1), dev)?.broadcast_as((t, kv_dim))?.contiguous()?;
        let groups = AttentionGroups::new(steps, bs, dev)?;

        let mut x = self.token_embd.embedding(&Tensor::from_vec(ids, t, dev)?)?;
        for (li, layer) in self.layers.iter().enumerate() {
            let h = rms_norm(&x, &layer.attn_norm, c.rms_eps)?;
            let q = rope(&layer.wq.forward(&h)?.reshape((t, c.n_head, c.head_dim))?, &cos, &sin)?;
            let k = rope(&layer.wk.forward(&h)?.reshape((t, c.n_head_kv, c.head_dim))?, &cos, &sin)?;
            let v = layer.wv.forward(&h)?;
            let (keys, values) = &kv[li];
            keys.scatter_set(&slots, &k.reshape((t, kv_dim))?.to_dtype(DType::F16)?, 0)?;
            values.scatter_set(&slots, &v.to_dtype(DType::F16)?, 0)?;
            let attended = groups.attend(c, &q.reshape((t, c.n_head * c.head_dim))?, keys, values)?;
            x = (x + layer.wo.forward(&attended)?)?;
            let h = rms_norm(&x, &layer.ffn_norm, c.rms_eps)?;
            let gated = (layer.gate.forward(&h)?.silu()? * layer.up.forward(&h)?)?;
            x = (x + layer.down.forward(&gated)?)?;
        }
        // Logits only for the tokens whose steps want them (the last, or all).
        let mut rows = Vec::new();
        let mut offset = 0u32;
        for st in steps {
            let n = st.tokens.len() as u32;
            rows.extend(offset + n - st.rows() as u32..offset + n);
            offset += n;
        }
        if rows.is_empty() {
            return Ok(None);
        }
        let n_rows = rows.len();
        let last = x.index_select(&Tensor::from_vec(rows, n_rows, dev)?, 0)?;
        let h = rms_norm(&last, &self.output_norm, c.rms_eps)?;
        Ok(Some(self.output.forward(&h)?.to_dtype(DType::F32)?))
    }
}

/// `x` (tokens × width) RMS-normalised per row and scaled by `weight`.
fn rms_norm(x: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor> {
    let inv = (x.sqr()?.mean_keepdim(D::Minus1)? + f64::from(eps))?.sqrt()?.recip()?;
    x.broadcast_mul(&inv)?.broadcast_mul(weight)
}

/// Rotates each head's adjacent pairs `(2i, 2i+1)` of `x` (tokens × heads × width) by its
/// token's angles (`cos`, `sin`: tokens × 1 × pairs).
fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (t, heads, width) = x.dims3()?;
    let pairs = x.reshape((t, heads, width / 2, 2))?;
    let a = pairs.narrow(3, 0, 1)?.squeeze(3)?;
    let b = pairs.narrow(3, 1, 1)?.squeeze(3)?;
    let even = (a.broadcast_mul(cos)? - b.broadcast_mul(sin)?)?;
    let odd = (a.broadcast_mul(sin)? + b.broadcast_mul(cos)?)?;
    Tensor::stack(&[even, odd], 3)?.reshape((t, heads, width))
}

/// The batch's tokens grouped for attention: all decoding steps (one new token each) together,
/// each other step alone; with the cache slots each group reads and its causal mask.
struct AttentionGroups {
    groups: Vec<Group>,
    /// Token order of the groups' outputs put back in batch order.
    order: Option<Tensor>,
}

struct Group {
    /// Batch rows of the group's queries: `sequences × queries` of them.
    queries: Tensor,
    sequences: usize,
    n: usize,
    /// Slots of the keys each sequence attends to, padded to `keys`: `sequences × keys`.
    slots: Tensor,
    keys: usize,
    /// Additive mask, `sequences × 1 × 1 × n × keys`: 0 where a query sees a key, -inf elsewhere.
    mask: Tensor,
}

impl AttentionGroups {
    fn new(steps: &[Step<'_>], bs: usize, dev: &Device) -> Result<Self> {
        let mut first = 0u32;
        let mut members: Vec<(Vec<usize>, usize)> = Vec::new();
        let mut decoding = Vec::new();
        let mut starts = Vec::with_capacity(steps.len());
        for (i, st) in steps.iter().enumerate() {
            starts.push(first);
            first += st.tokens.len() as u32;
            if st.tokens.len() == 1 {
                decoding.push(i);
            } else {
                members.push((vec![i], st.tokens.len()));
            }
        }
        if !decoding.is_empty() {
            members.insert(0, (decoding, 1));
        }
        let mut batch_rows: Vec<u32> = Vec::new();
        let mut groups = Vec::new();
        for (seqs, n) in members {
            let keys = seqs.iter().map(|&i| steps[i].start + n).max().unwrap_or(0);
            let mut queries = Vec::with_capacity(seqs.len() * n);
            let mut slots = Vec::with_capacity(seqs.len() * keys);
            let mut mask = Vec::with_capacity(seqs.len() * n * keys);
            for &i in &seqs {
                let st = &steps[i];
                queries.extend(starts[i]..starts[i] + n as u32);
                slots.extend(
                    (0..keys).map(
                        |p| {
                            if p < st.start + n { st.blocks[p / bs] * bs as u32 + (p % bs) as u32 } else { 0 }
                        },
                    ),
                );
                for j in 0..n {
                    mask.extend((0..keys).map(|p| if p <= st.start + j { 0f32 } else { f32::NEG_INFINITY }));
                }
            }
            batch_rows.extend(&queries);
            let sequences = seqs.len();
            groups.push(Group {
                queries: Tensor::from_vec(queries, sequences * n, dev)?,
                sequences,
                n,
                slots: Tensor::from_vec(slots, sequences * keys, dev)?,
                keys,
                mask: Tensor::from_vec(mask, (sequences, 1, 1, n, keys), dev)?,
            });
        }
        // Where each batch row landed among the groups' outputs.
        let in_order = batch_rows.windows(2).all(|w| w[0] < w[1]);
        let order = if in_order {
            None
        } else {
            let mut at = vec![0u32; batch_rows.len()];
            for (k, &row) in batch_rows.iter().enumerate() {
                at[row as usize] = k as u32;
            }
            let n = at.len();
            Some(Tensor::from_vec(at, n, dev)?)
        };
        Ok(Self { groups, order })
    }

    /// Attention of every query row of `q` (tokens × heads·width) over its sequence's cached
    /// keys and values (`slots × kv_dim` f16), in batch order.
    fn attend(&self, c: &LlamaConfig, q: &Tensor, keys: &Tensor, values: &Tensor) -> Result<Tensor> {
        let (hd, kvh) = (c.head_dim, c.n_head_kv);
        let group = c.n_head / kvh;
        let scale = 1.0 / (hd as f64).sqrt();
        let mut outs = Vec::with_capacity(self.groups.len());
        for g in &self.groups {
            let (b, n, l) = (g.sequences, g.n, g.keys);
            let gather = |cache: &Tensor| -> Result<Tensor> {
                cache
                    .index_select(&g.slots, 0)?
                    .to_dtype(DType::F32)?
                    .reshape((b, l, kvh, hd))?
                    .transpose(1, 2)?
                    .contiguous()
            };
            let (k, v) = (gather(keys)?, gather(values)?);
            // Queries of one KV head's group of query heads together: b × kvh × (group·n) × hd.
            let queries = q
                .index_select(&g.queries, 0)?
                .reshape((b, n, kvh, group, hd))?
                .permute((0, 2, 3, 1, 4))?
                .contiguous()?
                .reshape((b, kvh, group * n, hd))?;
            let scores = (queries.matmul(&k.t()?)? * scale)?.reshape((b, kvh, group, n, l))?.broadcast_add(&g.mask)?;
            let weights = softmax_last(&scores)?.reshape((b, kvh, group * n, l))?;
            let out = weights
                .matmul(&v)?
                .reshape((b, kvh, group, n, hd))?
                .permute((0, 3, 1, 2, 4))?
                .contiguous()?
                .reshape((b * n, c.n_head * hd))?;
            outs.push(out);
        }
        let all = Tensor::cat(&outs, 0)?;
        match &self.order {
            Some(order) => all.index_select(order, 0),
            None => Ok(all),
        }
    }
}

fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let exp = x.broadcast_sub(&x.max_keepdim(D::Minus1)?)?.exp()?;
    exp.broadcast_div(&exp.sum_keepdim(D::Minus1)?)
}
