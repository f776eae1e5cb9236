//! The model runner's command line for one FoundationModel replica: what the operator puts in a
//! runner pod, and what `mantle dev` runs locally, so both start runners the same way.

use mantle_crds::{CacheTier, ChatTemplate, FoundationModel};

/// Where a replica runs, which the FoundationModel does not say.
#[derive(Clone, Debug, PartialEq)]
pub struct RunnerPlacement {
    /// The weights to serve: the model's source URI, or a local path already holding them.
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
    let spec = &model.spec;
    let mut args = vec![
        "serve".to_string(),
        format!("--model={}", placement.model),
        format!("--model-id={}", spec.model_id),
        format!("--listen={}", placement.grpc_listen),
        format!("--http-listen={}", placement.http_listen),
        format!("--threads={}", placement.threads),
    ];
    if let Some(sha) = &spec.source.sha256 {
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
