//! Reconcile against a mocked API server, in controller-rs's style: the requests each reconcile
//! makes, in order, with the server-side-apply bodies, the status written and the Events; the
//! error path; pruning, and no pruning while the plan has a problem.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::batch::v1::{Job, JobCondition, JobSpec, JobStatus};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher;
use mantle_crds::{
    BatchJob, BatchJobPhase, BatchJobStatus, Cell, FoundationModel, Manifest, ProvisionedThroughput, Rerun,
};
use mantle_operator::batch::BatchOptions;
use mantle_operator::controller::{
    Context, Error, error_policy, reconcile_batch_job, reconcile_cell, reconcile_model, reconcile_provisioned,
};
use mantle_operator::metrics::Metrics;
use mantle_operator::render::RenderOptions;
use serde_json::{Value, json};

/// One request the operator made: method, path and query, body.
#[derive(Clone, Debug)]
struct Call {
    method: String,
    uri: String,
    body: Value,
}

impl Call {
    fn short(&self) -> String {
        format!("{} {}", self.method, self.uri.split('?').next().unwrap_or_default())
    }
}

/// Answers as the API server would: an apply echoes the object (a status apply, the resource
/// from `known` with that status), a delete answers Success, an event is created. `fail` makes
/// requests whose path contains it answer 500.
fn api_server(
    calls: Arc<Mutex<Vec<Call>>>,
    known: Arc<Vec<Value>>,
    fail: Option<&'static str>,
) -> impl tower::Service<Request<kube::client::Body>, Response = Response<Body>, Error = Infallible, Future = impl Send>
+ Send
+ Clone {
    tower::service_fn(move |request: Request<kube::client::Body>| {
        let (calls, known) = (calls.clone(), known.clone());
        async move {
            let method = request.method().to_string();
            let uri = request.uri().to_string();
            let bytes = request.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            calls.lock().unwrap().push(Call { method: method.clone(), uri: uri.clone(), body: body.clone() });
            if fail.is_some_and(|f| uri.contains(f)) {
                let status = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": "etcd is unhappy", "reason": "InternalError", "code": 500});
                let mut response = Response::new(Body::from(status.to_string()));
                *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                return Ok(response);
            }
            let path = uri.split('?').next().unwrap_or_default().to_string();
            let answer = match method.as_str() {
                "DELETE" => json!({"kind": "Status", "apiVersion": "v1", "status": "Success", "metadata": {}}),
                // A read of a known object (by the last path segment).
                "GET" => known
                    .iter()
                    .find(|o| o["metadata"]["name"].as_str().is_some_and(|n| path.ends_with(&format!("/{n}"))))
                    .cloned()
                    .unwrap_or(Value::Null),
                _ if uri.split('?').next().unwrap_or_default().ends_with("/status") => {
                    let path = uri.split('?').next().unwrap_or_default();
                    let name = path.trim_end_matches("/status").rsplit('/').next().unwrap_or_default();
                    // An apply names the kind; a merge patch does not.
                    let mut object = known
                        .iter()
                        .find(|o| {
                            (body["kind"].is_null() || o["kind"] == body["kind"]) && o["metadata"]["name"] == name
                        })
                        .cloned()
                        .unwrap_or(Value::Null);
                    object["status"] = body["status"].clone();
                    object
                }
                _ => {
                    let mut object = body;
                    if object["metadata"].is_null() {
                        object["metadata"] = json!({"name": "x"});
                    }
                    object
                }
            };
            Ok(Response::new(Body::from(answer.to_string())))
        }
    })
}

fn store<K: kube::Resource<DynamicType = ()> + Clone>(items: Vec<K>) -> Store<K> {
    // As a watch's first list fills it: then it is ready.
    let (store, mut writer) = reflector::store();
    writer.apply_watcher_event(&watcher::Event::Init);
    for item in items {
        writer.apply_watcher_event(&watcher::Event::InitApply(item));
    }
    writer.apply_watcher_event(&watcher::Event::InitDone);
    store
}

struct Fixture {
    calls: Arc<Mutex<Vec<Call>>>,
    ctx: Arc<Context>,
}

