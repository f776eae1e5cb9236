//! The runner's requests in the OpenAI API, and the upstream's stream chunks back: pure mapping,
//! no I/O.
//!
//! A conversation goes to `/v1/chat/completions`, so the upstream applies its own model's chat
//! template (the one its tokenizer config or GGUF carries, with the special tokens it knows); a
//! raw prompt or prompt token ids go to `/v1/completions` untouched. Both stream
//! (`stream_options.include_usage` asks for the usage chunk at the end).
//!
//! Stop sequences are matched here, on the streamed text, not sent upstream: OpenAI servers cut
//! the matched sequence out and most do not say which one matched (or whether one did, rather
//! than the end of the turn), while Bedrock's `stop_sequence` reason needs both. When one matches,
//! the runner ends the stream and closes the upstream request, which frees its slot.

use mantle_proto::grammar::Kind as GrammarKind;
use mantle_proto::{GenerateRequest, Usage};
use serde_json::{Map, Value, json};

use super::Flavor;

/// How the upstream orders requests by priority, if it does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum PriorityMode {
    /// Send no priority (the upstream serves in arrival order; vLLM refuses a priority unless it
    /// runs `--scheduling-policy priority`).
    #[default]
    None,
    /// Lower values first (vLLM's priority scheduling): NORMAL is 0, CRITICAL -2, LOW 1.
    LowerFirst,
    /// Higher values first (SGLang's `--enable-priority-scheduling`): NORMAL is 0, CRITICAL 2.
    HigherFirst,
}

/// What a request needs beyond its body: where it goes and what the runner enforces itself.
#[derive(Debug, Clone, PartialEq)]
pub struct Planned {
    /// `/v1/chat/completions` or `/v1/completions`.
    pub path: &'static str,
    pub body: Value,
    /// The runner stops the stream after this many output tokens (the request asked to clamp its
    /// limit to the context, so the upstream was given none and stops at the context's end).
    pub local_max_tokens: Option<u32>,
}

/// The upstream request for a Generate call, or why the request cannot be served (a feature the
/// OpenAI API has no way to ask for).
pub fn plan(r: &GenerateRequest, model: &str, flavor: Flavor, priority: PriorityMode) -> Result<Planned, String> {
    if r.prompt_logprobs {
        return Err(
            "prompt log-probabilities (echo with logprobs) are not served by this model's external engine".into()
        );
    }
    let mut body = Map::new();
    body.insert("model".into(), json!(model));
    let chat = !r.messages.is_empty();
    let path = if chat {
        if !r.prompt.is_empty() || !r.prompt_token_ids.is_empty() {
            return Err("send prompt_token_ids, messages or a prompt: one of them".into());
        }
        let messages: Vec<Value> = r.messages.iter().map(|m| json!({"role": m.role, "content": m.content})).collect();
        body.insert("messages".into(), Value::Array(messages));
        "/v1/chat/completions"
    } else if !r.prompt_token_ids.is_empty() {
        if !r.prompt.is_empty() {
            return Err("send prompt_token_ids, messages or a prompt: one of them".into());
        }
        body.insert("prompt".into(), json!(r.prompt_token_ids));
        "/v1/completions"
    } else if !r.prompt.is_empty() {
        body.insert("prompt".into(), json!(r.prompt));
        "/v1/completions"
    } else {
        return Err("the request has neither messages nor a prompt".into());
    };
    if r.max_tokens == 0 {
        return Err("max_tokens must be at least 1".into());
    }
    let local_max_tokens = if r.clamp_max_tokens {
        // The client gave no limit: the upstream generates to the end of its context, and the
        // runner stops at the default.
        Some(r.max_tokens)
    } else {
        body.insert("max_tokens".into(), json!(r.max_tokens));
        None
    };
    body.insert("temperature".into(), json!(r.temperature));
    if r.top_p > 0.0 && r.top_p < 1.0 {
        body.insert("top_p".into(), json!(r.top_p));
    }
    if r.top_k > 0 {
        body.insert("top_k".into(), json!(r.top_k));
    }
    if r.temperature > 0.0 {
        body.insert("seed".into(), json!(r.seed));
    }
    if r.logprobs {
        if chat {
            body.insert("logprobs".into(), json!(true));
            if r.top_logprobs > 0 {
                body.insert("top_logprobs".into(), json!(r.top_logprobs));
            }
        } else {
            body.insert("logprobs".into(), json!(r.top_logprobs));
        }
    }
    match r.grammar.as_ref().and_then(|g| g.kind.as_ref()) {
        None => {}
        Some(GrammarKind::JsonSchema(text)) => {
            let schema: Value =
                serde_json::from_str(text).map_err(|e| format!("grammar.json_schema is not JSON: {e}"))?;
            body.insert(
                "response_format".into(),
                json!({"type": "json_schema", "json_schema": {"name": "output", "schema": schema, "strict": true}}),
            );
        }
        Some(GrammarKind::Regex(_)) | Some(GrammarKind::Lark(_)) => {
            return Err("this model's external engine takes JSON Schema grammars only (no regex or Lark)".into());
        }
    }
    if !r.cache_salt.is_empty() && flavor == Flavor::Vllm {
        // vLLM keeps prefix-cache entries apart by salt, as the builtin engine does.
        body.insert("cache_salt".into(), json!(r.cache_salt));
    }
    let p = r.priority.clamp(0, 3) as i64;
    match priority {
        PriorityMode::None => {}
        PriorityMode::LowerFirst => {
            body.insert("priority".into(), json!(1 - p));
        }
        PriorityMode::HigherFirst => {
            body.insert("priority".into(), json!(p - 1));
        }
    }
    body.insert("stream".into(), json!(true));
    let mut stream_options = json!({"include_usage": true});
    match flavor {
        // Usage on every chunk: the runner knows the token counts even when it ends a stream
        // itself (a stop sequence) before the usage chunk.
        Flavor::Vllm | Flavor::Sglang => stream_options["continuous_usage_stats"] = json!(true),
        // llama.cpp says the same in each chunk's `timings`.
        Flavor::LlamaCpp => {
            body.insert("timings_per_token".into(), json!(true));
        }
        Flavor::Generic => {}
    }
    body.insert("stream_options".into(), stream_options);
    Ok(Planned { path, body: Value::Object(body), local_max_tokens })
}

