//! Continuous batching on the real model: sequences that share batches, get prefilled in chunks,
//! are preempted, cancelled or stopped behave exactly as if each ran alone.

use mantle_engine::test_support as support;

use std::collections::HashMap;

use mantle_engine::{EngineError, Event, FinishReason, GenerateRequest, Scheduler, SchedulerConfig};

fn request(id: u64, question: &str, max_tokens: usize) -> GenerateRequest {
    support::ask(id, question, max_tokens)
}

#[derive(Default, Debug, Clone, PartialEq)]
struct Outcome {
    tokens: Vec<u32>,
    text: String,
    reason: Option<FinishReason>,
}

/// Runs the scheduler until idle; returns each request's outcome and the order they finished.
fn run(scheduler: &mut Scheduler) -> (HashMap<u64, Outcome>, Vec<u64>) {
    run_with(scheduler, |_| {})
}

/// [`run`], calling `after_step` after every step (for fault injection).
fn run_with(
    scheduler: &mut Scheduler,
    mut after_step: impl FnMut(&mut Scheduler),
) -> (HashMap<u64, Outcome>, Vec<u64>) {
    let mut outcomes: HashMap<u64, Outcome> = HashMap::new();
    let mut finished = Vec::new();
    let mut steps = 0;
    while scheduler.has_work() {
        steps += 1;
        assert!(steps < 10_000, "scheduler made no progress");
        for event in scheduler.step() {
            match event {
                Event::Token { id, token, text, .. } => {
                    let o = outcomes.entry(id).or_default();
                    o.tokens.push(token);
                    o.text.push_str(&text);
                }
                Event::Finished { id, reason, .. } => {
                    outcomes.entry(id).or_default().reason = Some(reason);
                    finished.push(id);
                }
                Event::PromptLogprobs { .. } => {}
                Event::Failed { id, error } => panic!("request {id} failed: {error}"),
            }
        }
        after_step(scheduler);
    }
    (outcomes, finished)
}

const QUESTIONS: [&str; 5] = [
    "What is the capital of France? Answer in one sentence.",
    "Name the largest ocean on Earth.",
    "Write a haiku about the sea.",
    "What is 2 + 2?",
    "List three colors of the rainbow.",
];

fn alone(question: &str, max_tokens: usize) -> Outcome {
    let mut s = Scheduler::new(support::smollm2(), SchedulerConfig::default()).expect("scheduler");
    s.add(request(0, question, max_tokens)).unwrap();
    run(&mut s).0.remove(&0).unwrap()
}

#[test]
fn sequences_batched_together_generate_what_each_would_alone() {
    let expected: Vec<Outcome> = QUESTIONS.iter().map(|q| alone(q, 24)).collect();
    let mut s = Scheduler::new(support::smollm2(), SchedulerConfig::default()).expect("scheduler");
    for (i, q) in QUESTIONS.iter().enumerate() {
        s.add(request(i as u64, q, 24)).unwrap();
    }
    let (outcomes, _) = run(&mut s);
    for (i, e) in expected.iter().enumerate() {
        assert_eq!(&outcomes[&(i as u64)], e, "request {i}");
    }
    assert!(expected[0].text.contains("Paris"), "{:?}", expected[0].text);
    let stats = s.stats();
    assert_eq!(stats.free_blocks, stats.total_blocks, "every block is back");
}

#[test]
fn a_long_prompt_is_prefilled_in_chunks_while_others_keep_decoding() {
    let config = SchedulerConfig { max_batch_tokens: 24, ..Default::default() };
    let mut s = Scheduler::new(support::smollm2(), config).expect("scheduler");
    s.add(request(1, "Count from one to twenty in words.", 40)).unwrap();
    // Let the first request finish its prompt and start decoding.
    while !s.step().iter().any(|e| matches!(e, Event::Token { id: 1, .. })) {}
    let long_question = "Summarise this: ".to_string() + &"The quick brown fox jumps over the lazy dog. ".repeat(12);
    s.add(request(2, &long_question, 4)).unwrap();
    let mut steps_with_a_token_for_1 = 0;
    let mut steps = 0;
    loop {
        let events = s.step();
        steps += 1;
        if events.iter().any(|e| matches!(e, Event::Token { id: 1, .. })) {
            steps_with_a_token_for_1 += 1;
        }
        if events.iter().any(|e| matches!(e, Event::Token { id: 2, .. })) {
            break;
        }
    }
    assert!(steps >= 5, "a ~150-token prompt takes several 24-token steps, took {steps}");
    assert_eq!(steps_with_a_token_for_1, steps, "the decoding sequence got a token in every step");
}

const LONG_ANSWERS: [&str; 3] =
    ["Write a short story about a robot.", "Count from one to twenty in words.", "Explain how rain forms."];

