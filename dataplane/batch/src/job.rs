//! Running one job: plan the shards (once; the plan is stored), run the shards not yet
//! committed, merge the committed parts into Bedrock's output files.
//!
//! Layout under `<output>/<jobId>/`:
//! - `<input file>.out` and `manifest.json.out` — what users read (Bedrock's names);
//! - `_mantle/plan.json` — the shards; `_mantle/shards/<id>.jsonl` — a shard's output lines,
//!   `_mantle/shards/<id>.json` — its commit record, written after the lines. A shard without a
//!   commit record is run again from its start and its lines overwritten, so every record is in
//!   the output exactly once however often a worker or the process is killed. Paths starting
//!   with `_` are hidden from Spark's readers, so `spark.read.json(prefix)` sees outputs only.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use mantle_crds::{BatchJobSpec, InvocationType, OverLimitAction};
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutPayload, WriteMultipart};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;
use tokio::sync::{Semaphore, watch};

use crate::client::{CallError, RouterClient};
use crate::control::{self, ControlTable};
use crate::metrics::BatchMetrics;
use crate::plan::{Cutter, Seen, Shard, TokenEstimate};
use crate::record::{self, BadLine, PartitionBy};
use crate::reuse::{self, IndexEntry};
use crate::schema::OutputSchema;
use crate::store::{Location, StoreError, Stores};

/// Why a job failed as a whole (a bad record never fails a job).
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("{0}")]
    Invalid(String),
    #[error("no .jsonl input at {0}")]
    NoInput(String),
    #[error("model {0} is not served here")]
    UnknownModel(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot read the input {uri}: {source}")]
    Read { uri: String, source: object_store::Error },
    #[error("cannot write the output {uri} (retried): {source}")]
    Write { uri: String, source: object_store::Error },
    #[error("the router cannot be used: {0}")]
    Router(String),
    #[error("the control table could not be written: {0}")]
    Control(String),
    #[error("worker {worker} failed: {error}")]
    Worker { worker: u32, error: String },
}

impl JobError {
    /// Whether the job cannot go on whoever runs it (bad input, an unknown model, another
    /// worker's such failure); other errors (the router or the store unreachable for longer
    /// than the retries) may pass on another attempt.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            JobError::Invalid(_) | JobError::NoInput(_) | JobError::UnknownModel(_) | JobError::Worker { .. }
        )
    }
}

/// Counts a job reports while it runs, and at its end.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Progress {
    pub total_records: u64,
    pub success: u64,
    pub error: u64,
    pub skipped: u64,
    pub reused: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub shards_total: u64,
    pub shards_done: u64,
    pub shards_running: u64,
    /// True once the shards are planned (`total_records` is then final).
    pub planned: bool,
    /// Records finished in shards not committed yet (this worker's): progress between commits.
    #[serde(default)]
    pub partial: u64,
}

impl Progress {
    /// Records done: those of committed shards, and those finished in running ones.
    pub fn processed(&self) -> u64 {
        self.success + self.error + self.skipped + self.reused + self.partial
    }

    fn add(&mut self, c: &ShardCommit) {
        self.reused += c.reused;
        self.success += c.success;
        self.error += c.error;
        self.skipped += c.skipped;
        self.input_tokens += c.input_tokens;
        self.output_tokens += c.output_tokens;
        self.shards_done += 1;
    }
}

/// How a job ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Every shard committed.
    Finished,
    /// Asked to stop: the committed shards' outputs are written, the rest not run.
    Stopped,
}

/// What runs jobs: where data lives, the router, how much at once.
#[derive(Clone)]
pub struct Runtime {
    pub stores: Stores,
    pub router: RouterClient,
    /// Records in flight at once, over all shards.
    pub concurrency: usize,
    pub metrics: Option<BatchMetrics>,
}

/// A job: its id (the last segment of its ARN, the output folder's name) and what to do.
#[derive(Clone, Debug)]
pub struct Job {
    pub id: String,
    pub spec: BatchJobSpec,
    /// The output folder (`<output uri>/<id>`) of the job named by `reuseFrom`.
    pub reuse_from: Option<String>,
    /// Which of the job's workers runs this (one, in-process, under `mantle dev`; the pods of an
    /// Indexed Job in a cluster).
    pub worker: Worker,
}

/// Worker `index` of `count` runs the shards whose id is `index` modulo `count` (the shards are
/// cut to even token loads, so this spreads the work evenly). Worker 0 coordinates: it plans
/// (the others wait for the stored plan), appends every worker's shards to the control table as
/// their commits appear, and merges the outputs once all shards are committed. The workers share
/// nothing but the output folder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Worker {
    pub index: u32,
    pub count: u32,
}

impl Default for Worker {
    fn default() -> Self {
        Worker { index: 0, count: 1 }
    }
}

impl Worker {
    pub fn coordinates(&self) -> bool {
        self.index == 0
    }

    pub fn owns(&self, shard: u32) -> bool {
        shard % self.count.max(1) == self.index
    }
}

/// What a worker that failed leaves for the coordinator (`_mantle/failed/<run>/<worker>.json`):
/// the error, and the shards it could not run.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct WorkerFailure {
    worker: u32,
    error: String,
    #[serde(default)]
    shards: Vec<u32>,
}

impl Job {
    /// The run this is: `spec.rerun.id`, or `initial`.
    pub fn run_id(&self) -> &str {
        self.spec.rerun.as_ref().map_or("initial", |r| r.id.as_str())
    }
}

/// A shard's commit record.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ShardCommit {
    shard: u32,
    /// The run that wrote the shard's lines.
    #[serde(default)]
    run: String,
    file: String,
    records: u64,
    success: u64,
    error: u64,
    skipped: u64,
    /// Lines copied from `reuseFrom`'s outputs.
    #[serde(default)]
    reused: u64,
    input_tokens: u64,
    output_tokens: u64,
    seconds: f64,
    /// When it started and committed (microseconds since the epoch), and its attempts so far.
    #[serde(default)]
    started_us: i64,
    #[serde(default)]
    finished_us: i64,
    #[serde(default)]
    attempts: u32,
    /// The partition all its records share, if they do.
    #[serde(default)]
    partition: Option<String>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoredPlan {
    pub version: u32,
    pub estimate: TokenEstimate,
    pub total_records: u64,
    /// Input files (relative to the input prefix) in order.
    pub files: Vec<String>,
    pub shards: Vec<Shard>,
}

pub(crate) fn shard_name(id: u32) -> String {
    format!("{id:06}")
}

