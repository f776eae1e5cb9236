//! The Kubernetes executor of the plan: one kube-runtime `Controller` per kind, a shared
//! [`Context`] and free `reconcile` functions, as in kube-rs's controller-rs.
//!
//! Reconciling a FoundationModel (or a ProvisionedThroughput) plans every pool from the watched
//! resources (reflector stores, once each has listed), renders the pools it owns, applies each
//! object with server-side apply (field manager `mantle-operator`), deletes the pools it owned
//! that the plan no longer has — never while the plan reports a problem for it, so deleting a Cell
//! that a model names does not take serving replicas with it (a model on every Active Cell
//! follows the Cells there are) — and writes its status (server-side apply on the status
//! subresource) and an Event when something changed or went wrong. Errors requeue with
//! exponential backoff. Cells get their status the same way.

mod batch;

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::Store;
use kube::{Api, Client, Resource, ResourceExt};
use mantle_crds::{Cell, FoundationModel, ProvisionedThroughput, Time, Validate};
use serde::Serialize;
use serde_json::json;

pub use batch::reconcile_batch_job;

use crate::plan::{Desired, Observed, Plan, PoolObservation, plan};
use crate::render::{Object, RenderOptions, render_pools};
use crate::status::{NodeFacts, cell_status, invalid_model_status, model_status, provisioned_status};

