//! Reconciling a BatchJob: the run it asks for becomes an Indexed Job of `mantle-batch`
//! workers ([`crate::batch`]), once the job it reuses has completed. The controller owns the
//! status fields of the job's lifetime (ARN, submit and expiration times, the phases before the
//! workers start, the end when the workers could not write it); worker 0 owns the progress and
//! the end of a run. Both write merge patches of their own fields.
//!
//! - A new rerun id on an ended job starts a new run (a new Job, `<job>-<run>`).
//! - `spec.stop` suspends the Job: the workers get SIGTERM, keep what committed, and worker 0
//!   writes Stopped; a Job suspended before any worker ran ends the job Stopped here.
//! - A Job that failed or passed its deadline without the workers writing an end ends the job
//!   Failed or Expired ([`crate::batch::job_ended`]).

use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, ResourceExt};
use mantle_crds::{BatchJob, BatchJobPhase, ReuseSource, Time, batch_job_arn, reuse_source};
use serde_json::{Value, json};

use super::{Context, Error, MANAGER, apply, counted, now};
use crate::batch::{job_ended, job_name, render_batch_job, run_id, workers};
use crate::render::Object;

/// How often a job is looked at while it waits or runs (its workers report on their own).
const WATCH_EVERY: Duration = Duration::from_secs(30);

/// Reconciles one BatchJob.
pub async fn reconcile_batch_job(job: std::sync::Arc<BatchJob>, ctx: std::sync::Arc<Context>) -> Result<Action, Error> {
    counted(&*job, &ctx, reconcile(&job, &ctx)).await
}

