//! Grammar-constrained decoding on the real SmolLM2-135M model, which cannot follow a JSON schema
//! on its own: with the grammar every reply parses and matches, ends when the grammar is
//! complete, and sequences without a grammar in the same batch are untouched.

use mantle_engine::test_support as support;

use std::collections::HashMap;

use mantle_engine::{
    EngineError, Event, FinishReason, GenerateRequest, Grammar, SamplingParams, Scheduler, SchedulerConfig,
};
use serde_json::{Value, json};

fn request(id: u64, question: &str, max_tokens: usize, grammar: Option<Grammar>) -> GenerateRequest {
    let constraint = grammar.map(|g| support::smollm2().compile_grammar(&g).unwrap());
    GenerateRequest { constraint, ..support::ask(id, question, max_tokens) }
}

/// Runs the scheduler until idle: each request's text and finish reason.
fn run(requests: Vec<GenerateRequest>) -> HashMap<u64, (String, FinishReason)> {
    let mut scheduler = Scheduler::new(support::smollm2(), SchedulerConfig::default()).expect("scheduler");
    for r in requests {
        scheduler.add(r).unwrap();
    }
    let mut texts: HashMap<u64, String> = HashMap::new();
    let mut done = HashMap::new();
    while scheduler.has_work() {
        for event in scheduler.step() {
            match event {
                Event::Token { id, text, .. } => texts.entry(id).or_default().push_str(&text),
                Event::Finished { id, reason, .. } => {
                    done.insert(id, (texts.remove(&id).unwrap_or_default(), reason));
                }
                Event::PromptLogprobs { .. } => {}
                Event::Failed { id, error } => panic!("request {id} failed: {error}"),
            }
        }
    }
    done
}

fn person_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 24},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "languages": {"type": "array", "items": {"enum": ["English", "French", "German"]}, "maxItems": 2}
        },
        "required": ["name", "age", "languages"],
        "additionalProperties": false
    })
}

/// The checks a JSON-schema validator would make for [`person_schema`].
fn check_person(text: &str) -> Result<(), String> {
    let v: Value = serde_json::from_str(text).map_err(|e| format!("{text:?} is not JSON: {e}"))?;
    let o = v.as_object().ok_or_else(|| format!("{text:?} is not an object"))?;
    let mut keys: Vec<&str> = o.keys().map(String::as_str).collect();
    keys.sort();
    let langs = o["languages"].as_array().map(Vec::as_slice).unwrap_or_default();
    let ok = keys == ["age", "languages", "name"]
        && o["name"].as_str().is_some_and(|n| n.chars().count() <= 24)
        && o["age"].as_u64().is_some_and(|a| a <= 120)
        && langs.len() <= 2
        && langs.iter().all(|l| ["English", "French", "German"].contains(&l.as_str().unwrap_or("")));
    if ok { Ok(()) } else { Err(format!("{text} does not match the schema")) }
}

fn assert_person(text: &str) {
    if let Err(e) = check_person(text) {
        panic!("{e}");
    }
}

#[test]
fn a_json_schema_is_always_met_where_the_model_alone_fails() {
    let question = "Describe a fictional person as JSON with their name, age and the languages they speak.";
    let out = run(vec![
        request(1, question, 120, None),
        request(2, question, 120, Some(Grammar::JsonSchema(person_schema()))),
    ]);
    let (free, _) = &out[&1];
    assert!(check_person(free).is_err(), "the model alone was not expected to meet the schema: {free}");
    let (text, reason) = &out[&2];
    assert_person(text);
    assert_eq!(*reason, FinishReason::EndTurn, "the sequence ends when the JSON is complete: {text}");
    assert!(text.contains("\": "), "compact JSON with ': ' between key and value: {text}");
}

#[test]
fn sampled_replies_meet_the_schema_too() {
    let requests = (0..4)
        .map(|seed| GenerateRequest {
            sampling: SamplingParams { temperature: 1.0, top_p: 0.95, seed, ..Default::default() },
            ..request(seed, "Invent a person.", 120, Some(Grammar::JsonSchema(person_schema())))
        })
        .collect();
    let out = run(requests);
    let texts: Vec<&String> = out.values().map(|(t, _)| t).collect();
    for (text, reason) in out.values() {
        assert_person(text);
        assert_eq!(*reason, FinishReason::EndTurn);
    }
    assert!(texts.iter().any(|t| *t != texts[0]), "different seeds give different people: {texts:?}");
}

#[test]
fn a_regex_is_matched_exactly_and_other_sequences_in_the_batch_are_untouched() {
    let question = "What is the phone number of the city library?";
    let alone = run(vec![request(1, "Name three colours.", 24, None)]);
    let out = run(vec![
        request(1, "Name three colours.", 24, None),
        request(2, question, 40, Some(Grammar::Regex(r"\(\d{3}\) \d{3}-\d{4}".into()))),
    ]);
    assert_eq!(out[&1], alone[&1], "an unconstrained neighbour decodes exactly as alone");
    let (text, reason) = &out[&2];
    let ok = text.len() == 14
        && text.chars().enumerate().all(|(i, c)| match i {
            0 => c == '(',
            4 => c == ')',
            5 => c == ' ',
            9 => c == '-',
            _ => c.is_ascii_digit(),
        });
    assert!(ok, "{text:?} does not match the pattern");
    assert_eq!(*reason, FinishReason::EndTurn);
}

#[test]
fn max_tokens_still_bounds_a_constrained_reply() {
    let schema = json!({"type": "array", "items": {"type": "string"}, "minItems": 50});
    let out = run(vec![request(1, "List fruits.", 16, Some(Grammar::JsonSchema(schema)))]);
    let (text, reason) = &out[&1];
    assert_eq!(*reason, FinishReason::MaxTokens);
    assert!(text.starts_with("[\""), "{text}");
}

#[test]
fn invalid_grammars_are_refused_with_the_reason() {
    let model = support::smollm2();
    let refused = |g: Grammar| match model.compile_grammar(&g) {
        Err(EngineError::Grammar(reason)) => reason,
        Err(e) => panic!("{g:?}: unexpected error {e}"),
        Ok(_) => panic!("{g:?} compiled"),
    };
    assert!(!refused(Grammar::JsonSchema(json!({"type": "nonsense"}))).is_empty());
    assert!(!refused(Grammar::JsonSchema(json!({"$ref": "#/$defs/missing"}))).is_empty());
    assert!(!refused(Grammar::Regex("(unclosed".into())).is_empty());
    assert!(!refused(Grammar::Lark("start: undefined_rule".into())).is_empty());
    // Schemas with local definitions, as pydantic writes them, compile.
    let pydantic = json!({
        "$defs": {"Pet": {"type": "object", "properties": {"kind": {"type": "string"}}, "required": ["kind"]}},
        "type": "object", "properties": {"pet": {"$ref": "#/$defs/Pet"}}, "required": ["pet"]
    });
    model.compile_grammar(&Grammar::JsonSchema(pydantic)).unwrap();
}