/// Writes with retries: an unwritable output is tried again with backoff before the job fails.
pub(crate) async fn put(loc: &Location, path: &Path, data: Bytes) -> Result<(), JobError> {
    let mut delay = Duration::from_millis(200);
    let mut attempt = 0;
    loop {
        match loc.store.put(path, PutPayload::from(data.clone())).await {
            Ok(_) => return Ok(()),
            Err(source) if attempt >= 5 => {
                return Err(JobError::Write { uri: format!("{}/{}", loc.uri, loc.relative(path)), source });
            }
            Err(e) => {
                tracing::warn!(path = %path, error = %e, "output write failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(10));
                attempt += 1;
            }
        }
    }
}

async fn get_json<T: for<'de> Deserialize<'de>>(loc: &Location, path: &Path) -> Result<Option<T>, JobError> {
    match loc.store.get(path).await {
        Ok(got) => {
            let bytes = got.bytes().await.map_err(|source| JobError::Read { uri: path.to_string(), source })?;
            Ok(serde_json::from_slice(&bytes).ok())
        }
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(source) => Err(JobError::Read { uri: path.to_string(), source }),
    }
}

/// Runs a job to its end (or until `stop` turns true), reporting through `progress`. A worker
/// that fails, one of several, leaves its error for the coordinator (and for workers still
/// waiting for the plan) before returning it.
pub async fn run(
    job: &Job,
    rt: &Runtime,
    progress: &watch::Sender<Progress>,
    stop: watch::Receiver<bool>,
) -> Result<Outcome, JobError> {
    let out = rt.stores.open(&job.spec.output.uri).map(|o| o.sub(&job.id));
    let marker = |out: &Location| out.child(&format!("_mantle/failed/{}/{}.json", job.run_id(), job.worker.index));
    // A failure this worker left in an earlier attempt is not its failure now.
    if job.worker.count > 1
        && let Ok(out) = &out
        && let Err(e) = out.store.delete(&marker(out)).await
        && !matches!(e, object_store::Error::NotFound { .. })
    {
        tracing::warn!(job = %job.id, error = %e, "could not clear this worker's earlier failure");
    }
    let mut failed_shards = Vec::new();
    let result = run_worker(job, rt, progress, stop, &mut failed_shards).await;
    // Only a failure no attempt gets past is left for the others (the Job runs this worker
    // again after any other).
    if let Err(e) = &result
        && e.is_fatal()
        && job.worker.count > 1
        && let Ok(out) = &out
    {
        let failure = WorkerFailure { worker: job.worker.index, error: e.to_string(), shards: failed_shards };
        if let Err(e) = put(out, &marker(out), serde_json::to_vec(&failure).expect("serialises").into()).await {
            tracing::error!(job = %job.id, error = %e, "could not leave this worker's failure for the others");
        }
    }
    result
}

async fn run_worker(
    job: &Job,
    rt: &Runtime,
    progress: &watch::Sender<Progress>,
    mut stop: watch::Receiver<bool>,
    failed_shards: &mut Vec<u32>,
) -> Result<Outcome, JobError> {
    let schema = job.spec.output_schema.as_ref().map(OutputSchema::new).transpose().map_err(JobError::Invalid)?;
    let input = rt.stores.open(&job.spec.input.uri)?;
    let out = rt.stores.open(&job.spec.output.uri)?.sub(&job.id);
    match rt.router.model_exists(&job.spec.model_id).await {
        Ok(true) => {}
        Ok(false) => return Err(JobError::UnknownModel(job.spec.model_id.clone())),
        Err(e) => return Err(JobError::Router(e.to_string())),
    }
    let plan_path = out.child("_mantle/plan.json");
    let plan = match get_json::<StoredPlan>(&out, &plan_path).await? {
        Some(plan) => plan,
        None if job.worker.coordinates() => {
            let plan = make_plan(job, rt, &input, progress).await?;
            put(&out, &plan_path, serde_json::to_vec(&plan).expect("the plan serialises").into()).await?;
            plan
        }
        None => match wait_for_plan(job, &out, &plan_path, &mut stop).await? {
            Some(plan) => plan,
            None => return Ok(Outcome::Stopped),
        },
    };
    // What is committed already (a resumed job, or the runs before a rerun).
    let mut done = BTreeMap::new();
    for shard in &plan.shards {
        if let Some(commit) = get_json::<ShardCommit>(&out, &commit_path(&out, shard.id)).await? {
            done.insert(shard.id, commit);
        }
    }
    // A rerun takes up the committed shards of earlier runs that hold records it selects; until
    // it commits them again, their earlier lines stand.
    let mut own = BTreeMap::new();
    if let Some(rerun) = &job.spec.rerun {
        for (id, commit) in &done {
            if commit.run == rerun.id {
                continue;
            }
            let index = reuse::read_index(&out, *id).await?.unwrap_or_default();
            if index.iter().any(|e| reuse::selected(rerun, e)) {
                own.insert(*id, index);
            }
        }
        tracing::info!(job = %job.id, run = %rerun.id, shards = own.len(), "rerun");
    }
    let previous = match &job.reuse_from {
        Some(uri) => Some(reuse::Previous::load(rt.stores.open(uri)?).await?),
        None => None,
    };
    progress.send_modify(|p| {
        *p = Progress {
            total_records: plan.total_records,
            shards_total: plan.shards.len() as u64,
            planned: true,
            ..Default::default()
        };
        for c in done.values().filter(|c| !own.contains_key(&c.shard)) {
            p.add(c);
        }
    });
    // Every worker's shards still to run in this run, and this worker's share of them.
    let all_todo: Vec<&Shard> =
        plan.shards.iter().filter(|s| !done.contains_key(&s.id) || own.contains_key(&s.id)).collect();
    let todo: Vec<Shard> = all_todo.iter().filter(|s| job.worker.owns(s.id)).map(|s| (*s).clone()).collect();
    let mut others: BTreeSet<u32> = all_todo.iter().map(|s| s.id).filter(|id| !job.worker.owns(*id)).collect();
    tracing::info!(job = %job.id, worker = job.worker.index, workers = job.worker.count, shards = plan.shards.len(), todo = todo.len(), records = plan.total_records, "running shards");
    let slots = Arc::new(Semaphore::new(rt.concurrency.max(1)));
    let parallel = rt.concurrency.clamp(1, 4);
    // The control table (the coordinator's), and the rows it holds already (a resumed job wrote
    // some).
    let mut control =
        if job.worker.coordinates() { Control::open(job, rt, &done, &plan).await } else { Control::none() };
    let shards = todo.into_iter().map(|shard| {
        let (input, out, slots, stop) = (input.clone(), out.clone(), slots.clone(), stop.clone());
        let sources =
            Sources { schema: schema.as_ref(), own: own.get(&shard.id).cloned(), previous: previous.as_ref() };
        async move {
            if *stop.borrow() {
                return (shard, Ok(None));
            }
            progress.send_modify(|p| p.shards_running += 1);
            let finished = AtomicU64::new(0);
            let live = Live { progress, finished: &finished };
            let result = run_shard(job, rt, &input, &out, &shard, &sources, &slots, stop, &live).await;
            // The shard's finished records become its commit's counts in one change.
            progress.send_modify(|p| {
                p.shards_running -= 1;
                p.partial -= finished.load(AtomicOrdering::Relaxed);
                if let Ok(Some(c)) = &result {
                    p.add(c);
                }
            });
            (shard, result)
        }
    });
    let mut results = futures::stream::iter(shards).buffer_unordered(parallel);
    let mut flush = tokio::time::interval(CONTROL_EVERY);
    flush.tick().await;
    let mut failure = None;
    loop {
        tokio::select! {
            next = results.next() => match next {
                None => break,
                Some((shard, Ok(Some(c)))) => {
                    control.committed(job, &shard, &c);
                    done.insert(c.shard, c);
                }
                Some((_, Ok(None))) => {}
                Some((shard, Err(e))) => {
                    control.failed(job, &shard, &e);
                    failed_shards.push(shard.id);
                    failure = failure.or(Some(e));
                }
            },
            _ = flush.tick() => control.flush().await,
        }
    }
    drop(results);
    if !job.worker.coordinates() {
        return match failure {
            Some(e) => Err(e),
            None if *stop.borrow_and_update() => Ok(Outcome::Stopped),
            None => Ok(Outcome::Finished),
        };
    }
    // The coordinator follows the other workers' commits until every shard is in, or is a
    // failed worker's.
    if failure.is_none() && !others.is_empty() {
        let mut poll = tokio::time::interval(OTHERS_EVERY);
        let mut failed: Vec<WorkerFailure> = Vec::new();
        while !others.is_empty() && !*stop.borrow() {
            tokio::select! {
                _ = poll.tick() => {}
                _ = flush.tick() => { control.flush().await; continue; }
                _ = stop.changed() => continue,
            }
            // Failures first: a worker's commits precede its failure, so the commits read
            // next hold all it committed.
            for f in worker_failures(job, &out).await? {
                if f.worker != job.worker.index && !failed.iter().any(|g| g.worker == f.worker) {
                    tracing::error!(job = %job.id, worker = f.worker, error = %f.error, "a worker failed");
                    for shard in plan.shards.iter().filter(|s| f.shards.contains(&s.id)) {
                        control.failed(job, shard, &JobError::Worker { worker: f.worker, error: f.error.clone() });
                    }
                    failed.push(f);
                }
            }
            // One listing a pass; only the commit records that appeared are read.
            let committed = committed_shards(&out).await?;
            for id in others.clone().into_iter().filter(|id| committed.contains(id)) {
                let Some(c) = get_json::<ShardCommit>(&out, &commit_path(&out, id)).await? else { continue };
                // A shard the rerun takes up is in once this run has committed it again.
                if own.contains_key(&id) && c.run != job.run_id() {
                    continue;
                }
                if let Some(shard) = plan.shards.iter().find(|s| s.id == id) {
                    control.committed(job, shard, &c);
                }
                progress.send_modify(|p| p.add(&c));
                done.insert(id, c);
                others.remove(&id);
            }
            others.retain(|id| !failed.iter().any(|f| Worker { index: f.worker, count: job.worker.count }.owns(*id)));
        }
        if let Some(f) = failed.into_iter().next() {
            failure = Some(JobError::Worker { worker: f.worker, error: f.error });
        }
    }
    // The outputs of what committed, and their rows, even when stopping or failing.
    let merged = merge(&out, &plan, &done).await;
    control.flush().await;
    if let Some(e) = failure {
        return Err(e);
    }
    merged?;
    control.finish()?;
    let stopped = *stop.borrow_and_update();
    Ok(if done.len() == plan.shards.len() && !stopped { Outcome::Finished } else { Outcome::Stopped })
}

/// The objects below `prefix` (relative to the job's output folder).
async fn list_below(out: &Location, prefix: &str) -> Result<Vec<object_store::ObjectMeta>, JobError> {
    let prefix = out.child(prefix);
    out.store
        .list(Some(&prefix))
        .try_collect()
        .await
        .map_err(|source| JobError::Read { uri: prefix.to_string(), source })
}

/// The shards with a commit record.
async fn committed_shards(out: &Location) -> Result<HashSet<u32>, JobError> {
    let listed = list_below(out, "_mantle/shards").await?;
    Ok(listed.iter().filter_map(|m| m.location.filename()?.strip_suffix(".json")?.parse().ok()).collect())
}

fn commit_path(out: &Location, shard: u32) -> Path {
    out.child(&format!("_mantle/shards/{}.json", shard_name(shard)))
}

/// A worker that is not the coordinator waits for the coordinator's plan; `None` when stopped
/// first, the coordinator's error when it failed.
async fn wait_for_plan(
    job: &Job,
    out: &Location,
    plan_path: &Path,
    stop: &mut watch::Receiver<bool>,
) -> Result<Option<StoredPlan>, JobError> {
    tracing::info!(job = %job.id, worker = job.worker.index, "waiting for the coordinator's plan");
    let mut poll = tokio::time::interval(OTHERS_EVERY);
    loop {
        if *stop.borrow() {
            return Ok(None);
        }
        if let Some(plan) = get_json::<StoredPlan>(out, plan_path).await? {
            return Ok(Some(plan));
        }
        if let Some(f) = worker_failures(job, out).await?.into_iter().find(|f| f.worker == 0) {
            return Err(JobError::Worker { worker: f.worker, error: f.error });
        }
        tokio::select! {
            _ = poll.tick() => {}
            _ = stop.changed() => {}
        }
    }
}

/// The failures workers of this run left.
async fn worker_failures(job: &Job, out: &Location) -> Result<Vec<WorkerFailure>, JobError> {
    let listed = list_below(out, &format!("_mantle/failed/{}", job.run_id())).await?;
    let mut failures = Vec::new();
    for meta in listed {
        if let Some(f) = get_json::<WorkerFailure>(out, &meta.location).await? {
            failures.push(f);
        }
    }
    failures.sort_by_key(|f| f.worker);
    Ok(failures)
}

/// How often workers look for the plan, and the coordinator for the others' commits.
const OTHERS_EVERY: Duration = Duration::from_secs(2);

/// How often the control table gets the rows of the shards committed meanwhile.
const CONTROL_EVERY: Duration = Duration::from_secs(30);

fn micros_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64)
}

