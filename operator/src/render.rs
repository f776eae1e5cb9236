//! Render: each planned pool as the Kubernetes objects that realise it — a Deployment of runner
//! pods, a headless Service whose port `grpc` the router finds through its EndpointSlices, and a
//! PodDisruptionBudget. Pure: the same plan renders the same objects, byte for byte, which is
//! what `mantle render` prints and the golden tests pin.
//!
//! A runner pod:
//! - runs on its Cell's nodes (node selector, tolerations; the GPU product when the model asks
//!   for one), preferring nodes whose weight cache already holds the model: nodes running the
//!   model's prewarm pod (weighted pod affinity), or labelled `weights.mantle.dev/<digest>`
//!   (weighted node affinity, for caches filled out of band);
//! - fills the node-local weight cache before the runner starts: `prepare-cache` makes the cache
//!   directory the runner's (the one step that runs as root, with only CAP_CHOWN), then `fetch`
//!   copies the weights from the object store with the sha256 checked, with the source's
//!   credentials Secret as its environment;
//! - runs `mantle-runner serve` with [`runner_args`](crate::runner_args) — or, for an External
//!   engine, the engine's image beside a `mantle-runner` sidecar that fronts it, and for an
//!   External `endpoint` (a server running elsewhere) only that sidecar, with no weights to fetch
//!   — as a non-root user with a read-only root filesystem and no capabilities (IPC_LOCK only to
//!   pin weights);
//! - is ready on `/readyz` (weights loaded), with a startup probe sized for loading them;
//! - presents the router's token when runner authentication is on (a Secret, mounted as a file).
//!
//! A model with `weightCache.prewarm` also gets a DaemonSet ([`render_prewarm`]) whose pods keep
//! its weights in the node cache of every selected node (`mantle-runner keep-cached`); the
//! weights of reserved pools, then of prewarmed models, are evicted last (`--cache-priority`).
//!
//! Every object carries the labels the router watches (`mantle.dev/foundation-model`,
//! `mantle.dev/cell`, and `mantle.dev/pool` for a dedicated pool), and an owner reference to the
//! resource it serves — the FoundationModel, or the ProvisionedThroughput of a dedicated pool —
//! so deleting that resource deletes them.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    DaemonSet, DaemonSetSpec, Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, Container, ContainerPort, EnvFromSource, EnvVar, HTTPGetAction, HostPathVolumeSource,
    NodeAffinity, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm, PodAffinity, PodAffinityTerm,
    PodSecurityContext, PodSpec, PodTemplateSpec, PreferredSchedulingTerm, Probe, ResourceRequirements, SeccompProfile,
    SecretEnvSource, SecretVolumeSource, SecurityContext, Service, ServicePort, ServiceSpec, Toleration, Volume,
    VolumeMount, WeightedPodAffinityTerm,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use mantle_crds::{Cell, EngineType, FoundationModel, ModelSource, ProvisionedThroughput};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::plan::{Desired, Plan, PoolPlan, object_name};
use crate::runner_args::{RunnerPlacement, runner_args};

/// The labels the router watches (see `dataplane/router/src/kubernetes.rs`).
pub const MODEL_LABEL: &str = "mantle.dev/foundation-model";
pub const CELL_LABEL: &str = "mantle.dev/cell";
pub const POOL_LABEL: &str = "mantle.dev/pool";
/// The label that selects one pool's pods.
pub const RUNNER_POOL_LABEL: &str = "mantle.dev/runner-pool";
/// The prefix of the node labels that say a node's weight cache holds a model's weights.
pub const WEIGHTS_LABEL_PREFIX: &str = "weights.mantle.dev/";
/// The label of a model's prewarm pods (the FoundationModel's name).
pub const PREWARM_LABEL: &str = "mantle.dev/prewarm";

/// The user the runner runs as (distroless's `nonroot`).
const RUNNER_UID: i64 = 65532;
/// The runner's gRPC port (a Service port named `grpc`).
pub const GRPC_PORT: i32 = 50051;
const HTTP_PORT: i32 = 9090;
const TOKEN_DIR: &str = "/var/run/mantle/runner-token";

