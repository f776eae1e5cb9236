//! KnowledgeBase: documents in an object store, chunked, embedded and indexed for retrieval.

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{Condition, DATA_URI_PATTERN, MODEL_ID_PATTERN, SecretKeyRef, SecretRef, Time};
use crate::validation::{Invalid, Validate, Violations};

/// A knowledge base kept in sync with a document prefix (Bedrock Knowledge Bases).
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "mantle.dev",
    version = "v1alpha1",
    kind = "KnowledgeBase",
    namespaced,
    status = "KnowledgeBaseStatus",
    shortname = "kb",
    category = "mantle",
    derive = "PartialEq",
    doc = "A knowledge base: documents from an object-store prefix, chunked, embedded and indexed for retrieval.",
    printcolumn(name = "Embedding Model", type_ = "string", json_path = ".spec.embeddingModelId"),
    printcolumn(name = "Store", type_ = "string", json_path = ".spec.vectorStore.type"),
    printcolumn(name = "Documents", type_ = "integer", json_path = ".status.documents"),
    printcolumn(name = "Chunks", type_ = "integer", json_path = ".status.chunks"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Last Sync", type_ = "date", json_path = ".status.lastIngestionJob.completedAt"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct KnowledgeBaseSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 200))]
    pub description: Option<String>,
    /// Where the documents are.
    pub data_source: DataSource,
    /// How documents are split before embedding.
    #[serde(default)]
    pub chunking: Chunking,
    /// The EMBEDDING FoundationModel (by `spec.modelId`, in this namespace). Immutable: changing it
    /// would mix vectors from two models in one index.
    #[schemars(regex(pattern = MODEL_ID_PATTERN), length(max = 128))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("embeddingModelId is immutable; create a new KnowledgeBase"))]
    pub embedding_model_id: String,
    /// Where the vectors are stored.
    #[serde(default)]
    pub vector_store: VectorStore,
    /// How near-duplicate chunks are collapsed at ingestion.
    #[serde(default)]
    pub deduplication: Deduplication,
    /// When the knowledge base re-syncs from its source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync: Option<SyncSchedule>,
}

/// A prefix in an object store and which files under it to ingest.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DataSource {
    /// `s3://bucket/prefix/`, `gs://…`, `az://…` or `file:///path` (local mode).
    #[schemars(regex(pattern = DATA_URI_PATTERN), length(max = 2048))]
    pub uri: String,
    /// Glob patterns (`**/*.md`) of keys to ingest; empty means every key.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 100), inner(length(min = 1, max = 512)))]
    pub include_patterns: Vec<String>,
    /// Glob patterns of keys to skip, applied after `includePatterns`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 100), inner(length(min = 1, max = 512)))]
    pub exclude_patterns: Vec<String>,
    /// Object-store credentials; absent means the pod's own identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<SecretRef>,
}

/// The chunking strategy and its parameters; exactly the block matching `strategy` is set
/// (none for `NONE`).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(
    validation = Rule::new("(self.strategy == 'FIXED_SIZE') == has(self.fixedSize)").message("fixedSize is required when strategy is FIXED_SIZE, and only then").field_path(".fixedSize"),
    validation = Rule::new("(self.strategy == 'HIERARCHICAL') == has(self.hierarchical)").message("hierarchical is required when strategy is HIERARCHICAL, and only then").field_path(".hierarchical"),
    validation = Rule::new("(self.strategy == 'SEMANTIC') == has(self.semantic)").message("semantic is required when strategy is SEMANTIC, and only then").field_path(".semantic")
)]
#[serde(rename_all = "camelCase")]
pub struct Chunking {
    pub strategy: ChunkingStrategy,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fixed_size: Option<FixedSizeChunking>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hierarchical: Option<HierarchicalChunking>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub semantic: Option<SemanticChunking>,
}

