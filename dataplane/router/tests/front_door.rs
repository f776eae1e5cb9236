//! The router's front door and listener as an attacker or a careless client meets them, over
//! real sockets: refusals in the API's own shape, limits checked before a body is read, slow and
//! idle connections closed, a connection limit, bounded metric labels, readiness that means
//! able to admit, and runners that hang, die or demand a token.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use mantle_proto::auth::Token;
use mantle_router::inference::Inference;
use mantle_router::test_support::{Cuttable, RunningStandIn, StandInConfig, stand_in};
use mantle_router::{AuthConfig, Platform, RouterConfig, RunnerSpec, RunningRouter};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

mod support;

use support::{json_of, post, send};

const TEXT: &str = "acme.text-v1:0";
const CONVERSE: &str = "/model/acme.text-v1%3A0/converse";

fn platform(addresses: &[String]) -> Platform {
    Platform {
        models: vec![support::model(TEXT, "TEXT", "")],
        runners: addresses
            .iter()
            .map(|a| RunnerSpec { model: TEXT.into(), address: a.clone(), pool: None, cell: None })
            .collect(),
        ..Platform::default()
    }
}

fn converse_body(text: &str) -> String {
    json!({"messages": [{"role": "user", "content": [{"text": text}]}], "inferenceConfig": {"maxTokens": 16}})
        .to_string()
}