/// What the plan does not say about how pods are built: the operator's own settings.
#[derive(Clone, Debug, PartialEq)]
pub struct RenderOptions {
    /// The `mantle-runner` image.
    pub runner_image: String,
    /// The `mantle-runner` image built with CUDA, for models that ask for GPUs.
    pub runner_cuda_image: String,
    /// The node directory holding the weight cache (a hostPath).
    pub cache_root: String,
    /// The cache's byte budget on each node, in GiB.
    pub cache_budget_gib: u64,
    /// The Secret (key `token`) holding the token the router presents, when runner
    /// authentication is on.
    pub runner_token_secret: Option<String>,
    /// The inference gateway's endpoint picker, when InferencePools are to be made for it.
    pub endpoint_picker: Option<EndpointPicker>,
}

/// An InferencePool's `endpointPickerRef`: the endpoint picker Service of the gateway.
#[derive(Clone, Debug, PartialEq)]
pub struct EndpointPicker {
    pub service: String,
    pub port: i32,
}

impl std::str::FromStr for EndpointPicker {
    type Err = String;

    /// `SERVICE:PORT`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (service, port) = s.rsplit_once(':').ok_or_else(|| format!("{s:?} is not SERVICE:PORT"))?;
        let port: i32 = port.parse().map_err(|_| format!("{port:?} in {s:?} is not a port"))?;
        if service.is_empty() || !(1..=65535).contains(&port) {
            return Err(format!("{s:?} is not SERVICE:PORT"));
        }
        Ok(EndpointPicker { service: service.into(), port })
    }
}

impl Default for RenderOptions {
    fn default() -> Self {
        RenderOptions {
            runner_image: format!("mantle/runner:{}", env!("CARGO_PKG_VERSION")),
            runner_cuda_image: format!("mantle/runner-cuda:{}", env!("CARGO_PKG_VERSION")),
            cache_root: "/var/cache/mantle/weights".into(),
            cache_budget_gib: 100,
            runner_token_secret: Some("mantle-runner-token".into()),
            endpoint_picker: None,
        }
    }
}

/// One rendered object.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Object {
    Deployment(Box<Deployment>),
    Service(Box<Service>),
    PodDisruptionBudget(Box<PodDisruptionBudget>),
    DaemonSet(Box<DaemonSet>),
    /// A BatchJob run's workers.
    Job(Box<k8s_openapi::api::batch::v1::Job>),
    /// A Gateway API Inference Extension InferencePool (a CRD, so untyped).
    InferencePool(Box<kube::api::DynamicObject>),
}

impl Object {
    pub fn kind(&self) -> &'static str {
        match self {
            Object::Deployment(_) => "Deployment",
            Object::Service(_) => "Service",
            Object::PodDisruptionBudget(_) => "PodDisruptionBudget",
            Object::DaemonSet(_) => "DaemonSet",
            Object::Job(_) => "Job",
            Object::InferencePool(_) => "InferencePool",
        }
    }

    pub fn metadata(&self) -> &ObjectMeta {
        match self {
            Object::Deployment(o) => &o.metadata,
            Object::Service(o) => &o.metadata,
            Object::PodDisruptionBudget(o) => &o.metadata,
            Object::DaemonSet(o) => &o.metadata,
            Object::Job(o) => &o.metadata,
            Object::InferencePool(o) => &o.metadata,
        }
    }
}

/// Every object of every pool in the plan, pool by pool (Deployment, Service, PodDisruptionBudget),
/// then each prewarmed model's DaemonSet.
pub fn render(desired: &Desired, plan: &Plan, options: &RenderOptions) -> Vec<Object> {
    let pools = render_pools(desired, plan.pools.iter(), options).into_iter().flat_map(|(_, objects)| objects);
    let prewarm = desired.models.iter().filter_map(|m| render_prewarm(m, desired, plan, options));
    let gateway = desired.models.iter().filter_map(|m| render_inference_pool(m, options));
    pools
        .chain(prewarm.map(|d| Object::DaemonSet(Box::new(d))))
        .chain(gateway.map(|p| Object::InferencePool(Box::new(p))))
        .collect()
}

