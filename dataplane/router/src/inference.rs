//! The request path every API shares:
//!
//! ```text
//! resolve model ─► end-of-life check ─► tenant token bucket ─┬► model queue (lane, priority, DRR) ─┐
//!                                                             └► input guard (concurrently) ───────┴► placement ─► runner
//! runner stream ─► output guard (per delta) ─► dialect adapter ─► client;   on finish: metrics + metering
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
use crate::error::{self, ApiError, from_status};
use crate::guard::Guards;
use crate::metering::{Meter, MeteringRecord};
use crate::metrics::Metrics;
use crate::placement::{self, RequestFacts};
use crate::runners::{InFlight, RunnerHandle, Runners};
use crate::server::Platform;
use crate::tenants::Tenant;

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
}

impl Default for PathConfig {
    fn default() -> Self {
        PathConfig {
            region: "us-east-1".into(),
            slots_per_runner: 16,
            shard_size: 2,
            runner_idle_timeout: Duration::from_secs(120),
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

/// What the router serves right now; replaced whole when the platform changes (a FoundationModel,
/// a Cell or an EndpointSlice in Kubernetes).
pub struct Live {
    pub catalog: Catalog,
    /// The runners of every Cell that is not Disabled (and those in no known Cell).
    pub runners: Runners,
    /// Provisioned model units by (tenant, model id).
    pub provisioned: HashMap<(String, String), f64>,
    /// Each ProvisionedThroughput by name (what its ARN ends in): its tenant and model id.
    pub provisioned_models: HashMap<String, (String, String)>,
    /// Each known Cell's `shuffleShardSize`: how many of its runners one tenant is spread over.
    pub cell_shards: HashMap<String, usize>,
}

impl Live {
    fn new(platform: Platform, previous: &Runners) -> anyhow::Result<Self> {
        let mut provisioned = HashMap::new();
        for p in &platform.provisioned {
            *provisioned.entry((p.spec.tenant.clone(), p.spec.model_id.clone())).or_insert(0.0) +=
                p.spec.model_units.max(1) as f64;
        }
        let provisioned_models = platform
            .provisioned
            .iter()
            .filter_map(|p| Some((p.metadata.name.clone()?, (p.spec.tenant.clone(), p.spec.model_id.clone()))))
            .collect();
        let disabled: Vec<&str> =
            platform.cells.iter().filter(|c| c.spec.state == CellState::Disabled).map(cell_name).collect();
        let (runners, off): (Vec<_>, Vec<_>) =
            platform.runners.into_iter().partition(|r| r.cell.as_deref().is_none_or(|c| !disabled.contains(&c)));
        if !off.is_empty() {
            tracing::info!(cells = ?disabled, runners = off.len(), "runners in Disabled Cells get no traffic");
        }
        Ok(Live {
            catalog: Catalog::from_resources(&platform.models),
            runners: previous.update(runners)?,
            provisioned,
            provisioned_models,
            cell_shards: platform
                .cells
                .iter()
                .map(|c| (cell_name(c).to_string(), c.spec.shuffle_shard_size.max(0) as usize))
                .collect(),
        })
    }
}

fn cell_name(cell: &Cell) -> &str {
    cell.metadata.name.as_deref().unwrap_or_default()
}

pub struct Inference {
    live: std::sync::RwLock<Arc<Live>>,
    pub metrics: Metrics,
    pub meter: Meter,
    /// The guards in force, replaced whole when guardrails change.
    guards: std::sync::RwLock<Arc<Guards>>,
    pub config: PathConfig,
    /// One queue per model id, kept across platform updates (requests may be waiting in it).
    queues: std::sync::Mutex<HashMap<String, ModelQueue>>,
    limiter: std::sync::Mutex<RateLimiter>,
    next_id: AtomicU64,
    /// Randomness for power-of-two choices.
    rng: std::sync::Mutex<rand::rngs::StdRng>,
}

fn load_of(state: LoadState) -> Load {
    match state {
        LoadState::Healthy => Load::Healthy,
        LoadState::Degraded => Load::Degraded,
        LoadState::Throttle => Load::Throttle,
        LoadState::Critical | LoadState::Unspecified => Load::Critical,
    }
}

fn proto_priority(p: Priority) -> mantle_proto::Priority {
    match p {
        Priority::Critical => mantle_proto::Priority::Critical,
        Priority::High => mantle_proto::Priority::High,
        Priority::Normal => mantle_proto::Priority::Normal,
        Priority::Low => mantle_proto::Priority::Low,
    }
}

impl Inference {
    pub fn new(platform: Platform, metrics: Metrics, meter: Meter, config: PathConfig) -> anyhow::Result<Arc<Self>> {
        let live = Live::new(platform, &Runners::new(SendToken(config.runner_token.clone())))?;
        let inference = Arc::new(Inference {
            live: std::sync::RwLock::new(Arc::new(live)),
            metrics,
            meter,
            guards: std::sync::RwLock::new(Arc::new(Guards::default())),
            config,
            queues: std::sync::Mutex::new(HashMap::new()),
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
    pub fn update(&self, platform: Platform) -> anyhow::Result<()> {
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

    /// The `x-mantle-capacity` header sent with 429 and 503 answers: how full the model is, so a
    /// client (or a load balancer) can back off or go elsewhere.
    pub fn capacity_header(&self, requested: &str) -> Option<String> {
        let model = self.live().catalog.resolve(requested).ok()?.model_id.clone();
        let queue = self.queues.lock().unwrap_or_else(|e| e.into_inner()).get(&model)?.clone();
        let s = queue.snapshot();
        Some(format!("slots={}; in-flight={}; queued={}", s.capacity, s.in_flight, s.queued))
    }

    /// The model a request names: a model id, a foundation-model or inference-profile ARN, or a
    /// provisioned-model ARN (`arn:aws:bedrock:REGION:ACCOUNT:provisioned-model/NAME`, NAME being
    /// the ProvisionedThroughput's), which only its own tenant may call.
    pub fn resolve(&self, tenant: &str, requested: &str) -> Result<ModelEntry, ApiError> {
        let live = self.live();
        let Some(name) =
            requested.strip_prefix("arn:").and_then(|arn| arn.split_once(":provisioned-model/")).map(|(_, n)| n)
        else {
            return Ok(live.catalog.resolve(requested)?.clone());
        };
        let Some((owner, model_id)) = live.provisioned_models.get(name) else {
            return Err(ApiError::NotFound(format!("No provisioned model throughput is named {name:?}.")));
        };
        if owner != tenant {
            return Err(ApiError::AccessDenied(format!(
                "The provisioned model throughput {name:?} belongs to another tenant."
            )));
        }
        Ok(live.catalog.resolve(model_id)?.clone())
    }

    /// Whether admission counts slots for the model now (its runners are known to the queue).
    pub fn admits(&self, model_id: &str) -> bool {
        let queue = self.queues.lock().unwrap_or_else(|e| e.into_inner()).get(model_id).cloned();
        queue.is_some_and(|q| q.snapshot().capacity > 0)
    }

    /// The model's queue, created on first use.
    fn queue(&self, model_id: &str) -> ModelQueue {
        let mut queues = self.queues.lock().unwrap_or_else(|e| e.into_inner());
        queues.entry(model_id.to_string()).or_insert_with(|| ModelQueue::new(self.config.queue.clone())).clone()
    }

    /// The model's load as admission sees it: the best state among its ready runners.
    fn model_load(&self, model_id: &str) -> Load {
        self.live()
            .runners
            .for_model(model_id)
            .iter()
            .filter_map(|r| {
                let (state, ready) = r.state();
                ready.then(|| load_of(state))
            })
            .min()
            .unwrap_or(Load::Critical)
    }

    /// Updates each model queue's capacity from its runners' readiness and health.
    fn refresh_capacity(&self) {
        let live = self.live();
        for model in live.catalog.iter() {
            self.queue(&model.model_id);
        }
        let queues: Vec<(String, ModelQueue)> =
            self.queues.lock().unwrap_or_else(|e| e.into_inner()).iter().map(|(k, q)| (k.clone(), q.clone())).collect();
        for (model_id, queue) in &queues {
            let mut slots = 0;
            let mut ready = 0;
            for r in live.runners.for_model(model_id) {
                let (state, is_ready) = r.state();
                if is_ready {
                    ready += 1;
                    slots += match state {
                        LoadState::Throttle => self.config.slots_per_runner.div_ceil(2),
                        _ => self.config.slots_per_runner,
                    };
                }
            }
            queue.set_capacity(slots);
            self.metrics.runners_ready.with_label_values(&[model_id.as_str()]).set(ready);
            for lane in queue.snapshot().lanes {
                self.metrics
                    .queue_depth
                    .with_label_values(&[model_id.as_str(), lane.lane.name()])
                    .set(lane.queued as i64);
                self.metrics
                    .queue_overloaded
                    .with_label_values(&[model_id.as_str(), lane.lane.name()])
                    .set(i64::from(lane.overloaded));
            }
        }
    }

    /// Forgets the token buckets that have refilled (a new one starts full, so nothing is lost):
    /// callers named by client strings (access key ids with authentication off) do not add up.
    pub fn prune_buckets(&self, now: Instant) -> usize {
        let mut limiter = self.limiter.lock().unwrap_or_else(|e| e.into_inner());
        let pruned = limiter.prune(now);
        self.metrics.rate_limit_buckets.set(limiter.len() as i64);
        pruned
    }

    /// Token buckets held now.
    pub fn rate_limit_buckets(&self) -> usize {
        self.limiter.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    fn reject(&self, model: &ModelEntry, reason: &str) {
        self.metrics.rejected.with_label_values(&[model.model_id.as_str(), reason]).inc();
    }

    /// Rate limit, queue and input guard: a permit to send one request to one of the model's
    /// runners.
    async fn admit(
        &self,
        ctx: &Ctx,
        model: &ModelEntry,
        input_tokens: u64,
        output_tokens: u64,
        prompt: &str,
    ) -> Result<Admission, ApiError> {
        model.check_serving(SystemTime::now())?;
        let queue = self.queue(&model.model_id);
        // Provisioned model units weigh in fair queuing and reserve their rate: units × the
        // model's tokens per unit, on top of the tenant's on-demand limits.
        let units = self.live().provisioned.get(&(ctx.tenant.name.clone(), model.model_id.clone())).copied();
        let weight = units.unwrap_or(1.0);
        let reserved = units.map_or(0, |u| (u * model.tokens_per_minute_per_unit.unwrap_or(0) as f64) as u64);
        let limits = ctx.tenant.limits(weight, reserved);
        let load = self.model_load(&model.model_id);
        // Buckets count input plus the output a request is expected to generate, one bucket per
        // tenant and model.
        let tokens = input_tokens + self.config.queue.expected_output_tokens(output_tokens);
        let bucket = format!("{}\u{1f}{}", ctx.tenant.name, model.model_id);
        let limited = self.limiter.lock().unwrap_or_else(|e| e.into_inner()).check(
            &bucket,
            &limits,
            tokens,
            load,
            Instant::now(),
        );
        if let Err(throttled) = limited {
            self.reject(model, "rate_limit");
            return Err(ApiError::Throttling {
                message: format!(
                    "Too many tokens: tenant {} is over its limit of {} tokens a minute on {}. Retry after {:.1}s.",
                    ctx.tenant.name,
                    limits.tokens_per_minute + limits.reserved_tokens_per_minute,
                    model.model_id,
                    throttled.retry_after.as_secs_f64()
                ),
                retry_after: throttled.retry_after,
            });
        }
        let request = mantle_admission::Request {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            tenant: ctx.tenant.name.clone(),
            priority: ctx.priority,
            input_tokens,
            max_output_tokens: output_tokens,
            deadline: ctx.deadline,
            weight,
        };
        let queued = Instant::now();
        let guards = self.guards();
        let (permit, guard) = tokio::join!(queue.acquire(request), guards.check_input(ctx, prompt));
        let permit = permit.map_err(|rejected| {
            let (reason, error) = self.rejection(model, rejected);
            self.reject(model, reason);
            error
        })?;
        guard?;
        let wait = queued.elapsed();
        self.metrics
            .queue_wait
            .with_label_values(&[model.model_id.as_str(), permit.lane().name()])
            .observe(wait.as_secs_f64());
        Ok(Admission { permit, queue_wait: wait })
    }

    fn rejection(&self, model: &ModelEntry, rejected: Rejected) -> (&'static str, ApiError) {
        let id = &model.model_id;
        match rejected {
            Rejected::Throttled { retry_after } => (
                "queue_full",
                ApiError::Throttling {
                    message: format!(
                        "{id} is at capacity and its queue is full. Retry after {:.1}s.",
                        retry_after.as_secs_f64()
                    ),
                    retry_after,
                },
            ),
            Rejected::Unavailable { retry_after } => (
                "unavailable",
                ApiError::Unavailable { message: format!("{id} has no ready runner right now."), retry_after },
            ),
            Rejected::DeadlineUnmeetable { estimated_wait } => (
                "deadline",
                ApiError::ModelTimeout {
                    message: format!(
                        "The request's deadline cannot be met: the estimated queue wait for {id} is {:.0} ms.",
                        estimated_wait.as_secs_f64() * 1000.0
                    ),
                },
            ),
            Rejected::DeadlineExpired => (
                "deadline",
                ApiError::ModelTimeout { message: format!("The request's deadline passed while it waited for {id}.") },
            ),
        }
    }

    /// Sends a generation to a runner and waits for its first event (the prompt accepted).
    async fn start_on(
        &self,
        ctx: &Ctx,
        runner: &RunnerHandle,
        req: &TextRequest,
    ) -> Result<(tonic::Streaming<GenerateResponse>, GenerateResponse), StartError> {
        let request = mantle_proto::GenerateRequest {
            request_id: ctx.request_id.clone(),
            messages: req.messages.clone(),
            prompt: req.prompt.clone().unwrap_or_default(),
            max_tokens: req.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS),
            clamp_max_tokens: req.max_tokens.is_none(),
            temperature: req.temperature,
            top_p: req.top_p,
            top_k: req.top_k,
            seed: req.seed,
            stop_sequences: req.stop_sequences.clone(),
            priority: proto_priority(ctx.priority) as i32,
            deadline_unix_ms: ctx.deadline_unix_ms(),
            logprobs: req.logprobs,
            cache_salt: ctx.runner_cache_salt(),
        };
        let mut client = runner.client.clone();
        let mut grpc = tonic::Request::new(request);
        if let Ok(id) = ctx.request_id.parse() {
            grpc.metadata_mut().insert("x-request-id", id);
        }
        let started = async {
            let mut stream = client.generate(grpc).await.map_err(StartError::from)?.into_inner();
            match stream.next().await {
                Some(Ok(first)) => Ok((stream, first)),
                Some(Err(status)) => Err(StartError::from(status)),
                None => Err(StartError::Lost),
            }
        };
        tokio::time::timeout(self.config.runner_idle_timeout, started).await.unwrap_or(Err(StartError::Lost))
    }

    /// Picks a runner for the request.
    fn place(&self, ctx: &Ctx, model: &ModelEntry, prompt: &str) -> Result<Arc<RunnerHandle>, ApiError> {
        self.place_avoiding(ctx, model, prompt, &[])
    }

    /// Picks a runner for the request other than those in `avoid` (runners that just failed it).
    fn place_avoiding(
        &self,
        ctx: &Ctx,
        model: &ModelEntry,
        prompt: &str,
        avoid: &[Arc<RunnerHandle>],
    ) -> Result<Arc<RunnerHandle>, ApiError> {
        let live = self.live();
        let mut runners = live.runners.for_model(&model.model_id).to_vec();
        runners.retain(|r| !avoid.iter().any(|a| Arc::ptr_eq(a, r)));
        let views: Vec<_> = runners
            .iter()
            .map(|r| {
                let mut view = r.view();
                view.cell_shard = view.cell.and_then(|c| live.cell_shards.get(c)).copied().unwrap_or(0);
                view
            })
            .collect();
        let facts = RequestFacts {
            tenant: &ctx.tenant.name,
            prefix: placement::prefix_key(prompt, PREFIX_BYTES),
            shard_size: self.config.shard_size,
        };
        let chosen = placement::choose(&views, &facts, &mut *self.rng.lock().unwrap_or_else(|e| e.into_inner()));
        chosen.map(|i| runners[i].clone()).ok_or_else(|| ApiError::Unavailable {
            message: format!("{} has no ready runner right now.", model.model_id),
            retry_after: Duration::from_secs(1),
        })
    }

    /// The model and its fallbacks, in order, each with the failures that lead to it.
    fn chain(&self, model: &ModelEntry) -> Vec<(ModelEntry, Option<FallbackTrigger>)> {
        let live = self.live();
        let mut chain = vec![(model.clone(), None)];
        for (id, on) in &model.fallbacks {
            if let Some(m) = live.catalog.get(id).filter(|m| m.modality == model.modality) {
                chain.push((m.clone(), Some(*on)));
            }
        }
        chain
    }

    /// Runs `attempt` on the model, then down its fallback chain while the failure matches.
    async fn with_fallbacks<T, F, Fut>(&self, model: &ModelEntry, mut attempt: F) -> Result<T, ApiError>
    where
        F: FnMut(ModelEntry) -> Fut,
        Fut: Future<Output = Result<T, ApiError>>,
    {
        let chain = self.chain(model);
        let mut last = None;
        for (i, (m, trigger)) in chain.into_iter().enumerate() {
            if let (Some(trigger), Some(error)) = (trigger, &last)
                && !matches_trigger(trigger, error)
            {
                break;
            }
            let name = m.model_id.clone();
            match attempt(m).await {
                Ok(value) => {
                    if i > 0 {
                        self.metrics.fallbacks.with_label_values(&[model.model_id.as_str(), name.as_str()]).inc();
                        tracing::info!(model = %model.model_id, fallback = %name, "served by a fallback model");
                    }
                    return Ok(value);
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| ApiError::Internal("empty fallback chain".into())))
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
            queue_wait: admission.queue_wait,
            dispatched,
            first_token: None,
            last_token: None,
            generated: 0,
            text: String::new(),
            done: false,
            metrics: self.metrics.clone(),
            meter: self.meter.clone(),
        })
    }

    /// Runs a request to the end, with what the router adds around generation: the output guard,
    /// tool-call recognition and structured-output validation with retries.
    pub async fn complete(&self, ctx: &Ctx, model: &ModelEntry, req: &TextRequest) -> Result<Completed, ApiError> {
        let validator = req.json_schema.as_ref().map(structured::compile).transpose()?;
        let mut req = req.clone();
        let mut usage = Usage::default();
        let attempts = if validator.is_some() { structured::ATTEMPTS } else { 1 };
        for attempt in 1..=attempts {
            let (mut output, logprobs, model_used) = self.collect(ctx, model, &req).await?;
            usage.input_tokens += output.usage.input_tokens;
            usage.output_tokens += output.usage.output_tokens;
            usage.cached_tokens += output.usage.cached_tokens;
            output.usage = usage;
            if !req.tools.is_empty()
                && let Some(call) = adapters::parse_tool_call(&output.text, &req.tools)
            {
                output.tool_call = Some(call);
                output.stop_reason = StopReason::ToolUse;
            }
            let Some(validator) = &validator else { return Ok(Completed { output, model_used, logprobs }) };
            match structured::check(validator, &output.text) {
                Ok(value) => {
                    output.text = value.to_string();
                    return Ok(Completed { output, model_used, logprobs });
                }
                Err(reason) if attempt < attempts => {
                    tracing::debug!(attempt, %reason, "structured output did not validate; retrying");
                    req.messages.push(mantle_proto::ChatMessage { role: "assistant".into(), content: output.text });
                    req.messages.push(mantle_proto::ChatMessage {
                        role: "user".into(),
                        content: structured::retry_prompt(&reason),
                    });
                    req.seed = req.seed.wrapping_add(1);
                }
                Err(reason) => {
                    tracing::info!(%reason, "structured output never validated");
                    output.stop_reason = StopReason::MalformedModelOutput;
                    return Ok(Completed { output, model_used, logprobs });
                }
            }
        }
        Err(ApiError::Internal("no generation attempt ran".into()))
    }

    /// One generation read to the end. Nothing has reached the client yet, so a runner lost
    /// midway costs a retry, not an error.
    async fn collect(
        &self,
        ctx: &Ctx,
        model: &ModelEntry,
        req: &TextRequest,
    ) -> Result<(TextOutput, Vec<TokenLogprob>, String), ApiError> {
        let mut tries = 0;
        loop {
            tries += 1;
            let generation = self.generate(ctx, model, req).await?;
            let model_used = generation.model.model_id.clone();
            match generation.collect().await {
                Ok((output, logprobs)) => return Ok((output, logprobs, model_used)),
                Err(e @ ApiError::Unavailable { .. }) if tries < RUNNER_ATTEMPTS => {
                    tracing::info!(request_id = %ctx.request_id, error = %e, "generation lost midway; retrying");
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Embeds texts on one of the model's runners.
    pub async fn embed(
        &self,
        ctx: &Ctx,
        model: &ModelEntry,
        texts: Vec<String>,
    ) -> Result<(Vec<Vec<f32>>, u32), ApiError> {
        if model.modality != Modality::Embedding {
            return Err(ApiError::validation(format!(
                "{} is a text model; it does not produce embeddings.",
                model.model_id
            )));
        }
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
        let total = started.elapsed();
        self.metrics.tokens.with_label_values(&[used.model_id.as_str(), "input"]).inc_by(reply.input_tokens as u64);
        self.count_outcome(ctx, model, "ok");
        self.meter.record(MeteringRecord {
            request_id: ctx.request_id.clone(),
            timestamp: unix_seconds(),
            tenant: ctx.tenant.name.clone(),
            api: ctx.api,
            model: model.model_id.clone(),
            model_used: used.model_id.clone(),
            input_tokens: reply.input_tokens,
            output_tokens: 0,
            cached_tokens: 0,
            queue_ms: 0.0,
            prefill_ms: total.as_secs_f64() * 1000.0,
            decode_ms: 0.0,
            total_ms: ctx.received.elapsed().as_secs_f64() * 1000.0,
            cost: used.cost(reply.input_tokens, 0),
            outcome: "ok".into(),
        });
        Ok((vectors, reply.input_tokens))
    }

    /// Counts a conversation's or prompt's tokens with the model's own tokenizer and template.
    /// It takes no slot (the runner tokenizes outside its batch), so it skips the admission
    /// queue, but it is placed like inference: on the tenant's cells, the less loaded of two
    /// runners, counted in their in-flight load.
    pub async fn count_tokens(&self, ctx: &Ctx, model: &ModelEntry, req: &TextRequest) -> Result<u32, ApiError> {
        let runner = self.place(ctx, model, "")?;
        let _in_flight = runner.begin();
        let mut client = runner.client.clone();
        let call = client.count_tokens(self.unary(mantle_proto::CountTokensRequest {
            messages: req.messages.clone(),
            prompt: req.prompt.clone().unwrap_or_default(),
        }));
        Ok(self.bounded(call).await?.input_tokens)
    }

    /// A unary runner request that tells the runner how long the router waits.
    fn unary<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(self.config.runner_idle_timeout);
        request
    }

    /// Awaits a unary runner call for at most the idle timeout: a hung runner must not hold the
    /// request, or its slot, forever.
    async fn bounded<T>(
        &self,
        call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, ApiError> {
        match tokio::time::timeout(self.config.runner_idle_timeout, call).await {
            Ok(Ok(reply)) => Ok(reply.into_inner()),
            Ok(Err(status)) => Err(from_status(&status)),
            Err(_) => Err(error::runner_lost()),
        }
    }

    pub fn count_outcome(&self, ctx: &Ctx, model: &ModelEntry, outcome: &str) {
        self.metrics.requests.with_label_values(&[ctx.api, model.model_id.as_str(), outcome]).inc();
        self.metrics
            .request_duration
            .with_label_values(&[ctx.api, model.model_id.as_str()])
            .observe(ctx.received.elapsed().as_secs_f64());
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

/// More bytes a token than any real text has: a prompt longer than this many bytes for each
/// token of the context cannot fit, whatever the tokenizer.
const MAX_BYTES_PER_TOKEN: u64 = 32;

/// Refuses, before it is queued or sent, a prompt that cannot fit the model's context: a runner
/// would spend seconds tokenizing megabytes only to refuse it. Prompts that might fit are counted
/// exactly by the runner, which refuses them with both counts.
fn check_input_length(model: &ModelEntry, req: &TextRequest) -> Result<(), ApiError> {
    let context = model.context_length as u64;
    let bytes: u64 = match &req.prompt {
        Some(p) => p.len() as u64,
        None => req.messages.iter().map(|m| m.content.len() as u64).sum(),
    };
    if context == 0 || bytes <= context * MAX_BYTES_PER_TOKEN {
        return Ok(());
    }
    Err(ApiError::validation(format!(
        "The input is too long for {}: it is {bytes} bytes, about {} tokens, and the model's context is {context} \
         tokens. Shorten the input.",
        model.model_id,
        req.estimated_input_tokens()
    )))
}

fn matches_trigger(trigger: FallbackTrigger, error: &ApiError) -> bool {
    match trigger {
        FallbackTrigger::Throttled => matches!(error, ApiError::Throttling { .. }),
        FallbackTrigger::Unavailable => {
            matches!(error, ApiError::Unavailable { .. } | ApiError::ModelNotReady(_) | ApiError::ModelError { .. })
        }
        FallbackTrigger::AnyError => !matches!(
            error,
            ApiError::Validation(_)
                | ApiError::AccessDenied(_)
                | ApiError::NotFound(_)
                | ApiError::PayloadTooLarge(_)
                | ApiError::UnsupportedMediaType(_)
        ),
    }
}

fn unix_seconds() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

async fn capacity_loop(inference: std::sync::Weak<Inference>) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut last_prune = Instant::now();
    loop {
        tick.tick().await;
        let Some(inference) = inference.upgrade() else { return };
        inference.refresh_capacity();
        if last_prune.elapsed() >= PRUNE_INTERVAL {
            last_prune = Instant::now();
            inference.prune_buckets(last_prune);
        }
    }
}

/// How often full token buckets are forgotten.
const PRUNE_INTERVAL: Duration = Duration::from_secs(1);

struct Admission {
    permit: Permit,
    queue_wait: Duration,
}

/// How many runners a generation tries before its prompt is accepted.
const RUNNER_ATTEMPTS: usize = 2;

/// Why a generation did not start on a runner.
enum StartError {
    /// The runner is gone (connection broken, stream cut, silent): another may serve it.
    Lost,
    /// The runner answered with an error of its own.
    Refused(ApiError),
}

impl From<tonic::Status> for StartError {
    fn from(status: tonic::Status) -> Self {
        if std::error::Error::source(&status).is_some() {
            tracing::debug!(error = %status, "runner transport failure");
            StartError::Lost
        } else {
            StartError::Refused(from_status(&status))
        }
    }
}

/// A finished request with the model that answered it.
pub struct Completed {
    pub output: TextOutput,
    pub model_used: String,
    /// Each generated token's log-probability, when the request asked for them.
    pub logprobs: Vec<TokenLogprob>,
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

/// A running generation on one runner. Dropping it cancels the runner's stream (the runner frees
/// the sequence's KV blocks) and records the request as cancelled.
pub struct Generation {
    pub requested: String,
    pub model: ModelEntry,
    /// Prompt tokens, and the output tokens the runner allows.
    pub input_tokens: u32,
    pub max_tokens: u32,
    ctx: Ctx,
    stream: tonic::Streaming<GenerateResponse>,
    /// The most time between two messages of the runner's stream.
    idle_timeout: Duration,
    /// The runner's address, for logs.
    runner: String,
    pending: Option<GenerateResponse>,
    permit: Option<Permit>,
    in_flight: Option<InFlight>,
    queue_wait: Duration,
    dispatched: Instant,
    first_token: Option<Instant>,
    last_token: Option<Instant>,
    generated: u32,
    text: String,
    done: bool,
    metrics: Metrics,
    meter: Meter,
}

impl Generation {
    /// The next piece: text, then exactly one `Done`, then `None`.
    pub async fn next(&mut self) -> Result<Option<Piece>, ApiError> {
        loop {
            if self.done {
                return Ok(None);
            }
            let message = match self.pending.take() {
                Some(m) => m,
                None => match tokio::time::timeout(self.idle_timeout, self.stream.next()).await {
                    Ok(Some(Ok(m))) => m,
                    Ok(Some(Err(status))) => {
                        let error = from_status(&status);
                        self.finish(&Usage::default(), error.kind());
                        return Err(error);
                    }
                    // The stream ended without its Finished message, or went silent: the runner
                    // died or hung. Its slot is given back either way.
                    Ok(None) | Err(_) => {
                        tracing::warn!(
                            request_id = %self.ctx.request_id,
                            runner = %self.runner,
                            "the runner's stream broke off or went silent"
                        );
                        let error = error::runner_lost();
                        self.finish(&Usage::default(), error.kind());
                        return Err(error);
                    }
                },
            };
            match message.event {
                Some(generate_response::Event::Token(t)) => {
                    let now = Instant::now();
                    let model = self.model.model_id.as_str();
                    match self.last_token {
                        Some(last) => self
                            .metrics
                            .inter_token_latency
                            .with_label_values(&[model])
                            .observe((now - last).as_secs_f64()),
                        None => {
                            self.first_token = Some(now);
                            self.metrics
                                .time_to_first_token
                                .with_label_values(&[model])
                                .observe((now - self.ctx.received).as_secs_f64());
                        }
                    }
                    self.last_token = Some(now);
                    let tokens = t.token_ids.len().max(1) as u32;
                    self.generated += tokens;
                    self.text.push_str(&t.text);
                    let logprobs: Vec<TokenLogprob> = t
                        .token_logprobs
                        .into_iter()
                        .map(|l| TokenLogprob { bytes: l.token, logprob: l.logprob })
                        .collect();
                    return Ok(Some(Piece::Text { text: t.text, tokens, logprobs }));
                }
                Some(generate_response::Event::Finished(f)) => {
                    let usage = f.usage.unwrap_or_default();
                    let usage = Usage {
                        input_tokens: usage.input_tokens,
                        output_tokens: usage.output_tokens,
                        cached_tokens: usage.cached_prompt_tokens,
                    };
                    let stop_reason = match f.reason() {
                        mantle_proto::FinishReason::MaxTokens => StopReason::MaxTokens,
                        mantle_proto::FinishReason::StopSequence => StopReason::StopSequence,
                        _ => StopReason::EndTurn,
                    };
                    let output = TextOutput {
                        text: std::mem::take(&mut self.text),
                        tool_call: None,
                        stop_reason,
                        stop_sequence: (!f.stop_sequence.is_empty()).then_some(f.stop_sequence),
                        usage,
                    };
                    self.finish(&usage, stop_reason.converse());
                    return Ok(Some(Piece::Done(output)));
                }
                Some(generate_response::Event::Started(_)) | None => continue,
            }
        }
    }

    /// Reads to the end.
    /// The whole reply and the log-probabilities of its tokens (empty unless asked for).
    pub async fn collect(mut self) -> Result<(TextOutput, Vec<TokenLogprob>), ApiError> {
        let mut logprobs = Vec::new();
        while let Some(piece) = self.next().await? {
            match piece {
                Piece::Text { logprobs: more, .. } => logprobs.extend(more),
                Piece::Done(output) => return Ok((output, logprobs)),
            }
        }
        Err(ApiError::Internal("the generation ended twice".into()))
    }

    /// Counts an error the stream reports after its response has started (errors before it are
    /// counted where they are answered).
    pub fn count_stream_error(&self, error: &ApiError) {
        self.metrics.requests.with_label_values(&[self.ctx.api, &self.requested, error.kind()]).inc();
    }

    /// Time from the request's arrival to its first token, in milliseconds.
    pub fn first_byte_ms(&self) -> u64 {
        self.first_token.map_or(0, |t| (t - self.ctx.received).as_millis() as u64)
    }

    fn finish(&mut self, usage: &Usage, outcome: &str) {
        if self.done {
            return;
        }
        self.done = true;
        let now = Instant::now();
        let model = self.model.model_id.as_str();
        let output_tokens = if usage.output_tokens > 0 { usage.output_tokens } else { self.generated };
        let input_tokens = if usage.input_tokens > 0 { usage.input_tokens } else { self.input_tokens };
        if let Some(permit) = self.permit.take() {
            permit.complete((input_tokens + output_tokens) as u64);
        }
        self.in_flight.take();
        let prefill = self.first_token.unwrap_or(now) - self.dispatched;
        let decode = self.first_token.map_or(Duration::ZERO, |t| now - t);
        if output_tokens > 1 && decode > Duration::ZERO {
            self.metrics
                .tokens_per_second
                .with_label_values(&[model])
                .observe((output_tokens - 1) as f64 / decode.as_secs_f64());
        }
        self.metrics.tokens.with_label_values(&[model, "input"]).inc_by(input_tokens as u64);
        self.metrics.tokens.with_label_values(&[model, "output"]).inc_by(output_tokens as u64);
        self.metrics.tokens.with_label_values(&[model, "cached"]).inc_by(usage.cached_tokens as u64);
        self.metrics.finish_reasons.with_label_values(&[model, outcome]).inc();
        // Errors are counted where they are answered (the handler, or the stream's exception).
        let requested = self.requested.as_str();
        let result = match outcome {
            "end_turn" | "max_tokens" | "stop_sequence" => Some("ok"),
            "cancelled" => Some("cancelled"),
            _ => None,
        };
        if let Some(result) = result {
            self.metrics.requests.with_label_values(&[self.ctx.api, requested, result]).inc();
            self.metrics
                .request_duration
                .with_label_values(&[self.ctx.api, requested])
                .observe(self.ctx.received.elapsed().as_secs_f64());
        }
        self.meter.record(MeteringRecord {
            request_id: self.ctx.request_id.clone(),
            timestamp: unix_seconds(),
            tenant: self.ctx.tenant.name.clone(),
            api: self.ctx.api,
            model: self.requested.clone(),
            model_used: self.model.model_id.clone(),
            input_tokens,
            output_tokens,
            cached_tokens: usage.cached_tokens,
            queue_ms: self.queue_wait.as_secs_f64() * 1000.0,
            prefill_ms: prefill.as_secs_f64() * 1000.0,
            decode_ms: decode.as_secs_f64() * 1000.0,
            total_ms: self.ctx.received.elapsed().as_secs_f64() * 1000.0,
            cost: self.model.cost(input_tokens, output_tokens),
            outcome: outcome.into(),
        });
    }
}

impl Drop for Generation {
    fn drop(&mut self) {
        if !self.done {
            tracing::info!(request_id = %self.ctx.request_id, "client went away; generation cancelled");
            self.finish(&Usage::default(), "cancelled");
        }
    }
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

    #[test]
    fn fallback_triggers_match_the_failures_they_name() {
        let throttled = ApiError::Throttling { message: String::new(), retry_after: Duration::ZERO };
        let unavailable = ApiError::Unavailable { message: String::new(), retry_after: Duration::ZERO };
        let timeout = ApiError::ModelTimeout { message: String::new() };
        let invalid = ApiError::validation("x");
        assert!(matches_trigger(FallbackTrigger::Throttled, &throttled));
        assert!(!matches_trigger(FallbackTrigger::Throttled, &unavailable));
        assert!(matches_trigger(FallbackTrigger::Unavailable, &unavailable));
        assert!(!matches_trigger(FallbackTrigger::Unavailable, &timeout));
        assert!(matches_trigger(FallbackTrigger::AnyError, &timeout));
        assert!(!matches_trigger(FallbackTrigger::AnyError, &invalid), "a bad request fails everywhere");
    }
}
