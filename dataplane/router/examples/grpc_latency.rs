//! Round-trip latency of the runner gRPC API on loopback, one call at a time: a streamed
//! Generate (16 tokens) and a unary CountTokens against the stand-in. This is how the missing
//! `TCP_NODELAY` showed up (44 ms per streamed call; 0.14 ms with it).
//! `cargo run --release -p mantle-router --features test-support --example grpc_latency`

use mantle_router::test_support::{StandInConfig, stand_in};
use std::time::{Duration, Instant};
use tokio_stream::StreamExt;
#[tokio::main]
async fn main() {
    let s = stand_in(StandInConfig { tokens: 16, interval: Duration::ZERO, ..Default::default() }).await;
    let mut c = mantle_proto::runner_client::RunnerClient::connect(s.address()).await.unwrap();
    let mut v = Vec::new();
    for _ in 0..2000 {
        let t = Instant::now();
        let r = c
            .generate(mantle_proto::GenerateRequest {
                max_tokens: 64,
                messages: vec![mantle_proto::ChatMessage { role: "user".into(), content: "hi".into() }],
                ..Default::default()
            })
            .await
            .unwrap();
        let mut st = r.into_inner();
        while st.next().await.is_some() {}
        v.push(t.elapsed());
    }
    v.sort();
    println!("seq p50 {:?} p99 {:?}", v[1000], v[1980]);
    let mut v = Vec::new();
    for _ in 0..2000 {
        let t = Instant::now();
        let _ = c
            .count_tokens(mantle_proto::CountTokensRequest { prompt: "hi".into(), ..Default::default() })
            .await
            .unwrap();
        v.push(t.elapsed());
    }
    v.sort();
    println!("unary p50 {:?} p99 {:?}", v[1000], v[1980]);
}