/// The Gateway API Inference Extension's InferencePool kind.
pub fn inference_pool_resource() -> kube::api::ApiResource {
    kube::api::ApiResource {
        group: "inference.networking.k8s.io".into(),
        version: "v1".into(),
        api_version: "inference.networking.k8s.io/v1".into(),
        kind: "InferencePool".into(),
        plural: "inferencepools".into(),
    }
}

/// For an External-engine model run from its `image`, when the operator is given the gateway's
/// endpoint picker: an InferencePool (named as the model) of its runner pods' engine port, which
/// speaks the OpenAI API, so an existing inference gateway can route to it. Builtin-engine runners
/// speak Mantle's gRPC API only, and an `endpoint` model's pods hold no engine; gateways reach
/// those models through the Mantle router.
pub fn render_inference_pool(model: &FoundationModel, options: &RenderOptions) -> Option<kube::api::DynamicObject> {
    let picker = options.endpoint_picker.as_ref()?;
    let external = match (model.spec.engine.type_, &model.spec.engine.external) {
        (EngineType::External, Some(external)) if external.image.is_some() => external,
        _ => return None,
    };
    let name = model.metadata.name.clone().unwrap_or_default();
    let mut pool = kube::api::DynamicObject::new(&name, &inference_pool_resource());
    pool.metadata.namespace = model.metadata.namespace.clone();
    pool.metadata.labels = Some(BTreeMap::from([
        ("app.kubernetes.io/managed-by".to_string(), "mantle-operator".to_string()),
        (MODEL_LABEL.to_string(), name.clone()),
    ]));
    pool.metadata.owner_references = Some(vec![model_owner(model)]);
    pool.data = serde_json::json!({
        "spec": {
            "selector": {"matchLabels": {
                MODEL_LABEL: name,
                "app.kubernetes.io/component": "runner",
            }},
            "targetPorts": [{"number": external.port}],
            "endpointPickerRef": {
                "name": picker.service,
                "port": {"number": picker.port},
                "failureMode": "FailClose",
            },
        }
    });
    Some(pool)
}

/// The name of a model's prewarm DaemonSet.
pub fn prewarm_name(model: &FoundationModel) -> String {
    object_name(&[&model.metadata.name.clone().unwrap_or_default(), "prewarm"])
}

