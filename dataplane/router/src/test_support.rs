//! A runner stand-in for tests and benchmarks: the real `mantle.runner.v1` gRPC API, answering
//! every Generate with a fixed number of tokens at a fixed rate, so the router's own behaviour
//! and overhead can be measured without a model. It counts streams that clients abandon and
//! remembers what the last request carried.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use mantle_proto::auth::{RequireToken, Token};
use mantle_proto::runner_server::{Runner, RunnerServer};
use mantle_proto::{
    CountTokensRequest, CountTokensResponse, EmbedRequest, EmbedResponse, Embedding, FinishReason, Finished,
    GenerateRequest, GenerateResponse, HealthRequest, HealthSignal, InfoRequest, InfoResponse, LoadState,
    PromptLogprobs, Started, TokenChunk, TokenLogprob, Usage, generate_response,
};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

/// How the stand-in answers.
#[derive(Clone, Debug)]
pub struct StandInConfig {
    /// Tokens per Generate.
    pub tokens: u32,
    /// Time between tokens (zero: as fast as the stream is read).
    pub interval: Duration,
    /// Refuse every Generate with this gRPC code.
    pub fail_with: Option<tonic::Code>,
    /// Fail every Generate stream with this gRPC code after this many tokens.
    pub fail_after: Option<(u32, tonic::Code)>,
    pub context_length: u32,
    /// The width of its embeddings (`[text length, 1, 0, 0, …]`), reported by Info.
    pub embedding_dimensions: u32,
    /// The token every call must carry, as a runner started with `--auth-token-file`.
    pub token: Option<Token>,
}

impl Default for StandInConfig {
    fn default() -> Self {
        StandInConfig {
            tokens: 8,
            interval: Duration::ZERO,
            fail_with: None,
            fail_after: None,
            context_length: 4096,
            embedding_dimensions: 3,
            token: None,
        }
    }
}

/// What the stand-in saw.
#[derive(Default, Debug)]
pub struct Counters {
    pub generates: AtomicU64,
    pub count_tokens: AtomicU64,
    pub embeds: AtomicU64,
    /// Streams dropped by the client before their last token.
    pub cancelled: AtomicU64,
    pub active: AtomicU32,
    /// The last request's id, from the `x-request-id` metadata.
    pub last_request_id: std::sync::Mutex<String>,
    /// The last Generate's `cache_salt`.
    pub last_cache_salt: std::sync::Mutex<String>,
}

struct StandIn {
    config: StandInConfig,
    counters: Arc<Counters>,
}

/// Decrements `active` and counts a cancellation unless the stream finished.
struct StreamGuard {
    counters: Arc<Counters>,
    finished: bool,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.counters.active.fetch_sub(1, Ordering::Relaxed);
        if !self.finished {
            self.counters.cancelled.fetch_add(1, Ordering::Relaxed);
        }
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

fn prompt_tokens(r: &GenerateRequest) -> u32 {
    if !r.prompt_token_ids.is_empty() {
        return r.prompt_token_ids.len() as u32;
    }
    let bytes: usize = r.prompt.len() + r.messages.iter().map(|m| m.content.len() + 4).sum::<usize>();
    (bytes as u32).div_ceil(4).max(1)
}

/// The stand-in's prompt scores: a token per four characters of the prompt (or `<id>` per token
/// id), each after the first at -1 - i/100, with `top` alternatives led by the token itself.
fn prompt_scores(r: &GenerateRequest) -> Vec<TokenLogprob> {
    let pieces: Vec<Vec<u8>> = if r.prompt_token_ids.is_empty() {
        let chars: Vec<char> = r.prompt.chars().collect();
        chars.chunks(4).map(|c| c.iter().collect::<String>().into_bytes()).collect()
    } else {
        r.prompt_token_ids.iter().map(|id| format!("<{id}>").into_bytes()).collect()
    };
    pieces
        .into_iter()
        .enumerate()
        .map(|(i, token)| {
            let logprob = if i == 0 { 0.0 } else { -1.0 - i as f32 / 100.0 };
            let alternatives = if i == 0 { 0 } else { r.top_logprobs as usize };
            let top = (0..alternatives)
                .map(|j| TokenLogprob {
                    token: if j == 0 { token.clone() } else { format!("<alt{j}>").into_bytes() },
                    logprob: logprob - j as f32,
                    ..Default::default()
                })
                .collect();
            TokenLogprob { token, logprob, token_id: i as u32, top }
        })
        .collect()
}

#[tonic::async_trait]
impl Runner for StandIn {
    type GenerateStream = BoxStream<GenerateResponse>;
    type HealthStream = BoxStream<HealthSignal>;

