//! Converse and ConverseStream: the request body to a [`TextRequest`], the reply to Converse's
//! response and stream events.

use mantle_proto::ChatMessage;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::{TextOutput, TextRequest, Tool, ToolChoice, Usage, check_sampling, tools_prompt};
use crate::error::ApiError;

/// The Converse request body (the model id comes from the URI).
#[derive(Deserialize, Debug, Default)]
#[serde(rename_all = "camelCase")]
pub struct ConverseBody {
    #[serde(default)]
    pub messages: Vec<Message>,
    #[serde(default)]
    pub system: Vec<Value>,
    #[serde(default)]
    pub inference_config: Option<InferenceConfig>,
    #[serde(default)]
    pub tool_config: Option<ToolConfig>,
    #[serde(default)]
    pub output_config: Option<Value>,
    #[serde(default)]
    pub guardrail_config: Option<Value>,
    #[serde(default)]
    pub additional_model_request_fields: Option<Value>,
    #[serde(default)]
    pub service_tier: Option<Value>,
    #[serde(default)]
    pub request_metadata: Option<Map<String, Value>>,
}

#[derive(Deserialize, Debug)]
#[serde(rename_all = "camelCase")]
pub struct Message {
    pub role: String,
    pub content: Vec<Value>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(rename_all = "camelCase")]
pub struct InferenceConfig {
    pub max_tokens: Option<i64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    #[serde(default)]
    pub stop_sequences: Vec<String>,
}

#[derive(Deserialize, Debug)]
#[serde(rename_all = "camelCase")]
pub struct ToolConfig {
    pub tools: Vec<Value>,
    #[serde(default)]
    pub tool_choice: Option<Value>,
}

/// Exactly one key of a union, or a ValidationException naming `what`.
fn union<'a>(value: &'a Value, what: &str) -> Result<(&'a str, &'a Value), ApiError> {
    let obj = value.as_object().ok_or_else(|| ApiError::validation(format!("{what} must be an object")))?;
    let mut keys = obj.iter().filter(|(_, v)| !v.is_null());
    match (keys.next(), keys.next()) {
        (Some((k, v)), None) => Ok((k.as_str(), v)),
        (None, _) => Err(ApiError::validation(format!("{what} must set exactly one member; it sets none"))),
        (Some(_), Some(_)) => Err(ApiError::validation(format!("{what} must set exactly one member; it sets several"))),
    }
}

fn text_of(value: &Value, what: &str) -> Result<String, ApiError> {
    value.as_str().map(str::to_owned).ok_or_else(|| ApiError::validation(format!("{what} must be a string")))
}

/// The text a content block contributes to the prompt.
fn block_text(block: &Value, at: &str) -> Result<Option<String>, ApiError> {
    let (kind, body) = union(block, at)?;
    Ok(match kind {
        "text" => Some(text_of(body, &format!("{at}.text"))?),
        "cachePoint" | "reasoningContent" => None,
        "guardContent" => {
            let (_, inner) = union(body, &format!("{at}.guardContent"))?;
            Some(text_of(&inner["text"], &format!("{at}.guardContent.text.text"))?)
        }
        "toolUse" => {
            let name = text_of(&body["name"], &format!("{at}.toolUse.name"))?;
            Some(json!({ "name": name, "input": body.get("input").cloned().unwrap_or(json!({})) }).to_string())
        }
        "toolResult" => {
            let id = text_of(&body["toolUseId"], &format!("{at}.toolResult.toolUseId"))?;
            let parts = body["content"]
                .as_array()
                .ok_or_else(|| ApiError::validation(format!("{at}.toolResult.content must be a list")))?;
            let mut text = format!("Result of tool call {id}:");
            for (i, part) in parts.iter().enumerate() {
                let (k, v) = union(part, &format!("{at}.toolResult.content[{i}]"))?;
                match k {
                    "text" => text.push_str(&format!("\n{}", text_of(v, "text")?)),
                    "json" => text.push_str(&format!("\n{v}")),
                    other => return Err(unsupported(other)),
                }
            }
            Some(text)
        }
        "image" | "document" | "video" | "audio" | "searchResult" | "citationsContent" | "toolAddition"
        | "toolRemoval" => return Err(unsupported(kind)),
        other => {
            return Err(ApiError::validation(format!(
                "{at} has an unknown content block type {other:?}; expected text, toolUse, toolResult, guardContent or cachePoint"
            )));
        }
    })
}

