//! The runner's command line, shared by `mantle-runner` and `mantle runner` (which `mantle dev`
//! starts once per FoundationModel with the arguments the operator puts in a runner pod).

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Subcommand, ValueEnum};
use mantle_engine::TemplateFamily;

use crate::RunnerConfig;

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once per process
pub enum Command {
    /// Load a model and serve it.
    Serve(ServeArgs),
    /// Copy weights from an object store into the node-local cache (the runner pod's init
    /// container); prints the cached path.
    Fetch {
        /// The weights URI (`s3://…`, `gs://…`, `az://…`, `https://…`, `file://…`, `pvc://…`;
        /// a directory ends in `/`). Credentials come from AWS_*, GOOGLE_* and AZURE_* variables.
        #[arg(long)]
        source: String,
        #[command(flatten)]
        cache: CacheArgs,
    },
    /// Keep weights in the node-local cache for good: fetch them now and again every interval
    /// (fetching them anew should they have been evicted), ready on `/readyz` while a verified
    /// copy is in place. What the operator's prewarm DaemonSet runs on the nodes a
    /// FoundationModel's `weightCache.prewarm` selects.
    KeepCached {
        #[arg(long)]
        source: String,
        #[command(flatten)]
        cache: CacheArgs,
        /// HTTP listen address for /healthz and /readyz.
        #[arg(long, default_value = "0.0.0.0:9090")]
        http_listen: SocketAddr,
        /// Seconds between checks.
        #[arg(long, default_value_t = 60)]
        interval_s: u64,
    },
    /// Make the node-local weight cache directory and give it to the runner's user: the runner
    /// pod's first init container, the one step that runs as root (with only CAP_CHOWN).
    PrepareCache {
        #[arg(long, default_value = "/var/cache/mantle/weights")]
        cache_dir: PathBuf,
        /// `uid:gid` to own it.
        #[arg(long)]
        owner: String,
    },
}

/// Parses `uid:gid`.
fn parse_owner(owner: &str) -> anyhow::Result<(u32, u32)> {
    let parse = || {
        let (uid, gid) = owner.split_once(':')?;
        Some((uid.parse().ok()?, gid.parse().ok()?))
    };
    parse().with_context(|| format!("--owner {owner:?} must be uid:gid, two numbers"))
}

/// Creates `dir` (and its parents) and makes `owner` its owner.
pub fn prepare_cache(dir: &std::path::Path, owner: &str) -> anyhow::Result<()> {
    let (uid, gid) = parse_owner(owner)?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::os::unix::fs::chown(dir, Some(uid), Some(gid))
        .with_context(|| format!("giving {} to {uid}:{gid}", dir.display()))?;
    Ok(())
}

#[derive(clap::Args)]
pub struct CacheArgs {
    /// Expected SHA-256 (of the file, or of the manifest for a directory).
    #[arg(long)]
    pub sha256: Option<String>,
    /// The node-local weight cache.
    #[arg(long, default_value = "/var/cache/mantle/weights")]
    pub cache_dir: PathBuf,
    /// Byte budget of the node-local cache, in GiB.
    #[arg(long, default_value_t = 100)]
    pub cache_budget_gib: u64,
    /// Eviction priority of these weights in the node cache (0-9): a copy of priority p ages
    /// 1 + p times slower under LRU eviction (a reserved tenant's or prewarmed model's weights).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=9))]
    pub cache_priority: u8,
}

impl CacheArgs {
    fn node_cache(&self) -> crate::weights::NodeCache {
        crate::weights::NodeCache::new(&self.cache_dir, self.cache_budget_gib << 30).with_priority(self.cache_priority)
    }
}

