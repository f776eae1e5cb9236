//! Scoring a prompt on the real model (what `/v1/completions` with `echo` and `logprobs` serves,
//! and evaluation harnesses use to compute a perplexity): every prompt token's log-probability
//! given the tokens before it, the same whether the prompt is prefilled at once or in chunks,
//! agreeing with what greedy generation chose and reported.

use std::collections::HashMap;

use mantle_engine::test_support as support;
use mantle_engine::{Event, GenerateRequest, SamplingParams, Scheduler, SchedulerConfig, sampling::TokenScore};

const TEXT: &str = "The quick brown fox jumps over the lazy dog. It was a bright cold day in April, and the clocks \
                    were striking thirteen.";

fn scoring(id: u64, prompt: Vec<u32>, top: usize) -> GenerateRequest {
    GenerateRequest {
        sampling: SamplingParams { top_logprobs: top, ..Default::default() },
        prompt_logprobs: true,
        ..GenerateRequest::greedy(id, prompt, 1)
    }
}

/// Runs the scheduler until idle: each request's prompt scores (in position order, checked
/// contiguous, and before any generated token of the `scoring` requests) and its generated
/// (token, logprob, top) triples.
#[allow(clippy::type_complexity)]
fn run(
    scheduler: &mut Scheduler,
    scoring: &[u64],
) -> HashMap<u64, (Vec<TokenScore>, Vec<(u32, f32, Vec<(u32, f32)>)>)> {
    let mut out: HashMap<u64, (Vec<TokenScore>, Vec<(u32, f32, Vec<(u32, f32)>)>)> = HashMap::new();
    while scheduler.has_work() {
        for event in scheduler.step() {
            match event {
                Event::PromptLogprobs { id, first_position, tokens } => {
                    let scores = &mut out.entry(id).or_default().0;
                    assert_eq!(first_position, scores.len(), "prompt scores arrive in order, each once");
                    scores.extend(tokens);
                }
                Event::Token { id, token, logprob, top, .. } => {
                    let entry = out.entry(id).or_default();
                    assert!(
                        !scoring.contains(&id) || !entry.0.is_empty(),
                        "prompt scores come before generated tokens"
                    );
                    entry.1.push((token, logprob, top));
                }
                Event::Finished { .. } => {}
                Event::Failed { id, error } => panic!("request {id} failed: {error}"),
            }
        }
    }
    out
}

#[test]
fn a_prompt_scores_the_same_in_one_pass_or_in_chunks() {
    let model = support::smollm2();
    let prompt = model.tokenizer.encode(TEXT).unwrap();
    assert!(prompt.len() > 20, "{} tokens", prompt.len());
    let mut one = Scheduler::new(model.clone(), SchedulerConfig::default()).expect("scheduler");
    one.add(scoring(1, prompt.clone(), 3)).unwrap();
    let (scores, generated) = run(&mut one, &[1]).remove(&1).unwrap();
    assert_eq!(scores.len(), prompt.len(), "one score per prompt token");
    assert_eq!(scores.iter().map(|s| s.token).collect::<Vec<_>>(), prompt);
    assert_eq!((scores[0].logprob, scores[0].top.len()), (0.0, 0), "the first token has no context");
    for s in &scores[1..] {
        assert!(s.logprob < 0.0 && s.logprob.is_finite(), "{s:?}");
        assert_eq!(s.top.len(), 3);
        assert!(s.top.windows(2).all(|w| w[0].1 >= w[1].1), "most likely first: {s:?}");
        assert!(s.top[0].1 >= s.logprob - 1e-4, "nothing beats the top token: {s:?}");
    }
    // Natural English: the model should find it far likelier than chance (ln 1/49152 ≈ -10.8).
    let mean = scores[1..].iter().map(|s| s.logprob as f64).sum::<f64>() / (scores.len() - 1) as f64;
    assert!(mean > -6.0, "mean log-probability {mean}");
    assert_eq!(generated.len(), 1);

    // Prefilled 5 tokens a step, beside an unrelated request, with the prefix cache warm from
    // the first run: the same scores.
    let mut chunked = Scheduler::new(model.clone(), SchedulerConfig { max_batch_tokens: 5, ..Default::default() })
        .expect("scheduler");
    chunked.add(support::ask(7, "Say hi.", 4)).unwrap();
    chunked.add(scoring(2, prompt.clone(), 3)).unwrap();
    chunked.add(scoring(3, prompt.clone(), 3)).unwrap();
    let mut runs = run(&mut chunked, &[2, 3]);
    for id in [2, 3] {
        let (again, _) = runs.remove(&id).unwrap();
        assert_eq!(again.len(), scores.len());
        for (a, b) in again.iter().zip(&scores) {
            assert_eq!(a.token, b.token);
            assert!((a.logprob - b.logprob).abs() < 2e-3, "{a:?} vs {b:?}");
            assert_eq!(a.top.iter().map(|t| t.0).collect::<Vec<_>>(), b.top.iter().map(|t| t.0).collect::<Vec<_>>());
        }
    }
}

#[test]
fn scoring_a_greedy_reply_finds_each_token_the_most_likely_with_the_logprob_it_was_drawn_with() {
    let model = support::smollm2();
    let mut scheduler = Scheduler::new(model.clone(), SchedulerConfig::default()).expect("scheduler");
    let question = support::ask(1, "Name three colours.", 12);
    let asked = question.prompt.clone();
    scheduler
        .add(GenerateRequest { sampling: SamplingParams { top_logprobs: 2, ..Default::default() }, ..question })
        .unwrap();
    let (_, generated) = run(&mut scheduler, &[]).remove(&1).unwrap();
    assert!(generated.len() > 3);
    for (token, logprob, top) in &generated {
        assert_eq!(top[0].0, *token, "greedy draws the most likely token");
        assert!((top[0].1 - logprob).abs() < 1e-6);
    }
    // The prompt followed by the reply, scored: each reply token is the top one at its place
    // (what lm-evaluation-harness calls is_greedy), with the same log-probability.
    let mut text = asked.clone();
    text.extend(generated.iter().map(|g| g.0));
    scheduler.add(scoring(2, text.clone(), 1)).unwrap();
    let (scores, _) = run(&mut scheduler, &[2]).remove(&2).unwrap();
    for (score, (token, logprob, _)) in scores[asked.len()..].iter().zip(&generated) {
        assert_eq!((score.token, score.top[0].0), (*token, *token));
        assert!((score.logprob - logprob).abs() < 2e-3, "{score:?} vs {logprob}");
    }
}