/// Three 48-token generations that do not fit a 12-block cache together, so some are preempted.
fn run_preempting(config: SchedulerConfig, corrupt_a_swap: bool) -> Scheduler {
    let expected: Vec<Outcome> = LONG_ANSWERS.iter().map(|q| alone(q, 48)).collect();
    assert!(expected.iter().all(|o| o.tokens.len() == 48), "each answer runs to max_tokens");
    let mut s = Scheduler::new(support::smollm2(), SchedulerConfig { num_blocks: 12, ..config }).expect("scheduler");
    for (i, q) in LONG_ANSWERS.iter().enumerate() {
        s.add(request(i as u64, q, 48)).unwrap();
    }
    let mut corrupted = false;
    let (outcomes, _) = run_with(&mut s, |s| {
        if corrupt_a_swap && !corrupted {
            corrupted = s.corrupt_swapped_block();
        }
    });
    assert_eq!(corrupted, corrupt_a_swap, "a swapped copy existed to corrupt");
    for (i, e) in expected.iter().enumerate() {
        assert_eq!(&outcomes[&(i as u64)], e, "request {i}");
    }
    let stats = s.stats();
    assert!(stats.preemptions > 0, "the cache was too small for all three");
    assert_eq!((stats.free_blocks, stats.swap_bytes), (12, 0), "every block and every host copy is released");
    s
}

#[test]
fn preempted_sequences_swap_to_host_memory_and_resume_with_the_same_text() {
    let s = run_preempting(SchedulerConfig::default(), false);
    assert!(s.stats().swaps_out > 0, "preemption saved blocks to host memory");
    assert_eq!(s.stats().kv_corruptions, 0);
}

#[test]
fn without_swap_space_preempted_sequences_recompute_the_same_text() {
    let s = run_preempting(SchedulerConfig { swap_bytes: 0, ..Default::default() }, false);
    assert_eq!(s.stats().swaps_out, 0);
}

#[test]
fn a_corrupted_host_copy_is_caught_on_swap_in_and_recomputed() {
    let s = run_preempting(SchedulerConfig::default(), true);
    assert!(s.stats().kv_corruptions >= 1);
}

#[test]
fn higher_priority_requests_run_first() {
    let config = SchedulerConfig { max_running: 1, ..Default::default() };
    let mut s = Scheduler::new(support::smollm2(), config).expect("scheduler");
    let mut low = request(1, QUESTIONS[1], 8);
    low.priority = 0;
    let mut high = request(2, QUESTIONS[3], 8);
    high.priority = 3;
    s.add(low).unwrap();
    s.add(high).unwrap();
    let (_, finished) = run(&mut s);
    assert_eq!(finished, vec![2, 1]);
}

/// Batch work yields to real-time work: while a normal-priority prompt is prefilled, the
/// low-priority sequences, decoding or prefilling, sit the step out; and each still says exactly
/// what it says alone.
#[test]
fn low_priority_sequences_sit_out_the_steps_that_prefill_a_higher_priority_prompt() {
    let mut s = Scheduler::new(support::smollm2(), SchedulerConfig::default()).expect("scheduler");
    let mut outcomes: HashMap<u64, Outcome> = HashMap::new();
    let record = |events: Vec<Event>, outcomes: &mut HashMap<u64, Outcome>| {
        let mut stepped = Vec::new();
        for event in events {
            if let Event::Token { id, token, text, .. } = event {
                let o = outcomes.entry(id).or_default();
                o.tokens.push(token);
                o.text.push_str(&text);
                stepped.push(id);
            }
        }
        stepped
    };
    for id in [1, 2] {
        let mut low = request(id, QUESTIONS[id as usize], 12);
        low.priority = 0;
        s.add(low).unwrap();
    }
    // The batch sequences prefill and decode a few tokens.
    for _ in 0..4 {
        let events = s.step();
        record(events, &mut outcomes);
    }
    assert!(outcomes[&1].tokens.len() >= 2 && outcomes[&2].tokens.len() >= 2, "the batch decodes: {outcomes:?}");
    // A batch prompt and a real-time prompt arrive together.
    let mut late = request(4, QUESTIONS[4], 12);
    late.priority = 0;
    s.add(late).unwrap();
    s.add(request(3, QUESTIONS[3], 12)).unwrap();
    // The real-time prompt's step: its first token, and nothing of the batch.
    let stepped = record(s.step(), &mut outcomes);
    assert_eq!(stepped, vec![3], "the batch sat out the real-time prefill step");
    // Then the batch prompt is prefilled, and the others decode.
    let mut stepped = record(s.step(), &mut outcomes);
    stepped.sort();
    assert_eq!(stepped, vec![1, 2, 3, 4]);
    while s.has_work() {
        record(s.step(), &mut outcomes);
    }
    for (id, question) in [(1, QUESTIONS[1]), (2, QUESTIONS[2]), (3, QUESTIONS[3]), (4, QUESTIONS[4])] {
        assert_eq!(outcomes[&id].text, alone(question, 12).text, "request {id} says what it says alone");
    }
}