/// One token's log-probability from the upstream.
#[derive(Debug, Clone, PartialEq)]
pub struct Logprob {
    pub token: Vec<u8>,
    pub logprob: f32,
    pub token_id: u32,
    pub top: Vec<Logprob>,
}

/// What one stream chunk says.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Chunk {
    pub text: String,
    /// `stop`, `length`, `tool_calls`, ... once the choice ends.
    pub finish_reason: Option<String>,
    /// The counts so far (vLLM's and SGLang's continuous usage, llama.cpp's timings) or in all
    /// (the final usage chunk).
    pub usage: Option<Usage>,
    pub logprobs: Vec<Logprob>,
}

/// Reads one `data:` event of a completion stream (`[DONE]` is the caller's to check).
pub fn parse_chunk(data: &str) -> Result<Chunk, String> {
    let v: Value = serde_json::from_str(data).map_err(|e| format!("a stream chunk is not JSON: {e}"))?;
    if let Some(error) = v.get("error") {
        return Err(error_message(error).unwrap_or_else(|| error.to_string()));
    }
    let mut chunk = Chunk::default();
    if let Some(choice) = v.get("choices").and_then(Value::as_array).and_then(|c| c.first()) {
        let text = choice.get("delta").and_then(|d| d.get("content")).or_else(|| choice.get("text"));
        chunk.text = text.and_then(Value::as_str).unwrap_or_default().to_string();
        chunk.finish_reason = choice.get("finish_reason").and_then(Value::as_str).map(str::to_string);
        if let Some(lp) = choice.get("logprobs").filter(|l| !l.is_null()) {
            chunk.logprobs = logprobs(lp);
        }
    }
    if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
        chunk.usage = Some(usage(u));
    } else if let Some(t) = v.get("timings").filter(|t| t.is_object()) {
        // llama.cpp: prompt_n tokens computed, cache_n reused, predicted_n generated.
        let n = |k: &str| t.get(k).and_then(Value::as_u64).unwrap_or(0) as u32;
        chunk.usage = Some(Usage {
            input_tokens: n("prompt_n") + n("cache_n"),
            output_tokens: n("predicted_n"),
            cached_prompt_tokens: n("cache_n"),
        });
    }
    Ok(chunk)
}

