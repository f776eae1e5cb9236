//! `mantle dev`'s batch jobs: the BatchJobs of the manifests directory and those created through
//! the API (CreateModelInvocationJob), run in-process by the batch pipeline (`mantle_batch`) —
//! the same pipeline a worker pod runs. Each job's object (spec and status) is kept in
//! `$MANTLE_CACHE/dev/batch/<name>.yaml`, so a restarted `mantle dev` lists the jobs and resumes
//! the unfinished ones; their committed shards are in the output store and are not run again.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use mantle_batch::lifecycle::{ReuseSource, Tracker, reuse_source};
use mantle_batch::{Job, Progress, Runtime};
use mantle_crds::{BatchJob, BatchJobPhase, BatchJobStatus, Pricing, Time, batch_job_arn};
use mantle_router::ApiError;
use mantle_router::batch::{BatchJobs, BoxFuture, CLIENT_TOKEN_ANNOTATION, CREATED_BY_API_ANNOTATION, same_job};
use tokio::sync::watch;

/// How often a running job's status is refreshed (and written to disk every few times).
const STATUS_EVERY: Duration = Duration::from_secs(1);

/// The batch jobs of one `mantle dev`.
#[derive(Clone)]
pub struct DevBatch {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for DevBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevBatch").field("state_dir", &self.inner.state_dir).finish()
    }
}

struct Inner {
    state_dir: PathBuf,
    region: String,
    /// Set once the router listens (jobs wait for it).
    runtime: OnceLock<Runtime>,
    jobs: Mutex<BTreeMap<String, Entry>>,
    /// Model prices by modelId, from the manifests.
    pricing: Mutex<BTreeMap<String, Pricing>>,
    /// Manifest problems already reported.
    reported: Mutex<BTreeSet<String>>,
}

struct Entry {
    job: BatchJob,
    stop: watch::Sender<bool>,
    running: bool,
    from_manifest: bool,
}

fn terminal(phase: Option<BatchJobPhase>) -> bool {
    phase.is_some_and(BatchJobPhase::is_terminal)
}

fn now() -> Time {
    Time(mantle_router::batch::Timestamp::now())
}

