//! BatchJobs in a cluster (pure): how many workers a job gets, the Indexed Job that runs them
//! (`mantle-batch run --batch-job NAME` in the job's namespace, worker `$JOB_COMPLETION_INDEX`), and what the
//! Job's own status means for a BatchJob whose workers could not say it themselves.
//!
//! The workers are the same pipeline `mantle dev` runs in-process (`mantle_batch`): worker 0
//! plans, writes the control table and the BatchJob's progress, and merges the outputs; every
//! worker runs the shards whose id is its index modulo the number of workers.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::{
    Job, JobSpec, PodFailurePolicy, PodFailurePolicyOnExitCodesRequirement, PodFailurePolicyOnPodConditionsPattern,
    PodFailurePolicyRule,
};
use k8s_openapi::api::core::v1::{
    Container, EnvFromSource, EnvVar, EnvVarSource, ObjectFieldSelector, PodSecurityContext, PodSpec, PodTemplateSpec,
    ResourceRequirements, SecretEnvSource, SecretKeySelector, SecurityContext,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use mantle_crds::{BATCH_WORKER_FATAL_EXIT, BatchJob, BatchJobPhase, BatchTier};
use sha2::{Digest, Sha256};

use crate::plan::Plan;

/// The label naming the BatchJob a worker Job runs, and the run.
pub const BATCH_JOB_LABEL: &str = "mantle.dev/batch-job";
pub const BATCH_RUN_LABEL: &str = "mantle.dev/batch-run";
/// The worker container's name.
pub const WORKER_CONTAINER: &str = "worker";

/// How worker pods are built.
#[derive(Clone, Debug, PartialEq)]
pub struct BatchOptions {
    /// The image with `mantle-batch`.
    pub image: String,
    /// The router's in-cluster URL.
    pub router_url: String,
    /// The Secret (key `token`) with the router's batch credential.
    pub token_secret: String,
    /// The ServiceAccount worker pods run as (it may read BatchJobs and FoundationModels and
    /// patch BatchJob status).
    pub service_account: String,
    /// An S3-compatible endpoint for s3:// URIs (MinIO, Ceph); none for AWS S3 itself.
    pub s3_endpoint: Option<String>,
    /// The most workers a job gets.
    pub max_workers: i32,
    /// Records each worker keeps in flight.
    pub concurrency: i32,
    /// The region in job ARNs (the router's).
    pub region: String,
}

impl Default for BatchOptions {
    fn default() -> Self {
        BatchOptions {
            image: format!("mantle/batch:{}", env!("CARGO_PKG_VERSION")),
            router_url: "http://mantle-router:8080".into(),
            token_secret: "mantle-batch-token".into(),
            service_account: "mantle-batch".into(),
            s3_endpoint: None,
            max_workers: 16,
            concurrency: 8,
            region: "us-east-1".into(),
        }
    }
}

/// The run a BatchJob's spec asks for: `spec.rerun.id`, or `initial`.
pub fn run_id(job: &BatchJob) -> &str {
    job.spec.rerun.as_ref().map_or("initial", |r| r.id.as_str())
}

/// How many workers a job gets: about one per replica serving its model in the plan (so the
/// workers' records in flight match the runners' batch slots), half that for ECONOMY (it takes
/// what real-time traffic leaves), at least one (a model scaled to zero scales up for it) and at
/// most `max_workers`.
pub fn workers(job: &BatchJob, plan: &Plan, options: &BatchOptions) -> i32 {
    let namespace = job.metadata.namespace.as_deref();
    let replicas: i32 = plan
        .pools
        .iter()
        .filter(|p| p.model_id == job.spec.model_id && p.namespace.as_deref() == namespace)
        .filter(|p| p.dedicated.is_none() && !p.draining)
        .map(|p| p.replicas)
        .sum();
    let share = match job.spec.tier {
        BatchTier::Standard | BatchTier::Spot => replicas,
        BatchTier::Economy => replicas / 2,
    };
    share.clamp(1, options.max_workers.max(1))
}

/// The worker Job's name: `<job>-<run>`, shortened with a digest to fit a label value.
pub fn job_name(job: &BatchJob) -> String {
    let name = format!("{}-{}", job.metadata.name.as_deref().unwrap_or_default(), run_id(job));
    if name.len() <= 63 {
        return name;
    }
    let digest: String = Sha256::digest(name.as_bytes()).iter().take(4).map(|b| format!("{b:02x}")).collect();
    format!("{}-{digest}", name[..54].trim_end_matches('-'))
}

/// The Indexed Job of a BatchJob's run.
pub fn render_batch_job(job: &BatchJob, workers: i32, options: &BatchOptions) -> Job {
    let name = job.metadata.name.clone().unwrap_or_default();
    let labels = BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), "mantle-batch".to_string()),
        ("app.kubernetes.io/component".to_string(), "batch-worker".to_string()),
        ("app.kubernetes.io/managed-by".to_string(), "mantle-operator".to_string()),
        (BATCH_JOB_LABEL.to_string(), name.clone()),
        (BATCH_RUN_LABEL.to_string(), run_id(job).to_string()),
    ]);
    let env = |name: &str, value: String| EnvVar { name: name.into(), value: Some(value), ..Default::default() };
    let mut envs = vec![
        // The BatchJob is in the pod's namespace.
        EnvVar {
            name: "POD_NAMESPACE".into(),
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector { field_path: "metadata.namespace".into(), api_version: None }),
                ..Default::default()
            }),
            ..Default::default()
        },
        env("MANTLE_ROUTER_URL", options.router_url.clone()),
        EnvVar {
            name: "MANTLE_BATCH_TOKEN".into(),
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: options.token_secret.clone(),
                    key: "token".into(),
                    optional: Some(false),
                }),
                ..Default::default()
            }),
            ..Default::default()
        },
        env("MANTLE_BATCH_CONCURRENCY", options.concurrency.to_string()),
        // The Delta Lake libraries log every commit at info.
        env("RUST_LOG", "info,deltalake_core=warn,buoyant_kernel=warn".into()),
    ];
    if let Some(endpoint) = &options.s3_endpoint {
        envs.push(env("MANTLE_S3_ENDPOINT", endpoint.clone()));
    }
    // The object store's credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION…).
    let env_from = job.spec.credentials_secret_ref.as_ref().map(|s| {
        vec![EnvFromSource {
            secret_ref: Some(SecretEnvSource { name: s.name.clone(), optional: Some(false) }),
            ..Default::default()
        }]
    });
    let quantity = |s: &str| Quantity(s.into());
    let container = Container {
        name: WORKER_CONTAINER.into(),
        image: Some(options.image.clone()),
        args: Some(vec!["run".into(), "--batch-job".into(), name.clone(), "--workers".into(), workers.to_string()]),
        env: Some(envs),
        env_from,
        resources: Some(ResourceRequirements {
            requests: Some(BTreeMap::from([("cpu".into(), quantity("250m")), ("memory".into(), quantity("256Mi"))])),
            limits: Some(BTreeMap::from([("memory".into(), quantity("1Gi"))])),
            ..Default::default()
        }),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            ..Default::default()
        }),
        ..Default::default()
    };
    // A worker that says the job cannot go on fails its index at once; one that crashed or
    // whose pod was evicted or preempted runs again (evictions do not count) and resumes.
    let policy = PodFailurePolicy {
        rules: vec![
            PodFailurePolicyRule {
                action: "FailIndex".into(),
                on_exit_codes: Some(PodFailurePolicyOnExitCodesRequirement {
                    container_name: Some(WORKER_CONTAINER.into()),
                    operator: "In".into(),
                    values: vec![BATCH_WORKER_FATAL_EXIT],
                }),
                on_pod_conditions: None,
            },
            PodFailurePolicyRule {
                action: "Ignore".into(),
                on_exit_codes: None,
                on_pod_conditions: Some(vec![PodFailurePolicyOnPodConditionsPattern {
                    type_: "DisruptionTarget".into(),
                    status: "True".into(),
                }]),
            },
        ],
    };
    let hours = i64::from(job.spec.timeout_duration_in_hours.max(1));
    Job {
        metadata: ObjectMeta {
            name: Some(job_name(job)),
            namespace: job.metadata.namespace.clone(),
            labels: Some(labels.clone()),
            owner_references: Some(vec![crate::render::batch_job_owner(job)]),
            ..Default::default()
        },
        spec: Some(JobSpec {
            completion_mode: Some("Indexed".into()),
            completions: Some(workers),
            parallelism: Some(workers),
            backoff_limit_per_index: Some(3),
            // An index that failed for good (a worker that crashed four times) fails the Job at
            // once: the others are stopped and the BatchJob ends Failed, rather than the
            // coordinator waiting for shards no worker will run.
            max_failed_indexes: Some(0),
            pod_failure_policy: Some(policy),
            // The workers stop at the job's expiry themselves; this is the backstop (an hour on).
            active_deadline_seconds: Some((hours + 1) * 3600),
            ttl_seconds_after_finished: Some(7 * 24 * 3600),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta { labels: Some(labels), ..Default::default() }),
                spec: Some(PodSpec {
                    service_account_name: Some(options.service_account.clone()),
                    restart_policy: Some("Never".into()),
                    termination_grace_period_seconds: Some(60),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(65532),
                        ..Default::default()
                    }),
                    containers: vec![container],
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        status: None,
    }
}

