//! Counting and metering, in one place: every request that reaches inference is settled exactly
//! once — one `requests_total` count and one metering record — however many runners, retries or
//! fallbacks it took. Attempts that were retried leave only operational traces (token counters,
//! finish reasons); the client is billed for the answer it got.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::{Ctx, unix_seconds};
use crate::adapters::Usage;
use crate::catalog::ModelEntry;
use crate::metering::{Meter, MeteringRecord};
use crate::metrics::Metrics;

/// Whether a request has been settled, and whether it is to be billed; shared by every clone of
/// its [`Ctx`].
#[derive(Clone, Debug, Default)]
pub struct Settled(Arc<SettledState>);

#[derive(Debug, Default)]
struct SettledState {
    done: AtomicBool,
    waived: AtomicBool,
    no_output: AtomicBool,
}

impl Settled {
    /// Marks the request settled; true only the first time.
    fn first(&self) -> bool {
        !self.0.done.swap(true, Ordering::AcqRel)
    }

    pub fn is_settled(&self) -> bool {
        self.0.done.load(Ordering::Acquire)
    }

    /// Bills nothing for the request, whatever ends it (a part of a request that failed as a
    /// whole: the client gets an error, not this part's tokens).
    pub fn waive(&self) {
        self.0.waived.store(true, Ordering::Release);
    }

    fn waived(&self) -> bool {
        self.0.waived.load(Ordering::Acquire)
    }

    /// The generated tokens are not part of the answer (a prompt scored only, which the runner
    /// still continues by one token): neither recorded nor billed.
    pub fn drop_output(&self) {
        self.0.no_output.store(true, Ordering::Release);
    }
}

/// How a request ended, as it is counted and metered.
pub struct Account<'a> {
    /// The model the client asked for (a catalog id, never the client's string).
    pub requested: &'a str,
    /// The model that answered (differs after a fallback).
    pub used: &'a ModelEntry,
    /// `end_turn`, `max_tokens`, `stop_sequence`, `cancelled`, or an error kind.
    pub outcome: &'a str,
    pub usage: Usage,
    pub queue: Duration,
    pub prefill: Duration,
    pub decode: Duration,
    /// Whether the client is charged for the tokens: not when the failure was the platform's.
    pub billable: bool,
}

/// The request counters and the meter.
#[derive(Clone)]
pub struct Ledger {
    pub metrics: Metrics,
    pub meter: Meter,
}

/// The `result` label of `requests_total` for an outcome.
fn result_of(outcome: &str) -> &str {
    match outcome {
        "end_turn" | "max_tokens" | "stop_sequence" | "tool_use" | "guardrail_intervened" | "ok" => "ok",
        other => other,
    }
}

impl Ledger {
    /// Counts and meters the request, unless it was settled already (false then).
    pub fn settle(&self, ctx: &Ctx, account: Account<'_>) -> bool {
        if !ctx.settled.first() {
            return false;
        }
        let elapsed = ctx.received.elapsed();
        self.metrics.requests.with_label_values(&[ctx.api, account.requested, result_of(account.outcome)]).inc();
        self.metrics.request_duration.with_label_values(&[ctx.api, account.requested]).observe(elapsed.as_secs_f64());
        let mut usage = account.usage;
        if ctx.settled.0.no_output.load(Ordering::Acquire) {
            usage.output_tokens = 0;
        }
        self.meter.record(MeteringRecord {
            request_id: ctx.request_id.clone(),
            timestamp: unix_seconds(),
            tenant: ctx.tenant.name.clone(),
            api: ctx.api,
            model: account.requested.to_string(),
            model_used: account.used.model_id.clone(),
            input_tokens: usage.input_tokens,
            output_tokens: usage.output_tokens,
            cached_tokens: usage.cached_tokens,
            queue_ms: account.queue.as_secs_f64() * 1000.0,
            prefill_ms: account.prefill.as_secs_f64() * 1000.0,
            decode_ms: account.decode.as_secs_f64() * 1000.0,
            total_ms: elapsed.as_secs_f64() * 1000.0,
            cost: if account.billable && !ctx.settled.waived() {
                account.used.cost(usage.input_tokens, usage.output_tokens)
            } else {
                0.0
            },
            outcome: account.outcome.to_string(),
        });
        true
    }

    /// Counts a request refused with an error response before any answer began (no metering
    /// record: nothing was served). `model` is a catalog id or `unknown`.
    pub fn refused(&self, api: &str, model: &str, kind: &str) {
        self.metrics.requests.with_label_values(&[api, model, kind]).inc();
    }
}
