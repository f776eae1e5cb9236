//! ProvisionedThroughput reserves capacity: a provisioned tenant's rate on its model is its
//! model units × the model's tokens per unit, on top of its on-demand limits and whatever a noisy
//! neighbour does; buckets are per (tenant, model); a dedicated pool admits its tenant through a
//! queue of its own, whatever fills the shared one; the reservation's ARN works as a model id,
//! for its own tenant only.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use mantle_router::test_support::{StandInConfig, stand_in};
use mantle_router::{AuthConfig, Platform, RouterConfig, RunnerSpec};
use serde_json::json;
use tower::ServiceExt;

mod support;

const TEXT: &str = "acme.text-v1:0";
const OTHER: &str = "acme.other-v1:0";
const PROVISIONING: &str = "  provisioning: {tokensPerMinutePerUnit: 60000}\n";

fn reservation(namespace: &str, model: &str, tenant: &str) -> mantle_crds::ProvisionedThroughput {
    serde_norway::from_str(&format!(
        "apiVersion: mantle.dev/v1alpha1\nkind: ProvisionedThroughput\nmetadata: {{name: analytics-text, namespace: {namespace}}}\nspec:\n  modelId: {model}\n  modelUnits: 2\n  commitment: ONE_MONTH\n  tenant: {tenant}\n"
    ))
    .unwrap()
}

async fn call(app: &axum::Router, key: &str, model: &str) -> (StatusCode, Bytes) {
    let body = json!({"messages": [{"role": "user", "content": [{"text": "x".repeat(400)}]}], "inferenceConfig": {"maxTokens": 8}});
    let path = format!("/model/{}/converse", model.replace(':', "%3A").replace('/', "%2F"));
    let request = Request::post(path)
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {key}"))
        .body(Body::from(body.to_string()))
        .unwrap();
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    (status, response.into_body().collect().await.unwrap().to_bytes())
}

async fn count_tokens(app: &axum::Router, key: &str) -> StatusCode {
    let body = json!({"input": {"converse": {"messages": [{"role": "user", "content": [{"text": "x".repeat(400)}]}]}}});
    let request = Request::post(format!("/model/{}/count-tokens", TEXT.replace(':', "%3A")))
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {key}"))
        .body(Body::from(body.to_string()))
        .unwrap();
    app.clone().oneshot(request).await.unwrap().status()
}

