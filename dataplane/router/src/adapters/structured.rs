//! Structured output (Converse `outputConfig`, OpenAI `response_format`) and forced tool calls
//! (Converse `toolChoice` `any`/`tool`, Anthropic `tool_choice`, OpenAI `tool_choice`
//! `required`/named): the reply must be JSON of a given shape.
//!
//! The shape is guaranteed by constrained decoding in the runner: the router sends the JSON
//! schema with the request ([`enforced_schema`]) and the runner's sampler may only choose tokens
//! that keep the reply inside it, so even a model too small to follow a schema produces
//! matching JSON in one generation. The model is still told the schema
//! ([`instruction`]), which makes the content better where the grammar only fixes the form. The
//! router checks the finished reply once more with the `jsonschema` crate ([`check`]): a reply
//! cut short by `maxTokens` keeps stop reason `max_tokens`, and anything else that fails (a
//! schema feature the grammar compiler approximates) is reported as `malformed_model_output`,
//! never as a valid reply.

use serde_json::{Map, Value, json};

use super::{TextRequest, Tool, ToolChoice};
use crate::error::ApiError;

/// Compiles the schema, or explains why it is not one.
pub fn compile(schema: &Value) -> Result<jsonschema::Validator, ApiError> {
    jsonschema::validator_for(schema).map_err(|e| ApiError::validation(format!("The JSON schema is invalid: {e}")))
}

/// The instruction added to the system prompt.
pub fn instruction(schema: &Value) -> String {
    format!(
        "Reply with only a JSON document that matches this JSON schema, with no other text before or after it:\n{schema}"
    )
}

/// Checks a reply: `Ok(json)` when it parses and matches, else the reason.
pub fn check(validator: &jsonschema::Validator, reply: &str) -> Result<Value, String> {
    let text = super::strip_code_fence(reply);
    let value: Value = serde_json::from_str(text).map_err(|e| format!("the reply was not JSON ({e})"))?;
    let errors: Vec<String> = validator.iter_errors(&value).take(3).map(|e| e.to_string()).collect();
    if errors.is_empty() {
        Ok(value)
    } else {
        Err(format!("the JSON does not match the schema: {}", errors.join("; ")))
    }
}

/// Whether the request forces a tool call (so the reply is one, by grammar).
pub fn forces_tool(req: &TextRequest) -> bool {
    !req.tools.is_empty() && req.tool_choice != ToolChoice::Auto
}

/// The JSON schema the runner enforces: a forced tool call's envelope
/// (`{"name": <tool>, "input": <its input schema>}`, the form [`super::parse_tool_call`] reads),
/// else the requested output schema, else none.
pub fn enforced_schema(req: &TextRequest) -> Option<Value> {
    if !forces_tool(req) {
        return req.json_schema.clone();
    }
    let tools: Vec<&Tool> = match &req.tool_choice {
        ToolChoice::Named(name) => req.tools.iter().filter(|t| &t.name == name).collect(),
        _ => req.tools.iter().collect(),
    };
    // Definitions a tool's schema refers to (`#/$defs/...`, `#/definitions/...`) must sit at the
    // root of the envelope.
    let mut defs: [(&str, Map<String, Value>); 2] = [("$defs", Map::new()), ("definitions", Map::new())];
    let mut calls: Vec<Value> = tools
        .iter()
        .map(|t| {
            let mut input = t.input_schema.clone();
            if let Value::Object(schema) = &mut input {
                for (key, found) in &mut defs {
                    if let Some(Value::Object(d)) = schema.remove(*key) {
                        found.extend(d);
                    }
                }
                schema.entry("type").or_insert_with(|| json!("object"));
            }
            json!({
                "type": "object",
                "properties": {"name": {"const": t.name}, "input": input},
                "required": ["name", "input"],
                "additionalProperties": false
            })
        })
        .collect();
    let mut envelope = if calls.len() == 1 { calls.remove(0) } else { json!({"anyOf": calls}) };
    for (key, found) in defs {
        if !found.is_empty() {
            envelope[key] = Value::Object(found);
        }
    }
    Some(envelope)
}

/// The grammar for the runner's request.
pub fn grammar(req: &TextRequest) -> Option<mantle_proto::Grammar> {
    enforced_schema(req)
        .map(|s| mantle_proto::Grammar { kind: Some(mantle_proto::grammar::Kind::JsonSchema(s.to_string())) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_checked_against_the_schema() {
        let v = compile(&json!({"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}))
            .unwrap();
        assert_eq!(check(&v, r#"{"name": "Ada"}"#).unwrap()["name"], "Ada");
        assert_eq!(check(&v, "```json\n{\"name\": \"Ada\"}\n```").unwrap()["name"], "Ada");
        assert!(check(&v, "Ada").unwrap_err().contains("not JSON"));
        assert!(check(&v, r#"{"name": 3}"#).unwrap_err().contains("does not match"));
        assert!(compile(&json!({"type": "no-such-type"})).is_err());
    }

    fn tool(name: &str, schema: Value) -> Tool {
        Tool { name: name.into(), description: String::new(), input_schema: schema }
    }

    #[test]
    fn forced_tools_become_a_call_envelope_and_auto_tools_constrain_nothing() {
        let weather = tool(
            "weather",
            json!({"properties": {"city": {"$ref": "#/$defs/City"}}, "$defs": {"City": {"type": "string"}}}),
        );
        let time = tool("time", json!({"type": "object"}));
        let output = json!({"type": "object"});
        let req = |choice: ToolChoice| TextRequest {
            tools: vec![weather.clone(), time.clone()],
            tool_choice: choice,
            json_schema: Some(output.clone()),
            ..Default::default()
        };
        assert_eq!(enforced_schema(&req(ToolChoice::Auto)), Some(output.clone()));
        let named = enforced_schema(&req(ToolChoice::Named("weather".into()))).unwrap();
        assert_eq!(named["properties"]["name"], json!({"const": "weather"}));
        assert_eq!(named["properties"]["input"]["type"], "object", "an input is always an object");
        assert_eq!(named["$defs"]["City"], json!({"type": "string"}), "definitions move to the root");
        assert!(named["properties"]["input"].get("$defs").is_none());
        let any = enforced_schema(&req(ToolChoice::Any)).unwrap();
        let names: Vec<&Value> =
            any["anyOf"].as_array().unwrap().iter().map(|c| &c["properties"]["name"]["const"]).collect();
        assert_eq!(names, [&json!("weather"), &json!("time")]);
        // The envelope is what parse_tool_call reads, and a valid schema.
        let v = compile(&named).unwrap();
        let call = r#"{"name": "weather", "input": {"city": "Oslo"}}"#;
        assert!(check(&v, call).is_ok());
        assert!(super::super::parse_tool_call(call, &[weather]).is_some());
        assert_eq!(enforced_schema(&TextRequest::default()), None);
    }
}