async fn wait_ready(inference: &Inference) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !inference.admits(TEXT) {
        assert!(Instant::now() < deadline, "the stand-in never became admissible");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The app (no listener) over one stand-in.
async fn app_with(config: RouterConfig, standin: StandInConfig) -> (axum::Router, Arc<Inference>, RunningStandIn) {
    let s = stand_in(standin).await;
    let (app, inference) = mantle_router::build(&config, platform(&[s.address()])).unwrap();
    wait_ready(&inference).await;
    (app, inference, s)
}

fn local() -> RouterConfig {
    RouterConfig::local("127.0.0.1:0".parse().unwrap())
}

fn keys_file() -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!(
        "mantle-door-keys-{}-{:?}.yaml",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::write(
        &path,
        "tenants:\n  - name: acme\n    accessKeys: [{accessKeyId: AKIDACME, secretAccessKey: s3cret}]\n    apiKeys: [mk-acme-0123456789abcdef]\n",
    )
    .unwrap();
    path
}

#[tokio::test]
async fn every_refusal_is_in_the_api_shape_and_bodies_up_to_the_limit_pass() {
    let (app, _inference, _s) = app_with(local(), StandInConfig::default()).await;
    // 3 MiB is over axum's 2 MiB default and under the 10 MiB limit: the door reads it, and the
    // router refuses it for what it is — far beyond the model's context — with both counts.
    let long = converse_body(&"word ".repeat(600_000));
    let (status, headers, body) = send(&app, post(CONVERSE, long)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{}", String::from_utf8_lossy(&body));
    assert_eq!(headers["x-amzn-ErrorType"], "ValidationException");
    let message = json_of(&body)["message"].as_str().unwrap().to_string();
    assert!(message.contains("3000") && message.contains("4096"), "{message}");

    let cases: Vec<(&str, Request<Body>, StatusCode, &str)> = vec![
        (
            "body over the limit",
            post(CONVERSE, vec![b' '; 11 << 20]),
            StatusCode::PAYLOAD_TOO_LARGE,
            "ValidationException",
        ),
        (
            "declared body over the limit",
            Request::post(CONVERSE).header("content-length", (64u64 << 20).to_string()).body(Body::empty()).unwrap(),
            StatusCode::PAYLOAD_TOO_LARGE,
            "ValidationException",
        ),
        (
            "a path that is not UTF-8",
            post("/model/%FF/converse", converse_body("x")),
            StatusCode::BAD_REQUEST,
            "ValidationException",
        ),
        (
            "headers over the limit",
            Request::post(CONVERSE)
                .header("x-filler", "a".repeat(100 << 10))
                .body(Body::from(converse_body("x")))
                .unwrap(),
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "ValidationException",
        ),
    ];
    for (name, request, status, kind) in cases {
        let (got, headers, body) = send(&app, request).await;
        assert_eq!(got, status, "{name}: {}", String::from_utf8_lossy(&body));
        assert_eq!(headers["x-amzn-ErrorType"], kind, "{name}");
        assert!(!json_of(&body)["message"].as_str().unwrap_or_default().is_empty(), "{name}");
        assert!(headers.contains_key("x-amzn-requestid") && headers.contains_key("x-request-id"), "{name}");
    }
    // OpenAI's paths answer in OpenAI's shape.
    let (status, _, body) = send(&app, post("/v1/chat/completions", vec![b' '; 11 << 20])).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(json_of(&body)["error"]["type"], "invalid_request_error");
}

#[tokio::test]
async fn request_ids_are_the_servers_and_reach_both_headers() {
    let (app, _inference, _s) = app_with(local(), StandInConfig::default()).await;
    let request = Request::post(CONVERSE)
        .header("content-type", "application/json")
        .header("x-amzn-requestid", "chosen-by-the-client")
        .body(Body::from(converse_body("x")))
        .unwrap();
    let (status, headers, _) = send(&app, request).await;
    assert_eq!(status, StatusCode::OK);
    let id = headers["x-amzn-requestid"].to_str().unwrap();
    assert_ne!(id, "chosen-by-the-client");
    assert_eq!(headers["x-request-id"], id);
}

#[tokio::test]
async fn unknown_model_ids_share_one_metric_label() {
    let (app, inference, _s) = app_with(local(), StandInConfig::default()).await;
    for i in 0..50 {
        let (status, ..) = send(&app, post(&format!("/model/acme.nope-{i}-v1%3A0/converse"), converse_body("x"))).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
    }
    let metrics = inference.metrics.render();
    assert!(!metrics.contains("acme.nope-"), "client strings became label values");
    assert!(metrics.contains("model=\"unknown\""), "{metrics}");
}

#[tokio::test]
async fn idle_token_buckets_are_pruned() {
    let (app, inference, _s) = app_with(local(), StandInConfig::default()).await;
    // With authentication off, each access key names a tenant with a bucket of its own.
    for i in 0..20 {
        let request = Request::post(CONVERSE)
            .header("content-type", "application/json")
            .header(
                "authorization",
                format!("AWS4-HMAC-SHA256 Credential=AKID{i}/20250101/us-east-1/bedrock/aws4_request, SignedHeaders=host, Signature={}", "0".repeat(64)),
            )
            .body(Body::from(converse_body("x")))
            .unwrap();
        assert_eq!(send(&app, request).await.0, StatusCode::OK);
    }
    // Refilled buckets are forgotten: the callers' strings do not add up.
    let deadline = Instant::now() + Duration::from_secs(5);
    while inference.rate_limit_buckets() > 0 {
        assert!(Instant::now() < deadline, "{} buckets never pruned", inference.rate_limit_buckets());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_deadline_beyond_any_clock_saturates_instead_of_wrapping() {
    let (app, _inference, _s) = app_with(local(), StandInConfig::default()).await;
    for deadline in ["18446744073709551615", "99999999999999999999999"] {
        let request = Request::post(CONVERSE)
            .header("content-type", "application/json")
            .header("x-amz-bedrock-deadline-ms", deadline)
            .body(Body::from(converse_body("x")))
            .unwrap();
        let (status, _, body) = send(&app, request).await;
        assert_eq!(status, StatusCode::OK, "{deadline}: {}", String::from_utf8_lossy(&body));
    }
}

#[tokio::test]
async fn ready_means_able_to_admit() {
    for _ in 0..5 {
        let s = stand_in(StandInConfig::default()).await;
        let (app, _inference) = mantle_router::build(&local(), platform(&[s.address()])).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let (status, ..) = send(&app, Request::get("/readyz").body(Body::empty()).unwrap()).await;
            if status == StatusCode::OK {
                break;
            }
            assert!(Instant::now() < deadline, "never ready");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let (status, _, body) = send(&app, post(CONVERSE, converse_body("x"))).await;
        assert_eq!(status, StatusCode::OK, "ready, then refused: {}", String::from_utf8_lossy(&body));
    }
}

// --- Over real sockets. ---

async fn serve(config: RouterConfig, addresses: &[String]) -> RunningRouter {
    let router = mantle_router::start(config, platform(addresses)).await.unwrap();
    wait_ready(&router.inference()).await;
    router
}

/// Reads until the peer closes (or `limit` passes), returning what arrived.
async fn read_until_closed(stream: &mut TcpStream, limit: Duration) -> Option<String> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.checked_duration_since(Instant::now())?;
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Some(String::from_utf8_lossy(&out).into_owned()),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => return None,
        }
    }
}

/// Reads one response head and its content-length body.
async fn read_response(stream: &mut TcpStream, limit: Duration) -> Option<String> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + limit;
    loop {
        let text = String::from_utf8_lossy(&out).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let length = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                })
                .unwrap_or(0);
            if out.len() >= end + 4 + length {
                return Some(text);
            }
        }
        let left = deadline.checked_duration_since(Instant::now())?;
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (!out.is_empty()).then_some(text),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => return None,
        }
    }
}

