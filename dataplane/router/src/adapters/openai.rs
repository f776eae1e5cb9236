//! The OpenAI API: `/v1/chat/completions` and `/v1/embeddings` bodies to runner requests, and
//! replies (whole or as server-sent-event chunks) back.

use base64::Engine as _;
use mantle_proto::ChatMessage;
use serde_json::{Value, json};

use super::{
    StopReason, TextOutput, TextRequest, TokenLogprob, Tool, ToolChoice, check_sampling, check_tool_choice,
    tools_prompt,
};
use crate::error::ApiError;

/// A chat-completions body, mapped: the model id, whether to stream (and include usage), the
/// caller's prefix-cache salt (`cache_salt`, as vLLM takes it), and the request.
#[derive(Debug)]
pub struct ChatCompletion {
    pub model: String,
    pub stream: bool,
    pub include_usage: bool,
    pub cache_salt: Option<String>,
    pub request: TextRequest,
}

fn content_text(content: &Value, at: &str) -> Result<String, ApiError> {
    match content {
        Value::String(s) => Ok(s.clone()),
        Value::Null => Ok(String::new()),
        Value::Array(parts) => {
            let mut out = Vec::new();
            for (i, p) in parts.iter().enumerate() {
                match p["type"].as_str() {
                    Some("text") => out.push(
                        p["text"]
                            .as_str()
                            .ok_or_else(|| ApiError::validation(format!("{at}[{i}].text must be a string")))?
                            .to_string(),
                    ),
                    Some(other) => {
                        return Err(ApiError::validation(format!(
                            "{at}[{i}]: content part type {other:?} is not supported by this model"
                        )));
                    }
                    None => return Err(ApiError::validation(format!("{at}[{i}].type is required"))),
                }
            }
            Ok(out.join("\n"))
        }
        _ => Err(ApiError::validation(format!("{at} must be a string or a list of content parts"))),
    }
}

/// Chat-completions fields the router serves.
const CHAT_FIELDS: &[&str] = &[
    "model",
    "messages",
    // The caller's prefix-cache salt (as vLLM takes it).
    "cache_salt",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "stop",
    "stream",
    "stream_options",
    "seed",
    "tools",
    "tool_choice",
    "response_format",
    "n",
    "logprobs",
    "top_logprobs",
    // At most one tool call is made either way.
    "parallel_tool_calls",
    // Identifiers and hints that change nothing in the reply.
    "user",
    "safety_identifier",
    "prompt_cache_key",
];

/// Chat-completions fields OpenAI defines that the router does not serve. SDKs send some of
/// them at their defaults, which change nothing and are accepted; any other value is refused
/// naming the field.
const CHAT_FIELDS_AT_DEFAULT: &[&str] = &[
    "frequency_penalty",
    "presence_penalty",
    "logit_bias",
    "store",
    "metadata",
    "service_tier",
    "modalities",
    "audio",
    "prediction",
    "reasoning_effort",
    "verbosity",
    "web_search_options",
    "functions",
    "function_call",
];

/// Whether an unserved field holds its default (what leaves the reply unchanged).
fn at_default(key: &str, value: &Value) -> bool {
    match (key, value) {
        (_, Value::Null) => true,
        ("frequency_penalty" | "presence_penalty", v) => v.as_f64() == Some(0.0),
        ("logit_bias" | "metadata", Value::Object(o)) => o.is_empty(),
        ("store", Value::Bool(b)) => !b,
        ("service_tier", Value::String(s)) => s == "auto" || s == "default",
        ("modalities", Value::Array(a)) => a.iter().all(|m| m == "text"),
        _ => false,
    }
}

