//! The `mantle.runner.v1` gRPC API over an OpenAI-compatible upstream.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use mantle_engine::{ChatMessage, ChatTemplate, Tokenizer};
use mantle_proto::runner_server::Runner;
use mantle_proto::{
    CountTokensRequest, CountTokensResponse, EmbedRequest, EmbedResponse, Embedding, GenerateResponse, HealthRequest,
    HealthSignal, InfoRequest, InfoResponse,
};
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::{IntervalStream, ReceiverStream};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use super::monitor::{UpstreamState, signal};
use super::openai::{PriorityMode, plan};
use super::relay::{self, Limits, Relay};
use super::upstream::{Upstream, UpstreamError};
use super::{Flavor, Modality};
use crate::gpu::GpuSample;
use crate::metrics::Metrics;
use crate::service::{HEALTH_INTERVAL, check_embed_texts, check_messages, check_sampling, deadline};

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// How long a request without a deadline waits for the upstream's answer to begin (a long prompt
/// queued behind others on a busy server takes a while).
const HEAD_TIMEOUT: Duration = Duration::from_secs(600);
/// How long a token count or an embedding may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(120);

/// The model's own tokenizer and chat template, loaded from its GGUF without the weights: token
/// counts for an upstream without a `/tokenize`.
pub struct LocalTokenizer {
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
}

impl LocalTokenizer {
    fn count(&self, messages: &[mantle_proto::ChatMessage], prompt: &str) -> Result<usize, mantle_engine::EngineError> {
        if messages.is_empty() {
            return Ok(self.tokenizer.encode(prompt)?.len());
        }
        let chat: Vec<ChatMessage> = messages.iter().map(|m| ChatMessage::new(&m.role, &m.content)).collect();
        Ok(self.tokenizer.encode(&self.template.render(&chat)?)?.len())
    }
}

pub struct ExternalService {
    pub upstream: Upstream,
    /// The name the upstream serves the model under.
    pub model: String,
    pub flavor: Flavor,
    pub modality: Modality,
    pub priority: PriorityMode,
    pub info: InfoResponse,
    pub state: watch::Receiver<UpstreamState>,
    pub gpu: watch::Receiver<Option<GpuSample>>,
    pub stopping: Arc<AtomicBool>,
    pub tokenizer: Option<Arc<LocalTokenizer>>,
    pub metrics: Metrics,
}

impl ExternalService {
    fn wrong_modality(&self, rpc: &str, needs: &str) -> Status {
        Status::failed_precondition(format!(
            "{} is a {} model; {rpc} needs a {needs} model",
            self.info.model_id, self.info.modality
        ))
    }

    /// Fails fast while the upstream is down: the router tries another replica or answers
    /// ServiceUnavailable, instead of each request waiting for a connect timeout.
    fn check_up(&self) -> Result<(), Status> {
        match &self.state.borrow().down {
            Some(why) => Err(Status::unavailable(format!("the model's engine is not answering: {why}"))),
            None => Ok(()),
        }
    }

    /// The upstream's own count: vLLM's `/tokenize` takes the conversation; llama.cpp's server
    /// renders it with `/apply-template` first. `Ok(None)`: this upstream has no such endpoint.
    async fn upstream_count(&self, r: &CountTokensRequest) -> Result<Option<usize>, UpstreamError> {
        let messages: Vec<Value> = r.messages.iter().map(|m| json!({"role": m.role, "content": m.content})).collect();
        let count = |v: &Value| {
            v.get("count")
                .and_then(Value::as_u64)
                .map(|c| c as usize)
                .or_else(|| v.get("tokens").and_then(Value::as_array).map(Vec::len))
        };
        let malformed = |path: &str| UpstreamError::Malformed {
            url: format!("{}{path}", self.upstream.base()),
            reason: "no token count in the answer".into(),
        };
        match self.flavor {
            Flavor::Vllm => {
                let body = if messages.is_empty() {
                    json!({"model": self.model, "prompt": r.prompt})
                } else {
                    json!({"model": self.model, "messages": messages, "add_generation_prompt": true})
                };
                let answer = self.upstream.post_json("/tokenize", &body, CALL_TIMEOUT).await?;
                count(&answer).map(Some).ok_or_else(|| malformed("/tokenize"))
            }
            Flavor::LlamaCpp => {
                let content = if messages.is_empty() {
                    r.prompt.clone()
                } else {
                    let rendered = self
                        .upstream
                        .post_json("/apply-template", &json!({"messages": messages}), CALL_TIMEOUT)
                        .await?;
                    rendered
                        .get("prompt")
                        .and_then(Value::as_str)
                        .ok_or_else(|| malformed("/apply-template"))?
                        .to_string()
                };
                let body = json!({"content": content, "add_special": true, "parse_special": !messages.is_empty()});
                let answer = self.upstream.post_json("/tokenize", &body, CALL_TIMEOUT).await?;
                count(&answer).map(Some).ok_or_else(|| malformed("/tokenize"))
            }
            Flavor::Sglang | Flavor::Generic => Ok(None),
        }
    }
}

