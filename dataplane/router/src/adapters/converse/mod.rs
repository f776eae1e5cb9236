//! Converse and ConverseStream: the request body to a [`TextRequest`], the reply to Converse's
//! response and stream events.

use mantle_proto::ChatMessage;
use serde_json::{Value, json};

use super::{TextOutput, TextRequest, Tool, ToolChoice, Usage, check_sampling, check_tool_choice, tools_prompt};
use crate::error::ApiError;

mod body;

pub use body::*;

/// The text a content block contributes to the prompt.
fn block_text(block: &ContentBlock, at: &str) -> Result<Option<String>, ApiError> {
    Ok(match block {
        ContentBlock::Text(text) => Some(text.clone()),
        ContentBlock::CachePoint(_) | ContentBlock::ReasoningContent(_) => None,
        ContentBlock::GuardContent(guarded) => Some(guard_text(guarded)?),
        ContentBlock::ToolUse(call) => Some(json!({ "name": call.name, "input": call.input }).to_string()),
        ContentBlock::ToolResult(result) => {
            let mut text = format!("Result of tool call {}:", result.tool_use_id);
            for (i, part) in result.content.iter().enumerate() {
                match part {
                    ToolResultContent::Text(t) => text.push_str(&format!("\n{t}")),
                    ToolResultContent::Json(v) => text.push_str(&format!("\n{v}")),
                    other => return Err(unsupported(other.member(), &format!("{at}.toolResult.content[{i}]"))),
                }
            }
            Some(text)
        }
        other => return Err(unsupported(other.member(), at)),
    })
}

fn guard_text(guarded: &GuardContent) -> Result<String, ApiError> {
    match guarded {
        GuardContent::Text(t) => Ok(t.text.clone()),
        GuardContent::Image(_) => Err(unsupported("guardContent image", "")),
    }
}

