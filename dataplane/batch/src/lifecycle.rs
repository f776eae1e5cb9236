//! A job's lifecycle decisions, the same for every executor (`mantle dev`'s in-process runner,
//! and the cluster's BatchJob controller and coordinating worker): whether the job it reuses is
//! ready, what status says while a run goes on ([`Tracker`]), and which phase and message a run
//! ends in.

use std::time::Instant;

use k8s_openapi::jiff::Timestamp;
use mantle_crds::{BatchJobPhase, BatchJobStatus, Pricing, Time};
pub use mantle_crds::{ReuseSource, reuse_source};

use crate::job::{JobError, Outcome, Progress};

/// What status says while a run goes on: counts, rate and ETA, the phase (Validating until the
/// shards are planned, then InProgress, Stopping once asked to stop); and when the job is past
/// its expiration time, that it must stop (it then ends Expired).
pub struct Tracker {
    /// Records processed when a tick first saw the run planned, and when (a resumed run's rate
    /// counts its own records only).
    base: Option<(u64, Instant)>,
    expires: Option<Timestamp>,
    pricing: Option<Pricing>,
    /// Whether the run went past its expiration time.
    pub expired: bool,
}

impl Tracker {
    pub fn new(expires: Option<&Time>, pricing: Option<Pricing>) -> Self {
        Tracker { base: None, expires: expires.map(|t| t.0), pricing, expired: false }
    }

    /// Updates `status` from `progress`. True the first time the job is past its expiration
    /// time: the caller stops the run.
    pub fn tick(&mut self, status: &mut BatchJobStatus, progress: &Progress, stopping: bool) -> bool {
        self.tick_at(status, progress, stopping, Timestamp::now())
    }

    fn tick_at(&mut self, status: &mut BatchJobStatus, p: &Progress, stopping: bool, now: Timestamp) -> bool {
        let rate = match self.base {
            Some((base, since)) => p.processed().saturating_sub(base) as f64 / since.elapsed().as_secs_f64().max(1e-3),
            None => {
                if p.planned {
                    self.base = Some((p.processed(), Instant::now()));
                }
                0.0
            }
        };
        crate::status::apply(status, p, (rate > 0.0).then_some(rate), self.pricing.as_ref());
        status.phase = Some(if stopping || self.expired {
            BatchJobPhase::Stopping
        } else if p.planned {
            BatchJobPhase::InProgress
        } else {
            BatchJobPhase::Validating
        });
        let expires_now = !self.expired && self.expires.is_some_and(|e| now > e);
        self.expired |= expires_now;
        expires_now
    }

    /// The status a run ends with.
    pub fn end(&self, status: &mut BatchJobStatus, result: &Result<Outcome, JobError>, progress: &Progress) {
        crate::status::apply(status, progress, None, self.pricing.as_ref());
        status.end_time = Some(Time(Timestamp::now()));
        status.eta = None;
        let (phase, message) = ended(result, progress, self.expired);
        status.phase = Some(phase);
        status.message = message;
    }
}