impl ExternalService {
    /// The count from the usage of a one-token completion: exact on any OpenAI-compatible server
    /// (SGLang, Ollama), at the cost of a prefill, for those without `/tokenize` when the runner has
    /// no tokenizer of its own.
    async fn count_by_completion(&self, r: &CountTokensRequest) -> Result<usize, UpstreamError> {
        let (path, mut body) = if r.messages.is_empty() {
            ("/v1/completions", json!({"prompt": r.prompt}))
        } else {
            let messages: Vec<Value> =
                r.messages.iter().map(|m| json!({"role": m.role, "content": m.content})).collect();
            ("/v1/chat/completions", json!({"messages": messages}))
        };
        body["model"] = json!(self.model);
        body["max_tokens"] = json!(1);
        body["temperature"] = json!(0);
        let answer = self.upstream.post_json(path, &body, CALL_TIMEOUT).await?;
        answer.pointer("/usage/prompt_tokens").and_then(Value::as_u64).map(|n| n as usize).ok_or_else(|| {
            UpstreamError::Malformed {
                url: format!("{}{path}", self.upstream.base()),
                reason: "no usage.prompt_tokens in the answer".into(),
            }
        })
    }
}

/// Scales `v` to unit length (the API promises L2-normalised vectors; not every server does).
fn normalise(mut v: Vec<f32>) -> Vec<f32> {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
    v
}

/// The vectors of an OpenAI embeddings answer, in input order, and its prompt tokens.
pub fn embeddings(answer: &Value, expected: usize) -> Result<(Vec<Vec<f32>>, u32), String> {
    let data = answer.get("data").and_then(Value::as_array).ok_or("no data in the answer")?;
    if data.len() != expected {
        return Err(format!("{} vectors for {expected} texts", data.len()));
    }
    let mut vectors: Vec<Option<Vec<f32>>> = vec![None; expected];
    for (i, item) in data.iter().enumerate() {
        let index = item.get("index").and_then(Value::as_u64).map_or(i, |x| x as usize);
        let values = item
            .get("embedding")
            .and_then(Value::as_array)
            .ok_or("an item without an embedding (base64 is not asked for)")?
            .iter()
            .map(|x| x.as_f64().map(|f| f as f32))
            .collect::<Option<Vec<f32>>>()
            .ok_or("an embedding holds a value that is not a number")?;
        let slot = vectors.get_mut(index).ok_or_else(|| format!("index {index} is out of range"))?;
        *slot = Some(normalise(values));
    }
    let vectors = vectors.into_iter().collect::<Option<Vec<_>>>().ok_or("an index appears twice")?;
    let tokens = answer.get("usage").and_then(|u| u.get("prompt_tokens")).and_then(Value::as_u64).unwrap_or(0);
    Ok((vectors, tokens as u32))
}

#[tonic::async_trait]
impl Runner for ExternalService {
    type GenerateStream = ResponseStream<GenerateResponse>;
    type HealthStream = ResponseStream<HealthSignal>;

