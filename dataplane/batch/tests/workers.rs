//! Several workers share one job, as the pods of a cluster's Indexed Job do: each runs its own
//! shards, worker 0 plans, records every shard in the control table and merges; a worker's
//! failure reaches the coordinator, which keeps what committed. Against a small stand-in router
//! (these tests are about the workers' coordination; the real router and model run in
//! `mantle dev`'s end-to-end tests).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::{get, post};
use mantle_batch::control::ControlTable;
use mantle_batch::{Job, JobError, Outcome, Progress, RouterClient, Runtime, Stores, Worker};
use mantle_crds::BatchJobSpec;
use serde_json::{Value, json};
use tokio::sync::watch;

/// How often each prompt was inferred.
type Calls = Arc<Mutex<BTreeMap<String, u32>>>;

async fn router() -> (String, Calls) {
    let calls = Calls::default();
    let app = Router::new()
        .route("/foundation-models/{id}", get(|| async { axum::Json(json!({"modelDetails": {}})) }))
        .route(
            "/model/{id}/count-tokens",
            post(|body: String| async move { axum::Json(json!({"inputTokens": body.len() / 4})) }),
        )
        .route(
            "/model/{id}/invoke",
            post(|State(calls): State<Calls>, body: axum::body::Bytes| async move {
                let body: Value = serde_json::from_slice(&body).unwrap();
                let prompt = body["prompt"].as_str().unwrap_or_default().to_string();
                *calls.lock().unwrap().entry(prompt.clone()).or_default() += 1;
                // A model takes a moment: records are in flight while their shard runs.
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                let mut headers = HeaderMap::new();
                headers.insert("x-amzn-bedrock-input-token-count", "7".parse().unwrap());
                headers.insert("x-amzn-bedrock-output-token-count", "3".parse().unwrap());
                (headers, axum::Json(json!({"generation": format!("answer to {prompt}")})))
            }),
        )
        .with_state(calls.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, calls)
}

fn write_input(dir: &Path, files: usize, per_file: usize) {
    std::fs::create_dir_all(dir.join("in")).unwrap();
    for f in 0..files {
        let lines: String = (0..per_file)
            .map(|i| {
                format!("{}\n", json!({"recordId": format!("R{f}-{i}"), "modelInput": {"prompt": format!("p{f}-{i}")}}))
            })
            .collect();
        std::fs::write(dir.join(format!("in/part-{f}.jsonl")), lines).unwrap();
    }
}

fn job(dir: &Path, worker: Worker) -> Job {
    let spec: BatchJobSpec = serde_json::from_value(json!({
        "modelId": "m",
        "input": {"uri": format!("file://{}/in/", dir.display())},
        "output": {"uri": format!("file://{}/out/", dir.display())},
        "sharding": {"targetTokensPerShard": 1000, "maxRecordsPerShard": 5},
    }))
    .unwrap();
    Job { id: "job1".into(), spec, reuse_from: None, worker }
}

fn runtime(url: &str) -> Runtime {
    Runtime { stores: Stores::default(), router: RouterClient::new(url, "t"), concurrency: 4, metrics: None }
}

/// Runs a worker; its outcome, its last progress, and the most records it ever reported done
/// ahead of their shard's commit.
async fn run(job: Job, rt: &Runtime) -> (Result<Outcome, JobError>, Progress, u64) {
    let (progress, mut watched) = watch::channel(Progress::default());
    let (_stop, stopped) = watch::channel(false);
    let mut seen = watched.clone();
    let peak = tokio::spawn(async move {
        let mut peak = 0;
        while seen.changed().await.is_ok() {
            peak = peak.max(seen.borrow().partial);
        }
        peak
    });
    let result = mantle_batch::run(&job, rt, &progress, stopped).await;
    let p = watched.borrow_and_update().clone();
    drop(progress);
    (result, p, peak.await.unwrap())
}