impl DevBatch {
    /// Loads the jobs created through the API by earlier runs (manifest jobs are loaded when
    /// their file is seen).
    pub fn new(state_dir: PathBuf, region: String) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&state_dir)?;
        let inner = Arc::new(Inner {
            state_dir,
            region,
            runtime: OnceLock::new(),
            jobs: Mutex::new(BTreeMap::new()),
            pricing: Mutex::new(BTreeMap::new()),
            reported: Mutex::new(BTreeSet::new()),
        });
        let mut jobs = inner.jobs.lock().expect("not poisoned");
        for job in inner.stored() {
            let by_api = job.metadata.annotations.as_ref().is_some_and(|a| a.contains_key(CREATED_BY_API_ANNOTATION));
            if by_api && let Some(name) = job.metadata.name.clone() {
                jobs.insert(name, Entry { job, stop: watch::channel(false).0, running: false, from_manifest: false });
            }
        }
        drop(jobs);
        Ok(DevBatch { inner })
    }

    /// Starts running jobs through the router (`runtime`), and resumes the unfinished ones.
    pub fn begin(&self, runtime: Runtime) {
        let _ = self.inner.runtime.set(runtime);
        let names: Vec<String> = self.inner.jobs.lock().expect("not poisoned").keys().cloned().collect();
        for name in names {
            Inner::start(&self.inner, &name);
        }
    }

    /// Follows the manifests directory's BatchJobs (a job per file-named object; a deleted file
    /// stops and forgets its job, as deleting the object does in a cluster) and the models'
    /// prices.
    pub fn sync(&self, manifests: Vec<BatchJob>, pricing: BTreeMap<String, Pricing>) {
        *self.inner.pricing.lock().expect("not poisoned") = pricing;
        let names: BTreeSet<String> = manifests.iter().filter_map(|j| j.metadata.name.clone()).collect();
        let mut to_start = Vec::new();
        {
            let mut jobs = self.inner.jobs.lock().expect("not poisoned");
            let gone: Vec<String> =
                jobs.iter().filter(|(n, e)| e.from_manifest && !names.contains(*n)).map(|(n, _)| n.clone()).collect();
            for name in gone {
                if let Some(entry) = jobs.remove(&name) {
                    entry.stop.send_replace(true);
                    std::fs::remove_file(self.inner.file(&name)).ok();
                    tracing::info!(job = %name, "BatchJob file removed: job stopped and forgotten");
                }
            }
            for mut job in manifests {
                let Some(name) = job.metadata.name.clone() else { continue };
                job.metadata.namespace.get_or_insert_with(|| "default".into());
                match jobs.get(&name) {
                    Some(e) if !e.from_manifest => self.inner.report_once(&name, || {
                        format!("BatchJob {name} in the manifests is ignored: a job of that name was created through the API")
                    }),
                    Some(e) if !same_job(&e.job, &job) => self.inner.report_once(&name, || {
                        format!("BatchJob {name}: a job's spec cannot change; delete its file (and its output) or use a new name")
                    }),
                    Some(e) => {
                        if job.spec.stop && !*e.stop.borrow() {
                            e.stop.send_replace(true);
                        }
                        // A job waiting for the job it reuses tries again.
                        let scheduled = e.job.status.as_ref().and_then(|s| s.phase) == Some(BatchJobPhase::Scheduled);
                        if scheduled && !e.running {
                            to_start.push(name.clone());
                        }
                        // A new rerun id is a new run of the job, once the last one ended.
                        let phase = e.job.status.as_ref().and_then(|s| s.phase);
                        if job.spec.rerun != e.job.spec.rerun && !e.running && !job.spec.stop && terminal(phase) {
                            let e = jobs.get_mut(&name).expect("present");
                            e.job.spec.rerun = job.spec.rerun.clone();
                            let status = e.job.status.get_or_insert_with(Default::default);
                            status.phase = Some(BatchJobPhase::Submitted);
                            status.end_time = None;
                            status.message = None;
                            // A new run has the job's whole timeout from now.
                            let hours = job.spec.timeout_duration_in_hours.max(1) as u64;
                            status.job_expiration_time = Some(Time(now().0 + Duration::from_secs(hours * 3600)));
                            to_start.push(name.clone());
                        }
                    }
                    None => {
                        // A job seen before (this run or an earlier one) keeps its status.
                        let stored = self.inner.load(&name).filter(|s| same_job(s, &job));
                        let mut job = job;
                        job.status = stored.and_then(|s| s.status);
                        let stop = watch::channel(job.spec.stop).0;
                        jobs.insert(name.clone(), Entry { job, stop, running: false, from_manifest: true });
                        to_start.push(name);
                    }
                }
            }
        }
        for name in to_start {
            Inner::start(&self.inner, &name);
        }
    }
}

impl Inner {
    fn file(&self, name: &str) -> PathBuf {
        self.state_dir.join(format!("{name}.yaml"))
    }

    fn stored(&self) -> Vec<BatchJob> {
        let Ok(dir) = std::fs::read_dir(&self.state_dir) else { return Vec::new() };
        let mut jobs = Vec::new();
        for path in dir.filter_map(Result::ok).map(|e| e.path()) {
            if path.extension().and_then(|e| e.to_str()) == Some("yaml") {
                match read(&path) {
                    Some(job) => jobs.push(job),
                    None => tracing::warn!(path = %path.display(), "unreadable batch job state; ignored"),
                }
            }
        }
        jobs
    }

    fn load(&self, name: &str) -> Option<BatchJob> {
        read(&self.file(name))
    }

    /// Writes a job's object (atomically: a temporary file renamed over the old one).
    fn save(&self, job: &BatchJob) {
        let Some(name) = job.metadata.name.as_deref() else { return };
        let path = self.file(name);
        let tmp = path.with_extension("yaml.tmp");
        let written = serde_norway::to_string(job)
            .map_err(std::io::Error::other)
            .and_then(|text| std::fs::write(&tmp, text))
            .and_then(|_| std::fs::rename(&tmp, &path));
        if let Err(e) = written {
            tracing::error!(path = %path.display(), error = %e, "saving batch job state");
        }
    }

