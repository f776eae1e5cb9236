//! FoundationModel: one model Mantle serves — where its weights come from, which engine runs it,
//! how many replicas on which Cells, how its weights are cached, what it costs.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{
    Condition, ENDPOINT_URL_PATTERN, MODEL_ID_PATTERN, MODEL_SOURCE_URI_PATTERN, NAME_PATTERN, SHA256_PATTERN, Time,
};
use crate::validation::{Invalid, Validate, Violations};

/// A model Mantle serves under a Bedrock-style model id.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "mantle.dev",
    version = "v1alpha1",
    kind = "FoundationModel",
    namespaced,
    status = "FoundationModelStatus",
    shortname = "fm",
    category = "mantle",
    derive = "PartialEq",
    doc = "A foundation model served by Mantle: weights, engine, replicas per Cell, weight caching and price.",
    printcolumn(name = "Model ID", type_ = "string", json_path = ".spec.modelId"),
    printcolumn(name = "Modality", type_ = "string", json_path = ".spec.modality"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Ready", type_ = "integer", json_path = ".status.readyReplicas"),
    printcolumn(name = "Cached", type_ = "string", json_path = ".status.weightsCached"),
    printcolumn(name = "Lifecycle", type_ = "string", json_path = ".spec.lifecycle.status", priority = 1),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[x_kube(
    validation = Rule::new("self.modality == 'TEXT' || !has(self.draftModel)").message("draftModel (speculative decoding) applies to TEXT models only").field_path(".draftModel"),
    validation = Rule::new("self.modality == 'TEXT' || !has(self.chatTemplate)").message("chatTemplate applies to TEXT models only").field_path(".chatTemplate"),
    validation = Rule::new("!has(self.invokeModelBody) || (self.modality == 'TEXT') == (self.invokeModelBody in ['AnthropicMessages', 'Llama', 'Mistral'])").message("invokeModelBody must be a body of the model's modality: AnthropicMessages, Llama or Mistral for TEXT; TitanEmbed or CohereEmbed for EMBEDDING").field_path(".invokeModelBody"),
    validation = Rule::new("!has(self.draftModel) || self.draftModel.modelId != self.modelId").message("a model cannot be its own draft model").field_path(".draftModel.modelId"),
    validation = Rule::new("!has(self.fallbacks) || self.fallbacks.all(f, f.modelId != self.modelId)").message("a model cannot be its own fallback").field_path(".fallbacks"),
    validation = Rule::new("has(self.source) || (has(self.engine) && has(self.engine.external) && has(self.engine.external.endpoint))").message("source is required unless the engine is an external endpoint").field_path(".source"),
    validation = Rule::new("!(has(self.engine) && has(self.engine.external) && has(self.engine.external.endpoint)) || !has(self.weightCache) || !has(self.weightCache.prewarm)").message("prewarm caches weights Mantle fetches; an external endpoint's server holds its own").field_path(".weightCache.prewarm")
)]
#[serde(rename_all = "camelCase")]
pub struct FoundationModelSpec {
    /// The id clients call the model by, Bedrock style `provider.name-vN:M`
    /// (for example `meta.llama3-8b-instruct-v1:0`). Immutable.
    #[schemars(regex(pattern = MODEL_ID_PATTERN), length(max = 128))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("modelId is immutable"))]
    pub model_id: String,
    /// Who made the model, as shown by ListFoundationModels (`providerName`).
    #[schemars(length(min = 1, max = 63))]
    pub provider: String,
    /// What the model produces.
    pub modality: Modality,
    /// Where the weights come from. Required, except for an external engine's `endpoint` (a
    /// server that holds its own weights), where a GGUF named here only lends its tokenizer to
    /// CountTokens when the server has no `/tokenize`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<ModelSource>,
    /// What runs the model.
    #[serde(default)]
    pub engine: Engine,
    /// A built-in chat template, for a weight file that carries none. Leave it unset for a file
    /// with its own template (GGUF `tokenizer.chat_template`): that template is the default and
    /// the right one (it holds the model's own turn markers and default system prompt), and a
    /// family named here replaces it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat_template: Option<ChatTemplate>,
    /// The native InvokeModel body the model takes and answers with (its Bedrock model family);
    /// a body of another family is refused with a ValidationException. Absent means the family
    /// of the modelId's provider prefix (`anthropic.` AnthropicMessages, `meta.` Llama,
    /// `mistral.` Mistral, `amazon.titan-embed` TitanEmbed, `cohere.embed` CohereEmbed), and
    /// otherwise AnthropicMessages for TEXT models and TitanEmbed for EMBEDDING models.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invoke_model_body: Option<InvokeModelBody>,
    /// The maximum number of tokens (prompt + completion) one request may use.
    #[schemars(range(min = 128, max = 1048576))]
    pub context_length: i32,
    /// What one replica needs: the runner's, or an External engine's container's. The runner in
    /// front of an External `endpoint` asks for none (it only forwards).
    #[serde(default)]
    pub resources: ModelResources,
    /// How many replicas run, and when to add more.
    #[serde(default)]
    pub replicas: Replicas,
    /// Which caching tiers hold the weights, so a new replica starts fast.
    #[serde(default)]
    pub weight_cache: WeightCachePolicy,
    /// The Cells (by name) the model is placed on; empty means every Active Cell.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Set)]
    #[schemars(inner(regex(pattern = NAME_PATTERN)))]
    pub cells: Vec<String>,
    /// Price per 1,000 tokens, used for metering and batch cost estimates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pricing: Option<Pricing>,
    /// What one model unit of ProvisionedThroughput buys. Absent means the model cannot be
    /// provisioned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provisioning: Option<Provisioning>,
    /// Whether the model is current or on its way out.
    #[serde(default)]
    pub lifecycle: Lifecycle,
    /// A smaller model of the same tokenizer that drafts tokens for speculative decoding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub draft_model: Option<DraftModel>,
    /// Models the router tries, in order, when this one cannot take a request; the response's
    /// `x-mantle-model-used` header names the model that answered.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 5))]
    pub fallbacks: Vec<Fallback>,
}

/// One step of a model's fallback chain.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Fallback {
    /// The model to try next (another FoundationModel of the same modality).
    #[schemars(regex(pattern = MODEL_ID_PATTERN))]
    pub model_id: String,
    /// Which failures of the previous model send a request here.
    #[serde(default)]
    pub on: FallbackTrigger,
}

