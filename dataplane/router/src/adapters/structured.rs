//! Structured output (Converse `outputConfig`, OpenAI `response_format`): the reply must be JSON
//! that matches a schema.
//!
//! Mantle validates and retries rather than constraining decoding. Constrained decoding needs a
//! schema-to-grammar compiler and a token mask over the whole vocabulary at every sampling step
//! inside the runner; validation needs only the schema, keeps the runner's hot loop untouched,
//! and costs extra only when a reply is wrong. The model is told the schema, its reply is
//! checked with the `jsonschema` crate, and a wrong reply is retried with the validator's
//! complaint fed back, up to [`ATTEMPTS`] times; a reply that never validates is returned with
//! stop reason `malformed_model_output`, so a client never mistakes it for a valid one.

use serde_json::Value;

use crate::error::ApiError;

/// Generations tried before a reply is reported as malformed.
pub const ATTEMPTS: usize = 3;

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

/// Checks a reply: `Ok(json)` when it parses and matches, else the reason for the retry prompt.
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

/// The user turn that asks for a corrected reply.
pub fn retry_prompt(reason: &str) -> String {
    format!("Your previous reply was rejected because {reason}. Reply again with only the JSON document.")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
}
