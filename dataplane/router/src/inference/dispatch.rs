//! Sending a request to a runner: placement (avoiding runners that just failed it), the start
//! of a generation, bounded unary calls, and the model's fallback chain.

use super::*;

pub(super) fn proto_priority(p: Priority) -> mantle_proto::Priority {
    match p {
        Priority::Critical => mantle_proto::Priority::Critical,
        Priority::High => mantle_proto::Priority::High,
        Priority::Normal => mantle_proto::Priority::Normal,
        Priority::Low => mantle_proto::Priority::Low,
    }
}

impl Inference {
    /// Sends a generation to a runner and waits for its first event (the prompt accepted).
    pub(super) async fn start_on(
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
            grammar: structured::grammar(req),
            prompt_logprobs: req.prompt_logprobs,
            top_logprobs: req.top_logprobs,
            prompt_token_ids: req.prompt_token_ids.clone(),
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
    pub(super) fn place(&self, ctx: &Ctx, model: &ModelEntry, prompt: &str) -> Result<Arc<RunnerHandle>, ApiError> {
        self.place_avoiding(ctx, model, prompt, &[])
    }

    /// Picks a runner for the request other than those in `avoid` (runners that just failed it).
    pub(super) fn place_avoiding(
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
    pub(super) fn chain(&self, model: &ModelEntry) -> Vec<(ModelEntry, Option<FallbackTrigger>)> {
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
    pub(super) async fn with_fallbacks<T, F, Fut>(&self, model: &ModelEntry, mut attempt: F) -> Result<T, ApiError>
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

    /// A unary runner request that tells the runner how long the router waits.
    pub(super) fn unary<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(self.config.runner_idle_timeout);
        request
    }

    /// Awaits a unary runner call for at most the idle timeout: a hung runner must not hold the
    /// request, or its slot, forever.
    pub(super) async fn bounded<T>(
        &self,
        call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, ApiError> {
        match tokio::time::timeout(self.config.runner_idle_timeout, call).await {
            Ok(Ok(reply)) => Ok(reply.into_inner()),
            Ok(Err(status)) => Err(from_status(&status)),
            Err(_) => Err(error::runner_lost()),
        }
    }
}

pub(super) fn matches_trigger(trigger: FallbackTrigger, error: &ApiError) -> bool {
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

/// How many runners a generation tries before its prompt is accepted.
pub(super) const RUNNER_ATTEMPTS: usize = 2;

/// Why a generation did not start on a runner.
pub(super) enum StartError {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    pub(super) fn fallback_triggers_match_the_failures_they_name() {
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