/// For a model with `weightCache.prewarm`: a DaemonSet whose pod keeps the weights in the node
/// cache (`mantle-runner keep-cached`, ready while they are there) on every node that matches
/// the prewarm selector within the Cells the plan puts the model in, with those Cells'
/// tolerations. Its status counts the warm nodes; runner pods prefer the nodes it runs on.
pub fn render_prewarm(
    model: &FoundationModel,
    desired: &Desired,
    plan: &Plan,
    options: &RenderOptions,
) -> Option<DaemonSet> {
    let prewarm = model.spec.weight_cache.prewarm.as_ref()?;
    // An External endpoint's server holds its own weights: there is nothing to keep cached.
    let source = model.spec.fetched_weights()?;
    let name = model.metadata.name.clone().unwrap_or_default();
    let namespace = model.metadata.namespace.clone();
    let mut cell_names: Vec<&str> = plan
        .pools_of(namespace.as_deref(), &name)
        .filter(|p| p.dedicated.is_none())
        .filter_map(|p| p.cell.as_deref())
        .collect();
    cell_names.sort_unstable();
    cell_names.dedup();
    let cells: Vec<&Cell> = cell_names
        .iter()
        .filter_map(|c| {
            desired.cells.iter().find(|x| x.metadata.namespace == namespace && x.metadata.name.as_deref() == Some(c))
        })
        .collect();
    // One term per Cell (terms are ORed): its selector and the prewarm selector together.
    let requirements = |labels: &BTreeMap<String, String>| -> Vec<NodeSelectorRequirement> {
        labels
            .iter()
            .map(|(k, v)| NodeSelectorRequirement {
                key: k.clone(),
                operator: "In".into(),
                values: Some(vec![v.clone()]),
            })
            .collect()
    };
    // A Cell whose selector contradicts the prewarm selector has no node to prewarm.
    let selectors: Vec<BTreeMap<String, String>> = if cells.is_empty() {
        vec![prewarm.node_selector.clone()]
    } else {
        cells
            .iter()
            .filter(|c| prewarm.node_selector.iter().all(|(k, v)| c.spec.node_selector.get(k).is_none_or(|x| x == v)))
            .map(|c| {
                let mut labels = c.spec.node_selector.clone();
                labels.extend(prewarm.node_selector.clone());
                labels
            })
            .collect()
    };
    let mut terms: Vec<NodeSelectorTerm> = Vec::new();
    for labels in &selectors {
        let term = NodeSelectorTerm { match_expressions: Some(requirements(labels)), ..NodeSelectorTerm::default() };
        if !terms.contains(&term) {
            terms.push(term);
        }
    }
    if terms.is_empty() {
        return None;
    }
    let mut tolerations: Vec<Toleration> = Vec::new();
    for t in cells.iter().flat_map(|c| c.spec.tolerations.iter()) {
        if !tolerations.contains(t) {
            tolerations.push(t.clone());
        }
    }
    let labels = BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), "mantle-runner".to_string()),
        ("app.kubernetes.io/component".to_string(), "prewarm".to_string()),
        ("app.kubernetes.io/managed-by".to_string(), "mantle-operator".to_string()),
        (MODEL_LABEL.to_string(), name.clone()),
        (PREWARM_LABEL.to_string(), name.clone()),
    ]);
    let cache = options.cache_root.as_str();
    let image = &options.runner_image;
    let mut args = cache_args("keep-cached", source, options, PREWARM_CACHE_PRIORITY);
    args.push(format!("--http-listen=0.0.0.0:{HTTP_PORT}"));
    let keeper = Container {
        name: "keep-cached".into(),
        image: Some(image.clone()),
        args: Some(args),
        env_from: credentials(source),
        ports: Some(vec![port("http", HTTP_PORT)]),
        readiness_probe: Some(http_probe("/readyz", 10, 3)),
        liveness_probe: Some(http_probe("/healthz", 10, 6)),
        resources: Some(ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".to_string(), Quantity("10m".into())),
                ("memory".to_string(), Quantity("64Mi".into())),
            ])),
            limits: Some(BTreeMap::from([("memory".to_string(), Quantity("256Mi".into()))])),
            ..ResourceRequirements::default()
        }),
        security_context: Some(restricted()),
        volume_mounts: Some(vec![mount("weights", cache, false)]),
        ..Container::default()
    };
    let selector = BTreeMap::from([(PREWARM_LABEL.to_string(), name.clone())]);
    Some(DaemonSet {
        metadata: ObjectMeta {
            name: Some(prewarm_name(model)),
            namespace,
            labels: Some(labels.clone()),
            owner_references: Some(vec![model_owner(model)]),
            ..ObjectMeta::default()
        },
        spec: Some(DaemonSetSpec {
            selector: LabelSelector { match_labels: Some(selector), ..LabelSelector::default() },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta { labels: Some(labels), ..ObjectMeta::default() }),
                spec: Some(PodSpec {
                    affinity: Some(Affinity {
                        node_affinity: Some(NodeAffinity {
                            required_during_scheduling_ignored_during_execution: Some(NodeSelector {
                                node_selector_terms: terms,
                            }),
                            ..NodeAffinity::default()
                        }),
                        ..Affinity::default()
                    }),
                    tolerations: (!tolerations.is_empty()).then_some(tolerations),
                    security_context: Some(pod_security()),
                    automount_service_account_token: Some(false),
                    enable_service_links: Some(false),
                    init_containers: Some(vec![prepare_cache(image, cache)]),
                    containers: vec![keeper],
                    volumes: Some(vec![Volume {
                        name: "weights".into(),
                        host_path: Some(HostPathVolumeSource {
                            path: cache.into(),
                            type_: Some("DirectoryOrCreate".into()),
                        }),
                        ..Volume::default()
                    }]),
                    ..PodSpec::default()
                }),
            },
            ..DaemonSetSpec::default()
        }),
        ..DaemonSet::default()
    })
}

