//! Router benchmarks against the runner stand-in (the real gRPC API, tokens at a fixed rate):
//!
//! 1. **Overhead:** open-loop load at 1k and 10k requests/s, Converse through the router vs the
//!    same Generate sent straight to the stand-in over gRPC; the difference is what the router
//!    adds (HTTP, JSON, auth, admission, placement, metering). Then ConverseStream vs a direct
//!    Generate stream, per streamed token.
//! 2. **Fairness:** a heavy tenant at 10× a light tenant's rate, past capacity; the light
//!    tenant's p99 queue wait beside it vs alone.
//! 3. **Overload:** 3× capacity; the p99 of accepted requests vs at 0.8× capacity, and how fast
//!    rejections come back.
//!
//! `cargo bench -p mantle-router --features test-support --bench router -- [--seconds S]`

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use mantle_admission::QueueConfig;
use mantle_proto::runner_client::RunnerClient;
use mantle_router::test_support::{StandInConfig, stand_in};
use mantle_router::{Platform, RouterConfig, RunnerSpec};
use tokio_stream::StreamExt;

type Http = Client<HttpConnector, Full<Bytes>>;

// As in the mantle-router binary.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn model(id: &str) -> mantle_crds::FoundationModel {
    serde_norway::from_str(&format!(
        "apiVersion: mantle.dev/v1alpha1\nkind: FoundationModel\nmetadata: {{name: m}}\nspec:\n  modelId: {id}\n  provider: Acme\n  modality: TEXT\n  source: {{uri: 's3://b/m.gguf', format: gguf}}\n  contextLength: 4096\n"
    ))
    .expect("model manifest")
}

const MODEL: &str = "acme.bench-v1:0";

struct Setup {
    router: mantle_router::RunningRouter,
    grpc: RunnerClient<tonic::transport::Channel>,
    _stand_in: mantle_router::test_support::RunningStandIn,
}

fn metering_path(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("mantle-bench-{}-{name}.jsonl", std::process::id()))
}

async fn setup(stand_in_config: StandInConfig, slots_per_runner: usize, metering: Option<&str>) -> Setup {
    setup_with(stand_in_config, slots_per_runner, metering, |_| {}).await
}

async fn setup_with(
    stand_in_config: StandInConfig,
    slots_per_runner: usize,
    metering: Option<&str>,
    queue: impl FnOnce(&mut QueueConfig),
) -> Setup {
    let s = stand_in(stand_in_config).await;
    let mut config = RouterConfig::local("127.0.0.1:0".parse().expect("address"));
    config.path.slots_per_runner = slots_per_runner;
    queue(&mut config.path.queue);
    if let Some(name) = metering {
        let path = metering_path(name);
        let _ = std::fs::remove_file(&path);
        config.metering = Some(path);
    }
    let platform = Platform {
        models: vec![model(MODEL)],
        provisioned: Vec::new(),
        runners: vec![RunnerSpec { model: MODEL.into(), address: s.address(), pool: None, cell: None }],
        cells: Vec::new(),
    };
    let router = mantle_router::start(config, platform).await.expect("router starts");
    let grpc = RunnerClient::connect(s.address()).await.expect("stand-in reachable");
    // Wait for the health stream and the capacity loop.
    let http = client();
    for _ in 0..100 {
        let r = http
            .request(
                hyper::Request::get(format!("http://{}/readyz", router.addr)).body(Full::default()).expect("request"),
            )
            .await;
        if r.is_ok_and(|r| r.status() == 200) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    Setup { router, grpc, _stand_in: s }
}

fn client() -> Http {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new()).pool_max_idle_per_host(1024).build(connector)
}

const BODY: &str = r#"{"messages":[{"role":"user","content":[{"text":"What is the capital of France?"}]}],"inferenceConfig":{"maxTokens":64}}"#;

/// A Converse call as a tenant (named by the access key in an unverified SigV4 header; the
/// router runs with auth off). Returns the status.
async fn converse(http: &Http, addr: std::net::SocketAddr, path: &str, tenant: &str) -> u16 {
    let authorization = format!(
        "AWS4-HMAC-SHA256 Credential={tenant}/20261124/us-east-1/bedrock/aws4_request, SignedHeaders=host, Signature={}",
        "0".repeat(64)
    );
    let request = hyper::Request::post(format!("http://{addr}/model/acme.bench-v1%3A0/{path}"))
        .header("content-type", "application/json")
        .header("authorization", authorization)
        .body(Full::new(Bytes::from_static(BODY.as_bytes())))
        .expect("request");
    match http.request(request).await {
        Ok(response) => {
            let status = response.status().as_u16();
            let _ = response.into_body().collect().await;
            status
        }
        Err(_) => 0,
    }
}