    fn report_once(&self, key: &str, message: impl FnOnce() -> String) {
        if self.reported.lock().expect("not poisoned").insert(key.to_string()) {
            tracing::error!("{}", message());
        }
    }

    /// Updates a job's status (and saves it when `save`).
    fn update(&self, name: &str, save: bool, f: impl FnOnce(&mut BatchJobStatus)) {
        let mut jobs = self.jobs.lock().expect("not poisoned");
        let Some(entry) = jobs.get_mut(name) else { return };
        f(entry.job.status.get_or_insert_with(Default::default));
        if save {
            self.save(&entry.job);
        }
    }

    /// Runs a job in the background unless it has ended or runs already.
    fn start(this: &Arc<Inner>, name: &str) {
        let Some(runtime) = this.runtime.get().cloned() else { return };
        let (job, stop) = {
            let mut jobs = this.jobs.lock().expect("not poisoned");
            let Some(entry) = jobs.get_mut(name) else { return };
            let phase = entry.job.status.as_ref().and_then(|s| s.phase);
            if entry.running || terminal(phase) {
                return;
            }
            entry.running = true;
            let id = entry.job.job_id();
            let status = entry.job.status.get_or_insert_with(Default::default);
            status.job_arn.get_or_insert_with(|| batch_job_arn(&this.region, &id));
            if status.submit_time.is_none() {
                let submitted = entry.job.metadata.creation_timestamp.clone().unwrap_or_else(now);
                let expires =
                    submitted.0 + Duration::from_secs(entry.job.spec.timeout_duration_in_hours.max(1) as u64 * 3600);
                status.submit_time = Some(submitted);
                status.job_expiration_time = Some(Time(expires));
            }
            status.phase = Some(if *entry.stop.borrow() { BatchJobPhase::Stopping } else { BatchJobPhase::Validating });
            this.save(&entry.job);
            (entry.job.clone(), entry.stop.subscribe())
        };
        let this = this.clone();
        let name = name.to_string();
        tokio::spawn(async move { this.run(name, job, runtime, stop).await });
    }

    fn stopped_running(&self, name: &str) {
        if let Some(entry) = self.jobs.lock().expect("not poisoned").get_mut(name) {
            entry.running = false;
        }
    }

    /// Where the job's `reuseFrom` stands (see [`reuse_source`]).
    fn reuse_source(&self, object: &BatchJob) -> ReuseSource {
        let jobs = self.jobs.lock().expect("not poisoned");
        let named = object.spec.reuse_from.as_ref().and_then(|r| jobs.get(&r.job_name)).map(|e| &e.job);
        reuse_source(object, named)
    }

