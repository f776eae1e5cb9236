//! A job's progress as BatchJob status (pure): counts, `progress` and `eta` for `kubectl get`,
//! the estimated cost at the model's batch price. Both executors write status through this.

use std::time::Duration;

use mantle_crds::{BatchJobStatus, Pricing, RecordCounts, ShardSummary, TokenCounts};

use crate::job::Progress;

/// Fills `status` from `progress`. `rate` is records per second over the current run (for the
/// ETA); `pricing` the model's prices.
pub fn apply(status: &mut BatchJobStatus, progress: &Progress, rate: Option<f64>, pricing: Option<&Pricing>) {
    let processed = progress.processed();
    // Reused records count as successes (their outputs are there), and apart.
    status.records = RecordCounts {
        total: progress.total_records as i64,
        processed: (progress.success + progress.reused + progress.error) as i64,
        success: (progress.success + progress.reused) as i64,
        error: progress.error as i64,
        reused: progress.reused as i64,
        skipped: progress.skipped as i64,
    };
    status.tokens = TokenCounts { input: progress.input_tokens as i64, output: progress.output_tokens as i64 };
    let pending = progress.shards_total.saturating_sub(progress.shards_done + progress.shards_running);
    status.shards = ShardSummary {
        total: progress.shards_total as i32,
        pending: pending as i32,
        running: progress.shards_running as i32,
        completed: progress.shards_done as i32,
        failed: 0,
    };
    status.progress = progress.planned.then(|| {
        let pct =
            if progress.total_records == 0 { 100.0 } else { processed as f64 * 100.0 / progress.total_records as f64 };
        format!("{processed}/{} ({pct:.0}%)", progress.total_records)
    });
    let left = progress.total_records.saturating_sub(processed);
    status.eta = match rate {
        _ if progress.planned && left == 0 => None,
        Some(r) if r > 0.0 && progress.planned => Some(duration(Duration::from_secs_f64(left as f64 / r))),
        _ => None,
    };
    status.estimated_cost = pricing.map(|p| format!("{:.2} USD", cost(progress, p)));
}

/// What the tokens so far cost at the batch price (on-demand less the batch discount).
pub fn cost(progress: &Progress, p: &Pricing) -> f64 {
    let on_demand = progress.input_tokens as f64 / 1000.0 * p.input_per_1k_tokens
        + progress.output_tokens as f64 / 1000.0 * p.output_per_1k_tokens;
    on_demand * (1.0 - p.batch_discount).clamp(0.0, 1.0)
}

/// `1h20m`, `4m10s`, `12s`.
pub fn duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        _ => format!("{}h{}m", s / 3600, s % 3600 / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_shows_counts_progress_eta_and_batch_cost() {
        let p = Progress {
            total_records: 200,
            success: 40,
            error: 10,
            skipped: 0,
            input_tokens: 100_000,
            output_tokens: 10_000,
            shards_total: 10,
            shards_done: 2,
            shards_running: 3,
            planned: true,
            ..Default::default()
        };
        let pricing = Pricing { input_per_1k_tokens: 0.01, output_per_1k_tokens: 0.1, batch_discount: 0.5 };
        let mut s = BatchJobStatus::default();
        apply(&mut s, &p, Some(2.0), Some(&pricing));
        assert_eq!(s.progress.as_deref(), Some("50/200 (25%)"));
        assert_eq!(s.eta.as_deref(), Some("1m15s"));
        assert_eq!(s.estimated_cost.as_deref(), Some("1.00 USD"));
        assert_eq!((s.shards.pending, s.shards.running, s.shards.completed), (5, 3, 2));
        assert_eq!((s.records.processed, s.records.error), (50, 10));
        // Done: no ETA.
        let done = Progress { success: 200, ..p.clone() };
        apply(&mut s, &done, Some(2.0), None);
        assert_eq!((s.eta, s.estimated_cost), (None, None));
        assert_eq!(duration(Duration::from_secs(4800)), "1h20m");
    }
}