/// The failures that move a request down the fallback chain.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum FallbackTrigger {
    /// The model's queue is full or the tenant's limit on it is reached (429).
    Throttled,
    /// No ready runner, or the runners failed (503 and runner errors).
    #[default]
    Unavailable,
    /// Any failure that is not the client's fault.
    AnyError,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Modality {
    /// Text in, text out (Converse, InvokeModel, chat completions).
    Text,
    /// Text in, vectors out (InvokeModel with an embedding body, `/v1/embeddings`).
    Embedding,
}

/// Where the weights come from and how to check them.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelSource {
    /// `s3://`, `gs://`, `az://`, `https://`, `file://` or `pvc://<claim>/<path>`. For
    /// safetensors models this is a directory holding the weights and `tokenizer.json`.
    #[schemars(regex(pattern = MODEL_SOURCE_URI_PATTERN), length(max = 2048))]
    pub uri: String,
    /// The weight file format.
    pub format: WeightFormat,
    /// SHA-256 of the weight file; a download that does not match is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = SHA256_PATTERN))]
    pub sha256: Option<String>,
    /// Credentials for the object store (keys such as `AWS_ACCESS_KEY_ID`), from a Secret in this
    /// namespace. Absent means the pod's own identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<crate::SecretRef>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum WeightFormat {
    /// One GGUF file, quantized or not (llama-family text models).
    Gguf,
    /// A directory of safetensors weights plus `tokenizer.json` (BERT-family embedding models).
    Safetensors,
}