fn unsupported(kind: &str, at: &str) -> ApiError {
    let at = if at.is_empty() { String::new() } else { format!(" (at {at})") };
    ApiError::validation(format!(
        "This model doesn't support the {kind} content block that you provided{at}. Try again with a supported content block."
    ))
}
/// The parts of a Converse body that become a runner request. Members this server does not
/// serve are refused here, by name.
pub fn to_request(body: &ConverseBody) -> Result<TextRequest, ApiError> {
    refuse_unserved(body)?;
    if body.messages.is_empty() {
        return Err(ApiError::validation("messages must contain at least one message"));
    }
    let mut system = Vec::new();
    for block in &body.system {
        match block {
            SystemBlock::Text(text) => system.push(text.clone()),
            SystemBlock::GuardContent(guarded) => system.push(guard_text(guarded)?),
            SystemBlock::CachePoint(_) => {}
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
        Some(oc) => output_schema(oc)?,
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
    Ok(TextRequest {
        messages,
        prompt: None,
        max_tokens,
        temperature,
        top_p,
        top_k: top_k(body.additional_model_request_fields.as_ref())?,
        seed: 0,
        stop_sequences,
        tools,
        tool_choice: choice,
        json_schema,
        ..TextRequest::default()
    })
}

/// Refuses members Bedrock defines that would change the reply but that this server does not
/// serve, and checks the ones it takes without acting on them.
fn refuse_unserved(body: &ConverseBody) -> Result<(), ApiError> {
    if body.prompt_variables.is_some() {
        return Err(ApiError::validation(
            "promptVariables fill a prompt from Prompt management, which this server does not serve; \
             send the prompt's text in messages instead",
        ));
    }
    if let Some(project) = body.project_identifier.as_deref()
        && project != "default"
    {
        return Err(ApiError::validation(format!(
            "projectIdentifier {project:?} is not a project here: this server has only the default project"
        )));
    }
    if let Some(latency) = body.performance_config.as_ref().and_then(|p| p.latency.as_deref()) {
        match latency {
            "standard" => {}
            "optimized" => {
                return Err(ApiError::validation(
                    "performanceConfig.latency optimized is not available for this model; use standard",
                ));
            }
            other => {
                return Err(ApiError::validation(format!(
                    "performanceConfig.latency {other:?} must be standard or optimized"
                )));
            }
        }
    }
    if let Some(tier) = &body.service_tier
        && !["priority", "default", "flex", "reserved"].contains(&tier.kind.as_str())
    {
        return Err(ApiError::validation(format!(
            "serviceTier.type {:?} must be priority, default, flex or reserved",
            tier.kind
        )));
    }
    // A valid pointer to a field the reply lacks is ignored, as on Bedrock; these models return
    // no additional fields.
    if let Some(paths) = &body.additional_model_response_field_paths
        && (paths.len() > 10 || paths.iter().any(|p| !p.starts_with('/') || p.len() > 256))
    {
        return Err(ApiError::validation(
            "additionalModelResponseFieldPaths must hold at most 10 JSON Pointers, each starting with /",
        ));
    }
    if let Some(metadata) = &body.request_metadata
        && (metadata.len() > 16 || metadata.iter().any(|(k, v)| k.is_empty() || k.len() > 256 || v.len() > 256))
    {
        return Err(ApiError::validation(
            "requestMetadata must hold at most 16 pairs, each key 1 to 256 characters and each value at most 256",
        ));
    }
    Ok(())
}

/// `additionalModelRequestFields`: the model's own parameters beyond `inferenceConfig`. These
/// models take `top_k` (also spelled `topK`); any other key is refused, as a model on Bedrock
/// refuses a key it does not know.
fn top_k(fields: Option<&Value>) -> Result<u32, ApiError> {
    let Some(fields) = fields else { return Ok(0) };
    let object =
        fields.as_object().ok_or_else(|| ApiError::validation("additionalModelRequestFields must be a JSON object"))?;
    let mut top_k = 0;
    for (key, value) in object {
        match key.as_str() {
            "top_k" | "topK" => {
                top_k = value.as_u64().and_then(|k| u32::try_from(k).ok()).ok_or_else(|| {
                    ApiError::validation(format!("additionalModelRequestFields.{key} must be a non-negative integer"))
                })?;
            }
            other => {
                return Err(ApiError::validation(format!(
                    "additionalModelRequestFields.{other} is not a parameter this model takes; it takes top_k"
                )));
            }
        }
    }
    Ok(top_k)
}

fn parse_tools(tc: &ToolConfig) -> Result<(Vec<Tool>, ToolChoice), ApiError> {
    if tc.tools.is_empty() {
        return Err(ApiError::validation("toolConfig.tools must contain at least one tool"));
    }
    let mut tools = Vec::new();
    for (i, t) in tc.tools.iter().enumerate() {
        let at = format!("toolConfig.tools[{i}]");
        match t {
            ToolEntry::ToolSpec(spec) => {
                let name = spec.name.clone();
                let valid = (1..=64).contains(&name.len())
                    && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
                if !valid {
                    return Err(ApiError::validation(format!(
                        "{at}.toolSpec.name {name:?} must match [a-zA-Z0-9_-]{{1,64}}"
                    )));
                }
                if spec.strict == Some(true) {
                    return Err(ApiError::validation(format!(
                        "{at}.toolSpec.strict: strict tool use is not supported by this model; omit it or set it to false"
                    )));
                }
                let ToolInputSchema::Json(schema) = &spec.input_schema;
                if !schema.is_object() {
                    return Err(ApiError::validation(format!("{at}.toolSpec.inputSchema.json must be a JSON object")));
                }
                tools.push(Tool {
                    name,
                    description: spec.description.clone().unwrap_or_default(),
                    input_schema: schema.clone(),
                });
            }
            ToolEntry::CachePoint(_) => {}
            ToolEntry::SystemTool(_) => {
                return Err(ApiError::validation(format!("{at}: systemTool tools are not supported")));
            }
        }
    }
    let choice = match &tc.tool_choice {
        None | Some(ToolChoiceMember::Auto(_)) => ToolChoice::Auto,
        Some(ToolChoiceMember::Any(_)) => ToolChoice::Any,
        Some(ToolChoiceMember::Tool(tool)) => ToolChoice::Named(tool.name.clone()),
    };
    check_tool_choice(&tools, &choice, "toolConfig.toolChoice")?;
    Ok((tools, choice))
}

/// The JSON schema of `outputConfig.textFormat`, if any.
fn output_schema(oc: &OutputConfig) -> Result<Option<Value>, ApiError> {
    if let Some(effort) = &oc.effort {
        return Err(ApiError::validation(format!("outputConfig.effort {effort:?} is not supported by this model")));
    }
    let Some(format) = &oc.text_format else { return Ok(None) };
    if format.kind != "json_schema" {
        return Err(ApiError::validation("outputConfig.textFormat.type must be json_schema"));
    }
    let OutputStructure::JsonSchema(definition) = &format.structure;
    let schema = match &definition.schema {
        Value::String(s) => serde_json::from_str(s).map_err(|e| {
            ApiError::validation(format!("outputConfig.textFormat.structure.jsonSchema.schema is not JSON: {e}"))
        })?,
        schema @ Value::Object(_) => schema.clone(),
        _ => {
            return Err(ApiError::validation(
                "outputConfig.textFormat.structure.jsonSchema.schema must be a JSON string",
            ));
        }
    };
    super::structured::compile(&schema)?;
    Ok(Some(schema))
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
            (
                json!({"messages": [{"role": "user", "content": [{"sticker": {}}]}]}),
                "content[0].sticker: unknown field",
            ),
            (
                json!({"messages": [{"role": "user", "content": [{"text": "a", "image": {}}]}]}),
                "sets both text and image",
            ),
            (json!({"messages": [{"role": "user", "content": [{}]}]}), "sets no member"),
            (
                json!({"messages": [{"role": "user", "content": [{"image": {"format": "png", "source": {"bytes": ""}}}]}]}),
                "doesn't support the image content block",
            ),
            (json!({"messages": [{"role": "assistant", "content": [{"text": "x"}]}]}), "start with a user"),
            (json!({"messages": [{"role": "user", "content": [{"text": 3}]}]}), "messages[0].content[0].text"),
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

    fn user(text: &str) -> Value {
        json!([{"role": "user", "content": [{"text": text}]}])
    }

    /// `body` with `extra` merged into its top level.
    fn with(extra: Value) -> Value {
        let mut body = json!({ "messages": user("x") });
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        body
    }

    #[test]
    fn unknown_members_are_refused_at_every_level_naming_their_path() {
        let tool = json!({"toolSpec": {"name": "t", "inputSchema": {"json": {"type": "object"}}}});
        for (body, path, field) in [
            (with(json!({"temprature": 0})), "", "temprature"),
            (json!({"messages": [{"role": "user", "content": [{"text": "x"}], "name": "me"}]}), "messages[0]", "name"),
            (
                json!({"messages": [{"role": "user", "content": [{"sticker": {}}]}]}),
                "messages[0].content[0]",
                "sticker",
            ),
            (
                json!({"messages": [{"role": "user", "content": [{"text": "x"}]}, {"role": "assistant", "content": [
                    {"toolUse": {"toolUseId": "t1", "name": "t", "input": {}, "arguments": {}}}]}]}),
                "messages[1].content[0].toolUse",
                "arguments",
            ),
            (
                json!({"messages": [{"role": "user", "content": [
                    {"toolResult": {"toolUseId": "t1", "content": [{"text": "ok", "html": "<b>"}]}}]}]}),
                "messages[0].content[0].toolResult.content[0]",
                "html",
            ),
            (
                json!({"messages": [{"role": "user", "content": [{"guardContent": {"text": {"text": "x", "score": 1}}}]}]}),
                "messages[0].content[0].guardContent.text",
                "score",
            ),
            (
                json!({"messages": [{"role": "user", "content": [{"cachePoint": {"type": "default", "size": 1}}]}]}),
                "messages[0].content[0].cachePoint",
                "size",
            ),
            (with(json!({"system": [{"text": "x"}, {"toolUse": {}}]})), "system[1]", "toolUse"),
            (with(json!({"inferenceConfig": {"maxTokens": 5, "topK": 5}})), "inferenceConfig", "topK"),
            (with(json!({"toolConfig": {"tools": [tool], "parallel": true}})), "toolConfig", "parallel"),
            (
                with(
                    json!({"toolConfig": {"tools": [{"toolSpec": {"name": "t", "parameters": {}, "inputSchema": {"json": {}}}}]}}),
                ),
                "toolConfig.tools[0].toolSpec",
                "parameters",
            ),
            (
                with(json!({"toolConfig": {"tools": [{"toolSpec": {"name": "t", "inputSchema": {"yaml": ""}}}]}})),
                "toolConfig.tools[0].toolSpec.inputSchema",
                "yaml",
            ),
            (
                with(json!({"toolConfig": {"tools": [tool], "toolChoice": {"auto": {"now": 1}}}})),
                "toolConfig.toolChoice.auto",
                "now",
            ),
            (
                with(
                    json!({"outputConfig": {"textFormat": {"type": "json_schema", "structure": {"jsonSchema": {"schema": "{}"}}, "strict": true}}}),
                ),
                "outputConfig.textFormat",
                "strict",
            ),
            (with(json!({"guardrailConfig": {"guardrailIdentifier": "g", "mode": "x"}})), "guardrailConfig", "mode"),
            (with(json!({"performanceConfig": {"latency": "standard", "region": "x"}})), "performanceConfig", "region"),
            (with(json!({"serviceTier": {"type": "default", "burst": 1}})), "serviceTier", "burst"),
        ] {
            let err = request(body.clone()).map(|_| ()).unwrap_err();
            assert_eq!(err.kind(), "ValidationException", "{body}");
            let message = err.to_string();
            let at = if path.is_empty() { field.to_string() } else { format!("{path}.{field}") };
            assert!(message.contains(&format!("at {at}: unknown field `{field}`")), "{body}: {message}");
        }
    }

    #[test]
    fn every_member_of_the_converse_model_parses() {
        let weather = json!({"toolSpec": {"name": "get_weather", "description": "Weather.", "strict": false,
            "inputSchema": {"json": {"type": "object"}}}});
        let body = json!({
            "messages": [
                {"role": "user", "content": [
                    {"text": "Weather in Oslo?"},
                    {"guardContent": {"text": {"text": "Oslo", "qualifiers": ["query"]}}},
                    {"cachePoint": {"type": "default", "ttl": "5m"}},
                ]},
                {"role": "assistant", "content": [
                    {"reasoningContent": {"reasoningText": {"text": "Look it up.", "signature": "sig"}}},
                    {"reasoningContent": {"redactedContent": "AAAA"}},
                    {"toolUse": {"toolUseId": "t1", "name": "get_weather", "input": {"city": "Oslo"}, "type": "server_tool_use"}},
                ]},
                {"role": "user", "content": [
                    {"toolResult": {"toolUseId": "t1", "status": "success", "type": "tool_result",
                        "content": [{"text": "Sunny"}, {"json": {"celsius": 21}}]}},
                ]},
            ],
            "system": [
                {"text": "Be brief."},
                {"guardContent": {"text": {"text": "No gossip."}}},
                {"cachePoint": {"type": "default"}},
            ],
            "inferenceConfig": {"maxTokens": 64, "temperature": 0.2, "topP": 0.9, "stopSequences": ["END"]},
            "toolConfig": {"tools": [weather, {"cachePoint": {"type": "default"}}], "toolChoice": {"auto": {}}},
            "outputConfig": {"textFormat": {"type": "json_schema", "structure": {"jsonSchema": {
                "schema": "{\"type\": \"object\"}", "name": "reply", "description": "The reply."}}}},
            "additionalModelRequestFields": {"top_k": 20},
            "additionalModelResponseFieldPaths": ["/stop_sequence"],
            "requestMetadata": {"team": "search"},
            "performanceConfig": {"latency": "standard"},
            "serviceTier": {"type": "flex"},
            "projectIdentifier": "default",
            "guardrailConfig": null,
            "promptVariables": null,
        });
        let r = request(body).unwrap();
        assert_eq!((r.top_k, r.max_tokens, r.tools.len()), (20, Some(64), 1));
        assert!(r.messages[1].content.contains("Oslo") && r.messages[3].content.contains("Sunny"));
        for choice in [json!({"any": {}}), json!({"tool": {"name": "get_weather"}})] {
            request(with(json!({"toolConfig": {"tools": [weather], "toolChoice": choice}}))).unwrap();
        }
        // Members the handler refuses (guardrails) or this function refuses still parse.
        let refused = with(json!({
            "guardrailConfig": {"guardrailIdentifier": "g", "guardrailVersion": "1", "trace": "enabled",
                "streamProcessingMode": "async"},
            "promptVariables": {"city": {"text": "Oslo"}},
        }));
        let parsed: ConverseBody = parse_body(refused.to_string().as_bytes()).unwrap();
        assert!(parsed.guardrail_config.is_some() && parsed.prompt_variables.is_some());
    }

    #[test]
    fn members_this_server_does_not_serve_are_refused_by_name() {
        let block = |b: Value| json!({"messages": [{"role": "user", "content": [b]}]});
        let image = json!({"format": "png", "source": {"bytes": ""}});
        for (body, says) in [
            (with(json!({"promptVariables": {"city": {"text": "Oslo"}}})), "promptVariables"),
            (with(json!({"projectIdentifier": "proj-1"})), "projectIdentifier"),
            (with(json!({"performanceConfig": {"latency": "optimized"}})), "performanceConfig.latency optimized"),
            (with(json!({"serviceTier": {"type": "turbo"}})), "serviceTier.type"),
            (with(json!({"outputConfig": {"effort": "high"}})), "outputConfig.effort"),
            (
                with(json!({"additionalModelRequestFields": {"thinking": {"type": "enabled"}}})),
                "additionalModelRequestFields.thinking",
            ),
            (with(json!({"additionalModelRequestFields": {"top_k": "40"}})), "additionalModelRequestFields.top_k"),
            (with(json!({"additionalModelResponseFieldPaths": ["stop_sequence"]})), "JSON Pointers"),
            (
                with(
                    json!({"toolConfig": {"tools": [{"toolSpec": {"name": "t", "strict": true, "inputSchema": {"json": {}}}}]}}),
                ),
                "strict tool use",
            ),
            (with(json!({"toolConfig": {"tools": [{"systemTool": {"name": "web"}}]}})), "systemTool"),
            (block(json!({"image": image})), "the image content block"),
            (block(json!({"document": {"name": "d", "source": {"text": "x"}}})), "the document content block"),
            (block(json!({"guardContent": {"image": image}})), "guardContent image"),
            (
                block(json!({"toolResult": {"toolUseId": "t1", "content": [{"image": image}]}})),
                "image content block that you provided (at messages[0].content[0].toolResult.content[0])",
            ),
        ] {
            let err = request(body.clone()).map(|_| ()).unwrap_err();
            assert_eq!(err.kind(), "ValidationException", "{body}");
            assert!(err.to_string().contains(says), "{body}: {err}");
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
