//! The gRPC service: requests are checked and turned into engine requests at the edge, engine
//! errors map to gRPC statuses in one place, and each Generate stream is fed by the scheduler.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mantle_engine::{
    ChatMessage, Constraint, EmbeddingModel, EngineError, Event, FinishReason, GenerateRequest, Grammar,
    SamplingParams, TextModel, Tokenizer, sampling::MAX_TOP_LOGPROBS,
};
use mantle_proto::runner_server::Runner;
use mantle_proto::{
    CountTokensRequest, CountTokensResponse, EmbedRequest, EmbedResponse, Embedding, Finished, GenerateResponse,
    HealthRequest, HealthSignal, InfoRequest, InfoResponse, PromptLogprobs, Started, TokenChunk, TokenLogprob, Usage,
    generate_response,
};
use tokio_stream::Stream;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::{IntervalStream, UnboundedReceiverStream};
use tonic::{Request, Response, Status};

use crate::engine_loop::{EngineHandle, Output};
use crate::health;

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// How often Health pushes a signal.
pub const HEALTH_INTERVAL: Duration = Duration::from_millis(100);

/// Texts one Embed request may carry.
pub const MAX_EMBED_TEXTS: usize = 256;

/// The model a runner serves: a text model behind the scheduler, or an embedding model.
pub enum Served {
    Text { model: Arc<TextModel>, engine: EngineHandle },
    Embedding { model: Arc<EmbeddingModel>, stats: tokio::sync::watch::Receiver<crate::engine_loop::LoopStats> },
}

pub struct RunnerService {
    served: Served,
    info: InfoResponse,
    gpu: tokio::sync::watch::Receiver<Option<crate::gpu::GpuSample>>,
    /// Set when the runner shuts down: Health streams end so the server can drain.
    stopping: Arc<std::sync::atomic::AtomicBool>,
}

impl RunnerService {
    pub fn new(
        served: Served,
        info: InfoResponse,
        gpu: tokio::sync::watch::Receiver<Option<crate::gpu::GpuSample>>,
        stopping: Arc<std::sync::atomic::AtomicBool>,
    ) -> Self {
        Self { served, info, gpu, stopping }
    }

    fn wrong_modality(&self, rpc: &str, needs: &str) -> Status {
        Status::failed_precondition(format!(
            "{} is a {} model; {rpc} needs a {needs} model",
            self.info.model_id, self.info.modality
        ))
    }

    /// Prompt tokens for a request: the conversation through the chat template, or the raw prompt.
    /// Tokenizing a long prompt takes milliseconds to seconds, so it runs on the blocking pool,
    /// never on the async workers that answer health streams and other callers.
    async fn prompt_tokens(
        &self,
        messages: Vec<mantle_proto::ChatMessage>,
        prompt: String,
    ) -> Result<Vec<u32>, Status> {
        let Served::Text { model, .. } = &self.served else {
            return Err(self.wrong_modality("a prompt", "TEXT"));
        };
        check_messages(&messages, &prompt)?;
        let model = model.clone();
        blocking(move || {
            if messages.is_empty() {
                return model.tokenizer.encode(&prompt);
            }
            let chat: Vec<ChatMessage> = messages.iter().map(|m| ChatMessage::new(&m.role, &m.content)).collect();
            model.chat_prompt(&chat)
        })
        .await
    }

    /// Compiles the request's grammar (on the blocking pool: a large schema takes milliseconds,
    /// and the first one builds the vocabulary's token trie).
    async fn constraint(&self, grammar: Option<mantle_proto::Grammar>) -> Result<Option<Constraint>, Status> {
        use mantle_proto::grammar::Kind;
        let Served::Text { model, .. } = &self.served else {
            return Err(self.wrong_modality("a grammar", "TEXT"));
        };
        let grammar = match grammar.and_then(|g| g.kind) {
            None => return Ok(None),
            Some(Kind::JsonSchema(text)) => Grammar::JsonSchema(
                serde_json::from_str(&text)
                    .map_err(|e| Status::invalid_argument(format!("grammar.json_schema is not JSON: {e}")))?,
            ),
            Some(Kind::Regex(rx)) => Grammar::Regex(rx),
            Some(Kind::Lark(lark)) => Grammar::Lark(lark),
        };
        let model = model.clone();
        blocking(move || model.compile_grammar(&grammar)).await.map(Some)
    }
}

