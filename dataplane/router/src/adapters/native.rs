//! The native InvokeModel bodies users already send to Bedrock. A model takes the body of its
//! family (the FoundationModel's `invokeModelBody`, see [`InvokeModelBody::of`]) and answers in
//! that family's shape; a body of another family, or with keys the family does not have, is
//! refused as Bedrock refuses it.
//!
//! | family | body keys | reply |
//! |---|---|---|
//! | Anthropic messages | `anthropic_version`, `messages`, `max_tokens`, ... | `{id, type: message, content, stop_reason, usage}` |
//! | Llama | `prompt`, `max_gen_len`, `temperature`, `top_p` | `{generation, prompt_token_count, generation_token_count, stop_reason}` |
//! | Mistral | `prompt`, `max_tokens`, `stop`, `temperature`, `top_p`, `top_k` | `{outputs: [{text, stop_reason}]}` |
//! | Titan embeddings | `inputText`, `dimensions`, `normalize`, `embeddingTypes` | `{embedding, inputTextTokenCount}` |
//! | Cohere embeddings | `texts`, `input_type`, `truncate`, `embedding_types` | `{id, embeddings, texts, response_type}` |

use mantle_crds::InvokeModelBody;
use mantle_proto::ChatMessage;
use serde_json::{Value, json};

use super::{
    StopReason, TextOutput, TextRequest, Tool, ToolChoice, Usage, check_sampling, check_tool_choice, tools_prompt,
};
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

impl TextDialect {
    /// The text dialect of a model's body family (None for an embedding family).
    pub fn of(body: InvokeModelBody) -> Option<TextDialect> {
        match body {
            InvokeModelBody::AnthropicMessages => Some(TextDialect::Anthropic),
            InvokeModelBody::Llama => Some(TextDialect::Llama),
            InvokeModelBody::Mistral => Some(TextDialect::Mistral),
            InvokeModelBody::TitanEmbed | InvokeModelBody::CohereEmbed => None,
        }
    }

    fn keys(self) -> &'static [&'static str] {
        match self {
            TextDialect::Anthropic => &[
                "anthropic_version",
                "anthropic_beta",
                "max_tokens",
                "messages",
                "system",
                "stop_sequences",
                "temperature",
                "top_p",
                "top_k",
                "tools",
                "tool_choice",
                "metadata",
            ],
            TextDialect::Llama => &["prompt", "max_gen_len", "temperature", "top_p"],
            TextDialect::Mistral => &["prompt", "max_tokens", "stop", "temperature", "top_p", "top_k"],
        }
    }

    fn name(self) -> &'static str {
        match self {
            TextDialect::Anthropic => "an Anthropic Messages body",
            TextDialect::Llama => "a Llama body",
            TextDialect::Mistral => "a Mistral body",
        }
    }
}

impl EmbedDialect {
    /// The embedding dialect of a model's body family (None for a text family).
    pub fn of(body: InvokeModelBody) -> Option<EmbedDialect> {
        match body {
            InvokeModelBody::TitanEmbed => Some(EmbedDialect::Titan),
            InvokeModelBody::CohereEmbed => Some(EmbedDialect::Cohere),
            _ => None,
        }
    }

    fn keys(self) -> &'static [&'static str] {
        match self {
            EmbedDialect::Titan => &["inputText", "dimensions", "normalize", "embeddingTypes"],
            EmbedDialect::Cohere => &["texts", "input_type", "truncate", "embedding_types"],
        }
    }

    fn name(self) -> &'static str {
        match self {
            EmbedDialect::Titan => "a Titan Text Embeddings body",
            EmbedDialect::Cohere => "a Cohere Embed body",
        }
    }
}

