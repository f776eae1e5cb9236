//! The external engine (`serve --engine external --upstream URL`): the runner's gRPC API over an
//! OpenAI-compatible server (vLLM, SGLang, llama.cpp's server, Ollama) — the sidecar beside an
//! External FoundationModel's engine container, or in front of a server already running on a
//! developer's machine (`mantle dev`, `engine.external.endpoint`).
//!
//! - [`openai`]: the request and stream-chunk mapping (pure); [`sse`]: the event-stream decoder.
//! - [`relay`]: one Generate stream (stop sequences, limits, cancellation, deadlines).
//! - [`upstream`]: the one HTTP connection pool and the error mapping.
//! - [`load`] and [`monitor`]: health and load from the upstream's own endpoints and metrics.
//! - [`service`]: the gRPC service.

pub mod load;
pub mod monitor;
pub mod openai;
pub mod relay;
pub mod service;
pub mod sse;
pub mod upstream;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use mantle_proto::InfoResponse;
use serde_json::Value;
use tokio::sync::watch;

use crate::metrics::Metrics;
use openai::PriorityMode;
use service::{ExternalService, LocalTokenizer};
use upstream::Upstream;

/// Which server the upstream is, as far as the runner adapts to it (extra request fields, where
/// its load and token counts are read).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Flavor {
    Vllm,
    Sglang,
    LlamaCpp,
    /// Any other OpenAI-compatible server: standard fields only.
    #[default]
    Generic,
}

impl Flavor {
    pub fn name(self) -> &'static str {
        match self {
            Flavor::Vllm => "vllm",
            Flavor::Sglang => "sglang",
            Flavor::LlamaCpp => "llama.cpp",
            Flavor::Generic => "openai-compatible",
        }
    }
}

/// What the upstream serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
#[value(rename_all = "lower")]
pub enum Modality {
    #[default]
    Text,
    Embedding,
}

/// How to reach the upstream.
#[derive(Debug, Clone)]
pub struct ExternalConfig {
    /// Its base URL (`http://127.0.0.1:8000`).
    pub upstream: String,
    /// The model name to ask it for; `None`: the first its `/v1/models` lists.
    pub upstream_model: Option<String>,
    pub modality: Modality,
    pub priority: PriorityMode,
    /// How often its health and metrics are read.
    pub health_interval: Duration,
    /// Sent as `Authorization: Bearer` (MANTLE_UPSTREAM_API_KEY).
    pub api_key: Option<String>,
    /// Which server it is; `None`: recognised from its endpoints.
    pub flavor: Option<Flavor>,
}

impl ExternalConfig {
    pub fn new(upstream: impl Into<String>) -> Self {
        Self {
            upstream: upstream.into(),
            upstream_model: None,
            modality: Modality::Text,
            priority: PriorityMode::None,
            health_interval: Duration::from_millis(500),
            api_key: None,
            flavor: None,
        }
    }
}

/// Why the external engine could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ExternalError {
    #[error("building the HTTP client for {upstream}")]
    Client { upstream: String, source: reqwest::Error },
    #[error("the upstream {upstream} lists no model; name one with --upstream-model")]
    NoModel { upstream: String },
    #[error("probing the upstream's embeddings")]
    Probe(#[source] upstream::UpstreamError),
    #[error("the upstream's embeddings are malformed: {0}")]
    Embeddings(String),
}

/// How long startup waits between tries while the upstream is not up yet (its engine is still
/// loading the weights), and between log lines about it.
const WAIT_RETRY: Duration = Duration::from_millis(500);
const WAIT_LOG: Duration = Duration::from_secs(10);