/// The field manager of everything the operator applies.
pub const MANAGER: &str = "mantle-operator";
/// How often a resource is reconciled even when nothing it watches changed.
const RESYNC: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("applying {kind} {name}: {source}")]
    Apply { kind: &'static str, name: String, source: kube::Error },
    #[error("deleting {kind} {name}: {source}")]
    Delete { kind: &'static str, name: String, source: kube::Error },
    #[error("writing the status of {name}: {source}")]
    Status { name: String, source: kube::Error },
    #[error("{0} has no namespace")]
    NoNamespace(String),
    #[error("the watches stopped before they had listed")]
    NotReady,
}

/// What every reconcile shares: the client, the watched resources, the render settings, the
/// event recorder and the metrics.
pub struct Context {
    pub client: Client,
    pub models: Store<FoundationModel>,
    pub provisioned: Store<ProvisionedThroughput>,
    pub cells: Store<Cell>,
    /// The Deployments the operator made (labelled `app.kubernetes.io/managed-by`).
    pub deployments: Store<Deployment>,
    /// The prewarm DaemonSets the operator made (same label): their status counts warm nodes.
    pub daemonsets: Store<DaemonSet>,
    /// The cluster's nodes (for the Cells' status).
    pub nodes: Store<Node>,
    /// The BatchJobs (a job waits for the one it reuses) and the worker Jobs the operator made.
    pub batch_jobs: Store<mantle_crds::BatchJob>,
    pub jobs: Store<k8s_openapi::api::batch::v1::Job>,
    pub options: RenderOptions,
    /// How batch worker pods are built.
    pub batch: crate::batch::BatchOptions,
    pub recorder: Recorder,
    pub metrics: crate::metrics::Metrics,
    /// Failed reconciles in a row, by object, for the retry backoff.
    pub failures: std::sync::Mutex<std::collections::HashMap<String, u32>>,
    /// Requests waiting in the routers for each model's shared pools (model id → requests), when
    /// the operator reads them; without it, shared pools run their minimum.
    pub demand: std::sync::Mutex<Option<std::collections::BTreeMap<String, f64>>>,
    /// Sizes the shared pools from the demand (the same autoscaler `mantle dev` runs).
    pub autoscaler: std::sync::Mutex<crate::autoscale::Autoscaler>,
}

impl Context {
    fn key<K: Resource>(object: &K) -> String
    where
        K::DynamicType: Default,
    {
        format!(
            "{}/{}/{}",
            K::kind(&Default::default()),
            object.meta().namespace.as_deref().unwrap_or_default(),
            object.meta().name.as_deref().unwrap_or_default()
        )
    }

    fn succeeded<K: Resource>(&self, object: &K)
    where
        K::DynamicType: Default,
    {
        self.failures.lock().unwrap_or_else(|e| e.into_inner()).remove(&Self::key(object));
    }
}

impl Context {
    /// Waits until every store has listed once: a plan made from a half-filled store (a Cell
    /// not seen yet) would prune pools that serve.
    async fn ready(&self) -> Result<(), Error> {
        listed(&self.models).await?;
        listed(&self.provisioned).await?;
        listed(&self.cells).await?;
        listed(&self.deployments).await?;
        listed(&self.daemonsets).await?;
        listed(&self.nodes).await
    }

    /// The plan of one namespace, once every watch has listed, with what it was made from.
    async fn plan(&self, namespace: &str) -> Result<(Desired, Observed, Plan), Error> {
        self.ready().await?;
        let (desired, observed) = self.snapshot(namespace);
        let plan = plan(&desired, &observed);
        Ok((desired, observed, plan))
    }

    /// One namespace's resources and pools as the stores have them now (planning never crosses
    /// a namespace, and pool names repeat across namespaces). Models whose spec breaks an
    /// invariant are left out: they get no pools, dedicated or shared.
    fn snapshot(&self, namespace: &str) -> (Desired, Observed) {
        let here = |ns: Option<String>| ns.as_deref() == Some(namespace);
        let desired = Desired {
            models: self
                .models
                .state()
                .iter()
                .filter(|m| here(m.namespace()) && m.spec.validate().is_ok())
                .map(|m| (**m).clone())
                .collect(),
            provisioned: self
                .provisioned
                .state()
                .iter()
                .filter(|p| here(p.namespace()))
                .map(|p| (**p).clone())
                .collect(),
            cells: self.cells.state().iter().filter(|c| here(c.namespace())).map(|c| (**c).clone()).collect(),
        };
        let mut observed = Observed::default();
        let deployments: Vec<Arc<Deployment>> =
            self.deployments.state().into_iter().filter(|d| here(d.namespace())).collect();
        for d in &deployments {
            let ready = d.status.as_ref().and_then(|s| s.ready_replicas).unwrap_or(0);
            observed.pools.insert(d.name_any(), PoolObservation { ready, autoscaled: None });
        }
        self.autoscale(&desired, &deployments, &mut observed);
        (desired, observed)
    }

    /// The autoscaler's decision for each shared pool, from the routers' demand for its model
    /// (shared over the model's shared pools by their replicas).
    fn autoscale(&self, desired: &Desired, deployments: &[Arc<Deployment>], observed: &mut Observed) {
        let Some(demand) = self.demand.lock().unwrap_or_else(|e| e.into_inner()).clone() else { return };
        let shared: Vec<(&FoundationModel, &Deployment, i32)> = deployments
            .iter()
            .filter(|d| !d.labels().contains_key(crate::render::POOL_LABEL))
            .filter_map(|d| {
                let model = d.labels().get(crate::render::MODEL_LABEL)?;
                let model = desired.models.iter().find(|m| m.name_any() == *model)?;
                Some((model, &**d, d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0)))
            })
            .collect();
        let now = Instant::now();
        let mut autoscaler = self.autoscaler.lock().unwrap_or_else(|e| e.into_inner());
        for (model, deployment, replicas) in &shared {
            let total: i32 =
                shared.iter().filter(|(m, _, _)| m.name_any() == model.name_any()).map(|(_, _, r)| (*r).max(1)).sum();
            let waiting = demand.get(&model.spec.model_id).copied().unwrap_or(0.0);
            let bounds = &model.spec.replicas;
            let signal = crate::autoscale::Signal {
                queued: waiting * (*replicas).max(1) as f64 / total.max(1) as f64,
                replicas: *replicas,
                min: bounds.min,
                max: bounds.max,
                target_queue_depth: bounds.target_queue_depth,
            };
            let decided = autoscaler.decide(&deployment.name_any(), &signal, now);
            observed.pools.entry(deployment.name_any()).or_default().autoscaled = Some(decided);
        }
    }

    async fn event<K: Resource<DynamicType = ()>>(&self, object: &K, type_: EventType, reason: &str, note: String) {
        let event =
            Event { type_, reason: reason.into(), note: Some(note), action: "Reconcile".into(), secondary: None };
        if let Err(e) = self.recorder.publish(&event, &object.object_ref(&())).await {
            tracing::warn!(error = %e, reason, "publishing an event");
        }
    }
}