/// Refuses fields OpenAI does not define (in OpenAI's words) and unserved fields set to
/// anything but their default.
pub(super) fn check_fields(body: &Value, served: &[&str], at_default_only: &[&str]) -> Result<(), ApiError> {
    let Some(object) = body.as_object() else {
        return Err(ApiError::validation("the request body must be a JSON object"));
    };
    let unknown: Vec<&str> =
        object.keys().map(String::as_str).filter(|k| !served.contains(k) && !at_default_only.contains(k)).collect();
    match unknown.as_slice() {
        [] => {}
        [one] => return Err(ApiError::validation(format!("Unrecognized request argument supplied: {one}"))),
        many => {
            return Err(ApiError::validation(format!("Unrecognized request arguments supplied: {}", many.join(", "))));
        }
    }
    for key in at_default_only {
        if let Some(value) = object.get(*key)
            && !at_default(key, value)
        {
            return Err(ApiError::validation(format!(
                "{key} is not supported by this server; omit it or leave it at its default (got {value})"
            )));
        }
    }
    Ok(())
}

/// A boolean field (absent or null: false).
pub(super) fn flag(body: &Value, key: &str) -> Result<bool, ApiError> {
    match &body[key] {
        Value::Null => Ok(false),
        Value::Bool(b) => Ok(*b),
        _ => Err(ApiError::validation(format!("{key} must be a boolean"))),
    }
}

/// An integer field from 0 to `max` (absent or null: none).
pub(super) fn small_int(body: &Value, key: &str, max: u32) -> Result<Option<u32>, ApiError> {
    match &body[key] {
        Value::Null => Ok(None),
        v => match v.as_u64() {
            Some(n) if n <= max as u64 => Ok(Some(n as u32)),
            _ => Err(ApiError::validation(format!("{key} must be an integer from 0 to {max}"))),
        },
    }
}

/// `temperature` and `top_p` (OpenAI's defaults: 1 and 1), checked.
pub(super) fn sampling(body: &Value) -> Result<(f32, f32), ApiError> {
    let number = |key: &str| -> Result<f32, ApiError> {
        match &body[key] {
            Value::Null => Ok(1.0),
            v => v.as_f64().map(|f| f as f32).ok_or_else(|| ApiError::validation(format!("{key} must be a number"))),
        }
    };
    let (temperature, top_p) = (number("temperature")?, number("top_p")?);
    check_sampling(temperature, top_p, 2.0)?;
    Ok((temperature, top_p))
}

