//! Wiring: load the model, start the scheduler thread, serve gRPC and HTTP until shut down.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use mantle_engine::kv_cache::KvCache;
use mantle_engine::{
    Backend, EmbeddingModel, EngineError, GgufFile, Scheduler, SchedulerConfig, TemplateFamily, TextModel,
};
use mantle_proto::auth::{RequireToken, Token};
use mantle_proto::runner_server::RunnerServer;
use mantle_proto::{InfoResponse, TierLoad};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::engine_loop::{EngineHandle, LoopStats};
use crate::http::{HttpState, router};
use crate::metrics::Metrics;
use crate::service::{RunnerService, Served};
use crate::weights::{NodeCache, WeightError, store_options_from_env};

/// Why a runner could not start, or did not stop cleanly. Each variant keeps its cause as its
/// source; the binary prints the chain.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("registering metrics")]
    Metrics(#[source] prometheus::Error),
    #[error("binding {addr}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("fetching {uri} into the node weight cache")]
    Fetch { uri: String, source: WeightError },
    #[error("loading {}", path.display())]
    Load { path: PathBuf, source: EngineError },
    #[error("the task loading {} failed", path.display())]
    LoadTask { path: PathBuf, source: tokio::task::JoinError },
    #[error("--kv-cache-mib {mib} holds no block of {block_size} tokens")]
    KvCacheTooSmall { mib: usize, block_size: usize },
    #[error("starting the scheduler thread")]
    SchedulerThread(#[source] std::io::Error),
    #[error("the gRPC server task failed")]
    GrpcTask(#[source] tokio::task::JoinError),
    #[error("the gRPC server failed")]
    Grpc(#[source] tonic::transport::Error),
    #[error("connecting to the external engine")]
    External(#[source] crate::external::ExternalError),
}

#[derive(Debug, Clone)]
pub struct RunnerConfig {
    /// The weights: a GGUF file (TEXT) or a directory with `model.safetensors`,
    /// `config.json` and `tokenizer.json` (EMBEDDING) — a local path, or an object-store URI
    /// (`s3://…`, `gs://…`, `az://…`, `https://…`, `file://…`, `pvc://…`; a directory ends in `/`)
    /// fetched through the node weight cache.
    pub model: String,
    /// Expected SHA-256 of the weights (of the manifest, for a directory).
    pub sha256: Option<String>,
    /// The node-local weight cache (L3) and its byte budget.
    pub cache_dir: PathBuf,
    pub cache_budget_bytes: u64,
    /// Eviction priority of the weights in the node cache (see [`NodeCache::with_priority`]).
    pub cache_priority: u8,
    /// Lock the mapped weights in RAM (a FoundationModel's `weightCache.pinInHostMemory`).
    pub pin_weights: bool,
    /// The Bedrock-style id the model is served under.
    pub model_id: String,
    pub grpc_listen: SocketAddr,
    pub http_listen: SocketAddr,
    /// Compute threads (0: one per core).
    pub threads: usize,
    /// Where a text model runs: `cpu` (the engine's kernels), `cuda`, `cuda:N`, `candle-cpu`.
    pub device: String,
    /// Bytes of KV cache.
    pub kv_cache_bytes: usize,
    /// Tokens per forward pass.
    pub max_batch_tokens: usize,
    /// Sequences decoding at once.
    pub max_running: usize,
    /// Host memory for the KV blocks of preempted sequences.
    pub swap_bytes: usize,
    /// Overrides the chat template embedded in the weights.
    pub chat_template: Option<TemplateFamily>,
    /// The GPU whose health is reported (with the `nvml` feature).
    pub gpu_index: u32,
    /// The token every gRPC call must carry (the router's); `None` serves anyone who reaches the
    /// port.
    pub auth_token: Option<Token>,
    /// Serve through an OpenAI-compatible upstream instead of loading the model (`--engine
    /// external`); `model`, when not empty, is then a GGUF whose tokenizer counts tokens for an
    /// upstream without `/tokenize`.
    pub external: Option<crate::external::ExternalConfig>,
}

impl RunnerConfig {
    /// A runner for one machine (`mantle dev`, tests, benchmarks): gRPC and HTTP on free loopback
    /// ports, a 256 MiB KV cache and as much swap, a node cache in the temporary directory.
    pub fn local(model: impl Into<String>, model_id: impl Into<String>) -> Self {
        Self {
            model: model.into(),
            model_id: model_id.into(),
            sha256: None,
            cache_dir: std::env::temp_dir().join("mantle-weights"),
            cache_budget_bytes: 8 << 30,
            cache_priority: 0,
            pin_weights: false,
            grpc_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            http_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            threads: 0,
            device: "cpu".into(),
            kv_cache_bytes: 256 << 20,
            max_batch_tokens: 256,
            max_running: 64,
            swap_bytes: 256 << 20,
            chat_template: None,
            gpu_index: 0,
            auth_token: None,
            external: None,
        }
    }

    /// A runner in front of the OpenAI-compatible server at `upstream`, for one machine.
    pub fn external(upstream: impl Into<String>, model_id: impl Into<String>) -> Self {
        Self { external: Some(crate::external::ExternalConfig::new(upstream)), ..Self::local("", model_id) }
    }
}

/// A started runner. Dropping it shuts the servers down.
pub struct RunningRunner {
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    stopping: Arc<AtomicBool>,
    grpc: JoinHandle<Result<(), tonic::transport::Error>>,
}

/// How long open generations get to finish when the runner stops.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

impl RunningRunner {
    /// Stops accepting requests, ends Health streams, lets running generations finish for up to
    /// [`SHUTDOWN_GRACE`], and waits for the gRPC server.
    pub async fn shutdown(mut self) -> Result<(), ServerError> {
        self.stopping.store(true, Ordering::Relaxed);
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        match tokio::time::timeout(SHUTDOWN_GRACE, &mut self.grpc).await {
            Ok(done) => done.map_err(ServerError::GrpcTask)?.map_err(ServerError::Grpc),
            Err(_) => {
                tracing::warn!("streams still open after {}s; stopping anyway", SHUTDOWN_GRACE.as_secs());
                self.grpc.abort();
                Ok(())
            }
        }
    }
}

impl Drop for RunningRunner {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// Binds both listeners, loads the model (HTTP answers `/readyz` 503 meanwhile) and serves.
pub async fn start(config: RunnerConfig) -> Result<RunningRunner, ServerError> {
    let metrics = Metrics::new().map_err(ServerError::Metrics)?;
    let ready = Arc::new(AtomicBool::new(false));
    let (http_listener, http_addr) = bind(config.http_listen).await?;
    let app = router(HttpState { metrics: metrics.clone(), ready: ready.clone() });
    tokio::spawn(async move {
        if let Err(e) = axum::serve(http_listener, app).await {
            tracing::error!(error = %e, "HTTP server stopped");
        }
    });
    let (grpc_listener, grpc_addr) = bind(config.grpc_listen).await?;
    let stopping = Arc::new(AtomicBool::new(false));
    let gpu = crate::gpu::spawn_sampler(config.gpu_index);

    let weights = if config.model.is_empty() { None } else { Some(weights(&config).await?) };
    let grpc = if let Some(external) = &config.external {
        let tokenizer = match weights {
            None => None,
            Some((path, _)) => {
                let family = config.chat_template;
                let failed = |source| ServerError::Load { path: path.clone(), source };
                let loading = path.clone();
                Some(
                    tokio::task::spawn_blocking(move || crate::external::local_tokenizer(&loading, family))
                        .await
                        .map_err(|source| ServerError::LoadTask { path: path.clone(), source })?
                        .map_err(failed)?,
                )
            }
        };
        // The monitor keeps `ready` in step with the upstream from here on.
        let service = crate::external::connect(
            external,
            &config.model_id,
            tokenizer,
            gpu,
            ready.clone(),
            stopping.clone(),
            metrics.clone(),
        )
        .await
        .map_err(ServerError::External)?;
        serve(service, grpc_listener, &config)
    } else {
        let (model_path, mut weight_load) = match weights {
            Some(w) => w,
            None => (PathBuf::new(), Vec::new()),
        };
        let started = Instant::now();
        let (served, info) = load(&config, &model_path, &metrics).await?;
        weight_load.push(TierLoad { tier: "host_memory".into(), seconds: started.elapsed().as_secs_f64() });
        for load in &weight_load {
            metrics.weight_load_seconds.with_label_values(&[&load.tier]).set(load.seconds);
        }
        let info = InfoResponse { weight_load, ..info };
        let service = RunnerService::new(served, info, gpu, stopping.clone());
        let grpc = serve(service, grpc_listener, &config);
        ready.store(true, Ordering::Release);
        grpc
    };
    tracing::info!(model_id = %config.model_id, %grpc_addr, %http_addr, "runner ready");
    Ok(RunningRunner { grpc_addr, http_addr, shutdown: Some(grpc.1), stopping, grpc: grpc.0 })
}

type GrpcTask = (JoinHandle<Result<(), tonic::transport::Error>>, oneshot::Sender<()>);

/// Serves `service` on `listener` until the returned sender fires.
fn serve<S: mantle_proto::runner_server::Runner>(service: S, listener: TcpListener, config: &RunnerConfig) -> GrpcTask {
    let (shutdown, shutdown_rx) = oneshot::channel::<()>();
    let grpc = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(RunnerServer::with_interceptor(service, RequireToken(config.auth_token.clone())))
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                async {
                    let _ = shutdown_rx.await;
                },
            ),
    );
    (grpc, shutdown)
}

/// The weights on local disk: `config.model` itself, or its copy in the node cache (fetched now
/// when missing) with the time each tier took.
async fn weights(config: &RunnerConfig) -> Result<(PathBuf, Vec<TierLoad>), ServerError> {
    if !config.model.contains("://") {
        return Ok((PathBuf::from(&config.model), Vec::new()));
    }
    let cache = NodeCache::new(&config.cache_dir, config.cache_budget_bytes).with_priority(config.cache_priority);
    let cached = cache
        .fetch(&config.model, config.sha256.as_deref(), &store_options_from_env())
        .await
        .map_err(|source| ServerError::Fetch { uri: config.model.clone(), source })?;
    Ok((cached.path, vec![TierLoad { tier: cached.tier.name().into(), seconds: cached.seconds }]))
}

/// A listener on `addr` and the address it got (`addr` may name port 0).
async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), ServerError> {
    let bound = |source| ServerError::Bind { addr, source };
    let listener = TcpListener::bind(addr).await.map_err(bound)?;
    let local = listener.local_addr().map_err(bound)?;
    Ok((listener, local))
}

/// Loads what `config.model_path` holds: a directory with `model.safetensors` is an EMBEDDING
/// model, a file is a TEXT model in GGUF (served through the scheduler).
async fn load(
    config: &RunnerConfig,
    model_path: &std::path::Path,
    metrics: &Metrics,
) -> Result<(Served, InfoResponse), ServerError> {
    let path = model_path.to_path_buf();
    let failed = |source| ServerError::Load { path: model_path.to_path_buf(), source };
    let task_failed = |source| ServerError::LoadTask { path: model_path.to_path_buf(), source };
    let info = InfoResponse {
        model_id: config.model_id.clone(),
        kernels: mantle_engine::quant::kernels().name.into(),
        ..Default::default()
    };
    if path.is_dir() {
        let model = tokio::task::spawn_blocking(move || EmbeddingModel::load(&path))
            .await
            .map_err(task_failed)?
            .map_err(failed)?;
        let (_, stats) = watch::channel(LoopStats::default());
        let info = InfoResponse {
            modality: "EMBEDDING".into(),
            context_length: model.max_tokens() as u32,
            embedding_dimensions: model.dimensions() as u32,
            ..info
        };
        return Ok((Served::Embedding { model: Arc::new(model), stats }, info));
    }
    let (template, threads, pin) = (config.chat_template, config.threads, config.pin_weights);
    let device = config.device.clone();
    let model = tokio::task::spawn_blocking(move || {
        let backend = Backend::parse(&device)?;
        let gguf = GgufFile::open(&path)?;
        if pin {
            gguf.lock_in_memory()?;
        }
        TextModel::from_gguf(&gguf, template, threads, &backend)
    })
    .await
    .map_err(task_failed)?
    .map_err(failed)?;
    let model = Arc::new(model);
    let c = &model.model.config;
    let block_size = 16;
    let num_blocks = KvCache::blocks_for_budget(config.kv_cache_bytes, c.n_layer, c.kv_dim(), block_size);
    if num_blocks == 0 {
        return Err(ServerError::KvCacheTooSmall { mib: config.kv_cache_bytes >> 20, block_size });
    }
    let scheduler = Scheduler::new(
        model.clone(),
        SchedulerConfig {
            block_size,
            num_blocks,
            max_batch_tokens: config.max_batch_tokens,
            max_running: config.max_running,
            swap_bytes: config.swap_bytes,
        },
    )
    .map_err(failed)?;
    let info = InfoResponse {
        modality: "TEXT".into(),
        context_length: c.context_length.min(num_blocks * block_size) as u32,
        vocab_size: c.vocab as u32,
        threads: model.model.threads() as u32,
        ..info
    };
    let engine = EngineHandle::spawn(scheduler, metrics.clone()).map_err(ServerError::SchedulerThread)?;
    tracing::info!(kv_blocks = num_blocks, device = %model.model.device_name(), "KV cache allocated");
    Ok((Served::Text { model, engine }, info))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Starts a runner that is expected to fail, and returns why.
    async fn start_error(config: RunnerConfig) -> ServerError {
        match start(config).await {
            Ok(_) => panic!("the runner started"),
            Err(e) => e,
        }
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("mantle-server-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[tokio::test]
    async fn a_missing_model_file_is_a_load_error_naming_it() {
        let missing = scratch("missing").join("model.gguf");
        let err = start_error(RunnerConfig::local(missing.to_string_lossy(), "acme.text-v1:0")).await;
        assert!(matches!(&err, ServerError::Load { path, .. } if *path == missing), "{err:?}");
        assert!(err.to_string().contains(&missing.display().to_string()), "{err}");
    }

    #[tokio::test]
    async fn weights_that_do_not_match_their_sha256_stop_the_start() {
        let dir = scratch("mismatch");
        let weights = dir.join("model.gguf");
        std::fs::write(&weights, b"not the weights the manifest names").unwrap();
        let config = RunnerConfig {
            sha256: Some("0".repeat(64)),
            cache_dir: dir.join("cache"),
            ..RunnerConfig::local(format!("file://{}", weights.display()), "acme.text-v1:0")
        };
        let err = start_error(config).await;
        assert!(
            matches!(&err, ServerError::Fetch { source: WeightError::Sha256Mismatch { expected, .. }, .. } if *expected == "0".repeat(64)),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn an_address_in_use_is_a_bind_error_naming_it() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let config = RunnerConfig { http_listen: addr, ..RunnerConfig::local("unused.gguf", "acme.text-v1:0") };
        let err = start_error(config).await;
        assert!(matches!(&err, ServerError::Bind { addr: a, .. } if *a == addr), "{err:?}");
    }

    #[tokio::test]
    async fn a_kv_cache_without_room_for_one_block_is_refused() {
        let model = mantle_engine::test_support::smollm2_path();
        let config =
            RunnerConfig { kv_cache_bytes: 1, ..RunnerConfig::local(model.to_string_lossy(), "acme.text-v1:0") };
        let err = start_error(config).await;
        assert!(matches!(err, ServerError::KvCacheTooSmall { mib: 0, block_size: 16 }), "{err:?}");
    }
}