fn unsupported(kind: &str) -> ApiError {
    ApiError::validation(format!(
        "This model doesn't support the {kind} content block that you provided. Try again with a supported content block."
    ))
}

/// The parts of a Converse body that become a runner request.
pub fn to_request(body: &ConverseBody) -> Result<TextRequest, ApiError> {
    if body.messages.is_empty() {
        return Err(ApiError::validation("messages must contain at least one message"));
    }
    let mut system = Vec::new();
    for (i, block) in body.system.iter().enumerate() {
        if let Some(text) = block_text(block, &format!("system[{i}]"))? {
            system.push(text);
        }
    }
    let mut messages: Vec<ChatMessage> = Vec::new();
    for (i, m) in body.messages.iter().enumerate() {
        let role = match m.role.as_str() {
            "user" | "assistant" => m.role.clone(),
            other => {
                return Err(ApiError::validation(format!(
                    "messages[{i}].role is {other:?}; it must be user or assistant (system text goes in `system`)"
                )));
            }
        };
        if m.content.is_empty() {
            return Err(ApiError::validation(format!("messages[{i}].content must not be empty")));
        }
        let mut parts = Vec::new();
        for (j, block) in m.content.iter().enumerate() {
            if let Some(text) = block_text(block, &format!("messages[{i}].content[{j}]"))? {
                parts.push(text);
            }
        }
        let content = parts.join("\n");
        // Consecutive turns of one role are merged, as one turn.
        match messages.last_mut() {
            Some(last) if last.role == role => {
                last.content.push('\n');
                last.content.push_str(&content);
            }
            _ => messages.push(ChatMessage { role, content }),
        }
    }
    if messages.first().is_some_and(|m| m.role != "user") {
        return Err(ApiError::validation("A conversation must start with a user message."));
    }
    let config = body.inference_config.as_ref();
    let max_tokens = match config.and_then(|c| c.max_tokens) {
        Some(n) if !(1..=u32::MAX as i64).contains(&n) => {
            return Err(ApiError::validation(format!("inferenceConfig.maxTokens {n} must be at least 1")));
        }
        Some(n) => Some(n as u32),
        None => None,
    };
    let temperature = config.and_then(|c| c.temperature).unwrap_or(0.7);
    let top_p = config.and_then(|c| c.top_p).unwrap_or(1.0);
    check_sampling(temperature, top_p, 1.0)?;
    let stop_sequences = config.map(|c| c.stop_sequences.clone()).unwrap_or_default();
    if stop_sequences.len() > 2500 || stop_sequences.iter().any(String::is_empty) {
        return Err(ApiError::validation("inferenceConfig.stopSequences must hold 1 to 2500 non-empty strings"));
    }
    let (tools, choice) = match &body.tool_config {
        Some(tc) => parse_tools(tc)?,
        None => (Vec::new(), ToolChoice::Auto),
    };
    let json_schema = match &body.output_config {
        Some(oc) => Some(output_schema(oc)?),
        None => None,
    };
    if !tools.is_empty() {
        system.push(tools_prompt(&tools, &choice));
    }
    if let Some(schema) = &json_schema {
        system.push(super::structured::instruction(schema));
    }
    if !system.is_empty() {
        messages.insert(0, ChatMessage { role: "system".into(), content: system.join("\n\n") });
    }
    let top_k = body
        .additional_model_request_fields
        .as_ref()
        .and_then(|f| f.get("top_k").or_else(|| f.get("topK")))
        .and_then(Value::as_u64)
        .unwrap_or(0) as u32;
    Ok(TextRequest {
        messages,
        prompt: None,
        max_tokens,
        temperature,
        top_p,
        top_k,
        seed: 0,
        stop_sequences,
        tools,
        json_schema,
        logprobs: false,
    })
}

