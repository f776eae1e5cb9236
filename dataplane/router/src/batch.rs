//! Batch inference jobs behind the Bedrock control plane (CreateModelInvocationJob and friends):
//! the jobs are BatchJob objects, kept by a [`BatchJobs`] backend — the Kubernetes API in a
//! cluster (the operator runs them), an in-process store under `mantle dev` (which runs them
//! itself). The router turns the Bedrock requests into BatchJobs and back.
//!
//! Batch workers call the router with the batch credential (`x-mantle-batch-token`): their
//! requests are admitted at the lowest priority and never draw on a tenant's token buckets.

use std::fmt;
use std::future::Future;
use std::pin::Pin;

pub use k8s_openapi::jiff::Timestamp;
pub use mantle_crds::{BatchJob, batch_job_arn, batch_job_id};

use crate::error::ApiError;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The header batch workers send their credential in.
pub const BATCH_TOKEN_HEADER: &str = "x-mantle-batch-token";
/// The tenant a batch worker works for (trusted only with a valid batch token).
pub const BATCH_TENANT_HEADER: &str = "x-mantle-batch-tenant";

/// Annotations that carry what Bedrock's API has and a BatchJob's spec does not.
pub const ROLE_ARN_ANNOTATION: &str = "mantle.dev/role-arn";
pub const CLIENT_TOKEN_ANNOTATION: &str = "mantle.dev/client-request-token";
pub const TENANT_ANNOTATION: &str = "mantle.dev/tenant";
/// Set on jobs created through the API (manifest jobs have none).
pub const CREATED_BY_API_ANNOTATION: &str = "mantle.dev/created-by";

/// Where BatchJobs live.
pub trait BatchJobs: Send + Sync + fmt::Debug {
    /// Creates a job (with its `metadata.name` and the annotations above). A job of that name
    /// created with the same client request token is answered as it is (an idempotent retry);
    /// another one of that name is a conflict.
    fn create(&self, job: BatchJob) -> BoxFuture<'_, Result<BatchJob, ApiError>>;
    /// Every job, those from manifests and those created through the API.
    fn list(&self) -> BoxFuture<'_, Result<Vec<BatchJob>, ApiError>>;
    /// Asks a job to stop (by name).
    fn stop(&self, name: &str) -> BoxFuture<'_, Result<(), ApiError>>;
}