/// The record ids of the job's output files, one entry per line.
fn output_ids(dir: &Path) -> Vec<String> {
    let mut ids = Vec::new();
    for entry in std::fs::read_dir(dir.join("out/job1")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "out") && path.file_name().unwrap() != "manifest.json.out" {
            for line in std::fs::read_to_string(&path).unwrap().lines() {
                ids.push(serde_json::from_str::<Value>(line).unwrap()["recordId"].as_str().unwrap().to_string());
            }
        }
    }
    ids.sort();
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_share_the_shards_and_the_coordinator_records_and_merges_them_all() {
    let dir = tempfile::tempdir().unwrap();
    write_input(dir.path(), 2, 30);
    let (url, calls) = router().await;
    let rt = runtime(&url);
    // Worker 2 failed in an earlier attempt and was run again: its old failure is not this one.
    let failed = dir.path().join("out/job1/_mantle/failed/initial");
    std::fs::create_dir_all(&failed).unwrap();
    std::fs::write(failed.join("2.json"), json!({"worker": 2, "error": "gone", "shards": [2]}).to_string()).unwrap();
    let workers = (0..3).map(|index| run(job(dir.path(), Worker { index, count: 3 }), &rt));
    let results = futures::future::join_all(workers).await;
    for (index, (result, ..)) in results.iter().enumerate() {
        assert_eq!(result.as_ref().ok(), Some(&Outcome::Finished), "worker {index}: {result:?}");
    }
    // Every record inferred once, by some worker, and in the output once.
    let calls = calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 60);
    assert!(calls.values().all(|&n| n == 1), "{calls:?}");
    let mut want: Vec<String> = (0..2).flat_map(|f| (0..30).map(move |i| format!("R{f}-{i}"))).collect();
    want.sort();
    assert_eq!(output_ids(dir.path()), want);
    // The coordinator's progress covers every worker's shards; the manifest counts them all.
    let (_, coordinator, peak) = &results[0];
    assert_eq!((coordinator.success, coordinator.shards_done, coordinator.shards_total), (60, 12, 12));
    // Records count as they finish, not only when their shard commits; none is counted twice.
    assert!(*peak > 0, "progress moved between commits");
    assert_eq!((coordinator.partial, coordinator.processed()), (0, 60));
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("out/job1/manifest.json.out")).unwrap()).unwrap();
    assert_eq!((manifest["successRecordCount"].as_u64(), manifest["inputTokenCount"].as_u64()), (Some(60), Some(420)));
    // One control-table row per shard, whichever worker ran it.
    let table = ControlTable::for_output(&rt.stores, &format!("file://{}/out/", dir.path().display())).unwrap();
    assert_eq!(table.recorded().await.unwrap().len(), 12);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_worker_fails_the_job_and_the_coordinator_keeps_what_committed() {
    let dir = tempfile::tempdir().unwrap();
    write_input(dir.path(), 1, 30);
    let (url, calls) = router().await;
    let rt = runtime(&url);
    // Worker 1 of 3 failed for good on its shard 1 (what it leaves behind), worker 2 runs.
    let failed = dir.path().join("out/job1/_mantle/failed/initial");
    std::fs::create_dir_all(&failed).unwrap();
    std::fs::write(failed.join("1.json"), json!({"worker": 1, "error": "disk on fire", "shards": [1]}).to_string())
        .unwrap();
    let (coordinator, worker2) = tokio::join!(
        run(job(dir.path(), Worker { index: 0, count: 3 }), &rt),
        run(job(dir.path(), Worker { index: 1 + 1, count: 3 }), &rt),
    );
    assert_eq!(worker2.0.as_ref().ok(), Some(&Outcome::Finished));
    match coordinator.0 {
        Err(JobError::Worker { worker: 1, error }) => assert_eq!(error, "disk on fire"),
        other => panic!("the job fails with worker 1's error: {other:?}"),
    }
    // Shards 0, 2, 3, 5 (workers 0 and 2) committed and are in the output once; 1 and 4 are not.
    let ids = output_ids(dir.path());
    assert_eq!(ids.len(), 20, "{ids:?}");
    assert_eq!(calls.lock().unwrap().len(), 20);
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("out/job1/manifest.json.out")).unwrap()).unwrap();
    assert_eq!(manifest["processedRecordCount"], 20);
    let table = ControlTable::for_output(&rt.stores, &format!("file://{}/out/", dir.path().display())).unwrap();
    let rows = table.recorded().await.unwrap();
    assert_eq!(rows.len(), 5, "four committed shards and worker 1's failed one: {rows:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_waiting_for_the_plan_ends_when_the_coordinator_cannot_plan() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("in")).unwrap();
    let (url, _) = router().await;
    let rt = runtime(&url);
    let (coordinator, worker1) = tokio::join!(
        run(job(dir.path(), Worker { index: 0, count: 2 }), &rt),
        run(job(dir.path(), Worker { index: 1, count: 2 }), &rt),
    );
    assert!(matches!(coordinator.0, Err(JobError::NoInput(_))), "{:?}", coordinator.0);
    match worker1.0 {
        Err(JobError::Worker { worker: 0, error }) => assert!(error.starts_with("no .jsonl input"), "{error}"),
        other => panic!("worker 1 ends with the coordinator's error: {other:?}"),
    }
}