/// The job's side of the control table: rows waiting to be appended, and what it holds.
struct Control {
    table: Option<ControlTable>,
    recorded: HashSet<String>,
    pending: Vec<control::Row>,
    /// The last append's error, if the rows are still waiting.
    error: Option<String>,
}

impl Control {
    /// A worker's that is not the coordinator: it writes no rows.
    fn none() -> Control {
        Control { table: None, recorded: HashSet::new(), pending: Vec::new(), error: None }
    }

    /// Opens the table below the job's output and queues the rows of committed shards it does
    /// not hold yet (a job that stopped before its last append).
    async fn open(job: &Job, rt: &Runtime, done: &BTreeMap<u32, ShardCommit>, plan: &StoredPlan) -> Control {
        let mut control = Control { table: None, recorded: HashSet::new(), pending: Vec::new(), error: None };
        let table = match ControlTable::for_output(&rt.stores, &job.spec.output.uri) {
            Ok(t) => t,
            Err(e) => {
                control.error = Some(e.to_string());
                tracing::warn!(job = %job.id, error = %e, "no control table for this job");
                return control;
            }
        };
        match table.recorded().await {
            Ok(keys) => control.recorded = keys,
            Err(e) => control.error = Some(e.to_string()),
        }
        control.table = Some(table);
        for c in done.values() {
            if let Some(shard) = plan.shards.iter().find(|s| s.id == c.shard) {
                control.committed(job, shard, c);
            }
        }
        control
    }

    fn queue(&mut self, row: control::Row) {
        if !self.recorded.contains(&row.key()) {
            self.pending.push(row);
        }
    }

    fn row(job: &Job, shard: &Shard, status: &str) -> control::Row {
        control::Row {
            job_id: job.id.clone(),
            run_id: job.run_id().to_string(),
            shard_id: shard.id as i32,
            input_file: shard.file.clone(),
            byte_start: shard.lines.first().map_or(0, |r| r.start) as i64,
            byte_end: shard.lines.last().map_or(0, |r| r.end) as i64,
            first_line: shard.lines.first().map_or(0, |r| r.first_line) as i64,
            records: shard.records as i64,
            output_file: format!("{}/{}.out", job.id, shard.file),
            status: status.to_string(),
            ..Default::default()
        }
    }

