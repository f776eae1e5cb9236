//! The Converse request body as botocore models it. Every structure refuses a member the model
//! does not define, as Bedrock does, and `parse_body` names its path. Members Bedrock defines but
//! this server does not serve are parsed so that `to_request` can refuse them by name rather than
//! ignore them.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

use crate::adapters::union;

/// The Converse and ConverseStream request body (the model id comes from the URI).
#[derive(Deserialize, Debug, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConverseBody {
    #[serde(default)]
    pub messages: Vec<Message>,
    #[serde(default)]
    pub system: Vec<SystemBlock>,
    pub inference_config: Option<InferenceConfig>,
    pub tool_config: Option<ToolConfig>,
    pub output_config: Option<OutputConfig>,
    /// Refused by the handler: no guardrails are loaded.
    pub guardrail_config: Option<GuardrailConfig>,
    pub additional_model_request_fields: Option<Value>,
    pub additional_model_response_field_paths: Option<Vec<String>>,
    /// Refused: they fill a prompt from Prompt management, which is not served.
    pub prompt_variables: Option<BTreeMap<String, Value>>,
    /// Labels for invocation logs; they change nothing in the reply.
    pub request_metadata: Option<BTreeMap<String, String>>,
    pub performance_config: Option<PerformanceConfig>,
    pub service_tier: Option<ServiceTier>,
    pub project_identifier: Option<String>,
}

/// CountTokens' `input.converse`: the parts of a Converse request that make the prompt.
#[derive(Deserialize, Debug, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConverseTokensBody {
    #[serde(default)]
    pub messages: Vec<Message>,
    #[serde(default)]
    pub system: Vec<SystemBlock>,
    pub tool_config: Option<ToolConfig>,
    pub additional_model_request_fields: Option<Value>,
}

impl From<ConverseTokensBody> for ConverseBody {
    fn from(body: ConverseTokensBody) -> Self {
        ConverseBody {
            messages: body.messages,
            system: body.system,
            tool_config: body.tool_config,
            additional_model_request_fields: body.additional_model_request_fields,
            ..Default::default()
        }
    }
}

#[derive(Deserialize, Debug)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Message {
    pub role: String,
    pub content: Vec<ContentBlock>,
}

union! {
    /// A block of a message.
    pub enum ContentBlock {
        "text" => Text(String),
        "toolUse" => ToolUse(ToolUseBlock),
        "toolResult" => ToolResult(ToolResultBlock),
        "guardContent" => GuardContent(GuardContent),
        "cachePoint" => CachePoint(CachePoint),
        "reasoningContent" => ReasoningContent(ReasoningContent),
        // Blocks Bedrock defines that no model here takes: refused by name.
        "image" => Image(Value),
        "document" => Document(Value),
        "video" => Video(Value),
        "audio" => Audio(Value),
        "searchResult" => SearchResult(Value),
        "citationsContent" => CitationsContent(Value),
        "toolAddition" => ToolAddition(Value),
        "toolRemoval" => ToolRemoval(Value),
    }
}

union! {
    /// A block of the system prompt.
    pub enum SystemBlock {
        "text" => Text(String),
        "guardContent" => GuardContent(GuardContent),
        "cachePoint" => CachePoint(CachePoint),
    }
}

#[derive(Deserialize, Debug)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ToolUseBlock {
    pub tool_use_id: String,
    pub name: String,
    pub input: Value,
    #[serde(rename = "type")]
    pub kind: Option<String>,
}

#[derive(Deserialize, Debug)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ToolResultBlock {
    pub tool_use_id: String,
    pub content: Vec<ToolResultContent>,
    pub status: Option<String>,
    #[serde(rename = "type")]
    pub kind: Option<String>,
}

union! {
    pub enum ToolResultContent {
        "text" => Text(String),
        "json" => Json(Value),
        "image" => Image(Value),
        "document" => Document(Value),
        "video" => Video(Value),
        "searchResult" => SearchResult(Value),
    }
}

union! {
    /// Content the guardrail is to assess (text is also part of the prompt).
    pub enum GuardContent {
        "text" => Text(GuardText),
        "image" => Image(Value),
    }
}

#[derive(Deserialize, Debug)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GuardText {
    pub text: String,
    pub qualifiers: Option<Vec<String>>,
}

/// A prompt-cache checkpoint; the runner's prefix cache needs none, so it only parses.
#[derive(Deserialize, Debug)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CachePoint {
    #[serde(rename = "type")]
    pub kind: String,
    pub ttl: Option<String>,
}

union! {
    /// Reasoning from an earlier turn; it is not part of the prompt.
    pub enum ReasoningContent {
        "reasoningText" => ReasoningText(ReasoningText),
        "redactedContent" => RedactedContent(String),
    }
}

#[derive(Deserialize, Debug)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReasoningText {
    pub text: String,
    pub signature: Option<String>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InferenceConfig {
    pub max_tokens: Option<i64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    #[serde(default)]
    pub stop_sequences: Vec<String>,
}

#[derive(Deserialize, Debug)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ToolConfig {
    pub tools: Vec<ToolEntry>,
    pub tool_choice: Option<ToolChoiceMember>,
}

union! {
    /// One of `toolConfig.tools`.
    pub enum ToolEntry {
        "toolSpec" => ToolSpec(ToolSpec),
        "systemTool" => SystemTool(SystemTool),
        "cachePoint" => CachePoint(CachePoint),
    }
}

#[derive(Deserialize, Debug)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ToolSpec {
    pub name: String,
    pub description: Option<String>,
    pub input_schema: ToolInputSchema,
    pub strict: Option<bool>,
}

union! {
    pub enum ToolInputSchema {
        "json" => Json(Value),
    }
}

#[derive(Deserialize, Debug)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SystemTool {
    pub name: String,
}

union! {
    /// `toolConfig.toolChoice`.
    pub enum ToolChoiceMember {
        "auto" => Auto(Empty),
        "any" => Any(Empty),
        "tool" => Tool(SpecificTool),
    }
}

/// A structure without members (`{}`).
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct Empty {}

#[derive(Deserialize, Debug)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SpecificTool {
    pub name: String,
}

#[derive(Deserialize, Debug)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutputConfig {
    pub text_format: Option<OutputFormat>,
    pub effort: Option<String>,
}

#[derive(Deserialize, Debug)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutputFormat {
    #[serde(rename = "type")]
    pub kind: String,
    pub structure: OutputStructure,
}

union! {
    pub enum OutputStructure {
        "jsonSchema" => JsonSchema(JsonSchemaDefinition),
    }
}

#[derive(Deserialize, Debug)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JsonSchemaDefinition {
    /// The schema as a JSON string, as the API models it (an object is taken too).
    pub schema: Value,
    pub name: Option<String>,
    pub description: Option<String>,
}

/// `guardrailConfig`; `streamProcessingMode` belongs to ConverseStream only.
#[derive(Deserialize, Debug)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GuardrailConfig {
    pub guardrail_identifier: Option<String>,
    pub guardrail_version: Option<String>,
    pub trace: Option<String>,
    pub stream_processing_mode: Option<String>,
}

#[derive(Deserialize, Debug)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PerformanceConfig {
    pub latency: Option<String>,
}

#[derive(Deserialize, Debug)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceTier {
    #[serde(rename = "type")]
    pub kind: String,
}
