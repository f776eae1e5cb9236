//! Decode benchmark on the real SmolLM2-135M-Instruct Q4_1 model:
//! time to first token and decode tokens/s for one stream, and aggregate decode tokens/s for
//! N streams decoding together in one batch; then time to first token with a shared ~1,000-token
//! system prompt, cold (nothing cached) and warm (the prefix cache holds it); and single-stream
//! decode with that ~1,000-token context; and decode with and without a JSON-schema grammar
//! (constrained decoding), interleaved.
//!
//! `cargo bench -p mantle-engine --bench decode -- [--tokens 128] [--streams 1,4,16,64] [--threads N]
//! [--device cpu|cuda|candle-cpu]` (threads 0: one per core; `cuda` needs `--features cuda`). The model comes from scripts/fetch-models.sh (`$MANTLE_CACHE/models`).
//! `scripts/bench-engine.sh` runs this next to llama.cpp on the same inputs.

use std::path::PathBuf;
use std::time::Instant;

use mantle_engine::kv_cache::BlockTable;
use mantle_engine::{
    Backend, ChatMessage, Event, GenerateRequest, Grammar, Sampler, SamplingParams, Scheduler, SchedulerConfig,
    Scratch, Step, TextModel,
};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let tokens: usize = flag("--tokens").and_then(|v| v.parse().ok()).unwrap_or(128);
    let threads: usize = flag("--threads").and_then(|v| v.parse().ok()).unwrap_or(0);
    let streams: Vec<usize> = flag("--streams")
        .map(|v| v.split(',').filter_map(|s| s.parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 4, 16, 64]);
    let models = std::env::var("MANTLE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/mantle"))
        .join("models");
    let path = models.join("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let device = flag("--device").unwrap_or_else(|| "cpu".into());
    let backend = Backend::parse(&device).unwrap_or_else(|e| panic!("--device {device}: {e}"));
    let model = TextModel::load_on(&path, None, threads, &backend)
        .unwrap_or_else(|e| panic!("{}: {e} (run scripts/fetch-models.sh)", path.display()));
    println!(
        "device: {}, kernels: {}, threads: {}",
        model.model.device_name(),
        mantle_engine::quant::kernels().name,
        model.model.threads()
    );
    let prompt = model
        .chat_prompt(&[ChatMessage::new("user", "Write a short story about a lighthouse keeper.")])
        .expect("prompt");

    let mut single = None;
    for &n in &streams {
        let per_seq = (prompt.len() + tokens).div_ceil(16) + 1;
        let mut cache = model.model.new_cache(16, per_seq * n).expect("KV cache");
        let mut tables: Vec<BlockTable> = (0..n).map(|_| BlockTable::default()).collect();
        let mut scratch = Scratch::default();
        let mut samplers: Vec<Sampler> = (0..n).map(|_| Sampler::new(SamplingParams::default())).collect();
        let rows: Vec<usize> = (0..n).collect();
        for t in &mut tables {
            t.reserve(&mut cache, prompt.len() + tokens).expect("cache sized for the run");
        }
        let start = Instant::now();
        let steps: Vec<Step> = tables
            .iter()
            .map(|t| Step { tokens: &prompt, start: 0, blocks: t.blocks(), logits: true, all_logits: false })
            .collect();
        let mut logits = model.model.forward(&steps, &mut cache, &mut scratch).expect("forward");
        let ttft = start.elapsed();
        let decode_start = Instant::now();
        let mut next: Vec<u32> = model
            .model
            .sample(&logits, &rows, &mut samplers.iter_mut().collect::<Vec<_>>())
            .iter()
            .map(|s| s.token)
            .collect();
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
                    all_logits: false,
                })
                .collect();
            logits = model.model.forward(&steps, &mut cache, &mut scratch).expect("forward");
            next = model
                .model
                .sample(&logits, &rows, &mut samplers.iter_mut().collect::<Vec<_>>())
                .iter()
                .map(|s| s.token)
                .collect();
        }
        let decode = decode_start.elapsed().as_secs_f64();
        let rate = (n * (tokens - 1)) as f64 / decode;
        println!(
            "mantle    streams {n:>3}: prompt {} tokens, time to first token {:>7.1} ms, decode {:>7.1} tokens/s aggregate ({:.1} per stream)",
            prompt.len(),
            ttft.as_secs_f64() * 1e3,
            rate,
            rate / n as f64
        );
        match single {
            None if n == 1 => single = Some(rate),
            // The bar: 16 streams at 3x or more of one stream's rate.
            Some(one) => println!("mantle    streams {n:>3}: {:.2}x the single-stream rate", rate / one),
            None => {}
        }
    }

    let model = std::sync::Arc::new(model);
    let rounds: usize = flag("--constrained-rounds").and_then(|v| v.parse().ok()).unwrap_or(5);
    if rounds > 0 {
        constrained(&model, tokens, rounds);
    }
    prefix_cache(model);
}