/// OpenAI's `usage` object, with vLLM's cached prompt tokens.
pub fn usage(u: &Value) -> Usage {
    let n = |v: Option<&Value>| v.and_then(Value::as_u64).unwrap_or(0) as u32;
    Usage {
        input_tokens: n(u.get("prompt_tokens")),
        output_tokens: n(u.get("completion_tokens")),
        cached_prompt_tokens: n(u.get("prompt_tokens_details").and_then(|d| d.get("cached_tokens"))),
    }
}

/// Chat-style (`{content: [{token, logprob, bytes, top_logprobs}]}`, which llama.cpp also uses
/// for completions) or legacy completions-style (`{tokens, token_logprobs, top_logprobs}`).
fn logprobs(lp: &Value) -> Vec<Logprob> {
    fn entry(e: &Value) -> Logprob {
        let token = match e.get("bytes").and_then(Value::as_array) {
            Some(bytes) => bytes.iter().filter_map(Value::as_u64).map(|b| b as u8).collect(),
            None => e.get("token").and_then(Value::as_str).unwrap_or_default().as_bytes().to_vec(),
        };
        Logprob {
            token,
            logprob: e.get("logprob").and_then(Value::as_f64).unwrap_or(0.0) as f32,
            token_id: e.get("id").and_then(Value::as_u64).unwrap_or(0) as u32,
            top: e
                .get("top_logprobs")
                .and_then(Value::as_array)
                .map(|t| t.iter().map(entry).collect())
                .unwrap_or_default(),
        }
    }
    if let Some(content) = lp.get("content").and_then(Value::as_array) {
        return content.iter().map(entry).collect();
    }
    let tokens = lp.get("tokens").and_then(Value::as_array).cloned().unwrap_or_default();
    let values = lp.get("token_logprobs").and_then(Value::as_array).cloned().unwrap_or_default();
    let tops = lp.get("top_logprobs").and_then(Value::as_array).cloned().unwrap_or_default();
    tokens
        .iter()
        .zip(values.iter())
        .enumerate()
        .map(|(i, (t, l))| {
            let top = tops.get(i).and_then(Value::as_object).map(|m| {
                let mut top: Vec<Logprob> = m
                    .iter()
                    .map(|(t, l)| Logprob {
                        token: t.as_bytes().to_vec(),
                        logprob: l.as_f64().unwrap_or(0.0) as f32,
                        token_id: 0,
                        top: Vec::new(),
                    })
                    .collect();
                top.sort_by(|a, b| b.logprob.total_cmp(&a.logprob));
                top
            });
            Logprob {
                token: t.as_str().unwrap_or_default().as_bytes().to_vec(),
                logprob: l.as_f64().unwrap_or(0.0) as f32,
                token_id: 0,
                top: top.unwrap_or_default(),
            }
        })
        .collect()
}