/// The objects of each of `pools`, with the model, Cell and owner each takes from `desired`
/// (the ProvisionedThroughput for a dedicated pool, else the FoundationModel).
pub fn render_pools<'a>(
    desired: &Desired,
    pools: impl Iterator<Item = &'a PoolPlan>,
    options: &RenderOptions,
) -> Vec<(&'a PoolPlan, Vec<Object>)> {
    let mut rendered = Vec::new();
    for pool in pools {
        let same =
            |meta: &ObjectMeta, name: &str| meta.namespace == pool.namespace && meta.name.as_deref() == Some(name);
        let Some(model) = desired.models.iter().find(|m| same(&m.metadata, &pool.model)) else { continue };
        let cell = pool.cell.as_deref().and_then(|c| desired.cells.iter().find(|x| same(&x.metadata, c)));
        let owner = pool
            .dedicated
            .as_ref()
            .and_then(|d| desired.provisioned.iter().find(|p| same(&p.metadata, &d.provisioned)))
            .map_or_else(|| model_owner(model), provisioned_owner);
        rendered.push((pool, render_pool(pool, model, cell, owner, options)));
    }
    rendered
}

/// A controller owner reference (the uid is empty for resources read from files).
fn owner_reference(kind: &str, meta: &ObjectMeta) -> OwnerReference {
    OwnerReference {
        api_version: "mantle.dev/v1alpha1".into(),
        kind: kind.into(),
        name: meta.name.clone().unwrap_or_default(),
        uid: meta.uid.clone().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

pub fn model_owner(model: &FoundationModel) -> OwnerReference {
    owner_reference("FoundationModel", &model.metadata)
}

pub fn provisioned_owner(pt: &ProvisionedThroughput) -> OwnerReference {
    owner_reference("ProvisionedThroughput", &pt.metadata)
}

pub fn batch_job_owner(job: &mantle_crds::BatchJob) -> OwnerReference {
    owner_reference("BatchJob", &job.metadata)
}

/// The labels of every object of a pool.
pub fn pool_labels(pool: &PoolPlan) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), "mantle-runner".to_string()),
        ("app.kubernetes.io/component".to_string(), "runner".to_string()),
        ("app.kubernetes.io/managed-by".to_string(), "mantle-operator".to_string()),
        (MODEL_LABEL.to_string(), pool.model.clone()),
        (RUNNER_POOL_LABEL.to_string(), pool.name.clone()),
    ]);
    if let Some(cell) = &pool.cell {
        labels.insert(CELL_LABEL.into(), cell.clone());
    }
    if let Some(d) = &pool.dedicated {
        labels.insert(POOL_LABEL.into(), d.tenant.clone());
    }
    labels
}

/// The node label that says a node's cache holds these weights: a digest of the weights (their
/// sha256 when the spec gives it, else the source URI).
pub fn weights_label(source: &ModelSource) -> String {
    let key = source.sha256.clone().unwrap_or_else(|| source.uri.clone());
    let digest = Sha256::digest(key.as_bytes());
    let hex: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    format!("{WEIGHTS_LABEL_PREFIX}{hex}")
}

fn meta(pool: &PoolPlan, owner: &OwnerReference) -> ObjectMeta {
    ObjectMeta {
        name: Some(pool.name.clone()),
        namespace: pool.namespace.clone(),
        labels: Some(pool_labels(pool)),
        owner_references: Some(vec![owner.clone()]),
        ..ObjectMeta::default()
    }
}

fn selector(pool: &PoolPlan) -> LabelSelector {
    LabelSelector {
        match_labels: Some(BTreeMap::from([(RUNNER_POOL_LABEL.to_string(), pool.name.clone())])),
        ..LabelSelector::default()
    }
}

