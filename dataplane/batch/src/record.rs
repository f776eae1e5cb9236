//! One input line in Bedrock's batch format (`{"recordId": …, "modelInput": {…}, …}`) and the
//! output line written for it (`modelOutput`, or `error {errorCode, errorMessage}`).
//!
//! Lines are parsed borrowing from the input buffer: `modelInput` stays raw JSON, echoed back
//! byte for byte and sent to the model as it is.

use std::borrow::Cow;
use std::collections::HashMap;

use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

/// A parsed input line.
#[derive(Debug)]
pub struct Record<'a> {
    /// The record's id: its own, or one derived from where it sits when it has none (as Bedrock
    /// adds one).
    pub record_id: String,
    pub model_input: &'a RawValue,
    /// The value of the job's partition field, as text (absent when the field is missing).
    pub partition: Option<String>,
}

/// Why a line is not a record; it becomes an error record in the output.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum BadLine {
    #[error("the line is not a JSON object: {0}")]
    NotJson(String),
    #[error("the record has no modelInput")]
    NoModelInput,
    #[error("modelInput must be a JSON object")]
    ModelInputNotObject,
    #[error("recordId must be a string of 1 to 256 characters")]
    BadRecordId,
}

/// Which field holds a record's partition.
#[derive(Clone, Debug, Default)]
pub struct PartitionBy(pub Option<String>);

/// The id of a record without one: 11 characters derived from its file and line.
pub fn derived_id(file: &str, line: u64) -> String {
    let digest = Sha256::new().chain_update(file.as_bytes()).chain_update(line.to_le_bytes()).finalize();
    let n = u64::from_le_bytes(digest[..8].try_into().expect("8 bytes"));
    mantle_crds::base36(u128::from(n), 11, mantle_crds::BASE36_UPPER)
}

/// Parses one line (without its newline). `file` and `line` name a record that has no id.
pub fn parse<'a>(text: &'a [u8], file: &str, line: u64, partition: &PartitionBy) -> Result<Record<'a>, BadLine> {
    let fields: HashMap<Cow<'a, str>, &'a RawValue> =
        serde_json::from_slice(text).map_err(|e| BadLine::NotJson(e.to_string()))?;
    let model_input = *fields.get("modelInput").ok_or(BadLine::NoModelInput)?;
    if !model_input.get().starts_with('{') {
        return Err(BadLine::ModelInputNotObject);
    }
    let record_id = match fields.get("recordId") {
        None => derived_id(file, line),
        Some(raw) if raw.get() == "null" => derived_id(file, line),
        Some(raw) => {
            let id: String = serde_json::from_str(raw.get()).map_err(|_| BadLine::BadRecordId)?;
            if id.is_empty() || id.chars().count() > 256 {
                return Err(BadLine::BadRecordId);
            }
            id
        }
    };
    let partition = partition.0.as_deref().and_then(|key| fields.get(key)).map(|raw| {
        match serde_json::from_str::<String>(raw.get()) {
            Ok(s) => s,
            Err(_) => raw.get().to_string(),
        }
    });
    Ok(Record { record_id, model_input, partition })
}

/// A key for the leading bytes of `modelInput`: records whose prompts start alike share it, so a
/// shard keeps them together and the runners' prefix cache serves them. A short input has none
/// (there is no long prefix to share; as the router's placement does): grouping such records
/// would only cut many small shards.
pub fn prefix_key(model_input: &RawValue) -> Option<u64> {
    const PREFIX: usize = 256;
    let text = model_input.get().as_bytes();
    let digest = Sha256::digest(text.get(..PREFIX)?);
    Some(u64::from_le_bytes(digest[..8].try_into().expect("8 bytes")))
}

/// A 64-bit hash of a record id (duplicate detection without keeping the ids).
pub fn id_hash(record_id: &str) -> u64 {
    let digest = Sha256::digest(record_id.as_bytes());
    u64::from_le_bytes(digest[..8].try_into().expect("8 bytes"))
}

/// The output line of a record the model answered.
pub fn output_line(record_id: &str, model_input: Option<&RawValue>, model_output: &RawValue) -> String {
    let mut line = head(record_id, model_input);
    line.push_str(",\"modelOutput\":");
    line.push_str(model_output.get());
    line.push_str("}\n");
    line
}

