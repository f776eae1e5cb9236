//! A running generation: the runner's stream read piece by piece under an idle timeout; its end
//! recorded per attempt (slot, token counters) and, when it answered the client, settled in the
//! [`Ledger`].

use super::*;

/// A running generation on one runner. Dropping it cancels the runner's stream (the runner frees
/// the sequence's KV blocks) and records the request as cancelled.
pub struct Generation {
    pub requested: String,
    pub model: ModelEntry,
    /// Prompt tokens, and the output tokens the runner allows.
    pub input_tokens: u32,
    pub max_tokens: u32,
    pub(super) ctx: Ctx,
    pub(super) stream: tonic::Streaming<GenerateResponse>,
    /// The most time between two messages of the runner's stream.
    pub(super) idle_timeout: Duration,
    /// The runner's address, for logs.
    pub(super) runner: String,
    pub(super) pending: Option<GenerateResponse>,
    pub(super) permit: Option<Permit>,
    pub(super) in_flight: Option<InFlight>,
    /// A batch request's place in its model's batch work, held until it finishes.
    pub(super) batch: Option<super::admission::BatchSlot>,
    pub(super) queue_wait: Duration,
    pub(super) dispatched: Instant,
    pub(super) first_token: Option<Instant>,
    pub(super) last_token: Option<Instant>,
    pub(super) generated: u32,
    pub(super) text: String,
    pub(super) done: bool,
    pub(super) ledger: Ledger,
    /// What the runner reported when the generation finished (or what was counted, if it broke).
    pub(super) usage: Usage,
    /// The prompt's scores, when the request asked for them (they arrive before any text).
    pub(super) prompt_logprobs: Vec<TokenLogprob>,
}

/// A generation read to the end.
pub struct Collected {
    pub output: TextOutput,
    /// Each generated token's log-probability (empty unless asked for).
    pub logprobs: Vec<TokenLogprob>,
    /// Each prompt token's (empty unless asked for; the first has no context).
    pub prompt_logprobs: Vec<TokenLogprob>,
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
                            .ledger
                            .metrics
                            .inter_token_latency
                            .with_label_values(&[model])
                            .observe((now - last).as_secs_f64()),
                        None => {
                            self.first_token = Some(now);
                            self.ledger
                                .metrics
                                .time_to_first_token
                                .with_label_values(&[model])
                                .observe((now - self.ctx.received).as_secs_f64());
                        }
                    }
                    self.last_token = Some(now);
                    let tokens = t.token_ids.len().max(1) as u32;
                    self.generated += tokens;
                    self.text.push_str(&t.text);
                    let logprobs: Vec<TokenLogprob> = t.token_logprobs.into_iter().map(Into::into).collect();
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
                Some(generate_response::Event::PromptLogprobs(p)) => {
                    self.prompt_logprobs.extend(p.tokens.into_iter().map(TokenLogprob::from));
                    continue;
                }
                Some(generate_response::Event::Started(_)) | None => continue,
            }
        }
    }

    /// Reads to the end: the whole reply, with the log-probabilities asked for.
    pub async fn collect(mut self) -> Result<Collected, ApiError> {
        let mut logprobs = Vec::new();
        while let Some(piece) = self.next().await? {
            match piece {
                Piece::Text { logprobs: more, .. } => logprobs.extend(more),
                Piece::Done(output) => {
                    let prompt_logprobs = std::mem::take(&mut self.prompt_logprobs);
                    return Ok(Collected { output, logprobs, prompt_logprobs });
                }
            }
        }
        Err(ApiError::Internal("the generation ended twice".into()))
    }

    /// The prompt's scores received so far (all of them once the first text has arrived).
    pub fn take_prompt_logprobs(&mut self) -> Vec<TokenLogprob> {
        std::mem::take(&mut self.prompt_logprobs)
    }

    /// Settles a request whose streamed answer broke off with `error` (errors before the answer
    /// began are settled where they are answered). The tokens it streamed are recorded but not
    /// billed: the failure was the platform's.
    pub fn count_stream_error(&self, error: &ApiError) {
        self.settle(error.kind(), false);
    }

    /// Time from the request's arrival to its first token, in milliseconds.
    pub fn first_byte_ms(&self) -> u64 {
        self.first_token.map_or(0, |t| (t - self.ctx.received).as_millis() as u64)
    }

    /// Ends this attempt: gives back its slot and records what it did. An answer (or a client
    /// that left) settles the request; an error does not, as the request may be retried or
    /// fall back, and is settled where it is answered.
    pub(super) fn finish(&mut self, usage: &Usage, outcome: &str) {
        if self.done {
            return;
        }
        self.done = true;
        let now = Instant::now();
        let model = self.model.model_id.as_str();
        let output_tokens = if usage.output_tokens > 0 { usage.output_tokens } else { self.generated };
        let input_tokens = if usage.input_tokens > 0 { usage.input_tokens } else { self.input_tokens };
        self.usage = Usage { input_tokens, output_tokens, cached_tokens: usage.cached_tokens };
        if let Some(permit) = self.permit.take() {
            permit.complete((input_tokens + output_tokens) as u64);
        }
        self.in_flight.take();
        self.batch.take();
        let metrics = &self.ledger.metrics;
        let decode = self.first_token.map_or(Duration::ZERO, |t| now - t);
        if output_tokens > 1 && decode > Duration::ZERO {
            metrics
                .tokens_per_second
                .with_label_values(&[model])
                .observe((output_tokens - 1) as f64 / decode.as_secs_f64());
        }
        metrics.tokens.with_label_values(&[model, "input"]).inc_by(input_tokens as u64);
        metrics.tokens.with_label_values(&[model, "output"]).inc_by(output_tokens as u64);
        metrics.tokens.with_label_values(&[model, "cached"]).inc_by(usage.cached_tokens as u64);
        metrics.finish_reasons.with_label_values(&[model, outcome]).inc();
        if matches!(outcome, "end_turn" | "max_tokens" | "stop_sequence" | "cancelled") {
            self.settle(outcome, true);
        }
    }

    fn settle(&self, outcome: &str, billable: bool) {
        let end = Instant::now();
        self.ledger.settle(
            &self.ctx,
            Account {
                requested: &self.requested,
                used: &self.model,
                outcome,
                usage: self.usage,
                queue: self.queue_wait,
                prefill: self.first_token.unwrap_or(end) - self.dispatched,
                decode: self.first_token.map_or(Duration::ZERO, |t| end - t),
                billable,
            },
        );
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