#[derive(clap::Args)]
pub struct ServeArgs {
    /// The weights: a GGUF file (text model) or a directory holding model.safetensors,
    /// config.json and tokenizer.json (embedding model); a local path or an object-store URI
    /// fetched through the node cache. Required by the builtin engine; with `--engine external`
    /// optional: a GGUF whose tokenizer counts tokens when the upstream has no `/tokenize`.
    #[arg(long)]
    pub model: Option<String>,
    /// What runs the model: `builtin` (Mantle's engine, loading `--model`) or `external` (an
    /// OpenAI-compatible server at `--upstream`: vLLM, SGLang, llama.cpp's server, Ollama).
    #[arg(long, value_enum, default_value_t = EngineKind::Builtin)]
    pub engine: EngineKind,
    /// The external engine's base URL (`http://127.0.0.1:8000`).
    #[arg(long, required_if_eq("engine", "external"))]
    pub upstream: Option<String>,
    /// The model name to ask the upstream for (default: the first its `/v1/models` lists).
    #[arg(long)]
    pub upstream_model: Option<String>,
    /// What the upstream serves: `text` (chat and completions) or `embedding`.
    #[arg(long, value_enum, ignore_case = true, default_value_t = crate::external::Modality::Text)]
    pub modality: crate::external::Modality,
    /// Whether and how the upstream orders requests by priority: `none`, `lower-first` (vLLM
    /// with `--scheduling-policy priority`), `higher-first` (SGLang with priority scheduling).
    #[arg(long, value_enum, default_value_t = crate::external::openai::PriorityMode::None)]
    pub upstream_priority: crate::external::openai::PriorityMode,
    /// How often the upstream's health and metrics are read, in milliseconds; one that stops
    /// answering is reported CRITICAL within two intervals.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(50..=60_000))]
    pub health_interval_ms: u64,
    /// Which server the upstream is (`vllm`, `sglang`, `llama-cpp`, `generic`); default: recognised
    /// from its `/props`, `/metrics` and `/v1/models`.
    #[arg(long, value_enum)]
    pub upstream_kind: Option<crate::external::Flavor>,
    /// A bearer token for the upstream.
    #[arg(long, env = "MANTLE_UPSTREAM_API_KEY", hide_env_values = true)]
    pub upstream_api_key: Option<String>,
    #[command(flatten)]
    pub cache: CacheArgs,
    /// The Bedrock-style model id to serve it under.
    #[arg(long)]
    pub model_id: String,
    /// gRPC listen address.
    #[arg(long, default_value = "0.0.0.0:50051")]
    pub listen: SocketAddr,
    /// HTTP listen address for /metrics, /healthz and /readyz.
    #[arg(long, default_value = "0.0.0.0:9090")]
    pub http_listen: SocketAddr,
    /// Compute threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Where a text model runs: `cpu` (the engine's own kernels), `cuda` or `cuda:N` (an NVIDIA
    /// GPU; the runner must be built with the `cuda` feature), `candle-cpu` (the GPU code on the
    /// CPU, for checks).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// KV-cache size in MiB (keys and values are kept in f16).
    #[arg(long, default_value_t = 1024)]
    pub kv_cache_mib: usize,
    /// Tokens per forward pass (bounds a step's latency; long prompts are prefilled in chunks).
    #[arg(long, default_value_t = 256)]
    pub max_batch_tokens: usize,
    /// Sequences decoding at once.
    #[arg(long, default_value_t = 64)]
    pub max_running: usize,
    /// Host memory in MiB for the KV blocks of preempted sequences (0: preempted sequences
    /// recompute).
    #[arg(long, default_value_t = 1024)]
    pub swap_mib: usize,
    /// The GPU whose memory, ECC errors, temperature and power go into the Health signal
    /// (builds with the `nvml` feature).
    #[arg(long, default_value_t = 0)]
    pub gpu_index: u32,
    /// Lock the weights in RAM so they are never paged out (needs CAP_IPC_LOCK or a memlock limit
    /// above the model's size).
    #[arg(long)]
    pub pin_weights: bool,
    /// Use a built-in chat template instead of the one in the weights (for weight files that
    /// carry none; a file's own template is the default).
    #[arg(long, value_enum)]
    pub chat_template: Option<Template>,
    /// A file holding the token every gRPC call must carry (`authorization: Bearer <token>`):
    /// the router's shared Secret. Without it the gRPC port serves anyone who reaches it.
    #[arg(long, env = "MANTLE_RUNNER_TOKEN_FILE")]
    pub auth_token_file: Option<std::path::PathBuf>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, ValueEnum)]