/// The output line of a record that failed (`errorCode` is numeric, as Bedrock writes it).
pub fn error_line(record_id: &str, model_input: Option<&RawValue>, code: u16, message: &str) -> String {
    let mut line = head(record_id, model_input);
    let error = serde_json::json!({ "errorCode": code, "errorMessage": message });
    line.push_str(",\"error\":");
    line.push_str(&error.to_string());
    line.push_str("}\n");
    line
}

fn head(record_id: &str, model_input: Option<&RawValue>) -> String {
    let mut line = String::from("{\"recordId\":");
    line.push_str(&serde_json::Value::from(record_id).to_string());
    if let Some(input) = model_input {
        line.push_str(",\"modelInput\":");
        line.push_str(input.get());
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(s: &str) -> Result<Record<'_>, BadLine> {
        parse(s.as_bytes(), "in.jsonl", 7, &PartitionBy(Some("customerId".into())))
    }

    #[test]
    fn a_bedrock_record_keeps_its_id_partition_and_raw_input() {
        let r =
            parse_str(r#"{"recordId":"R1","customerId":"C9","modelInput":{"prompt":"hi", "max_gen_len": 5}}"#).unwrap();
        assert_eq!(r.record_id, "R1");
        assert_eq!(r.partition.as_deref(), Some("C9"));
        assert_eq!(r.model_input.get(), r#"{"prompt":"hi", "max_gen_len": 5}"#);
        // A numeric partition value is kept as its JSON text.
        let r = parse_str(r#"{"recordId":"R1","customerId":42,"modelInput":{}}"#).unwrap();
        assert_eq!(r.partition.as_deref(), Some("42"));
    }

    #[test]
    fn a_record_without_an_id_gets_a_stable_one_from_its_place() {
        let a = parse_str(r#"{"modelInput":{"prompt":"x"}}"#).unwrap();
        let b = parse_str(r#"{"recordId":null,"modelInput":{"prompt":"y"}}"#).unwrap();
        assert_eq!(a.record_id, b.record_id);
        assert_eq!(a.record_id.len(), 11);
        assert_ne!(derived_id("in.jsonl", 7), derived_id("in.jsonl", 8));
        assert_ne!(derived_id("a.jsonl", 7), derived_id("b.jsonl", 7));
    }

    #[test]
    fn malformed_lines_are_refused_with_a_reason() {
        for (line, want) in [
            ("not json", "not a JSON object"),
            ("[1,2]", "not a JSON object"),
            (r#"{"recordId":"R"}"#, "no modelInput"),
            (r#"{"recordId":"R","modelInput":"text"}"#, "must be a JSON object"),
            (r#"{"recordId":5,"modelInput":{}}"#, "recordId must be"),
            (r#"{"recordId":"","modelInput":{}}"#, "recordId must be"),
            (r#"{"recordId":"R","modelInput":{"a":1}"#, "not a JSON object"),
        ] {
            let err = parse_str(line).unwrap_err().to_string();
            assert!(err.contains(want), "{line}: {err}");
        }
    }

    #[test]
    fn output_lines_are_bedrock_shaped_json() {
        let input = RawValue::from_string(r#"{"prompt":"hi"}"#.into()).unwrap();
        let output = RawValue::from_string(r#"{"generation":"yo"}"#.into()).unwrap();
        let ok: serde_json::Value = serde_json::from_str(&output_line("R\"1", Some(&input), &output)).unwrap();
        assert_eq!(
            ok,
            serde_json::json!({"recordId": "R\"1", "modelInput": {"prompt": "hi"}, "modelOutput": {"generation": "yo"}})
        );
        let err: serde_json::Value = serde_json::from_str(&error_line("R2", None, 400, "bad \"x\"")).unwrap();
        assert_eq!(
            err,
            serde_json::json!({"recordId": "R2", "error": {"errorCode": 400, "errorMessage": "bad \"x\""}})
        );
    }

    #[test]
    fn prompts_that_start_alike_share_a_prefix_key() {
        let long = "s".repeat(300);
        let a = RawValue::from_string(format!(r#"{{"system":"{long}","messages":[1]}}"#)).unwrap();
        let b = RawValue::from_string(format!(r#"{{"system":"{long}","messages":[2]}}"#)).unwrap();
        let c = RawValue::from_string(r#"{"system":"other"}"#.into()).unwrap();
        assert_eq!(prefix_key(&a), prefix_key(&b));
        assert!(prefix_key(&a).is_some());
        assert_eq!(prefix_key(&c), None, "a short input has no prefix to share");
    }
}