/// A step of batch sequences gives way to a real-time arrival (the flag its queuer raises): it
/// stops, nothing of it advances, the arrival is prefilled next, and every reply is still what it
/// is alone. A step with real-time work in it is never given up.
#[test]
fn a_batch_step_gives_way_to_a_real_time_arrival_and_loses_nothing() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let mut s = Scheduler::new(support::smollm2(), SchedulerConfig::default()).expect("scheduler");
    let flag = Arc::new(AtomicBool::new(false));
    s.set_interrupt(flag.clone());
    let mut texts: HashMap<u64, String> = HashMap::new();
    let mut step = |s: &mut Scheduler| {
        let mut stepped = Vec::new();
        for event in s.step() {
            if let Event::Token { id, text, .. } = event {
                texts.entry(id).or_default().push_str(&text);
                stepped.push(id);
            }
        }
        stepped.sort();
        stepped
    };
    for id in [1, 2] {
        let mut low = request(id, QUESTIONS[id as usize], 12);
        low.priority = 0;
        s.add(low).unwrap();
    }
    for _ in 0..3 {
        step(&mut s);
    }
    flag.store(true, Ordering::Relaxed); // a real-time request is on its way
    assert_eq!(step(&mut s), Vec::<u64>::new(), "the batch step gave way");
    assert_eq!(s.stats().interrupted_steps, 1);
    s.add(request(3, QUESTIONS[3], 12)).unwrap();
    assert!(!flag.load(Ordering::Relaxed), "taking the arrival lowers the flag");
    assert_eq!(step(&mut s), vec![3], "the arrival's prompt runs alone");
    flag.store(true, Ordering::Relaxed);
    assert_eq!(step(&mut s), vec![1, 2, 3], "a step with real-time work runs to its end");
    assert_eq!(s.stats().interrupted_steps, 1);
    flag.store(false, Ordering::Relaxed);
    while s.has_work() {
        step(&mut s);
    }
    for (id, question) in [(1, QUESTIONS[1]), (2, QUESTIONS[2]), (3, QUESTIONS[3])] {
        assert_eq!(texts[&id], alone(question, 12).text, "request {id} says what it says alone");
    }
}

#[test]
fn a_cancelled_request_frees_its_blocks_at_once() {
    let mut s = Scheduler::new(support::smollm2(), SchedulerConfig::default()).expect("scheduler");
    s.add(request(7, QUESTIONS[2], 200)).unwrap();
    for _ in 0..5 {
        s.step();
    }
    let before = s.stats();
    assert!(before.free_blocks < before.total_blocks);
    assert!(s.cancel(7));
    let after = s.stats();
    assert_eq!(after.free_blocks, after.total_blocks);
    assert!(!s.has_work());
    assert!(!s.cancel(7), "cancelling twice is harmless");
}

#[test]
fn generation_stops_at_a_stop_sequence_which_is_left_out() {
    let full = alone(QUESTIONS[0], 24).text;
    let stop = "France";
    let at = full.find(stop).expect("the answer names France");
    let mut req = request(3, QUESTIONS[0], 24);
    req.stop_sequences = vec![stop.to_string()];
    let mut s = Scheduler::new(support::smollm2(), SchedulerConfig::default()).expect("scheduler");
    s.add(req).unwrap();
    let (mut outcomes, _) = run(&mut s);
    let o = outcomes.remove(&3).unwrap();
    assert_eq!(o.reason, Some(FinishReason::StopSequence));
    assert_eq!(o.text, full[..at]);
}

#[test]
fn max_tokens_ends_generation() {
    let o = alone(QUESTIONS[2], 5);
    assert_eq!(o.reason, Some(FinishReason::MaxTokens));
    assert_eq!(o.tokens.len(), 5);
}

#[test]
fn bad_requests_are_refused_with_the_numbers() {
    let mut s =
        Scheduler::new(support::smollm2(), SchedulerConfig { num_blocks: 8, ..Default::default() }).expect("scheduler");
    let mut empty = request(1, "x", 4);
    empty.prompt.clear();
    assert_eq!(s.add(empty), Err(EngineError::EmptyPrompt));

    let mut long = request(2, "x", 4);
    long.prompt = vec![1; 500];
    let err = s.add(long).unwrap_err();
    assert_eq!(err, EngineError::PromptTooLong { prompt_tokens: 500, context_length: 128 });
    assert!(err.to_string().contains("500") && err.to_string().contains("128"), "{err}");

    let zero = GenerateRequest { max_tokens: 0, ..request(3, "hi", 1) };
    assert!(matches!(s.add(zero), Err(EngineError::InvalidMaxTokens { max_tokens: 0, .. })));
    let too_many = GenerateRequest { max_tokens: 10_000, ..request(4, "hi", 1) };
    assert!(matches!(s.add(too_many), Err(EngineError::InvalidMaxTokens { max_tokens: 10_000, .. })));
    assert!(!s.has_work());
}