fn parse_tools(tc: &ToolConfig) -> Result<(Vec<Tool>, ToolChoice), ApiError> {
    if tc.tools.is_empty() {
        return Err(ApiError::validation("toolConfig.tools must contain at least one tool"));
    }
    let mut tools = Vec::new();
    for (i, t) in tc.tools.iter().enumerate() {
        let at = format!("toolConfig.tools[{i}]");
        let (kind, spec) = union(t, &at)?;
        match kind {
            "toolSpec" => {
                let name = text_of(&spec["name"], &format!("{at}.toolSpec.name"))?;
                let valid = (1..=64).contains(&name.len())
                    && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
                if !valid {
                    return Err(ApiError::validation(format!(
                        "{at}.toolSpec.name {name:?} must match [a-zA-Z0-9_-]{{1,64}}"
                    )));
                }
                let (schema_kind, schema) = union(&spec["inputSchema"], &format!("{at}.toolSpec.inputSchema"))?;
                if schema_kind != "json" || !schema.is_object() {
                    return Err(ApiError::validation(format!("{at}.toolSpec.inputSchema.json must be a JSON object")));
                }
                tools.push(Tool {
                    name,
                    description: spec["description"].as_str().unwrap_or_default().to_string(),
                    input_schema: schema.clone(),
                });
            }
            "cachePoint" => {}
            other => return Err(ApiError::validation(format!("{at}: {other} tools are not supported"))),
        }
    }
    let choice = match &tc.tool_choice {
        None => ToolChoice::Auto,
        Some(c) => match union(c, "toolConfig.toolChoice")? {
            ("auto", _) => ToolChoice::Auto,
            ("any", _) => ToolChoice::Any,
            ("tool", v) => {
                let name = text_of(&v["name"], "toolConfig.toolChoice.tool.name")?;
                if !tools.iter().any(|t| t.name == name) {
                    return Err(ApiError::validation(format!("toolConfig.toolChoice names an unknown tool {name:?}")));
                }
                ToolChoice::Named(name)
            }
            (other, _) => return Err(ApiError::validation(format!("toolConfig.toolChoice: unknown choice {other:?}"))),
        },
    };
    Ok((tools, choice))
}

/// The JSON schema of `outputConfig.textFormat` (given as a string, as the API models it).
fn output_schema(oc: &Value) -> Result<Value, ApiError> {
    let format = &oc["textFormat"];
    if format.is_null() {
        return Err(ApiError::validation("outputConfig.textFormat is required"));
    }
    if format["type"] != "json_schema" {
        return Err(ApiError::validation("outputConfig.textFormat.type must be json_schema"));
    }
    let (_, structure) = union(&format["structure"], "outputConfig.textFormat.structure")?;
    let schema = &structure["schema"];
    let schema = match schema {
        Value::String(s) => serde_json::from_str(s).map_err(|e| {
            ApiError::validation(format!("outputConfig.textFormat.structure.jsonSchema.schema is not JSON: {e}"))
        })?,
        Value::Object(_) => schema.clone(),
        _ => return Err(ApiError::validation("outputConfig.textFormat.structure.jsonSchema.schema is required")),
    };
    super::structured::compile(&schema)?;
    Ok(schema)
}

/// The content blocks of a reply.
pub fn content(output: &TextOutput) -> Vec<Value> {
    let mut blocks = Vec::new();
    match &output.tool_call {
        Some(call) => blocks.push(json!({"toolUse": {"toolUseId": call.id, "name": call.name, "input": call.input}})),
        None => blocks.push(json!({ "text": output.text })),
    }
    blocks
}

/// Converse's `usage`. As on Bedrock, `inputTokens` are the prompt tokens computed afresh:
/// cache reads are counted apart in `cacheReadInputTokens`, not in both, and `totalTokens` is
/// the sum of the three.
pub fn usage(usage: &Usage) -> Value {
    let (input, cached) = (usage.uncached_input_tokens(), usage.cache_read_tokens());
    let mut u = json!({
        "inputTokens": input,
        "outputTokens": usage.output_tokens,
        "totalTokens": input + usage.output_tokens + cached,
    });
    if cached > 0 {
        u["cacheReadInputTokens"] = cached.into();
        u["cacheWriteInputTokens"] = 0.into();
    }
    u
}