/// The pool's Deployment, Service and PodDisruptionBudget.
pub fn render_pool(
    pool: &PoolPlan,
    model: &FoundationModel,
    cell: Option<&Cell>,
    owner: OwnerReference,
    options: &RenderOptions,
) -> Vec<Object> {
    let cache_priority = if pool.dedicated.is_some() { RESERVED_CACHE_PRIORITY } else { 0 };
    let deployment = Deployment {
        metadata: meta(pool, &owner),
        spec: Some(DeploymentSpec {
            replicas: Some(pool.replicas),
            revision_history_limit: Some(5),
            selector: selector(pool),
            // A new spec rolls out one extra pod at a time and never takes a serving one away
            // before its replacement is ready.
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(IntOrString::Int(1)),
                    max_unavailable: Some(IntOrString::Int(0)),
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta { labels: Some(pool_labels(pool)), ..ObjectMeta::default() }),
                spec: Some(pod_spec(model, cell, cache_priority, options)),
            },
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    };
    let service = Service {
        metadata: meta(pool, &owner),
        spec: Some(ServiceSpec {
            // Headless: the router balances over the endpoints itself.
            cluster_ip: Some("None".into()),
            selector: Some(BTreeMap::from([(RUNNER_POOL_LABEL.to_string(), pool.name.clone())])),
            ports: Some(vec![
                ServicePort {
                    name: Some("grpc".into()),
                    port: GRPC_PORT,
                    target_port: Some(IntOrString::String("grpc".into())),
                    app_protocol: Some("kubernetes.io/h2c".into()),
                    ..ServicePort::default()
                },
                ServicePort {
                    name: Some("http".into()),
                    port: HTTP_PORT,
                    target_port: Some(IntOrString::String("http".into())),
                    ..ServicePort::default()
                },
            ]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    };
    let budget = PodDisruptionBudget {
        metadata: meta(pool, &owner),
        spec: Some(PodDisruptionBudgetSpec {
            // One pod at a time may be evicted (a node drain), never more.
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(selector(pool)),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    };
    vec![
        Object::Deployment(Box::new(deployment)),
        Object::Service(Box::new(service)),
        Object::PodDisruptionBudget(Box::new(budget)),
    ]
}

fn restricted() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), ..Capabilities::default() }),
        ..SecurityContext::default()
    }
}

fn mount(name: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: read_only.then_some(true),
        ..VolumeMount::default()
    }
}

fn http_probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("http".into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        ..Probe::default()
    }
}

fn port(name: &str, port: i32) -> ContainerPort {
    ContainerPort {
        name: Some(name.into()),
        container_port: port,
        protocol: Some("TCP".into()),
        ..ContainerPort::default()
    }
}

fn credentials(source: &ModelSource) -> Option<Vec<EnvFromSource>> {
    source.credentials_secret_ref.as_ref().map(|s| {
        vec![EnvFromSource {
            secret_ref: Some(SecretEnvSource { name: s.name.clone(), optional: Some(false) }),
            ..EnvFromSource::default()
        }]
    })
}

/// The init container that makes the node's cache directory the runner user's.
fn prepare_cache(image: &str, cache: &str) -> Container {
    Container {
        name: "prepare-cache".into(),
        image: Some(image.into()),
        args: Some(vec![
            "prepare-cache".into(),
            format!("--cache-dir={cache}"),
            format!("--owner={RUNNER_UID}:{RUNNER_UID}"),
        ]),
        // The cache directory on the node belongs to root until this makes it the runner's.
        security_context: Some(SecurityContext {
            run_as_user: Some(0),
            run_as_non_root: Some(false),
            capabilities: Some(Capabilities { add: Some(vec!["CHOWN".into()]), drop: Some(vec!["ALL".into()]) }),
            ..restricted()
        }),
        volume_mounts: Some(vec![mount("weights", cache, false)]),
        ..Container::default()
    }
}

/// `mantle-runner fetch` or `keep-cached` arguments for the model's weights.
fn cache_args(command: &str, source: &ModelSource, options: &RenderOptions, priority: u8) -> Vec<String> {
    let mut args = vec![
        command.into(),
        format!("--source={}", source.uri),
        format!("--cache-dir={}", options.cache_root),
        format!("--cache-budget-gib={}", options.cache_budget_gib),
    ];
    if let Some(sha) = &source.sha256 {
        args.push(format!("--sha256={sha}"));
    }
    if priority > 0 {
        args.push(format!("--cache-priority={priority}"));
    }
    args
}

/// The pod security context every pod the operator makes runs under.
fn pod_security() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(RUNNER_UID),
        run_as_group: Some(RUNNER_UID),
        fs_group: Some(RUNNER_UID),
        seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), ..SeccompProfile::default() }),
        ..PodSecurityContext::default()
    }
}

/// The weights' eviction priority in the node cache: a reserved tenant's pool keeps them longest,
/// a prewarmed model's next, on-demand pools' least (see `mantle-runner --cache-priority`).
pub const RESERVED_CACHE_PRIORITY: u8 = 2;
pub const PREWARM_CACHE_PRIORITY: u8 = 1;

