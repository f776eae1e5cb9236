//! `mantle-runner`: serves one model over gRPC.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};
use mantle_engine::TemplateFamily;
use mantle_runner::RunnerConfig;

#[derive(Parser)]
#[command(name = "mantle-runner", version, about = "Serves one model over Mantle's runner gRPC API")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load a model and serve it.
    Serve(ServeArgs),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// The weights: a GGUF file (text model) or a directory holding model.safetensors,
    /// config.json and tokenizer.json (embedding model).
    #[arg(long)]
    model: PathBuf,
    /// The Bedrock-style model id to serve it under.
    #[arg(long)]
    model_id: String,
    /// gRPC listen address.
    #[arg(long, default_value = "0.0.0.0:50051")]
    listen: SocketAddr,
    /// HTTP listen address for /metrics, /healthz and /readyz.
    #[arg(long, default_value = "0.0.0.0:9090")]
    http_listen: SocketAddr,
    /// Compute threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// KV-cache size in MiB.
    #[arg(long, default_value_t = 1024)]
    kv_cache_mib: usize,
    /// Tokens per forward pass (bounds a step's latency; long prompts are prefilled in chunks).
    #[arg(long, default_value_t = 256)]
    max_batch_tokens: usize,
    /// Sequences decoding at once.
    #[arg(long, default_value_t = 64)]
    max_running: usize,
    /// Host memory in MiB for the KV blocks of preempted sequences (0: preempted sequences
    /// recompute).
    #[arg(long, default_value_t = 1024)]
    swap_mib: usize,
    /// The GPU whose memory, ECC errors, temperature and power go into the Health signal
    /// (builds with the `nvml` feature).
    #[arg(long, default_value_t = 0)]
    gpu_index: u32,
    /// Use a built-in chat template instead of the one in the weights.
    #[arg(long, value_enum)]
    chat_template: Option<Template>,
}

#[derive(Clone, Copy, ValueEnum)]
enum Template {
    Chatml,
    Llama3,
    Mistral,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let Command::Serve(args) = Cli::parse().command;
    let config = RunnerConfig {
        model_path: args.model,
        model_id: args.model_id,
        grpc_listen: args.listen,
        http_listen: args.http_listen,
        threads: args.threads,
        kv_cache_bytes: args.kv_cache_mib << 20,
        max_batch_tokens: args.max_batch_tokens,
        max_running: args.max_running,
        swap_bytes: args.swap_mib << 20,
        gpu_index: args.gpu_index,
        chat_template: args.chat_template.map(|t| match t {
            Template::Chatml => TemplateFamily::ChatMl,
            Template::Llama3 => TemplateFamily::Llama3,
            Template::Mistral => TemplateFamily::Mistral,
        }),
    };
    let runner = mantle_runner::start(config).await?;
    tokio::signal::ctrl_c().await?;
    tracing::info!("shutting down");
    runner.shutdown().await
}
