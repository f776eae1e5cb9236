//! The router's Prometheus metrics (`mantle_router_*`), registered once.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Buckets for latencies from a millisecond to ten minutes.
const LATENCY_BUCKETS: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 180.0, 600.0];

#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    /// Requests by API, model and outcome (`ok` or the error kind).
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub time_to_first_token: HistogramVec,
    pub inter_token_latency: HistogramVec,
    /// Per-request decode rate.
    pub tokens_per_second: HistogramVec,
    pub tokens: IntCounterVec,
    pub queue_depth: IntGaugeVec,
    /// 1 while overload control refuses requests that would wait, by model and lane.
    pub queue_overloaded: IntGaugeVec,
    pub queue_wait: HistogramVec,
    /// Requests refused before reaching a runner, by reason (rate_limit, queue_full, deadline,
    /// unavailable).
    pub rejected: IntCounterVec,
    pub finish_reasons: IntCounterVec,
    /// Requests answered by a fallback model.
    pub fallbacks: IntCounterVec,
    pub runners_ready: IntGaugeVec,
    pub metering_dropped: IntCounter,
    /// Token buckets held (one per tenant seen recently).
    pub rate_limit_buckets: IntGauge,
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| -> Result<IntCounterVec, prometheus::Error> {
            let c = IntCounterVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let histogram = |name: &str, help: &str, labels: &[&str], buckets: Vec<f64>| {
            let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)?;
            registry.register(Box::new(h.clone()))?;
            Ok::<_, prometheus::Error>(h)
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(g.clone()))?;
            Ok::<_, prometheus::Error>(g)
        };
        let latency = LATENCY_BUCKETS.to_vec();
        let metering_dropped = IntCounter::new(
            "mantle_router_metering_dropped_total",
            "Metering records dropped because the sink lagged",
        )?;
        registry.register(Box::new(metering_dropped.clone()))?;
        let rate_limit_buckets =
            IntGauge::new("mantle_router_rate_limit_buckets", "Token buckets held, one per tenant seen recently")?;
        registry.register(Box::new(rate_limit_buckets.clone()))?;
        Ok(Metrics {
            requests: counter(
                "mantle_router_requests_total",
                "Requests by API, model and outcome",
                &["api", "model", "outcome"],
            )?,
            request_duration: histogram(
                "mantle_router_request_duration_seconds",
                "Time from request to the last byte",
                &["api", "model"],
                latency.clone(),
            )?,
            time_to_first_token: histogram(
                "mantle_router_time_to_first_token_seconds",
                "Time from request to the first generated token",
                &["model"],
                latency.clone(),
            )?,
            inter_token_latency: histogram(
                "mantle_router_inter_token_latency_seconds",
                "Time between generated tokens",
                &["model"],
                vec![0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0],
            )?,
            tokens_per_second: histogram(
                "mantle_router_output_tokens_per_second",
                "Decode rate of each request",
                &["model"],
                vec![1.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0],
            )?,
            tokens: counter(
                "mantle_router_tokens_total",
                "Tokens by model and kind (input, output, cached)",
                &["model", "kind"],
            )?,
            queue_depth: gauge(
                "mantle_router_queue_depth",
                "Requests waiting, by model, pool (shared, or a provisioned tenant's) and lane",
                &["model", "pool", "lane"],
            )?,
            queue_overloaded: gauge(
                "mantle_router_queue_overloaded",
                "1 while the lane's queue stands and requests that would wait are refused",
                &["model", "pool", "lane"],
            )?,
            queue_wait: histogram(
                "mantle_router_queue_wait_seconds",
                "Time requests waited for a slot, by model, pool and lane",
                &["model", "pool", "lane"],
                latency,
            )?,
            rejected: counter(
                "mantle_router_rejected_total",
                "Requests refused before reaching a runner, by reason",
                &["model", "reason"],
            )?,
            finish_reasons: counter(
                "mantle_router_finish_reasons_total",
                "Finished generations by stop reason",
                &["model", "reason"],
            )?,
            fallbacks: counter(
                "mantle_router_fallbacks_total",
                "Requests served by a fallback model",
                &["model", "fallback"],
            )?,
            runners_ready: gauge("mantle_router_runners_ready", "Ready runners by model", &["model"])?,
            metering_dropped,
            rate_limit_buckets,
            registry,
        })
    }

    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for the text format.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}