/// What runs the model: Mantle's own engine, or an OpenAI-compatible server image.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[x_kube(validation = Rule::new("self.type == 'External' ? has(self.external) : !has(self.external)").message("external is required when type is External, and only then").field_path(".external"))]
#[serde(rename_all = "camelCase")]
pub struct Engine {
    #[serde(rename = "type", default)]
    pub type_: EngineType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external: Option<ExternalEngine>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum EngineType {
    /// The Mantle runner (continuous batching, paged KV cache, prefix caching).
    #[default]
    Builtin,
    /// A container serving the OpenAI API (vLLM, llama.cpp server, ...), fronted by the runner.
    External,
}

/// An OpenAI-compatible inference server (vLLM, SGLang, llama.cpp's server, Ollama) that the
/// runner fronts: a container Mantle runs beside the runner in each pod (`image`, what the
/// operator renders), or a server that already runs (`endpoint`, what `mantle dev` uses). Exactly
/// one of the two.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(
    validation = Rule::new("has(self.image) != has(self.endpoint)").message("exactly one of image (a container Mantle runs) and endpoint (a server already running) is required"),
    validation = Rule::new("!has(self.endpoint) || !has(self.args) || size(self.args) == 0").message("args are for the image's container; an endpoint's server is started by whoever runs it").field_path(".args")
)]
#[serde(rename_all = "camelCase")]
pub struct ExternalEngine {
    /// The container image the operator runs beside the runner (`vllm/vllm-openai:v0.11.0`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub image: Option<String>,
    /// The base URL of a server already running (`http://127.0.0.1:8080` for llama-server,
    /// `http://127.0.0.1:11434` for Ollama), without `/v1`: no engine container is run, and no
    /// weights are fetched for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = ENDPOINT_URL_PATTERN), length(max = 512))]
    pub endpoint: Option<String>,
    /// The model name the upstream serves it under; default: the first one its `/v1/models`
    /// lists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub model: Option<String>,
    /// Arguments for the image's container (with `image` only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// The port the image's container serves its OpenAI API on (with `image` only).
    #[serde(default = "default_external_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
}

impl ExternalEngine {
    /// The base URL the runner calls: the endpoint, or the image's container in the same pod.
    pub fn upstream(&self) -> String {
        match &self.endpoint {
            Some(endpoint) => endpoint.clone(),
            None => format!("http://127.0.0.1:{}", self.port),
        }
    }
}

fn default_external_port() -> i32 {
    8000
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ChatTemplate {
    /// `<|im_start|>role ... <|im_end|>` (Qwen, SmolLM, many fine-tunes).
    ChatML,
    /// `<|start_header_id|>role<|end_header_id|>` (Llama 3.x).
    Llama3,
    /// `[INST] ... [/INST]` (Mistral, Mixtral, Llama 2).
    Mistral,
}

/// A native InvokeModel body dialect, as Bedrock's model families define them.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum InvokeModelBody {
    /// Anthropic Messages `{anthropic_version, max_tokens, messages, system, ...}`, answered
    /// `{id, type: message, content, stop_reason, usage}`.
    AnthropicMessages,
    /// Meta Llama `{prompt, max_gen_len, temperature, top_p}`, answered
    /// `{generation, prompt_token_count, generation_token_count, stop_reason}`.
    Llama,
    /// Mistral `{prompt, max_tokens, stop, temperature, top_p, top_k}`, answered
    /// `{outputs: [{text, stop_reason}]}`.
    Mistral,
    /// Amazon Titan Text Embeddings `{inputText, dimensions, normalize}`, answered
    /// `{embedding, inputTextTokenCount}`.
    TitanEmbed,
    /// Cohere Embed `{texts, input_type, truncate, embedding_types}`, answered
    /// `{id, embeddings, texts, response_type}`.
    CohereEmbed,
}

impl InvokeModelBody {
    /// Whether the body is a text-generation body (else an embedding body).
    pub fn is_text(self) -> bool {
        matches!(self, InvokeModelBody::AnthropicMessages | InvokeModelBody::Llama | InvokeModelBody::Mistral)
    }

    /// The body a model takes: the declared one, else the family of the modelId's provider
    /// prefix, else the modality's default.
    pub fn of(declared: Option<InvokeModelBody>, model_id: &str, modality: Modality) -> InvokeModelBody {
        if let Some(body) = declared {
            return body;
        }
        let by_prefix = [
            ("anthropic.", InvokeModelBody::AnthropicMessages),
            ("meta.", InvokeModelBody::Llama),
            ("mistral.", InvokeModelBody::Mistral),
            ("amazon.titan-embed", InvokeModelBody::TitanEmbed),
            ("cohere.embed", InvokeModelBody::CohereEmbed),
        ];
        let implied = by_prefix.iter().find(|(p, _)| model_id.starts_with(p)).map(|(_, b)| *b);
        match (implied, modality) {
            (Some(body), _) if body.is_text() == (modality == Modality::Text) => body,
            (_, Modality::Text) => InvokeModelBody::AnthropicMessages,
            (_, Modality::Embedding) => InvokeModelBody::TitanEmbed,
        }
    }
}

