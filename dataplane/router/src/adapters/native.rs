//! The native InvokeModel bodies users already send to Bedrock, recognised by their fields and
//! answered in the matching shape:
//!
//! | body | recognised by | reply |
//! |---|---|---|
//! | Anthropic messages | `anthropic_version` or `messages` | `{id, type: message, content, stop_reason, usage}` |
//! | Llama | `prompt` with `max_gen_len` (or nothing else) | `{generation, prompt_token_count, generation_token_count, stop_reason}` |
//! | Mistral | `prompt` with `max_tokens`/`top_k`/`stop` | `{outputs: [{text, stop_reason}]}` |
//! | Titan embeddings | `inputText` | `{embedding, inputTextTokenCount}` |
//! | Cohere embeddings | `texts` | `{id, embeddings, texts, response_type}` |

use mantle_proto::ChatMessage;
use serde_json::{Value, json};

use super::{StopReason, TextOutput, TextRequest, Tool, ToolChoice, Usage, check_sampling, tools_prompt};
use crate::error::ApiError;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TextDialect {
    Anthropic,
    Llama,
    Mistral,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EmbedDialect {
    Titan,
    Cohere,
}

/// Parses the InvokeModel body into JSON, or explains why not.
pub fn json_body(body: &[u8]) -> Result<Value, ApiError> {
    if body.is_empty() {
        return Err(ApiError::validation("The request body is empty; InvokeModel needs the model's JSON body."));
    }
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::validation(format!("Malformed input request: the body is not valid JSON ({e})")))?;
    if !value.is_object() {
        return Err(ApiError::validation("Malformed input request: the body must be a JSON object"));
    }
    Ok(value)
}

fn opt_f32(body: &Value, key: &str) -> Result<Option<f32>, ApiError> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .map(|f| Some(f as f32))
            .ok_or_else(|| ApiError::validation(format!("Malformed input request: {key} must be a number"))),
    }
}

fn opt_u32(body: &Value, key: &str) -> Result<Option<u32>, ApiError> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) if (1..=u32::MAX as u64).contains(&n) => Ok(Some(n as u32)),
            _ => Err(ApiError::validation(format!(
                "Malformed input request: {key} must be a whole number of at least 1"
            ))),
        },
    }
}

fn strings(body: &Value, key: &str) -> Result<Vec<String>, ApiError> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| ApiError::validation(format!("Malformed input request: {key} must hold strings")))
            })
            .collect(),
        Some(_) => Err(ApiError::validation(format!("Malformed input request: {key} must be a list of strings"))),
    }
}

/// Recognises a text-generation body and maps it to a runner request.
pub fn text_request(body: &Value) -> Result<(TextDialect, TextRequest), ApiError> {
    if body.get("anthropic_version").is_some() || body.get("messages").is_some() {
        return Ok((TextDialect::Anthropic, anthropic(body)?));
    }
    let Some(prompt) = body.get("prompt") else {
        return Err(ApiError::validation(
            "Malformed input request: expected an Anthropic messages body (anthropic_version, messages, max_tokens) \
             or a prompt body (prompt, max_gen_len or max_tokens)",
        ));
    };
    let prompt = prompt
        .as_str()
        .filter(|p| !p.is_empty())
        .ok_or_else(|| ApiError::validation("Malformed input request: prompt must be a non-empty string"))?;
    let mistral = ["max_tokens", "top_k", "stop"].iter().any(|k| body.get(k).is_some());
    let dialect = if mistral && body.get("max_gen_len").is_none() { TextDialect::Mistral } else { TextDialect::Llama };
    let max_tokens = match dialect {
        TextDialect::Llama => opt_u32(body, "max_gen_len")?,
        _ => opt_u32(body, "max_tokens")?,
    };
    let temperature = opt_f32(body, "temperature")?.unwrap_or(0.5);
    let top_p = opt_f32(body, "top_p")?.unwrap_or(0.9);
    check_sampling(temperature, top_p, 1.0)?;
    Ok((
        dialect,
        TextRequest {
            prompt: Some(prompt.to_string()),
            max_tokens,
            temperature,
            top_p,
            top_k: opt_u32(body, "top_k")?.unwrap_or(0),
            stop_sequences: strings(body, "stop")?,
            ..Default::default()
        },
    ))
}

