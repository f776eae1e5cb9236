//! `outputSchema`: every output must be JSON matching the job's schema.
//!
//! Converse records ask the router for structured output (`outputConfig.textFormat`), which the
//! builtin engine enforces by grammar-constrained decoding. InvokeModel bodies have no such field
//! (their families' APIs do not), so their replies are checked here, and a reply that does not
//! match is asked for once more with a repair prompt; a second miss is an error record.

use mantle_crds::InvocationType;
use serde_json::{Value, json};

/// The compiled schema.
pub struct OutputSchema {
    schema: Value,
    validator: jsonschema::Validator,
}

impl OutputSchema {
    pub fn new(schema: &Value) -> Result<Self, String> {
        let validator =
            jsonschema::validator_for(schema).map_err(|e| format!("outputSchema is not a JSON Schema: {e}"))?;
        Ok(OutputSchema { schema: schema.clone(), validator })
    }

    /// Asks for structured output where the request shape has a way to (Converse), unless the
    /// record asks for its own.
    pub fn constrain(&self, body: &mut Value, kind: InvocationType) {
        if kind != InvocationType::Converse {
            return;
        }
        if let Some(obj) = body.as_object_mut() {
            obj.entry("outputConfig").or_insert_with(|| {
                json!({"textFormat": {"type": "json_schema", "structure": {"jsonSchema": {
                    "schema": self.schema.to_string(), "name": "output"
                }}}})
            });
        }
    }

    /// Checks a model answer's text: `Err(reason)` when it is not matching JSON.
    pub fn check(&self, answer: &Value) -> Result<(), String> {
        let text = reply_text(answer).ok_or("the answer holds no text")?;
        let text = strip_fence(&text);
        let value: Value = serde_json::from_str(text).map_err(|e| format!("the reply is not JSON ({e})"))?;
        let errors: Vec<String> = self.validator.iter_errors(&value).take(3).map(|e| e.to_string()).collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(format!("the reply does not match outputSchema: {}", errors.join("; ")))
        }
    }

    /// The record's body asking again: the failed reply and what was wrong with it, in the
    /// request's own shape.
    pub fn repair(&self, body: &Value, answer: &Value, reason: &str) -> Option<Value> {
        let instruction = format!(
            "That reply cannot be used: {reason}. Reply with only a JSON document matching this JSON schema, with no other text:\n{}",
            self.schema
        );
        let reply = reply_text(answer).unwrap_or_default();
        let mut body = body.clone();
        let obj = body.as_object_mut()?;
        if let Some(messages) = obj.get_mut("messages").and_then(Value::as_array_mut) {
            // Anthropic messages and Converse take the same two turns, in their block shapes.
            let converse = messages
                .iter()
                .any(|m| m["content"].as_array().is_some_and(|c| c.iter().any(|b| b.get("type").is_none())));
            let block =
                |text: &str| if converse { json!({"text": text}) } else { json!({"type": "text", "text": text}) };
            messages.push(json!({"role": "assistant", "content": [block(&reply)]}));
            messages.push(json!({"role": "user", "content": [block(&instruction)]}));
            return Some(body);
        }
        if let Some(Value::String(prompt)) = obj.get_mut("prompt") {
            prompt.push_str(&format!("{reply}\n\n{instruction}\n"));
            return Some(body);
        }
        None
    }
}

/// The text of an answer: Anthropic messages, Converse, Llama (`generation`) or Mistral
/// (`outputs[0].text`).
pub fn reply_text(answer: &Value) -> Option<String> {
    let blocks = answer.get("content").or_else(|| answer.pointer("/output/message/content"));
    if let Some(blocks) = blocks.and_then(Value::as_array) {
        return Some(blocks.iter().filter_map(|b| b.get("text").and_then(Value::as_str)).collect());
    }
    answer.get("generation").or_else(|| answer.pointer("/outputs/0/text")).and_then(Value::as_str).map(str::to_string)
}

/// A reply wrapped in a Markdown code fence, unwrapped.
fn strip_fence(text: &str) -> &str {
    let t = text.trim();
    let Some(rest) = t.strip_prefix("```") else { return t };
    let rest = rest.split_once('\n').map_or(rest, |(_, body)| body);
    rest.strip_suffix("```").unwrap_or(rest).trim()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema() -> OutputSchema {
        OutputSchema::new(
            &json!({"type": "object", "required": ["summary"], "properties": {"summary": {"type": "string"}}}),
        )
        .unwrap()
    }

    #[test]
    fn replies_are_checked_against_the_schema_in_every_answer_shape() {
        let s = schema();
        let anthropic = |t: &str| json!({"type": "message", "content": [{"type": "text", "text": t}]});
        assert!(s.check(&anthropic(r#"{"summary": "ok"}"#)).is_ok());
        assert!(s.check(&anthropic("```json\n{\"summary\": \"ok\"}\n```")).is_ok());
        assert!(s.check(&anthropic(r#"{"summary": 5}"#)).unwrap_err().contains("does not match"));
        assert!(s.check(&anthropic("Sure! Here it is")).unwrap_err().contains("not JSON"));
        assert!(s.check(&json!({"output": {"message": {"content": [{"text": "{\"summary\": \"x\"}"}]}}})).is_ok());
        assert!(s.check(&json!({"generation": "{\"summary\": \"x\"}"})).is_ok());
        assert!(s.check(&json!({"outputs": [{"text": "{}"}]})).is_err());
        assert!(OutputSchema::new(&json!({"type": 5})).is_err());
    }

    #[test]
    fn converse_asks_for_structured_output_and_others_get_a_repair_turn() {
        let s = schema();
        let mut converse = json!({"messages": [{"role": "user", "content": [{"text": "hi"}]}]});
        s.constrain(&mut converse, InvocationType::Converse);
        assert_eq!(converse["outputConfig"]["textFormat"]["type"], "json_schema");
        let mut invoke = json!({"messages": []});
        s.constrain(&mut invoke, InvocationType::InvokeModel);
        assert!(invoke.get("outputConfig").is_none());

        let body = json!({"anthropic_version": "x", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]});
        let answer = json!({"content": [{"type": "text", "text": "nope"}]});
        let repaired = s.repair(&body, &answer, "the reply is not JSON").unwrap();
        let messages = repaired["messages"].as_array().unwrap();
        assert_eq!(messages.len(), 3);
        assert_eq!(messages[1], json!({"role": "assistant", "content": [{"type": "text", "text": "nope"}]}));
        assert!(messages[2]["content"][0]["text"].as_str().unwrap().contains("\"summary\""));
        let repaired = s.repair(&json!({"prompt": "Q: "}), &json!({"generation": "x"}), "bad").unwrap();
        assert!(repaired["prompt"].as_str().unwrap().starts_with("Q: x\n\nThat reply cannot be used: bad."));
    }
}