/// What one replica needs from its node.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelResources {
    /// GPUs per replica; 0 runs on CPU.
    #[serde(default)]
    #[schemars(range(min = 0, max = 16))]
    pub gpus: i32,
    /// GPU product the replica needs, matched against the node label `nvidia.com/gpu.product`
    /// (for example `NVIDIA-H100-80GB-HBM3`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128))]
    pub gpu_type: Option<String>,
    /// Host memory per replica (request and limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Quantity>,
    /// CPU per replica (request).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<Quantity>,
}

/// Replica bounds and the autoscaling target.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("self.min <= self.max").message("replicas.min must not exceed replicas.max").field_path(".min"))]
#[serde(rename_all = "camelCase")]
pub struct Replicas {
    /// Replicas kept running when idle (0 scales to zero).
    #[serde(default = "default_min_replicas")]
    #[schemars(range(min = 0, max = 1000))]
    pub min: i32,
    /// Replicas never exceeded.
    #[serde(default = "default_max_replicas")]
    #[schemars(range(min = 1, max = 1000))]
    pub max: i32,
    /// Queued requests per replica above which another replica is added.
    #[serde(default = "default_target_queue_depth")]
    #[schemars(range(min = 1, max = 10000))]
    pub target_queue_depth: i32,
}

fn default_min_replicas() -> i32 {
    1
}
fn default_max_replicas() -> i32 {
    1
}
fn default_target_queue_depth() -> i32 {
    16
}

impl Default for Replicas {
    fn default() -> Self {
        Self {
            min: default_min_replicas(),
            max: default_max_replicas(),
            target_queue_depth: default_target_queue_depth(),
        }
    }
}

/// The weight-cache tiers, fastest first.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, JsonSchema)]
pub enum CacheTier {
    /// L1: weights resident in GPU memory (always true for a running replica).
    GpuMemory,
    /// L2: weights mapped in host RAM, optionally locked.
    HostMemory,
    /// L3: a node-local, content-addressed copy on disk.
    NodeDisk,
    /// L4: the object store named by `source.uri`.
    ObjectStore,
}

/// How weights are cached on the way from the object store to the GPU.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(
    validation = Rule::new("!self.pinInHostMemory || 'HostMemory' in self.tiers").message("pinInHostMemory needs the HostMemory tier").field_path(".pinInHostMemory"),
    validation = Rule::new("!has(self.prewarm) || 'NodeDisk' in self.tiers").message("prewarm fills the NodeDisk tier, so tiers must include NodeDisk").field_path(".prewarm")
)]
#[serde(rename_all = "camelCase")]
pub struct WeightCachePolicy {
    /// Tiers to use. The object store is always the source of truth.
    #[serde(default = "default_tiers")]
    #[x_kube(merge_strategy = ListMerge::Set)]
    #[schemars(length(min = 1, max = 4))]
    pub tiers: Vec<CacheTier>,
    /// Lock the weights in host RAM (mlock) so a restart of the engine reloads from memory.
    #[serde(default)]
    pub pin_in_host_memory: bool,
    /// Copy the weights to the node-local disk of these nodes before any replica needs them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prewarm: Option<Prewarm>,
}

fn default_tiers() -> Vec<CacheTier> {
    vec![CacheTier::GpuMemory, CacheTier::HostMemory, CacheTier::NodeDisk, CacheTier::ObjectStore]
}

impl Default for WeightCachePolicy {
    fn default() -> Self {
        Self { tiers: default_tiers(), pin_in_host_memory: false, prewarm: None }
    }
}

/// Which nodes get the weights ahead of time.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Prewarm {
    /// Nodes matching these labels (within the model's Cells) keep a copy on local disk.
    #[serde(default)]
    pub node_selector: BTreeMap<String, String>,
}

/// On-demand prices in US dollars per 1,000 tokens.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Pricing {
    #[schemars(range(min = 0.0))]
    pub input_per_1k_tokens: f64,
    #[schemars(range(min = 0.0))]
    pub output_per_1k_tokens: f64,
    /// Discount applied to batch inference, as a fraction of the on-demand price (Bedrock: 0.5).
    #[serde(default = "default_batch_discount")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub batch_discount: f64,
}