/// Text of an Anthropic `content` (a string or a list of blocks).
fn anthropic_content(content: &Value, at: &str) -> Result<String, ApiError> {
    match content {
        Value::String(s) => Ok(s.clone()),
        Value::Array(blocks) => {
            let mut parts = Vec::new();
            for (i, block) in blocks.iter().enumerate() {
                match block.get("type").and_then(Value::as_str) {
                    Some("text") => parts.push(
                        block["text"]
                            .as_str()
                            .ok_or_else(|| ApiError::validation(format!("{at}[{i}].text must be a string")))?
                            .to_string(),
                    ),
                    Some("tool_use") => parts.push(json!({"name": block["name"], "input": block["input"]}).to_string()),
                    Some("tool_result") => {
                        let inner = match &block["content"] {
                            Value::Null => String::new(),
                            c => anthropic_content(c, &format!("{at}[{i}].content"))?,
                        };
                        parts.push(format!(
                            "Result of tool call {}:\n{inner}",
                            block["tool_use_id"].as_str().unwrap_or("")
                        ))
                    }
                    Some(kind @ ("image" | "document")) => {
                        return Err(ApiError::validation(format!("This model doesn't support {kind} content.")));
                    }
                    other => {
                        return Err(ApiError::validation(format!(
                            "{at}[{i}].type {other:?} is not a supported content block type"
                        )));
                    }
                }
            }
            Ok(parts.join("\n"))
        }
        _ => Err(ApiError::validation(format!("{at} must be a string or a list of content blocks"))),
    }
}

fn anthropic(body: &Value) -> Result<TextRequest, ApiError> {
    let Some(max_tokens) = opt_u32(body, "max_tokens")? else {
        return Err(ApiError::validation("Malformed input request: #: required key [max_tokens] not found"));
    };
    let list = body["messages"]
        .as_array()
        .filter(|m| !m.is_empty())
        .ok_or_else(|| ApiError::validation("Malformed input request: messages must be a non-empty list"))?;
    let mut messages = Vec::new();
    if !body["system"].is_null() {
        messages.push(ChatMessage { role: "system".into(), content: anthropic_content(&body["system"], "system")? });
    }
    for (i, m) in list.iter().enumerate() {
        let role = m["role"].as_str().unwrap_or_default();
        if role != "user" && role != "assistant" {
            return Err(ApiError::validation(format!("messages.{i}.role must be user or assistant")));
        }
        messages.push(ChatMessage {
            role: role.into(),
            content: anthropic_content(&m["content"], &format!("messages.{i}.content"))?,
        });
    }
    let mut tools = Vec::new();
    if let Some(list) = body["tools"].as_array() {
        for (i, t) in list.iter().enumerate() {
            let name =
                t["name"].as_str().ok_or_else(|| ApiError::validation(format!("tools.{i}.name must be a string")))?;
            tools.push(Tool {
                name: name.into(),
                description: t["description"].as_str().unwrap_or_default().into(),
                input_schema: t["input_schema"].clone(),
            });
        }
    }
    if !tools.is_empty() {
        let choice = match body["tool_choice"]["type"].as_str() {
            Some("any") => ToolChoice::Any,
            Some("tool") => ToolChoice::Named(body["tool_choice"]["name"].as_str().unwrap_or_default().into()),
            _ => ToolChoice::Auto,
        };
        let text = tools_prompt(&tools, &choice);
        match messages.first_mut() {
            Some(first) if first.role == "system" => first.content = format!("{}\n\n{text}", first.content),
            _ => messages.insert(0, ChatMessage { role: "system".into(), content: text }),
        }
    }
    let temperature = opt_f32(body, "temperature")?.unwrap_or(1.0);
    let top_p = opt_f32(body, "top_p")?.unwrap_or(1.0);
    check_sampling(temperature, top_p, 1.0)?;
    Ok(TextRequest {
        messages,
        max_tokens: Some(max_tokens),
        temperature,
        top_p,
        top_k: opt_u32(body, "top_k")?.unwrap_or(0),
        stop_sequences: strings(body, "stop_sequences")?,
        tools,
        ..Default::default()
    })
}

