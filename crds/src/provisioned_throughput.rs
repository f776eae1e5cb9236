//! ProvisionedThroughput: capacity reserved for one tenant on one model, bought in model units.

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{Condition, MODEL_ID_PATTERN, NAME_PATTERN, Time};
use crate::validation::{Invalid, Validate, Violations};

/// Dedicated replicas of a model for one tenant, sized in model units.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "mantle.dev",
    version = "v1alpha1",
    kind = "ProvisionedThroughput",
    namespaced,
    status = "ProvisionedThroughputStatus",
    shortname = "pt",
    category = "mantle",
    derive = "PartialEq",
    doc = "Reserved inference capacity on one model for one tenant, in model units (Bedrock Provisioned Throughput).",
    printcolumn(name = "Model", type_ = "string", json_path = ".spec.modelId"),
    printcolumn(name = "Tenant", type_ = "string", json_path = ".spec.tenant"),
    printcolumn(name = "Units", type_ = "integer", json_path = ".spec.modelUnits"),
    printcolumn(name = "Commitment", type_ = "string", json_path = ".spec.commitment"),
    printcolumn(name = "Tokens/min", type_ = "integer", json_path = ".status.capacityTokensPerMinute"),
    printcolumn(name = "Status", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "ARN", type_ = "string", json_path = ".status.arn", priority = 1),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct ProvisionedThroughputSpec {
    /// The FoundationModel (by `spec.modelId`, in this namespace) to reserve. Immutable.
    #[schemars(regex(pattern = MODEL_ID_PATTERN), length(max = 128))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("modelId is immutable; create a new ProvisionedThroughput"))]
    pub model_id: String,
    /// Model units to reserve; the FoundationModel's `provisioning.tokensPerMinutePerUnit` says
    /// what one buys.
    #[schemars(range(min = 1, max = 10000))]
    pub model_units: i32,
    /// How long the reservation is committed for.
    #[serde(default)]
    pub commitment: Commitment,
    /// The tenant (API key or SigV4 principal mapping) whose requests use this capacity first.
    #[schemars(regex(pattern = NAME_PATTERN), length(min = 1, max = 63))]
    pub tenant: String,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Commitment {
    /// No term: released when the resource is deleted.
    #[default]
    None,
    OneMonth,
    SixMonths,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ProvisionedThroughputStatus {
    /// `arn:mantle:bedrock:<cell>:<namespace>:provisioned-model/<name>`, usable as the modelId in
    /// Converse and InvokeModel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arn: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<ProvisionedPhase>,
    /// Replicas dedicated to this reservation.
    #[serde(default)]
    pub provisioned_replicas: i32,
    /// Guaranteed tokens per minute (model units × tokens per unit).
    #[serde(default)]
    pub capacity_tokens_per_minute: i64,
    /// When the commitment term ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commitment_expires_at: Option<Time>,
    #[serde(default)]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Bedrock's ProvisionedModelStatus.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ProvisionedPhase {
    Creating,
    InService,
    Updating,
    Failed,
}

impl Validate for ProvisionedThroughputSpec {
    fn validate(&self) -> Result<(), Invalid> {
        let mut v = Violations::default();
        v.pattern(&self.model_id, MODEL_ID_PATTERN, "spec.modelId");
        v.range(self.model_units, 1, 10_000, "spec.modelUnits");
        v.pattern(&self.tenant, NAME_PATTERN, "spec.tenant");
        v.finish()
    }
}