fn default_batch_discount() -> f64 {
    0.5
}

/// The capacity one ProvisionedThroughput model unit buys.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Provisioning {
    /// Tokens per minute (input + output) one model unit guarantees.
    #[schemars(range(min = 1))]
    pub tokens_per_minute_per_unit: i64,
}

/// Whether the model is current. LEGACY models keep serving until `endOfLife`, then answer
/// with a validation error as Bedrock does.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[x_kube(validation = Rule::new("self.status == 'ACTIVE' || has(self.endOfLife)").message("a LEGACY model needs an endOfLife date").field_path(".endOfLife"))]
#[serde(rename_all = "camelCase")]
pub struct Lifecycle {
    #[serde(default)]
    pub status: LifecycleStatus,
    /// When the model stops serving.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_of_life: Option<Time>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum LifecycleStatus {
    #[default]
    Active,
    Legacy,
}

/// The draft model for speculative decoding: another FoundationModel in this namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DraftModel {
    #[schemars(regex(pattern = MODEL_ID_PATTERN))]
    pub model_id: String,
    /// Tokens drafted per verification step.
    #[serde(default = "default_draft_tokens")]
    #[schemars(range(min = 1, max = 16))]
    pub num_draft_tokens: i32,
}

fn default_draft_tokens() -> i32 {
    4
}

/// What the operator has made of the spec.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct FoundationModelStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<ModelPhase>,
    /// `WeightsCached`, `Available`, `Degraded`.
    #[serde(default)]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// Ready replicas over all Cells.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Ready and desired replicas per Cell.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["cell".into()]))]
    pub cells: Vec<CellReplicas>,
    /// Runner endpoints (`host:port` of the gRPC API) the router may use.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<String>,
    /// SHA-256 of the weights the replicas run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights_sha256: Option<String>,
    /// With `weightCache.prewarm`: on how many of the selected nodes the weights are cached, as
    /// `ready/selected nodes`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights_cached: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ModelPhase {
    /// Waiting for a Cell with capacity.
    Pending,
    /// Weights are being copied into the cache tiers.
    Caching,
    /// At least one replica is ready.
    Ready,
    /// Fewer replicas are ready than `replicas.min`.
    Degraded,
    /// Nothing can run (bad weights, no Cell); the conditions say why.
    Failed,
}

/// Replicas of the model in one Cell.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CellReplicas {
    pub cell: String,
    pub ready: i32,
    pub desired: i32,
}

impl FoundationModelSpec {
    /// The running server an External engine names by `endpoint`: such a model has no engine
    /// container and no weights to fetch.
    pub fn external_endpoint(&self) -> Option<&str> {
        match (self.engine.type_, &self.engine.external) {
            (EngineType::External, Some(external)) => external.endpoint.as_deref(),
            _ => None,
        }
    }

    /// The weights Mantle fetches and caches for the model: none for an external endpoint.
    pub fn fetched_weights(&self) -> Option<&ModelSource> {
        if self.external_endpoint().is_some() { None } else { self.source.as_ref() }
    }
}

