//! OpenAI's completions API (`/v1/completions`): a raw prompt continued without a chat template
//! and, with `echo` and `logprobs`, the prompt's own tokens scored — how evaluation harnesses
//! (lm-evaluation-harness's `local-completions`) compute log-likelihoods and perplexities.
//!
//! A prompt is a string, a list of strings, a list of token ids or a list of such lists; each
//! prompt is one choice. `max_tokens: 0` with `echo` scores the prompt and generates nothing.

use serde_json::{Map, Value, json};

use super::openai::{check_fields, finish_reason, flag, sampling, small_int, unix_now};
use super::{StopReason, TextOutput, TextRequest, TokenLogprob, Usage};
use crate::error::ApiError;

/// Prompts one request may carry (each is a generation of its own).
pub const MAX_PROMPTS: usize = 128;
/// The most alternatives `logprobs` may ask for (OpenAI's limit).
pub const MAX_LOGPROBS: u32 = 5;
/// Output tokens when the client does not say (OpenAI's default for this API).
const DEFAULT_MAX_TOKENS: u32 = 16;

/// One prompt: text, tokenized by the runner with the model's tokenizer, or token ids.
#[derive(Clone, Debug, PartialEq)]
pub enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
}

/// A completions body, mapped.
#[derive(Debug)]
pub struct Completion {
    pub model: String,
    pub prompts: Vec<Prompt>,
    pub stream: bool,
    pub include_usage: bool,
    /// Return the prompt before the completion (scored, with `logprobs`).
    pub echo: bool,
    /// Report log-probabilities, with this many alternatives per token.
    pub logprobs: Option<u32>,
    /// `max_tokens: 0` with `echo`: score the prompt, generate nothing.
    pub score_only: bool,
    pub cache_salt: Option<String>,
    /// The runner request for every prompt, less the prompt itself.
    pub request: TextRequest,
}

impl Completion {
    /// The runner request for one prompt. The prompt is scored only when the reply shows the
    /// scores, or needs the tokens' text (an echoed prompt of token ids): scoring computes the
    /// logits of every prompt position and bypasses the prefix cache.
    pub fn request_for(&self, prompt: &Prompt) -> TextRequest {
        let mut request = self.request.clone();
        match prompt {
            Prompt::Text(text) => request.prompt = Some(text.clone()),
            Prompt::Tokens(ids) => request.prompt_token_ids = ids.clone(),
        }
        request.prompt_logprobs = self.echo && (self.logprobs.is_some() || matches!(prompt, Prompt::Tokens(_)));
        request
    }
}

/// Completions fields the router serves.
const FIELDS: &[&str] = &[
    "model",
    "prompt",
    "max_tokens",
    "temperature",
    "top_p",
    "n",
    "best_of",
    "stream",
    "stream_options",
    "logprobs",
    "echo",
    "stop",
    "seed",
    "suffix",
    "user",
    "cache_salt",
];

/// Fields OpenAI defines that the router serves only at their defaults.
const FIELDS_AT_DEFAULT: &[&str] = &["frequency_penalty", "presence_penalty", "logit_bias"];

fn token_list(value: &Value, at: &str) -> Result<Vec<u32>, ApiError> {
    let list = value.as_array().ok_or_else(|| ApiError::validation(format!("{at} must be a list of token ids")))?;
    let ids = list
        .iter()
        .map(|v| v.as_u64().filter(|&id| id <= u32::MAX as u64).map(|id| id as u32))
        .collect::<Option<Vec<u32>>>()
        .ok_or_else(|| ApiError::validation(format!("{at} must hold token ids: integers of 0 or more")))?;
    if ids.is_empty() {
        return Err(ApiError::validation(format!("{at} must not be empty")));
    }
    Ok(ids)
}

