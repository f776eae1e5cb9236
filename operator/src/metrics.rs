//! The operator's Prometheus metrics: reconciles, their duration and their failures, per kind.

use std::time::Duration;

use prometheus::{Encoder, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry, TextEncoder};

#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    reconciles: IntCounterVec,
    failures: IntCounterVec,
    duration: HistogramVec,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let reconciles =
            IntCounterVec::new(Opts::new("mantle_operator_reconciles_total", "Reconciles by kind"), &["kind"])
                .expect("a valid metric");
        let failures = IntCounterVec::new(
            Opts::new("mantle_operator_reconcile_errors_total", "Reconciles that failed, by kind"),
            &["kind"],
        )
        .expect("a valid metric");
        let duration = HistogramVec::new(
            HistogramOpts::new("mantle_operator_reconcile_duration_seconds", "Time a reconcile took, by kind")
                .buckets(vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
            &["kind"],
        )
        .expect("a valid metric");
        for c in [&reconciles, &failures] {
            registry.register(Box::new(c.clone())).expect("registered once");
        }
        registry.register(Box::new(duration.clone())).expect("registered once");
        Metrics { registry, reconciles, failures, duration }
    }

    /// Counts one reconcile of `kind`.
    pub fn observe(&self, kind: &str, took: Duration, failed: bool) {
        self.reconciles.with_label_values(&[kind]).inc();
        if failed {
            self.failures.with_label_values(&[kind]).inc();
        }
        self.duration.with_label_values(&[kind]).observe(took.as_secs_f64());
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}