    fn committed(&mut self, job: &Job, shard: &Shard, c: &ShardCommit) {
        let status = if c.error > 0 { "PARTIAL" } else { "SUCCEEDED" };
        let mut row = Self::row(job, shard, status);
        row.run_id = if c.run.is_empty() { "initial".into() } else { c.run.clone() };
        row.partition = c.partition.clone();
        (row.records_ok, row.records_error, row.records_reused, row.records_skipped) =
            (c.success as i64, c.error as i64, c.reused as i64, c.skipped as i64);
        (row.tokens_in, row.tokens_out) = (c.input_tokens as i64, c.output_tokens as i64);
        (row.attempts, row.started, row.finished, row.duration_s) =
            (c.attempts.max(1) as i32, c.started_us, c.finished_us, c.seconds);
        self.queue(row);
    }

    fn failed(&mut self, job: &Job, shard: &Shard, e: &JobError) {
        let mut row = Self::row(job, shard, "FAILED");
        (row.started, row.finished, row.attempts) = (micros_now(), micros_now(), 1);
        row.last_error = Some(e.to_string());
        self.queue(row);
    }

    /// Appends the waiting rows in one transaction; on failure they wait for the next flush.
    async fn flush(&mut self) {
        let Some(table) = &self.table else { return };
        if self.pending.is_empty() {
            return;
        }
        match table.append(&self.pending).await {
            Ok(()) => {
                self.recorded.extend(self.pending.drain(..).map(|r| r.key()));
                self.error = None;
            }
            Err(e) => {
                tracing::warn!(table = %table.url(), error = %e, rows = self.pending.len(), "control table append failed; retrying later");
                self.error = Some(e.to_string());
            }
        }
    }

    /// An error when rows could not be appended in the end.
    fn finish(&self) -> Result<(), JobError> {
        match (&self.error, self.pending.is_empty()) {
            (Some(e), false) => Err(JobError::Control(e.clone())),
            _ => Ok(()),
        }
    }
}

/// Lists the input, calibrates the token estimate on a sample, and cuts the shards.
async fn make_plan(
    job: &Job,
    rt: &Runtime,
    input: &Location,
    progress: &watch::Sender<Progress>,
) -> Result<StoredPlan, JobError> {
    let files = list_input(input).await?;
    let estimate = calibrate(job, rt, input, &files[0].0).await?;
    cut(&job.spec, input, files, estimate, |total| progress.send_modify(|p| p.total_records = total)).await
}

/// The input's `.jsonl` objects (path, name relative to the input URI), in order: the object the
/// URI names, or every one below it. None is an error.
pub async fn list_input(input: &Location) -> Result<Vec<(Path, String)>, JobError> {
    let read = |source| JobError::Read { uri: input.uri.clone(), source };
    // A single object, or every .jsonl below the prefix.
    let files: Vec<(Path, String)> = match input.store.head(&input.prefix).await {
        Ok(meta) if !input.prefix.as_ref().is_empty() => {
            let name = meta.location.filename().unwrap_or_default().to_string();
            vec![(meta.location, name)]
        }
        _ => {
            let mut listed: Vec<Path> = input
                .store
                .list(Some(&input.prefix))
                .map_ok(|m| m.location)
                .try_filter(|p| futures::future::ready(p.as_ref().ends_with(".jsonl")))
                .try_collect()
                .await
                .or_else(|e| match e {
                    object_store::Error::NotFound { .. } => Ok(Vec::new()),
                    e => Err(read(e)),
                })?;
            listed.sort();
            listed.into_iter().map(|p| (p.clone(), input.relative(&p))).collect()
        }
    };
    if files.is_empty() {
        return Err(JobError::NoInput(input.uri.clone()));
    }
    Ok(files)
}

/// Cuts the shards, reading each file once, in ranges of [`READ_RANGE`] bytes (memory: a range
/// per file being read, the shard list and 16 bytes per record); files are read and parsed in
/// parallel, one per core. `counted` hears the records seen so far after each file.
pub async fn cut(
    spec: &BatchJobSpec,
    input: &Location,
    files: Vec<(Path, String)>,
    estimate: TokenEstimate,
    counted: impl FnMut(u64),
) -> Result<StoredPlan, JobError> {
    cut_in_ranges(spec, input, files, estimate, counted, READ_RANGE).await
}

async fn cut_in_ranges(
    spec: &BatchJobSpec,
    input: &Location,
    files: Vec<(Path, String)>,
    estimate: TokenEstimate,
    mut counted: impl FnMut(u64),
    range: u64,
) -> Result<StoredPlan, JobError> {
    let partition = PartitionBy(spec.partition_key.clone());
    let limits =
        (spec.sharding.target_tokens_per_shard.max(1) as u64, spec.sharding.max_records_per_shard.max(1) as u64);
    let parallel = std::thread::available_parallelism().map_or(2, |n| n.get());
    // The futures made up front (not lazily by a closure the stream holds), so the job's future
    // stays `Send` for any lifetime.
    let scans: Vec<_> =
        files.iter().map(|(path, rel)| scan_file(input, path, rel, estimate, &partition, limits, range)).collect();
    let mut scans = futures::stream::iter(scans).buffered(parallel);
    // Shards numbered in file order; a record id seen before (in this file or an earlier one)
    // makes its line an error record.
    let mut shards = Vec::new();
    let mut ids = HashSet::new();
    let mut total = 0u64;
    while let Some(scan) = scans.try_next().await? {
        let first = shards.len() as u32;
        let mut file_shards = scan.shards;
        for shard in &mut file_shards {
            shard.id += first;
        }
        for (line, id) in scan.ids {
            if !ids.insert(id)
                && let Some(shard) = file_shards
                    .iter_mut()
                    .find(|s| s.lines.iter().any(|r| (r.first_line..r.first_line + r.count).contains(&line)))
            {
                shard.duplicates.push(line);
            }
        }
        total += scan.records;
        shards.extend(file_shards);
        counted(total);
    }
    Ok(StoredPlan {
        version: 1,
        estimate,
        total_records: total,
        files: files.iter().map(|(_, r)| r.clone()).collect(),
        shards,
    })
}

/// How much of a file the planner reads at once.
const READ_RANGE: u64 = 8 << 20;

/// One file, as the planner saw it.
struct FileScan {
    /// Its shards, numbered from 0.
    shards: Vec<Shard>,
    /// Each record's line and id hash, in order.
    ids: Vec<(u64, u64)>,
    records: u64,
}

/// A line the planner found (`prefix` and `id` are `None` for a line that is not a record).
struct Found {
    line: u64,
    start: u64,
    end: u64,
    bytes: u64,
    prefix: Option<u64>,
    id: Option<u64>,
}