fn pod_spec(model: &FoundationModel, cell: Option<&Cell>, cache_priority: u8, options: &RenderOptions) -> PodSpec {
    let spec = &model.spec;
    let cache = options.cache_root.as_str();
    let external = match (spec.engine.type_, &spec.engine.external) {
        (EngineType::External, Some(external)) => Some(external),
        _ => None,
    };
    // The weights the pod fetches into the node cache: none for an External endpoint, whose
    // server runs elsewhere with its own.
    let weights = spec.fetched_weights();
    // A builtin engine on GPUs runs the runner built with CUDA; an external engine brings its
    // own GPU code and the runner beside it only forwards.
    let on_gpu = spec.resources.gpus > 0 && external.is_none();
    let runner_image = if on_gpu { &options.runner_cuda_image } else { &options.runner_image };
    let mut node_selector = cell.map(|c| c.spec.node_selector.clone()).unwrap_or_default();
    if let Some(gpu) = spec.resources.gpu_type.as_ref().filter(|_| spec.external_endpoint().is_none()) {
        node_selector.insert("nvidia.com/gpu.product".into(), gpu.clone());
    }
    let mut volumes = Vec::new();
    let mut runner_mounts = Vec::new();
    let mut init_containers = Vec::new();
    if let Some(source) = weights {
        volumes.push(Volume {
            name: "weights".into(),
            host_path: Some(HostPathVolumeSource { path: cache.into(), type_: Some("DirectoryOrCreate".into()) }),
            ..Volume::default()
        });
        runner_mounts.push(mount("weights", cache, false));
        init_containers.push(prepare_cache(runner_image, cache));
        init_containers.push(Container {
            name: "fetch-weights".into(),
            image: Some(runner_image.clone()),
            args: Some(cache_args("fetch", source, options, cache_priority)),
            env_from: credentials(source),
            security_context: Some(restricted()),
            volume_mounts: Some(vec![mount("weights", cache, false)]),
            ..Container::default()
        });
    }
    let mut env = Vec::new();
    if let Some(secret) = &options.runner_token_secret {
        volumes.push(Volume {
            name: "runner-token".into(),
            secret: Some(SecretVolumeSource { secret_name: Some(secret.clone()), ..SecretVolumeSource::default() }),
            ..Volume::default()
        });
        runner_mounts.push(mount("runner-token", TOKEN_DIR, true));
        env.push(EnvVar {
            name: "MANTLE_RUNNER_TOKEN_FILE".into(),
            value: Some(format!("{TOKEN_DIR}/token")),
            ..EnvVar::default()
        });
    }
    let mut resources = ResourceRequirements::default();
    let mut requests = BTreeMap::new();
    let mut limits = BTreeMap::new();
    if let Some(cpu) = &spec.resources.cpu {
        requests.insert("cpu".to_string(), cpu.clone());
    }
    if let Some(memory) = &spec.resources.memory {
        requests.insert("memory".to_string(), memory.clone());
        limits.insert("memory".to_string(), memory.clone());
    }
    if spec.resources.gpus > 0 {
        limits.insert("nvidia.com/gpu".to_string(), Quantity(spec.resources.gpus.to_string()));
    }
    resources.requests = (!requests.is_empty()).then_some(requests);
    resources.limits = (!limits.is_empty()).then_some(limits);
    // Loading weights takes longer on GPUs (copies to device memory) than on CPU.
    let startup_seconds = if spec.resources.gpus > 0 { 1800 } else { 600 };
    let args = runner_args(
        model,
        &RunnerPlacement {
            // The builtin engine loads the weights; the sidecar of an External engine counts
            // tokens with the server's `/tokenize` (vLLM, SGLang and llama.cpp's server have one).
            model: match (external, weights) {
                (None, Some(source)) => source.uri.clone(),
                _ => String::new(),
            },
            grpc_listen: format!("0.0.0.0:{GRPC_PORT}"),
            http_listen: format!("0.0.0.0:{HTTP_PORT}"),
            threads: 0,
            cache_dir: Some(cache.into()),
            device: on_gpu.then(|| "cuda".into()),
            cache_priority,
        },
    );
    let mut runner_security = restricted();
    if args.iter().any(|a| a == "--pin-weights") {
        // Locking the weights in RAM needs IPC_LOCK.
        runner_security.capabilities =
            Some(Capabilities { add: Some(vec!["IPC_LOCK".into()]), drop: Some(vec!["ALL".into()]) });
    }
    let runner = Container {
        name: "runner".into(),
        image: Some(runner_image.clone()),
        args: Some(args),
        env: (!env.is_empty()).then_some(env),
        env_from: weights.and_then(credentials),
        ports: Some(vec![port("grpc", GRPC_PORT), port("http", HTTP_PORT)]),
        readiness_probe: Some(http_probe("/readyz", 5, 3)),
        liveness_probe: Some(http_probe("/healthz", 10, 6)),
        startup_probe: Some(http_probe("/readyz", 5, startup_seconds / 5)),
        // The model's resources are the engine's: the sidecar of an External engine only forwards.
        resources: external.is_none().then(|| resources.clone()),
        security_context: Some(runner_security),
        volume_mounts: Some(runner_mounts),
        ..Container::default()
    };
    let mut containers = vec![runner];
    if let Some((external, image)) = external.and_then(|e| Some((e, e.image.as_ref()?))) {
        // The engine serves the OpenAI API on its port; the runner beside it serves the router.
        containers.push(Container {
            name: "engine".into(),
            image: Some(image.clone()),
            args: (!external.args.is_empty()).then(|| external.args.clone()),
            ports: Some(vec![port("engine", external.port)]),
            resources: Some(resources),
            volume_mounts: Some(vec![mount("weights", cache, true)]),
            ..Container::default()
        });
    }
    PodSpec {
        node_selector: (!node_selector.is_empty()).then_some(node_selector),
        tolerations: cell.map(|c| c.spec.tolerations.clone()).filter(|t| !t.is_empty()),
        affinity: weights.map(|source| weights_affinity(model, source)),
        security_context: Some(pod_security()),
        automount_service_account_token: Some(false),
        enable_service_links: Some(false),
        termination_grace_period_seconds: Some(30),
        init_containers: (!init_containers.is_empty()).then_some(init_containers),
        containers,
        volumes: (!volumes.is_empty()).then_some(volumes),
        ..PodSpec::default()
    }
}