/// Waits until a store has listed once. Asked afresh every 100 ms: a waiter that started before
/// another controller's store was filled is not always woken when it is.
async fn listed<K>(store: &Store<K>) -> Result<(), Error>
where
    K: kube::Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    loop {
        match tokio::time::timeout(Duration::from_millis(100), store.wait_until_ready()).await {
            Ok(result) => return result.map_err(|_| Error::NotReady),
            Err(_) => continue,
        }
    }
}

fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

/// Server-side applies one rendered object.
async fn apply(client: &Client, namespace: &str, object: &Object) -> Result<(), Error> {
    async fn patch<K>(api: Api<K>, name: &str, object: &K) -> Result<(), kube::Error>
    where
        K: Resource + Clone + serde::de::DeserializeOwned + Serialize + std::fmt::Debug,
    {
        api.patch(name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(object)).await.map(|_| ())
    }
    let name = object.metadata().name.clone().unwrap_or_default();
    let result = match object {
        Object::Deployment(d) => patch(Api::namespaced(client.clone(), namespace), &name, &**d).await,
        Object::Service(s) => patch(Api::namespaced(client.clone(), namespace), &name, &**s).await,
        Object::PodDisruptionBudget(p) => patch(Api::namespaced(client.clone(), namespace), &name, &**p).await,
        Object::DaemonSet(d) => patch(Api::namespaced(client.clone(), namespace), &name, &**d).await,
        Object::Job(j) => patch(Api::namespaced(client.clone(), namespace), &name, &**j).await,
        Object::InferencePool(p) => {
            let api: Api<kube::api::DynamicObject> =
                Api::namespaced_with(client.clone(), namespace, &crate::render::inference_pool_resource());
            patch(api, &name, &**p).await
        }
    };
    result.map_err(|source| Error::Apply { kind: object.kind(), name, source })
}

/// Deletes a pool's three objects (each may be gone already).
async fn delete_pool(client: &Client, namespace: &str, name: &str) -> Result<(), Error> {
    async fn delete<K>(api: Api<K>, kind: &'static str, name: &str) -> Result<(), Error>
    where
        K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    {
        match api.delete(name, &DeleteParams::background()).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
            Err(source) => Err(Error::Delete { kind, name: name.into(), source }),
        }
    }
    delete(Api::<Deployment>::namespaced(client.clone(), namespace), "Deployment", name).await?;
    delete(Api::<Service>::namespaced(client.clone(), namespace), "Service", name).await?;
    delete(Api::<PodDisruptionBudget>::namespaced(client.clone(), namespace), "PodDisruptionBudget", name).await
}

/// The Deployments the operator made for an owner (by kind and name), in its namespace.
fn owned_pools(ctx: &Context, namespace: &str, kind: &str, owner: &str) -> Vec<String> {
    ctx.deployments
        .state()
        .iter()
        .filter(|d| d.namespace().as_deref() == Some(namespace))
        .filter(|d| {
            d.owner_references().iter().any(|o| o.kind == kind && o.name == owner && o.controller == Some(true))
        })
        .map(|d| d.name_any())
        .collect()
}