/// Runs CPU-bound engine work (tokenizing, embedding) on the blocking pool.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, EngineError> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(work).await.map_err(|e| Status::internal(format!("engine task: {e}")))?.map_err(status)
}

/// The one place engine errors become gRPC statuses.
pub fn status(e: EngineError) -> Status {
    match e {
        EngineError::EmptyPrompt
        | EngineError::PromptTooLong { .. }
        | EngineError::InvalidMaxTokens { .. }
        | EngineError::Tokenizer(_)
        | EngineError::Template(_)
        | EngineError::Grammar(_) => Status::invalid_argument(e.to_string()),
        EngineError::InvalidModel(_) | EngineError::UnsupportedTokenizer(_) => {
            Status::failed_precondition(e.to_string())
        }
        // A device fault or an unreadable file: another runner may answer.
        EngineError::Io(_) | EngineError::Device(_) => Status::unavailable(e.to_string()),
    }
}

/// Checks a conversation's roles, and that there is a conversation or a prompt.
pub fn check_messages(messages: &[mantle_proto::ChatMessage], prompt: &str) -> Result<(), Status> {
    for (i, m) in messages.iter().enumerate() {
        if !matches!(m.role.as_str(), "system" | "user" | "assistant") {
            return Err(Status::invalid_argument(format!(
                "messages[{i}].role is {:?}; expected system, user or assistant",
                m.role
            )));
        }
    }
    if messages.is_empty() && prompt.is_empty() {
        return Err(Status::invalid_argument("the request has neither messages nor a prompt"));
    }
    Ok(())
}

/// Checks an Embed request's batch size.
pub fn check_embed_texts(texts: &[String]) -> Result<(), Status> {
    if texts.is_empty() || texts.len() > MAX_EMBED_TEXTS {
        return Err(Status::invalid_argument(format!(
            "texts has {} entries; send 1 to {MAX_EMBED_TEXTS}",
            texts.len()
        )));
    }
    Ok(())
}

/// Checks the sampling fields every engine takes the same way.
pub fn check_sampling(r: &mantle_proto::GenerateRequest) -> Result<(), Status> {
    if r.top_logprobs as usize > MAX_TOP_LOGPROBS {
        return Err(Status::invalid_argument(format!(
            "top_logprobs {} is more than {MAX_TOP_LOGPROBS}",
            r.top_logprobs
        )));
    }
    if !(r.temperature.is_finite() && r.temperature >= 0.0) {
        return Err(Status::invalid_argument(format!("temperature {} must be 0 or more", r.temperature)));
    }
    if !(r.top_p.is_finite() && (0.0..=1.0).contains(&r.top_p)) {
        return Err(Status::invalid_argument(format!("top_p {} must be between 0 and 1", r.top_p)));
    }
    Ok(())
}

/// The request's deadline as an instant (`None`: none), or DEADLINE_EXCEEDED when it has passed.
pub fn deadline(unix_ms: u64) -> Result<Option<Instant>, Status> {
    if unix_ms == 0 {
        return Ok(None);
    }
    let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64;
    if unix_ms <= now_ms {
        return Err(Status::deadline_exceeded("the request's deadline has already passed"));
    }
    Ok(Some(Instant::now() + Duration::from_millis(unix_ms - now_ms)))
}

