//! Model adapters: every API dialect the router speaks (Converse, the native InvokeModel bodies,
//! OpenAI chat completions and completions) is turned into one [`TextRequest`] for a runner, and
//! the runner's output back into the dialect's shapes.

pub mod completions;
pub mod converse;
pub mod native;
pub mod openai;
pub mod structured;

use mantle_proto::ChatMessage;
use serde_json::Value;

use crate::error::ApiError;

/// Output tokens when the client does not say (capped by what fits in the context).
pub const DEFAULT_MAX_TOKENS: u32 = 512;

/// A text-generation request in the runner's terms, plus what the router does around it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TextRequest {
    /// The conversation, rendered by the runner through the model's chat template.
    pub messages: Vec<ChatMessage>,
    /// A raw prompt (the Llama/Mistral `prompt` bodies), sent without a chat template.
    pub prompt: Option<String>,
    /// A prompt as token ids of the model's vocabulary (OpenAI completions), used as is.
    pub prompt_token_ids: Vec<u32>,
    /// Output tokens; `None` means the default, capped by the context.
    pub max_tokens: Option<u32>,
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: u32,
    pub seed: u64,
    pub stop_sequences: Vec<String>,
    /// Tools the model may call (Converse `toolConfig`, OpenAI `tools`).
    pub tools: Vec<Tool>,
    /// Whether it must call one; a forced call is enforced by constrained decoding.
    pub tool_choice: ToolChoice,
    /// The reply must be JSON matching this schema (Converse `outputConfig`, OpenAI
    /// `response_format`).
    pub json_schema: Option<Value>,
    /// Report each generated token's log-probability (OpenAI `logprobs`).
    pub logprobs: bool,
    /// The most likely tokens to report beside each one (OpenAI `top_logprobs`).
    pub top_logprobs: u32,
    /// Score the prompt: each prompt token's log-probability given those before it (OpenAI
    /// completions' `echo` with `logprobs`).
    pub prompt_logprobs: bool,
}

/// A token and its log-probability, as the runner reports it, with the most likely tokens at
/// its place when they were asked for.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprob {
    /// The token's own bytes (possibly part of a UTF-8 character).
    pub bytes: Vec<u8>,
    pub logprob: f32,
    pub top: Vec<TokenLogprob>,
}

impl TokenLogprob {
    /// The log-probability as JSON: the shortest decimal that reads back as the same `f32`
    /// (`-1.02`, not `-1.0199999809265137`); null when it is not finite.
    pub fn logprob_json(&self) -> serde_json::Value {
        format!("{}", self.logprob).parse::<f64>().ok().filter(|f| f.is_finite()).map_or(Value::Null, Value::from)
    }
}

impl From<mantle_proto::TokenLogprob> for TokenLogprob {
    fn from(l: mantle_proto::TokenLogprob) -> Self {
        TokenLogprob { bytes: l.token, logprob: l.logprob, top: l.top.into_iter().map(Into::into).collect() }
    }
}

impl TextRequest {
    /// Text of the whole prompt, for estimates (admission cost, prefix affinity) and the input
    /// guard (empty for a prompt of token ids).
    pub fn prompt_text(&self) -> String {
        match &self.prompt {
            Some(p) => p.clone(),
            None => self.messages.iter().map(|m| m.content.as_str()).collect::<Vec<_>>().join("\n"),
        }
    }

    /// A cheap estimate of the prompt's tokens (4 bytes a token) used before the runner counts.
    pub fn estimated_input_tokens(&self) -> u64 {
        let bytes: usize = match &self.prompt {
            Some(p) => p.len(),
            None => self.messages.iter().map(|m| m.content.len() + 8).sum(),
        };
        (bytes as u64).div_ceil(4).max(self.prompt_token_ids.len() as u64).max(1)
    }
}

/// A tool the model may call.
#[derive(Clone, Debug, PartialEq)]
pub struct Tool {
    pub name: String,
    pub description: String,
    pub input_schema: Value,
}

/// How the model must use the tools.
#[derive(Clone, Debug, PartialEq, Default)]
pub enum ToolChoice {
    #[default]
    Auto,
    Any,
    Named(String),
}

/// Why generation ended, in Converse's terms (the other dialects map from it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    EndTurn,
    MaxTokens,
    StopSequence,
    ToolUse,
    MalformedModelOutput,
    /// An output guard stopped the reply.
    GuardrailIntervened,
}

impl StopReason {
    pub fn converse(self) -> &'static str {
        match self {
            StopReason::EndTurn => "end_turn",
            StopReason::MaxTokens => "max_tokens",
            StopReason::StopSequence => "stop_sequence",
            StopReason::ToolUse => "tool_use",
            StopReason::MalformedModelOutput => "malformed_model_output",
            StopReason::GuardrailIntervened => "guardrail_intervened",
        }
    }
}

