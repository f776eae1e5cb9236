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
/// The tier of the job a batch request is for (`STANDARD`, `ECONOMY`, `SPOT`): how much of the
/// model's capacity it may take (see `inference::batch_gate`).
pub const BATCH_TIER_HEADER: &str = "x-mantle-batch-tier";

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

/// Whether two objects are the same job (the spec, `stop` and `rerun` aside): an idempotent
/// retry of a create, or a manifest that did not change what the job is.
pub fn same_job(a: &BatchJob, b: &BatchJob) -> bool {
    let (mut x, mut y) = (a.spec.clone(), b.spec.clone());
    (x.stop, y.stop, x.rerun, y.rerun) = (false, false, None, None);
    x == y
}

fn client_token(job: &BatchJob) -> Option<&String> {
    job.metadata.annotations.as_ref().and_then(|a| a.get(CLIENT_TOKEN_ANNOTATION))
}

/// BatchJobs as objects in the Kubernetes API (the router in a cluster; the operator runs them).
/// A job created through the API goes to the namespace of the FoundationModel it names (where
/// its runners are), or to `namespace` when the router is given one.
#[derive(Clone)]
pub struct KubernetesBatchJobs {
    client: kube::Client,
    namespace: Option<String>,
}

impl fmt::Debug for KubernetesBatchJobs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KubernetesBatchJobs").field("namespace", &self.namespace).finish()
    }
}

/// The router's field manager for the BatchJobs it creates and stops.
const FIELD_MANAGER: &str = "mantle-router";

impl KubernetesBatchJobs {
    pub fn new(client: kube::Client, namespace: Option<String>) -> Self {
        KubernetesBatchJobs { client, namespace }
    }

    fn api(&self) -> kube::Api<BatchJob> {
        match &self.namespace {
            Some(ns) => kube::Api::namespaced(self.client.clone(), ns),
            None => kube::Api::all(self.client.clone()),
        }
    }

    /// Where a new job of `model_id` goes.
    async fn namespace_for(&self, model_id: &str) -> Result<String, ApiError> {
        if let Some(ns) = &self.namespace {
            return Ok(ns.clone());
        }
        let models: kube::Api<mantle_crds::FoundationModel> = kube::Api::all(self.client.clone());
        let list = models.list(&Default::default()).await.map_err(internal)?;
        Ok(list
            .items
            .into_iter()
            .find(|m| m.spec.model_id == model_id)
            .and_then(|m| m.metadata.namespace)
            .unwrap_or_else(|| "default".into()))
    }

    /// The job of that name, in whichever namespace it is.
    async fn named(&self, name: &str) -> Result<Option<BatchJob>, ApiError> {
        let jobs = self.list_all().await?;
        Ok(jobs.into_iter().find(|j| j.metadata.name.as_deref() == Some(name)))
    }

    async fn list_all(&self) -> Result<Vec<BatchJob>, ApiError> {
        Ok(self.api().list(&Default::default()).await.map_err(internal)?.items)
    }
}

fn internal(e: kube::Error) -> ApiError {
    tracing::error!(error = %e, "the Kubernetes API");
    ApiError::Internal("The job store (the Kubernetes API) failed; try again.".into())
}

impl BatchJobs for KubernetesBatchJobs {
    fn create(&self, mut job: BatchJob) -> BoxFuture<'_, Result<BatchJob, ApiError>> {
        Box::pin(async move {
            let name = job.metadata.name.clone().unwrap_or_default();
            // Job names are unique across the router's namespaces, as Bedrock's are per account.
            if let Some(existing) = self.named(&name).await? {
                if client_token(&existing).is_some()
                    && client_token(&existing) == client_token(&job)
                    && same_job(&existing, &job)
                {
                    return Ok(existing);
                }
                return Err(ApiError::Conflict(format!("A model invocation job named {name} exists already.")));
            }
            let namespace = self.namespace_for(&job.spec.model_id).await?;
            job.metadata.namespace = Some(namespace.clone());
            let api: kube::Api<BatchJob> = kube::Api::namespaced(self.client.clone(), &namespace);
            let params = kube::api::PostParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() };
            match api.create(&params, &job).await {
                Ok(created) => Ok(created),
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    Err(ApiError::Conflict(format!("A model invocation job named {name} exists already.")))
                }
                Err(kube::Error::Api(e)) if e.code == 422 || e.code == 400 => {
                    Err(ApiError::validation(format!("The job was refused: {}", e.message)))
                }
                Err(e) => Err(internal(e)),
            }
        })
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<BatchJob>, ApiError>> {
        Box::pin(self.list_all())
    }

    fn stop(&self, name: &str) -> BoxFuture<'_, Result<(), ApiError>> {
        let name = name.to_string();
        Box::pin(async move {
            let job = self.named(&name).await?.ok_or_else(|| ApiError::NotFound(format!("No job {name}.")))?;
            let namespace = job.metadata.namespace.clone().unwrap_or_else(|| "default".into());
            let api: kube::Api<BatchJob> = kube::Api::namespaced(self.client.clone(), &namespace);
            let params = kube::api::PatchParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() };
            let patch = serde_json::json!({"spec": {"stop": true}});
            api.patch(&name, &params, &kube::api::Patch::Merge(&patch)).await.map_err(internal)?;
            Ok(())
        })
    }
}
