//! `--kubernetes`: the router fills its models and runners from a (mocked) API server — list
//! then watch FoundationModels, ProvisionedThroughputs, Cells and labelled EndpointSlices — and
//! serves a request through the runner it found (not the one in a Disabled Cell).

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use mantle_router::test_support::{StandInConfig, stand_in};
use mantle_router::{Platform, RouterConfig};
use serde_json::json;
use tower::ServiceExt;

const MODEL: &str = "huggingfacetb.smollm2-135m-instruct-v1:0";

/// Answers lists with fixed items and holds watches open; records every request path.
fn api_server(
    runner_port: u16,
    seen: Arc<Mutex<Vec<String>>>,
) -> impl tower::Service<Request<kube::client::Body>, Response = Response<Body>, Error = Infallible, Future = impl Send>
+ Send
+ Clone {
    tower::service_fn(move |request: Request<kube::client::Body>| {
        let seen = seen.clone();
        async move {
            let uri = request.uri().to_string();
            seen.lock().unwrap().push(uri.clone());
            if uri.contains("watch=true") {
                let pending = tokio_stream::pending::<Result<Bytes, Infallible>>();
                return Ok(Response::new(Body::from_stream(pending)));
            }
            let list = if uri.starts_with("/apis/mantle.dev/v1alpha1/foundationmodels") {
                json!({"apiVersion": "mantle.dev/v1alpha1", "kind": "FoundationModelList", "metadata": {"resourceVersion": "1"},
                    "items": [{"apiVersion": "mantle.dev/v1alpha1", "kind": "FoundationModel",
                        "metadata": {"name": "smollm2", "namespace": "models", "resourceVersion": "1"},
                        "spec": {"modelId": MODEL, "provider": "HuggingFaceTB", "modality": "TEXT",
                            "source": {"uri": "s3://m/smollm2.gguf", "format": "gguf"}, "contextLength": 8192}}]})
            } else if uri.starts_with("/apis/mantle.dev/v1alpha1/provisionedthroughputs") {
                json!({"apiVersion": "mantle.dev/v1alpha1", "kind": "ProvisionedThroughputList", "metadata": {"resourceVersion": "1"}, "items": []})
            } else if uri.starts_with("/apis/mantle.dev/v1alpha1/cells") {
                let cell = |name: &str, state: &str| {
                    json!({"apiVersion": "mantle.dev/v1alpha1", "kind": "Cell",
                    "metadata": {"name": name, "namespace": "mantle-system", "resourceVersion": "1"},
                    "spec": {"region": "local", "nodeSelector": {"mantle.dev/cell": name}, "state": state, "shuffleShardSize": 1}})
                };
                json!({"apiVersion": "mantle.dev/v1alpha1", "kind": "CellList", "metadata": {"resourceVersion": "1"},
                    "items": [cell("cell-a", "Active"), cell("cell-b", "Disabled")]})
            } else if uri.starts_with("/apis/discovery.k8s.io/v1/endpointslices") {
                let slice = |name: &str, cell: &str, address: &str| {
                    json!({
                    "metadata": {"name": name, "namespace": "models", "resourceVersion": "1",
                        "labels": {"mantle.dev/foundation-model": "smollm2", "mantle.dev/cell": cell}},
                    "addressType": "IPv4",
                    "endpoints": [{"addresses": [address], "conditions": {"ready": true}}],
                    "ports": [{"name": "grpc", "port": runner_port, "protocol": "TCP"}]})
                };
                json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSliceList", "metadata": {"resourceVersion": "1"},
                    "items": [slice("smollm2-abc", "cell-a", "127.0.0.1"), slice("smollm2-def", "cell-b", "127.0.0.2")]})
            } else {
                let mut response = Response::new(Body::from("not found"));
                *response.status_mut() = StatusCode::NOT_FOUND;
                return Ok(response);
            };
            Ok(Response::new(Body::from(list.to_string())))
        }
    })
}

#[tokio::test]
async fn models_and_runners_come_from_the_cluster() {
    let runner = stand_in(StandInConfig::default()).await;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let client = kube::Client::new(api_server(runner.addr.port(), seen.clone()), "default");
    let (app, inference) =
        mantle_router::build(&RouterConfig::local("127.0.0.1:0".parse().unwrap()), Platform::default()).unwrap();
    let follow = tokio::spawn(mantle_router::kubernetes::follow(client, None, inference.clone()));

    let deadline = Instant::now() + Duration::from_secs(5);
    while !inference.live().runners.ready(MODEL) {
        assert!(
            Instant::now() < deadline,
            "the runner from the EndpointSlice never became ready; requests: {:?}",
            seen.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let live = inference.live();
    let runners = live.runners.for_model(MODEL);
    assert_eq!(runners.len(), 1, "cell-b is Disabled");
    assert_eq!(runners[0].spec.address, format!("http://127.0.0.1:{}", runner.addr.port()));
    assert_eq!(runners[0].spec.cell.as_deref(), Some("cell-a"));
    assert_eq!(live.cell_shards.get("cell-a"), Some(&1));
    let requests = seen.lock().unwrap().clone();
    assert!(
        requests.iter().any(|r| r.starts_with("/apis/discovery.k8s.io/v1/endpointslices?")
            && r.contains("labelSelector=mantle.dev%2Ffoundation-model")),
        "EndpointSlices are selected by label: {requests:?}"
    );
    assert!(requests.iter().any(|r| r.contains("watch=true")), "the caches keep watching: {requests:?}");

    tokio::time::sleep(Duration::from_millis(150)).await;
    let body =
        json!({"messages": [{"role": "user", "content": [{"text": "hi"}]}], "inferenceConfig": {"maxTokens": 4}});
    let request = Request::post("/model/huggingfacetb.smollm2-135m-instruct-v1%3A0/converse")
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    let response = app.oneshot(request).await.unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&bytes));
    follow.abort();
}

#[tokio::test]
async fn a_cluster_without_the_crds_is_a_clear_error_not_a_silent_wait() {
    let client = kube::Client::new(
        tower::service_fn(|_request: Request<kube::client::Body>| async {
            let status = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                "message": "the server could not find the requested resource", "reason": "NotFound", "code": 404});
            let mut response = Response::new(Body::from(status.to_string()));
            *response.status_mut() = StatusCode::NOT_FOUND;
            Ok::<_, Infallible>(response)
        }),
        "default",
    );
    let (_app, inference) =
        mantle_router::build(&RouterConfig::local("127.0.0.1:0".parse().unwrap()), Platform::default()).unwrap();
    let result =
        tokio::time::timeout(Duration::from_secs(5), mantle_router::kubernetes::follow(client, None, inference))
            .await
            .expect("follow gives up at once");
    let message = result.unwrap_err().to_string();
    assert!(message.contains("foundationmodels.mantle.dev") && message.contains("not installed"), "{message}");
}