/// Decode tokens/s through the scheduler with and without a JSON-schema grammar, for 1 and 16
/// streams: `rounds` interleaved runs of each, reported as the median ratio and its range.
/// The schema (an array of at least 100 person objects) cannot complete within the run, so every
/// step of every stream computes a mask, through keys, strings, numbers and enums.
fn constrained(model: &std::sync::Arc<TextModel>, tokens: usize, rounds: usize) {
    let schema = serde_json::json!({
        "type": "array", "minItems": 100,
        "items": {
            "type": "object", "additionalProperties": false, "required": ["name", "age", "city", "languages"],
            "properties": {
                "name": {"type": "string", "maxLength": 24},
                "age": {"type": "integer", "minimum": 0, "maximum": 120},
                "city": {"type": "string"},
                "languages": {"type": "array", "items": {"enum": ["English", "French", "German", "Spanish"]}}
            }
        }
    });
    let prompt = model
        .chat_prompt(&[ChatMessage::new("user", "List one hundred people with their name, age, city and languages.")])
        .expect("prompt");
    // Aggregate decode tokens/s of `n` streams (from each stream's first token to its end).
    let run = |n: usize, grammar: bool| {
        let mut scheduler = Scheduler::new(model.clone(), SchedulerConfig::default()).expect("scheduler");
        for id in 0..n as u64 {
            let constraint = grammar
                .then(|| model.compile_grammar(&Grammar::JsonSchema(schema.clone())).expect("the schema compiles"));
            let request = GenerateRequest { constraint, ..GenerateRequest::greedy(id, prompt.clone(), tokens) };
            scheduler.add(request).expect("fits");
        }
        let (mut first, mut generated) = (None, 0usize);
        while scheduler.has_work() {
            for event in scheduler.step() {
                if let Event::Token { .. } = event {
                    if first.is_none() {
                        first = Some(Instant::now());
                    } else {
                        generated += 1;
                    }
                }
            }
        }
        // The first step's other streams produce their first token with it; count from there.
        (generated + 1).saturating_sub(n) as f64 / first.map_or(1e-9, |f| f.elapsed().as_secs_f64())
    };
    let _ = model.compile_grammar(&Grammar::JsonSchema(schema.clone())); // builds the token trie
    for n in [1usize, 16] {
        run(n, false);
        run(n, true);
        let (mut free, mut with, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..rounds {
            let a = run(n, false);
            let b = run(n, true);
            free.push(a);
            with.push(b);
            ratios.push(b / a);
        }
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        println!(
            "constrained streams {n:>3}: decode {:.1} tokens/s without a schema, {:.1} with (medians of {rounds}); \
             with/without {:.3} (range {:.3}-{:.3})",
            median(&mut free),
            median(&mut with),
            median(&mut ratios),
            ratios[0],
            ratios[ratios.len() - 1]
        );
    }
}

/// Time to first token of a request whose ~1,000-token system prompt is (warm) or is not (cold)
/// in the prefix cache.
fn prefix_cache(model: std::sync::Arc<TextModel>) {
    let system = "You are the support assistant of ACME Corp. Follow these policies. ".to_string()
        + &"Refunds are granted within thirty days of purchase when the item is unused and in its original packaging. "
            .repeat(45);
    let mut scheduler = Scheduler::new(model.clone(), SchedulerConfig::default()).expect("scheduler");
    // (time to first token, decode tokens/s after it, prompt tokens) of one request.
    let mut run = |question: &str, id: u64, max_tokens: usize| {
        let prompt = model
            .chat_prompt(&[ChatMessage::new("system", &system), ChatMessage::new("user", question)])
            .expect("prompt");
        let tokens = prompt.len();
        let request = GenerateRequest::greedy(id, prompt, max_tokens);
        scheduler.add(request).expect("fits");
        let start = Instant::now();
        let (mut first, mut generated) = (None, 0);
        loop {
            for event in scheduler.step() {
                match event {
                    Event::Token { .. } => {
                        generated += 1;
                        first.get_or_insert_with(Instant::now);
                    }
                    Event::Finished { .. } => {
                        let first = first.unwrap_or_else(Instant::now);
                        let rate = (generated.max(1) - 1) as f64 / first.elapsed().as_secs_f64().max(1e-9);
                        return ((first - start).as_secs_f64() * 1e3, rate, tokens);
                    }
                    Event::PromptLogprobs { .. } => {}
                    Event::Failed { error, .. } => panic!("the request failed: {error}"),
                }
            }
        }
    };
    let (cold, _, tokens) = run("Can I return a used kettle?", 1, 1);
    let (warm, _, _) = run("Can I return shoes after six weeks?", 2, 1);
    println!(
        "prefix cache: prompt {tokens} tokens, time to first token cold {cold:.1} ms, warm {warm:.1} ms ({:.1}x faster)",
        cold / warm
    );
    // One stream decoding with ~1,000 tokens of context (attention reads as much as a third of
    // what the weights take per token).
    let (_, rate, _) = run("Write a long answer about returning a kettle.", 3, 128);
    println!("long context: prompt {tokens} tokens, decode {rate:.1} tokens/s (1 stream)");
}