/// Applies the pools the plan gives an owner and deletes those it no longer does (unless the plan
/// has a problem with the owner). Returns (applied pools, deleted pools).
async fn realise(
    ctx: &Context,
    namespace: &str,
    kind: &'static str,
    owner: &str,
    pools: &[(&crate::plan::PoolPlan, Vec<Object>)],
    problem: bool,
) -> Result<(usize, Vec<String>), Error> {
    for (_, objects) in pools {
        for object in objects {
            apply(&ctx.client, namespace, object).await?;
        }
    }
    let mut deleted = Vec::new();
    if !problem {
        for name in owned_pools(ctx, namespace, kind, owner) {
            if !pools.iter().any(|(p, _)| p.name == name) {
                delete_pool(&ctx.client, namespace, &name).await?;
                deleted.push(name);
            }
        }
    }
    Ok((pools.len(), deleted))
}

async fn write_status<K>(api: Api<K>, name: &str, kind: &str, status: impl Serialize) -> Result<(), Error>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let body = json!({ "apiVersion": "mantle.dev/v1alpha1", "kind": kind, "status": status });
    api.patch_status(name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&body))
        .await
        .map(|_| ())
        .map_err(|source| Error::Status { name: name.into(), source })
}

/// Runs one reconcile of `object`, counted in the metrics (by its kind), and forgets its past
/// failures when it succeeds.
async fn counted<K>(
    object: &K,
    ctx: &Context,
    work: impl Future<Output = Result<Action, Error>>,
) -> Result<Action, Error>
where
    K: Resource,
    K::DynamicType: Default,
{
    let started = Instant::now();
    let result = work.await;
    ctx.metrics.observe(&K::kind(&Default::default()), started.elapsed(), result.is_err());
    if result.is_ok() {
        ctx.succeeded(object);
    }
    result
}

/// Reconciles one FoundationModel: its shared pools and its status.
pub async fn reconcile_model(model: Arc<FoundationModel>, ctx: Arc<Context>) -> Result<Action, Error> {
    counted(&*model, &ctx, reconcile_model_inner(&model, &ctx)).await
}

async fn reconcile_model_inner(model: &FoundationModel, ctx: &Context) -> Result<Action, Error> {
    let name = model.name_any();
    let namespace = model.namespace().ok_or_else(|| Error::NoNamespace(name.clone()))?;
    let api: Api<FoundationModel> = Api::namespaced(ctx.client.clone(), &namespace);
    if let Err(invalid) = model.spec.validate() {
        let status = invalid_model_status(model, "InvalidSpec", invalid.to_string(), &now());
        write_status(api, &name, "FoundationModel", status).await?;
        ctx.event(model, EventType::Warning, "InvalidSpec", invalid.to_string()).await;
        return Ok(Action::await_change());
    }
    let (desired, observed, plan) = ctx.plan(&namespace).await?;
    let mine = plan.pools_of(Some(&namespace), &name).filter(|p| p.dedicated.is_none());
    let rendered = render_pools(&desired, mine, &ctx.options);
    let problem = plan
        .problems
        .iter()
        .find(|p| p.kind == "FoundationModel" && p.name == name && p.namespace.as_deref() == Some(&namespace));
    let (applied, deleted) = realise(ctx, &namespace, "FoundationModel", &name, &rendered, problem.is_some()).await?;
    let prewarm = prewarm(ctx, model, &namespace, &desired, &plan, problem.is_some()).await?;
    inference_pool(ctx, model, &namespace).await?;
    let mut status = model_status(model, &plan, &observed, &now());
    crate::status::weights_cached(&mut status, model, prewarm.as_ref(), &now());
    let changed =
        model.status.as_ref().is_none_or(|s| s.phase != status.phase || s.ready_replicas != status.ready_replicas);
    write_status(api, &name, "FoundationModel", &status).await?;
    if let Some(p) = problem {
        ctx.event(model, EventType::Warning, p.reason, p.message.clone()).await;
    } else if changed || !deleted.is_empty() {
        let note = format!(
            "{applied} pools applied{}; {} of {} replicas ready",
            if deleted.is_empty() { String::new() } else { format!(", {} removed", deleted.join(", ")) },
            status.ready_replicas,
            status.cells.iter().map(|c| c.desired).sum::<i32>()
        );
        ctx.event(model, EventType::Normal, "PoolsApplied", note).await;
    }
    Ok(Action::requeue(RESYNC))
}