impl Validate for FoundationModelSpec {
    fn validate(&self) -> Result<(), Invalid> {
        let mut v = Violations::default();
        v.pattern(&self.model_id, MODEL_ID_PATTERN, "spec.modelId");
        match &self.source {
            Some(source) => {
                v.pattern(&source.uri, MODEL_SOURCE_URI_PATTERN, "spec.source.uri");
                if let Some(sha) = &source.sha256 {
                    v.pattern(sha, SHA256_PATTERN, "spec.source.sha256");
                }
            }
            None => v.check(
                self.external_endpoint().is_some(),
                "spec.source",
                "source is required unless the engine is an external endpoint",
            ),
        }
        v.range(self.context_length, 128, 1_048_576, "spec.contextLength");
        v.range(self.resources.gpus, 0, 16, "spec.resources.gpus");
        v.check(
            (self.engine.type_ == EngineType::External) == self.engine.external.is_some(),
            "spec.engine.external",
            "external is required when type is External, and only then",
        );
        if let Some(external) = &self.engine.external {
            v.check(
                external.image.is_some() != external.endpoint.is_some(),
                "spec.engine.external",
                "exactly one of image (a container Mantle runs) and endpoint (a server already running) is required",
            );
            if let Some(endpoint) = &external.endpoint {
                v.pattern(endpoint, ENDPOINT_URL_PATTERN, "spec.engine.external.endpoint");
                v.check(
                    external.args.is_empty(),
                    "spec.engine.external.args",
                    "args are for the image's container; an endpoint's server is started by whoever runs it",
                );
            }
        }
        v.range(self.replicas.min, 0, 1000, "spec.replicas.min");
        v.range(self.replicas.max, 1, 1000, "spec.replicas.max");
        v.check(
            self.replicas.min <= self.replicas.max,
            "spec.replicas.min",
            "replicas.min must not exceed replicas.max",
        );
        v.range(self.replicas.target_queue_depth, 1, 10_000, "spec.replicas.targetQueueDepth");
        let tiers = &self.weight_cache.tiers;
        v.check(!tiers.is_empty(), "spec.weightCache.tiers", "at least one tier is required");
        v.check(
            !self.weight_cache.pin_in_host_memory || tiers.contains(&CacheTier::HostMemory),
            "spec.weightCache.pinInHostMemory",
            "pinInHostMemory needs the HostMemory tier",
        );
        v.check(
            self.weight_cache.prewarm.is_none() || self.external_endpoint().is_none(),
            "spec.weightCache.prewarm",
            "prewarm caches weights Mantle fetches; an external endpoint's server holds its own",
        );
        v.check(
            self.weight_cache.prewarm.is_none() || tiers.contains(&CacheTier::NodeDisk),
            "spec.weightCache.prewarm",
            "prewarm fills the NodeDisk tier, so tiers must include NodeDisk",
        );
        for (i, cell) in self.cells.iter().enumerate() {
            v.pattern(cell, NAME_PATTERN, format!("spec.cells[{i}]"));
        }
        if let Some(p) = &self.pricing {
            v.check(p.input_per_1k_tokens >= 0.0, "spec.pricing.inputPer1kTokens", "must not be negative");
            v.check(p.output_per_1k_tokens >= 0.0, "spec.pricing.outputPer1kTokens", "must not be negative");
            v.range(p.batch_discount, 0.0, 1.0, "spec.pricing.batchDiscount");
        }
        if let Some(p) = &self.provisioning {
            v.check(
                p.tokens_per_minute_per_unit >= 1,
                "spec.provisioning.tokensPerMinutePerUnit",
                "must be at least 1",
            );
        }
        v.check(
            self.lifecycle.status == LifecycleStatus::Active || self.lifecycle.end_of_life.is_some(),
            "spec.lifecycle.endOfLife",
            "a LEGACY model needs an endOfLife date",
        );
        v.check(
            self.modality == Modality::Text || self.draft_model.is_none(),
            "spec.draftModel",
            "draftModel (speculative decoding) applies to TEXT models only",
        );
        v.check(
            self.fallbacks.iter().all(|f| f.model_id != self.model_id),
            "spec.fallbacks",
            "a model cannot be its own fallback",
        );
        v.check(self.fallbacks.len() <= 5, "spec.fallbacks", "at most 5 fallbacks");
        for (i, f) in self.fallbacks.iter().enumerate() {
            v.pattern(&f.model_id, MODEL_ID_PATTERN, format!("spec.fallbacks[{i}].modelId"));
        }
        v.check(
            self.modality == Modality::Text || self.chat_template.is_none(),
            "spec.chatTemplate",
            "chatTemplate applies to TEXT models only",
        );
        v.check(
            self.invoke_model_body.is_none_or(|b| b.is_text() == (self.modality == Modality::Text)),
            "spec.invokeModelBody",
            "invokeModelBody must be a body of the model's modality: AnthropicMessages, Llama or Mistral for TEXT; TitanEmbed or CohereEmbed for EMBEDDING",
        );
        if let Some(d) = &self.draft_model {
            v.pattern(&d.model_id, MODEL_ID_PATTERN, "spec.draftModel.modelId");
            v.check(d.model_id != self.model_id, "spec.draftModel.modelId", "a model cannot be its own draft model");
            v.range(d.num_draft_tokens, 1, 16, "spec.draftModel.numDraftTokens");
        }
        v.finish()
    }
}
