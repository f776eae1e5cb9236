//! BatchJob: cheap, asynchronous inference over JSONL records in an object store (Bedrock
//! CreateModelInvocationJob), sharded, resumable and incrementally re-runnable.

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{Condition, DATA_URI_PATTERN, MODEL_ID_PATTERN, NAME_PATTERN, SecretRef, Time};
use crate::validation::{Invalid, Validate, Violations};

/// A batch inference job over JSONL records (`{"recordId": …, "modelInput": {…}}`).
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "mantle.dev",
    version = "v1alpha1",
    kind = "BatchJob",
    namespaced,
    status = "BatchJobStatus",
    shortname = "bj",
    category = "mantle",
    derive = "PartialEq",
    doc = "A batch inference job: JSONL records in, JSONL results out (Bedrock model invocation job).",
    validation = Rule::new("!has(self.spec.reuseFrom) || self.spec.reuseFrom.jobName != self.metadata.name").message("a job cannot reuse its own outputs").field_path(".spec.reuseFrom.jobName"),
    printcolumn(name = "Model", type_ = "string", json_path = ".spec.modelId"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Progress", type_ = "string", json_path = ".status.progress"),
    printcolumn(name = "Records", type_ = "integer", json_path = ".status.records.total"),
    printcolumn(name = "Errors", type_ = "integer", json_path = ".status.records.error", priority = 1),
    printcolumn(name = "Cost", type_ = "string", json_path = ".status.estimatedCost", priority = 1),
    printcolumn(name = "ETA", type_ = "string", json_path = ".status.eta"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[x_kube(
    validation = Rule::new("!self.output.uri.startsWith(self.input.uri) && !self.input.uri.startsWith(self.output.uri)").message("input and output locations must not overlap").field_path(".output.uri")
)]
#[serde(rename_all = "camelCase")]
pub struct BatchJobSpec {
    /// The TEXT FoundationModel (by `spec.modelId`, in this namespace). Immutable.
    #[schemars(regex(pattern = MODEL_ID_PATTERN), length(max = 128))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("modelId is immutable"))]
    pub model_id: String,
    /// The records to process. Immutable.
    #[x_kube(validation = Rule::new("self == oldSelf").message("input is immutable"))]
    pub input: BatchInput,
    /// Where results (`<input name>.out`) and `manifest.json.out` are written. Immutable.
    #[x_kube(validation = Rule::new("self == oldSelf").message("output is immutable"))]
    pub output: BatchOutput,
    /// Object-store credentials for input and output; absent means the pod's own identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<SecretRef>,
    /// Which request body shape `modelInput` holds.
    #[serde(default)]
    pub invocation_type: InvocationType,
    /// Defaults for every record; a record's own `inferenceConfig` wins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inference_config: Option<InferenceConfig>,
    /// How urgently capacity is found for the job, and what it costs.
    #[serde(default)]
    pub tier: BatchTier,
    /// Hours before an unfinished job is stopped and marked Expired (Bedrock: 24–168).
    #[serde(default = "default_timeout_hours")]
    #[schemars(range(min = 24, max = 168))]
    pub timeout_duration_in_hours: i32,
    /// How the input is cut into shards that run in parallel and resume independently.
    #[serde(default)]
    pub sharding: Sharding,
    /// What happens to records whose prompt is longer than allowed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_token_limit: Option<InputTokenLimit>,
    /// Copy results from an earlier job for records whose input has not changed, instead of
    /// running them again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reuse_from: Option<ReuseFrom>,
    /// A JSON Schema every model output must satisfy (the output is parsed as JSON); records
    /// whose output does not are retried, then reported as errors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::batch_job::free_form_object")]
    pub output_schema: Option<serde_json::Value>,
    /// A top-level field of each record (besides `recordId` and `modelInput`), such as
    /// `customerId`, whose value names the partition a record belongs to; results are written per
    /// partition so a rerun replaces only the partitions that changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[A-Za-z_][A-Za-z0-9_]*$"), length(max = 128))]
    pub partition_key: Option<String>,
    /// Ask the job to stop (Bedrock StopModelInvocationJob): running shards finish their current
    /// records and the job ends Stopped.
    #[serde(default)]
    pub stop: bool,
    /// Run part of a finished job again, as a new run: the records it selects are inferred
    /// again, every other record keeps its output. Setting a new `id` starts the run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rerun: Option<Rerun>,
}

/// Which records a rerun infers again (any that one of the set selectors matches).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Rerun {
    /// The run's id (recorded in the control table and status); a new id is a new run.
    #[schemars(regex(pattern = NAME_PATTERN), length(min = 1, max = 63))]
    pub id: String,
    /// The records whose last output is an error record.
    #[serde(default)]
    pub failed: bool,
    /// The records whose `partitionKey` field has this value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub partition: Option<String>,
    /// The records whose recordId's SHA-256 starts with these hex digits (`0`–`f`, 1 to 8: a
    /// sixteenth, a 256th… of the records).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9a-f]{1,8}$"))]
    pub record_id_hash_prefix: Option<String>,
}

fn default_timeout_hours() -> i32 {
    24
}

/// An arbitrary JSON object kept as written (`x-kubernetes-preserve-unknown-fields`).
fn free_form_object(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true,
    })
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BatchInput {
    /// A `.jsonl` object or a prefix holding `.jsonl` objects.
    #[schemars(regex(pattern = DATA_URI_PATTERN), length(max = 2048))]
    pub uri: String,
    #[serde(default)]
    pub format: InputFormat,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum InputFormat {
    #[default]
    Jsonl,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BatchOutput {
    /// A prefix; the job writes under `<uri>/<job id>/` (the last segment of `status.jobArn`).
    #[schemars(regex(pattern = DATA_URI_PATTERN), length(max = 2048))]
    pub uri: String,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum InvocationType {
    /// `modelInput` is an InvokeModel body (Anthropic messages or a `prompt` body).
    #[default]
    InvokeModel,
    /// `modelInput` is a Converse request (`messages`, `system`, `inferenceConfig`).
    Converse,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InferenceConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1048576))]
    pub max_tokens: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 2.0))]
    pub temperature: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub top_p: Option<f64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 4), inner(length(min = 1, max = 128)))]
    pub stop_sequences: Vec<String>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum BatchTier {
    /// Runs on idle on-demand capacity as soon as it frees up.
    #[default]
    Standard,
    /// Runs only when the model's on-demand load is low; cheaper, slower.
    Economy,
    /// Runs on preemptible capacity; shards are checkpointed and resume after preemption.
    Spot,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Sharding {
    /// Shards are cut to hold about this many input tokens.
    #[serde(default = "default_tokens_per_shard")]
    #[schemars(range(min = 1000, max = 1000000000))]
    pub target_tokens_per_shard: i64,
    /// And never more than this many records.
    #[serde(default = "default_records_per_shard")]
    #[schemars(range(min = 1, max = 1000000))]
    pub max_records_per_shard: i32,
}

fn default_tokens_per_shard() -> i64 {
    5_000_000
}
fn default_records_per_shard() -> i32 {
    1000
}

impl Default for Sharding {
    fn default() -> Self {
        Self { target_tokens_per_shard: default_tokens_per_shard(), max_records_per_shard: default_records_per_shard() }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InputTokenLimit {
    /// The most prompt tokens a record may have.
    #[schemars(range(min = 1, max = 1048576))]
    pub max_tokens: i32,
    /// What to do with a record over the limit.
    pub action: OverLimitAction,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OverLimitAction {
    /// Write an error record for it and go on.
    FailRecord,
    /// Cut the prompt's oldest message content to fit and run it.
    Truncate,
    /// Leave it out of the output, counted as skipped.
    Skip,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReuseFrom {
    /// A finished BatchJob in this namespace. A record is unchanged when its `recordId`, its
    /// `modelInput`, the model and the inference config all match.
    #[schemars(regex(pattern = NAME_PATTERN), length(min = 1, max = 63))]
    pub job_name: String,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct BatchJobStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<BatchJobPhase>,
    /// `arn:aws:bedrock:<region>:000000000000:model-invocation-job/<id>` (Bedrock's form, so SDKs
    /// accept it); `<id>` is [`batch_job_id`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_arn: Option<String>,
    /// Why the job failed or stopped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub submit_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_time: Option<Time>,
    /// When the job expires if still unfinished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_expiration_time: Option<Time>,
    #[serde(default)]
    pub records: RecordCounts,
    #[serde(default)]
    pub tokens: TokenCounts,
    #[serde(default)]
    pub shards: ShardSummary,
    /// `processed/total (percent)`, for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<String>,
    /// Estimated cost so far at the model's batch price, such as `12.40 USD`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimated_cost: Option<String>,
    /// Time left at the current rate, such as `1h20m`, for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimated_completion_time: Option<Time>,
    #[serde(default)]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The run the status describes (`spec.rerun.id`, or `initial`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
}

/// Bedrock's ModelInvocationJobStatus.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum BatchJobPhase {
    Submitted,
    Validating,
    Scheduled,
    InProgress,
    Completed,
    PartiallyCompleted,
    Failed,
    Stopping,
    Stopped,
    Expired,
}

impl BatchJobPhase {
    /// Whether a job in this phase has ended (nothing of it runs any more).
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            BatchJobPhase::Completed
                | BatchJobPhase::PartiallyCompleted
                | BatchJobPhase::Failed
                | BatchJobPhase::Stopped
                | BatchJobPhase::Expired
        )
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RecordCounts {
    pub total: i64,
    pub processed: i64,
    pub success: i64,
    pub error: i64,
    /// Copied from `reuseFrom` without running.
    #[serde(default)]
    pub reused: i64,
    /// Left out by `inputTokenLimit.action: SKIP`.
    #[serde(default)]
    pub skipped: i64,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TokenCounts {
    pub input: i64,
    pub output: i64,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ShardSummary {
    pub total: i32,
    pub pending: i32,
    pub running: i32,
    pub completed: i32,
    pub failed: i32,
}

impl Validate for BatchJobSpec {
    fn validate(&self) -> Result<(), Invalid> {
        let mut v = Violations::default();
        v.pattern(&self.model_id, MODEL_ID_PATTERN, "spec.modelId");
        v.pattern(&self.input.uri, DATA_URI_PATTERN, "spec.input.uri");
        v.pattern(&self.output.uri, DATA_URI_PATTERN, "spec.output.uri");
        v.check(
            !self.output.uri.starts_with(&self.input.uri) && !self.input.uri.starts_with(&self.output.uri),
            "spec.output.uri",
            "input and output locations must not overlap",
        );
        v.range(self.timeout_duration_in_hours, 24, 168, "spec.timeoutDurationInHours");
        v.range(self.sharding.target_tokens_per_shard, 1000, 1_000_000_000, "spec.sharding.targetTokensPerShard");
        v.range(self.sharding.max_records_per_shard, 1, 1_000_000, "spec.sharding.maxRecordsPerShard");
        if let Some(c) = &self.inference_config {
            if let Some(m) = c.max_tokens {
                v.range(m, 1, 1_048_576, "spec.inferenceConfig.maxTokens");
            }
            if let Some(t) = c.temperature {
                v.range(t, 0.0, 2.0, "spec.inferenceConfig.temperature");
            }
            if let Some(p) = c.top_p {
                v.range(p, 0.0, 1.0, "spec.inferenceConfig.topP");
            }
            v.check(c.stop_sequences.len() <= 4, "spec.inferenceConfig.stopSequences", "at most 4 stop sequences");
        }
        if let Some(l) = &self.input_token_limit {
            v.range(l.max_tokens, 1, 1_048_576, "spec.inputTokenLimit.maxTokens");
        }
        if let Some(r) = &self.reuse_from {
            v.pattern(&r.job_name, NAME_PATTERN, "spec.reuseFrom.jobName");
        }
        if let Some(r) = &self.rerun {
            v.pattern(&r.id, NAME_PATTERN, "spec.rerun.id");
            v.check(
                r.failed || r.partition.is_some() || r.record_id_hash_prefix.is_some(),
                "spec.rerun",
                "select what to run again: failed, partition or recordIdHashPrefix",
            );
            v.check(
                r.partition.is_none() || self.partition_key.is_some(),
                "spec.rerun.partition",
                "a partition needs spec.partitionKey",
            );
            if let Some(p) = &r.record_id_hash_prefix {
                v.check(
                    (1..=8).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
                    "spec.rerun.recordIdHashPrefix",
                    "must be 1 to 8 lowercase hex digits",
                );
            }
        }
        if let Some(schema) = &self.output_schema {
            v.check(schema.is_object(), "spec.outputSchema", "must be a JSON Schema object");
        }
        v.finish()
    }
}

/// The 12-character id of a job (`[a-z0-9]`, as Bedrock's): the last segment of its ARN and
/// the name of its output folder (`<output uri>/<id>/`).
pub fn batch_job_id(namespace: &str, name: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::new().chain_update(namespace).chain_update([0]).chain_update(name).finalize();
    base36(u128::from_le_bytes(digest[..16].try_into().expect("16 bytes")), 12, BASE36_LOWER)
}

/// Lowercase letters and digits, for [`base36`].
pub const BASE36_LOWER: &[u8; 36] = b"abcdefghijklmnopqrstuvwxyz0123456789";
/// Capital letters and digits, for [`base36`].
pub const BASE36_UPPER: &[u8; 36] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";

/// `len` base-36 digits of `n`, least significant first (short ids made from a hash).
pub fn base36(mut n: u128, len: usize, alphabet: &[u8; 36]) -> String {
    (0..len)
        .map(|_| {
            let c = alphabet[(n % 36) as usize] as char;
            n /= 36;
            c
        })
        .collect()
}

/// Where a job's `reuseFrom` stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReuseSource {
    /// The job reuses nothing.
    None,
    /// The output folder (`<output uri>/<job id>`) of the job it reuses.
    Ready(String),
    /// That job has not ended: this one waits (`Scheduled`).
    Wait(String),
    /// That job does not exist or ended without outputs: this one fails.
    Fail(String),
}

/// `named` is the job `spec.reuseFrom.jobName` names, if it exists.
/// (Both executors decide with this: `mantle dev` and the operator's BatchJob controller.)
pub fn reuse_source(job: &BatchJob, named: Option<&BatchJob>) -> ReuseSource {
    let Some(reuse) = &job.spec.reuse_from else { return ReuseSource::None };
    let Some(old) = named else {
        return ReuseSource::Fail(format!("reuseFrom names job {}, which does not exist", reuse.job_name));
    };
    match old.status.as_ref().and_then(|s| s.phase) {
        Some(BatchJobPhase::Completed | BatchJobPhase::PartiallyCompleted) => {
            ReuseSource::Ready(format!("{}/{}", old.spec.output.uri.trim_end_matches('/'), old.job_id()))
        }
        Some(p) if p.is_terminal() => {
            ReuseSource::Fail(format!("reuseFrom names job {}, which ended without completing", reuse.job_name))
        }
        _ => ReuseSource::Wait(format!("waiting for job {} (reuseFrom) to complete", reuse.job_name)),
    }
}

/// The exit status of a batch worker pod whose job cannot go on (a bad input, an unknown model,
/// an unwritable output): its Job's pod failure policy fails the index instead of retrying it.
/// Any other failure (a crash, a preempted node) is retried and the worker resumes.
pub const BATCH_WORKER_FATAL_EXIT: i32 = 2;

/// A job's ARN, in Bedrock's form (the account is all zeros: Mantle has none).
pub fn batch_job_arn(region: &str, id: &str) -> String {
    format!("arn:aws:bedrock:{region}:000000000000:model-invocation-job/{id}")
}

impl BatchJob {
    /// The job's id (see [`batch_job_id`]).
    pub fn job_id(&self) -> String {
        batch_job_id(
            self.metadata.namespace.as_deref().unwrap_or("default"),
            self.metadata.name.as_deref().unwrap_or(""),
        )
    }

    /// The spec's own rules plus those that need the object's name.
    pub fn validate(&self) -> Result<(), Invalid> {
        let mut errors = self.spec.validate().err().map(|e| e.0).unwrap_or_default();
        if let (Some(reuse), Some(name)) = (&self.spec.reuse_from, &self.metadata.name)
            && &reuse.job_name == name
        {
            errors.push(crate::FieldError {
                field: "spec.reuseFrom.jobName".into(),
                message: "a job cannot reuse its own outputs".into(),
            });
        }
        if errors.is_empty() { Ok(()) } else { Err(Invalid(errors)) }
    }
}

#[cfg(test)]
mod id_tests {
    use super::*;

    #[test]
    fn job_ids_and_arns_have_bedrocks_shape() {
        let id = batch_job_id("default", "summaries");
        assert_eq!(id.len(), 12);
        assert!(id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()));
        assert_eq!(id, batch_job_id("default", "summaries"));
        assert_ne!(id, batch_job_id("team-a", "summaries"));
        assert_ne!(id, batch_job_id("default", "summaries-2"));
        assert_eq!(
            batch_job_arn("us-east-1", "abc"),
            "arn:aws:bedrock:us-east-1:000000000000:model-invocation-job/abc"
        );
    }
}