fn request_head(addr: SocketAddr, body: &str) -> String {
    format!(
        "POST {CONVERSE} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
}

#[tokio::test]
async fn slow_and_idle_connections_are_closed() {
    let s = stand_in(StandInConfig::default()).await;
    let mut config = local();
    config.connections.header_read_timeout = Duration::from_millis(300);
    let router = serve(config, &[s.address()]).await;
    // Slowloris: headers a byte at a time, never finished.
    let mut slow = TcpStream::connect(router.addr).await.unwrap();
    slow.write_all(b"POST /model/x/converse HTTP/1.1\r\nhost: a\r\n").await.unwrap();
    let started = Instant::now();
    let mut closed = false;
    for _ in 0..40 {
        if slow.write_all(b"x").await.is_err() {
            closed = true;
            break;
        }
        if read_until_closed(&mut slow, Duration::from_millis(50)).await.is_some() {
            closed = true;
            break;
        }
    }
    assert!(closed && started.elapsed() < Duration::from_secs(2), "a slowloris connection stayed open");
    // Idle after a response: closed too.
    let mut idle = TcpStream::connect(router.addr).await.unwrap();
    idle.write_all(request_head(router.addr, &converse_body("x")).as_bytes()).await.unwrap();
    let response = read_response(&mut idle, Duration::from_secs(5)).await.expect("an answer");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(read_until_closed(&mut idle, Duration::from_secs(2)).await.is_some(), "an idle connection stayed open");
    router.shutdown().await;
}

#[tokio::test]
async fn anonymous_bodies_are_refused_before_they_are_read_and_slow_bodies_time_out() {
    let s = stand_in(StandInConfig::default()).await;
    let mut config = local();
    config.auth = AuthConfig::File(keys_file());
    config.limits.body_timeout = Duration::from_millis(300);
    let router = serve(config, &[s.address()]).await;
    // No credentials and a 5 MB body announced but never sent: the answer comes at once.
    let mut anonymous = TcpStream::connect(router.addr).await.unwrap();
    let head = format!("POST {CONVERSE} HTTP/1.1\r\nhost: {}\r\ncontent-length: 5000000\r\n\r\n", router.addr);
    anonymous.write_all(head.as_bytes()).await.unwrap();
    let response = read_response(&mut anonymous, Duration::from_secs(2)).await.expect("refused without the body");
    assert!(response.starts_with("HTTP/1.1 403"), "{response}");
    assert!(
        response.to_ascii_lowercase().contains("x-amzn-errortype: missingauthenticationtokenexception"),
        "{response}"
    );
    // A valid key, and a body that trickles in: 408 once the body timeout passes.
    let mut slow = TcpStream::connect(router.addr).await.unwrap();
    let head = format!(
        "POST {CONVERSE} HTTP/1.1\r\nhost: {}\r\nauthorization: Bearer mk-acme-0123456789abcdef\r\ncontent-length: 100\r\n\r\n{{\"mess",
        router.addr
    );
    slow.write_all(head.as_bytes()).await.unwrap();
    let response = read_response(&mut slow, Duration::from_secs(3)).await.expect("an answer");
    assert!(response.starts_with("HTTP/1.1 408"), "{response}");
    router.shutdown().await;
}

#[tokio::test]
async fn connections_beyond_the_limit_wait_for_a_free_one() {
    let s = stand_in(StandInConfig::default()).await;
    let mut config = local();
    config.connections.max_connections = 2;
    let router = serve(config, &[s.address()]).await;
    let held: Vec<TcpStream> =
        vec![TcpStream::connect(router.addr).await.unwrap(), TcpStream::connect(router.addr).await.unwrap()];
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut third = TcpStream::connect(router.addr).await.unwrap();
    third.write_all(request_head(router.addr, &converse_body("x")).as_bytes()).await.unwrap();
    assert!(read_response(&mut third, Duration::from_millis(500)).await.is_none(), "served beyond the limit");
    drop(held);
    let response = read_response(&mut third, Duration::from_secs(5)).await.expect("served once a slot freed");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    router.shutdown().await;
}

#[tokio::test]
async fn a_hung_runner_frees_the_slot_with_a_retryable_error() {
    let mut config = local();
    config.path.runner_idle_timeout = Duration::from_millis(300);
    let (app, inference, s) =
        app_with(config, StandInConfig { tokens: 4, interval: Duration::from_secs(30), ..Default::default() }).await;
    let started = Instant::now();
    let (status, headers, body) = send(&app, post(CONVERSE, converse_body("x"))).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{}", String::from_utf8_lossy(&body));
    assert_eq!(headers["x-amzn-ErrorType"], "ServiceUnavailableException");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(inference.live().runners.for_model(TEXT)[0].in_flight(), 0, "the runner slot was not given back");
    assert!(s.counters.generates.load(Ordering::Relaxed) >= 1);
}

#[tokio::test]
async fn a_request_whose_runner_dies_is_retried_on_another_and_billed_once() {
    let slow = stand_in(StandInConfig { tokens: 50, interval: Duration::from_millis(20), ..Default::default() }).await;
    let proxy = Cuttable::new(slow.addr).await.unwrap();
    let metering = std::env::temp_dir().join(format!("mantle-retry-metering-{}.jsonl", std::process::id()));
    let _ = std::fs::remove_file(&metering);
    let mut config = local();
    config.metering = Some(metering.clone());
    let (app, inference) = mantle_router::build(&config, platform(&[proxy.address()])).unwrap();
    wait_ready(&inference).await;
    let healthy = stand_in(StandInConfig::default()).await;
    let request = tokio::spawn({
        let app = app.clone();
        async move { send(&app, post(CONVERSE, converse_body("x"))).await }
    });
    // Once the dying runner is generating, a second runner appears and the first one's
    // connections break.
    let deadline = Instant::now() + Duration::from_secs(5);
    while slow.counters.active.load(Ordering::Relaxed) == 0 {
        assert!(Instant::now() < deadline, "the request never reached the first runner");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    inference.update(platform(&[proxy.address(), healthy.address()])).unwrap();
    while !inference.live().runners.for_model(TEXT).iter().all(|r| r.state().1) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    proxy.cut();
    let (status, headers, body) = request.await.unwrap();
    assert_eq!(
        status,
        StatusCode::OK,
        "{}: {}",
        headers.get("x-amzn-ErrorType").map_or("", |v| v.to_str().unwrap()),
        String::from_utf8_lossy(&body)
    );
    assert_eq!(healthy.counters.generates.load(Ordering::Relaxed), 1, "retried on the healthy runner");
    // The request is counted and metered once, for the answer it got: the lost attempt's tokens
    // are neither billed nor counted as a failed request.
    let id = headers["x-amzn-RequestId"].to_str().unwrap().to_string();
    let records = support::read_metering(&metering, 1).await;
    assert_eq!(records.len(), 1, "{records:?}");
    let record = &records[0];
    assert_eq!((record["requestId"].as_str(), record["outcome"].as_str()), (Some(id.as_str()), Some("end_turn")));
    assert_eq!(record["outputTokens"], 8, "billed for the answer only, not the lost attempt's tokens");
    let counted = inference.metrics.render();
    assert!(
        counted
            .contains(&format!("mantle_router_requests_total{{api=\"Converse\",model=\"{TEXT}\",outcome=\"ok\"}} 1")),
        "{counted}"
    );
    assert!(!counted.contains("outcome=\"service_unavailable\""), "{counted}");
    // With no runner left to take it, the client is told to retry, without transport internals.
    let (status, headers, body) = send(&app, post(CONVERSE, converse_body("x"))).await;
    if status != StatusCode::OK {
        assert_eq!(headers["x-amzn-ErrorType"], "ServiceUnavailableException");
        assert!(!String::from_utf8_lossy(&body).contains("transport"), "{}", String::from_utf8_lossy(&body));
    }
}

#[tokio::test]
async fn runners_that_require_a_token_serve_only_the_router_that_has_it() {
    let token = Token::new("router-to-runner-0123456789").unwrap();
    let s = stand_in(StandInConfig { token: Some(token.clone()), ..Default::default() }).await;
    let mut config = local();
    config.path.runner_token = Some(token);
    let (app, inference) = mantle_router::build(&config, platform(&[s.address()])).unwrap();
    wait_ready(&inference).await;
    assert_eq!(send(&app, post(CONVERSE, converse_body("x"))).await.0, StatusCode::OK);
    // A caller without the token (a router misconfigured, or anyone else who reaches the port).
    let (app, inference) = mantle_router::build(&local(), platform(&[s.address()])).unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!inference.admits(TEXT), "a runner that refuses us counts as not ready");
    let (status, ..) = send(&app, post(CONVERSE, converse_body("x"))).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let mut raw = mantle_proto::runner_client::RunnerClient::connect(s.address()).await.unwrap();
    let refused = raw.count_tokens(mantle_proto::CountTokensRequest { messages: vec![], prompt: "hi".into() }).await;
    assert_eq!(refused.unwrap_err().code(), tonic::Code::Unauthenticated);
}

#[tokio::test]
async fn setup_failures_are_typed_and_name_what_was_wrong() {
    let taken = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let at = taken.local_addr().unwrap();
    let error = match mantle_router::start(RouterConfig::local(at), Platform::default()).await {
        Err(e) => e,
        Ok(_) => panic!("bound a port that is taken"),
    };
    assert!(matches!(error, mantle_router::error::SetupError::Bind { addr, .. } if addr == at), "{error}");
    let missing =
        mantle_router::runners::read_runners_file(std::path::Path::new("/nonexistent/runners.yaml")).unwrap_err();
    assert!(matches!(missing, mantle_router::error::SetupError::RunnersFile { .. }), "{missing}");
    assert!(missing.to_string().contains("/nonexistent/runners.yaml"), "{missing}");
}

#[tokio::test]
async fn a_router_not_ready_says_503_in_the_api_shape() {
    // A runner address nothing listens on: the model never becomes admissible.
    let (app, _inference) = mantle_router::build(&local(), platform(&["http://127.0.0.1:1".to_string()])).unwrap();
    let (status, headers, _) = send(&app, Request::get("/readyz").body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(headers["x-amzn-ErrorType"], "ServiceUnavailableException");
}