/// The Converse response body.
pub fn response(output: &TextOutput, latency_ms: u64) -> Value {
    json!({
        "output": { "message": { "role": "assistant", "content": content(output) } },
        "stopReason": output.stop_reason.converse(),
        "usage": usage(&output.usage),
        "metrics": { "latencyMs": latency_ms },
    })
}

/// The ConverseStream events that close a reply (after its text deltas).
pub fn closing_events(output: &TextOutput, text_block_open: bool, latency_ms: u64) -> Vec<(&'static str, Value)> {
    let mut events = Vec::new();
    let mut index = 0;
    if text_block_open {
        events.push(("contentBlockStop", json!({ "contentBlockIndex": 0 })));
        index = 1;
    }
    if let Some(call) = &output.tool_call {
        events.push((
            "contentBlockStart",
            json!({"contentBlockIndex": index, "start": {"toolUse": {"toolUseId": call.id, "name": call.name}}}),
        ));
        events.push((
            "contentBlockDelta",
            json!({"contentBlockIndex": index, "delta": {"toolUse": {"input": call.input.to_string()}}}),
        ));
        events.push(("contentBlockStop", json!({ "contentBlockIndex": index })));
    }
    events.push(("messageStop", json!({ "stopReason": output.stop_reason.converse() })));
    events.push(("metadata", json!({ "usage": usage(&output.usage), "metrics": { "latencyMs": latency_ms } })));
    events
}

pub fn text_delta(text: &str) -> Value {
    json!({ "contentBlockIndex": 0, "delta": { "text": text } })
}