fn anthropic_stop(reason: StopReason) -> &'static str {
    match reason {
        StopReason::EndTurn | StopReason::MalformedModelOutput | StopReason::GuardrailIntervened => "end_turn",
        StopReason::MaxTokens => "max_tokens",
        StopReason::StopSequence => "stop_sequence",
        StopReason::ToolUse => "tool_use",
    }
}

fn prompt_stop(reason: StopReason) -> &'static str {
    match reason {
        StopReason::MaxTokens => "length",
        _ => "stop",
    }
}

/// An Anthropic `usage`: as Anthropic counts, `input_tokens` are the prompt tokens computed
/// afresh and cache reads are counted apart (Mantle's prefix cache writes as it goes, at no
/// charge, so cache creation is 0).
fn anthropic_usage(usage: &Usage) -> Value {
    json!({
        "input_tokens": usage.uncached_input_tokens(),
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": usage.cache_read_tokens(),
        "output_tokens": usage.output_tokens,
    })
}

/// Bedrock's invocation metrics, carried in the last stream chunk.
pub fn invocation_metrics(output: &TextOutput, latency_ms: u64, first_byte_ms: u64) -> Value {
    json!({
        "inputTokenCount": output.usage.input_tokens,
        "outputTokenCount": output.usage.output_tokens,
        "invocationLatency": latency_ms,
        "firstByteLatency": first_byte_ms,
    })
}

/// The InvokeModel response body.
pub fn response(dialect: TextDialect, request_id: &str, model_id: &str, output: &TextOutput) -> Value {
    match dialect {
        TextDialect::Anthropic => {
            let content = match &output.tool_call {
                Some(call) => json!([{"type": "tool_use", "id": call.id, "name": call.name, "input": call.input}]),
                None => json!([{"type": "text", "text": output.text}]),
            };
            json!({
                "id": format!("msg_bdrk_{request_id}"),
                "type": "message",
                "role": "assistant",
                "model": model_id,
                "content": content,
                "stop_reason": anthropic_stop(output.stop_reason),
                "stop_sequence": output.stop_sequence,
                "usage": anthropic_usage(&output.usage),
            })
        }
        TextDialect::Llama => json!({
            "generation": output.text,
            "prompt_token_count": output.usage.input_tokens,
            "generation_token_count": output.usage.output_tokens,
            "stop_reason": prompt_stop(output.stop_reason),
        }),
        TextDialect::Mistral => {
            json!({ "outputs": [{ "text": output.text, "stop_reason": prompt_stop(output.stop_reason) }] })
        }
    }
}

/// The chunks of InvokeModelWithResponseStream, in the dialect's streaming shape.
pub struct StreamChunks {
    dialect: TextDialect,
    generated: u32,
}

impl StreamChunks {
    pub fn new(dialect: TextDialect) -> Self {
        StreamChunks { dialect, generated: 0 }
    }

    /// Chunks sent once the runner has accepted the prompt.
    pub fn start(&self, request_id: &str, model_id: &str, input_tokens: u32) -> Vec<Value> {
        match self.dialect {
            TextDialect::Anthropic => vec![
                json!({"type": "message_start", "message": {
                    "id": format!("msg_bdrk_{request_id}"), "type": "message", "role": "assistant", "model": model_id,
                    "content": [], "stop_reason": null, "stop_sequence": null,
                    "usage": {"input_tokens": input_tokens, "output_tokens": 0},
                }}),
                json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
            ],
            _ => Vec::new(),
        }
    }