/// Reads and cuts one file: ranges are fetched in turn and parsed on a blocking thread.
async fn scan_file(
    input: &Location,
    path: &Path,
    rel: &str,
    estimate: TokenEstimate,
    partition: &PartitionBy,
    (target, max): (u64, u64),
    range: u64,
) -> Result<FileScan, JobError> {
    let read = |source| JobError::Read { uri: format!("{}/{rel}", input.uri.trim_end_matches('/')), source };
    let size = input.store.head(path).await.map_err(read)?.size;
    let mut cutter = Cutter::new(target, max);
    cutter.start_file(rel);
    let mut scan = FileScan { shards: Vec::new(), ids: Vec::new(), records: 0 };
    // Bytes not yet parsed (a line's start), where they begin, and that line's number.
    let (mut carry, mut offset, mut line) = (Vec::new(), 0u64, 0u64);
    let mut pos = 0;
    loop {
        let eof = pos >= size;
        if !eof {
            let end = (pos + range).min(size);
            carry.extend_from_slice(&input.store.get_range(path, pos..end).await.map_err(read)?);
            pos = end;
        }
        let (file, partition) = (rel.to_string(), partition.clone());
        let (rest, found, used, lines) = tokio::task::spawn_blocking(move || {
            let (found, used, lines) = find_lines(&carry, offset, line, eof, &file, &partition);
            carry.drain(..used);
            (carry, found, used, lines)
        })
        .await
        .map_err(|e| JobError::Invalid(format!("planning {rel} failed: {e}")))?;
        carry = rest;
        for f in found {
            cutter.push(Seen {
                line: f.line,
                start: f.start,
                end: f.end,
                tokens: estimate.tokens(f.bytes),
                prefix: f.prefix,
                duplicate: false,
            });
            if let Some(id) = f.id {
                scan.ids.push((f.line, id));
            }
            scan.records += 1;
        }
        offset += used as u64;
        line += lines;
        if eof {
            break;
        }
    }
    scan.shards = cutter.finish();
    Ok(scan)
}

/// The complete lines of `text` (which starts at byte `offset`, line `first`, of the file), how
/// many bytes and lines they take; at the end of the file the last line needs no newline. Blank
/// lines count as lines but are not records.
fn find_lines(
    text: &[u8],
    offset: u64,
    first: u64,
    eof: bool,
    file: &str,
    partition: &PartitionBy,
) -> (Vec<Found>, usize, u64) {
    let mut found = Vec::new();
    let (mut start, mut line) = (0usize, first);
    while start < text.len() {
        let end = match text[start..].iter().position(|&b| b == b'\n') {
            Some(i) => start + i + 1,
            None if eof => text.len(),
            None => break,
        };
        let body = trim(&text[start..end]);
        if !body.is_empty() {
            let (prefix, id) = match record::parse(body, file, line, partition) {
                Ok(r) => (record::prefix_key(r.model_input), Some(record::id_hash(&r.record_id))),
                Err(_) => (None, None),
            };
            found.push(Found {
                line,
                start: offset + start as u64,
                end: offset + end as u64,
                bytes: body.len() as u64,
                prefix,
                id,
            });
        }
        line += 1;
        start = end;
    }
    (found, start, line - first)
}

fn trim(line: &[u8]) -> &[u8] {
    let end = line.iter().rposition(|b| !b.is_ascii_whitespace()).map_or(0, |i| i + 1);
    let start = line[..end].iter().position(|b| !b.is_ascii_whitespace()).unwrap_or(end);
    &line[start..end]
}

/// Bytes per token of the job's records, from up to 16 records of the first file counted by
/// the model's tokenizer.
async fn calibrate(job: &Job, rt: &Runtime, input: &Location, first: &Path) -> Result<TokenEstimate, JobError> {
    let read = |source| JobError::Read { uri: input.uri.clone(), source };
    let size = input.store.head(first).await.map_err(read)?.size;
    let head = input.store.get_range(first, 0..size.min(1 << 20)).await.map_err(read)?;
    let mut samples = Vec::new();
    for text in head.split(|&b| b == b'\n').map(trim).filter(|t| !t.is_empty()).take(16) {
        let Ok(r) = record::parse(text, "", 0, &PartitionBy::default()) else { continue };
        match rt.router.count_tokens(&job.spec.model_id, job.spec.invocation_type, r.model_input.get()).await {
            Ok(tokens) => samples.push((text.len() as u64, tokens)),
            Err(CallError::Retry(e)) => return Err(JobError::Router(e)),
            Err(_) => {}
        }
    }
    Ok(TokenEstimate::calibrate(&samples))
}

/// Where a running shard reports each record it finishes (status shows progress between
/// commits); the shard's count is taken back when it commits or gives up.
struct Live<'a> {
    progress: &'a watch::Sender<Progress>,
    finished: &'a AtomicU64,
}

impl Live<'_> {
    fn record_done(&self) {
        self.finished.fetch_add(1, AtomicOrdering::Relaxed);
        self.progress.send_modify(|p| p.partial += 1);
    }
}

/// What a shard's records draw on: lines that may stand for them, the output schema.
struct Sources<'a> {
    schema: Option<&'a OutputSchema>,
    /// The shard's own index, when a rerun takes it up (its unselected records keep their lines).
    own: Option<Vec<IndexEntry>>,
    /// `reuseFrom`'s outputs.
    previous: Option<&'a reuse::Previous>,
}

/// What becomes of one record of a shard.
enum Action {
    Run,
    /// Its line from the shard's last run (line number, index entry).
    Keep(usize, IndexEntry),
    /// Its line from `reuseFrom` (shard, line).
    Reuse(u32, u32),
}