/// The message of an OpenAI-style error body (`{"error": {"message"}}`, `{"error": "..."}`,
/// FastAPI's `{"detail": ...}`, or `{"message"}`).
pub fn error_message(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(m) => m
            .get("error")
            .and_then(error_message)
            .or_else(|| m.get("message").and_then(Value::as_str).map(str::to_string))
            .or_else(|| m.get("detail").map(|d| d.as_str().map_or_else(|| d.to_string(), str::to_string))),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use mantle_proto::{ChatMessage, Grammar};

    use super::*;

    fn chat(content: &str) -> GenerateRequest {
        GenerateRequest {
            messages: vec![ChatMessage { role: "user".into(), content: content.into() }],
            max_tokens: 16,
            ..Default::default()
        }
    }

    #[test]
    fn a_conversation_goes_to_chat_completions_and_a_prompt_to_completions() {
        let p = plan(&chat("Hi"), "smol", Flavor::LlamaCpp, PriorityMode::None).unwrap();
        assert_eq!(p.path, "/v1/chat/completions");
        assert_eq!(p.body["messages"], json!([{"role": "user", "content": "Hi"}]));
        assert_eq!(p.body["model"], "smol");
        assert_eq!((p.body["max_tokens"].clone(), p.body["temperature"].clone()), (json!(16), json!(0.0)));
        assert_eq!(p.body["stream"], true);
        assert_eq!(p.body["stream_options"], json!({"include_usage": true}));
        assert_eq!(p.body["timings_per_token"], true);
        assert!(p.body.get("stop").is_none(), "stop sequences are matched by the runner");
        assert!(p.body.get("seed").is_none() && p.body.get("top_p").is_none(), "{}", p.body);

        let raw = GenerateRequest { prompt: "Once".into(), max_tokens: 4, ..Default::default() };
        let p = plan(&raw, "m", Flavor::Vllm, PriorityMode::None).unwrap();
        assert_eq!((p.path, p.body["prompt"].clone()), ("/v1/completions", json!("Once")));
        assert_eq!(p.body["stream_options"]["continuous_usage_stats"], true);
        let ids = GenerateRequest { prompt_token_ids: vec![1, 2, 3], max_tokens: 4, ..Default::default() };
        assert_eq!(plan(&ids, "m", Flavor::Generic, PriorityMode::None).unwrap().body["prompt"], json!([1, 2, 3]));
    }

    #[test]
    fn sampling_logprobs_grammar_salt_and_priority_map_to_their_fields() {
        let r = GenerateRequest {
            temperature: 0.7,
            top_p: 0.9,
            top_k: 40,
            seed: 7,
            logprobs: true,
            top_logprobs: 3,
            cache_salt: "tenant-a".into(),
            priority: mantle_proto::Priority::Critical as i32,
            grammar: Some(Grammar { kind: Some(GrammarKind::JsonSchema(r#"{"type":"object"}"#.into())) }),
            ..chat("Hi")
        };
        let p = plan(&r, "m", Flavor::Vllm, PriorityMode::LowerFirst).unwrap();
        let b = &p.body;
        assert_eq!((b["top_k"].clone(), b["seed"].clone(), b["logprobs"].clone()), (json!(40), json!(7), json!(true)));
        assert!((b["top_p"].as_f64().unwrap() - 0.9).abs() < 1e-6);
        assert_eq!(b["top_logprobs"], 3);
        assert_eq!(b["cache_salt"], "tenant-a");
        assert_eq!(b["priority"], -2);
        assert_eq!(b["response_format"]["json_schema"]["schema"], json!({"type": "object"}));
        let low = GenerateRequest { priority: 0, ..r.clone() };
        assert_eq!(plan(&low, "m", Flavor::Sglang, PriorityMode::HigherFirst).unwrap().body["priority"], -1);
        assert!(plan(&r, "m", Flavor::LlamaCpp, PriorityMode::None).unwrap().body.get("cache_salt").is_none());
        // Completions take logprobs as a count.
        let raw = GenerateRequest {
            prompt: "x".into(),
            logprobs: true,
            top_logprobs: 2,
            max_tokens: 1,
            ..Default::default()
        };
        assert_eq!(plan(&raw, "m", Flavor::Generic, PriorityMode::None).unwrap().body["logprobs"], 2);
    }

    #[test]
    fn what_the_openai_api_cannot_ask_for_is_refused_with_the_reason() {
        let cases = [
            (GenerateRequest { prompt_logprobs: true, ..chat("x") }, "prompt log-probabilities"),
            (
                GenerateRequest { grammar: Some(Grammar { kind: Some(GrammarKind::Regex("a+".into())) }), ..chat("x") },
                "JSON Schema grammars only",
            ),
            (
                GenerateRequest {
                    grammar: Some(Grammar { kind: Some(GrammarKind::JsonSchema("{".into())) }),
                    ..chat("x")
                },
                "not JSON",
            ),
            (GenerateRequest { max_tokens: 1, ..Default::default() }, "neither messages nor a prompt"),
            (GenerateRequest { prompt: "x".into(), ..chat("x") }, "one of them"),
            (GenerateRequest { max_tokens: 0, ..chat("x") }, "at least 1"),
        ];
        for (r, want) in cases {
            let err = plan(&r, "m", Flavor::Generic, PriorityMode::None).unwrap_err();
            assert!(err.contains(want), "{err}");
        }
    }

    #[test]
    fn an_unlimited_request_is_capped_by_the_runner_not_the_upstream() {
        let r = GenerateRequest { clamp_max_tokens: true, max_tokens: 512, ..chat("x") };
        let p = plan(&r, "m", Flavor::Generic, PriorityMode::None).unwrap();
        assert!(p.body.get("max_tokens").is_none());
        assert_eq!(p.local_max_tokens, Some(512));
    }

    #[test]
    fn chunks_of_vllm_llama_cpp_and_legacy_completions_parse() {
        // vLLM chat, with continuous usage.
        let c = parse_chunk(r#"{"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":" Hello"},"logprobs":null,"finish_reason":null}],"usage":{"prompt_tokens":12,"total_tokens":13,"completion_tokens":1}}"#).unwrap();
        assert_eq!(c.text, " Hello");
        assert_eq!(c.usage, Some(Usage { input_tokens: 12, output_tokens: 1, cached_prompt_tokens: 0 }));
        // The final usage chunk, with vLLM's cached tokens.
        let c = parse_chunk(r#"{"choices":[],"usage":{"prompt_tokens":40,"completion_tokens":9,"prompt_tokens_details":{"cached_tokens":32}}}"#).unwrap();
        assert_eq!(c.usage, Some(Usage { input_tokens: 40, output_tokens: 9, cached_prompt_tokens: 32 }));
        // llama.cpp: finish, timings, chat-style logprobs with bytes and ids.
        let c = parse_chunk(r#"{"choices":[{"finish_reason":"length","index":0,"delta":{},"logprobs":{"content":[{"id":42,"token":"é","bytes":[195,169],"logprob":-0.5,"top_logprobs":[{"id":42,"token":"é","bytes":[195,169],"logprob":-0.5}]}]}}],"timings":{"cache_n":4,"prompt_n":6,"predicted_n":3}}"#).unwrap();
        assert_eq!(c.finish_reason.as_deref(), Some("length"));
        assert_eq!(c.usage, Some(Usage { input_tokens: 10, output_tokens: 3, cached_prompt_tokens: 4 }));
        assert_eq!(
            (c.logprobs[0].token.clone(), c.logprobs[0].token_id, c.logprobs[0].top.len()),
            ("é".as_bytes().to_vec(), 42, 1)
        );
        // Legacy completions logprobs.
        let c = parse_chunk(r#"{"choices":[{"text":"a","logprobs":{"tokens":["a"],"token_logprobs":[-0.25],"top_logprobs":[{"b":-2.0,"a":-0.25}]},"finish_reason":null}]}"#).unwrap();
        assert_eq!(c.text, "a");
        assert_eq!(c.logprobs[0].logprob, -0.25);
        assert_eq!(
            c.logprobs[0].top.iter().map(|t| t.token.clone()).collect::<Vec<_>>(),
            vec![b"a".to_vec(), b"b".to_vec()]
        );
    }

    #[test]
    fn malformed_chunks_and_error_events_are_errors() {
        assert!(parse_chunk("not json").unwrap_err().contains("not JSON"));
        assert_eq!(parse_chunk(r#"{"error":{"message":"out of memory","code":500}}"#).unwrap_err(), "out of memory");
        // Odd but valid JSON: nothing in it, no panic.
        assert_eq!(parse_chunk(r#"{"choices":"x","usage":5}"#).unwrap(), Chunk::default());
        assert_eq!(parse_chunk(r#"{"choices":[{"delta":{"content":7}}]}"#).unwrap().text, "");
        assert_eq!(parse_chunk("[]").unwrap(), Chunk::default());
    }

    #[test]
    fn error_messages_are_found_in_each_servers_shape() {
        for (body, want) in [
            (json!({"error": {"message": "bad", "type": "invalid_request_error"}}), "bad"),
            (json!({"error": "plain"}), "plain"),
            (json!({"detail": "fastapi"}), "fastapi"),
            (json!({"message": "m", "type": "BadRequestError"}), "m"),
        ] {
            assert_eq!(error_message(&body).as_deref(), Some(want));
        }
        assert!(error_message(&json!(3)).is_none());
    }
}