pub fn chat_request(body: &Value) -> Result<ChatCompletion, ApiError> {
    check_fields(body, CHAT_FIELDS, CHAT_FIELDS_AT_DEFAULT)?;
    let model = body["model"]
        .as_str()
        .filter(|m| !m.is_empty())
        .ok_or_else(|| ApiError::validation("you must provide a model parameter"))?
        .to_string();
    let list = body["messages"]
        .as_array()
        .filter(|m| !m.is_empty())
        .ok_or_else(|| ApiError::validation("messages must be a non-empty array"))?;
    let mut messages = Vec::new();
    for (i, m) in list.iter().enumerate() {
        let role = match m["role"].as_str() {
            Some("system" | "developer") => "system",
            Some("user") => "user",
            Some("assistant") => "assistant",
            Some("tool") => "user",
            other => return Err(ApiError::validation(format!("messages[{i}].role {other:?} is not supported"))),
        };
        let mut content = content_text(&m["content"], &format!("messages[{i}].content"))?;
        if m["role"] == "tool" {
            content = format!("Result of tool call {}:\n{content}", m["tool_call_id"].as_str().unwrap_or(""));
        }
        if let Some(calls) = m["tool_calls"].as_array() {
            for c in calls {
                content.push_str(
                    &json!({"name": c["function"]["name"], "input": c["function"]["arguments"].as_str()
                        .and_then(|a| serde_json::from_str::<Value>(a).ok())})
                    .to_string(),
                );
            }
        }
        messages.push(ChatMessage { role: role.into(), content });
    }
    if !(body["n"].is_null() || body["n"].as_u64() == Some(1)) {
        return Err(ApiError::validation("n must be 1: this server makes one choice per request"));
    }
    let logprobs = flag(body, "logprobs")?;
    let top_logprobs = small_int(body, "top_logprobs", MAX_TOP_LOGPROBS)?.unwrap_or(0);
    if top_logprobs > 0 && !logprobs {
        return Err(ApiError::validation("top_logprobs needs logprobs set to true"));
    }
    let max_tokens = match body.get("max_completion_tokens").or_else(|| body.get("max_tokens")) {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_u64() {
            Some(n) if (1..=u32::MAX as u64).contains(&n) => Some(n as u32),
            _ => return Err(ApiError::validation("max_tokens must be an integer of at least 1")),
        },
    };
    let (temperature, top_p) = sampling(body)?;
    let stop_sequences = match &body["stop"] {
        Value::Null => Vec::new(),
        Value::String(s) => vec![s.clone()],
        Value::Array(a) => a.iter().filter_map(|s| s.as_str().map(str::to_owned)).collect(),
        _ => return Err(ApiError::validation("stop must be a string or a list of strings")),
    };
    let mut tools = Vec::new();
    if let Some(list) = body["tools"].as_array() {
        for (i, t) in list.iter().enumerate() {
            let f = &t["function"];
            let name = f["name"]
                .as_str()
                .ok_or_else(|| ApiError::validation(format!("tools[{i}].function.name is required")))?;
            tools.push(Tool {
                name: name.into(),
                description: f["description"].as_str().unwrap_or_default().into(),
                input_schema: f.get("parameters").cloned().unwrap_or(json!({"type": "object"})),
            });
        }
    }
    let json_schema = match body["response_format"]["type"].as_str() {
        Some("json_schema") => {
            let schema = body["response_format"]["json_schema"]["schema"].clone();
            super::structured::compile(&schema)?;
            Some(schema)
        }
        Some("json_object") => Some(json!({"type": "object"})),
        Some("text") | None => None,
        Some(other) => return Err(ApiError::validation(format!("response_format.type {other:?} is not supported"))),
    };
    let mut system = Vec::new();
    let mut tool_choice = ToolChoice::Auto;
    if !tools.is_empty() {
        let choice = match &body["tool_choice"] {
            Value::String(s) if s == "required" => ToolChoice::Any,
            Value::Object(o) => ToolChoice::Named(o["function"]["name"].as_str().unwrap_or_default().into()),
            _ => ToolChoice::Auto,
        };
        check_tool_choice(&tools, &choice, "tool_choice")?;
        if body["tool_choice"] != "none" {
            system.push(tools_prompt(&tools, &choice));
            tool_choice = choice;
        } else {
            tools.clear();
        }
    }
    if let Some(schema) = &json_schema {
        system.push(super::structured::instruction(schema));
    }
    if !system.is_empty() {
        match messages.first_mut() {
            Some(first) if first.role == "system" => {
                first.content = format!("{}\n\n{}", first.content, system.join("\n\n"))
            }
            _ => messages.insert(0, ChatMessage { role: "system".into(), content: system.join("\n\n") }),
        }
    }
    let cache_salt = match &body["cache_salt"] {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        _ => return Err(ApiError::validation("cache_salt must be a string")),
    };
    Ok(ChatCompletion {
        model,
        stream: body["stream"].as_bool().unwrap_or(false),
        include_usage: body["stream_options"]["include_usage"].as_bool().unwrap_or(false),
        cache_salt,
        request: TextRequest {
            messages,
            max_tokens,
            temperature,
            top_p,
            seed: body["seed"].as_u64().unwrap_or(0),
            stop_sequences,
            tools,
            tool_choice,
            json_schema,
            logprobs,
            top_logprobs,
            ..Default::default()
        },
    })
}

/// The most alternatives OpenAI's `top_logprobs` allows.
pub const MAX_TOP_LOGPROBS: u32 = 20;

/// A choice's `logprobs` object: each token with its log-probability and bytes, and the most
/// likely tokens at its place when `top_logprobs` asked for them.
pub fn logprobs(tokens: &[TokenLogprob]) -> Value {
    let entry = |t: &TokenLogprob| json!({"token": String::from_utf8_lossy(&t.bytes), "logprob": t.logprob_json(), "bytes": t.bytes});
    let content: Vec<Value> = tokens
        .iter()
        .map(|t| {
            let mut e = entry(t);
            e["top_logprobs"] = t.top.iter().map(entry).collect();
            e
        })
        .collect();
    json!({ "content": content, "refusal": null })
}

