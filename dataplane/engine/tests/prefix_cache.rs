//! Prefix caching on the real model: a shared system prompt is computed once, later requests
//! reuse its blocks and produce exactly what they would without the cache, and a corrupted cached
//! block is caught by its checksum and recomputed. Blocks are shared only between requests with
//! the same cache salt.

use mantle_engine::test_support as support;
use mantle_engine::{ChatMessage, Event, GenerateRequest, Scheduler, SchedulerConfig, Usage};

fn system_prompt() -> String {
    "You are the support assistant of ACME Corp. ".to_string()
        + &"Answer politely, cite the relevant policy, and never share customer data. ".repeat(12)
}

fn request(id: u64, question: &str) -> GenerateRequest {
    let model = support::smollm2();
    GenerateRequest::greedy(
        id,
        model.chat_prompt(&[ChatMessage::new("system", &system_prompt()), ChatMessage::new("user", question)]).unwrap(),
        16,
    )
}

/// Runs one request to the end: its generated tokens and usage.
fn run_one(s: &mut Scheduler, req: GenerateRequest) -> (Vec<u32>, Usage) {
    let id = req.id;
    s.add(req).unwrap();
    let mut tokens = Vec::new();
    loop {
        for event in s.step() {
            match event {
                Event::Token { id: i, token, .. } if i == id => tokens.push(token),
                Event::Finished { id: i, usage, .. } if i == id => return (tokens, usage),
                _ => {}
            }
        }
    }
}

fn fresh() -> Scheduler {
    Scheduler::new(support::smollm2(), SchedulerConfig::default()).expect("scheduler")
}

#[test]
fn a_shared_system_prompt_is_computed_once_and_reused() {
    let (expected, cold) = run_one(&mut fresh(), request(2, "How do I reset my password?"));
    assert_eq!(cold.cached_tokens, 0);

    let mut s = fresh();
    run_one(&mut s, request(1, "Where is my order?"));
    assert!(s.stats().cached_blocks > 0);
    let (tokens, warm) = run_one(&mut s, request(2, "How do I reset my password?"));
    assert_eq!(tokens, expected, "reused blocks give exactly the same output");
    let system_tokens = support::smollm2().tokenizer.encode(&system_prompt()).unwrap().len();
    // Whole blocks of 16 are shared: everything up to the last block boundary inside the prefix.
    assert!(
        warm.cached_tokens >= system_tokens / 16 * 16,
        "{} cached of a {system_tokens}-token system prompt",
        warm.cached_tokens
    );
    assert_eq!(warm.input_tokens, cold.input_tokens);
}

fn salted(id: u64, question: &str, salt: &str) -> GenerateRequest {
    GenerateRequest { cache_salt: salt.into(), ..request(id, question) }
}

#[test]
fn another_cache_salt_finds_nothing_and_the_same_salt_reuses() {
    let (expected, _) = run_one(&mut fresh(), salted(2, "How do I reset my password?", "tenant-b"));
    let mut s = fresh();
    run_one(&mut s, salted(1, "Where is my order?", "tenant-a"));
    let cached = s.stats().cached_blocks;
    assert!(cached > 0);

    let (tokens, other) = run_one(&mut s, salted(2, "How do I reset my password?", "tenant-b"));
    assert_eq!(other.cached_tokens, 0, "tenant-b must not read tenant-a's cached prompt");
    assert_eq!(tokens, expected, "computed afresh, the same output");
    assert_eq!(s.stats().prefix_hit_tokens, 0);
    assert!(s.stats().cached_blocks > cached, "tenant-b's blocks are cached apart from tenant-a's");

    let (_, unsalted) = run_one(&mut s, request(3, "How do I reset my password?"));
    assert_eq!(unsalted.cached_tokens, 0, "nor does a request without a salt");
    let (_, same) = run_one(&mut s, salted(4, "Anything else?", "tenant-a"));
    assert!(same.cached_tokens >= 64, "tenant-a reuses its own prompt: {} cached", same.cached_tokens);
    let (_, again) = run_one(&mut s, salted(5, "Anything else?", "tenant-b"));
    assert!(again.cached_tokens >= 64, "and so does tenant-b: {} cached", again.cached_tokens);
}

#[test]
fn a_corrupted_cached_block_is_detected_and_recomputed_with_the_same_output() {
    let (expected, _) = run_one(&mut fresh(), request(2, "How do I reset my password?"));
    let mut s = fresh();
    run_one(&mut s, request(1, "Where is my order?"));
    assert!(s.corrupt_cached_block(3), "flip a bit inside the shared system prompt");
    let (tokens, usage) = run_one(&mut s, request(2, "How do I reset my password?"));
    assert_eq!(tokens, expected, "the corrupt block was recomputed, not used");
    assert!(s.stats().kv_corruptions >= 1);
    assert!(usage.cached_tokens <= 3 * 16, "reuse stops at the corrupt block");
}

#[test]
fn the_background_sweep_finds_corruption_in_idle_cached_blocks() {
    let mut s = fresh();
    run_one(&mut s, request(1, "Where is my order?"));
    let cached = s.stats().cached_blocks;
    s.corrupt_cached_block(0);
    s.sweep(usize::MAX);
    assert_eq!(s.stats().kv_corruptions, 1);
    assert_eq!(s.stats().cached_blocks, cached - 1);
}
