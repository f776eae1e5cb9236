//! Cell: a group of GPU nodes that fails and drains as a unit; models are placed on Cells and
//! tenants are shuffle-sharded across them.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Toleration;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::Condition;
use crate::validation::{Invalid, Validate, Violations};

/// A failure and capacity domain of GPU nodes.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "mantle.dev",
    version = "v1alpha1",
    kind = "Cell",
    namespaced,
    status = "CellStatus",
    shortname = "cell",
    category = "mantle",
    derive = "PartialEq",
    doc = "A cell: a set of GPU nodes that is placed on, drained and fails as a unit.",
    printcolumn(name = "Region", type_ = "string", json_path = ".spec.region"),
    printcolumn(name = "Zone", type_ = "string", json_path = ".spec.zone"),
    printcolumn(name = "State", type_ = "string", json_path = ".spec.state"),
    printcolumn(name = "Health", type_ = "string", json_path = ".status.health"),
    printcolumn(name = "GPUs", type_ = "integer", json_path = ".spec.capacity.gpus"),
    printcolumn(name = "Models", type_ = "integer", json_path = ".status.modelCount"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[x_kube(validation = Rule::new("self.shuffleShardSize <= self.capacity.gpus || self.capacity.gpus == 0").message("shuffleShardSize cannot exceed the Cell's GPU count").field_path(".shuffleShardSize"))]
#[serde(rename_all = "camelCase")]
pub struct CellSpec {
    /// The region the nodes are in (`us-east-1`, `eu-central`), used in ARNs and for placement.
    #[schemars(regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"), length(min = 1, max = 63))]
    pub region: String,
    /// The zone within the region, matched against `topology.kubernetes.io/zone`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub zone: Option<String>,
    /// Labels that select the Cell's nodes; runner pods get it as their node selector.
    #[x_kube(validation = Rule::new("size(self) > 0").message("a Cell needs at least one node selector label"))]
    pub node_selector: BTreeMap<String, String>,
    /// Tolerations runner pods need to land on the Cell's nodes (GPU taints).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// What the Cell can hold.
    #[serde(default)]
    pub capacity: CellCapacity,
    /// Active Cells take new replicas; Draining Cells keep serving but get no new replicas and
    /// move theirs away; Disabled Cells get no traffic.
    #[serde(default)]
    pub state: CellState,
    /// How many of the Cell's runners of a model one tenant's requests are spread over (shuffle
    /// sharding within the Cell, applied by the router), so one noisy tenant affects few others.
    #[serde(default = "default_shuffle_shard_size")]
    #[schemars(range(min = 1, max = 64))]
    pub shuffle_shard_size: i32,
}

fn default_shuffle_shard_size() -> i32 {
    2
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CellCapacity {
    /// GPUs the Cell offers in all; 0 for CPU-only Cells.
    #[serde(default)]
    #[schemars(range(min = 0, max = 100000))]
    pub gpus: i32,
    /// The GPU product (`nvidia.com/gpu.product` label value).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128))]
    pub gpu_type: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum CellState {
    #[default]
    Active,
    Draining,
    Disabled,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct CellStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<CellHealth>,
    /// FoundationModels (namespace/name) with replicas in the Cell.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models_placed: Vec<String>,
    #[serde(default)]
    pub model_count: i32,
    #[serde(default)]
    pub ready_nodes: i32,
    #[serde(default)]
    pub allocated_gpus: i32,
    #[serde(default)]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum CellHealth {
    Healthy,
    Degraded,
    Unhealthy,
}

impl Validate for CellSpec {
    fn validate(&self) -> Result<(), Invalid> {
        let mut v = Violations::default();
        v.pattern(&self.region, r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "spec.region");
        v.check(!self.node_selector.is_empty(), "spec.nodeSelector", "a Cell needs at least one node selector label");
        v.range(self.capacity.gpus, 0, 100_000, "spec.capacity.gpus");
        v.range(self.shuffle_shard_size, 1, 64, "spec.shuffleShardSize");
        v.check(
            self.capacity.gpus == 0 || self.shuffle_shard_size <= self.capacity.gpus,
            "spec.shuffleShardSize",
            "shuffleShardSize cannot exceed the Cell's GPU count",
        );
        v.finish()
    }
}