/// Sets a reply's or chunk's `choices[0].logprobs`.
pub fn with_logprobs(mut body: Value, tokens: &[TokenLogprob]) -> Value {
    body["choices"][0]["logprobs"] = logprobs(tokens);
    body
}

pub(super) fn finish_reason(reason: StopReason) -> &'static str {
    match reason {
        StopReason::MaxTokens => "length",
        StopReason::ToolUse => "tool_calls",
        StopReason::GuardrailIntervened => "content_filter",
        _ => "stop",
    }
}

pub(super) fn usage(output: &TextOutput) -> Value {
    json!({
        "prompt_tokens": output.usage.input_tokens,
        "completion_tokens": output.usage.output_tokens,
        "total_tokens": output.usage.input_tokens + output.usage.output_tokens,
        "prompt_tokens_details": { "cached_tokens": output.usage.cached_tokens },
    })
}

pub(super) fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

pub fn chat_response(id: &str, model: &str, output: &TextOutput) -> Value {
    let mut message = json!({ "role": "assistant", "content": output.text });
    if let Some(call) = &output.tool_call {
        message["content"] = Value::Null;
        message["tool_calls"] = json!([{
            "id": call.id, "type": "function",
            "function": { "name": call.name, "arguments": call.input.to_string() },
        }]);
    }
    json!({
        "id": format!("chatcmpl-{id}"),
        "object": "chat.completion",
        "created": unix_now(),
        "model": model,
        "choices": [{ "index": 0, "message": message, "finish_reason": finish_reason(output.stop_reason), "logprobs": null }],
        "usage": usage(output),
    })
}

/// One `chat.completion.chunk`.
pub fn chunk(id: &str, model: &str, delta: Value, finish: Option<StopReason>) -> Value {
    json!({
        "id": format!("chatcmpl-{id}"),
        "object": "chat.completion.chunk",
        "created": unix_now(),
        "model": model,
        "choices": [{ "index": 0, "delta": delta, "finish_reason": finish.map(finish_reason), "logprobs": null }],
    })
}

/// The usage-only chunk sent last when `stream_options.include_usage` is set.
pub fn usage_chunk(id: &str, model: &str, output: &TextOutput) -> Value {
    json!({
        "id": format!("chatcmpl-{id}"),
        "object": "chat.completion.chunk",
        "created": unix_now(),
        "model": model,
        "choices": [],
        "usage": usage(output),
    })
}

/// An embeddings body: model, texts, and whether vectors go back as base64 (what the OpenAI
/// Python client asks for by default).
#[derive(Debug)]
pub struct EmbeddingsRequest {
    pub model: String,
    pub texts: Vec<String>,
    pub base64: bool,
    /// The vector width asked for, checked against the model's own.
    pub dimensions: Option<u32>,
}

pub fn embeddings_request(body: &Value) -> Result<EmbeddingsRequest, ApiError> {
    check_fields(body, &["model", "input", "encoding_format", "dimensions", "user"], &[])?;
    let model = body["model"]
        .as_str()
        .filter(|m| !m.is_empty())
        .ok_or_else(|| ApiError::validation("you must provide a model parameter"))?
        .to_string();
    let texts = match &body["input"] {
        Value::String(s) => vec![s.clone()],
        Value::Array(items) => {
            items.iter().map(|v| v.as_str().map(str::to_owned)).collect::<Option<Vec<_>>>().ok_or_else(|| {
                ApiError::validation("input must be a string or a list of strings (token arrays are not supported)")
            })?
        }
        _ => return Err(ApiError::validation("input is required: a string or a list of strings")),
    };
    if texts.is_empty() || texts.len() > 2048 || texts.iter().any(String::is_empty) {
        return Err(ApiError::validation("input must hold 1 to 2048 non-empty strings"));
    }
    let base64 = match body["encoding_format"].as_str() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => return Err(ApiError::validation(format!("encoding_format {other:?} must be float or base64"))),
    };
    let dimensions = match body.get("dimensions") {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_u64() {
            Some(n) if (1..=u32::MAX as u64).contains(&n) => Some(n as u32),
            _ => return Err(ApiError::validation("dimensions must be an integer of at least 1")),
        },
    };
    Ok(EmbeddingsRequest { model, texts, base64, dimensions })
}