    pub fn delta(&mut self, text: &str, tokens: u32, input_tokens: u32) -> Value {
        let first = self.generated == 0;
        self.generated += tokens;
        match self.dialect {
            TextDialect::Anthropic => {
                json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}})
            }
            TextDialect::Llama => json!({
                "generation": text,
                "prompt_token_count": if first { Value::from(input_tokens) } else { Value::Null },
                "generation_token_count": self.generated,
                "stop_reason": null,
            }),
            TextDialect::Mistral => json!({"outputs": [{"text": text, "stop_reason": null}]}),
        }
    }

    /// An Anthropic tool call as stream chunks (a `tool_use` block after the empty text block).
    pub fn tool_use(&self, call: &super::ToolCall) -> Vec<Value> {
        vec![
            json!({"type": "content_block_stop", "index": 0}),
            json!({"type": "content_block_start", "index": 1,
                "content_block": {"type": "tool_use", "id": call.id, "name": call.name, "input": {}}}),
            json!({"type": "content_block_delta", "index": 1,
                "delta": {"type": "input_json_delta", "partial_json": call.input.to_string()}}),
        ]
    }

    /// The closing chunks; the last carries `amazon-bedrock-invocationMetrics` as Bedrock's do.
    pub fn finish(&self, output: &TextOutput, metrics: Value) -> Vec<Value> {
        match self.dialect {
            TextDialect::Anthropic => vec![
                json!({"type": "content_block_stop", "index": if output.tool_call.is_some() { 1 } else { 0 }}),
                // The final usage: message_start could only give the whole prompt as input,
                // before the runner knew its cache hits; clients take these counts over it.
                json!({"type": "message_delta",
                    "delta": {"stop_reason": anthropic_stop(output.stop_reason), "stop_sequence": output.stop_sequence},
                    "usage": anthropic_usage(&output.usage)}),
                json!({"type": "message_stop", "amazon-bedrock-invocationMetrics": metrics}),
            ],
            TextDialect::Llama => vec![json!({
                "generation": "",
                "prompt_token_count": null,
                "generation_token_count": output.usage.output_tokens,
                "stop_reason": prompt_stop(output.stop_reason),
                "amazon-bedrock-invocationMetrics": metrics,
            })],
            TextDialect::Mistral => vec![json!({
                "outputs": [{"text": "", "stop_reason": prompt_stop(output.stop_reason)}],
                "amazon-bedrock-invocationMetrics": metrics,
            })],
        }
    }
}

/// Recognises an embedding body: the texts to embed.
pub fn embed_request(body: &Value) -> Result<(EmbedDialect, Vec<String>), ApiError> {
    if let Some(text) = body.get("inputText") {
        let text = text
            .as_str()
            .filter(|t| !t.is_empty())
            .ok_or_else(|| ApiError::validation("Malformed input request: inputText must be a non-empty string"))?;
        return Ok((EmbedDialect::Titan, vec![text.to_string()]));
    }
    if body.get("texts").is_some() {
        let texts = strings(body, "texts")?;
        if texts.is_empty() || texts.len() > 96 || texts.iter().any(String::is_empty) {
            return Err(ApiError::validation("Malformed input request: texts must hold 1 to 96 non-empty strings"));
        }
        return Ok((EmbedDialect::Cohere, texts));
    }
    Err(ApiError::validation(
        "Malformed input request: an embedding model takes {\"inputText\": \"…\"} (Titan) or {\"texts\": [\"…\"]} (Cohere)",
    ))
}

