//! The request path every API shares:
//!
//! ```text
//! resolve model ─► end-of-life check ─► tenant token bucket ─┬► pool queue (lane, priority, DRR) ──┐
//!                                                             └► input guard (concurrently) ───────┴► placement ─► runner
//! runner stream ─► output guard (per delta) ─► dialect adapter ─► client;   on finish: settled once in the ledger (count + metering)
//! ```
//!
//! Failures that the model's fallback chain covers move the request to the next model before
//! anything has been sent to the client.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mantle_admission::{
    LoadState as Load, ModelQueue, OverloadControl, Permit, Priority, QueueConfig, RateLimiter, Rejected,
};
use mantle_crds::{Cell, CellState, FallbackTrigger, Modality};
use mantle_proto::auth::{SendToken, Token};
use mantle_proto::{GenerateResponse, LoadState, generate_response};
use tokio_stream::StreamExt;
use tracing::Instrument;

use crate::adapters::{self, DEFAULT_MAX_TOKENS, StopReason, TextOutput, TextRequest, TokenLogprob, Usage, structured};
use crate::catalog::{Catalog, ModelEntry};
use crate::error::{self, ApiError, SetupError, from_status};
use crate::guard::Guards;
use crate::metering::Meter;
use crate::metrics::Metrics;
use crate::placement::{self, RequestFacts};
use crate::runners::{InFlight, RunnerHandle, Runners};
use crate::server::Platform;
use crate::tenants::Tenant;

mod admission;
pub mod batch_gate;
mod dispatch;
mod generation;
mod ledger;
mod live;

use admission::{QueueKey, capacity_loop, check_input_length};
use dispatch::{RUNNER_ATTEMPTS, StartError};
pub use generation::{Collected, Generation};
pub use ledger::{Account, Ledger, Settled};
pub use live::Live;

/// Bytes of prompt text hashed for prefix affinity (about 128 tokens).
const PREFIX_BYTES: usize = 512;

/// One request's identity and constraints, shared by every stage.
#[derive(Clone, Debug)]
pub struct Ctx {
    pub request_id: String,
    pub tenant: Tenant,
    pub api: &'static str,
    pub priority: Priority,
    /// When the client stops caring (`x-amz-bedrock-deadline-ms`).
    pub deadline: Option<Instant>,
    pub received: Instant,
    /// The caller's own prefix-cache salt (`x-mantle-cache-salt`, OpenAI `cache_salt`), for
    /// isolation within the tenant; empty for none.
    pub cache_salt: String,
    /// Batch work, and its job's tier: admitted at the lowest priority and never against the
    /// tenant's token buckets (a batch job is not throttled by quotas; it takes what capacity
    /// real-time traffic leaves, as its tier allows: [`batch_gate`]).
    pub batch: Option<mantle_crds::BatchTier>,
    /// Whether the request has been counted and metered (see [`Ledger`]).
    pub settled: Settled,
}

impl Ctx {
    /// The runner's prefix-cache namespace for this request: the tenant, then the caller's salt,
    /// so cached prompts are shared only within a tenant (and salt). The tenant's name is
    /// length-prefixed, so no choice of salt can reach into another tenant's namespace.
    pub fn runner_cache_salt(&self) -> String {
        format!("{}:{}:{}", self.tenant.name.len(), self.tenant.name, self.cache_salt)
    }

    fn deadline_unix_ms(&self) -> u64 {
        let Some(deadline) = self.deadline else { return 0 };
        let left = deadline.saturating_duration_since(Instant::now());
        (SystemTime::now() + left).duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
    }
}

/// Router-wide settings of the request path.
#[derive(Clone, Debug)]
pub struct PathConfig {
    pub region: String,
    /// Concurrent requests the router sends one healthy runner.
    pub slots_per_runner: usize,
    /// Cells a tenant is shuffle-sharded over (0: all).
    pub shard_size: usize,
    pub queue: QueueConfig,
    /// The token sent to every runner (the runners' `--auth-token-file`).
    pub runner_token: Option<Token>,
    /// The most time a runner may leave a generation without a message (or a unary call
    /// unanswered) before it counts as lost and the request's slot is freed.
    pub runner_idle_timeout: Duration,
    /// How long a request to a model that scales from zero waits for its first runner to become
    /// ready (the autoscaler starts one on seeing it wait) before `ModelNotReadyException`.
    pub cold_start_hold: Duration,
}