/// Runs one shard and commits it; `None` when stopped before it finished.
#[allow(clippy::too_many_arguments)]
async fn run_shard(
    job: &Job,
    rt: &Runtime,
    input: &Location,
    out: &Location,
    shard: &Shard,
    sources: &Sources<'_>,
    slots: &Arc<Semaphore>,
    stop: watch::Receiver<bool>,
    live: &Live<'_>,
) -> Result<Option<ShardCommit>, JobError> {
    let started = Instant::now();
    let started_at = micros_now();
    // Attempts, counted across restarts (a shard that never commits shows how often it tried).
    let attempts_path = out.child(&format!("_mantle/shards/{}.attempts", shard_name(shard.id)));
    let attempts = get_json::<u32>(out, &attempts_path).await?.unwrap_or(0) + 1;
    put(out, &attempts_path, attempts.to_string().into()).await?;
    let path = input.child(&shard.file);
    let read = |source| JobError::Read { uri: format!("{}/{}", input.uri.trim_end_matches('/'), shard.file), source };
    // The shard's lines, in order, with their line numbers.
    let mut lines: Vec<(u64, Bytes)> = Vec::with_capacity(shard.records as usize);
    for run in &shard.lines {
        let bytes = input.store.get_range(&path, run.start..run.end).await.map_err(read)?;
        for (line, text) in (run.first_line..).zip(bytes.split(|&b| b == b'\n')) {
            let t = trim(text);
            if !t.is_empty() {
                lines.push((line, bytes.slice_ref(t)));
            }
        }
    }
    // Each record's identity, and whether a line stands for it already.
    let salt = reuse::job_salt(&job.spec);
    let partition = PartitionBy(job.spec.partition_key.clone());
    let own: HashMap<&str, (usize, &IndexEntry)> = sources
        .own
        .iter()
        .flatten()
        .enumerate()
        .filter(|(_, e)| !e.hash.is_empty())
        .map(|(i, e)| (e.hash.as_str(), (i, e)))
        .collect();
    let rerun = job.spec.rerun.as_ref();
    let duplicates: HashSet<u64> = shard.duplicates.iter().copied().collect();
    let mut identities = Vec::with_capacity(lines.len());
    let mut actions = Vec::with_capacity(lines.len());
    for (line, text) in &lines {
        let identity = record::parse(text, &shard.file, *line, &partition)
            .ok()
            .filter(|_| !duplicates.contains(line))
            .map(|r| (reuse::content_hash(&salt, &r.record_id, r.model_input), r.record_id, r.partition));
        let action = match &identity {
            Some((hash, ..)) => match (own.get(hash.as_str()), sources.previous.and_then(|p| p.find(hash))) {
                (Some((i, e)), _) if !rerun.is_some_and(|r| reuse::selected(r, e)) => Action::Keep(*i, (*e).clone()),
                (Some(_), _) => Action::Run,
                (None, Some((s, l))) => Action::Reuse(s, l),
                (None, None) => Action::Run,
            },
            None => Action::Run,
        };
        identities.push(identity);
        actions.push(action);
    }
    // The earlier lines needed, read once per part.
    let mut parts: HashMap<Option<u32>, Vec<Bytes>> = HashMap::new();
    for action in &actions {
        let (key, loc, id) = match action {
            Action::Keep(..) => (None, out, shard.id),
            Action::Reuse(s, _) => (Some(*s), &sources.previous.expect("reuse has a source").loc, *s),
            Action::Run => continue,
        };
        if let std::collections::hash_map::Entry::Vacant(slot) = parts.entry(key) {
            slot.insert(reuse::read_lines(loc, id).await?);
        }
    }
    let records = lines.into_iter().zip(actions).map(|((line, text), action)| {
        let stop = stop.clone();
        let duplicate = duplicates.contains(&line);
        let copied = |key: Option<u32>, at: usize| {
            parts.get(&key).and_then(|p| p.get(at)).map(|b| String::from_utf8_lossy(b).into_owned())
        };
        let kept = match &action {
            Action::Keep(i, e) => copied(None, *i).map(|l| Done {
                line: Some(l),
                ok: e.ok,
                reused: false,
                input_tokens: e.input_tokens,
                output_tokens: e.output_tokens,
            }),
            Action::Reuse(s, l) => copied(Some(*s), *l as usize).map(|l| Done {
                line: Some(l),
                ok: true,
                reused: true,
                input_tokens: 0,
                output_tokens: 0,
            }),
            Action::Run => None,
        };
        async move {
            let done = match kept {
                Some(kept) => Some(kept),
                None => {
                    let _slot = slots.acquire().await.expect("the semaphore stays open");
                    if *stop.borrow() {
                        return None;
                    }
                    run_record(job, rt, sources.schema, (&shard.file, line, &text), duplicate, stop).await
                }
            };
            if done.is_some() {
                live.record_done();
            }
            done
        }
    });
    // Every record waits for a slot (FIFO), so a slow record never holds back the start of the
    // next ones (an ordered buffer would count finished records waiting for their turn as in
    // flight); the results come back in order.
    let results: Vec<Option<Done>> = futures::future::join_all(records).await;
    if results.iter().any(Option::is_none) {
        return Ok(None);
    }
    let mut commit = ShardCommit {
        shard: shard.id,
        run: job.run_id().to_string(),
        file: shard.file.clone(),
        records: shard.records,
        ..Default::default()
    };
    let mut body = String::new();
    let mut index = Vec::new();
    for (done, identity) in results.into_iter().flatten().zip(identities) {
        let Some(line) = &done.line else {
            commit.skipped += 1;
            continue;
        };
        match (done.ok, done.reused) {
            (true, true) => commit.reused += 1,
            (true, false) => commit.success += 1,
            (false, _) => commit.error += 1,
        }
        body.push_str(line);
        let (hash, record_id, partition) = identity.unwrap_or_default();
        index.push(IndexEntry {
            hash,
            ok: done.ok,
            partition,
            record_id,
            input_tokens: done.input_tokens,
            output_tokens: done.output_tokens,
        });
        commit.input_tokens += done.input_tokens;
        commit.output_tokens += done.output_tokens;
    }
    commit.seconds = started.elapsed().as_secs_f64();
    (commit.started_us, commit.finished_us, commit.attempts) = (started_at, micros_now(), attempts);
    commit.partition = {
        let mut partitions = index.iter().map(|e| e.partition.as_deref());
        let first = partitions.next().flatten();
        partitions.all(|p| p == first).then(|| first.map(str::to_string)).flatten()
    };
    let name = shard_name(shard.id);
    put(out, &out.child(&format!("_mantle/shards/{name}.jsonl")), Bytes::from(body)).await?;
    reuse::write_index(out, shard.id, &index).await?;
    // The commit record last: a shard without it is run again.
    put(out, &commit_path(out, shard.id), serde_json::to_vec(&commit).expect("serialises").into()).await?;
    if let Some(m) = &rt.metrics {
        let tokens = (commit.input_tokens, commit.output_tokens);
        m.shard(commit.success, commit.error, commit.reused, commit.skipped, tokens, commit.seconds);
    }
    tracing::info!(job = %job.id, shard = shard.id, records = commit.records, errors = commit.error, reused = commit.reused, seconds = commit.seconds, "shard committed");
    Ok(Some(commit))
}

/// A record's result: its output line (`None` when skipped).
struct Done {
    line: Option<String>,
    ok: bool,
    /// Copied from `reuseFrom`.
    reused: bool,
    input_tokens: u64,
    output_tokens: u64,
}

impl Done {
    fn error(record_id: &str, input: Option<&RawValue>, code: u16, message: &str) -> Done {
        Done {
            line: Some(record::error_line(record_id, input, code, message)),
            ok: false,
            reused: false,
            input_tokens: 0,
            output_tokens: 0,
        }
    }
}

