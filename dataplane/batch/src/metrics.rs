//! Prometheus metrics of batch work (`mantle_batch_*`), registered where the process serves its
//! metrics (the router's admin listener under `mantle dev`). Records and tokens per second are
//! `rate()` of the counters; labels are fixed sets, never a client's string.

use prometheus::{Histogram, HistogramOpts, IntCounterVec, IntGauge, Opts, Registry};

#[derive(Clone)]
pub struct BatchMetrics {
    /// Records written, by outcome: `success`, `error`, `reused`, `skipped`.
    pub records: IntCounterVec,
    /// Tokens, by direction: `input`, `output`.
    pub tokens: IntCounterVec,
    /// Seconds from a shard's start to its commit.
    pub shard_seconds: Histogram,
    /// Jobs running now.
    pub jobs_running: IntGauge,
}

impl BatchMetrics {
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let records = IntCounterVec::new(
            Opts::new("mantle_batch_records_total", "Batch records written, by outcome"),
            &["outcome"],
        )?;
        let tokens =
            IntCounterVec::new(Opts::new("mantle_batch_tokens_total", "Batch tokens, by direction"), &["direction"])?;
        let shard_seconds = Histogram::with_opts(
            HistogramOpts::new("mantle_batch_shard_seconds", "Seconds from a shard's start to its commit")
                .buckets(vec![1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 4.0 * 3600.0]),
        )?;
        let jobs_running = IntGauge::new("mantle_batch_jobs_running", "Batch jobs running")?;
        registry.register(Box::new(records.clone()))?;
        registry.register(Box::new(tokens.clone()))?;
        registry.register(Box::new(shard_seconds.clone()))?;
        registry.register(Box::new(jobs_running.clone()))?;
        Ok(BatchMetrics { records, tokens, shard_seconds, jobs_running })
    }

    /// Counts a committed shard.
    pub(crate) fn shard(&self, success: u64, error: u64, reused: u64, skipped: u64, tokens: (u64, u64), seconds: f64) {
        for (outcome, n) in [("success", success), ("error", error), ("reused", reused), ("skipped", skipped)] {
            self.records.with_label_values(&[outcome]).inc_by(n);
        }
        self.tokens.with_label_values(&["input"]).inc_by(tokens.0);
        self.tokens.with_label_values(&["output"]).inc_by(tokens.1);
        self.shard_seconds.observe(seconds);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_committed_shard_is_counted_by_outcome_and_direction() {
        let registry = Registry::new();
        let m = BatchMetrics::new(&registry).unwrap();
        m.shard(5, 1, 3, 0, (100, 20), 2.5);
        let text = prometheus::TextEncoder::new().encode_to_string(&registry.gather()).unwrap();
        for want in [
            "mantle_batch_records_total{outcome=\"success\"} 5",
            "mantle_batch_records_total{outcome=\"reused\"} 3",
            "mantle_batch_tokens_total{direction=\"input\"} 100",
            "mantle_batch_shard_seconds_count 1",
        ] {
            assert!(text.contains(want), "{want} in {text}");
        }
    }
}