/// Refuses keys the family's body does not have, in Bedrock's words, saying which body the
/// model takes.
fn only_keys(body: &Value, keys: &[&str], name: &str) -> Result<(), ApiError> {
    let extraneous: Vec<&str> =
        body.as_object().into_iter().flat_map(|o| o.keys()).map(String::as_str).filter(|k| !keys.contains(k)).collect();
    if extraneous.is_empty() {
        return Ok(());
    }
    let list = extraneous.iter().map(|k| format!("[{k}]")).collect::<Vec<_>>().join(", ");
    let verb = if extraneous.len() == 1 { "is" } else { "are" };
    Err(ApiError::validation(format!(
        "Malformed input request: #: extraneous key {list} {verb} not permitted; this model takes {name} \
         (keys: {}), please reformat your input and try again.",
        keys.join(", ")
    )))
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

/// Maps a text-generation body of the model's family to a runner request.
pub fn text_request(dialect: TextDialect, body: &Value) -> Result<TextRequest, ApiError> {
    only_keys(body, dialect.keys(), dialect.name())?;
    if dialect == TextDialect::Anthropic {
        return anthropic(body);
    }
    let Some(prompt) = body.get("prompt") else {
        return Err(ApiError::validation(format!(
            "Malformed input request: #: required key [prompt] not found; this model takes {} (keys: {})",
            dialect.name(),
            dialect.keys().join(", ")
        )));
    };
    let prompt = prompt
        .as_str()
        .filter(|p| !p.is_empty())
        .ok_or_else(|| ApiError::validation("Malformed input request: prompt must be a non-empty string"))?;
    let max_tokens = match dialect {
        TextDialect::Llama => opt_u32(body, "max_gen_len")?,
        _ => opt_u32(body, "max_tokens")?,
    };
    let temperature = opt_f32(body, "temperature")?.unwrap_or(0.5);
    let top_p = opt_f32(body, "top_p")?.unwrap_or(0.9);
    check_sampling(temperature, top_p, 1.0)?;
    Ok(TextRequest {
        prompt: Some(prompt.to_string()),
        max_tokens,
        temperature,
        top_p,
        top_k: opt_u32(body, "top_k")?.unwrap_or(0),
        stop_sequences: strings(body, "stop")?,
        ..Default::default()
    })
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
    if body.get("messages").is_none() {
        return Err(ApiError::validation(
            "Malformed input request: #: required key [messages] not found; this model takes an Anthropic Messages body",
        ));
    }
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
    let mut tool_choice = ToolChoice::Auto;
    if !tools.is_empty() {
        let choice = match body["tool_choice"]["type"].as_str() {
            Some("any") => ToolChoice::Any,
            Some("tool") => ToolChoice::Named(body["tool_choice"]["name"].as_str().unwrap_or_default().into()),
            _ => ToolChoice::Auto,
        };
        check_tool_choice(&tools, &choice, "tool_choice")?;
        tool_choice = choice.clone();
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
        tool_choice,
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

/// An embedding body of the model's family, mapped.
#[derive(Clone, Debug, PartialEq)]
pub struct EmbedRequest {
    pub dialect: EmbedDialect,
    pub texts: Vec<String>,
    /// The vector width asked for (Titan `dimensions`), checked against the model's own.
    pub dimensions: Option<u32>,
    /// Whether the reply carries the vectors by type (Titan `embeddingTypes`, Cohere
    /// `embedding_types`); only `float` is served.
    pub by_type: bool,
}

/// The embedding types a body asks for: only `float` is served. Quantised and binary vectors
/// would need the model's own calibration, which Mantle's engines do not have.
fn float_only(body: &Value, key: &str) -> Result<bool, ApiError> {
    if body.get(key).is_none_or(Value::is_null) {
        return Ok(false);
    }
    let types = strings(body, key)?;
    if types.is_empty() {
        return Err(ApiError::validation(format!("Malformed input request: {key} must list at least one type")));
    }
    if let Some(other) = types.iter().find(|t| *t != "float") {
        return Err(ApiError::validation(format!(
            "{key} {other:?} is not supported: this model serves float embeddings only; ask for [\"float\"] or omit {key}"
        )));
    }
    Ok(true)
}

/// Maps an embedding body of the model's family to the texts to embed and how to answer.
pub fn embed_request(dialect: EmbedDialect, body: &Value) -> Result<EmbedRequest, ApiError> {
    only_keys(body, dialect.keys(), dialect.name())?;
    match dialect {
        EmbedDialect::Titan => {
            let text =
                body.get("inputText").and_then(Value::as_str).filter(|t| !t.is_empty()).ok_or_else(|| {
                    ApiError::validation("Malformed input request: inputText must be a non-empty string")
                })?;
            // Vectors are unit length already; `normalize: false` would need the raw pooled vector.
            match body.get("normalize") {
                None | Some(Value::Null) | Some(Value::Bool(true)) => {}
                Some(Value::Bool(false)) => {
                    return Err(ApiError::validation(
                        "normalize false is not supported: this model's embeddings are always normalised to unit length",
                    ));
                }
                Some(_) => return Err(ApiError::validation("Malformed input request: normalize must be a boolean")),
            }
            Ok(EmbedRequest {
                dialect,
                texts: vec![text.to_string()],
                dimensions: opt_u32(body, "dimensions")?,
                by_type: float_only(body, "embeddingTypes")?,
            })
        }
        EmbedDialect::Cohere => {
            let texts = strings(body, "texts")?;
            if texts.is_empty() || texts.len() > 96 || texts.iter().any(String::is_empty) {
                return Err(ApiError::validation("Malformed input request: texts must hold 1 to 96 non-empty strings"));
            }
            if let Some(kind) = body.get("input_type").filter(|v| !v.is_null()) {
                let known = ["search_document", "search_query", "classification", "clustering"];
                if !kind.as_str().is_some_and(|k| known.contains(&k)) {
                    return Err(ApiError::validation(format!(
                        "Malformed input request: input_type {kind} must be one of {}",
                        known.join(", ")
                    )));
                }
            }
            Ok(EmbedRequest { dialect, texts, dimensions: None, by_type: float_only(body, "embedding_types")? })
        }
    }
}

/// Refuses a width other than the model's own (`width`). A model not trained for shortened
/// (Matryoshka) embeddings loses meaning when truncated, so only its own width is served.
pub fn check_dimensions(model_id: &str, asked: Option<u32>, width: Option<usize>) -> Result<(), ApiError> {
    let (Some(asked), Some(width)) = (asked, width) else { return Ok(()) };
    if asked as usize == width {
        return Ok(());
    }
    Err(ApiError::validation(format!(
        "dimensions {asked} is not supported: {model_id} makes {width}-dimensional embeddings and is not trained for \
         shortened (Matryoshka) ones, so it does not truncate them; omit dimensions or set it to {width}"
    )))
}

/// Scales each vector to unit length (what the families' `normalize` promises), whatever the
/// engine returned.
pub fn normalize(vectors: &mut [Vec<f32>]) {
    for v in vectors {
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        if norm > 0.0 {
            v.iter_mut().for_each(|x| *x /= norm);
        }
    }
}

pub fn embed_response(req: &EmbedRequest, request_id: &str, vectors: &[Vec<f32>], tokens: u32) -> Value {
    match req.dialect {
        EmbedDialect::Titan => {
            let mut body = json!({ "embedding": vectors.first(), "inputTextTokenCount": tokens });
            if req.by_type {
                body["embeddingsByType"] = json!({ "float": vectors.first() });
            }
            body
        }
        EmbedDialect::Cohere if req.by_type => json!({
            "id": request_id,
            "embeddings": { "float": vectors },
            "texts": req.texts,
            "response_type": "embeddings_by_type",
        }),
        EmbedDialect::Cohere => json!({
            "id": request_id,
            "embeddings": vectors,
            "texts": req.texts,
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
    fn bodies_are_read_in_the_models_family() {
        let r = text_request(
            TextDialect::Anthropic,
            &json!({
                "anthropic_version": "bedrock-2023-05-31", "max_tokens": 20, "system": "Be brief.",
                "messages": [{"role": "user", "content": [{"type": "text", "text": "Capital of France?"}]}],
            }),
        )
        .unwrap();
        assert_eq!((r.messages.len(), r.max_tokens), (2, Some(20)));
        let r =
            text_request(TextDialect::Llama, &json!({"prompt": "Hi", "max_gen_len": 8, "temperature": 0.1})).unwrap();
        assert_eq!((r.prompt.as_deref(), r.max_tokens), (Some("Hi"), Some(8)));
        let r = text_request(TextDialect::Mistral, &json!({"prompt": "Hi", "max_tokens": 8, "stop": ["\n"]})).unwrap();
        assert_eq!((r.max_tokens, r.stop_sequences.len()), (Some(8), 1));
        // A body that fits either prompt family is read in the model's.
        let both = json!({"prompt": "Hi", "temperature": 0.2, "top_p": 0.9});
        assert!(text_request(TextDialect::Mistral, &both).is_ok() && text_request(TextDialect::Llama, &both).is_ok());
        let e = embed_request(EmbedDialect::Titan, &json!({"inputText": "x"})).unwrap();
        assert_eq!((e.texts.len(), e.dimensions, e.by_type), (1, None, false));
        let e =
            embed_request(EmbedDialect::Cohere, &json!({"texts": ["a", "b"], "input_type": "search_query"})).unwrap();
        assert_eq!(e.texts.len(), 2);
    }

    #[test]
    fn a_body_of_another_family_is_refused_naming_the_key_and_the_family() {
        let cases = [
            (TextDialect::Mistral, json!({"prompt": "Hi", "max_gen_len": 8}), "[max_gen_len]"),
            (TextDialect::Llama, json!({"prompt": "Hi", "max_tokens": 8, "stop": ["x"]}), "[max_tokens], [stop]"),
            (
                TextDialect::Llama,
                json!({"anthropic_version": "x", "max_tokens": 5, "messages": []}),
                "[anthropic_version]",
            ),
            (TextDialect::Anthropic, json!({"prompt": "Hi", "max_tokens": 8}), "[prompt]"),
        ];
        for (dialect, body, key) in cases {
            let err = text_request(dialect, &body).unwrap_err();
            assert_eq!(err.kind(), "ValidationException");
            let message = err.to_string();
            assert!(message.contains(&format!("extraneous key {key}")), "{message}");
            assert!(message.contains(dialect.name()), "{message}");
        }
        let err = embed_request(EmbedDialect::Titan, &json!({"texts": ["a"]})).unwrap_err().to_string();
        assert!(err.contains("[texts]") && err.contains("Titan"), "{err}");
        let err = text_request(TextDialect::Mistral, &json!({})).unwrap_err().to_string();
        assert!(err.contains("required key [prompt]") && err.contains("Mistral"), "{err}");
    }

    #[test]
    fn the_family_is_declared_or_implied_by_the_model_id() {
        use mantle_crds::Modality;
        let of = InvokeModelBody::of;
        assert_eq!(of(Some(InvokeModelBody::Mistral), "acme.x-v1:0", Modality::Text), InvokeModelBody::Mistral);
        assert_eq!(of(None, "mistral.mistral-7b-instruct-v0:2", Modality::Text), InvokeModelBody::Mistral);
        assert_eq!(of(None, "meta.llama3-8b-instruct-v1:0", Modality::Text), InvokeModelBody::Llama);
        assert_eq!(of(None, "cohere.embed-english-v3", Modality::Embedding), InvokeModelBody::CohereEmbed);
        assert_eq!(of(None, "acme.x-v1:0", Modality::Text), InvokeModelBody::AnthropicMessages);
        assert_eq!(of(None, "acme.x-v1:0", Modality::Embedding), InvokeModelBody::TitanEmbed);
    }

    #[test]
    fn embedding_options_are_honoured_or_refused() {
        let titan = |body: Value| embed_request(EmbedDialect::Titan, &body);
        let e = titan(json!({"inputText": "x", "dimensions": 384, "normalize": true, "embeddingTypes": ["float"]}))
            .unwrap();
        assert_eq!((e.dimensions, e.by_type), (Some(384), true));
        let body = embed_response(&e, "r", &[vec![0.6, 0.8]], 2);
        assert_eq!(body["embeddingsByType"]["float"], json!([0.6f32, 0.8f32]));
        assert_eq!(body["embedding"], body["embeddingsByType"]["float"]);
        for (bad, says) in [
            (json!({"inputText": "x", "normalize": false}), "normalize false"),
            (json!({"inputText": "x", "embeddingTypes": ["binary"]}), "\"binary\" is not supported"),
            (json!({"inputText": "x", "dimensions": 0}), "dimensions"),
        ] {
            let err = titan(bad).unwrap_err().to_string();
            assert!(err.contains(says), "{err}");
        }
        assert!(check_dimensions("m", Some(2), Some(2)).is_ok() && check_dimensions("m", Some(7), None).is_ok());
        let err = check_dimensions("m", Some(256), Some(2)).unwrap_err().to_string();
        assert!(err.contains("dimensions 256") && err.contains("Matryoshka") && err.contains("set it to 2"), "{err}");

        let cohere = |body: Value| embed_request(EmbedDialect::Cohere, &body);
        let e = cohere(json!({"texts": ["a"], "embedding_types": ["float"]})).unwrap();
        let body = embed_response(&e, "r", &[vec![1.0]], 1);
        assert_eq!(body["response_type"], "embeddings_by_type");
        assert_eq!(body["embeddings"]["float"], json!([[1.0]]));
        for kind in ["int8", "uint8", "binary", "ubinary"] {
            let err = cohere(json!({"texts": ["a"], "embedding_types": ["float", kind]})).unwrap_err().to_string();
            assert!(err.contains(&format!("{kind:?} is not supported")), "{err}");
        }
        assert!(cohere(json!({"texts": ["a"], "input_type": "poetry"})).is_err());
        let mut v = vec![vec![3.0, 4.0]];
        normalize(&mut v);
        assert_eq!(v[0], [0.6, 0.8]);
    }

    #[test]
    fn malformed_native_bodies_are_validation_errors() {
        for body in [
            json!({"anthropic_version": "bedrock-2023-05-31", "messages": [{"role": "user", "content": "x"}]}),
            json!({"anthropic_version": "x", "max_tokens": 5, "messages": []}),
            json!({"anthropic_version": "x", "max_tokens": 5, "messages": [{"role": "bot", "content": "x"}]}),
            json!({"anthropic_version": "x", "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "image"}]}]}),
            json!({"anthropic_version": "x", "max_tokens": 0, "messages": [{"role": "user", "content": "x"}]}),
            json!({"inputs": "x"}),
        ] {
            let err = text_request(TextDialect::Anthropic, &body).unwrap_err();
            assert_eq!(err.kind(), "ValidationException", "{body}");
        }
        for body in [
            json!({"prompt": ""}),
            json!({"prompt": 3}),
            json!({"prompt": "x", "temperature": "hot"}),
            json!({"prompt": "x", "max_gen_len": -1}),
            json!({"inputs": "x"}),
        ] {
            let err = text_request(TextDialect::Llama, &body).unwrap_err();
            assert_eq!(err.kind(), "ValidationException", "{body}");
        }
        assert!(embed_request(EmbedDialect::Cohere, &json!({"texts": []})).is_err());
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
