//! `mantle-batch run`: runs one BatchJob through a router, resuming from what an earlier run of
//! it committed. The pipeline `mantle dev` runs in-process, as a process of its own: from a
//! manifest file, or — a worker pod of the Indexed Job the operator runs — from the BatchJob
//! object in the API server (`--batch-job NAME`, in the pod's namespace), whose status worker 0 writes.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Parser;
use kube::{Api, Client};
use mantle_batch::lifecycle::{ReuseSource, Tracker};
use mantle_batch::{Job, JobError, Outcome, Progress, RouterClient, Runtime, Stores, Worker, cluster};
use mantle_crds::{BATCH_WORKER_FATAL_EXIT, BatchJob, FoundationModel, Manifest};
use tokio::sync::watch;

#[derive(Parser)]
#[command(name = "mantle-batch", about = "Run a Mantle batch inference job")]
enum Command {
    /// Run a BatchJob to its end.
    Run {
        /// The BatchJob manifest (YAML).
        #[arg(required_unless_present = "batch_job", conflicts_with = "batch_job")]
        job: Option<PathBuf>,
        /// Read the BatchJob from the Kubernetes API instead (NAME in $POD_NAMESPACE, or
        /// NAMESPACE/NAME), follow its `spec.stop` and, as worker 0, write its status.
        #[arg(long, env = "MANTLE_BATCH_JOB")]
        batch_job: Option<String>,
        /// This worker's index among the job's workers (an Indexed Job's completion index).
        #[arg(long, env = "JOB_COMPLETION_INDEX", default_value_t = 0)]
        worker: u32,
        /// How many workers share the job; worker 0 plans, writes the control table and merges.
        #[arg(long, env = "MANTLE_BATCH_WORKERS", default_value_t = 1)]
        workers: u32,
        /// The router's base URL.
        #[arg(long, env = "MANTLE_ROUTER_URL", default_value = "http://127.0.0.1:8080")]
        router: String,
        /// The router's batch credential.
        #[arg(long, env = "MANTLE_BATCH_TOKEN", default_value = "")]
        token: String,
        /// Records in flight at once.
        #[arg(long, env = "MANTLE_BATCH_CONCURRENCY", default_value_t = 8)]
        concurrency: usize,
        /// An S3-compatible endpoint for s3:// URIs.
        #[arg(long, env = "MANTLE_S3_ENDPOINT")]
        s3_endpoint: Option<String>,
        /// The output folder (`<output uri>/<job id>`) of the job `spec.reuseFrom` names (found
        /// by itself with --batch-job).
        #[arg(long)]
        reuse_from: Option<String>,
        /// Serve a bucket from a local directory (NAME=DIR; repeatable).
        #[arg(long = "bucket", value_parser = Stores::parse_bucket)]
        buckets: Vec<(String, PathBuf)>,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,deltalake_core=warn,buoyant_kernel=warn".into()),
        )
        .init();
    let Command::Run { job, batch_job, worker, workers, router, token, concurrency, s3_endpoint, reuse_from, buckets } =
        Command::parse();
    if worker >= workers.max(1) {
        bail!("worker {worker} of {workers}: the index must be below the number of workers");
    }
    let worker = Worker { index: worker, count: workers.max(1) };
    let rt = Runtime {
        stores: Stores { s3_endpoint, buckets: buckets.into_iter().collect(), mapped_only: false },
        router: RouterClient::new(&router, &token),
        concurrency,
        metrics: None,
    };
    let code = match (job, batch_job) {
        (Some(path), _) => from_file(&path, reuse_from, worker, &rt).await?,
        (None, Some(name)) => from_cluster(&name, worker, &rt).await?,
        (None, None) => unreachable!("clap requires one of them"),
    };
    std::process::exit(code)
}

/// Runs a manifest file's job; the exit status.
async fn from_file(path: &PathBuf, reuse_from: Option<String>, worker: Worker, rt: &Runtime) -> anyhow::Result<i32> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let manifests = mantle_crds::parse_manifests(&text, &path.display().to_string())?;
    let Ok([Manifest::BatchJob(object)]) = <[Manifest; 1]>::try_from(manifests) else {
        bail!("{} must hold exactly one BatchJob", path.display());
    };
    let object: BatchJob = object;
    object.validate().map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    if object.spec.reuse_from.is_some() && reuse_from.is_none() {
        bail!("the job reuses another job's outputs: give --reuse-from with that job's output folder");
    }
    let job = Job { id: object.job_id(), spec: object.spec, reuse_from, worker };
    let (progress, watched) = watch::channel(Progress::default());
    let (stop, stopped) = watch::channel(false);
    tokio::spawn(stop_on_signal(stop));
    let result = mantle_batch::run(&job, rt, &progress, stopped.clone()).await;
    report(&job, &result, &watched.borrow());
    // Stopped by a signal: run it again to resume.
    Ok(if *stopped.borrow() && result.is_ok() { 130 } else { exit_code(&result) })
}