async fn direct(grpc: &mut RunnerClient<tonic::transport::Channel>) -> u16 {
    let request = mantle_proto::GenerateRequest {
        request_id: "bench".into(),
        messages: vec![mantle_proto::ChatMessage {
            role: "user".into(),
            content: "What is the capital of France?".into(),
        }],
        max_tokens: 64,
        ..Default::default()
    };
    match grpc.generate(request).await {
        Ok(r) => {
            let mut s = r.into_inner();
            while s.next().await.is_some() {}
            200
        }
        Err(_) => 0,
    }
}

/// Fires `call` at `rate` per second for `seconds` (open loop: arrivals do not wait for
/// completions) and returns each call's latency and status.
async fn open_loop<F, Fut>(rate: f64, seconds: f64, call: F) -> Vec<(Duration, u16)>
where
    F: Fn() -> Fut,
    Fut: Future<Output = u16> + Send + 'static,
{
    let total = (rate * seconds) as usize;
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(total);
    for i in 0..total {
        let due = start + Duration::from_secs_f64(i as f64 / rate);
        tokio::time::sleep_until(due.into()).await;
        let fut = call();
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            let status = fut.await;
            (t.elapsed(), status)
        }));
    }
    let mut out = Vec::with_capacity(total);
    for t in tasks {
        if let Ok(r) = t.await {
            out.push(r);
        }
    }
    out
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn latencies(results: &[(Duration, u16)], status: u16) -> Vec<Duration> {
    let mut v: Vec<Duration> = results.iter().filter(|(_, s)| *s == status).map(|(d, _)| *d).collect();
    v.sort();
    v
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Overhead against a router in another process (`--external-router ADDR`, started by
/// scripts/bench-router.sh on its own core and pointed at this process's stand-in on
/// `--stand-in-port`), so that the load generator does not share the router's core.
async fn overhead_external(seconds: f64, router: std::net::SocketAddr, port: u16) {
    let any: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("address");
    let s = mantle_router::test_support::stand_in_at(StandInConfig { tokens: 16, ..Default::default() }, any)
        .await
        .expect("the stand-in's port");
    let grpc = RunnerClient::connect(s.address()).await.expect("stand-in reachable");
    let http = client();
    for _ in 0..200 {
        let r = http
            .request(hyper::Request::get(format!("http://{router}/readyz")).body(Full::default()).expect("request"))
            .await;
        if r.is_ok_and(|r| r.status() == 200) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    println!("## Overhead, router in its own process on its own core\n");
    overhead_rows(seconds, &grpc, router).await;
}

async fn overhead_rows(seconds: f64, grpc: &RunnerClient<tonic::transport::Channel>, addr: std::net::SocketAddr) {
    println!("| rate | direct gRPC p50 / p99 | through the router p50 / p99 | added p50 / p99 | errors |");
    println!("|---:|---:|---:|---:|---:|");
    for rate in [1_000.0, 10_000.0] {
        let grpc = grpc.clone();
        let direct_results = open_loop(rate, seconds, || {
            let mut g = grpc.clone();
            async move { direct(&mut g).await }
        })
        .await;
        let http = client();
        let routed = open_loop(rate, seconds, || {
            let http = http.clone();
            async move { converse(&http, addr, "converse", "bench").await }
        })
        .await;
        let d = latencies(&direct_results, 200);
        let r = latencies(&routed, 200);
        let errors = routed.iter().filter(|(_, s)| *s != 200).count();
        let (d50, d99, r50, r99) =
            (percentile(&d, 0.5), percentile(&d, 0.99), percentile(&r, 0.5), percentile(&r, 0.99));
        println!(
            "| {rate:.0}/s | {:.3} / {:.3} ms | {:.3} / {:.3} ms | **{:.3} / {:.3} ms** | {errors} |",
            ms(d50),
            ms(d99),
            ms(r50),
            ms(r99),
            ms(r50.saturating_sub(d50)),
            ms(r99.saturating_sub(d99))
        );
    }
}

async fn overhead(seconds: f64) {
    println!("## Overhead (non-streaming Converse, 16 tokens returned at once)\n");
    let setup = setup(StandInConfig { tokens: 16, ..Default::default() }, 100_000, Some("overhead")).await;
    overhead_rows(seconds, &setup.grpc, setup.router.addr).await;
    setup.router.shutdown().await;

    // Streaming: 64 tokens 2 ms apart, 100 streams/s.
    let tokens = 64;
    let setup = setup_streaming(tokens).await;
    let grpc = setup.grpc.clone();
    let direct_results = open_loop(100.0, seconds, || {
        let mut g = grpc.clone();
        async move { direct(&mut g).await }
    })
    .await;
    let http = client();
    let addr = setup.router.addr;
    let routed = open_loop(100.0, seconds, || {
        let http = http.clone();
        async move { converse(&http, addr, "converse-stream", "bench").await }
    })
    .await;
    let d = latencies(&direct_results, 200);
    let r = latencies(&routed, 200);
    let per_token = |a: Duration, b: Duration| ms(a.saturating_sub(b)) * 1000.0 / tokens as f64;
    println!(
        "\nStreaming (ConverseStream, {tokens} tokens 2 ms apart, 100 streams/s): whole stream direct p50 {:.2} ms / p99 {:.2} ms, \
         through the router p50 {:.2} ms / p99 {:.2} ms: **added per token p50 {:.1} µs, p99 {:.1} µs**\n",
        ms(percentile(&d, 0.5)),
        ms(percentile(&d, 0.99)),
        ms(percentile(&r, 0.5)),
        ms(percentile(&r, 0.99)),
        per_token(percentile(&r, 0.5), percentile(&d, 0.5)),
        per_token(percentile(&r, 0.99), percentile(&d, 0.99)),
    );
    setup.router.shutdown().await;
}

async fn setup_streaming(tokens: u32) -> Setup {
    setup(StandInConfig { tokens, interval: Duration::from_millis(2), ..Default::default() }, 100_000, None).await
}

/// 4 slots of a 100 ms service (20 tokens, 5 ms apart): capacity 40 requests/s.
const SLOTS: usize = 4;

async fn capacity_setup(metering: Option<&str>) -> Setup {
    setup(StandInConfig { tokens: 20, interval: Duration::from_millis(5), ..Default::default() }, SLOTS, metering).await
}

/// A tenant's queue waits, from the router's metering records (sorted).
fn queue_waits(name: &str, tenant: &str) -> Vec<Duration> {
    let text = std::fs::read_to_string(metering_path(name)).unwrap_or_default();
    let mut waits: Vec<Duration> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|r| r["tenant"] == tenant && r["outcome"] != "cancelled")
        .filter_map(|r| r["queueMs"].as_f64())
        .map(|ms| Duration::from_secs_f64(ms / 1000.0))
        .collect();
    waits.sort();
    waits
}

async fn fairness(seconds: f64) {
    println!("## Fairness (capacity 40 requests/s: 4 slots × 100 ms)\n");
    let light_rate = 4.0;
    let solo = {
        let setup = capacity_setup(Some("solo")).await;
        let http = client();
        let addr = setup.router.addr;
        let r = open_loop(light_rate, seconds * 4.0, || {
            let http = http.clone();
            async move { converse(&http, addr, "converse", "light").await }
        })
        .await;
        setup.router.shutdown().await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        (latencies(&r, 200), queue_waits("solo", "light"))
    };
    let setup = capacity_setup(Some("contended")).await;
    let http = client();
    let addr = setup.router.addr;
    let heavy_http = http.clone();
    let heavy = tokio::spawn(async move {
        open_loop(light_rate * 10.0, seconds * 4.0, move || {
            let http = heavy_http.clone();
            async move { converse(&http, addr, "converse", "heavy").await }
        })
        .await
    });
    let light = open_loop(light_rate, seconds * 4.0, || {
        let http = http.clone();
        async move { converse(&http, addr, "converse", "light").await }
    })
    .await;
    let heavy = heavy.await.unwrap_or_default();
    setup.router.shutdown().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let contended = (latencies(&light, 200), queue_waits("contended", "light"));
    let heavy_waits = queue_waits("contended", "heavy");
    let heavy_ok = heavy.iter().filter(|(_, s)| *s == 200).count();
    let heavy_shed = heavy.iter().filter(|(_, s)| *s == 429).count();
    println!("| light tenant ({light_rate} req/s) | queue wait p50 / p99 | latency p50 / p99 | refused |");
    println!("|---|---:|---:|---:|");
    for (name, (lat, waits), refused) in [
        ("alone".to_string(), &solo, 0),
        (format!("beside a heavy tenant at {} req/s", light_rate * 10.0), &contended, light.len() - contended.0.len()),
    ] {
        println!(
            "| {name} | {:.1} / {:.1} ms | {:.0} / {:.0} ms | {refused} |",
            ms(percentile(waits, 0.5)),
            ms(percentile(waits, 0.99)),
            ms(percentile(lat, 0.5)),
            ms(percentile(lat, 0.99)),
        );
    }
    println!(
        "\nHeavy tenant: {heavy_ok} served (queue wait p99 {:.0} ms), {heavy_shed} refused with 429. \
         Light tenant p99 latency contended / alone: **{:.2}×**\n",
        ms(percentile(&heavy_waits, 0.99)),
        ms(percentile(&contended.0, 0.99)) / ms(percentile(&solo.0, 0.99)).max(0.001)
    );
}

async fn overload(seconds: f64) {
    println!("## Overload (capacity 40 requests/s)\n");
    println!(
        "| queue bound | offered | accepted p50 / p99 after 2 s | refused | refusal p50 / p99 | \
         accepted p99 in the first 2 s |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    type Bound = (&'static str, fn(&mut QueueConfig));
    let bounds: [Bound; 3] = [
        ("overload control (the default)", |_| {}),
        ("length only, 4 per slot (`--no-overload-control`)", |q| q.overload = None),
        ("wait budget 50 ms only (`--max-queue-wait-ms 50 --no-overload-control`)", |q| {
            q.overload = None;
            q.max_queue_wait = Some(Duration::from_millis(50));
        }),
    ];
    for (i, (bound, queue)) in bounds.into_iter().enumerate() {
        for factor in [0.8, 3.0] {
            let stand_in = StandInConfig { tokens: 20, interval: Duration::from_millis(5), ..Default::default() };
            let setup = setup_with(stand_in, SLOTS, Some(&format!("overload-{i}-{factor}")), queue).await;
            let http = client();
            let addr = setup.router.addr;
            let rate = 40.0 * factor;
            let r = open_loop(rate, seconds * 3.0, || {
                let http = http.clone();
                async move { converse(&http, addr, "converse", "tenant").await }
            })
            .await;
            setup.router.shutdown().await;
            // Steady state: the requests sent after the first 2 s (results are in send order).
            let (first, steady) = r.split_at(((rate * 2.0) as usize).min(r.len()));
            let ok = latencies(steady, 200);
            let refused = latencies(steady, 429);
            println!(
                "| {bound} | {rate:.0}/s ({factor}×) | {:.0} / {:.0} ms | {} | {:.2} / {:.2} ms | {:.0} ms |",
                ms(percentile(&ok, 0.5)),
                ms(percentile(&ok, 0.99)),
                refused.len(),
                ms(percentile(&refused, 0.5)),
                ms(percentile(&refused, 0.99)),
                ms(percentile(&latencies(first, 200), 0.99)),
            );
        }
    }
    println!();
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let seconds = args
        .iter()
        .position(|a| a == "--seconds")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(5.0);
    let only = args.iter().position(|a| a == "--only").and_then(|i| args.get(i + 1)).cloned();
    let value = |flag: &str| args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1)).cloned();
    let external = value("--external-router").and_then(|a| a.parse().ok());
    let stand_in_port: u16 = value("--stand-in-port").and_then(|p| p.parse().ok()).unwrap_or(51071);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    runtime.block_on(async {
        if let Some(router) = external {
            overhead_external(seconds, router, stand_in_port).await;
            return;
        }
        let run = |name: &str| only.as_deref().is_none_or(|o| o == name);
        if run("overhead") {
            overhead(seconds).await;
        }
        if run("fairness") {
            fairness(seconds).await;
        }
        if run("overload") {
            overload(seconds).await;
        }
    });
}