impl Default for PathConfig {
    fn default() -> Self {
        PathConfig {
            region: "us-east-1".into(),
            slots_per_runner: 16,
            shard_size: 2,
            runner_idle_timeout: Duration::from_secs(120),
            cold_start_hold: Duration::from_secs(120),
            runner_token: None,
            // A light tenant beside a heavy one finds a slot free instead of waiting for one, and
            // under overload the accepted requests keep their latency.
            queue: QueueConfig {
                reserve_window: Some(Duration::from_secs(10)),
                overload: Some(OverloadControl::default()),
                ..QueueConfig::default()
            },
        }
    }
}

pub struct Inference {
    live: std::sync::RwLock<Arc<Live>>,
    pub metrics: Metrics,
    /// Where each request is counted and metered, once.
    pub ledger: Ledger,
    /// The guards in force, replaced whole when guardrails change.
    guards: std::sync::RwLock<Arc<Guards>>,
    pub config: PathConfig,
    /// One queue per model and pool (the shared one, and each provisioned tenant's dedicated
    /// one), kept across platform updates (requests may be waiting in it).
    queues: std::sync::Mutex<HashMap<QueueKey, ModelQueue>>,
    /// Batch requests running, by model (the catalog's ids: bounded).
    batch_in_flight: Arc<std::sync::Mutex<HashMap<String, usize>>>,
    limiter: std::sync::Mutex<RateLimiter>,
    next_id: AtomicU64,
    /// Randomness for power-of-two choices.
    rng: std::sync::Mutex<rand::rngs::StdRng>,
}

impl Inference {
    pub fn new(
        platform: Platform,
        metrics: Metrics,
        meter: Meter,
        config: PathConfig,
    ) -> Result<Arc<Self>, SetupError> {
        let live = Live::new(platform, &Runners::new(SendToken(config.runner_token.clone())))?;
        let inference = Arc::new(Inference {
            live: std::sync::RwLock::new(Arc::new(live)),
            ledger: Ledger { metrics: metrics.clone(), meter },
            metrics,
            guards: std::sync::RwLock::new(Arc::new(Guards::default())),
            config,
            queues: std::sync::Mutex::new(HashMap::new()),
            batch_in_flight: Default::default(),
            limiter: std::sync::Mutex::new(RateLimiter::new()),
            next_id: AtomicU64::new(1),
            rng: std::sync::Mutex::new(rand::SeedableRng::seed_from_u64(
                SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
                    ^ std::process::id() as u64,
            )),
        });
        tokio::spawn(capacity_loop(Arc::downgrade(&inference)));
        Ok(inference)
    }

