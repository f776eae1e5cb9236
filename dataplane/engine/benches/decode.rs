//! Decode benchmark on the real SmolLM2-135M-Instruct Q4_1 model:
//! time to first token and decode tokens/s for one stream, and aggregate decode tokens/s for
//! N streams decoding together in one batch.
//!
//! `cargo bench -p mantle-engine --bench decode -- [--tokens 128] [--streams 1,4,16,64]`
//! Thread count: `RAYON_NUM_THREADS` (default: all cores). The model comes from
//! scripts/fetch-models.sh (`$MANTLE_CACHE/models`).

use std::path::PathBuf;
use std::time::Instant;

use mantle_engine::kv_cache::{BlockTable, KvCache};
use mantle_engine::{ChatMessage, Sampler, SamplingParams, Scratch, Step, TextModel};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let tokens: usize = flag("--tokens").and_then(|v| v.parse().ok()).unwrap_or(128);
    let streams: Vec<usize> = flag("--streams")
        .map(|v| v.split(',').filter_map(|s| s.parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 4, 16, 64]);
    let models = std::env::var("MANTLE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/mantle"))
        .join("models");
    let path = models.join("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let model = TextModel::load(&path, None, 0)
        .unwrap_or_else(|e| panic!("{}: {e} (run scripts/fetch-models.sh)", path.display()));
    println!("kernels: {}, threads: {}", mantle_engine::quant::kernels().name, model.model.threads());
    let prompt = model
        .chat_prompt(&[ChatMessage::new("user", "Write a short story about a lighthouse keeper.")])
        .expect("prompt");

    for &n in &streams {
        let c = &model.model.config;
        let per_seq = (prompt.len() + tokens).div_ceil(16) + 1;
        let mut cache = KvCache::new(c.n_layer, c.kv_dim(), 16, per_seq * n);
        let mut tables: Vec<BlockTable> = (0..n).map(|_| BlockTable::default()).collect();
        let mut scratch = Scratch::default();
        let mut samplers: Vec<Sampler> = (0..n).map(|_| Sampler::new(SamplingParams::default())).collect();
        for t in &mut tables {
            t.reserve(&mut cache, prompt.len() + tokens).expect("cache sized for the run");
        }
        let start = Instant::now();
        let steps: Vec<Step> =
            tables.iter().map(|t| Step { tokens: &prompt, start: 0, blocks: t.blocks(), logits: true }).collect();
        let mut logits = model.model.forward(&steps, &mut cache, &mut scratch);
        let ttft = start.elapsed();
        let decode_start = Instant::now();
        let mut next: Vec<u32> = logits.iter().zip(&mut samplers).map(|(l, s)| s.sample(l).token).collect();
        for i in 1..tokens {
            let pos = prompt.len() + i - 1;
            let steps: Vec<Step> = tables
                .iter()
                .zip(&next)
                .map(|(t, tok)| Step {
                    tokens: std::slice::from_ref(tok),
                    start: pos,
                    blocks: t.blocks(),
                    logits: true,
                })
                .collect();
            logits = model.model.forward(&steps, &mut cache, &mut scratch);
            next = logits.iter().zip(&mut samplers).map(|(l, s)| s.sample(l).token).collect();
        }
        let decode = decode_start.elapsed().as_secs_f64();
        let rate = (n * (tokens - 1)) as f64 / decode;
        println!(
            "streams {n:>3}: prompt {} tokens, time to first token {:>7.1} ms, decode {:>7.1} tokens/s aggregate ({:.1} per stream)",
            prompt.len(),
            ttft.as_secs_f64() * 1e3,
            rate,
            rate / n as f64
        );
    }
}