pub fn embed_response(
    dialect: EmbedDialect,
    request_id: &str,
    texts: &[String],
    vectors: &[Vec<f32>],
    tokens: u32,
) -> Value {
    match dialect {
        EmbedDialect::Titan => json!({ "embedding": vectors.first(), "inputTextTokenCount": tokens }),
        EmbedDialect::Cohere => json!({
            "id": request_id,
            "embeddings": vectors,
            "texts": texts,
            "response_type": "embeddings_floats",
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn output() -> TextOutput {
        TextOutput {
            text: "Paris.".into(),
            tool_call: None,
            stop_reason: StopReason::MaxTokens,
            stop_sequence: None,
            usage: Usage { input_tokens: 9, output_tokens: 3, cached_tokens: 0 },
        }
    }

    #[test]
    fn bodies_are_recognised_by_their_fields() {
        let (d, r) = text_request(&json!({
            "anthropic_version": "bedrock-2023-05-31", "max_tokens": 20, "system": "Be brief.",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "Capital of France?"}]}],
        }))
        .unwrap();
        assert_eq!(d, TextDialect::Anthropic);
        assert_eq!((r.messages.len(), r.max_tokens), (2, Some(20)));
        let (d, r) = text_request(&json!({"prompt": "Hi", "max_gen_len": 8, "temperature": 0.1})).unwrap();
        assert_eq!((d, r.prompt.as_deref(), r.max_tokens), (TextDialect::Llama, Some("Hi"), Some(8)));
        let (d, r) = text_request(&json!({"prompt": "Hi", "max_tokens": 8, "stop": ["\n"]})).unwrap();
        assert_eq!((d, r.stop_sequences.len()), (TextDialect::Mistral, 1));
        assert_eq!(embed_request(&json!({"inputText": "x"})).unwrap().0, EmbedDialect::Titan);
        assert_eq!(embed_request(&json!({"texts": ["a", "b"], "input_type": "search_query"})).unwrap().1.len(), 2);
    }

    #[test]
    fn malformed_native_bodies_are_validation_errors() {
        for body in [
            json!({"anthropic_version": "bedrock-2023-05-31", "messages": [{"role": "user", "content": "x"}]}),
            json!({"anthropic_version": "x", "max_tokens": 5, "messages": []}),
            json!({"anthropic_version": "x", "max_tokens": 5, "messages": [{"role": "bot", "content": "x"}]}),
            json!({"anthropic_version": "x", "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "image"}]}]}),
            json!({"anthropic_version": "x", "max_tokens": 0, "messages": [{"role": "user", "content": "x"}]}),
            json!({"prompt": ""}),
            json!({"prompt": 3}),
            json!({"prompt": "x", "temperature": "hot"}),
            json!({"prompt": "x", "max_gen_len": -1}),
            json!({"inputs": "x"}),
        ] {
            let err = text_request(&body).unwrap_err();
            assert_eq!(err.kind(), "ValidationException", "{body}");
        }
        assert!(embed_request(&json!({"texts": []})).is_err());
        assert!(json_body(b"").is_err() && json_body(b"[1]").is_err() && json_body(b"{").is_err());
    }

    #[test]
    fn anthropic_input_tokens_exclude_cache_reads() {
        let cached =
            TextOutput { usage: Usage { input_tokens: 600, output_tokens: 3, cached_tokens: 544 }, ..output() };
        let body = response(TextDialect::Anthropic, "r1", "m", &cached);
        assert_eq!(body["usage"]["input_tokens"], 56, "{}", body["usage"]);
        assert_eq!(body["usage"]["cache_read_input_tokens"], 544);
        assert_eq!(body["usage"]["cache_creation_input_tokens"], 0);
        assert_eq!(body["usage"]["output_tokens"], 3);
        let chunks = StreamChunks::new(TextDialect::Anthropic).finish(&cached, json!({}));
        let delta = chunks.iter().find(|c| c["type"] == "message_delta").unwrap();
        assert_eq!(delta["usage"], body["usage"], "the stream ends with the same usage");
    }

    #[test]
    fn replies_take_the_dialect_shape() {
        let a = response(TextDialect::Anthropic, "r1", "m", &output());
        assert_eq!((a["content"][0]["text"].as_str(), a["stop_reason"].as_str()), (Some("Paris."), Some("max_tokens")));
        assert_eq!(a["usage"]["input_tokens"], 9);
        let l = response(TextDialect::Llama, "r1", "m", &output());
        assert_eq!((l["generation"].as_str(), l["stop_reason"].as_str()), (Some("Paris."), Some("length")));
        let m = response(TextDialect::Mistral, "r1", "m", &output());
        assert_eq!(m["outputs"][0]["text"], "Paris.");
        let mut chunks = StreamChunks::new(TextDialect::Llama);
        assert_eq!(chunks.delta("Par", 1, 9)["prompt_token_count"], 9);
        assert!(chunks.delta("is", 1, 9)["prompt_token_count"].is_null());
        let last = chunks.finish(&output(), json!({"inputTokenCount": 9}));
        assert_eq!(last[0]["amazon-bedrock-invocationMetrics"]["inputTokenCount"], 9);
    }
}