/// The examples, in namespace `models`, with uids and generations as the API server gives them.
fn resources() -> (Vec<FoundationModel>, Vec<ProvisionedThroughput>, Vec<Cell>) {
    let dir = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap()).join("../examples");
    let (mut models, mut provisioned, mut cells) = (Vec::new(), Vec::new(), Vec::new());
    for (_, m) in mantle_crds::read_manifest_dir(&dir).unwrap() {
        match m {
            Manifest::FoundationModel(mut x) => {
                x.metadata.namespace = Some("models".into());
                x.metadata.uid = Some(format!("uid-{}", x.metadata.name.clone().unwrap()));
                x.metadata.generation = Some(3);
                models.push(x);
            }
            Manifest::ProvisionedThroughput(mut x) => {
                x.metadata.namespace = Some("models".into());
                x.metadata.uid = Some("uid-pt".into());
                x.metadata.generation = Some(1);
                provisioned.push(x);
            }
            Manifest::Cell(mut x) => {
                x.metadata.namespace = Some("models".into());
                cells.push(x);
            }
            _ => {}
        }
    }
    (models, provisioned, cells)
}

fn fixture(
    models: Vec<FoundationModel>,
    provisioned: Vec<ProvisionedThroughput>,
    cells: Vec<Cell>,
    deployments: Vec<Deployment>,
    fail: Option<&'static str>,
) -> Fixture {
    fixture_with(models, provisioned, cells, deployments, Vec::new(), fail)
}

fn fixture_with(
    models: Vec<FoundationModel>,
    provisioned: Vec<ProvisionedThroughput>,
    cells: Vec<Cell>,
    deployments: Vec<Deployment>,
    daemonsets: Vec<DaemonSet>,
    fail: Option<&'static str>,
) -> Fixture {
    fixture_all(models, provisioned, cells, deployments, daemonsets, (Vec::new(), Vec::new()), fail)
}

fn fixture_all(
    models: Vec<FoundationModel>,
    provisioned: Vec<ProvisionedThroughput>,
    cells: Vec<Cell>,
    deployments: Vec<Deployment>,
    daemonsets: Vec<DaemonSet>,
    (batch_jobs, jobs): (Vec<BatchJob>, Vec<Job>),
    fail: Option<&'static str>,
) -> Fixture {
    let calls = Arc::new(Mutex::new(Vec::new()));
    let mut known: Vec<Value> = models.iter().map(|m| serde_json::to_value(m).unwrap()).collect();
    known.extend(provisioned.iter().map(|p| serde_json::to_value(p).unwrap()));
    known.extend(cells.iter().map(|c| serde_json::to_value(c).unwrap()));
    known.extend(batch_jobs.iter().map(|b| serde_json::to_value(b).unwrap()));
    let client = kube::Client::new(api_server(calls.clone(), Arc::new(known), fail), "default");
    let recorder = Recorder::new(client.clone(), Reporter { controller: "mantle-operator".into(), instance: None });
    let ctx = Context {
        client,
        models: store(models),
        provisioned: store(provisioned),
        cells: store(cells),
        deployments: store(deployments),
        daemonsets: store(daemonsets),
        nodes: store(Vec::new()),
        batch_jobs: store(batch_jobs),
        jobs: store(jobs),
        options: RenderOptions::default(),
        batch: BatchOptions::default(),
        recorder,
        metrics: Metrics::new(),
        failures: Default::default(),
        demand: Default::default(),
        autoscaler: Default::default(),
    };
    Fixture { calls, ctx: Arc::new(ctx) }
}

impl Fixture {
    fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }
}

fn smollm2(models: &[FoundationModel]) -> Arc<FoundationModel> {
    Arc::new(models.iter().find(|m| m.metadata.name.as_deref() == Some("smollm2-135m-instruct")).unwrap().clone())
}

