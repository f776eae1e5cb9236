//! Pieces shared by several kinds: reference patterns, secret references, conditions.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// A Bedrock-style model id, `provider.name-vN:M` (`meta.llama3-8b-instruct-v1:0`).
pub const MODEL_ID_PATTERN: &str = r"^[a-z0-9][a-z0-9-]*\.[a-z0-9][a-z0-9.-]*-v[0-9]+:[0-9]+$";
/// Where model weights may come from.
pub const MODEL_SOURCE_URI_PATTERN: &str = r"^(s3|gs|az|https|file|pvc)://[^\s]+$";
/// Where documents, batch inputs and batch outputs live: an object-store prefix (or a local
/// directory for `mantle dev`).
pub const DATA_URI_PATTERN: &str = r"^(s3|gs|az|file)://[^\s]+$";
/// The base URL of a running OpenAI-compatible server (`http://127.0.0.1:8080`), without `/v1`.
pub const ENDPOINT_URL_PATTERN: &str = r"^https?://[^\s/?#]+(/[^\s?#]*)?$";
/// A lowercase hex SHA-256 digest.
pub const SHA256_PATTERN: &str = r"^[a-f0-9]{64}$";
/// A Kubernetes object name used as a reference (RFC 1123 label).
pub const NAME_PATTERN: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";

/// A key in a Secret in the resource's own namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key within the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// A whole Secret in the resource's own namespace (for credentials with several keys, such as
/// object-store access keys).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// Condition types and reasons shared by the controllers.
pub mod conditions {
    /// The resource is serving (models, throughput) or usable (guardrails, knowledge bases).
    pub const AVAILABLE: &str = "Available";
    /// The resource works but below what its spec asks for.
    pub const DEGRADED: &str = "Degraded";
    /// The spec failed validation; the reason says which rule.
    pub const SPEC_VALID: &str = "SpecValid";
}

/// Finds a condition by type.
pub fn find_condition<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}