async fn reconcile(job: &BatchJob, ctx: &Context) -> Result<Action, Error> {
    let name = job.name_any();
    let namespace = job.namespace().ok_or_else(|| Error::NoNamespace(name.clone()))?;
    // Decisions need the worker Jobs and the other BatchJobs as they are: a store not listed yet
    // would say "no workers" after a restart.
    super::listed(&ctx.jobs).await?;
    super::listed(&ctx.batch_jobs).await?;
    let api: Api<BatchJob> = Api::namespaced(ctx.client.clone(), &namespace);
    let status = job.status.clone().unwrap_or_default();
    let phase = status.phase;
    let run = run_id(job).to_string();
    let ended = phase.is_some_and(BatchJobPhase::is_terminal);
    // The fields of the job's lifetime, once.
    let mut patch = serde_json::Map::new();
    if status.job_arn.is_none() {
        let submitted = job.metadata.creation_timestamp.clone().unwrap_or_else(now);
        let hours = job.spec.timeout_duration_in_hours.max(1) as u64;
        let expires = Time(submitted.0 + Duration::from_secs(hours * 3600));
        patch.insert("jobArn".into(), json!(batch_job_arn(&ctx.batch.region, &job.job_id())));
        patch.insert("submitTime".into(), json!(submitted));
        patch.insert("jobExpirationTime".into(), json!(expires));
    }
    if status.observed_generation != job.metadata.generation {
        patch.insert("observedGeneration".into(), json!(job.metadata.generation));
    }
    if let Err(invalid) = job.validate() {
        if phase != Some(BatchJobPhase::Failed) {
            end(&mut patch, BatchJobPhase::Failed, &format!("invalid spec: {invalid}"), &run);
            write(&api, &name, patch).await?;
            ctx.event(job, EventType::Warning, "InvalidSpec", invalid.to_string()).await;
        }
        return Ok(Action::await_change());
    }
    let worker_job = ctx
        .jobs
        .state()
        .into_iter()
        .find(|j| j.namespace().as_deref() == Some(namespace.as_str()) && j.name_any() == job_name(job));
    if ended && status.run_id.as_deref() == Some(run.as_str()) {
        // The run ended; a new `spec.rerun.id` starts the next one. Workers still running (the
        // coordinator ended the job, say at its expiry) are stopped.
        if let Some(j) = &worker_job
            && j.status.as_ref().and_then(|s| s.active).unwrap_or(0) > 0
            && !j.spec.as_ref().and_then(|s| s.suspend).unwrap_or(false)
        {
            suspend(ctx, &namespace, j).await?;
        }
        if !patch.is_empty() {
            write(&api, &name, patch).await?;
        }
        return Ok(Action::await_change());
    }
    if !ended && status.run_id.as_ref().is_some_and(|r| *r != run) {
        // A new rerun id while a run goes on: it starts once this run has ended.
        if !patch.is_empty() {
            write(&api, &name, patch).await?;
        }
        return Ok(Action::requeue(WATCH_EVERY));
    }
    if ended {
        if job.spec.stop {
            // A stopped job's rerun waits until `stop` is cleared.
            return Ok(Action::await_change());
        }
        tracing::info!(job = %name, run = %run, "a new run");
        for key in ["endTime", "message", "eta"] {
            patch.insert(key.into(), Value::Null);
        }
        patch.insert("phase".into(), json!(BatchJobPhase::Submitted));
        // A new run has the job's whole timeout from now.
        let hours = job.spec.timeout_duration_in_hours.max(1) as u64;
        patch.insert("jobExpirationTime".into(), json!(Time(now().0 + Duration::from_secs(hours * 3600))));
        ctx.event(job, EventType::Normal, "Rerun", format!("run {run} starts")).await;
    }
    let Some(worker_job) = worker_job else {
        if job.spec.stop {
            end(&mut patch, BatchJobPhase::Stopped, "stopped before it started", &run);
            write(&api, &name, patch).await?;
            return Ok(Action::await_change());
        }
        let named = job.spec.reuse_from.as_ref().and_then(|r| {
            ctx.batch_jobs
                .state()
                .into_iter()
                .find(|j| j.namespace().as_deref() == Some(namespace.as_str()) && j.name_any() == r.job_name)
        });
        match reuse_source(job, named.as_deref()) {
            ReuseSource::Wait(message) => {
                patch.insert("phase".into(), json!(BatchJobPhase::Scheduled));
                patch.insert("message".into(), json!(message));
                write(&api, &name, patch).await?;
                return Ok(Action::requeue(WATCH_EVERY));
            }
            ReuseSource::Fail(message) => {
                end(&mut patch, BatchJobPhase::Failed, &message, &run);
                write(&api, &name, patch).await?;
                ctx.event(job, EventType::Warning, "ReuseFailed", message).await;
                return Ok(Action::await_change());
            }
            ReuseSource::None | ReuseSource::Ready(_) => {}
        }
        let (_, _, plan) = ctx.plan(&namespace).await?;
        let count = workers(job, &plan, &ctx.batch);
        let rendered = render_batch_job(job, count, &ctx.batch);
        apply(&ctx.client, &namespace, &Object::Job(Box::new(rendered))).await?;
        patch.insert("phase".into(), json!(BatchJobPhase::Scheduled));
        patch.insert("message".into(), Value::Null);
        patch.insert("runId".into(), json!(run));
        write(&api, &name, patch).await?;
        let note = format!("run {run}: {count} workers (Job {})", job_name(job));
        ctx.event(job, EventType::Normal, "WorkersStarted", note).await;
        return Ok(Action::requeue(WATCH_EVERY));
    };
    let job_status = worker_job.status.clone().unwrap_or_default();
    let suspended = worker_job.spec.as_ref().and_then(|s| s.suspend).unwrap_or(false);
    if let Some((phase, message)) = job_ended(job, &worker_job) {
        // The coordinator may have written the end since the cache saw the job.
        let fresh = api.get(&name).await.map_err(|source| Error::Status { name: name.clone(), source })?;
        if fresh.status.as_ref().and_then(|s| s.phase).is_some_and(BatchJobPhase::is_terminal) {
            return Ok(Action::await_change());
        }
        end(&mut patch, phase, &message, &run);
        write(&api, &name, patch).await?;
        let type_ = if phase == BatchJobPhase::Failed { EventType::Warning } else { EventType::Normal };
        ctx.event(job, type_, &format!("{phase:?}"), message).await;
        return Ok(Action::await_change());
    }
    if job.spec.stop && !suspended {
        // The workers get SIGTERM; each keeps what it committed, worker 0 writes Stopped.
        suspend(ctx, &namespace, &worker_job).await?;
        if !ended {
            patch.insert("phase".into(), json!(BatchJobPhase::Stopping));
        }
        write(&api, &name, patch).await?;
        ctx.event(job, EventType::Normal, "Stopping", "the workers were asked to stop".into()).await;
        return Ok(Action::requeue(Duration::from_secs(5)));
    }
    // Suspended, and no worker left (running or shutting down) that could write the end.
    let gone = job_status.active.unwrap_or(0) == 0 && job_status.terminating.unwrap_or(0) == 0;
    if job.spec.stop && suspended && gone && !ended {
        // Suspended with no worker left that could write the end.
        let phase_now = job.status.as_ref().and_then(|s| s.phase);
        if !phase_now.is_some_and(BatchJobPhase::is_terminal) {
            end(&mut patch, BatchJobPhase::Stopped, "stopped; the outputs of the shards that finished are kept", &run);
            write(&api, &name, patch).await?;
            return Ok(Action::await_change());
        }
    }
    if !patch.is_empty() {
        write(&api, &name, patch).await?;
    }
    Ok(Action::requeue(WATCH_EVERY))
}

/// Suspends a worker Job: its pods get SIGTERM.
async fn suspend(ctx: &Context, namespace: &str, worker_job: &Job) -> Result<(), Error> {
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), namespace);
    let body = json!({"spec": {"suspend": true}});
    jobs.patch(&worker_job.name_any(), &PatchParams::default(), &Patch::Merge(&body))
        .await
        .map(|_| ())
        .map_err(|source| Error::Apply { kind: "Job", name: worker_job.name_any(), source })
}

fn end(patch: &mut serde_json::Map<String, Value>, phase: BatchJobPhase, message: &str, run: &str) {
    patch.insert("phase".into(), json!(phase));
    patch.insert("message".into(), json!(message));
    patch.insert("endTime".into(), json!(now()));
    patch.insert("eta".into(), Value::Null);
    patch.insert("runId".into(), json!(run));
}

/// A merge patch of the controller's status fields.
async fn write(api: &Api<BatchJob>, name: &str, fields: serde_json::Map<String, Value>) -> Result<(), Error> {
    let params = PatchParams { field_manager: Some(MANAGER.into()), ..Default::default() };
    api.patch_status(name, &params, &Patch::Merge(json!({ "status": fields })))
        .await
        .map(|_| ())
        .map_err(|source| Error::Status { name: name.into(), source })
}
