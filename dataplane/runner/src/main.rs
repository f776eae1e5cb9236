//! `mantle-runner`: serves one model over gRPC.

use clap::Parser;

#[derive(Parser)]
#[command(name = "mantle-runner", version, about = "Serves one model over Mantle's runner gRPC API")]
struct Cli {
    #[command(subcommand)]
    command: mantle_runner::cli::Command,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    mantle_runner::cli::run(Cli::parse().command).await
}