    /// The guards in force now.
    pub fn guards(&self) -> Arc<Guards> {
        self.guards.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Applies `guards` from now on (requests already streaming keep theirs).
    pub fn set_guards(&self, guards: Guards) {
        *self.guards.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(guards);
    }

    /// What is served now.
    pub fn live(&self) -> Arc<Live> {
        self.live.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Serves `platform` from now on: new models and runners are added, removed ones dropped;
    /// known runners keep their connections and in-flight counts.
    pub fn update(&self, platform: Platform) -> Result<(), SetupError> {
        let mut live = self.live.write().unwrap_or_else(|e| e.into_inner());
        let next = Live::new(platform, &live.runners)?;
        tracing::info!(
            models = next.catalog.iter().count(),
            runners = next.runners.iter().map(|(_, r)| r.len()).sum::<usize>(),
            "platform updated"
        );
        *live = Arc::new(next);
        Ok(())
    }

    /// The model a request names: a model id, a foundation-model or inference-profile ARN, or a
    /// provisioned-model ARN (`arn:aws:bedrock:REGION:ACCOUNT:provisioned-model/NAME`, NAME being
    /// the ProvisionedThroughput's), which only its own tenant may call.
    pub fn resolve(&self, tenant: &str, requested: &str) -> Result<ModelEntry, ApiError> {
        let live = self.live();
        let Some(provisioned) = live.provisioned_model(requested)? else {
            return Ok(live.catalog.resolve(requested)?.clone());
        };
        if provisioned.tenant != tenant {
            return Err(ApiError::AccessDenied(format!(
                "The provisioned model throughput {requested:?} belongs to another tenant."
            )));
        }
        Ok(live.catalog.resolve(&provisioned.model_id)?.clone())
    }

    /// Starts a generation; the first event (the runner accepting the prompt) has arrived when
    /// this returns, so errors before it are ordinary error responses.
    pub async fn generate(&self, ctx: &Ctx, model: &ModelEntry, req: &TextRequest) -> Result<Generation, ApiError> {
        if model.modality != Modality::Text {
            return Err(ApiError::validation(format!(
                "{} is an embedding model; it does not generate text.",
                model.model_id
            )));
        }
        // A batch job's records are answered by the model the job names, or wait for it.
        if ctx.batch.is_some() {
            return self.generate_on(ctx, model, model, req).await;
        }
        self.with_fallbacks(model, |m| async move { self.generate_on(ctx, model, &m, req).await }).await
    }

    async fn generate_on(
        &self,
        ctx: &Ctx,
        requested: &ModelEntry,
        model: &ModelEntry,
        req: &TextRequest,
    ) -> Result<Generation, ApiError> {
        check_input_length(model, req)?;
        let prompt = req.prompt_text();
        let output_tokens = req.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS) as u64;
        let admission = self.admit(ctx, model, req.estimated_input_tokens(), output_tokens, &prompt).await?;
        // A runner that is gone before it accepted the prompt costs the client nothing: the
        // request moves to another runner, within the same admission.
        let mut tried: Vec<Arc<RunnerHandle>> = Vec::new();
        let (runner, in_flight, dispatched, stream, first) = loop {
            let runner = self.place_avoiding(ctx, model, &prompt, &tried)?;
            let in_flight = runner.begin();
            let dispatched = Instant::now();
            match self.start_on(ctx, &runner, req).await {
                Ok((stream, first)) => break (runner, in_flight, dispatched, stream, first),
                Err(StartError::Lost) if tried.len() + 1 < RUNNER_ATTEMPTS => {
                    tracing::warn!(request_id = %ctx.request_id, runner = %runner.spec.address, "runner lost before the prompt was accepted; trying another");
                    tried.push(runner);
                }
                Err(StartError::Lost) => return Err(error::runner_lost()),
                Err(StartError::Refused(e)) => return Err(e),
            }
        };
        let (input_tokens, max_tokens, pending) = match first.event {
            Some(generate_response::Event::Started(s)) => (s.input_tokens, s.max_tokens, None),
            // A runner that predates `Started`: keep the event.
            _ => (0, 0, Some(first)),
        };
        Ok(Generation {
            requested: requested.model_id.clone(),
            model: model.clone(),
            input_tokens,
            max_tokens,
            ctx: ctx.clone(),
            stream,
            idle_timeout: self.config.runner_idle_timeout,
            runner: runner.spec.address.clone(),
            pending,
            permit: Some(admission.permit),
            in_flight: Some(in_flight),
            batch: admission.batch,
            queue_wait: admission.queue_wait,
            dispatched,
            first_token: None,
            last_token: None,
            generated: 0,
            text: String::new(),
            done: false,
            ledger: self.ledger.clone(),
            usage: Usage::default(),
            prompt_logprobs: Vec::new(),
        })
    }

    /// Runs a request to the end, with what the router adds around generation: the output guard
    /// and tool-call recognition. A forced tool call or an output schema is enforced by the
    /// runner's constrained decoding; the finished reply is checked once more (see
    /// [`structured`]).
    pub async fn complete(&self, ctx: &Ctx, model: &ModelEntry, req: &TextRequest) -> Result<Completed, ApiError> {
        let validator = req.json_schema.as_ref().map(structured::compile).transpose()?;
        let (Collected { mut output, logprobs, prompt_logprobs }, model_used) = self.collect(ctx, model, req).await?;
        let cut_short = output.stop_reason == StopReason::MaxTokens;
        if !req.tools.is_empty()
            && let Some(call) = adapters::parse_tool_call(&output.text, &req.tools)
        {
            output.tool_call = Some(call);
            output.stop_reason = StopReason::ToolUse;
        } else if structured::forces_tool(req) && !cut_short {
            tracing::warn!(request_id = %ctx.request_id, "a forced tool call did not parse");
            output.stop_reason = StopReason::MalformedModelOutput;
        } else if let Some(validator) = &validator
            && let Err(reason) = structured::check(validator, &output.text)
            && !cut_short
        {
            tracing::warn!(request_id = %ctx.request_id, %reason, "structured output did not validate");
            output.stop_reason = StopReason::MalformedModelOutput;
        }
        Ok(Completed { output, model_used, logprobs, prompt_logprobs })
    }

    /// One generation read to the end. Nothing has reached the client yet, so a runner lost
    /// midway costs a retry, not an error.
    async fn collect(&self, ctx: &Ctx, model: &ModelEntry, req: &TextRequest) -> Result<(Collected, String), ApiError> {
        let mut tries = 0;
        loop {
            tries += 1;
            let generation = self.generate(ctx, model, req).await?;
            let model_used = generation.model.model_id.clone();
            match generation.collect().await {
                Ok(collected) => return Ok((collected, model_used)),
                Err(e @ ApiError::Unavailable { .. }) if tries < RUNNER_ATTEMPTS => {
                    tracing::info!(request_id = %ctx.request_id, error = %e, "generation lost midway; retrying");
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Embeds texts on one of the model's runners. A `dimensions` other than the model's width is
    /// refused before any work is queued (once a runner has said its width; else when the
    /// vectors come back, unbilled).
    pub async fn embed(
        &self,
        ctx: &Ctx,
        model: &ModelEntry,
        texts: Vec<String>,
        dimensions: Option<u32>,
    ) -> Result<(Vec<Vec<f32>>, u32), ApiError> {
        if model.modality != Modality::Embedding {
            return Err(ApiError::validation(format!(
                "{} is a text model; it does not produce embeddings.",
                model.model_id
            )));
        }
        let width = self.live().runners.embedding_dimensions(&model.model_id);
        adapters::native::check_dimensions(&model.model_id, dimensions, width.map(|w| w as usize))?;
        let estimate = texts.iter().map(|t| (t.len() as u64).div_ceil(4)).sum::<u64>().max(1);
        let started = Instant::now();
        let result = self
            .with_fallbacks(model, |m| {
                let texts = texts.clone();
                async move {
                    let admission = self.admit(ctx, &m, estimate, 0, "").await?;
                    let runner = self.place(ctx, &m, "")?;
                    let _in_flight = runner.begin();
                    let mut client = runner.client.clone();
                    let call = client
                        .embed(self.unary(mantle_proto::EmbedRequest { request_id: ctx.request_id.clone(), texts }));
                    let reply = self.bounded(call).await?;
                    admission.permit.complete(reply.input_tokens as u64);
                    Ok((m, reply))
                }
            })
            .await;
        let (used, reply) = result?;
        let vectors: Vec<Vec<f32>> = reply.embeddings.into_iter().map(|e| e.values).collect();
        adapters::native::check_dimensions(&model.model_id, dimensions, vectors.first().map(Vec::len))?;
        self.metrics.tokens.with_label_values(&[used.model_id.as_str(), "input"]).inc_by(reply.input_tokens as u64);
        self.ledger.settle(
            ctx,
            Account {
                requested: &model.model_id,
                used: &used,
                outcome: "ok",
                usage: Usage { input_tokens: reply.input_tokens, ..Usage::default() },
                queue: Duration::ZERO,
                prefill: started.elapsed(),
                decode: Duration::ZERO,
                billable: true,
            },
        );
        Ok((vectors, reply.input_tokens))
    }

    /// Counts a conversation's or prompt's tokens with the model's own tokenizer and template.
    /// It takes no slot (the runner tokenizes outside its batch), so it skips the admission
    /// queue, but it is placed like inference: on the tenant's cells, the less loaded of two
    /// runners, counted in their in-flight load. What a tenant may have counted is bounded
    /// apart from its inference: input that cannot fit the context is refused before a runner
    /// sees it, and the counted tokens come from a bucket of their own at the tenant's rate, so
    /// counting never spends inference quota and cannot keep runners tokenizing without end.
    pub async fn count_tokens(&self, ctx: &Ctx, model: &ModelEntry, req: &TextRequest) -> Result<u32, ApiError> {
        check_input_length(model, req)?;
        if ctx.batch.is_none() {
            self.spend(ctx, model, "CountTokens", &ctx.tenant.limits(1.0, 0), req.estimated_input_tokens())?;
        }
        let runner = self.place(ctx, model, "")?;
        let _in_flight = runner.begin();
        let mut client = runner.client.clone();
        let call = client.count_tokens(self.unary(mantle_proto::CountTokensRequest {
            messages: req.messages.clone(),
            prompt: req.prompt.clone().unwrap_or_default(),
        }));
        let input_tokens = self.bounded(call).await?.input_tokens;
        // Counted like any request; metered at no cost (CountTokens is free, as on Bedrock).
        self.ledger.settle(
            ctx,
            Account {
                requested: &model.model_id,
                used: model,
                outcome: "ok",
                usage: Usage { input_tokens, ..Usage::default() },
                queue: Duration::ZERO,
                prefill: Duration::ZERO,
                decode: Duration::ZERO,
                billable: false,
            },
        );
        Ok(input_tokens)
    }

    /// A span for one request, carrying its id (and sent to the runner as `x-request-id`).
    pub fn span(ctx: &Ctx, model: &str) -> tracing::Span {
        tracing::info_span!("request", request_id = %ctx.request_id, tenant = %ctx.tenant.name, api = ctx.api, model = %model)
    }

    /// Runs `fut` inside the request's span.
    pub async fn in_span<T>(ctx: &Ctx, model: &str, fut: impl Future<Output = T>) -> T {
        fut.instrument(Self::span(ctx, model)).await
    }
}

fn unix_seconds() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// A finished request with the model that answered it.
pub struct Completed {
    pub output: TextOutput,
    pub model_used: String,
    /// Each generated token's log-probability, when the request asked for them.
    pub logprobs: Vec<TokenLogprob>,
    /// Each prompt token's, when the request asked to score its prompt.
    pub prompt_logprobs: Vec<TokenLogprob>,
}

/// What a generation yields.
#[derive(Debug)]
pub enum Piece {
    /// New text, the tokens it took, and their log-probabilities when asked for.
    Text {
        text: String,
        tokens: u32,
        logprobs: Vec<TokenLogprob>,
    },
    Done(TextOutput),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(tenant: &str, salt: &str) -> Ctx {
        Ctx {
            request_id: "r".into(),
            tenant: Tenant::unbounded(tenant),
            api: "Converse",
            priority: Priority::Normal,
            deadline: None,
            received: Instant::now(),
            cache_salt: salt.into(),
            batch: None,
            settled: Settled::default(),
        }
    }

    #[test]
    fn the_runner_cache_salt_keeps_tenants_and_salts_apart() {
        let salt = |tenant, salt| ctx(tenant, salt).runner_cache_salt();
        assert_eq!(salt("acme", ""), salt("acme", ""));
        assert_ne!(salt("acme", ""), salt("globex", ""));
        assert_ne!(salt("acme", ""), salt("acme", "team-1"));
        // No salt lets one tenant name itself into another's namespace.
        assert_ne!(salt("a", "b:c"), salt("a:b", "c"));
        assert_ne!(salt("a", ":b:"), salt("a:", "b:"));
    }
}
