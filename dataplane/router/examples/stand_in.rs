//! A runner stand-in as a process, for load tests of the router (scripts/bench-router.sh):
//! `cargo run --release -p mantle-router --features test-support --example stand_in -- GRPC_PORT HTTP_PORT TOKENS`
//! serves the runner gRPC API on GRPC_PORT and an OpenAI-compatible endpoint on HTTP_PORT, each
//! answering with TOKENS tokens at once.

use std::time::Duration;

use mantle_router::test_support::{StandInConfig, openai_stand_in, stand_in_at};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let port = |i: usize, default: u16| args.get(i).and_then(|a| a.parse().ok()).unwrap_or(default);
    let tokens = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(1);
    let config = StandInConfig { tokens, interval: Duration::ZERO, ..Default::default() };
    let grpc = stand_in_at(config.clone(), format!("127.0.0.1:{}", port(0, 50061)).parse()?).await?;
    let http = openai_stand_in(config, format!("127.0.0.1:{}", port(1, 50062)).parse()?).await?;
    println!("stand-in: gRPC {} OpenAI http://{http}/v1", grpc.addr);
    tokio::signal::ctrl_c().await?;
    Ok(())
}