    async fn generate(&self, request: Request<GenerateRequest>) -> Result<Response<Self::GenerateStream>, Status> {
        if let Some(id) = request.metadata().get("x-request-id").and_then(|v| v.to_str().ok()) {
            *self.counters.last_request_id.lock().unwrap_or_else(|e| e.into_inner()) = id.to_string();
        }
        let r = request.into_inner();
        *self.counters.last_cache_salt.lock().unwrap_or_else(|e| e.into_inner()) = r.cache_salt.clone();
        self.counters.generates.fetch_add(1, Ordering::Relaxed);
        if let Some(code) = self.config.fail_with {
            return Err(Status::new(code, "the stand-in was told to fail"));
        }
        let input = prompt_tokens(&r);
        if r.max_tokens == 0 || (!r.clamp_max_tokens && input + r.max_tokens > self.config.context_length) {
            return Err(Status::invalid_argument(format!(
                "max tokens {} is invalid: the context is {} and the prompt has {input} tokens",
                r.max_tokens, self.config.context_length
            )));
        }
        let n = self.config.tokens.min(r.max_tokens);
        let interval = self.config.interval;
        let fail_after = self.config.fail_after;
        let want_logprobs = r.logprobs;
        let top_logprobs = r.top_logprobs;
        let scores = r.prompt_logprobs.then(|| prompt_scores(&r));
        self.counters.active.fetch_add(1, Ordering::Relaxed);
        let mut guard = StreamGuard { counters: self.counters.clone(), finished: false };
        let stream = async_stream(move |tx| async move {
            let started = GenerateResponse {
                event: Some(generate_response::Event::Started(Started { input_tokens: input, max_tokens: n })),
            };
            if tx.send(Ok(started)).await.is_err() {
                return;
            }
            if let Some(tokens) = scores {
                let scored = PromptLogprobs { first_position: 0, tokens };
                let event = generate_response::Event::PromptLogprobs(scored);
                if tx.send(Ok(GenerateResponse { event: Some(event) })).await.is_err() {
                    return;
                }
            }
            for i in 0..n {
                if let Some((after, code)) = fail_after
                    && i == after
                {
                    guard.finished = true;
                    let _ = tx.send(Err(Status::new(code, "the stand-in failed mid-stream"))).await;
                    drop(guard);
                    return;
                }
                if !interval.is_zero() {
                    tokio::time::sleep(interval).await;
                }
                let text = format!(" tok{i}");
                // A made-up log-probability per token, with the token's text as its bytes.
                let (logprobs, token_logprobs) = match want_logprobs {
                    true => {
                        let logprob = -0.25 * (i + 1) as f32;
                        let top = (0..top_logprobs)
                            .map(|j| TokenLogprob {
                                token: if j == 0 {
                                    text.clone().into_bytes()
                                } else {
                                    format!("<alt{j}>").into_bytes()
                                },
                                logprob: logprob - j as f32,
                                ..Default::default()
                            })
                            .collect();
                        (
                            vec![logprob],
                            vec![TokenLogprob { token: text.clone().into_bytes(), logprob, token_id: i, top }],
                        )
                    }
                    false => (Vec::new(), Vec::new()),
                };
                let token = TokenChunk { text, token_ids: vec![i], logprobs, token_logprobs };
                let msg = GenerateResponse { event: Some(generate_response::Event::Token(token)) };
                if tx.send(Ok(msg)).await.is_err() {
                    return;
                }
            }
            guard.finished = true;
            let reason = if n == r.max_tokens { FinishReason::MaxTokens } else { FinishReason::EndTurn };
            let finished = Finished {
                reason: reason as i32,
                stop_sequence: String::new(),
                usage: Some(Usage { input_tokens: input, output_tokens: n, cached_prompt_tokens: 0 }),
            };
            let _ = tx.send(Ok(GenerateResponse { event: Some(generate_response::Event::Finished(finished)) })).await;
            drop(guard);
        });
        Ok(Response::new(stream))
    }

    async fn embed(&self, request: Request<EmbedRequest>) -> Result<Response<EmbedResponse>, Status> {
        self.counters.embeds.fetch_add(1, Ordering::Relaxed);
        let texts = request.into_inner().texts;
        let width = self.config.embedding_dimensions.max(2) as usize;
        let vector = |t: &String| {
            let mut values = vec![0.0; width];
            values[..2].copy_from_slice(&[t.len() as f32, 1.0]);
            Embedding { values }
        };
        let embeddings = texts.iter().map(vector).collect();
        let tokens = texts.iter().map(|t| (t.len() as u32).div_ceil(4)).sum();
        Ok(Response::new(EmbedResponse { embeddings, input_tokens: tokens }))
    }