/// Runs worker `worker` of a BatchJob in the API server; worker 0 writes the job's status. A
/// worker terminated by its pod's deletion (a preempted node, a drained one) ends with a failing
/// status without writing an end, so the Job runs it again and it resumes.
async fn from_cluster(name: &str, worker: Worker, rt: &Runtime) -> anyhow::Result<i32> {
    let pod_namespace = std::env::var("POD_NAMESPACE").unwrap_or_else(|_| "default".into());
    let (namespace, name) = name.split_once('/').unwrap_or((pod_namespace.as_str(), name));
    let client = Client::try_default().await.context("connecting to the Kubernetes API")?;
    let api: Api<BatchJob> = Api::namespaced(client.clone(), namespace);
    let (object, source) = mantle_batch::cluster::load(&api, name).await.context("reading the BatchJob")?;
    let coordinator = worker.coordinates();
    let status = object.status.clone().unwrap_or_default();
    let pricing = Api::<FoundationModel>::namespaced(client, namespace)
        .list(&Default::default())
        .await
        .ok()
        .and_then(|models| models.items.into_iter().find(|m| m.spec.model_id == object.spec.model_id))
        .and_then(|m| m.spec.pricing);
    let mut tracker = Tracker::new(status.job_expiration_time.as_ref(), pricing);
    let reuse_from = match source {
        ReuseSource::None => None,
        ReuseSource::Ready(folder) => Some(folder),
        // The controller starts no workers before the job it reuses has completed.
        ReuseSource::Wait(message) => bail!("{message}"),
        ReuseSource::Fail(message) => {
            let result = Err(JobError::Invalid(message));
            if coordinator {
                let mut status = status.clone();
                tracker.end(&mut status, &result, &Progress::default());
                cluster::write_status(&api, name, &status).await.context("writing the status")?;
            }
            return Ok(exit_code(&result));
        }
    };
    let job = Job { id: object.job_id(), spec: object.spec.clone(), reuse_from, worker };
    let (progress, watched) = watch::channel(Progress::default());
    let (stop, stopped) = watch::channel(object.spec.stop);
    tokio::spawn(cluster::follow_stop(api.clone(), name.to_string(), stop.clone()));
    let (term, terminated) = watch::channel(false);
    tokio::spawn(stop_on_signal(term));
    let asked = stopped.clone();
    let mut running = std::pin::pin!(mantle_batch::run(&job, rt, &progress, stopped));
    let mut status = status;
    status.run_id = Some(job.run_id().to_string());
    let mut terminated_rx = terminated.clone();
    // Status at once (the job is running), then every STATUS_EVERY.
    let mut ticks = tokio::time::interval(cluster::STATUS_EVERY);
    let result = loop {
        tokio::select! {
            result = &mut running => break result,
            _ = terminated_rx.changed(), if !*terminated.borrow() => { stop.send_replace(true); }
            // A terminated worker writes no more status: it is run again, or the job was stopped
            // and its end is written below.
            _ = ticks.tick(), if coordinator && !*terminated.borrow() => {
                let stopping = *asked.borrow();
                if tracker.tick(&mut status, &watched.borrow(), stopping) {
                    stop.send_replace(true);
                }
                if let Err(e) = cluster::write_status(&api, name, &status).await {
                    tracing::warn!(job = name, error = %e, "writing the status");
                }
            }
        }
    };
    report(&job, &result, &watched.borrow());
    // Terminated without being asked to stop (or unsure: the API did not answer): run again.
    if *terminated.borrow() && !object.spec.stop && !tracker.expired && !api.get(name).await.is_ok_and(|j| j.spec.stop)
    {
        tracing::info!(job = name, "terminated: the Job runs this worker again and it resumes");
        return Ok(143);
    }
    if coordinator {
        tracker.end(&mut status, &result, &watched.borrow());
        cluster::write_status(&api, name, &status).await.context("writing the final status")?;
    }
    Ok(exit_code(&result))
}

/// Stops the run on SIGTERM or Ctrl-C (what a pod's deletion sends).
async fn stop_on_signal(stop: watch::Sender<bool>) {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async { match &mut term { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
    }
    tracing::info!("signalled: stopping after the records in flight");
    stop.send_replace(true);
}

/// 2 when the job cannot go on whoever runs it (the Job fails the index); 1 for what another
/// attempt may get past (the router or the store unreachable for longer than the retries).
fn exit_code(result: &Result<Outcome, JobError>) -> i32 {
    match result {
        Ok(_) => 0,
        Err(e) if e.is_fatal() => BATCH_WORKER_FATAL_EXIT,
        Err(_) => 1,
    }
}

fn report(job: &Job, result: &Result<Outcome, JobError>, p: &Progress) {
    match result {
        Ok(outcome) => println!(
            "{} {}: {} records, {} ok, {} errors, {} skipped; {} input and {} output tokens",
            job.id,
            if *outcome == Outcome::Finished { "finished" } else { "stopped" },
            p.total_records,
            p.success,
            p.error,
            p.skipped,
            p.input_tokens,
            p.output_tokens
        ),
        Err(e) => eprintln!("{} failed: {e}", job.id),
    }
}