pub fn embeddings_response(model: &str, vectors: &[Vec<f32>], base64: bool, tokens: u32) -> Value {
    let data: Vec<Value> = vectors
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let embedding = if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|f| f.to_le_bytes()).collect();
                Value::from(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(v)
            };
            json!({ "object": "embedding", "index": i, "embedding": embedding })
        })
        .collect();
    json!({
        "object": "list",
        "data": data,
        "model": model,
        "usage": { "prompt_tokens": tokens, "total_tokens": tokens },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::Usage;

    #[test]
    fn chat_bodies_map_to_runner_requests() {
        let c = chat_request(&json!({
            "model": "m", "stream": true, "stream_options": {"include_usage": true},
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
            ],
            "max_tokens": 9, "temperature": 1.5, "stop": "\n", "seed": 3,
        }))
        .unwrap();
        assert!(c.stream && c.include_usage);
        assert_eq!(c.request.messages[1].content, "Hi");
        assert_eq!((c.request.max_tokens, c.request.seed, c.request.stop_sequences.len()), (Some(9), 3, 1));
    }

    #[test]
    fn bad_chat_bodies_are_rejected() {
        for body in [
            json!({"messages": [{"role": "user", "content": "x"}]}),
            json!({"model": "m", "messages": []}),
            json!({"model": "m", "messages": [{"role": "wizard", "content": "x"}]}),
            json!({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
            json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 3}),
            json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 2}),
            json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}),
            json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "xml"}}),
            json!([1, 2]),
        ] {
            assert!(chat_request(&body).is_err(), "{body}");
        }
    }

    fn chat_with(extra: Value) -> Result<ChatCompletion, ApiError> {
        let mut body = json!({"model": "m", "messages": [{"role": "user", "content": "x"}]});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        chat_request(&body)
    }

    #[test]
    fn logprobs_take_openais_shape() {
        assert!(chat_with(json!({"logprobs": true})).unwrap().request.logprobs);
        assert!(!chat_with(json!({"logprobs": false, "top_logprobs": 0})).unwrap().request.logprobs);
        // "é" split across two tokens: each token keeps its bytes; its text is lossy.
        let token = |bytes: Vec<u8>, logprob| TokenLogprob { bytes, logprob, top: Vec::new() };
        let mut tokens = [token(vec![0xc3], -1.0), token(vec![0xa9], -0.5)];
        tokens[0].top = vec![token(vec![0xc3], -1.0), token(b"e".to_vec(), -1.5)];
        let body = with_logprobs(chunk("a", "m", json!({"content": "é"}), None), &tokens);
        let content = &body["choices"][0]["logprobs"]["content"];
        assert_eq!(content[0]["bytes"], json!([0xc3]));
        assert_eq!(content[1]["logprob"], -0.5);
        assert_eq!(content[1]["top_logprobs"], json!([]));
        assert_eq!(content[0]["top_logprobs"][1], json!({"token": "e", "logprob": -1.5, "bytes": [101]}));
        assert_eq!(chat_with(json!({"logprobs": true, "top_logprobs": 5})).unwrap().request.top_logprobs, 5);
        assert!(body["choices"][0]["logprobs"]["refusal"].is_null());
    }

    #[test]
    fn fields_the_sdks_send_at_their_defaults_are_accepted() {
        let defaults = json!({
            "frequency_penalty": 0, "presence_penalty": 0.0, "logit_bias": {}, "n": 1, "user": "u-1",
            "store": false, "metadata": null, "service_tier": "auto", "modalities": ["text"], "audio": null,
            "parallel_tool_calls": true, "logprobs": false, "top_logprobs": null, "stream": false,
            "stream_options": null, "prompt_cache_key": "k", "reasoning_effort": null, "function_call": null,
        });
        chat_with(defaults).unwrap();
    }

    #[test]
    fn unknown_fields_and_unserved_values_are_refused_by_name() {
        let err = chat_with(json!({"temprature": 0.5})).unwrap_err();
        assert_eq!(err.to_string(), "Unrecognized request argument supplied: temprature");
        for (extra, field) in [
            (json!({"presence_penalty": 0.5}), "presence_penalty"),
            (json!({"frequency_penalty": -1}), "frequency_penalty"),
            (json!({"logit_bias": {"50256": -100}}), "logit_bias"),
            (json!({"store": true}), "store"),
            (json!({"service_tier": "flex"}), "service_tier"),
            (json!({"modalities": ["text", "audio"]}), "modalities"),
            (json!({"reasoning_effort": "high"}), "reasoning_effort"),
            (json!({"n": 3}), "n must be 1"),
            (json!({"top_logprobs": 21, "logprobs": true}), "top_logprobs"),
            (json!({"top_logprobs": 2}), "top_logprobs needs logprobs"),
        ] {
            let err = chat_with(extra.clone()).unwrap_err().to_string();
            assert!(err.starts_with(field), "{extra}: {err}");
        }
        let err = embeddings_request(&json!({"model": "e", "input": "x", "truncate": "END"})).unwrap_err();
        assert_eq!(err.to_string(), "Unrecognized request argument supplied: truncate");
    }

    #[test]
    fn embeddings_come_back_as_floats_or_base64() {
        let r = embeddings_request(&json!({"model": "e", "input": ["a", "b"], "encoding_format": "base64"})).unwrap();
        assert!(r.base64 && r.texts.len() == 2);
        let body = embeddings_response("e", &[vec![1.0, -2.0]], true, 3);
        let b64 = body["data"][0]["embedding"].as_str().unwrap();
        let bytes = base64::engine::general_purpose::STANDARD.decode(b64).unwrap();
        assert_eq!(f32::from_le_bytes(bytes[4..8].try_into().unwrap()), -2.0);
        assert!(embeddings_request(&json!({"model": "e", "input": [[1, 2]]})).is_err());
        assert!(embeddings_request(&json!({"model": "e", "input": "x", "encoding_format": "int8"})).is_err());
    }

    #[test]
    fn replies_follow_the_openai_shapes() {
        let out = TextOutput {
            text: "Hi".into(),
            tool_call: None,
            stop_reason: StopReason::MaxTokens,
            stop_sequence: None,
            usage: Usage { input_tokens: 5, output_tokens: 1, cached_tokens: 0 },
        };
        let r = chat_response("abc", "m", &out);
        assert_eq!(r["choices"][0]["finish_reason"], "length");
        assert_eq!(r["usage"]["total_tokens"], 6);
        assert_eq!(chunk("abc", "m", json!({"content": "x"}), None)["object"], "chat.completion.chunk");
    }

    #[test]
    fn prompt_tokens_include_cached_ones_as_openai_counts_them() {
        let out = TextOutput {
            text: "Hi".into(),
            tool_call: None,
            stop_reason: StopReason::EndTurn,
            stop_sequence: None,
            usage: Usage { input_tokens: 600, output_tokens: 20, cached_tokens: 544 },
        };
        for usage in [&chat_response("a", "m", &out)["usage"], &usage_chunk("a", "m", &out)["usage"]] {
            assert_eq!(usage["prompt_tokens"], 600, "{usage}");
            assert_eq!(usage["prompt_tokens_details"]["cached_tokens"], 544);
            assert_eq!(usage["total_tokens"], 620);
        }
    }

    #[test]
    fn a_cache_salt_in_the_body_is_taken_and_checked() {
        let body =
            |salt: Value| json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "cache_salt": salt});
        assert_eq!(chat_request(&body(json!("team-1"))).unwrap().cache_salt.as_deref(), Some("team-1"));
        assert_eq!(chat_request(&body(Value::Null)).unwrap().cache_salt, None);
        assert!(chat_request(&body(json!(7))).is_err());
    }
}