#[tokio::test]
async fn a_provisioned_tenant_keeps_its_reserved_rate_beside_a_noisy_neighbour() {
    let keys = std::env::temp_dir().join(format!("mantle-pt-keys-{}.yaml", std::process::id()));
    // Both tenants get 1,000 tokens a minute on demand (a request here costs ~110).
    std::fs::write(
        &keys,
        "tenants:\n  - {name: noisy, tokensPerMinute: 1000, burstTokens: 1000, apiKeys: [mk-noisy-0123456789abcdef]}\n  - {name: analytics, tokensPerMinute: 1000, burstTokens: 1000, apiKeys: [mk-analytics-0123456789ab]}\n",
    )
    .unwrap();
    let text = stand_in(StandInConfig::default()).await;
    let other = stand_in(StandInConfig::default()).await;
    let mut config = RouterConfig::local("127.0.0.1:0".parse().unwrap());
    config.auth = AuthConfig::File(keys.clone());
    let platform = Platform {
        models: vec![support::model(TEXT, "TEXT", PROVISIONING), support::model(OTHER, "TEXT", PROVISIONING)],
        provisioned: vec![reservation("team-a", TEXT, "analytics")],
        runners: vec![
            RunnerSpec { model: TEXT.into(), address: text.address(), pool: None, cell: None },
            RunnerSpec { model: OTHER.into(), address: other.address(), pool: None, cell: None },
        ],
        cells: Vec::new(),
    };
    let (app, inference) = mantle_router::build(&config, platform.clone()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !(inference.admits(TEXT) && inference.admits(OTHER)) {
        assert!(Instant::now() < deadline, "stand-ins never ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The noisy neighbour runs into its own limit...
    let mut noisy = Vec::new();
    for _ in 0..40 {
        noisy.push(call(&app, "mk-noisy-0123456789abcdef", TEXT).await.0);
    }
    assert!(noisy.contains(&StatusCode::TOO_MANY_REQUESTS), "the neighbour was never throttled");
    // Counting tokens spends a bucket of its own: a throttled tenant may still count, but not
    // without end (each count here is ~100 tokens of its 1,000 a minute).
    let mut counts = Vec::new();
    for _ in 0..20 {
        counts.push(count_tokens(&app, "mk-noisy-0123456789abcdef").await);
    }
    assert_eq!(counts[0], StatusCode::OK, "CountTokens spent inference quota");
    assert!(counts.contains(&StatusCode::TOO_MANY_REQUESTS), "CountTokens is unbounded: {counts:?}");
    // ...while the provisioned tenant, whose on-demand limit is the same, spends 40 requests of its
    // reservation (120,000 tokens a minute) without a refusal.
    for i in 0..40 {
        let (status, body) = call(&app, "mk-analytics-0123456789ab", TEXT).await;
        assert_eq!(status, StatusCode::OK, "request {i}: {}", String::from_utf8_lossy(&body));
    }
    // The reservation is on its model only: elsewhere the tenant has its on-demand bucket, which
    // its traffic above did not touch.
    let mut elsewhere = Vec::new();
    for _ in 0..40 {
        elsewhere.push(call(&app, "mk-analytics-0123456789ab", OTHER).await.0);
    }
    assert_eq!(elsewhere[0], StatusCode::OK, "the other model's bucket was spent by traffic to TEXT");
    assert!(elsewhere.contains(&StatusCode::TOO_MANY_REQUESTS), "on demand elsewhere is not reserved");
    // The reservation's ARN works as a model id, for its own tenant only.
    let arn = "arn:aws:bedrock:us-east-1:000000000000:provisioned-model/analytics-text";
    assert_eq!(call(&app, "mk-analytics-0123456789ab", arn).await.0, StatusCode::OK);
    assert_eq!(call(&app, "mk-noisy-0123456789abcdef", arn).await.0, StatusCode::FORBIDDEN);
    let unknown = "arn:aws:bedrock:us-east-1:000000000000:provisioned-model/nope";
    assert_eq!(call(&app, "mk-analytics-0123456789ab", unknown).await.0, StatusCode::NOT_FOUND);
    // Names repeat across namespaces: the ARN's account field (the namespace, as in the ARN the
    // status shows) picks one; an ARN that could be either is refused, not guessed.
    let mut platform = platform;
    platform.provisioned.push(reservation("team-b", OTHER, "noisy"));
    inference.update(platform).unwrap();
    let in_namespace = |ns: &str| format!("arn:mantle:bedrock:cell-a:{ns}:provisioned-model/analytics-text");
    assert_eq!(call(&app, "mk-analytics-0123456789ab", &in_namespace("team-a")).await.0, StatusCode::OK);
    assert_eq!(call(&app, "mk-noisy-0123456789abcdef", &in_namespace("team-b")).await.0, StatusCode::OK);
    assert_eq!(call(&app, "mk-noisy-0123456789abcdef", &in_namespace("team-a")).await.0, StatusCode::FORBIDDEN);
    let (status, body) = call(&app, "mk-analytics-0123456789ab", arn).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(String::from_utf8_lossy(&body).contains("team-b"), "{}", String::from_utf8_lossy(&body));
    std::fs::remove_file(keys).ok();
}

#[tokio::test]
async fn a_dedicated_pool_admits_its_tenant_while_a_neighbour_fills_the_shared_one() {
    let keys = std::env::temp_dir().join(format!("mantle-pool-keys-{}.yaml", std::process::id()));
    std::fs::write(
        &keys,
        "tenants:\n  - {name: noisy, apiKeys: [mk-noisy-0123456789abcdef]}\n  - {name: analytics, apiKeys: [mk-analytics-0123456789ab]}\n",
    )
    .unwrap();
    // The shared runner takes 5 s a request; the dedicated one answers at once.
    let shared =
        stand_in(StandInConfig { tokens: 100, interval: Duration::from_millis(50), ..Default::default() }).await;
    let dedicated = stand_in(StandInConfig::default()).await;
    let mut config = RouterConfig::local("127.0.0.1:0".parse().unwrap());
    config.auth = AuthConfig::File(keys.clone());
    config.path.slots_per_runner = 1;
    let platform = Platform {
        models: vec![support::model(TEXT, "TEXT", PROVISIONING)],
        provisioned: vec![reservation("team-a", TEXT, "analytics")],
        runners: vec![
            RunnerSpec { model: TEXT.into(), address: shared.address(), pool: None, cell: None },
            RunnerSpec { model: TEXT.into(), address: dedicated.address(), pool: Some("analytics".into()), cell: None },
        ],
        cells: Vec::new(),
    };
    let (app, inference) = mantle_router::build(&config, platform).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !inference.live().runners.for_model(TEXT).iter().all(|r| r.state().1) || !inference.admits(TEXT) {
        assert!(Instant::now() < deadline, "stand-ins never ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    // The neighbour sends more than the shared pool holds.
    let noisy: Vec<_> = (0..8)
        .map(|_| {
            let app = app.clone();
            tokio::spawn(async move { call(&app, "mk-noisy-0123456789abcdef", TEXT).await.0 })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(5);
    while shared.counters.active.load(Ordering::Relaxed) == 0 {
        assert!(Instant::now() < deadline, "the neighbour never reached the shared runner");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Its requests get the shared pool's one slot, never the reservation's...
    assert_eq!(shared.counters.active.load(Ordering::Relaxed), 1, "the shared runner is over its slots");
    assert_eq!(dedicated.counters.generates.load(Ordering::Relaxed), 0);
    // ...and the provisioned tenant is admitted at once by its own pool, not queued behind them.
    let started = Instant::now();
    let (status, body) = tokio::time::timeout(Duration::from_secs(3), call(&app, "mk-analytics-0123456789ab", TEXT))
        .await
        .expect("the provisioned tenant waited behind its neighbour");
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
    assert_eq!(dedicated.counters.generates.load(Ordering::Relaxed), 1);
    let queues = inference.metrics.render();
    assert!(queues.contains("pool=\"analytics\""), "the dedicated pool's queue is not reported: {queues}");
    for task in noisy {
        task.abort();
    }
    std::fs::remove_file(keys).ok();
}

#[tokio::test]
async fn waiters_for_a_dedicated_pool_that_loses_its_last_runner_move_to_the_shared_pool() {
    let keys = std::env::temp_dir().join(format!("mantle-pool-gone-keys-{}.yaml", std::process::id()));
    std::fs::write(&keys, "tenants:\n  - {name: analytics, apiKeys: [mk-analytics-0123456789ab]}\n").unwrap();
    // The dedicated runner takes 5 s a request, so its one slot stays busy; the shared one
    // answers at once.
    let dedicated =
        stand_in(StandInConfig { tokens: 100, interval: Duration::from_millis(50), ..Default::default() }).await;
    let shared = stand_in(StandInConfig::default()).await;
    let mut config = RouterConfig::local("127.0.0.1:0".parse().unwrap());
    config.auth = AuthConfig::File(keys.clone());
    config.path.slots_per_runner = 1;
    let mut platform = Platform {
        models: vec![support::model(TEXT, "TEXT", PROVISIONING)],
        provisioned: vec![reservation("team-a", TEXT, "analytics")],
        runners: vec![
            RunnerSpec { model: TEXT.into(), address: shared.address(), pool: None, cell: None },
            RunnerSpec { model: TEXT.into(), address: dedicated.address(), pool: Some("analytics".into()), cell: None },
        ],
        cells: Vec::new(),
    };
    let (app, inference) = mantle_router::build(&config, platform.clone()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !inference.live().runners.for_model(TEXT).iter().all(|r| r.state().1) || !inference.admits(TEXT) {
        assert!(Instant::now() < deadline, "stand-ins never ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    // One request holds the reservation's only slot; the next waits in the reservation's queue.
    let holder = {
        let app = app.clone();
        tokio::spawn(async move { call(&app, "mk-analytics-0123456789ab", TEXT).await.0 })
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while dedicated.counters.active.load(Ordering::Relaxed) == 0 {
        assert!(Instant::now() < deadline, "the first request never reached the dedicated runner");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let waiter = {
        let app = app.clone();
        tokio::spawn(async move { call(&app, "mk-analytics-0123456789ab", TEXT).await })
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while inference.queued(TEXT, Some("analytics")) == 0 {
        assert!(Instant::now() < deadline, "the second request never queued for the dedicated pool");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The reservation's pool goes away (scaled in, its pod evicted): the waiter is served by the
    // shared pool instead of being refused.
    platform.runners.retain(|r| r.pool.is_none());
    inference.update(platform).unwrap();
    let (status, body) = tokio::time::timeout(Duration::from_secs(3), waiter)
        .await
        .expect("the waiter was left in the dedicated pool's queue")
        .unwrap();
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    assert_eq!(shared.counters.generates.load(Ordering::Relaxed), 1, "the shared runner did not serve it");
    holder.abort();
    std::fs::remove_file(keys).ok();
}