    async fn run(self: Arc<Self>, name: String, object: BatchJob, runtime: Runtime, stop: watch::Receiver<bool>) {
        let reuse_from = match self.reuse_source(&object) {
            ReuseSource::None => None,
            ReuseSource::Ready(folder) => Some(folder),
            ReuseSource::Wait(message) => {
                // Started again by `sync` once the other job has ended.
                self.update(&name, true, |s| {
                    s.phase = Some(BatchJobPhase::Scheduled);
                    s.message = Some(message);
                });
                self.stopped_running(&name);
                return;
            }
            ReuseSource::Fail(message) => {
                tracing::error!(job = %name, "{message}");
                self.update(&name, true, |s| {
                    s.phase = Some(BatchJobPhase::Failed);
                    s.message = Some(message);
                    s.end_time = Some(now());
                });
                self.stopped_running(&name);
                return;
            }
        };
        let job = Job { id: object.job_id(), spec: object.spec.clone(), reuse_from, worker: Default::default() };
        self.update(&name, false, |s| s.run_id = Some(job.run_id().to_string()));
        let expires = object.status.as_ref().and_then(|s| s.job_expiration_time.clone());
        let pricing = self.pricing.lock().expect("not poisoned").get(&job.spec.model_id).cloned();
        let mut tracker = Tracker::new(expires.as_ref(), pricing);
        let (progress, watched) = watch::channel(Progress::default());
        let stop_tx = self.jobs.lock().expect("not poisoned").get(&name).map(|e| e.stop.clone());
        tracing::info!(job = %name, id = %job.id, model = %job.spec.model_id, "batch job running");
        let running = runtime.metrics.as_ref().map(|m| m.jobs_running.clone());
        if let Some(g) = &running {
            g.inc();
        }
        let started = Instant::now();
        let run = mantle_batch::run(&job, &runtime, &progress, stop.clone());
        tokio::pin!(run);
        let mut ticks = 0u32;
        let result = loop {
            tokio::select! {
                r = &mut run => break r,
                _ = tokio::time::sleep(STATUS_EVERY) => {
                    ticks += 1;
                    let p = watched.borrow().clone();
                    let stopping = *stop.borrow();
                    self.update(&name, ticks.is_multiple_of(5), |s| {
                        if tracker.tick(s, &p, stopping) && let Some(tx) = &stop_tx {
                            tx.send_replace(true);
                        }
                    });
                }
            }
        };
        let p = watched.borrow().clone();
        self.update(&name, true, |s| tracker.end(s, &result, &p));
        self.stopped_running(&name);
        if let Some(g) = &running {
            g.dec();
        }
        match &result {
            Ok(o) => {
                tracing::info!(job = %name, outcome = ?o, records = p.total_records, errors = p.error, seconds = started.elapsed().as_secs_f64(), "batch job ended")
            }
            Err(e) => tracing::error!(job = %name, error = %e, "batch job failed"),
        }
    }
}

fn read(path: &Path) -> Option<BatchJob> {
    serde_norway::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

impl BatchJobs for DevBatch {
    fn create(&self, mut job: BatchJob) -> BoxFuture<'_, Result<BatchJob, ApiError>> {
        Box::pin(async move {
            let name = job.metadata.name.clone().unwrap_or_default();
            {
                let mut jobs = self.inner.jobs.lock().expect("not poisoned");
                if let Some(existing) = jobs.get(&name) {
                    let token = |j: &BatchJob| {
                        j.metadata.annotations.as_ref().and_then(|a| a.get(CLIENT_TOKEN_ANNOTATION).cloned())
                    };
                    if token(&existing.job).is_some()
                        && token(&existing.job) == token(&job)
                        && same_job(&existing.job, &job)
                    {
                        return Ok(existing.job.clone());
                    }
                    return Err(ApiError::Conflict(format!("A model invocation job named {name} exists already.")));
                }
                job.metadata.creation_timestamp = Some(now());
                job.status = Some(BatchJobStatus { phase: Some(BatchJobPhase::Submitted), ..Default::default() });
                self.inner.save(&job);
                jobs.insert(
                    name.clone(),
                    Entry { job: job.clone(), stop: watch::channel(false).0, running: false, from_manifest: false },
                );
            }
            Inner::start(&self.inner, &name);
            let jobs = self.inner.jobs.lock().expect("not poisoned");
            Ok(jobs.get(&name).map(|e| e.job.clone()).unwrap_or(job))
        })
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<BatchJob>, ApiError>> {
        Box::pin(
            async move { Ok(self.inner.jobs.lock().expect("not poisoned").values().map(|e| e.job.clone()).collect()) },
        )
    }

    fn stop(&self, name: &str) -> BoxFuture<'_, Result<(), ApiError>> {
        let name = name.to_string();
        Box::pin(async move {
            let mut jobs = self.inner.jobs.lock().expect("not poisoned");
            let entry = jobs.get_mut(&name).ok_or_else(|| ApiError::NotFound(format!("No job {name}.")))?;
            entry.stop.send_replace(true);
            let status = entry.job.status.get_or_insert_with(Default::default);
            if entry.running {
                status.phase = Some(BatchJobPhase::Stopping);
            } else if !terminal(status.phase) {
                status.phase = Some(BatchJobPhase::Stopped);
                status.end_time = Some(now());
            }
            self.inner.save(&entry.job);
            Ok(())
        })
    }
}
