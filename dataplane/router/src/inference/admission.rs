//! Admission glue: the tenant's token bucket (with its provisioned reservation), the model's
//! queue and the input guard; each queue's capacity kept current from its runners' health.

use super::*;

pub(super) fn load_of(state: LoadState) -> Load {
    match state {
        LoadState::Healthy => Load::Healthy,
        LoadState::Degraded => Load::Degraded,
        LoadState::Throttle => Load::Throttle,
        LoadState::Critical | LoadState::Unspecified => Load::Critical,
    }
}

/// Which queue admits a request: the model's shared pool, or a provisioned tenant's dedicated
/// pool of it. Each has the slots of its own ready runners only, so a neighbour filling the shared
/// pool never takes a slot of a reservation, nor waits in front of it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) struct QueueKey {
    pub model: String,
    /// The tenant whose dedicated pool it is; `None` for the shared pool.
    pub pool: Option<String>,
}

impl QueueKey {
    fn shared(model: &str) -> Self {
        QueueKey { model: model.to_string(), pool: None }
    }

    fn pool_label(&self) -> &str {
        self.pool.as_deref().unwrap_or("shared")
    }
}

impl Inference {
    /// The `x-mantle-capacity` header sent with 429 and 503 answers: how full the model's shared
    /// pool is, so a client (or a load balancer) can back off or go elsewhere.
    pub fn capacity_header(&self, requested: &str) -> Option<String> {
        let model = self.live().catalog.resolve(requested).ok()?.model_id.clone();
        let queue = self.queues.lock().unwrap_or_else(|e| e.into_inner()).get(&QueueKey::shared(&model))?.clone();
        let s = queue.snapshot();
        Some(format!("slots={}; in-flight={}; queued={}", s.capacity, s.in_flight, s.queued))
    }

    /// Requests waiting for the model's shared pool (`pool` None) or a tenant's dedicated one:
    /// the demand an autoscaler reads.
    pub fn queued(&self, model_id: &str, pool: Option<&str>) -> usize {
        let key = QueueKey { model: model_id.to_string(), pool: pool.map(str::to_string) };
        let queue = self.queues.lock().unwrap_or_else(|e| e.into_inner()).get(&key).cloned();
        queue.map_or(0, |q| q.snapshot().queued)
    }

    /// Whether admission counts slots for the model now (its runners are known to a queue).
    pub fn admits(&self, model_id: &str) -> bool {
        let queues = self.queues.lock().unwrap_or_else(|e| e.into_inner());
        queues.iter().any(|(key, q)| key.model == model_id && q.snapshot().capacity > 0)
    }

    /// The queue that admits `tenant`'s requests for the model: its dedicated pool's while that
    /// has a ready runner (placement sends them there), else the shared pool's. Created on first
    /// use.
    pub(super) fn queue_for(&self, model_id: &str, tenant: &str) -> (QueueKey, ModelQueue) {
        let dedicated = self
            .live()
            .runners
            .for_model(model_id)
            .iter()
            .any(|r| r.spec.pool.as_deref() == Some(tenant) && r.state().1);
        let key = QueueKey { model: model_id.to_string(), pool: dedicated.then(|| tenant.to_string()) };
        let queue = self.queue(&key);
        (key, queue)
    }

    fn queue(&self, key: &QueueKey) -> ModelQueue {
        let mut queues = self.queues.lock().unwrap_or_else(|e| e.into_inner());
        queues.entry(key.clone()).or_insert_with(|| ModelQueue::new(self.config.queue.clone())).clone()
    }