/// Token counts of a finished generation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Every prompt token, those served from the prefix cache included.
    pub input_tokens: u32,
    pub output_tokens: u32,
    /// Prompt tokens served from the prefix cache (a part of `input_tokens`).
    pub cached_tokens: u32,
}

impl Usage {
    /// Prompt tokens computed afresh: what Bedrock and Anthropic report as input tokens, beside
    /// the cache reads.
    pub fn uncached_input_tokens(&self) -> u32 {
        self.input_tokens.saturating_sub(self.cached_tokens)
    }

    /// Prompt tokens read from the prefix cache (never more than the prompt).
    pub fn cache_read_tokens(&self) -> u32 {
        self.cached_tokens.min(self.input_tokens)
    }
}

/// A tool call parsed from the model's reply.
#[derive(Clone, Debug, PartialEq)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    pub input: Value,
}

/// The finished reply.
#[derive(Clone, Debug, PartialEq)]
pub struct TextOutput {
    pub text: String,
    pub tool_call: Option<ToolCall>,
    pub stop_reason: StopReason,
    pub stop_sequence: Option<String>,
    pub usage: Usage,
}

/// The system-prompt text that tells the model about its tools. A model without native tool
/// tokens is asked to answer a call as one JSON object, which [`parse_tool_call`] recognises.
pub fn tools_prompt(tools: &[Tool], choice: &ToolChoice) -> String {
    let mut text = String::from(
        "You can call the following tools. To call one, reply with only a JSON object of the form \
         {\"name\": \"<tool name>\", \"input\": {<arguments matching its input schema>}} and nothing else.\n",
    );
    for t in tools {
        text.push_str(&format!("- {}: {} Input schema: {}\n", t.name, t.description, t.input_schema));
    }
    match choice {
        ToolChoice::Auto => text.push_str("Call a tool only when it helps; otherwise answer normally."),
        ToolChoice::Any => text.push_str("You must call one of these tools."),
        ToolChoice::Named(name) => text.push_str(&format!("You must call the tool {name}.")),
    }
    text
}

/// Refuses a named tool choice that names none of the tools.
pub fn check_tool_choice(tools: &[Tool], choice: &ToolChoice, field: &str) -> Result<(), ApiError> {
    match choice {
        ToolChoice::Named(name) if !tools.iter().any(|t| &t.name == name) => {
            Err(ApiError::validation(format!("{field} names an unknown tool {name:?}")))
        }
        _ => Ok(()),
    }
}

/// Recognises a tool call in the model's reply: a JSON object `{"name", "input"}` naming one of
/// `tools` (optionally inside a Markdown code fence).
pub fn parse_tool_call(text: &str, tools: &[Tool]) -> Option<ToolCall> {
    let json = strip_code_fence(text);
    let value: Value = serde_json::from_str(json).ok()?;
    let name = value.get("name")?.as_str()?;
    let tool = tools.iter().find(|t| t.name == name)?;
    let input =
        value.get("input").or_else(|| value.get("arguments")).cloned().unwrap_or(Value::Object(Default::default()));
    if !input.is_object() {
        return None;
    }
    Some(ToolCall { id: format!("tooluse_{}", uuid::Uuid::new_v4().simple()), name: tool.name.clone(), input })
}

/// The text inside a Markdown code fence, or the trimmed text.
pub fn strip_code_fence(text: &str) -> &str {
    let t = text.trim();
    if let Some(rest) = t.strip_prefix("```") {
        let rest = rest.trim_start_matches(|c: char| c.is_ascii_alphanumeric());
        if let Some(inner) = rest.trim_end().strip_suffix("```") {
            return inner.trim();
        }
    }
    t
}

/// Checks sampling parameters common to every dialect.
pub fn check_sampling(temperature: f32, top_p: f32, max_temperature: f32) -> Result<(), ApiError> {
    if !(temperature.is_finite() && (0.0..=max_temperature).contains(&temperature)) {
        return Err(ApiError::validation(format!("temperature {temperature} must be between 0 and {max_temperature}")));
    }
    if !(top_p.is_finite() && (0.0..=1.0).contains(&top_p)) {
        return Err(ApiError::validation(format!("topP {top_p} must be between 0 and 1")));
    }
    Ok(())
}

/// Turns a serde error into a ValidationException naming the field.
pub fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." || path.is_empty() {
            ApiError::validation(format!("Malformed request body: {inner}"))
        } else {
            ApiError::validation(format!("Malformed request body at {path}: {inner}"))
        }
    })?;
    // One JSON value and nothing after it but whitespace.
    de.end().map_err(|e| ApiError::validation(format!("Malformed request body: {e} after the JSON value")))?;
    Ok(value)
}