/// Runs one record, retrying what capacity refuses until it is served (batch never fails on
/// quota); `None` when the job is stopped meanwhile.
async fn run_record(
    job: &Job,
    rt: &Runtime,
    schema: Option<&OutputSchema>,
    (file, line, text): (&str, u64, &[u8]),
    duplicate: bool,
    mut stop: watch::Receiver<bool>,
) -> Option<Done> {
    let partition = PartitionBy(job.spec.partition_key.clone());
    let r = match record::parse(text, file, line, &partition) {
        Ok(r) => r,
        Err(e) => {
            let id = record::derived_id(file, line);
            let message = match e {
                BadLine::NotJson(_) => format!("line {} of {file}: {e}", line + 1),
                _ => e.to_string(),
            };
            return Some(Done::error(&id, None, 400, &message));
        }
    };
    if duplicate {
        let message =
            format!("recordId {:?} appears earlier in the job's input; each record needs its own id", r.record_id);
        return Some(Done::error(&r.record_id, Some(r.model_input), 400, &message));
    }
    let mut body: Value = match serde_json::from_str(r.model_input.get()) {
        Ok(v) => v,
        Err(e) => return Some(Done::error(&r.record_id, Some(r.model_input), 400, &e.to_string())),
    };
    apply_defaults(&mut body, &job.spec);
    if let Some(schema) = schema {
        schema.constrain(&mut body, job.spec.invocation_type);
    }
    // The prompt-length guard.
    if let Some(limit) = &job.spec.input_token_limit {
        let max = limit.max_tokens.max(1) as u64;
        let text = body.to_string();
        let mut tokens = match with_retries(&mut stop, || {
            rt.router.count_tokens(&job.spec.model_id, job.spec.invocation_type, &text)
        })
        .await?
        {
            Ok(t) => t,
            Err(e) => return Some(refused(&r.record_id, r.model_input, e)),
        };
        if tokens > max {
            match limit.action {
                OverLimitAction::Skip => {
                    return Some(Done { line: None, ok: false, reused: false, input_tokens: 0, output_tokens: 0 });
                }
                OverLimitAction::FailRecord => {
                    let message = format!("the prompt has {tokens} tokens; the job's inputTokenLimit is {max}");
                    return Some(Done::error(&r.record_id, Some(r.model_input), 400, &message));
                }
                OverLimitAction::Truncate => {
                    for _ in 0..4 {
                        if tokens <= max || !truncate(&mut body, job.spec.invocation_type, tokens, max) {
                            break;
                        }
                        let text = body.to_string();
                        tokens = match with_retries(&mut stop, || {
                            rt.router.count_tokens(&job.spec.model_id, job.spec.invocation_type, &text)
                        })
                        .await?
                        {
                            Ok(t) => t,
                            Err(e) => return Some(refused(&r.record_id, r.model_input, e)),
                        };
                    }
                    if tokens > max {
                        let message = format!(
                            "the prompt has {tokens} tokens and could not be cut to the job's inputTokenLimit of {max}"
                        );
                        return Some(Done::error(&r.record_id, Some(r.model_input), 400, &message));
                    }
                }
            }
        }
    }
    let mut payload = body.to_string().into_bytes();
    let mut faults = 0;
    let (mut spent_in, mut spent_out, mut repaired) = (0, 0, false);
    loop {
        let answer = with_retries(&mut stop, || {
            rt.router.run(&job.spec.model_id, job.spec.invocation_type, job.spec.tier, payload.clone())
        })
        .await?;
        match answer {
            Ok(a) => {
                let output =
                    match std::str::from_utf8(&a.body).ok().and_then(|s| RawValue::from_string(s.to_string()).ok()) {
                        Some(o) => o,
                        None => {
                            return Some(Done::error(
                                &r.record_id,
                                Some(r.model_input),
                                500,
                                "the model's answer is not JSON",
                            ));
                        }
                    };
                spent_in += a.input_tokens;
                spent_out += a.output_tokens;
                if let Some(schema) = schema {
                    let value: Value = serde_json::from_str(output.get()).unwrap_or_default();
                    if let Err(reason) = schema.check(&value) {
                        // Once more, told what was wrong; then an error record.
                        match schema.repair(&body, &value, &reason).filter(|_| !repaired) {
                            Some(again) => {
                                repaired = true;
                                payload = again.to_string().into_bytes();
                                continue;
                            }
                            None => {
                                let mut done = Done::error(&r.record_id, Some(r.model_input), 400, &reason);
                                (done.input_tokens, done.output_tokens) = (spent_in, spent_out);
                                return Some(done);
                            }
                        }
                    }
                }
                return Some(Done {
                    line: Some(record::output_line(&r.record_id, Some(r.model_input), &output)),
                    ok: true,
                    reused: false,
                    input_tokens: spent_in,
                    output_tokens: spent_out,
                });
            }
            Err(CallError::Fault { .. }) if faults < 2 => {
                faults += 1;
                tokio::time::sleep(Duration::from_millis(500 << faults)).await;
            }
            Err(e) => return Some(refused(&r.record_id, r.model_input, e)),
        }
    }
}

fn refused(record_id: &str, input: &RawValue, e: CallError) -> Done {
    match e {
        CallError::Refused { status, message, .. } | CallError::Fault { status, message, .. } => {
            Done::error(record_id, Some(input), status, &message)
        }
        CallError::Retry(message) => Done::error(record_id, Some(input), 503, &message),
    }
}

/// Calls `f` until it answers anything but "try later", backing off; `None` if the job is
/// stopped meanwhile.
async fn with_retries<T, F, Fut>(stop: &mut watch::Receiver<bool>, mut f: F) -> Option<Result<T, CallError>>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, CallError>>,
{
    let mut delay = Duration::from_millis(100);
    loop {
        match f().await {
            Err(CallError::Retry(why)) => {
                tracing::debug!(%why, "capacity refused a batch request; backing off");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.wait_for(|s| *s) => return None,
                }
                delay = (delay * 2).min(Duration::from_secs(15));
            }
            other => return Some(other),
        }
    }
}

/// The job's inference config as defaults for a record's body (the record's own values win);
/// temperature 0 when neither sets it, so reruns give the same answers.
pub fn apply_defaults(body: &mut Value, spec: &BatchJobSpec) {
    let Some(obj) = body.as_object_mut() else { return };
    let config = spec.inference_config.clone().unwrap_or(mantle_crds::InferenceConfig {
        max_tokens: None,
        temperature: None,
        top_p: None,
        stop_sequences: Vec::new(),
    });
    let temperature = config.temperature.unwrap_or(0.0);
    match spec.invocation_type {
        InvocationType::Converse => {
            let cfg = obj.entry("inferenceConfig").or_insert_with(|| Value::Object(Default::default()));
            if let Some(cfg) = cfg.as_object_mut() {
                let mut set = |k: &str, v: Value| {
                    cfg.entry(k.to_string()).or_insert(v);
                };
                set("temperature", temperature.into());
                if let Some(m) = config.max_tokens {
                    set("maxTokens", m.into());
                }
                if let Some(p) = config.top_p {
                    set("topP", p.into());
                }
                if !config.stop_sequences.is_empty() {
                    set("stopSequences", config.stop_sequences.clone().into());
                }
            }
        }
        InvocationType::InvokeModel => {
            let anthropic = obj.contains_key("messages") || obj.contains_key("anthropic_version");
            let mut set = |k: &str, v: Value| {
                obj.entry(k.to_string()).or_insert(v);
            };
            set("temperature", temperature.into());
            if let Some(p) = config.top_p {
                set("top_p", p.into());
            }
            if anthropic {
                if let Some(m) = config.max_tokens {
                    set("max_tokens", m.into());
                }
                if !config.stop_sequences.is_empty() {
                    set("stop_sequences", config.stop_sequences.clone().into());
                }
            } else if let Some(m) = config.max_tokens
                && !obj.contains_key("max_gen_len")
            {
                obj.entry("max_tokens".to_string()).or_insert(m.into());
            }
        }
    }
}

/// Cuts the oldest prompt text (the first message's text, or a `prompt`'s start) by the share
/// the prompt is over; false when there is nothing left to cut.
pub fn truncate(body: &mut Value, kind: InvocationType, tokens: u64, max: u64) -> bool {
    // A little more than the excess, as tokens are not spread evenly.
    let keep = |len: usize| (len as f64 * (max as f64 / tokens as f64) * 0.95) as usize;
    fn cut_front(s: &mut String, keep: usize) -> bool {
        let chars = s.chars().count();
        if chars == 0 || keep >= chars {
            return false;
        }
        *s = s.chars().skip(chars - keep).collect();
        true
    }
    let text = match (kind, body.get_mut("prompt")) {
        (InvocationType::InvokeModel, Some(Value::String(p))) => Some(p),
        _ => body.get_mut("messages").and_then(|m| m.as_array_mut()).and_then(|messages| {
            messages.iter_mut().find_map(|m| match m.get_mut("content")? {
                Value::String(s) if !s.is_empty() => Some(s),
                Value::Array(blocks) => blocks.iter_mut().find_map(|b| match b.get_mut("text") {
                    Some(Value::String(s)) if !s.is_empty() => Some(s),
                    _ => None,
                }),
                _ => None,
            })
        }),
    };
    match text {
        Some(s) => {
            let k = keep(s.chars().count());
            cut_front(s, k)
        }
        None => false,
    }
}