    async fn count_tokens(
        &self,
        request: Request<CountTokensRequest>,
    ) -> Result<Response<CountTokensResponse>, Status> {
        self.counters.count_tokens.fetch_add(1, Ordering::Relaxed);
        let r = request.into_inner();
        let g = GenerateRequest { messages: r.messages, prompt: r.prompt, ..Default::default() };
        Ok(Response::new(CountTokensResponse { input_tokens: prompt_tokens(&g) }))
    }

    async fn info(&self, _request: Request<InfoRequest>) -> Result<Response<InfoResponse>, Status> {
        Ok(Response::new(InfoResponse {
            model_id: "stand-in".into(),
            modality: "TEXT".into(),
            context_length: self.config.context_length,
            embedding_dimensions: self.config.embedding_dimensions,
            ..Default::default()
        }))
    }

    async fn health(&self, _request: Request<HealthRequest>) -> Result<Response<Self::HealthStream>, Status> {
        let counters = self.counters.clone();
        let stream = async_stream(move |tx| async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tick.tick().await;
                let signal = HealthSignal {
                    state: LoadState::Healthy as i32,
                    running_sequences: counters.active.load(Ordering::Relaxed),
                    free_kv_blocks: 1000,
                    total_kv_blocks: 1000,
                    ..Default::default()
                };
                if tx.send(Ok(signal)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(stream))
    }
}

/// A stream fed by a task through a small channel; the task's sends fail once the stream is
/// dropped.
fn async_stream<T, F, Fut>(body: F) -> BoxStream<T>
where
    T: Send + 'static,
    F: FnOnce(tokio::sync::mpsc::Sender<Result<T, Status>>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(body(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

/// A running stand-in.
pub struct RunningStandIn {
    pub addr: SocketAddr,
    pub counters: Arc<Counters>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RunningStandIn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RunningStandIn {
    /// `http://addr`, as a runner address.
    pub fn address(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// Starts a stand-in on a free loopback port.
pub async fn stand_in(config: StandInConfig) -> RunningStandIn {
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    stand_in_at(config, any).await.expect("a loopback port for the stand-in")
}

/// Starts a stand-in on `listen`.
pub async fn stand_in_at(config: StandInConfig, listen: SocketAddr) -> std::io::Result<RunningStandIn> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let counters = Arc::new(Counters::default());
    let require = RequireToken(config.token.clone());
    let service = StandIn { config, counters: counters.clone() };
    let task = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(RunnerServer::with_interceptor(service, require))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)))
            .await;
    });
    Ok(RunningStandIn { addr, counters, task })
}

/// The same stand-in behind a minimal OpenAI-compatible HTTP endpoint
/// (`POST /v1/chat/completions`, non-streaming), so another proxy (LiteLLM in the benchmark)
/// can sit in front of the same backend.
pub async fn openai_stand_in(config: StandInConfig, listen: SocketAddr) -> std::io::Result<SocketAddr> {
    use axum::routing::post;
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let app = axum::Router::new().route(
        "/v1/chat/completions",
        post(move |body: axum::body::Bytes| {
            let config = config.clone();
            async move {
                let request: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                let max = request["max_tokens"].as_u64().unwrap_or(config.tokens as u64) as u32;
                let n = config.tokens.min(max);
                let mut text = String::new();
                for i in 0..n {
                    if !config.interval.is_zero() {
                        tokio::time::sleep(config.interval).await;
                    }
                    text.push_str(&format!(" tok{i}"));
                }
                axum::Json(serde_json::json!({
                    "id": "chatcmpl-standin", "object": "chat.completion", "created": 0,
                    "model": request["model"],
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 4, "completion_tokens": n, "total_tokens": 4 + n},
                }))
            }
        }),
    );
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(addr)
}

/// A TCP forwarder in front of a runner whose connections can be cut at once, as when the
/// runner's process dies or its node goes away mid-request.
pub struct Cuttable {
    pub addr: SocketAddr,
    cut: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Cuttable {
    /// Forwards a loopback port to `target`.
    pub async fn new(target: SocketAddr) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
        let addr = listener.local_addr()?;
        let (cut, cut_rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let mut cut_rx = cut_rx.clone();
                if *cut_rx.borrow() {
                    continue;
                }
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else { return };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut_rx.wait_for(|cut| *cut) => {}
                    }
                });
            }
        });
        Ok(Cuttable { addr, cut, task })
    }

    /// `http://addr`, as a runner address.
    pub fn address(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Drops every connection and refuses new ones.
    pub fn cut(&self) {
        let _ = self.cut.send(true);
    }
}

impl Drop for Cuttable {
    fn drop(&mut self) {
        self.task.abort();
    }
}