pub enum EngineKind {
    Builtin,
    External,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Template {
    Chatml,
    Llama3,
    Mistral,
}

/// Runs a runner command until it finishes (`fetch`) or Ctrl-C / SIGTERM (`serve`). This is the
/// binary edge: the library's typed errors get their context here.
pub async fn run(command: Command) -> anyhow::Result<()> {
    let args = match command {
        Command::Serve(args) => args,
        Command::PrepareCache { cache_dir, owner } => {
            prepare_cache(&cache_dir, &owner)?;
            println!("{}", cache_dir.display());
            return Ok(());
        }
        Command::KeepCached { source, cache, http_listen, interval_s } => {
            let ready = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let state = crate::http::HttpState {
                metrics: crate::metrics::Metrics::new().context("registering metrics")?,
                ready: ready.clone(),
            };
            let listener =
                tokio::net::TcpListener::bind(http_listen).await.with_context(|| format!("binding {http_listen}"))?;
            tokio::spawn(async move { axum::serve(listener, crate::http::router(state)).await });
            let node = cache.node_cache();
            let options = crate::weights::store_options_from_env();
            let interval = std::time::Duration::from_secs(interval_s.max(1));
            tokio::select! {
                _ = node.keep(&source, cache.sha256.as_deref(), &options, interval, &ready) => {}
                _ = shutdown_signal() => {}
            }
            return Ok(());
        }
        Command::Fetch { source, cache } => {
            let node = cache.node_cache();
            let options = crate::weights::store_options_from_env();
            let cached = node
                .fetch(&source, cache.sha256.as_deref(), &options)
                .await
                .with_context(|| format!("caching {source} in {}", node.root().display()))?;
            tracing::info!(tier = cached.tier.name(), seconds = cached.seconds, bytes = cached.bytes, sha256 = %cached.sha256, "weights cached");
            println!("{}", cached.path.display());
            return Ok(());
        }
    };
    let external = match (args.engine, args.upstream) {
        (EngineKind::External, Some(upstream)) => Some(crate::external::ExternalConfig {
            upstream,
            upstream_model: args.upstream_model,
            modality: args.modality,
            priority: args.upstream_priority,
            health_interval: std::time::Duration::from_millis(args.health_interval_ms),
            api_key: args.upstream_api_key,
            flavor: args.upstream_kind,
        }),
        (EngineKind::External, None) => anyhow::bail!("--engine external needs --upstream"),
        (EngineKind::Builtin, _) => None,
    };
    let model = match (args.model, &external) {
        (Some(model), _) => model,
        (None, Some(_)) => String::new(),
        (None, None) => anyhow::bail!("--model is required (the weights to serve) unless --engine external"),
    };
    let config = RunnerConfig {
        external,
        model,
        sha256: args.cache.sha256,
        cache_dir: args.cache.cache_dir,
        cache_budget_bytes: args.cache.cache_budget_gib << 30,
        cache_priority: args.cache.cache_priority,
        pin_weights: args.pin_weights,
        model_id: args.model_id,
        grpc_listen: args.listen,
        http_listen: args.http_listen,
        threads: args.threads,
        device: args.device,
        kv_cache_bytes: args.kv_cache_mib << 20,
        max_batch_tokens: args.max_batch_tokens,
        max_running: args.max_running,
        swap_bytes: args.swap_mib << 20,
        gpu_index: args.gpu_index,
        auth_token: args
            .auth_token_file
            .as_deref()
            .map(mantle_proto::auth::Token::from_file)
            .transpose()
            .context("reading the router's token (--auth-token-file)")?,
        chat_template: args.chat_template.map(|t| match t {
            Template::Chatml => TemplateFamily::ChatMl,
            Template::Llama3 => TemplateFamily::Llama3,
            Template::Mistral => TemplateFamily::Mistral,
        }),
    };
    let model_id = config.model_id.clone();
    let runner = crate::start(config).await.with_context(|| format!("starting the runner for {model_id}"))?;
    shutdown_signal().await;
    tracing::info!("shutting down");
    runner.shutdown().await.context("shutting the runner down")
}

/// Ctrl-C, or SIGTERM (what Kubernetes and `mantle dev` send).
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    #[test]
    fn prepare_cache_makes_the_directory_and_gives_it_to_the_owner() {
        let root = std::env::temp_dir().join(format!("mantle-prepare-{}", std::process::id()));
        let dir = root.join("var/cache/mantle/weights");
        let me = std::fs::metadata(std::env::temp_dir()).unwrap();
        let owner = format!("{}:{}", me.uid(), me.gid());
        prepare_cache(&dir, &owner).unwrap();
        let made = std::fs::metadata(&dir).unwrap();
        assert!(made.is_dir() && made.uid() == me.uid() && made.gid() == me.gid());
        // Again: nothing to do, no error.
        prepare_cache(&dir, &owner).unwrap();
        for bad in ["65532", "a:b", "1:", ":2", "1:2:3"] {
            let err = prepare_cache(&dir, bad).unwrap_err().to_string();
            assert!(err.contains("uid:gid"), "{bad}: {err}");
        }
        std::fs::remove_dir_all(root).ok();
    }
}