/// ConverseStream's first event.
pub fn message_start() -> Value {
    json!({ "role": "assistant" })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::{StopReason, parse_body};

    fn request(body: Value) -> Result<TextRequest, ApiError> {
        let body: ConverseBody = parse_body(body.to_string().as_bytes())?;
        to_request(&body)
    }

    #[test]
    fn messages_system_and_config_map_to_a_runner_request() {
        let r = request(json!({
            "system": [{"text": "Be brief."}, {"cachePoint": {"type": "default"}}],
            "messages": [
                {"role": "user", "content": [{"text": "Hi"}, {"text": "there"}]},
                {"role": "assistant", "content": [{"text": "Hello"}]},
                {"role": "user", "content": [{"text": "2+2?"}]},
            ],
            "inferenceConfig": {"maxTokens": 16, "temperature": 0, "topP": 0.5, "stopSequences": ["\n\n"]},
            "additionalModelRequestFields": {"top_k": 40},
        }))
        .unwrap();
        let roles: Vec<_> = r.messages.iter().map(|m| (m.role.as_str(), m.content.as_str())).collect();
        assert_eq!(roles, [("system", "Be brief."), ("user", "Hi\nthere"), ("assistant", "Hello"), ("user", "2+2?")]);
        assert_eq!((r.max_tokens, r.temperature, r.top_p, r.top_k), (Some(16), 0.0, 0.5, 40));
        assert_eq!(r.stop_sequences, ["\n\n"]);
    }

    #[test]
    fn bad_conversations_are_validation_errors() {
        for (body, want) in [
            (json!({"messages": []}), "at least one message"),
            (json!({"messages": [{"role": "system", "content": [{"text": "x"}]}]}), "user or assistant"),
            (json!({"messages": [{"role": "user", "content": []}]}), "must not be empty"),
            (json!({"messages": [{"role": "user", "content": [{"sticker": {}}]}]}), "unknown content block type"),
            (json!({"messages": [{"role": "user", "content": [{"text": "a", "image": {}}]}]}), "exactly one member"),
            (
                json!({"messages": [{"role": "user", "content": [{"image": {"format": "png", "source": {"bytes": ""}}}]}]}),
                "doesn't support the image content block",
            ),
            (json!({"messages": [{"role": "assistant", "content": [{"text": "x"}]}]}), "start with a user"),
            (json!({"messages": [{"role": "user", "content": [{"text": 3}]}]}), "must be a string"),
            (
                json!({"messages": [{"role": "user", "content": [{"text": "x"}]}], "inferenceConfig": {"maxTokens": 0}}),
                "maxTokens",
            ),
            (
                json!({"messages": [{"role": "user", "content": [{"text": "x"}]}], "inferenceConfig": {"temperature": 2}}),
                "temperature",
            ),
            (json!({"messages": [{"role": "user", "content": "x"}]}), "messages[0].content"),
            (
                json!({"messages": [{"role": "user", "content": [{"text": "x"}]}], "toolConfig": {"tools": [{"toolSpec": {"name": "a b", "inputSchema": {"json": {}}}}]}}),
                "must match",
            ),
            (
                json!({"messages": [{"role": "user", "content": [{"text": "x"}]}], "outputConfig": {"textFormat": {"type": "json_schema", "structure": {"jsonSchema": {"schema": "{not json"}}}}}),
                "not JSON",
            ),
        ] {
            let err = request(body.clone()).map(|_| ()).unwrap_err();
            assert_eq!(err.kind(), "ValidationException", "{body}");
            assert!(err.to_string().contains(want), "{body}: {err}");
        }
    }

    #[test]
    fn tools_and_output_schemas_become_instructions() {
        let r = request(json!({
            "messages": [{"role": "user", "content": [{"text": "Weather in Oslo?"}]}],
            "toolConfig": {
                "tools": [{"toolSpec": {"name": "get_weather", "description": "Weather.", "inputSchema": {"json": {"type": "object"}}}}],
                "toolChoice": {"tool": {"name": "get_weather"}},
            },
        }))
        .unwrap();
        assert_eq!(r.tools.len(), 1);
        assert!(r.messages[0].role == "system" && r.messages[0].content.contains("get_weather"));
        let r = request(json!({
            "messages": [{"role": "user", "content": [{"text": "A person"}]}],
            "outputConfig": {"textFormat": {"type": "json_schema", "structure": {"jsonSchema": {"schema": "{\"type\": \"object\", \"required\": [\"name\"]}"}}}},
        }))
        .unwrap();
        assert_eq!(r.json_schema.unwrap()["required"][0], "name");
    }

    #[test]
    fn cache_reads_are_not_counted_as_input_tokens_too() {
        let u = usage(&Usage { input_tokens: 600, output_tokens: 20, cached_tokens: 544 });
        assert_eq!(u["inputTokens"], 56, "{u}");
        assert_eq!(u["cacheReadInputTokens"], 544);
        assert_eq!(u["cacheWriteInputTokens"], 0);
        assert_eq!(u["totalTokens"], 56 + 20 + 544);
        let cold = usage(&Usage { input_tokens: 600, output_tokens: 20, cached_tokens: 0 });
        assert_eq!((cold["inputTokens"].as_u64(), cold["totalTokens"].as_u64()), (Some(600), Some(620)));
        assert!(cold.get("cacheReadInputTokens").is_none());
        // The stream's metadata event carries the same usage.
        let out = TextOutput {
            text: String::new(),
            tool_call: None,
            stop_reason: StopReason::EndTurn,
            stop_sequence: None,
            usage: Usage { input_tokens: 600, output_tokens: 20, cached_tokens: 544 },
        };
        let (_, metadata) = closing_events(&out, true, 5).pop().unwrap();
        assert_eq!(metadata["usage"], u);
    }

    #[test]
    fn replies_render_as_converse_output() {
        let out = TextOutput {
            text: "4".into(),
            tool_call: None,
            stop_reason: StopReason::EndTurn,
            stop_sequence: None,
            usage: Usage { input_tokens: 10, output_tokens: 2, cached_tokens: 0 },
        };
        let body = response(&out, 12);
        assert_eq!(body["output"]["message"]["content"][0]["text"], "4");
        assert_eq!(body["usage"]["totalTokens"], 12);
        assert_eq!(body["stopReason"], "end_turn");
        assert_eq!(body["metrics"]["latencyMs"], 12);
        let events = closing_events(&out, true, 12);
        let names: Vec<_> = events.iter().map(|(n, _)| *n).collect();
        assert_eq!(names, ["contentBlockStop", "messageStop", "metadata"]);
    }
}