/// Applies the model's prewarm DaemonSet when it asks for one, or deletes the one it made (never
/// while the plan reports a problem with the model); returns the DaemonSet as last seen.
async fn prewarm(
    ctx: &Context,
    model: &FoundationModel,
    namespace: &str,
    desired: &crate::plan::Desired,
    plan: &crate::plan::Plan,
    problem: bool,
) -> Result<Option<Arc<DaemonSet>>, Error> {
    let name = crate::render::prewarm_name(model);
    let seen = ctx
        .daemonsets
        .state()
        .into_iter()
        .find(|d| d.namespace().as_deref() == Some(namespace) && d.name_any() == name);
    match crate::render::render_prewarm(model, desired, plan, &ctx.options) {
        Some(daemonset) => {
            apply(&ctx.client, namespace, &Object::DaemonSet(Box::new(daemonset))).await?;
            Ok(seen)
        }
        None => {
            if let Some(old) = seen.filter(|_| !problem) {
                let api: Api<DaemonSet> = Api::namespaced(ctx.client.clone(), namespace);
                match api.delete(&old.name_any(), &DeleteParams::background()).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(e)) if e.code == 404 => {}
                    Err(source) => return Err(Error::Delete { kind: "DaemonSet", name, source }),
                }
            }
            Ok(None)
        }
    }
}

/// With an endpoint picker configured: applies the model's InferencePool, or deletes one it no
/// longer has (an engine that is no longer an External image).
async fn inference_pool(ctx: &Context, model: &FoundationModel, namespace: &str) -> Result<(), Error> {
    if ctx.options.endpoint_picker.is_none() {
        return Ok(());
    }
    if let Some(pool) = crate::render::render_inference_pool(model, &ctx.options) {
        return apply(&ctx.client, namespace, &Object::InferencePool(Box::new(pool))).await;
    }
    let api: Api<kube::api::DynamicObject> =
        Api::namespaced_with(ctx.client.clone(), namespace, &crate::render::inference_pool_resource());
    let name = model.name_any();
    match api.delete(&name, &DeleteParams::background()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(source) => Err(Error::Delete { kind: "InferencePool", name, source }),
    }
}

/// Reconciles one ProvisionedThroughput: its dedicated pools and its status.
pub async fn reconcile_provisioned(pt: Arc<ProvisionedThroughput>, ctx: Arc<Context>) -> Result<Action, Error> {
    counted(&*pt, &ctx, reconcile_provisioned_inner(&pt, &ctx)).await
}

async fn reconcile_provisioned_inner(pt: &ProvisionedThroughput, ctx: &Context) -> Result<Action, Error> {
    let name = pt.name_any();
    let namespace = pt.namespace().ok_or_else(|| Error::NoNamespace(name.clone()))?;
    let (desired, observed, plan) = ctx.plan(&namespace).await?;
    let model = desired
        .models
        .iter()
        .find(|m| m.spec.model_id == pt.spec.model_id && m.namespace().as_deref() == Some(&namespace));
    let mine = plan.pools.iter().filter(|p| {
        p.namespace.as_deref() == Some(&namespace) && p.dedicated.as_ref().is_some_and(|d| d.provisioned == name)
    });
    let rendered = render_pools(&desired, mine, &ctx.options);
    let problem = plan
        .problems
        .iter()
        .find(|p| p.kind == "ProvisionedThroughput" && p.name == name && p.namespace.as_deref() == Some(&namespace));
    realise(ctx, &namespace, "ProvisionedThroughput", &name, &rendered, problem.is_some()).await?;
    let per_unit = model.and_then(|m| m.spec.provisioning.as_ref()).map(|p| p.tokens_per_minute_per_unit);
    let status = provisioned_status(pt, &plan, &observed, per_unit, &now());
    let changed = pt.status.as_ref().is_none_or(|s| s.phase != status.phase);
    write_status(
        Api::<ProvisionedThroughput>::namespaced(ctx.client.clone(), &namespace),
        &name,
        "ProvisionedThroughput",
        &status,
    )
    .await?;
    if let Some(p) = problem {
        ctx.event(pt, EventType::Warning, p.reason, p.message.clone()).await;
    } else if changed {
        let note = format!("{} dedicated replicas for tenant {}", status.provisioned_replicas, pt.spec.tenant);
        ctx.event(pt, EventType::Normal, "PoolsApplied", note).await;
    }
    Ok(Action::requeue(RESYNC))
}