fn finish_reason(reason: FinishReason) -> mantle_proto::FinishReason {
    match reason {
        FinishReason::EndTurn => mantle_proto::FinishReason::EndTurn,
        FinishReason::MaxTokens => mantle_proto::FinishReason::MaxTokens,
        FinishReason::StopSequence => mantle_proto::FinishReason::StopSequence,
    }
}

/// A token's log-probability as the stream carries it, with its bytes and alternatives.
fn token_logprob(tokenizer: &Tokenizer, token: u32, logprob: f32, top: &[(u32, f32)]) -> TokenLogprob {
    TokenLogprob {
        token: tokenizer.token_bytes(token).unwrap_or_default(),
        logprob,
        token_id: token,
        top: top.iter().map(|&(t, l)| token_logprob(tokenizer, t, l, &[])).collect(),
    }
}

/// One engine output as a stream message; the reply's tokens carry their log-probabilities when
/// `logprobs` (the request asked for them).
fn response(output: Output, tokenizer: &Tokenizer, logprobs: bool) -> Result<GenerateResponse, Status> {
    let event = match output {
        Output::DeadlineExceeded => {
            return Err(Status::deadline_exceeded("the request's deadline passed before it finished"));
        }
        Output::Event(Event::Failed { error, .. }) => {
            // The device failed under the batch: another runner may well answer.
            return Err(Status::unavailable(format!("the runner's engine failed: {error}")));
        }
        Output::Event(Event::Token { token, text, logprob, top, .. }) => generate_response::Event::Token(TokenChunk {
            text,
            token_ids: vec![token],
            logprobs: if logprobs { vec![logprob] } else { Vec::new() },
            token_logprobs: (logprobs && tokenizer.token_bytes(token).is_some())
                .then(|| token_logprob(tokenizer, token, logprob, &top))
                .into_iter()
                .collect(),
        }),
        Output::Event(Event::PromptLogprobs { first_position, tokens, .. }) => {
            generate_response::Event::PromptLogprobs(PromptLogprobs {
                first_position: first_position as u32,
                tokens: tokens.iter().map(|s| token_logprob(tokenizer, s.token, s.logprob, &s.top)).collect(),
            })
        }
        Output::Event(Event::Finished { reason, stop_sequence, usage, .. }) => {
            generate_response::Event::Finished(Finished {
                reason: finish_reason(reason) as i32,
                stop_sequence: stop_sequence.unwrap_or_default(),
                usage: Some(Usage {
                    input_tokens: usage.input_tokens as u32,
                    output_tokens: usage.output_tokens as u32,
                    cached_prompt_tokens: usage.cached_tokens as u32,
                }),
            })
        }
    };
    Ok(GenerateResponse { event: Some(event) })
}

#[tonic::async_trait]
impl Runner for RunnerService {
    type GenerateStream = ResponseStream<GenerateResponse>;
    type HealthStream = ResponseStream<HealthSignal>;