#[tokio::test]
async fn a_model_is_applied_pool_by_pool_then_its_status_then_an_event() {
    let (models, provisioned, cells) = resources();
    let model = smollm2(&models);
    let f = fixture(models, provisioned, cells, Vec::new(), None);
    reconcile_model(model, f.ctx.clone()).await.unwrap();
    let calls = f.calls();
    let shorts: Vec<String> = calls.iter().map(Call::short).collect();
    let ns = "/namespaces/models";
    assert_eq!(
        shorts,
        [
            format!("PATCH /apis/apps/v1{ns}/deployments/smollm2-135m-instruct-cell-a"),
            format!("PATCH /api/v1{ns}/services/smollm2-135m-instruct-cell-a"),
            format!("PATCH /apis/policy/v1{ns}/poddisruptionbudgets/smollm2-135m-instruct-cell-a"),
            format!("PATCH /apis/apps/v1{ns}/deployments/smollm2-135m-instruct-cell-b"),
            format!("PATCH /api/v1{ns}/services/smollm2-135m-instruct-cell-b"),
            format!("PATCH /apis/policy/v1{ns}/poddisruptionbudgets/smollm2-135m-instruct-cell-b"),
            // Its weightCache.prewarm: the DaemonSet that keeps the weights on the selected nodes.
            format!("PATCH /apis/apps/v1{ns}/daemonsets/smollm2-135m-instruct-prewarm"),
            format!("PATCH /apis/mantle.dev/v1alpha1{ns}/foundationmodels/smollm2-135m-instruct/status"),
            format!("POST /apis/events.k8s.io/v1{ns}/events"),
        ]
    );
    let prewarm = &calls[6].body;
    assert_eq!(prewarm["kind"], "DaemonSet");
    assert_eq!(prewarm["spec"]["template"]["spec"]["containers"][0]["args"][0], "keep-cached");
    // Server-side apply, as the operator's field manager, forcing its fields.
    assert!(
        calls[0].uri.contains("fieldManager=mantle-operator") && calls[0].uri.contains("force=true"),
        "{}",
        calls[0].uri
    );
    let deployment = &calls[0].body;
    assert_eq!(deployment["kind"], "Deployment");
    assert_eq!(deployment["metadata"]["ownerReferences"][0]["uid"], "uid-smollm2-135m-instruct");
    assert_eq!(deployment["spec"]["template"]["metadata"]["labels"]["mantle.dev/cell"], "cell-a");
    // The status: nothing ready yet; in each Cell the model's shared replica and its
    // reservation's dedicated one.
    let status = &calls[7].body["status"];
    assert_eq!(status["phase"], "Pending");
    assert_eq!(status["weightsCached"], "0/0 nodes");
    let cached = status["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "WeightsCached").unwrap();
    assert_eq!((cached["status"].as_str(), cached["reason"].as_str()), (Some("False"), Some("Prewarming")));
    assert_eq!(status["observedGeneration"], 3);
    assert_eq!(
        status["cells"],
        json!([{"cell": "cell-a", "ready": 0, "desired": 2}, {"cell": "cell-b", "ready": 0, "desired": 2}])
    );
    assert_eq!(status["endpoints"].as_array().unwrap().len(), 4);
    assert_eq!(status["endpoints"][0], "smollm2-135m-instruct-cell-a.models.svc:50051");
    let available = status["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "Available").unwrap();
    assert_eq!((available["status"].as_str(), available["reason"].as_str()), (Some("False"), Some("ReplicasNotReady")));
    let event = &calls[8].body;
    assert_eq!((event["reason"].as_str(), event["type"].as_str()), (Some("PoolsApplied"), Some("Normal")));
    assert_eq!(event["regarding"]["name"], "smollm2-135m-instruct");
    assert!(f.ctx.metrics.render().contains("mantle_operator_reconciles_total{kind=\"FoundationModel\"} 1"));
}

fn owned_deployment(name: &str, owner_kind: &str, owner: &str) -> Deployment {
    serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": "models",
            "ownerReferences": [{"apiVersion": "mantle.dev/v1alpha1", "kind": owner_kind, "name": owner, "uid": "u", "controller": true}]},
        "spec": {"selector": {}, "template": {}},
        "status": {"readyReplicas": 1}
    }))
    .unwrap()
}

