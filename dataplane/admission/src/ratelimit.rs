//! Per-tenant token buckets, counted in tokens (input + expected output) rather than requests, and
//! scaled by the model's load (adaptive rate limiting).
//!
//! Each tenant has a bucket of `burst_tokens` that refills at `tokens_per_minute`. Both are
//! multiplied by the load factor of the model being called: ×2 while its runners are healthy (a
//! burst up to twice the base), ×1 when degraded, ×0.5 when stressed (throttling or critical). The
//! factor is applied on every check, so limits follow load as soon as the router sees it change,
//! and a bucket holding more than the shrunken capacity is clipped. Reductions are proportional:
//! high-volume tenants lose more tokens per minute in absolute terms.
//!
//! Provisioned throughput adds a reserved rate that load never scales: a tenant with model units
//! on a model may always spend `reserved_tokens_per_minute` there (with a minute of it as burst)
//! on top of its on-demand limits. The router keeps one bucket per (tenant, model), so a tenant's
//! traffic on one model does not spend its allowance on another.
//!
//! A request larger than the whole bucket would never fit, so it is admitted when the bucket is
//! full and the excess is carried as debt: the tenant then waits until the debt is repaid. The
//! limiter is therefore never stricter than the rate itself.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::Throttled;
use crate::priority::Priority;

/// The longest retry hint the limiter gives (a tenant with no rate at all).
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// The health of a model's runners, as the router sees it. Ordered best first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LoadState {
    /// Spare capacity: limits are doubled.
    Healthy,
    /// Busy but keeping up: base limits.
    Degraded,
    /// Runners ask for less traffic: limits halved.
    Throttle,
    /// Runners are overloaded: limits halved.
    Critical,
}

impl LoadState {
    /// The multiplier applied to a tenant's rate and burst.
    pub fn limit_factor(self) -> f64 {
        match self {
            LoadState::Healthy => 2.0,
            LoadState::Degraded => 1.0,
            LoadState::Throttle | LoadState::Critical => 0.5,
        }
    }
}

/// What a tenant may use on one model.
#[derive(Debug, Clone, PartialEq)]
pub struct TenantLimits {
    /// Sustained tokens (input + expected output) per minute at base load.
    pub tokens_per_minute: u64,
    /// Bucket size: how many tokens may be spent at once after a quiet period.
    pub burst_tokens: u64,
    /// The tenant's default request priority.
    pub priority: Priority,
    /// Fair-queuing weight: provisioned model units, 1.0 on demand.
    pub weight: f64,
    /// Provisioned tokens per minute (model units × the model's tokens per unit), never scaled
    /// by load; 0 on demand.
    pub reserved_tokens_per_minute: u64,
}

#[derive(Debug)]
struct Bucket {
    /// Tokens available; negative while a request larger than the bucket is being paid back.
    level: f64,
    /// Capacity and rate as of the last check, used to tell whether an idle bucket is full.
    capacity: f64,
    per_second: f64,
    updated: Instant,
}

impl Bucket {
    fn refilled(&self, per_second: f64, capacity: f64, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        (self.level + per_second * elapsed).min(capacity)
    }
}

/// Token buckets for every tenant seen recently. Plain data: the caller holds it behind a lock.
#[derive(Debug, Default)]
pub struct RateLimiter {
    buckets: HashMap<String, Bucket>,
}

impl RateLimiter {
    /// An empty limiter; buckets are created on a tenant's first request.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes `tokens` from a bucket (the router names one per tenant and model), or says how long
    /// until they would be there.
    pub fn check(
        &mut self,
        tenant: &str,
        limits: &TenantLimits,
        tokens: u64,
        load: LoadState,
        now: Instant,
    ) -> Result<(), Throttled> {
        let factor = load.limit_factor();
        let reserved = limits.reserved_tokens_per_minute as f64;
        let capacity = limits.burst_tokens as f64 * factor + reserved;
        let per_second = (limits.tokens_per_minute as f64 * factor + reserved) / 60.0;
        let bucket = match self.buckets.get_mut(tenant) {
            Some(bucket) => bucket,
            None => self.buckets.entry(tenant.to_owned()).or_insert(Bucket {
                level: capacity,
                capacity,
                per_second,
                updated: now,
            }),
        };
        bucket.level = bucket.refilled(per_second, capacity, now);
        bucket.updated = bucket.updated.max(now);
        bucket.capacity = capacity;
        bucket.per_second = per_second;
        let wanted = tokens as f64;
        let needed = wanted.min(capacity);
        if bucket.level >= needed {
            bucket.level -= wanted;
            return Ok(());
        }
        Err(Throttled { retry_after: time_to_refill(needed - bucket.level, per_second) })
    }