/// Declares an enum for a Smithy union: a JSON object that sets exactly one of the named members
/// (a member set to `null` counts as unset). A member the union does not define is refused by
/// name, and each member's value is parsed in place, so [`parse_body`] reports the path of any
/// error inside it. `member()` gives the wire name of the member that was set.
macro_rules! union {
    ($(#[$meta:meta])* $vis:vis enum $name:ident { $($(#[$vmeta:meta])* $key:literal => $variant:ident($ty:ty)),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug)]
        $vis enum $name {
            $($(#[$vmeta])* $variant($ty)),+
        }

        impl $name {
            /// The wire name of the member that is set.
            #[allow(dead_code)]
            pub fn member(&self) -> &'static str {
                match self {
                    $($name::$variant(_) => $key),+
                }
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                const MEMBERS: &[&str] = &[$($key),+];
                struct UnknownMember<'a>(&'a str);
                impl<'de> serde::de::DeserializeSeed<'de> for UnknownMember<'_> {
                    type Value = $name;
                    fn deserialize<D: serde::Deserializer<'de>>(self, _: D) -> Result<$name, D::Error> {
                        Err(serde::de::Error::unknown_field(self.0, MEMBERS))
                    }
                }
                struct Members;
                impl<'de> serde::de::Visitor<'de> for Members {
                    type Value = $name;
                    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                        write!(f, "an object that sets exactly one of {}", MEMBERS.join(", "))
                    }
                    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<$name, A::Error> {
                        let mut set: Option<$name> = None;
                        while let Some(key) = map.next_key::<String>()? {
                            let value = match key.as_str() {
                                $($key => map.next_value::<Option<$ty>>()?.map($name::$variant),)+
                                // Refused while reading its value, so the error's path ends in its name.
                                other => return map.next_value_seed(UnknownMember(other)),
                            };
                            match (&set, value) {
                                (Some(first), Some(second)) => {
                                    return Err(serde::de::Error::custom(format!(
                                        "sets both {} and {}; it must set exactly one of {}",
                                        first.member(),
                                        second.member(),
                                        MEMBERS.join(", ")
                                    )));
                                }
                                (None, Some(value)) => set = Some(value),
                                (_, None) => {}
                            }
                        }
                        set.ok_or_else(|| {
                            serde::de::Error::custom(format!("sets no member; it must set exactly one of {}", MEMBERS.join(", ")))
                        })
                    }
                }
                deserializer.deserialize_map(Members)
            }
        }
    };
}
pub(crate) use union;

#[cfg(test)]
mod tests {
    use super::*;

    fn weather() -> Vec<Tool> {
        vec![Tool {
            name: "get_weather".into(),
            description: "Weather for a city.".into(),
            input_schema: serde_json::json!({"type": "object"}),
        }]
    }

    #[test]
    fn tool_calls_are_recognised_in_plain_and_fenced_json() {
        let call = parse_tool_call(r#"{"name": "get_weather", "input": {"city": "Oslo"}}"#, &weather()).unwrap();
        assert_eq!((call.name.as_str(), &call.input), ("get_weather", &serde_json::json!({"city": "Oslo"})));
        assert!(call.id.starts_with("tooluse_"));
        let fenced = "```json\n{\"name\": \"get_weather\", \"arguments\": {}}\n```";
        assert!(parse_tool_call(fenced, &weather()).is_some());
        for not_a_call in
            ["It is sunny.", r#"{"name": "other", "input": {}}"#, r#"{"name": "get_weather", "input": 3}"#, "{"]
        {
            assert!(parse_tool_call(not_a_call, &weather()).is_none(), "{not_a_call}");
        }
    }

    #[test]
    fn sampling_ranges_are_checked() {
        assert!(check_sampling(0.5, 0.9, 1.0).is_ok());
        assert!(check_sampling(1.5, 0.9, 1.0).is_err());
        assert!(check_sampling(f32::NAN, 0.9, 1.0).is_err());
        assert!(check_sampling(0.5, 1.1, 1.0).is_err());
    }

    #[test]
    fn malformed_bodies_name_the_field() {
        #[derive(serde::Deserialize, Debug)]
        #[allow(dead_code)]
        struct B {
            a: Vec<u32>,
        }
        let err = parse_body::<B>(br#"{"a": [1, "x"]}"#).unwrap_err().to_string();
        assert!(err.contains("a[1]"), "{err}");
        assert!(parse_body::<B>(b"{").unwrap_err().to_string().contains("Malformed"));
        assert!(parse_body::<B>(b"\xff\xfe").is_err());
        assert!(parse_body::<B>(b"{\"a\": []} \n").is_ok());
        let err = parse_body::<B>(b"{\"a\": []} {\"a\": [2]}").unwrap_err().to_string();
        assert!(err.contains("trailing characters"), "{err}");
    }
}