fn prompts(value: &Value) -> Result<Vec<Prompt>, ApiError> {
    let prompts = match value {
        Value::String(s) => vec![Prompt::Text(s.clone())],
        Value::Array(items) if items.first().is_some_and(Value::is_number) => {
            vec![Prompt::Tokens(token_list(value, "prompt")?)]
        }
        Value::Array(items) if !items.is_empty() => items
            .iter()
            .enumerate()
            .map(|(i, item)| match item {
                Value::String(s) => Ok(Prompt::Text(s.clone())),
                Value::Array(_) => Ok(Prompt::Tokens(token_list(item, &format!("prompt[{i}]"))?)),
                _ => Err(ApiError::validation(format!("prompt[{i}] must be a string or a list of token ids"))),
            })
            .collect::<Result<_, _>>()?,
        Value::Null => return Err(ApiError::validation("prompt is required")),
        _ => {
            return Err(ApiError::validation(
                "prompt must be a string, a list of strings, a list of token ids, or a list of such lists",
            ));
        }
    };
    if prompts.len() > MAX_PROMPTS {
        return Err(ApiError::validation(format!(
            "prompt holds {} prompts; send at most {MAX_PROMPTS}",
            prompts.len()
        )));
    }
    if prompts.iter().any(|p| matches!(p, Prompt::Text(t) if t.is_empty())) {
        return Err(ApiError::validation("a prompt must not be empty"));
    }
    Ok(prompts)
}

pub fn completion_request(body: &Value) -> Result<Completion, ApiError> {
    check_fields(body, FIELDS, FIELDS_AT_DEFAULT)?;
    let model = body["model"]
        .as_str()
        .filter(|m| !m.is_empty())
        .ok_or_else(|| ApiError::validation("you must provide a model parameter"))?
        .to_string();
    let prompts = prompts(&body["prompt"])?;
    for key in ["n", "best_of"] {
        if !(body[key].is_null() || body[key].as_u64() == Some(1)) {
            return Err(ApiError::validation(format!("{key} must be 1: this server makes one choice per prompt")));
        }
    }
    if !(body["suffix"].is_null() || body["suffix"] == "") {
        return Err(ApiError::validation("suffix is not supported by this server: it completes prompts left to right"));
    }
    let echo = flag(body, "echo")?;
    let logprobs = small_int(body, "logprobs", MAX_LOGPROBS)?;
    let max_tokens = match &body["max_tokens"] {
        Value::Null => DEFAULT_MAX_TOKENS,
        v => v
            .as_u64()
            .filter(|&n| n <= u32::MAX as u64)
            .ok_or_else(|| ApiError::validation("max_tokens must be an integer of 0 or more"))? as u32,
    };
    if max_tokens == 0 && !echo {
        return Err(ApiError::validation("max_tokens 0 generates nothing; it is served only with echo"));
    }
    let (temperature, top_p) = sampling(body)?;
    let stop_sequences = match &body["stop"] {
        Value::Null => Vec::new(),
        Value::String(s) => vec![s.clone()],
        Value::Array(a) if a.iter().all(Value::is_string) && a.len() <= 4 => {
            a.iter().filter_map(|s| s.as_str().map(str::to_owned)).collect()
        }
        _ => return Err(ApiError::validation("stop must be a string or a list of up to 4 strings")),
    };
    let stream = body["stream"].as_bool().unwrap_or(false);
    if stream && prompts.len() > 1 {
        return Err(ApiError::validation("stream serves one prompt per request; send the prompts one by one"));
    }
    let cache_salt = match &body["cache_salt"] {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        _ => return Err(ApiError::validation("cache_salt must be a string")),
    };
    Ok(Completion {
        model,
        prompts,
        stream,
        include_usage: body["stream_options"]["include_usage"].as_bool().unwrap_or(false),
        echo,
        logprobs,
        score_only: max_tokens == 0,
        cache_salt,
        request: TextRequest {
            // The runner generates at least one token; a score-only request drops it.
            max_tokens: Some(max_tokens.max(1)),
            temperature,
            top_p,
            seed: body["seed"].as_u64().unwrap_or(0),
            stop_sequences,
            logprobs: logprobs.is_some(),
            top_logprobs: logprobs.unwrap_or(0),
            // Set per prompt by `request_for`.
            prompt_logprobs: false,
            ..TextRequest::default()
        },
    })
}

/// How a token is named in completions' logprobs: its text, or `bytes:\xNN…` for a piece of a
/// UTF-8 character (as OpenAI writes it).
fn token_text(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(text) => text.to_string(),
        Err(_) => format!("bytes:{}", bytes.iter().map(|b| format!("\\x{b:02x}")).collect::<String>()),
    }
}

