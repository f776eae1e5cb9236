//! The model runner's command line for one FoundationModel replica: what the operator puts in a
//! runner pod, and what `mantle dev` runs locally, so both start runners the same way — the
//! builtin engine serving weights, or the sidecar fronting an External engine's server.

use mantle_crds::{CacheTier, ChatTemplate, EngineType, ExternalEngine, FoundationModel, Modality};

/// Where a replica runs, which the FoundationModel does not say.
#[derive(Clone, Debug, PartialEq)]
pub struct RunnerPlacement {
    /// The weights to serve: the model's source URI, or a local path already holding them. For an
    /// External engine, optional (empty: none): a GGUF whose tokenizer counts tokens when the
    /// server has no `/tokenize`.
    pub model: String,
    pub grpc_listen: String,
    pub http_listen: String,
    /// Compute threads (0: one per core).
    pub threads: usize,
    /// The node-local weight cache (`--cache-dir`), when the pod has one.
    pub cache_dir: Option<String>,
    /// Where the model runs (`--device`: `cuda` on a GPU node); `None` is the runner's CPU.
    pub device: Option<String>,
    /// The weights' eviction priority in the node cache (`--cache-priority`; 0 is left out).
    pub cache_priority: u8,
}

/// `mantle-runner` arguments (after the binary name) serving `model` at `placement`.
pub fn runner_args(model: &FoundationModel, placement: &RunnerPlacement) -> Vec<String> {
    if let (EngineType::External, Some(external)) = (model.spec.engine.type_, &model.spec.engine.external) {
        return external_args(model, external, placement);
    }
    let spec = &model.spec;
    let sha256 = spec.source.as_ref().and_then(|s| s.sha256.as_ref());
    let mut args = vec![
        "serve".to_string(),
        format!("--model={}", placement.model),
        format!("--model-id={}", spec.model_id),
        format!("--listen={}", placement.grpc_listen),
        format!("--http-listen={}", placement.http_listen),
        format!("--threads={}", placement.threads),
    ];
    if let Some(sha) = sha256 {
        args.push(format!("--sha256={sha}"));
    }
    if let Some(dir) = &placement.cache_dir {
        args.push(format!("--cache-dir={dir}"));
    }
    if let Some(device) = &placement.device {
        args.push(format!("--device={device}"));
    }
    if placement.cache_priority > 0 {
        args.push(format!("--cache-priority={}", placement.cache_priority));
    }
    if spec.weight_cache.pin_in_host_memory && spec.weight_cache.tiers.contains(&CacheTier::HostMemory) {
        args.push("--pin-weights".into());
    }
    if let Some(template) = spec.chat_template {
        let name = match template {
            ChatTemplate::ChatML => "chatml",
            ChatTemplate::Llama3 => "llama3",
            ChatTemplate::Mistral => "mistral",
        };
        args.push(format!("--chat-template={name}"));
    }
    args
}

/// The sidecar's arguments: it calls the server (the endpoint, or the engine container in the
/// same pod) and loads no weights, so the builtin engine's threads, device and cache do not apply.
fn external_args(model: &FoundationModel, external: &ExternalEngine, placement: &RunnerPlacement) -> Vec<String> {
    let spec = &model.spec;
    let modality = match spec.modality {
        Modality::Text => "text",
        Modality::Embedding => "embedding",
    };
    let mut args = vec![
        "serve".to_string(),
        "--engine=external".into(),
        format!("--upstream={}", external.upstream()),
        format!("--model-id={}", spec.model_id),
        format!("--listen={}", placement.grpc_listen),
        format!("--http-listen={}", placement.http_listen),
        format!("--modality={modality}"),
    ];
    if let Some(name) = &external.model {
        args.push(format!("--upstream-model={name}"));
    }
    if !placement.model.is_empty() {
        args.push(format!("--model={}", placement.model));
    }
    args
}
