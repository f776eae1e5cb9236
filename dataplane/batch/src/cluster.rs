//! A batch worker in a cluster: one pod of the Indexed Job the operator's BatchJob controller
//! runs (worker `$JOB_COMPLETION_INDEX` of the Job's completions). It reads its BatchJob from
//! the API server, follows `spec.stop`, and — the coordinator, worker 0 — writes the run's
//! progress and its end to the BatchJob's status (a merge patch of the fields it owns; the
//! controller owns the rest: the ARN, the times, the conditions).

use std::time::Duration;

use kube::Api;
use kube::api::{Patch, PatchParams};
use mantle_crds::{BatchJob, BatchJobStatus};
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::lifecycle::{ReuseSource, reuse_source};

/// The field manager of what workers write.
pub const MANAGER: &str = "mantle-batch";
/// How often the coordinator writes status (the issue asks for every 30 s at least).
pub const STATUS_EVERY: Duration = Duration::from_secs(10);
/// How often a worker looks at its BatchJob for `spec.stop`.
pub const FOLLOW_EVERY: Duration = Duration::from_secs(5);

/// A BatchJob, and where the job it reuses stands.
pub async fn load(api: &Api<BatchJob>, name: &str) -> Result<(BatchJob, ReuseSource), kube::Error> {
    let job = api.get(name).await?;
    let named = match &job.spec.reuse_from {
        Some(r) => api.get_opt(&r.job_name).await?,
        None => None,
    };
    let source = reuse_source(&job, named.as_ref());
    Ok((job, source))
}

/// The status fields a worker owns, as a merge patch (`eta` and `message` cleared when unset).
pub fn status_patch(status: &BatchJobStatus) -> Value {
    let whole = serde_json::to_value(status).expect("a status serialises");
    let mut patch = serde_json::Map::new();
    for key in ["phase", "records", "tokens", "shards", "progress", "estimatedCost", "endTime", "runId"] {
        if let Some(v) = whole.get(key) {
            patch.insert(key.into(), v.clone());
        }
    }
    patch.insert("eta".into(), whole.get("eta").cloned().unwrap_or(Value::Null));
    patch.insert("message".into(), whole.get("message").cloned().unwrap_or(Value::Null));
    json!({ "status": patch })
}

/// Writes the worker's status fields.
pub async fn write_status(api: &Api<BatchJob>, name: &str, status: &BatchJobStatus) -> Result<(), kube::Error> {
    let params = PatchParams { field_manager: Some(MANAGER.into()), ..Default::default() };
    api.patch_status(name, &params, &Patch::Merge(status_patch(status))).await.map(|_| ())
}

/// Sets `stop` once the BatchJob asks to stop or is gone; transient API errors are waited out.
pub async fn follow_stop(api: Api<BatchJob>, name: String, stop: watch::Sender<bool>) {
    loop {
        tokio::time::sleep(FOLLOW_EVERY).await;
        match api.get_opt(&name).await {
            Ok(Some(job)) if !job.spec.stop => continue,
            Ok(Some(_)) => tracing::info!(job = %name, "asked to stop"),
            Ok(None) => tracing::warn!(job = %name, "the BatchJob is gone: stopping"),
            Err(e) => {
                tracing::warn!(job = %name, error = %e, "reading the BatchJob");
                continue;
            }
        }
        stop.send_replace(true);
        return;
    }
}

#[cfg(test)]
mod tests {
    use mantle_crds::{BatchJobPhase, Condition};

    use super::*;

    #[test]
    fn the_worker_patches_only_its_own_status_fields_and_clears_a_stale_eta() {
        let status = BatchJobStatus {
            phase: Some(BatchJobPhase::InProgress),
            job_arn: Some("arn".into()),
            progress: Some("1/2 (50%)".into()),
            conditions: vec![Condition {
                type_: "Ready".into(),
                status: "True".into(),
                reason: "Running".into(),
                message: String::new(),
                last_transition_time: mantle_crds::Time(k8s_openapi::jiff::Timestamp::now()),
                observed_generation: None,
            }],
            run_id: Some("initial".into()),
            ..Default::default()
        };
        let patch = status_patch(&status);
        let fields = patch["status"].as_object().unwrap();
        assert_eq!(fields["phase"], "InProgress");
        assert_eq!(fields["progress"], "1/2 (50%)");
        assert_eq!(fields["runId"], "initial");
        assert_eq!((&fields["eta"], &fields["message"]), (&Value::Null, &Value::Null));
        for theirs in ["jobArn", "conditions", "submitTime", "jobExpirationTime", "observedGeneration"] {
            assert!(!fields.contains_key(theirs), "{theirs} is the controller's");
        }
    }
}
