//! Admission and scheduling for the Mantle router: per-tenant token buckets that follow the
//! model's load, size-class lanes, and a per-model queue with priority scoring, aging, weighted
//! fair queuing across tenants, deadlines and load shedding.
//!
//! Everything that decides is plain data over an explicit `now` and is tested without a runtime;
//! only [`ModelQueue`] touches a clock and wakes tasks.
//!
//! - `priority`: the four priority levels.
//! - `lanes`: size classification and the 50/35/15 split of slots.
//! - `ratelimit`: token buckets with the adaptive (load) factor.
//! - `queue`: the per-model scheduler [`State`]: lanes, score, classes, overflow, shedding,
//!   deadline estimates.
//! - `fair`: weighted fair queuing among the tenants of one class.
//! - `async_queue`: [`ModelQueue`] and [`Permit`], the async handle the router awaits.

mod async_queue;
mod fair;
mod lanes;
mod priority;
mod queue;
mod ratelimit;

use std::time::Duration;

pub use async_queue::{ModelQueue, Permit};
pub use lanes::{
    LANE_SHARE_PERCENT, Lane, MEDIUM_MAX_COST, OUTPUT_COST_MULTIPLIER, SMALL_MAX_COST, classify, estimated_cost,
    lane_slots,
};
pub use priority::Priority;
pub use queue::{
    Admitted, Dispatch, LaneSnapshot, MIN_RETRY_AFTER, OverloadControl, POINTS_PER_LEVEL, QueueConfig, Request,
    Snapshot, State, deadline_bonus, priority_score,
};
pub use ratelimit::{LoadState, MAX_RETRY_AFTER, RateLimiter, TenantLimits};

/// Why the queue refused or dropped a request. Every refusal is immediate: the queue never lets
/// a request wait only to time it out, except when its own deadline passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    /// The lane's queue is full (HTTP 429 `ThrottlingException`).
    #[error("the model's queue is full; retry after {retry_after:?}")]
    Throttled { retry_after: Duration },
    /// No runner is ready for the model (HTTP 503 `ServiceUnavailableException`).
    #[error("no runner is ready for the model; retry after {retry_after:?}")]
    Unavailable { retry_after: Duration },
    /// The estimated queue wait already overshoots the deadline (HTTP 408 `ModelTimeoutException`).
    #[error("the deadline cannot be met: the estimated queue wait is {estimated_wait:?}")]
    DeadlineUnmeetable { estimated_wait: Duration },
    /// The deadline passed while the request was queued (HTTP 408 `ModelTimeoutException`).
    #[error("the deadline passed while the request was queued")]
    DeadlineExpired,
    /// Held for a model scaling from zero, no runner became ready in time (HTTP 429
    /// `ModelNotReadyException`, which the AWS SDKs retry).
    #[error("no runner became ready for the model in time; retry after {retry_after:?}")]
    NotReady { retry_after: Duration },
}

impl Rejected {
    /// A stable name, for logs and metric labels.
    pub fn kind(&self) -> &'static str {
        match self {
            Rejected::Throttled { .. } => "queue_full",
            Rejected::Unavailable { .. } => "unavailable",
            Rejected::DeadlineUnmeetable { .. } => "deadline_unmeetable",
            Rejected::DeadlineExpired => "deadline_expired",
            Rejected::NotReady { .. } => "not_ready",
        }
    }

    /// The retry hint, for `Retry-After`, where retrying makes sense.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Rejected::Throttled { retry_after }
            | Rejected::Unavailable { retry_after }
            | Rejected::NotReady { retry_after } => Some(*retry_after),
            Rejected::DeadlineUnmeetable { .. } | Rejected::DeadlineExpired => None,
        }
    }
}

/// A tenant is over its token rate (HTTP 429 `ThrottlingException`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the tenant's token rate is exceeded; retry after {retry_after:?}")]
pub struct Throttled {
    pub retry_after: Duration,
}