/// Nodes whose cache already holds the weights first: those labelled for them, and those where
/// the model's prewarm pod keeps them.
fn weights_affinity(model: &FoundationModel, source: &ModelSource) -> Affinity {
    Affinity {
        node_affinity: Some(NodeAffinity {
            preferred_during_scheduling_ignored_during_execution: Some(vec![PreferredSchedulingTerm {
                weight: 100,
                preference: NodeSelectorTerm {
                    match_expressions: Some(vec![NodeSelectorRequirement {
                        key: weights_label(source),
                        operator: "Exists".into(),
                        values: None,
                    }]),
                    ..NodeSelectorTerm::default()
                },
            }]),
            ..NodeAffinity::default()
        }),
        pod_affinity: model.spec.weight_cache.prewarm.as_ref().map(|_| PodAffinity {
            preferred_during_scheduling_ignored_during_execution: Some(vec![WeightedPodAffinityTerm {
                weight: 100,
                pod_affinity_term: PodAffinityTerm {
                    label_selector: Some(LabelSelector {
                        match_labels: Some(BTreeMap::from([(
                            PREWARM_LABEL.to_string(),
                            model.metadata.name.clone().unwrap_or_default(),
                        )])),
                        ..LabelSelector::default()
                    }),
                    topology_key: "kubernetes.io/hostname".into(),
                    ..PodAffinityTerm::default()
                },
            }]),
            ..PodAffinity::default()
        }),
        ..Affinity::default()
    }
}

/// The objects as multi-document YAML, as `mantle render` prints them.
pub fn to_yaml(objects: &[Object]) -> Result<String, serde_norway::Error> {
    let mut out = String::new();
    for object in objects {
        out.push_str("---\n");
        out.push_str(&serde_norway::to_string(object)?);
    }
    Ok(out)
}