/// Writes `<file>.out` for every input file (its committed shards' lines, in shard order) and
/// `manifest.json.out`.
async fn merge(out: &Location, plan: &StoredPlan, done: &BTreeMap<u32, ShardCommit>) -> Result<(), JobError> {
    let write = |path: &Path, source| JobError::Write { uri: format!("{}/{}", out.uri, out.relative(path)), source };
    for file in &plan.files {
        let target = out.child(&format!("{file}.out"));
        let upload = out.store.put_multipart(&target).await.map_err(|e| write(&target, e))?;
        let mut writer = WriteMultipart::new(upload);
        for shard in plan.shards.iter().filter(|s| &s.file == file && done.contains_key(&s.id)) {
            let part = out.child(&format!("_mantle/shards/{}.jsonl", shard_name(shard.id)));
            let bytes = out
                .store
                .get(&part)
                .await
                .map_err(|source| JobError::Read { uri: part.to_string(), source })?
                .bytes()
                .await
                .map_err(|source| JobError::Read { uri: part.to_string(), source })?;
            writer.wait_for_capacity(4).await.map_err(|e| write(&target, e))?;
            writer.write(&bytes);
        }
        writer.finish().await.map_err(|e| write(&target, e))?;
    }
    let mut total = Progress::default();
    for c in done.values() {
        total.add(c);
    }
    // Reused records are successes whose output was copied.
    let manifest = serde_json::json!({
        "totalRecordCount": plan.total_records,
        "processedRecordCount": total.success + total.reused + total.error,
        "successRecordCount": total.success + total.reused,
        "errorRecordCount": total.error,
        "reusedRecordCount": total.reused,
        "skippedRecordCount": total.skipped,
        "inputTokenCount": total.input_tokens,
        "outputTokenCount": total.output_tokens,
    });
    put(out, &out.child("manifest.json.out"), manifest.to_string().into()).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    use crate::store::Stores;

    fn spec(kind: InvocationType) -> BatchJobSpec {
        serde_json::from_value(json!({
            "modelId": "m", "input": {"uri": "s3://b/in/"}, "output": {"uri": "s3://b/out/"},
            "invocationType": kind, "inferenceConfig": {"maxTokens": 64}
        }))
        .unwrap()
    }

    #[test]
    fn the_jobs_config_fills_what_a_record_leaves_out_and_greedy_is_the_default() {
        let mut body = json!({"anthropic_version": "bedrock-2023-05-31", "messages": [], "temperature": 0.7});
        apply_defaults(&mut body, &spec(InvocationType::InvokeModel));
        assert_eq!(body["temperature"], 0.7);
        assert_eq!(body["max_tokens"], 64);
        let mut body = json!({"prompt": "x", "max_gen_len": 9});
        apply_defaults(&mut body, &spec(InvocationType::InvokeModel));
        assert_eq!(body, json!({"prompt": "x", "max_gen_len": 9, "temperature": 0.0}));
        let mut body = json!({"messages": [], "inferenceConfig": {"maxTokens": 5}});
        apply_defaults(&mut body, &spec(InvocationType::Converse));
        assert_eq!(body["inferenceConfig"], json!({"maxTokens": 5, "temperature": 0.0}));
    }

    #[test]
    fn truncation_cuts_the_oldest_text_from_its_start() {
        let mut body =
            json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "abcdefghij".repeat(10)}]}]});
        assert!(truncate(&mut body, InvocationType::InvokeModel, 200, 100));
        let text = body["messages"][0]["content"][0]["text"].as_str().unwrap();
        assert_eq!(text.len(), 47);
        assert!(text.ends_with("ghij"));
        let mut body = json!({"prompt": "0123456789"});
        assert!(truncate(&mut body, InvocationType::InvokeModel, 10, 5));
        assert_eq!(body["prompt"], "6789");
        let mut body = json!({"messages": []});
        assert!(!truncate(&mut body, InvocationType::Converse, 10, 5));
    }

    /// The planner reads files in ranges: lines longer than a range, CRLF, blank
    /// lines, a last line without its newline, bad lines and repeated ids all land in exactly one
    /// shard, at the right byte ranges.
    #[tokio::test]
    async fn planning_streams_every_line_into_exactly_one_shard() {
        let dir = tempfile::tempdir().unwrap();
        let long = "x".repeat(300_000);
        let mut text = String::new();
        let mut want = Vec::new();
        for i in 0..40 {
            let line = match i {
                7 => "{not json".to_string(),
                9 => r#"{"recordId":"R3","modelInput":{"prompt":"again"}}"#.to_string(),
                _ if i % 10 == 5 => format!(r#"{{"recordId":"R{i}","modelInput":{{"prompt":"{long}"}}}}"#),
                _ => format!(r#"{{"recordId":"R{i}","modelInput":{{"prompt":"p{i}"}}}}"#),
            };
            want.push((text.len(), line.clone()));
            text.push_str(&line);
            text.push_str(if i % 3 == 0 { "\r\n" } else { "\n" });
            if i == 20 {
                text.push_str("   \n");
            }
        }
        text.truncate(text.len() - 1); // no newline after the last line
        std::fs::create_dir_all(dir.path().join("in")).unwrap();
        std::fs::write(dir.path().join("in/a.jsonl"), &text).unwrap();
        let stores = Stores::default();
        let input = stores.open(&format!("file://{}/in/", dir.path().display())).unwrap();
        let files = list_input(&input).await.unwrap();
        let mut spec = spec(InvocationType::InvokeModel);
        spec.sharding.target_tokens_per_shard = 100_000;
        spec.sharding.max_records_per_shard = 6;
        // Ranges shorter than the long lines: lines span reads.
        let estimate = TokenEstimate { bytes_per_token: 4.0 };
        let plan = cut_in_ranges(&spec, &input, files, estimate, |_| {}, 100_000).await.unwrap();
        assert_eq!(plan.total_records, 40);
        let mut seen: Vec<(u64, String)> = Vec::new();
        for shard in &plan.shards {
            assert!(shard.records <= 6 && shard.records > 0);
            for run in &shard.lines {
                let bytes = &text.as_bytes()[run.start as usize..run.end as usize];
                let lines: Vec<&[u8]> = bytes.split(|&b| b == b'\n').map(trim).filter(|l| !l.is_empty()).collect();
                assert_eq!(lines.len() as u64, run.count);
                seen.extend(lines.iter().map(|l| (run.start, String::from_utf8_lossy(l).into_owned())));
            }
        }
        seen.sort();
        let mut lines: Vec<String> = seen.into_iter().map(|(_, l)| l).collect();
        lines.sort();
        let mut expected: Vec<String> = want.into_iter().map(|(_, l)| l).collect();
        expected.sort();
        assert_eq!(lines, expected);
        let duplicates: Vec<u64> = plan.shards.iter().flat_map(|s| s.duplicates.clone()).collect();
        assert_eq!(duplicates, [9], "line 9 repeats R3 (the blank line comes later)");
    }

    #[test]
    fn only_what_no_attempt_gets_past_is_fatal() {
        assert!(JobError::NoInput("s3://b/in/".into()).is_fatal());
        assert!(JobError::UnknownModel("m".into()).is_fatal());
        assert!(JobError::Worker { worker: 1, error: "x".into() }.is_fatal());
        assert!(!JobError::Router("connection refused".into()).is_fatal(), "the router may be back");
        assert!(!JobError::Control("x".into()).is_fatal());
    }

    #[test]
    fn lines_are_trimmed_of_whitespace_and_carriage_returns() {
        assert_eq!(trim(b"  {\"a\":1}\r"), b"{\"a\":1}");
        assert_eq!(trim(b" \r"), b"");
    }
}