/// What a finished worker Job means for a BatchJob whose coordinator did not write its end (its
/// pod failed for good, the deadline passed): `None` while the Job runs, or when the BatchJob has
/// ended already.
pub fn job_ended(batch: &BatchJob, job: &Job) -> Option<(BatchJobPhase, String)> {
    if batch.status.as_ref().and_then(|s| s.phase).is_some_and(BatchJobPhase::is_terminal) {
        return None;
    }
    let conditions = job.status.as_ref()?.conditions.as_ref()?;
    let ended = conditions.iter().find(|c| (c.type_ == "Failed" || c.type_ == "Complete") && c.status == "True")?;
    let why = ended.message.clone().or(ended.reason.clone()).unwrap_or_default();
    Some(match ended.reason.as_deref() {
        _ if batch.spec.stop => {
            (BatchJobPhase::Stopped, "stopped; the outputs of the shards that finished are kept".into())
        }
        Some("DeadlineExceeded") => {
            (BatchJobPhase::Expired, "the job ran past its timeoutDurationInHours; committed outputs are kept".into())
        }
        _ if ended.type_ == "Complete" => {
            (BatchJobPhase::Failed, "the workers ended without the coordinator recording the job's end".into())
        }
        _ => (BatchJobPhase::Failed, format!("the worker pods failed: {why}")),
    })
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::batch::v1::{JobCondition, JobStatus};
    use mantle_crds::BatchJobStatus;

    use super::*;
    use crate::plan::PoolPlan;

    fn batch(tier: &str) -> BatchJob {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "mantle.dev/v1alpha1", "kind": "BatchJob",
            "metadata": {"name": "summaries", "namespace": "models"},
            "spec": {"modelId": "m:0", "input": {"uri": "s3://b/in/"}, "output": {"uri": "s3://b/out/"}, "tier": tier}
        }))
        .unwrap()
    }

    fn pool(replicas: i32, dedicated: bool, draining: bool) -> PoolPlan {
        PoolPlan {
            name: "p".into(),
            namespace: Some("models".into()),
            model: "m".into(),
            model_id: "m:0".into(),
            cell: None,
            dedicated: dedicated.then(|| crate::plan::Dedicated { tenant: "t".into(), provisioned: "pt".into() }),
            replicas,
            min: 0,
            max: 10,
            draining,
        }
    }

    #[test]
    fn workers_follow_the_shared_replicas_the_tier_and_the_cap() {
        let options = BatchOptions { max_workers: 5, ..Default::default() };
        let plan = Plan {
            pools: vec![pool(3, false, false), pool(1, false, false), pool(9, true, false), pool(4, false, true)],
            ..Default::default()
        };
        assert_eq!(workers(&batch("STANDARD"), &plan, &options), 4, "reserved and draining pools are not batch's");
        assert_eq!(workers(&batch("ECONOMY"), &plan, &options), 2);
        assert_eq!(workers(&batch("ECONOMY"), &Plan::default(), &options), 1, "scaled to zero: one worker");
        let big = Plan { pools: vec![pool(40, false, false)], ..Default::default() };
        assert_eq!(workers(&batch("SPOT"), &big, &options), 5);
    }

    #[test]
    fn job_names_fit_a_label_value() {
        let mut job = batch("STANDARD");
        assert_eq!(job_name(&job), "summaries-initial");
        job.metadata.name = Some("x".repeat(63));
        let name = job_name(&job);
        assert!(name.len() <= 63 && name.starts_with("xxxx"), "{name}");
    }

    fn finished(type_: &str, reason: &str) -> Job {
        Job {
            status: Some(JobStatus {
                conditions: Some(vec![JobCondition {
                    type_: type_.into(),
                    status: "True".into(),
                    reason: Some(reason.into()),
                    message: Some(format!("{reason} happened")),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_finished_job_ends_a_batch_job_its_coordinator_did_not() {
        let mut b = batch("STANDARD");
        assert_eq!(job_ended(&b, &Job::default()), None, "running");
        let (phase, message) = job_ended(&b, &finished("Failed", "FailedIndexes")).unwrap();
        assert_eq!(phase, BatchJobPhase::Failed);
        assert!(message.contains("FailedIndexes happened"), "{message}");
        assert_eq!(job_ended(&b, &finished("Failed", "DeadlineExceeded")).unwrap().0, BatchJobPhase::Expired);
        b.spec.stop = true;
        assert_eq!(job_ended(&b, &finished("Failed", "FailedIndexes")).unwrap().0, BatchJobPhase::Stopped);
        b.status = Some(BatchJobStatus { phase: Some(BatchJobPhase::Completed), ..Default::default() });
        assert_eq!(job_ended(&b, &finished("Complete", "Completed")), None, "the coordinator wrote the end");
    }
}