/// Waits for the upstream to answer (forever: an engine loading a large model takes minutes;
/// `/readyz` says 503 meanwhile), learns what it serves, starts watching it and returns the gRPC
/// service. `tokenizer` is a GGUF whose tokenizer counts tokens when the upstream cannot.
#[allow(clippy::too_many_arguments)]
pub async fn connect(
    config: &ExternalConfig,
    model_id: &str,
    tokenizer: Option<LocalTokenizer>,
    gpu: watch::Receiver<Option<crate::gpu::GpuSample>>,
    ready: Arc<AtomicBool>,
    stopping: Arc<AtomicBool>,
    metrics: Metrics,
) -> Result<ExternalService, ExternalError> {
    let upstream = Upstream::new(&config.upstream, config.api_key.clone())
        .map_err(|source| ExternalError::Client { upstream: config.upstream.clone(), source })?;
    let waited = Instant::now();
    let mut logged: Option<Instant> = None;
    let models = loop {
        match upstream.get_json("/v1/models", Duration::from_secs(5)).await {
            Ok(models) => break models,
            Err(e) => {
                if logged.is_none_or(|t| t.elapsed() >= WAIT_LOG) {
                    tracing::info!(upstream = upstream.base(), error = %e, waited_s = waited.elapsed().as_secs(), "waiting for the upstream engine");
                    logged = Some(Instant::now());
                }
                tokio::time::sleep(WAIT_RETRY).await;
            }
        }
    };
    let listed: Vec<&Value> =
        models.get("data").and_then(Value::as_array).map(|d| d.iter().collect()).unwrap_or_default();
    let model = match &config.upstream_model {
        Some(m) => m.clone(),
        None => listed
            .first()
            .and_then(|m| m.get("id"))
            .and_then(Value::as_str)
            .ok_or_else(|| ExternalError::NoModel { upstream: config.upstream.clone() })?
            .to_string(),
    };
    let entry = listed.iter().find(|m| m.get("id").and_then(Value::as_str) == Some(model.as_str()));
    if entry.is_none() {
        tracing::warn!(model = %model, upstream = upstream.base(), "the upstream does not list this model; asking for it anyway");
    }
    let probe = Duration::from_secs(5);
    let props = upstream.get_json("/props", probe).await.ok();
    let metrics_flavor = match upstream.get_text("/metrics", probe).await {
        Ok(text) => load::parse_metrics(&text).map(|(f, _)| f),
        Err(_) => None,
    };
    let owned_by = entry.and_then(|m| m.get("owned_by")).and_then(Value::as_str).unwrap_or_default();
    let flavor = config.flavor.unwrap_or_else(|| detect(props.as_ref(), metrics_flavor, owned_by));
    let context_length = entry
        .and_then(|m| m.get("max_model_len"))
        .or_else(|| props.as_ref().and_then(|p| p.pointer("/default_generation_settings/n_ctx")))
        .and_then(Value::as_u64)
        .unwrap_or(0) as u32;
    let mut info = InfoResponse {
        model_id: model_id.to_string(),
        modality: match config.modality {
            Modality::Text => "TEXT".into(),
            Modality::Embedding => "EMBEDDING".into(),
        },
        context_length,
        kernels: format!("external {} at {} ({model})", flavor.name(), upstream.base()),
        ..Default::default()
    };
    if config.modality == Modality::Embedding {
        let body = serde_json::json!({"model": model, "input": ["dimensions"], "encoding_format": "float"});
        let answer = upstream
            .post_json("/v1/embeddings", &body, Duration::from_secs(120))
            .await
            .map_err(ExternalError::Probe)?;
        let (vectors, _) = service::embeddings(&answer, 1).map_err(ExternalError::Embeddings)?;
        info.embedding_dimensions = vectors[0].len() as u32;
    }
    if let Some(t) = &tokenizer {
        info.vocab_size = t.tokenizer.vocab_size() as u32;
    }
    tracing::info!(upstream = upstream.base(), model = %model, flavor = flavor.name(), context_length, "the upstream answers");
    // It has just answered: ready, until the monitor finds otherwise.
    ready.store(true, std::sync::atomic::Ordering::Release);
    let (tx, state) = watch::channel(monitor::UpstreamState::default());
    tokio::spawn(monitor::watch_upstream(upstream.clone(), flavor, config.health_interval, tx, ready, metrics.clone()));
    Ok(ExternalService {
        upstream,
        model,
        flavor,
        modality: config.modality,
        priority: config.priority,
        info,
        state,
        gpu,
        stopping,
        tokenizer: tokenizer.map(Arc::new),
        metrics,
    })
}

/// Which server answers: llama.cpp's has `/props`; vLLM's and SGLang's metrics carry their
/// prefixes (and their `/v1/models` says `owned_by`).
fn detect(props: Option<&Value>, metrics: Option<Flavor>, owned_by: &str) -> Flavor {
    if props.is_some_and(|p| p.get("default_generation_settings").is_some()) {
        return Flavor::LlamaCpp;
    }
    if let Some(f) = metrics {
        return f;
    }
    match owned_by {
        "vllm" => Flavor::Vllm,
        "sglang" => Flavor::Sglang,
        "llamacpp" => Flavor::LlamaCpp,
        _ => Flavor::Generic,
    }
}

/// The tokenizer and chat template of the GGUF at `path`, without its weights.
pub fn local_tokenizer(
    path: &Path,
    family: Option<mantle_engine::TemplateFamily>,
) -> Result<LocalTokenizer, mantle_engine::EngineError> {
    let gguf = mantle_engine::GgufFile::open(path)?;
    let tokenizer = mantle_engine::Tokenizer::from_gguf(&gguf)?;
    let template = mantle_engine::chat_template(&gguf, &tokenizer, family)?;
    Ok(LocalTokenizer { tokenizer, template })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_server_is_recognised_by_its_props_metrics_or_owner() {
        let props = serde_json::json!({"default_generation_settings": {"n_ctx": 4096}});
        assert_eq!(detect(Some(&props), None, ""), Flavor::LlamaCpp);
        assert_eq!(detect(Some(&serde_json::json!({})), Some(Flavor::Sglang), ""), Flavor::Sglang);
        assert_eq!(detect(None, None, "vllm"), Flavor::Vllm);
        assert_eq!(detect(None, None, "library"), Flavor::Generic, "Ollama");
    }
}