#[tokio::test]
async fn a_pool_the_plan_no_longer_has_is_deleted_but_not_while_the_plan_has_a_problem() {
    let (models, provisioned, cells) = resources();
    let model = smollm2(&models);
    let stale = owned_deployment("smollm2-135m-instruct-cell-old", "FoundationModel", "smollm2-135m-instruct");
    let f = fixture(models.clone(), provisioned.clone(), cells.clone(), vec![stale.clone()], None);
    reconcile_model(model.clone(), f.ctx.clone()).await.unwrap();
    let deletes: Vec<String> = f.calls().iter().filter(|c| c.method == "DELETE").map(Call::short).collect();
    assert_eq!(
        deletes,
        [
            "DELETE /apis/apps/v1/namespaces/models/deployments/smollm2-135m-instruct-cell-old",
            "DELETE /api/v1/namespaces/models/services/smollm2-135m-instruct-cell-old",
            "DELETE /apis/policy/v1/namespaces/models/poddisruptionbudgets/smollm2-135m-instruct-cell-old",
        ]
    );
    // Cell b is gone from the cluster: its pool is not planned, yet nothing is deleted, and the
    // model says why.
    let cells: Vec<Cell> = cells.into_iter().filter(|c| c.metadata.name.as_deref() != Some("cell-b")).collect();
    let serving_b = owned_deployment("smollm2-135m-instruct-cell-b", "FoundationModel", "smollm2-135m-instruct");
    let f = fixture(models, provisioned, cells, vec![serving_b], None);
    reconcile_model(model, f.ctx.clone()).await.unwrap();
    let calls = f.calls();
    assert!(calls.iter().all(|c| c.method != "DELETE"), "{:?}", calls.iter().map(Call::short).collect::<Vec<_>>());
    let status = &calls.iter().find(|c| c.uri.contains("/status")).unwrap().body["status"];
    let degraded = status["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "Degraded").unwrap();
    assert_eq!((degraded["status"].as_str(), degraded["reason"].as_str()), (Some("True"), Some("CellNotFound")));
    let event = &calls.last().unwrap().body;
    assert_eq!((event["type"].as_str(), event["reason"].as_str()), (Some("Warning"), Some("CellNotFound")));
    assert!(event["note"].as_str().unwrap().contains("cell-b"));
}

#[tokio::test]
async fn an_invalid_spec_is_reported_and_nothing_is_applied() {
    let (mut models, provisioned, cells) = resources();
    let model = models.iter_mut().find(|m| m.metadata.name.as_deref() == Some("smollm2-135m-instruct")).unwrap();
    model.spec.replicas.min = 9;
    model.spec.replicas.max = 2;
    let model = Arc::new(model.clone());
    let f = fixture(models, provisioned, cells, Vec::new(), None);
    reconcile_model(model, f.ctx.clone()).await.unwrap();
    let calls = f.calls();
    assert_eq!(calls.len(), 2, "{:?}", calls.iter().map(Call::short).collect::<Vec<_>>());
    let status = &calls[0].body["status"];
    assert_eq!(status["phase"], "Failed");
    assert_eq!(status["conditions"][0]["type"], "SpecValid");
    assert_eq!(status["conditions"][0]["status"], "False");
    assert!(status["conditions"][0]["message"].as_str().unwrap().contains("replicas.min"));
    assert_eq!(calls[1].body["reason"], "InvalidSpec");
}

#[tokio::test]
async fn an_api_error_fails_the_reconcile_which_is_retried() {
    let (models, provisioned, cells) = resources();
    let model = smollm2(&models);
    let f = fixture(models, provisioned, cells, Vec::new(), Some("/deployments/"));
    let error = reconcile_model(model.clone(), f.ctx.clone()).await.unwrap_err();
    assert!(matches!(&error, Error::Apply { kind: "Deployment", .. }), "{error}");
    assert!(error.to_string().contains("smollm2-135m-instruct-cell-a"), "{error}");
    // Nothing after the failed apply: no status, no event.
    assert_eq!(f.calls().len(), 1);
    // Retried with backoff: 5 s, then 10 s, 20 s…
    let requeue = |s| format!("{:?}", kube::runtime::controller::Action::requeue(std::time::Duration::from_secs(s)));
    for seconds in [5, 10, 20] {
        assert_eq!(format!("{:?}", error_policy(model.clone(), &error, f.ctx.clone())), requeue(seconds));
    }
    assert!(f.ctx.metrics.render().contains("mantle_operator_reconcile_errors_total{kind=\"FoundationModel\"} 1"));
}

#[tokio::test]
async fn a_reservation_gets_its_dedicated_pools_and_its_arn() {
    let (models, provisioned, cells) = resources();
    let pt = Arc::new(provisioned[0].clone());
    let f = fixture(models, provisioned, cells, Vec::new(), None);
    reconcile_provisioned(pt, f.ctx.clone()).await.unwrap();
    let calls = f.calls();
    let applied: Vec<&str> = calls
        .iter()
        .filter(|c| c.uri.contains("/deployments/"))
        .map(|c| c.body["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        applied,
        ["smollm2-135m-instruct-cell-a-analytics-smollm2", "smollm2-135m-instruct-cell-b-analytics-smollm2"]
    );
    let deployment = &calls[0].body;
    assert_eq!(deployment["metadata"]["labels"]["mantle.dev/pool"], "analytics");
    assert_eq!(deployment["metadata"]["ownerReferences"][0]["kind"], "ProvisionedThroughput");
    let status = &calls.iter().find(|c| c.uri.contains("/status")).unwrap().body["status"];
    assert_eq!(status["arn"], "arn:mantle:bedrock:cell-a:models:provisioned-model/analytics-smollm2");
    assert_eq!(
        (status["provisionedReplicas"].as_i64(), status["capacityTokensPerMinute"].as_i64()),
        (Some(2), Some(120_000))
    );
    assert_eq!(status["phase"], "Creating");
}

#[tokio::test]
async fn a_reservation_for_an_unknown_model_fails_with_a_reason_and_an_event() {
    let (models, mut provisioned, cells) = resources();
    provisioned[0].spec.model_id = "acme.nothing-v1:0".into();
    let pt = Arc::new(provisioned[0].clone());
    let f = fixture(models, provisioned, cells, Vec::new(), None);
    reconcile_provisioned(pt, f.ctx.clone()).await.unwrap();
    let calls = f.calls();
    assert!(calls.iter().all(|c| !c.uri.contains("/deployments/")));
    let status = &calls.iter().find(|c| c.uri.contains("/status")).unwrap().body["status"];
    assert_eq!(status["phase"], "Failed");
    let available = status["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "Available").unwrap();
    assert_eq!(available["reason"], "ModelNotFound");
    let event = &calls.last().unwrap().body;
    assert_eq!((event["type"].as_str(), event["reason"].as_str()), (Some("Warning"), Some("ModelNotFound")));
}

#[tokio::test]
async fn a_cell_reports_its_health_and_says_when_it_changes() {
    let (models, provisioned, cells) = resources();
    let cell = Arc::new(cells.iter().find(|c| c.metadata.name.as_deref() == Some("cell-a")).unwrap().clone());
    let f = fixture(models, provisioned, cells, Vec::new(), None);
    reconcile_cell(cell, f.ctx.clone()).await.unwrap();
    let calls = f.calls();
    let shorts: Vec<String> = calls.iter().map(Call::short).collect();
    assert_eq!(
        shorts,
        [
            "PATCH /apis/mantle.dev/v1alpha1/namespaces/models/cells/cell-a/status",
            "POST /apis/events.k8s.io/v1/namespaces/models/events",
        ]
    );
    let status = &calls[0].body["status"];
    // No node matches (none are known) and its pools want replicas: Unhealthy, said in an Event.
    assert_eq!((status["health"].as_str(), status["readyNodes"].as_i64()), (Some("Unhealthy"), Some(0)));
    assert_eq!(status["modelsPlaced"], json!(["models/all-minilm-l6-v2", "models/smollm2-135m-instruct"]));
    assert_eq!((calls[1].body["reason"].as_str(), calls[1].body["type"].as_str()), (Some("Health"), Some("Warning")));
}

#[tokio::test]
async fn the_routers_queue_sizes_a_shared_pool_within_its_bounds() {
    let (models, provisioned, cells) = resources();
    let model = smollm2(&models);
    // The shared pools run one replica each now.
    let running = |name: &str| {
        let mut d = owned_deployment(name, "FoundationModel", "smollm2-135m-instruct");
        d.metadata.labels = Some(
            [
                ("mantle.dev/foundation-model".to_string(), "smollm2-135m-instruct".to_string()),
                ("app.kubernetes.io/managed-by".to_string(), "mantle-operator".to_string()),
            ]
            .into(),
        );
        d.spec.as_mut().unwrap().replicas = Some(1);
        d
    };
    let deployments = vec![running("smollm2-135m-instruct-cell-a"), running("smollm2-135m-instruct-cell-b")];
    let f = fixture(models, provisioned, cells, deployments, None);
    // 96 requests wait in the routers for the model (target 16 per replica): 48 per Cell's pool,
    // 3 replicas each.
    *f.ctx.demand.lock().unwrap() = Some([("huggingfacetb.smollm2-135m-instruct-v1:0".to_string(), 96.0)].into());
    reconcile_model(model, f.ctx.clone()).await.unwrap();
    let replicas: Vec<(String, i64)> = f
        .calls()
        .iter()
        .filter(|c| c.uri.contains("/deployments/"))
        .map(|c| {
            (c.body["metadata"]["name"].as_str().unwrap().to_string(), c.body["spec"]["replicas"].as_i64().unwrap())
        })
        .collect();
    assert_eq!(
        replicas,
        [("smollm2-135m-instruct-cell-a".to_string(), 3), ("smollm2-135m-instruct-cell-b".to_string(), 3)]
    );
}

fn prewarm_daemonset(ready: i32, desired: i32) -> DaemonSet {
    serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "DaemonSet",
        "metadata": {"name": "smollm2-135m-instruct-prewarm", "namespace": "models",
            "labels": {"app.kubernetes.io/managed-by": "mantle-operator"}},
        "spec": {"selector": {}, "template": {}},
        "status": {"numberReady": ready, "desiredNumberScheduled": desired, "currentNumberScheduled": desired,
            "numberMisscheduled": 0}
    }))
    .unwrap()
}