    /// Forgets buckets that have refilled completely: a new bucket starts full, so nothing is lost.
    /// Returns how many were removed.
    pub fn prune(&mut self, now: Instant) -> usize {
        let before = self.buckets.len();
        self.buckets.retain(|_, b| b.refilled(b.per_second, b.capacity, now) < b.capacity);
        before - self.buckets.len()
    }

    /// Tenants with a bucket.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// Whether no tenant has a bucket.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

fn time_to_refill(missing: f64, per_second: f64) -> Duration {
    let seconds = missing / per_second;
    if seconds.is_finite() && seconds >= 0.0 {
        Duration::try_from_secs_f64(seconds).map_or(MAX_RETRY_AFTER, |d| d.min(MAX_RETRY_AFTER))
    } else {
        MAX_RETRY_AFTER
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(tokens_per_minute: u64, burst_tokens: u64) -> TenantLimits {
        TenantLimits {
            tokens_per_minute,
            burst_tokens,
            priority: Priority::Normal,
            weight: 1.0,
            reserved_tokens_per_minute: 0,
        }
    }

    #[test]
    fn a_new_tenant_may_spend_its_burst_at_once() {
        let mut limiter = RateLimiter::new();
        let now = Instant::now();
        let l = limits(6_000, 1_000);
        assert_eq!(limiter.check("a", &l, 600, LoadState::Degraded, now), Ok(()));
        assert_eq!(limiter.check("a", &l, 400, LoadState::Degraded, now), Ok(()));
        assert!(limiter.check("a", &l, 1, LoadState::Degraded, now).is_err());
        // Another tenant has its own bucket.
        assert_eq!(limiter.check("b", &l, 1_000, LoadState::Degraded, now), Ok(()));
    }

    #[test]
    fn buckets_refill_at_the_per_minute_rate() {
        let mut limiter = RateLimiter::new();
        let t0 = Instant::now();
        let l = limits(6_000, 1_000); // 100 tokens a second
        assert_eq!(limiter.check("a", &l, 1_000, LoadState::Degraded, t0), Ok(()));
        assert!(limiter.check("a", &l, 300, LoadState::Degraded, t0 + Duration::from_secs(2)).is_err());
        assert_eq!(limiter.check("a", &l, 300, LoadState::Degraded, t0 + Duration::from_secs(3)), Ok(()));
        // Refill stops at the burst size.
        assert_eq!(limiter.check("a", &l, 1_000, LoadState::Degraded, t0 + Duration::from_secs(600)), Ok(()));
        assert!(limiter.check("a", &l, 1, LoadState::Degraded, t0 + Duration::from_secs(600)).is_err());
    }

    #[test]
    fn retry_after_is_the_time_to_refill_the_shortfall() {
        let mut limiter = RateLimiter::new();
        let now = Instant::now();
        let l = limits(6_000, 1_000);
        assert_eq!(limiter.check("a", &l, 1_000, LoadState::Degraded, now), Ok(()));
        let throttled = limiter.check("a", &l, 250, LoadState::Degraded, now).unwrap_err();
        assert_eq!(throttled.retry_after, Duration::from_millis(2_500));
        // Retrying exactly then succeeds.
        assert_eq!(limiter.check("a", &l, 250, LoadState::Degraded, now + throttled.retry_after), Ok(()));
    }

    #[test]
    fn healthy_models_double_limits_and_stressed_ones_halve_them() {
        let now = Instant::now();
        let l = limits(6_000, 1_000);
        for (load, burst) in [
            (LoadState::Healthy, 2_000),
            (LoadState::Degraded, 1_000),
            (LoadState::Throttle, 500),
            (LoadState::Critical, 500),
        ] {
            let mut limiter = RateLimiter::new();
            assert_eq!(limiter.check("a", &l, burst, load, now), Ok(()), "{load:?}");
            let throttled = limiter.check("a", &l, 100, load, now).unwrap_err();
            let per_second = 100.0 * load.limit_factor();
            assert_eq!(throttled.retry_after, Duration::from_secs_f64(100.0 / per_second), "{load:?}");
        }
    }

    #[test]
    fn a_bucket_shrinks_when_the_model_becomes_stressed() {
        let mut limiter = RateLimiter::new();
        let now = Instant::now();
        let l = limits(6_000, 1_000);
        assert_eq!(limiter.check("a", &l, 1_200, LoadState::Healthy, now), Ok(())); // 800 left of 2,000
        assert_eq!(limiter.check("a", &l, 300, LoadState::Critical, now), Ok(())); // clipped to 500, 200 left
        assert!(limiter.check("a", &l, 300, LoadState::Critical, now).is_err());
    }

    #[test]
    fn a_request_larger_than_the_bucket_passes_when_full_and_leaves_debt() {
        let mut limiter = RateLimiter::new();
        let now = Instant::now();
        let l = limits(6_000, 1_000);
        assert_eq!(limiter.check("a", &l, 3_000, LoadState::Degraded, now), Ok(()));
        // 2,000 of debt plus 100 wanted: 21 s at 100 tokens a second.
        let throttled = limiter.check("a", &l, 100, LoadState::Degraded, now).unwrap_err();
        assert_eq!(throttled.retry_after, Duration::from_secs(21));
    }

    #[test]
    fn a_reserved_rate_is_kept_whatever_the_load() {
        let mut limiter = RateLimiter::new();
        let t0 = Instant::now();
        let mut l = limits(600, 600);
        l.reserved_tokens_per_minute = 60_000;
        // A minute of the reserved rate is there at once, and the stressed model does not shrink it.
        assert_eq!(limiter.check("pt", &l, 60_000, LoadState::Critical, t0), Ok(()));
        assert!(limiter.check("pt", &l, 2_000, LoadState::Critical, t0).is_err());
        // It refills at the reserved rate (plus the halved on-demand rate): 1,005 tokens a second.
        assert_eq!(limiter.check("pt", &l, 1_000, LoadState::Critical, t0 + Duration::from_secs(1)), Ok(()));
        // On demand alone, the same tenant would wait minutes.
        let on_demand = limits(600, 600);
        assert_eq!(limiter.check("od", &on_demand, 300, LoadState::Critical, t0), Ok(()));
        assert!(limiter.check("od", &on_demand, 1_000, LoadState::Critical, t0 + Duration::from_secs(1)).is_err());
    }

    #[test]
    fn zero_and_huge_inputs_do_not_panic() {
        let mut limiter = RateLimiter::new();
        let now = Instant::now();
        assert_eq!(limiter.check("a", &limits(0, 0), 0, LoadState::Healthy, now), Ok(()));
        assert_eq!(limiter.check("a", &limits(0, 0), u64::MAX, LoadState::Healthy, now), Ok(()));
        let throttled = limiter.check("a", &limits(0, 0), 1, LoadState::Healthy, now).unwrap_err();
        assert_eq!(throttled.retry_after, MAX_RETRY_AFTER);
        let huge = limits(u64::MAX, u64::MAX);
        assert_eq!(limiter.check("b", &huge, u64::MAX, LoadState::Critical, now), Ok(()));
        // A clock that goes backwards refills nothing.
        assert!(limiter.check("c", &limits(60, 10), 10, LoadState::Degraded, now).is_ok());
        assert!(limiter.check("c", &limits(60, 10), 1, LoadState::Degraded, now - Duration::from_secs(5)).is_err());
    }

    #[test]
    fn prune_forgets_only_full_buckets() {
        let mut limiter = RateLimiter::new();
        let t0 = Instant::now();
        let l = limits(6_000, 1_000);
        assert_eq!(limiter.check("idle", &l, 0, LoadState::Degraded, t0), Ok(()));
        assert_eq!(limiter.check("busy", &l, 1_000, LoadState::Degraded, t0), Ok(()));
        assert_eq!(limiter.prune(t0 + Duration::from_secs(5)), 1);
        assert_eq!(limiter.len(), 1);
        assert_eq!(limiter.prune(t0 + Duration::from_secs(10)), 1);
        assert!(limiter.is_empty());
    }
}