/// The phase a run ends in, and what status says about it.
pub fn ended(
    result: &Result<Outcome, JobError>,
    progress: &Progress,
    expired: bool,
) -> (BatchJobPhase, Option<String>) {
    match result {
        Ok(Outcome::Finished) if progress.error > 0 => (
            BatchJobPhase::PartiallyCompleted,
            Some(format!(
                "{} of {} records failed; see the error records in the output",
                progress.error, progress.total_records
            )),
        ),
        Ok(Outcome::Finished) => (BatchJobPhase::Completed, None),
        Ok(Outcome::Stopped) if expired => (
            BatchJobPhase::Expired,
            Some("the job ran past its timeoutDurationInHours; committed outputs are kept".into()),
        ),
        Ok(Outcome::Stopped) => {
            (BatchJobPhase::Stopped, Some("stopped; the outputs of the shards that finished are kept".into()))
        }
        Err(e) => (BatchJobPhase::Failed, Some(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use mantle_crds::{BatchJob, ReuseFrom};

    use super::*;

    fn job(name: &str, reuse: Option<&str>, phase: Option<BatchJobPhase>) -> BatchJob {
        let mut j: BatchJob = serde_json::from_value(serde_json::json!({
            "apiVersion": "mantle.dev/v1alpha1", "kind": "BatchJob", "metadata": {"name": name},
            "spec": {"modelId": "m", "input": {"uri": "s3://b/in/"}, "output": {"uri": "s3://b/out/"}}
        }))
        .unwrap();
        j.spec.reuse_from = reuse.map(|n| ReuseFrom { job_name: n.into() });
        j.status = phase.map(|p| BatchJobStatus { phase: Some(p), ..Default::default() });
        j
    }

    #[test]
    fn a_job_waits_for_the_job_it_reuses_and_fails_without_one() {
        let new = job("m2", Some("m1"), None);
        assert_eq!(reuse_source(&job("x", None, None), None), ReuseSource::None);
        assert!(matches!(reuse_source(&new, None), ReuseSource::Fail(m) if m.contains("does not exist")));
        let running = job("m1", None, Some(BatchJobPhase::InProgress));
        assert!(matches!(reuse_source(&new, Some(&running)), ReuseSource::Wait(_)));
        assert!(matches!(reuse_source(&new, Some(&job("m1", None, None))), ReuseSource::Wait(_)));
        let failed = job("m1", None, Some(BatchJobPhase::Failed));
        assert!(matches!(reuse_source(&new, Some(&failed)), ReuseSource::Fail(m) if m.contains("without completing")));
        let done = job("m1", None, Some(BatchJobPhase::PartiallyCompleted));
        let id = done.job_id();
        assert_eq!(reuse_source(&new, Some(&done)), ReuseSource::Ready(format!("s3://b/out/{id}")));
    }

    #[test]
    fn a_run_is_validating_then_in_progress_and_stops_once_past_its_expiry() {
        let expires = Timestamp::now();
        let mut t = Tracker::new(Some(&Time(expires)), None);
        let mut s = BatchJobStatus::default();
        let planning = Progress::default();
        assert!(!t.tick_at(&mut s, &planning, false, expires));
        assert_eq!(s.phase, Some(BatchJobPhase::Validating));
        let running = Progress { planned: true, total_records: 10, success: 4, ..Default::default() };
        assert!(!t.tick_at(&mut s, &running, false, expires));
        assert_eq!(s.phase, Some(BatchJobPhase::InProgress));
        assert_eq!(s.progress.as_deref(), Some("4/10 (40%)"));
        let later = expires + std::time::Duration::from_secs(1);
        assert!(t.tick_at(&mut s, &running, false, later), "past the expiry: stop the run");
        assert!(!t.tick_at(&mut s, &running, false, later), "said once");
        assert_eq!(s.phase, Some(BatchJobPhase::Stopping));
        t.end(&mut s, &Ok(Outcome::Stopped), &running);
        assert_eq!(s.phase, Some(BatchJobPhase::Expired));
        assert!(s.end_time.is_some() && s.eta.is_none());
    }

    #[test]
    fn a_run_ends_in_the_phase_its_outcome_and_errors_say() {
        let clean = Progress { total_records: 10, success: 10, ..Default::default() };
        let errors = Progress { total_records: 10, success: 8, error: 2, ..Default::default() };
        assert_eq!(ended(&Ok(Outcome::Finished), &clean, false).0, BatchJobPhase::Completed);
        let (phase, message) = ended(&Ok(Outcome::Finished), &errors, false);
        assert_eq!(phase, BatchJobPhase::PartiallyCompleted);
        assert!(message.unwrap().starts_with("2 of 10 records failed"));
        assert_eq!(ended(&Ok(Outcome::Stopped), &clean, true).0, BatchJobPhase::Expired);
        assert_eq!(ended(&Ok(Outcome::Stopped), &clean, false).0, BatchJobPhase::Stopped);
        let failed = ended(&Err(JobError::NoInput("s3://b/in/".into())), &clean, false);
        assert_eq!(failed, (BatchJobPhase::Failed, Some("no .jsonl input at s3://b/in/".into())));
    }
}