    #[tracing::instrument(skip_all, fields(request_id = %request.get_ref().request_id))]
    async fn generate(
        &self,
        request: Request<mantle_proto::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let r = request.into_inner();
        if self.modality != Modality::Text {
            return Err(self.wrong_modality("Generate", "TEXT"));
        }
        if r.prompt_token_ids.is_empty() {
            check_messages(&r.messages, &r.prompt)?;
        }
        check_sampling(&r)?;
        let deadline = deadline(r.deadline_unix_ms)?;
        let planned = plan(&r, &self.model, self.flavor, self.priority).map_err(Status::invalid_argument)?;
        self.check_up()?;
        let head_timeout = deadline.map_or(HEAD_TIMEOUT, |d| d.saturating_duration_since(Instant::now()));
        let response = match self.upstream.post_stream(planned.path, &planned.body, head_timeout).await {
            Ok(r) => r,
            Err(UpstreamError::Timeout { .. }) if deadline.is_some() => {
                self.metrics.requests.with_label_values(&["deadline_exceeded"]).inc();
                return Err(Status::deadline_exceeded("the request's deadline passed before it started"));
            }
            Err(e) => {
                self.metrics.requests.with_label_values(&["rejected"]).inc();
                tracing::debug!(error = %e, "the upstream refused the request");
                return Err(e.status());
            }
        };
        let limits = Limits {
            stop_sequences: r.stop_sequences,
            max_tokens: r.max_tokens,
            local_max_tokens: planned.local_max_tokens,
            logprobs: r.logprobs,
        };
        let (tx, rx) = mpsc::channel(64);
        let span = tracing::Span::current();
        tokio::spawn(tracing::Instrument::instrument(
            relay::run(response, Relay::new(limits), tx, deadline, self.metrics.clone()),
            span,
        ));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    #[tracing::instrument(skip_all, fields(request_id = %request.get_ref().request_id))]
    async fn embed(&self, request: Request<EmbedRequest>) -> Result<Response<EmbedResponse>, Status> {
        if self.modality != Modality::Embedding {
            return Err(self.wrong_modality("Embed", "EMBEDDING"));
        }
        let texts = request.into_inner().texts;
        check_embed_texts(&texts)?;
        self.check_up()?;
        let body = json!({"model": self.model, "input": texts, "encoding_format": "float"});
        let answer = self.upstream.post_json("/v1/embeddings", &body, CALL_TIMEOUT).await.map_err(|e| e.status())?;
        let (vectors, input_tokens) = embeddings(&answer, texts.len())
            .map_err(|e| Status::unavailable(format!("the upstream's embeddings are malformed: {e}")))?;
        Ok(Response::new(EmbedResponse {
            embeddings: vectors.into_iter().map(|values| Embedding { values }).collect(),
            input_tokens,
        }))
    }

    async fn count_tokens(
        &self,
        request: Request<CountTokensRequest>,
    ) -> Result<Response<CountTokensResponse>, Status> {
        let r = request.into_inner();
        if self.modality == Modality::Embedding {
            // The embeddings answer's usage is the count, whatever the server.
            let texts: Vec<String> = r
                .messages
                .iter()
                .map(|m| m.content.clone())
                .chain((!r.prompt.is_empty()).then(|| r.prompt.clone()))
                .collect();
            if texts.is_empty() {
                return Ok(Response::new(CountTokensResponse { input_tokens: 0 }));
            }
            let embedded = self.embed(Request::new(EmbedRequest { request_id: String::new(), texts })).await?;
            return Ok(Response::new(CountTokensResponse { input_tokens: embedded.into_inner().input_tokens }));
        }
        check_messages(&r.messages, &r.prompt)?;
        self.check_up()?;
        let upstream = match self.upstream_count(&r).await {
            Ok(count) => count,
            Err(e) if e.is_not_found() => None,
            Err(e) => return Err(e.status()),
        };
        let count = match (upstream, &self.tokenizer) {
            (Some(count), _) => count,
            (None, Some(local)) => {
                let local = local.clone();
                tokio::task::spawn_blocking(move || local.count(&r.messages, &r.prompt))
                    .await
                    .map_err(|e| Status::internal(format!("tokenizer task: {e}")))?
                    .map_err(crate::service::status)?
            }
            (None, None) => self.count_by_completion(&r).await.map_err(|e| e.status())?,
        };
        Ok(Response::new(CountTokensResponse { input_tokens: count as u32 }))
    }

    async fn info(&self, _request: Request<InfoRequest>) -> Result<Response<InfoResponse>, Status> {
        Ok(Response::new(self.info.clone()))
    }

    async fn health(&self, _request: Request<HealthRequest>) -> Result<Response<Self::HealthStream>, Status> {
        let ticks = IntervalStream::new(tokio::time::interval(HEALTH_INTERVAL));
        let (state, gpu, stopping) = (self.state.clone(), self.gpu.clone(), self.stopping.clone());
        let stream = ticks
            .take_while(move |_| !stopping.load(Ordering::Relaxed))
            .map(move |_| Ok(signal(&state.borrow(), gpu.borrow().as_ref())));
        Ok(Response::new(Box::pin(stream)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embeddings_come_back_in_input_order_and_unit_length() {
        let answer = json!({
            "data": [
                {"index": 1, "embedding": [0.0, 2.0]},
                {"index": 0, "embedding": [3.0, 4.0]}
            ],
            "usage": {"prompt_tokens": 7}
        });
        let (vectors, tokens) = embeddings(&answer, 2).unwrap();
        assert_eq!(vectors, vec![vec![0.6, 0.8], vec![0.0, 1.0]]);
        assert_eq!(tokens, 7);
    }

    #[test]
    fn malformed_embeddings_are_refused() {
        assert!(embeddings(&json!({}), 1).is_err());
        assert!(embeddings(&json!({"data": []}), 1).unwrap_err().contains("0 vectors for 1"));
        assert!(embeddings(&json!({"data": [{"embedding": "AAAA"}]}), 1).is_err());
        assert!(embeddings(&json!({"data": [{"embedding": [1, "x"]}]}), 1).is_err());
        assert!(embeddings(&json!({"data": [{"index": 5, "embedding": [1]}]}), 1).is_err());
        let twice = json!({"data": [{"index": 0, "embedding": [1]}, {"index": 0, "embedding": [1]}]});
        assert!(embeddings(&twice, 2).is_err());
    }
}