#[tokio::test]
async fn the_status_counts_warm_nodes_and_a_model_without_prewarm_loses_its_daemonset() {
    let (models, provisioned, cells) = resources();
    let model = smollm2(&models);
    let f = fixture_with(
        models.clone(),
        provisioned.clone(),
        cells.clone(),
        Vec::new(),
        vec![prewarm_daemonset(2, 3)],
        None,
    );
    reconcile_model(model.clone(), f.ctx.clone()).await.unwrap();
    let calls = f.calls();
    let status = &calls.iter().find(|c| c.uri.contains("/status")).unwrap().body["status"];
    assert_eq!(status["weightsCached"], "2/3 nodes");
    let cached = status["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "WeightsCached").unwrap();
    assert_eq!(cached["status"], "False");
    assert_eq!(cached["message"], "the weights are cached on 2 of 3 nodes");

    // Prewarm taken out of the spec: the DaemonSet goes, and the status says nothing of caching.
    let mut plain = (*model).clone();
    plain.spec.weight_cache.prewarm = None;
    let models: Vec<FoundationModel> =
        models.into_iter().map(|m| if m.metadata.name == plain.metadata.name { plain.clone() } else { m }).collect();
    let f = fixture_with(models, provisioned, cells, Vec::new(), vec![prewarm_daemonset(3, 3)], None);
    reconcile_model(Arc::new(plain), f.ctx.clone()).await.unwrap();
    let calls = f.calls();
    assert!(
        calls
            .iter()
            .any(|c| c.short() == "DELETE /apis/apps/v1/namespaces/models/daemonsets/smollm2-135m-instruct-prewarm")
    );
    assert!(!calls.iter().any(|c| c.method == "PATCH" && c.uri.contains("/daemonsets/")));
    let status = &calls.iter().find(|c| c.uri.contains("/status")).unwrap().body["status"];
    assert!(status.get("weightsCached").is_none());
}

fn batch_job(name: &str, reuse: Option<&str>, phase: Option<BatchJobPhase>) -> BatchJob {
    let mut job: BatchJob = serde_json::from_value(json!({
        "apiVersion": "mantle.dev/v1alpha1", "kind": "BatchJob",
        "metadata": {"name": name, "namespace": "models", "uid": format!("uid-{name}"), "generation": 1,
                     "creationTimestamp": "2026-12-01T00:00:00Z"},
        "spec": {"modelId": "huggingfacetb.smollm2-135m-instruct-v1:0",
                 "input": {"uri": "s3://lake/in/"}, "output": {"uri": "s3://lake/out/"},
                 "credentialsSecretRef": {"name": "lake-keys"}}
    }))
    .unwrap();
    job.spec.reuse_from = reuse.map(|n| mantle_crds::ReuseFrom { job_name: n.into() });
    job.status = phase.map(|p| BatchJobStatus { phase: Some(p), ..Default::default() });
    job
}

/// A worker Job as the operator made it, with the status Kubernetes gave it.
fn worker_job(name: &str, suspend: bool, active: i32, condition: Option<(&str, &str)>) -> Job {
    Job {
        metadata: kube::api::ObjectMeta {
            name: Some(name.into()),
            namespace: Some("models".into()),
            ..Default::default()
        },
        spec: Some(JobSpec { suspend: Some(suspend), ..Default::default() }),
        status: Some(JobStatus {
            active: Some(active),
            conditions: condition.map(|(type_, reason)| {
                vec![JobCondition {
                    type_: type_.into(),
                    status: "True".into(),
                    reason: Some(reason.into()),
                    message: Some("Job has reached the specified backoff limit".into()),
                    ..Default::default()
                }]
            }),
            ..Default::default()
        }),
    }
}

fn batch_fixture(batch_jobs: Vec<BatchJob>, jobs: Vec<Job>) -> Fixture {
    let (models, provisioned, cells) = resources();
    fixture_all(models, provisioned, cells, Vec::new(), Vec::new(), (batch_jobs, jobs), None)
}

const BATCH: &str = "/apis/mantle.dev/v1alpha1/namespaces/models/batchjobs";

#[tokio::test]
async fn a_batch_job_gets_its_arn_and_an_indexed_job_of_workers_sized_by_the_serving_replicas() {
    let job = batch_job("summaries", None, None);
    let f = batch_fixture(vec![job.clone()], Vec::new());
    reconcile_batch_job(Arc::new(job), f.ctx.clone()).await.unwrap();
    let calls = f.calls();
    let shorts: Vec<String> = calls.iter().map(Call::short).collect();
    assert_eq!(
        shorts,
        [
            "PATCH /apis/batch/v1/namespaces/models/jobs/summaries-initial".to_string(),
            format!("PATCH {BATCH}/summaries/status"),
            "POST /apis/events.k8s.io/v1/namespaces/models/events".to_string(),
        ]
    );
    let worker = &calls[0].body;
    assert!(calls[0].uri.contains("fieldManager=mantle-operator"), "server-side apply");
    assert_eq!(worker["spec"]["completionMode"], "Indexed");
    // The examples serve the model with one shared replica in each of two Cells (the third is
    // the reservation's, which batch does not use).
    assert_eq!((worker["spec"]["completions"].as_i64(), worker["spec"]["parallelism"].as_i64()), (Some(2), Some(2)));
    assert_eq!(worker["metadata"]["ownerReferences"][0]["uid"], "uid-summaries");
    let pod = &worker["spec"]["template"]["spec"];
    assert_eq!(pod["containers"][0]["args"], json!(["run", "--batch-job", "summaries", "--workers", "2"]));
    assert_eq!(pod["containers"][0]["envFrom"][0]["secretRef"]["name"], "lake-keys");
    assert_eq!(worker["spec"]["podFailurePolicy"]["rules"][0]["onExitCodes"]["values"], json!([2]));
    let status = &calls[1].body["status"];
    assert_eq!(status["phase"], "Scheduled");
    assert_eq!(status["runId"], "initial");
    assert!(
        status["jobArn"]
            .as_str()
            .unwrap()
            .ends_with(&format!("model-invocation-job/{}", batch_job("summaries", None, None).job_id()))
    );
    assert_eq!(status["jobExpirationTime"], "2026-12-02T00:00:00Z", "24 hours after its submission");
    assert_eq!(calls[2].body["reason"], "WorkersStarted");
}

#[tokio::test]
async fn a_job_waits_for_the_job_it_reuses_and_fails_when_that_one_failed() {
    let waiting = batch_job("m2", Some("m1"), None);
    let f = batch_fixture(vec![waiting.clone(), batch_job("m1", None, Some(BatchJobPhase::InProgress))], Vec::new());
    reconcile_batch_job(Arc::new(waiting.clone()), f.ctx.clone()).await.unwrap();
    let calls = f.calls();
    assert_eq!(
        calls.iter().map(Call::short).collect::<Vec<_>>(),
        [format!("PATCH {BATCH}/m2/status")],
        "no workers yet"
    );
    assert_eq!(calls[0].body["status"]["phase"], "Scheduled");
    assert!(calls[0].body["status"]["message"].as_str().unwrap().contains("waiting for job m1"));
    let f = batch_fixture(vec![waiting.clone(), batch_job("m1", None, Some(BatchJobPhase::Failed))], Vec::new());
    reconcile_batch_job(Arc::new(waiting), f.ctx.clone()).await.unwrap();
    let calls = f.calls();
    assert_eq!(calls[0].body["status"]["phase"], "Failed");
    assert!(calls[0].body["status"]["endTime"].is_string());
    assert_eq!(calls[1].body["reason"], "ReuseFailed");
}

#[tokio::test]
async fn a_worker_job_that_failed_ends_the_batch_job_failed_with_its_reason() {
    let job = batch_job("summaries", None, Some(BatchJobPhase::InProgress));
    let failed = worker_job("summaries-initial", false, 0, Some(("Failed", "FailedIndexes")));
    let f = batch_fixture(vec![job.clone()], vec![failed]);
    reconcile_batch_job(Arc::new(job), f.ctx.clone()).await.unwrap();
    let calls = f.calls();
    // The job is read afresh first: its coordinator may have written the end meanwhile.
    assert_eq!(calls[0].short(), format!("GET {BATCH}/summaries"));
    let status = &calls[1].body["status"];
    assert_eq!(status["phase"], "Failed");
    assert!(status["message"].as_str().unwrap().contains("backoff limit"), "{status}");
    assert_eq!((calls[2].body["reason"].as_str(), calls[2].body["type"].as_str()), (Some("Failed"), Some("Warning")));
}

#[tokio::test]
async fn stop_suspends_the_workers_and_a_suspended_job_without_workers_ends_stopped() {
    let mut job = batch_job("summaries", None, Some(BatchJobPhase::InProgress));
    job.spec.stop = true;
    let running = worker_job("summaries-initial", false, 2, None);
    let f = batch_fixture(vec![job.clone()], vec![running]);
    reconcile_batch_job(Arc::new(job.clone()), f.ctx.clone()).await.unwrap();
    let calls = f.calls();
    assert_eq!(calls[0].short(), "PATCH /apis/batch/v1/namespaces/models/jobs/summaries-initial");
    assert_eq!(calls[0].body, json!({"spec": {"suspend": true}}));
    assert_eq!(calls[1].body["status"]["phase"], "Stopping");
    // The workers are gone without writing an end (they never started): Stopped.
    let suspended = worker_job("summaries-initial", true, 0, None);
    let f = batch_fixture(vec![job.clone()], vec![suspended]);
    reconcile_batch_job(Arc::new(job), f.ctx.clone()).await.unwrap();
    assert_eq!(f.calls()[0].body["status"]["phase"], "Stopped");
}

#[tokio::test]
async fn a_new_rerun_id_on_an_ended_job_starts_a_new_run_and_an_ended_run_rests() {
    let mut job = batch_job("summaries", None, Some(BatchJobPhase::Completed));
    job.status.as_mut().unwrap().run_id = Some("initial".into());
    job.status.as_mut().unwrap().job_arn = Some("arn".into());
    job.status.as_mut().unwrap().observed_generation = Some(1);
    let f = batch_fixture(vec![job.clone()], Vec::new());
    reconcile_batch_job(Arc::new(job.clone()), f.ctx.clone()).await.unwrap();
    assert!(f.calls().is_empty(), "an ended run rests: {:?}", f.calls());
    job.spec.partition_key = Some("customerId".into());
    job.spec.rerun =
        Some(Rerun { id: "fix-c3".into(), failed: false, partition: Some("C3".into()), record_id_hash_prefix: None });
    let f = batch_fixture(vec![job.clone()], Vec::new());
    reconcile_batch_job(Arc::new(job), f.ctx.clone()).await.unwrap();
    let calls = f.calls();
    assert_eq!(calls[0].short(), "POST /apis/events.k8s.io/v1/namespaces/models/events");
    assert_eq!(calls[0].body["reason"], "Rerun");
    assert_eq!(calls[1].short(), "PATCH /apis/batch/v1/namespaces/models/jobs/summaries-fix-c3");
    let status = &calls[2].body["status"];
    assert_eq!((status["phase"].as_str(), status["runId"].as_str()), (Some("Scheduled"), Some("fix-c3")));
    assert_eq!(status["endTime"], Value::Null, "the last run's end is cleared");
}