/// What a Cell's status needs of a node: its labels, readiness and allocatable GPUs.
fn node_facts(node: &Node) -> NodeFacts {
    let status = node.status.as_ref();
    let ready = status
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    let gpus = status
        .and_then(|s| s.allocatable.as_ref())
        .and_then(|a| a.get("nvidia.com/gpu"))
        .and_then(|q| q.0.parse().ok())
        .unwrap_or(0);
    NodeFacts { labels: node.labels().clone(), ready, gpus }
}

/// Reconciles one Cell: its status (nodes, GPUs, models, health), and an Event when its health
/// changes.
pub async fn reconcile_cell(cell: Arc<Cell>, ctx: Arc<Context>) -> Result<Action, Error> {
    counted(&*cell, &ctx, reconcile_cell_inner(&cell, &ctx)).await
}

async fn reconcile_cell_inner(cell: &Cell, ctx: &Context) -> Result<Action, Error> {
    let name = cell.name_any();
    let namespace = cell.namespace().ok_or_else(|| Error::NoNamespace(name.clone()))?;
    let (desired, observed, plan) = ctx.plan(&namespace).await?;
    let nodes: Vec<NodeFacts> = ctx.nodes.state().iter().map(|n| node_facts(n)).collect();
    let status = cell_status(cell, &nodes, &desired, &plan, &observed, &now());
    let before = cell.status.as_ref().and_then(|s| s.health);
    write_status(Api::<Cell>::namespaced(ctx.client.clone(), &namespace), &name, "Cell", &status).await?;
    if before != status.health {
        let healthy = status.health == Some(mantle_crds::CellHealth::Healthy);
        let degraded = status.conditions.iter().find(|c| c.type_ == "Degraded").map(|c| c.message.clone());
        let note = format!("{:?}: {} ready nodes; {}", status.health, status.ready_nodes, degraded.unwrap_or_default());
        ctx.event(cell, if healthy { EventType::Normal } else { EventType::Warning }, "Health", note).await;
    }
    Ok(Action::requeue(Duration::from_secs(60)))
}

/// The first retry's delay; each failure in a row doubles it, up to [`MAX_RETRY`].
const FIRST_RETRY: Duration = Duration::from_secs(5);
const MAX_RETRY: Duration = Duration::from_secs(300);

/// After a failed reconcile: try again with exponential backoff (5 s, 10 s, 20 s, … 5 min),
/// afresh once a reconcile of the object succeeds.
pub fn error_policy<K>(object: Arc<K>, error: &Error, ctx: Arc<Context>) -> Action
where
    K: Resource,
    K::DynamicType: Default,
{
    let failures = {
        let mut all = ctx.failures.lock().unwrap_or_else(|e| e.into_inner());
        let n = all.entry(Context::key(&*object)).or_insert(0);
        *n += 1;
        *n
    };
    let delay = FIRST_RETRY.saturating_mul(1 << (failures - 1).min(16)).min(MAX_RETRY);
    tracing::warn!(name = %object.meta().name.as_deref().unwrap_or_default(), %error, failures, "reconcile failed; retrying in {}s", delay.as_secs());
    Action::requeue(delay)
}