    #[tracing::instrument(skip_all, fields(request_id = %request.get_ref().request_id))]
    async fn generate(
        &self,
        request: Request<mantle_proto::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let r = request.into_inner();
        let Served::Text { engine, model } = &self.served else {
            return Err(self.wrong_modality("Generate", "TEXT"));
        };
        check_sampling(&r)?;
        let deadline = deadline(r.deadline_unix_ms)?;
        let prompt = match r.prompt_token_ids {
            ids if ids.is_empty() => self.prompt_tokens(r.messages, r.prompt).await?,
            _ if !(r.messages.is_empty() && r.prompt.is_empty()) => {
                return Err(Status::invalid_argument("send prompt_token_ids, messages or a prompt: one of them"));
            }
            ids => {
                let vocab = model.model.config.vocab;
                if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
                    return Err(Status::invalid_argument(format!(
                        "prompt token id {bad} is not in the model's vocabulary of {vocab} tokens"
                    )));
                }
                ids
            }
        };
        let constraint = self.constraint(r.grammar).await?;
        let mut max_tokens = r.max_tokens as usize;
        if r.clamp_max_tokens {
            max_tokens = max_tokens.min((self.info.context_length as usize).saturating_sub(prompt.len()));
        }
        let started = GenerateResponse {
            event: Some(generate_response::Event::Started(Started {
                input_tokens: prompt.len() as u32,
                max_tokens: max_tokens as u32,
            })),
        };
        let engine_request = GenerateRequest {
            id: 0,
            prompt,
            max_tokens,
            sampling: SamplingParams {
                temperature: r.temperature,
                top_p: if r.top_p == 0.0 { 1.0 } else { r.top_p },
                top_k: r.top_k as usize,
                seed: r.seed,
                top_logprobs: r.top_logprobs as usize,
            },
            stop_sequences: r.stop_sequences,
            priority: r.priority.clamp(0, mantle_engine::scheduler::MAX_PRIORITY as i32) as u8,
            cache_salt: r.cache_salt,
            constraint,
            prompt_logprobs: r.prompt_logprobs,
        };
        let events = engine.generate(engine_request, deadline).await.map_err(status)?;
        tracing::debug!("generation started");
        let (model, logprobs) = (model.clone(), r.logprobs);
        let stream = tokio_stream::once(Ok(started)).chain(
            UnboundedReceiverStream::new(events).map(move |output| response(output, &model.tokenizer, logprobs)),
        );
        Ok(Response::new(Box::pin(stream)))
    }

    #[tracing::instrument(skip_all, fields(request_id = %request.get_ref().request_id))]
    async fn embed(&self, request: Request<EmbedRequest>) -> Result<Response<EmbedResponse>, Status> {
        let Served::Embedding { model, .. } = &self.served else {
            return Err(self.wrong_modality("Embed", "EMBEDDING"));
        };
        let texts = request.into_inner().texts;
        check_embed_texts(&texts)?;
        let model = model.clone();
        let out = blocking(move || model.embed(&texts)).await?;
        Ok(Response::new(EmbedResponse {
            embeddings: out.vectors.into_iter().map(|values| Embedding { values }).collect(),
            input_tokens: out.input_tokens as u32,
        }))
    }

    async fn count_tokens(
        &self,
        request: Request<CountTokensRequest>,
    ) -> Result<Response<CountTokensResponse>, Status> {
        let r = request.into_inner();
        let count = match &self.served {
            Served::Text { .. } => self.prompt_tokens(r.messages, r.prompt).await?.len(),
            Served::Embedding { model, .. } => {
                let model = model.clone();
                blocking(move || {
                    let texts = r
                        .messages
                        .iter()
                        .map(|m| m.content.as_str())
                        .chain((!r.prompt.is_empty()).then_some(r.prompt.as_str()));
                    let mut total = 0;
                    for text in texts {
                        total += model.count_tokens(text)?;
                    }
                    Ok(total)
                })
                .await?
            }
        };
        Ok(Response::new(CountTokensResponse { input_tokens: count as u32 }))
    }

    async fn info(&self, _request: Request<InfoRequest>) -> Result<Response<InfoResponse>, Status> {
        Ok(Response::new(self.info.clone()))
    }

    async fn health(&self, _request: Request<HealthRequest>) -> Result<Response<Self::HealthStream>, Status> {
        let stats = match &self.served {
            Served::Text { engine, .. } => engine.stats(),
            Served::Embedding { stats, .. } => stats.clone(),
        };
        let ticks = IntervalStream::new(tokio::time::interval(HEALTH_INTERVAL));
        let gpu = self.gpu.clone();
        let stopping = self.stopping.clone();
        let stream = ticks
            .take_while(move |_| !stopping.load(std::sync::atomic::Ordering::Relaxed))
            .map(move |_| Ok(health::signal(&stats.borrow(), gpu.borrow().as_ref())));
        Ok(Response::new(Box::pin(stream)))
    }
}