/// A choice's `logprobs` object, built token by token.
#[derive(Default)]
struct Logprobs {
    tokens: Vec<Value>,
    token_logprobs: Vec<Value>,
    top_logprobs: Vec<Value>,
    text_offset: Vec<Value>,
    /// Characters of text so far.
    offset: usize,
}

impl Logprobs {
    /// Adds a token; `scored` is false for the first prompt token, which has no context.
    fn push(&mut self, token: &TokenLogprob, scored: bool) {
        self.tokens.push(token_text(&token.bytes).into());
        self.text_offset.push(self.offset.into());
        self.offset += String::from_utf8_lossy(&token.bytes).chars().count();
        if scored {
            self.token_logprobs.push(token.logprob_json());
            let top: Map<String, Value> = token.top.iter().map(|t| (token_text(&t.bytes), t.logprob_json())).collect();
            self.top_logprobs.push(top.into());
        } else {
            self.token_logprobs.push(Value::Null);
            self.top_logprobs.push(Value::Null);
        }
    }

    fn into_json(self) -> Value {
        json!({
            "tokens": self.tokens,
            "token_logprobs": self.token_logprobs,
            "top_logprobs": self.top_logprobs,
            "text_offset": self.text_offset,
        })
    }
}

/// What one prompt came to, as the response reports it.
pub struct Answer<'a> {
    pub prompt: &'a Prompt,
    pub output: &'a TextOutput,
    /// The reply's tokens' log-probabilities (when asked for).
    pub logprobs: &'a [TokenLogprob],
    /// The prompt's tokens' (when echoed).
    pub prompt_logprobs: &'a [TokenLogprob],
}

impl Completion {
    /// The echoed prompt's text: as sent, or its tokens' text for token ids.
    fn prompt_text(prompt: &Prompt, scores: &[TokenLogprob]) -> String {
        match prompt {
            Prompt::Text(text) => text.clone(),
            Prompt::Tokens(_) => {
                String::from_utf8_lossy(&scores.iter().flat_map(|t| t.bytes.clone()).collect::<Vec<_>>()).into_owned()
            }
        }
    }

    /// One choice: the text (after the echoed prompt), its log-probabilities and why it ended.
    pub fn choice(&self, index: usize, answer: &Answer<'_>) -> Value {
        let mut text = String::new();
        let mut logprobs = Logprobs::default();
        if self.echo {
            text.push_str(&Self::prompt_text(answer.prompt, answer.prompt_logprobs));
            for (i, t) in answer.prompt_logprobs.iter().enumerate() {
                logprobs.push(t, i > 0);
            }
        }
        if !self.score_only {
            text.push_str(&answer.output.text);
            for t in answer.logprobs {
                logprobs.push(t, true);
            }
        }
        let stop = if self.score_only { StopReason::MaxTokens } else { answer.output.stop_reason };
        json!({
            "text": text,
            "index": index,
            "logprobs": if self.logprobs.is_some() { logprobs.into_json() } else { Value::Null },
            "finish_reason": finish_reason(stop),
        })
    }

    /// The usage of every prompt together (a score-only request generated nothing).
    pub fn usage(&self, outputs: &[&TextOutput]) -> Value {
        let mut total = Usage::default();
        for o in outputs {
            total.input_tokens += o.usage.input_tokens;
            total.cached_tokens += o.usage.cached_tokens;
            if !self.score_only {
                total.output_tokens += o.usage.output_tokens;
            }
        }
        json!({
            "prompt_tokens": total.input_tokens,
            "completion_tokens": total.output_tokens,
            "total_tokens": total.input_tokens + total.output_tokens,
            "prompt_tokens_details": { "cached_tokens": total.cached_tokens },
        })
    }