    /// The model's load as admission sees it: the best state among its ready runners.
    pub(super) fn model_load(&self, model_id: &str) -> Load {
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

    /// Updates each queue's capacity from its pool's runners' readiness and health.
    pub(super) fn refresh_capacity(&self) {
        let live = self.live();
        for model in live.catalog.iter() {
            let id = &model.model_id;
            let hold = model.scales_from_zero.then_some(self.config.cold_start_hold);
            self.queue(&QueueKey::shared(id)).set_cold_hold(hold);
            let runners = live.runners.for_model(id);
            for pool in runners.iter().filter_map(|r| r.spec.pool.clone()) {
                self.queue(&QueueKey { model: id.clone(), pool: Some(pool) });
            }
            let ready = runners.iter().filter(|r| r.state().1).count();
            self.metrics.runners_ready.with_label_values(&[id.as_str()]).set(ready as i64);
        }
        let queues: Vec<(QueueKey, ModelQueue)> =
            self.queues.lock().unwrap_or_else(|e| e.into_inner()).iter().map(|(k, q)| (k.clone(), q.clone())).collect();
        for (key, queue) in &queues {
            let mut slots = 0;
            for r in live.runners.for_model(&key.model).iter().filter(|r| r.spec.pool == key.pool) {
                let (state, is_ready) = r.state();
                if is_ready {
                    slots += match state {
                        LoadState::Throttle => self.config.slots_per_runner.div_ceil(2),
                        _ => self.config.slots_per_runner,
                    };
                }
            }
            queue.set_capacity(slots);
            for lane in queue.snapshot().lanes {
                let labels = [key.model.as_str(), key.pool_label(), lane.lane.name()];
                self.metrics.queue_depth.with_label_values(&labels).set(lane.queued as i64);
                self.metrics.queue_overloaded.with_label_values(&labels).set(i64::from(lane.overloaded));
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

    pub(super) fn reject(&self, model: &ModelEntry, reason: &str) {
        self.metrics.rejected.with_label_values(&[model.model_id.as_str(), reason]).inc();
    }

    /// Rate limit, queue and input guard: a permit to send one request to one of the model's
    /// runners.
    pub(super) async fn admit(
        &self,
        ctx: &Ctx,
        model: &ModelEntry,
        input_tokens: u64,
        output_tokens: u64,
        prompt: &str,
    ) -> Result<Admission, ApiError> {
        model.check_serving(SystemTime::now())?;
        let (mut key, queue) = self.queue_for(&model.model_id, &ctx.tenant.name);
        // Provisioned model units weigh in fair queuing and reserve their rate: units × the
        // model's tokens per unit, on top of the tenant's on-demand limits.
        let units = self.live().provisioned.get(&(ctx.tenant.name.clone(), model.model_id.clone())).copied();
        let weight = units.unwrap_or(1.0);
        let reserved = units.map_or(0, |u| (u * model.tokens_per_minute_per_unit.unwrap_or(0) as f64) as u64);
        let limits = ctx.tenant.limits(weight, reserved);
        // Buckets count input plus the output a request is expected to generate, one bucket per
        // tenant and model.
        let tokens = input_tokens + self.config.queue.expected_output_tokens(output_tokens);
        let batch = match ctx.batch {
            None => {
                self.spend(ctx, model, "", &limits, tokens)?;
                None
            }
            Some(tier) => Some(self.batch_gate(model, tier, &queue)?),
        };
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
        let (permit, guard) = tokio::join!(queue.acquire(request.clone()), guards.check_input(ctx, prompt));
        let permit = match permit {
            // The reservation's pool lost its last ready runner while the request waited: the
            // shared pool serves it instead (as placement does), rather than refusing it.
            Err(Rejected::Unavailable { .. }) if key.pool.is_some() => {
                key = QueueKey::shared(&model.model_id);
                tracing::info!(model = %model.model_id, tenant = %ctx.tenant.name, "dedicated pool gone; request moves to the shared pool");
                self.queue(&key).acquire(request).await
            }
            other => other,
        };
        let permit = permit.map_err(|rejected| {
            let (reason, error) = self.rejection(model, rejected);
            self.reject(model, reason);
            error
        })?;
        guard?;
        let wait = queued.elapsed();
        self.metrics
            .queue_wait
            .with_label_values(&[model.model_id.as_str(), key.pool_label(), permit.lane().name()])
            .observe(wait.as_secs_f64());
        Ok(Admission { permit, queue_wait: wait, batch })
    }

    /// Whether a batch request of `tier` may start now ([`super::batch_gate`]); while it runs, it
    /// counts as the model's batch work.
    fn batch_gate(
        &self,
        model: &ModelEntry,
        tier: mantle_crds::BatchTier,
        queue: &ModelQueue,
    ) -> Result<BatchSlot, ApiError> {
        let s = queue.snapshot();
        let mut running = self.batch_in_flight.lock().unwrap_or_else(|e| e.into_inner());
        let now = super::batch_gate::PoolNow {
            load: self.model_load(&model.model_id),
            capacity: s.capacity,
            in_flight: s.in_flight,
            queued: s.queued,
            batch_in_flight: running.get(&model.model_id).copied().unwrap_or(0),
        };
        if let Err(why) = super::batch_gate::admits(tier, now) {
            self.reject(model, "batch_waits");
            return Err(ApiError::Unavailable {
                message: format!("{why} ({}; tier {tier:?}); try again later", model.model_id),
                retry_after: Duration::from_secs(2),
            });
        }
        *running.entry(model.model_id.clone()).or_default() += 1;
        Ok(BatchSlot { counts: self.batch_in_flight.clone(), model: model.model_id.clone() })
    }

    /// Takes `tokens` from the tenant's bucket for the model (`purpose` names a separate bucket,
    /// e.g. for CountTokens), or refuses with the time to wait.
    pub(super) fn spend(
        &self,
        ctx: &Ctx,
        model: &ModelEntry,
        purpose: &str,
        limits: &mantle_admission::TenantLimits,
        tokens: u64,
    ) -> Result<(), ApiError> {
        let load = self.model_load(&model.model_id);
        let bucket = format!("{}\u{1f}{}\u{1f}{purpose}", ctx.tenant.name, model.model_id);
        let limited =
            self.limiter.lock().unwrap_or_else(|e| e.into_inner()).check(&bucket, limits, tokens, load, Instant::now());
        let Err(throttled) = limited else { return Ok(()) };
        self.reject(model, "rate_limit");
        Err(ApiError::Throttling {
            message: format!(
                "Too many tokens: tenant {} is over its limit of {} tokens a minute on {}{}. Retry after {:.1}s.",
                ctx.tenant.name,
                limits.tokens_per_minute + limits.reserved_tokens_per_minute,
                model.model_id,
                if purpose.is_empty() { String::new() } else { format!(" ({purpose})") },
                throttled.retry_after.as_secs_f64()
            ),
            retry_after: throttled.retry_after,
        })
    }

    pub(super) fn rejection(&self, model: &ModelEntry, rejected: Rejected) -> (&'static str, ApiError) {
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
            Rejected::NotReady { retry_after } => (
                "not_ready",
                ApiError::ModelNotReady(format!(
                    "{id} scales from zero and no replica became ready within {} s; one is starting. Retry after {} s.",
                    self.config.cold_start_hold.as_secs(),
                    retry_after.as_secs().max(1)
                )),
            ),
        }
    }
}

/// More bytes a token than any real text has: a prompt longer than this many bytes for each
/// token of the context cannot fit, whatever the tokenizer.
pub(super) const MAX_BYTES_PER_TOKEN: u64 = 32;

/// Refuses, before it is queued or sent, a prompt that cannot fit the model's context: a runner
/// would spend seconds tokenizing megabytes only to refuse it. Prompts that might fit are counted
/// exactly by the runner, which refuses them with both counts.
pub(super) fn check_input_length(model: &ModelEntry, req: &TextRequest) -> Result<(), ApiError> {
    let context = model.context_length as u64;
    let ids = req.prompt_token_ids.len() as u64;
    if context > 0 && ids >= context {
        return Err(ApiError::validation(format!(
            "The input is too long for {}: it is {ids} tokens, and the model's context is {context} tokens. \
             Shorten the input.",
            model.model_id
        )));
    }
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

pub(super) async fn capacity_loop(inference: std::sync::Weak<Inference>) {
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
pub(super) const PRUNE_INTERVAL: Duration = Duration::from_secs(1);

pub(super) struct Admission {
    pub(super) permit: Permit,
    pub(super) queue_wait: Duration,
    /// A batch request's place in its model's batch work, while it runs (the generation holds
    /// it to its end).
    pub(super) batch: Option<BatchSlot>,
}

/// A running batch request, counted until dropped.
pub(super) struct BatchSlot {
    counts: Arc<std::sync::Mutex<HashMap<String, usize>>>,
    model: String,
}

impl Drop for BatchSlot {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = counts.get_mut(&self.model) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(&self.model);
            }
        }
    }
}