impl Default for Chunking {
    fn default() -> Self {
        Self {
            strategy: ChunkingStrategy::FixedSize,
            fixed_size: Some(FixedSizeChunking { max_tokens: 300, overlap_tokens: 60 }),
            hierarchical: None,
            semantic: None,
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ChunkingStrategy {
    /// Windows of `maxTokens`, each overlapping the previous by `overlapTokens`.
    FixedSize,
    /// Large parent chunks for context, small child chunks for matching.
    Hierarchical,
    /// Split where the meaning shifts, measured by embedding distance between sentences.
    Semantic,
    /// Each document is one chunk.
    None,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("self.overlapTokens < self.maxTokens").message("overlapTokens must be smaller than maxTokens").field_path(".overlapTokens"))]
#[serde(rename_all = "camelCase")]
pub struct FixedSizeChunking {
    #[schemars(range(min = 20, max = 8192))]
    pub max_tokens: i32,
    #[serde(default)]
    #[schemars(range(min = 0, max = 8191))]
    pub overlap_tokens: i32,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(
    validation = Rule::new("self.childMaxTokens < self.parentMaxTokens").message("childMaxTokens must be smaller than parentMaxTokens").field_path(".childMaxTokens"),
    validation = Rule::new("self.overlapTokens < self.childMaxTokens").message("overlapTokens must be smaller than childMaxTokens").field_path(".overlapTokens")
)]
#[serde(rename_all = "camelCase")]
pub struct HierarchicalChunking {
    #[schemars(range(min = 20, max = 8192))]
    pub parent_max_tokens: i32,
    #[schemars(range(min = 20, max = 8192))]
    pub child_max_tokens: i32,
    #[serde(default)]
    #[schemars(range(min = 0, max = 8191))]
    pub overlap_tokens: i32,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SemanticChunking {
    #[schemars(range(min = 20, max = 8192))]
    pub max_tokens: i32,
    /// Sentences on each side compared when looking for a break.
    #[serde(default = "default_buffer_size")]
    #[schemars(range(min = 0, max = 1))]
    pub buffer_size: i32,
    /// Distance percentile above which a break is made.
    #[serde(default = "default_breakpoint_percentile")]
    #[schemars(range(min = 50, max = 99))]
    pub breakpoint_percentile_threshold: i32,
}

fn default_buffer_size() -> i32 {
    1
}
fn default_breakpoint_percentile() -> i32 {
    95
}

/// The vector store; exactly the block matching `type` is set (none for `Embedded`).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[x_kube(
    validation = Rule::new("(self.type == 'Pgvector') == has(self.pgvector)").message("pgvector is required when type is Pgvector, and only then").field_path(".pgvector"),
    validation = Rule::new("(self.type == 'OpenSearch') == has(self.openSearch)").message("openSearch is required when type is OpenSearch, and only then").field_path(".openSearch")
)]
#[serde(rename_all = "camelCase")]
pub struct VectorStore {
    #[serde(rename = "type", default)]
    pub type_: VectorStoreType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pgvector: Option<PgvectorStore>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub open_search: Option<OpenSearchStore>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum VectorStoreType {
    /// An index kept by Mantle itself on a volume (tantivy + flat vectors).
    #[default]
    Embedded,
    /// A PostgreSQL table with the pgvector extension.
    Pgvector,
    /// An OpenSearch k-NN index.
    OpenSearch,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PgvectorStore {
    /// A `postgres://` connection string.
    pub connection_secret_ref: SecretKeyRef,
    #[schemars(regex(pattern = r"^[a-zA-Z_][a-zA-Z0-9_]*(\.[a-zA-Z_][a-zA-Z0-9_]*)?$"), length(max = 127))]
    pub table: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OpenSearchStore {
    #[schemars(regex(pattern = r"^https?://[^\s]+$"), length(max = 2048))]
    pub endpoint: String,
    #[schemars(length(min = 1, max = 255))]
    pub index: String,
    /// `username` and `password` keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<SecretRef>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Deduplication {
    /// Only byte-identical chunks are collapsed.
    Strict,
    /// Chunks equal after normalising whitespace and case are collapsed.
    #[default]
    Balanced,
    /// Near-duplicates (high embedding similarity) are collapsed too.
    Permissive,
    Disabled,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SyncSchedule {
    /// A cron expression (five fields, as in a CronJob) for periodic ingestion.
    #[schemars(
        regex(pattern = r"^(@(yearly|annually|monthly|weekly|daily|midnight|hourly)|(\S+\s+){4}\S+)$"),
        length(max = 128)
    )]
    pub schedule: String,
    /// Pause periodic syncs without deleting the schedule.
    #[serde(default)]
    pub suspend: bool,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct KnowledgeBaseStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<KnowledgeBasePhase>,
    /// Documents in the index.
    #[serde(default)]
    pub documents: i64,
    /// Chunks (vectors) in the index.
    #[serde(default)]
    pub chunks: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_ingestion_job: Option<IngestionJob>,
    #[serde(default)]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Bedrock's KnowledgeBaseStatus.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum KnowledgeBasePhase {
    Creating,
    Active,
    Updating,
    Failed,
}

/// One ingestion run and what it did (Bedrock IngestionJob statistics).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IngestionJob {
    /// The Kubernetes Job that ran it.
    pub name: String,
    pub status: IngestionJobStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<Time>,
    #[serde(default)]
    pub documents_scanned: i64,
    #[serde(default)]
    pub new_documents_indexed: i64,
    #[serde(default)]
    pub modified_documents_indexed: i64,
    #[serde(default)]
    pub documents_deleted: i64,
    #[serde(default)]
    pub documents_failed: i64,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum IngestionJobStatus {
    Starting,
    InProgress,
    Complete,
    Failed,
    Stopped,
}

impl Validate for KnowledgeBaseSpec {
    fn validate(&self) -> Result<(), Invalid> {
        let mut v = Violations::default();
        v.pattern(&self.data_source.uri, DATA_URI_PATTERN, "spec.dataSource.uri");
        v.pattern(&self.embedding_model_id, MODEL_ID_PATTERN, "spec.embeddingModelId");
        let c = &self.chunking;
        let strategy_block = |present: bool, strategy: ChunkingStrategy, name: &str, value: &str| {
            (
                (c.strategy == strategy) == present,
                format!("spec.chunking.{name}"),
                format!("{name} is required when strategy is {value}, and only then"),
            )
        };
        for (ok, field, message) in [
            strategy_block(c.fixed_size.is_some(), ChunkingStrategy::FixedSize, "fixedSize", "FIXED_SIZE"),
            strategy_block(c.hierarchical.is_some(), ChunkingStrategy::Hierarchical, "hierarchical", "HIERARCHICAL"),
            strategy_block(c.semantic.is_some(), ChunkingStrategy::Semantic, "semantic", "SEMANTIC"),
        ] {
            v.check(ok, field, message);
        }
        if let Some(f) = &c.fixed_size {
            v.range(f.max_tokens, 20, 8192, "spec.chunking.fixedSize.maxTokens");
            v.check(
                f.overlap_tokens >= 0 && f.overlap_tokens < f.max_tokens,
                "spec.chunking.fixedSize.overlapTokens",
                format!("overlapTokens ({}) must be smaller than maxTokens ({})", f.overlap_tokens, f.max_tokens),
            );
        }
        if let Some(h) = &c.hierarchical {
            v.check(
                h.child_max_tokens < h.parent_max_tokens,
                "spec.chunking.hierarchical.childMaxTokens",
                "childMaxTokens must be smaller than parentMaxTokens",
            );
            v.check(
                h.overlap_tokens >= 0 && h.overlap_tokens < h.child_max_tokens,
                "spec.chunking.hierarchical.overlapTokens",
                "overlapTokens must be smaller than childMaxTokens",
            );
        }
        if let Some(s) = &c.semantic {
            v.range(s.max_tokens, 20, 8192, "spec.chunking.semantic.maxTokens");
            v.range(s.breakpoint_percentile_threshold, 50, 99, "spec.chunking.semantic.breakpointPercentileThreshold");
        }
        let store = &self.vector_store;
        v.check(
            (store.type_ == VectorStoreType::Pgvector) == store.pgvector.is_some(),
            "spec.vectorStore.pgvector",
            "pgvector is required when type is Pgvector, and only then",
        );
        v.check(
            (store.type_ == VectorStoreType::OpenSearch) == store.open_search.is_some(),
            "spec.vectorStore.openSearch",
            "openSearch is required when type is OpenSearch, and only then",
        );
        v.finish()
    }
}