    /// The whole response.
    pub fn response(&self, id: &str, answers: &[Answer<'_>]) -> Value {
        let choices: Vec<Value> = answers.iter().enumerate().map(|(i, a)| self.choice(i, a)).collect();
        let outputs: Vec<&TextOutput> = answers.iter().map(|a| a.output).collect();
        json!({
            "id": format!("cmpl-{id}"),
            "object": "text_completion",
            "created": unix_now(),
            "model": self.model,
            "choices": choices,
            "usage": self.usage(&outputs),
        })
    }

    /// One streamed chunk: new text (with its tokens' log-probabilities when asked for), or the
    /// end with its finish reason. `offset` is the characters streamed before this chunk: a
    /// token's `text_offset` counts from the start of the whole text, as in a non-streamed answer.
    pub fn chunk(
        &self,
        id: &str,
        (text, offset): (&str, usize),
        tokens: &[TokenLogprob],
        first_scored: bool,
        end: Option<StopReason>,
    ) -> Value {
        let logprobs = self.logprobs.map(|_| {
            let mut l = Logprobs { offset, ..Default::default() };
            for (i, t) in tokens.iter().enumerate() {
                l.push(t, first_scored || i > 0);
            }
            l.into_json()
        });
        json!({
            "id": format!("cmpl-{id}"),
            "object": "text_completion",
            "created": unix_now(),
            "model": self.model,
            "choices": [{ "text": text, "index": 0, "logprobs": logprobs, "finish_reason": end.map(finish_reason) }],
        })
    }

    /// The usage-only chunk sent last when `stream_options.include_usage` is set.
    pub fn usage_chunk(&self, id: &str, output: &TextOutput) -> Value {
        json!({
            "id": format!("cmpl-{id}"),
            "object": "text_completion",
            "created": unix_now(),
            "model": self.model,
            "choices": [],
            "usage": self.usage(&[output]),
        })
    }

    /// The echoed prompt's text for a stream's first chunk.
    pub fn echoed(&self, prompt: &Prompt, scores: &[TokenLogprob]) -> String {
        Self::prompt_text(prompt, scores)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(extra: Value) -> Result<Completion, ApiError> {
        let mut body = json!({"model": "m", "prompt": "Once upon a time"});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        completion_request(&body)
    }

    #[test]
    fn prompts_come_as_text_token_ids_or_lists_of_either() {
        assert_eq!(with(json!({})).unwrap().prompts, [Prompt::Text("Once upon a time".into())]);
        assert_eq!(with(json!({"prompt": [1, 2, 3]})).unwrap().prompts, [Prompt::Tokens(vec![1, 2, 3])]);
        let c = with(json!({"prompt": ["a", [4, 5]]})).unwrap();
        assert_eq!(c.prompts, [Prompt::Text("a".into()), Prompt::Tokens(vec![4, 5])]);
        assert_eq!(c.request_for(&c.prompts[1]).prompt_token_ids, [4, 5]);
        assert_eq!(c.request_for(&c.prompts[0]).prompt.as_deref(), Some("a"));
        for (prompt, says) in [
            (json!(null), "prompt is required"),
            (json!([]), "prompt must be"),
            (json!(""), "must not be empty"),
            (json!([[]]), "prompt[0] must not be empty"),
            (json!([1, -2]), "token ids"),
            (json!([1, "a"]), "token ids"),
            (json!([{"text": "a"}]), "prompt[0] must be"),
            (json!(7), "prompt must be"),
            (json!(vec!["a"; MAX_PROMPTS + 1]), "at most"),
        ] {
            let err = with(json!({ "prompt": prompt })).unwrap_err().to_string();
            assert!(err.contains(says), "{prompt}: {err}");
        }
    }

    #[test]
    fn options_are_served_or_refused_by_name() {
        let c = with(json!({"echo": true, "logprobs": 1, "max_tokens": 0, "temperature": 0})).unwrap();
        assert!(c.score_only && c.echo && c.request_for(&c.prompts[0]).prompt_logprobs);
        let echo_only = with(json!({"echo": true})).unwrap();
        assert!(!echo_only.request_for(&echo_only.prompts[0]).prompt_logprobs, "a text prompt echoes as sent");
        assert!(echo_only.request_for(&Prompt::Tokens(vec![1])).prompt_logprobs, "token ids need their text");
        assert_eq!((c.logprobs, c.request.top_logprobs, c.request.max_tokens), (Some(1), 1, Some(1)));
        let c = with(json!({})).unwrap();
        assert_eq!(
            (c.request.max_tokens, c.logprobs, c.request_for(&c.prompts[0]).prompt_logprobs),
            (Some(16), None, false)
        );
        for (extra, says) in [
            (json!({"max_tokens": 0}), "only with echo"),
            (json!({"logprobs": 6}), "logprobs must be"),
            (json!({"logprobs": true}), "logprobs must be"),
            (json!({"n": 2}), "n must be 1"),
            (json!({"best_of": 3}), "best_of must be 1"),
            (json!({"suffix": "end"}), "suffix"),
            (json!({"presence_penalty": 1}), "presence_penalty"),
            (json!({"stream": true, "prompt": ["a", "b"]}), "one prompt per request"),
            (json!({"temperature": 3}), "temperature"),
            (json!({"stop": ["a", "b", "c", "d", "e"]}), "stop"),
            (json!({"echoo": true}), "Unrecognized request argument supplied: echoo"),
        ] {
            let err = with(extra.clone()).unwrap_err().to_string();
            assert!(err.contains(says), "{extra}: {err}");
        }
    }

    fn token(text: &[u8], logprob: f32, top: &[(&str, f32)]) -> TokenLogprob {
        TokenLogprob {
            bytes: text.to_vec(),
            logprob,
            top: top
                .iter()
                .map(|&(t, l)| TokenLogprob { bytes: t.as_bytes().to_vec(), logprob: l, top: Vec::new() })
                .collect(),
        }
    }

    #[test]
    fn streamed_chunks_count_text_offset_from_the_start_of_the_whole_text() {
        let c = with(json!({"prompt": "Hi there", "echo": true, "logprobs": 0, "stream": true})).unwrap();
        let prompt_scores = [token(b"Hi", 0.0, &[]), token(b" there", -2.5, &[])];
        let first = c.chunk("r", ("Hi there", 0), &prompt_scores, false, None);
        assert_eq!(first["choices"][0]["logprobs"]["text_offset"], json!([0, 2]));
        let reply = [token(b"!", -0.5, &[]), token(b" \xc3\xa9", -1.0, &[])];
        let next = c.chunk("r", ("! \u{e9}", 8), &reply, true, None);
        assert_eq!(next["choices"][0]["logprobs"]["text_offset"], json!([8, 9]));
        assert_eq!(next["choices"][0]["logprobs"]["token_logprobs"], json!([-0.5, -1.0]));
    }

    #[test]
    fn an_echoed_prompt_comes_back_scored_in_openais_shape() {
        let c = with(json!({"prompt": "Hi there", "echo": true, "logprobs": 1, "max_tokens": 1})).unwrap();
        let prompt_scores = [token(b"Hi", 0.0, &[]), token(b" there", -2.5, &[(" there", -2.5)])];
        let reply = [token(b"!", -0.5, &[("!", -0.5)])];
        let output = TextOutput {
            text: "!".into(),
            stop_reason: StopReason::MaxTokens,
            usage: Usage { input_tokens: 2, output_tokens: 1, cached_tokens: 0 },
            tool_call: None,
            stop_sequence: None,
        };
        let answer =
            Answer { prompt: &c.prompts[0], output: &output, logprobs: &reply, prompt_logprobs: &prompt_scores };
        let body = c.response("r1", &[answer]);
        assert_eq!(body["object"], "text_completion");
        let choice = &body["choices"][0];
        assert_eq!(choice["text"], "Hi there!");
        assert_eq!(choice["finish_reason"], "length");
        let l = &choice["logprobs"];
        assert_eq!(l["tokens"], json!(["Hi", " there", "!"]));
        assert_eq!(l["token_logprobs"], json!([null, -2.5, -0.5]));
        assert_eq!(l["top_logprobs"], json!([null, {" there": -2.5}, {"!": -0.5}]));
        assert_eq!(l["text_offset"], json!([0, 2, 8]));
        assert_eq!(body["usage"]["total_tokens"], 3);
        // Scoring only: the generated token is dropped, and not counted.
        let c = with(json!({"prompt": "Hi there", "echo": true, "logprobs": 0, "max_tokens": 0})).unwrap();
        let answer =
            Answer { prompt: &c.prompts[0], output: &output, logprobs: &reply, prompt_logprobs: &prompt_scores };
        let body = c.response("r2", &[answer]);
        assert_eq!(body["choices"][0]["text"], "Hi there");
        assert_eq!(body["choices"][0]["logprobs"]["tokens"], json!(["Hi", " there"]));
        assert_eq!(body["usage"]["completion_tokens"], 0);
        // A piece of a UTF-8 character is named by its bytes.
        assert_eq!(token_text(&[0xe2, 0x80]), "bytes:\\xe2\\x80");
    }
}
