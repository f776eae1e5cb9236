//! `mantle-operator` running in a cluster: checks that its CRDs are installed, serves
//! `/metrics`, `/healthz` and `/readyz`, waits to lead (a Lease, when leader election is on), then
//! runs the FoundationModel, ProvisionedThroughput, Cell and BatchJob controllers until SIGTERM — or until
//! it loses the Lease (or cannot renew it), when it exits so that it never reconciles beside
//! another leader.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context as _, bail};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{Controller, WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use mantle_crds::{BatchJob, Cell, FoundationModel, ProvisionedThroughput};

use crate::batch::BatchOptions;
use crate::controller::{
    Context, error_policy, reconcile_batch_job, reconcile_cell, reconcile_model, reconcile_provisioned,
};
use crate::leader::Elector;
use crate::metrics::Metrics;
use crate::render::RenderOptions;

/// The label every object the operator makes carries.
const MANAGED: &str = "app.kubernetes.io/managed-by=mantle-operator";

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    #[arg(long, default_value = "0.0.0.0:8080")]
    pub metrics_listen: SocketAddr,
    /// Elect a leader through a Lease in this namespace (only the leader reconciles); without
    /// it, this replica reconciles alone.
    #[arg(long)]
    pub leader_election_namespace: Option<String>,
    #[arg(long, default_value = "mantle-operator")]
    pub lease_name: String,
    /// How long a Lease holds without renewal before another replica takes over.
    #[arg(long, default_value_t = 15)]
    pub lease_duration_s: u64,
    /// This replica's name in the Lease.
    #[arg(long, env = "POD_NAME", default_value = "mantle-operator")]
    pub identity: String,
    /// Namespaces to watch (repeat the flag); none watches the whole cluster.
    #[arg(long = "watch-namespace")]
    pub watch_namespaces: Vec<String>,
    /// The router Service (`NAMESPACE/NAME`) whose pods' queues size the shared pools (their
    /// port named `metrics`); without it, shared pools run `replicas.min`.
    #[arg(long)]
    pub router_service: Option<String>,
    #[command(flatten)]
    pub render: crate::cli::PodArgs,
    #[command(flatten)]
    pub batch: crate::cli::BatchArgs,
}

/// The CRDs the controllers need.
const CRDS: [&str; 4] =
    ["foundationmodels.mantle.dev", "provisionedthroughputs.mantle.dev", "cells.mantle.dev", "batchjobs.mantle.dev"];

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let client = Client::try_default().await.context("connecting to the Kubernetes API")?;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for name in CRDS {
        if crds.get_opt(name).await.with_context(|| format!("looking up the CRD {name}"))?.is_none() {
            bail!(
                "the CRD {name} is not installed: install the chart (it carries the CRDs) or `kubectl apply -f crds/manifests/`"
            );
        }
    }
    let metrics = Metrics::new();
    let leading = Arc::new(AtomicBool::new(false));
    tokio::spawn(serve_http(args.metrics_listen, metrics.clone(), leading.clone()));
    let elector = args.leader_election_namespace.as_ref().map(|ns| {
        let api: Api<Lease> = Api::namespaced(client.clone(), ns);
        Elector::new(api, &args.lease_name, &args.identity, Duration::from_secs(args.lease_duration_s.max(3)))
    });
    if let Some(elector) = &elector {
        tracing::info!(identity = %args.identity, "waiting to lead");
        while !elector.step().await.unwrap_or_else(|e| {
            tracing::warn!(error = %e, "leader election");
            false
        }) {
            tokio::time::sleep(elector.renew_every()).await;
        }
    }
    tracing::info!(identity = %args.identity, "leading: reconciling");
    leading.store(true, Ordering::Relaxed);
    let mut options = args.render.options();
    if options.endpoint_picker.is_some() && !inference_pools_installed(&client).await {
        tracing::warn!(
            "--inference-pool-endpoint-picker is set but the InferencePool CRD (inference.networking.k8s.io/v1) \
             is not installed: no InferencePools are made (restart the operator after installing it)"
        );
        options.endpoint_picker = None;
    }
    let scopes: Vec<Option<String>> = if args.watch_namespaces.is_empty() {
        vec![None]
    } else {
        args.watch_namespaces.iter().cloned().map(Some).collect()
    };
    let mut controllers = tokio::task::JoinSet::new();
    let router = args.router_service.as_deref().and_then(|s| s.split_once('/'));
    let router = router.map(|(ns, name)| (ns.to_string(), name.to_string()));
    for scope in scopes {
        controllers.spawn(controllers_for(
            client.clone(),
            scope,
            options.clone(),
            args.batch.options(),
            metrics.clone(),
            args.identity.clone(),
            router.clone(),
        ));
    }
    // A leader that cannot renew its Lease for the Lease's duration may already have a successor:
    // it stops (and is restarted) rather than reconcile beside it.
    let renewing = async {
        let Some(elector) = &elector else { return std::future::pending::<anyhow::Result<()>>().await };
        let mut renewed = std::time::Instant::now();
        loop {
            tokio::time::sleep(elector.renew_every()).await;
            match elector.step().await {
                Ok(true) => renewed = std::time::Instant::now(),
                Ok(false) => bail!("lost the leader-election Lease to another replica; exiting"),
                Err(e) if renewed.elapsed() >= Duration::from_secs(args.lease_duration_s) => {
                    bail!("could not renew the leader-election Lease for its whole duration ({e}); exiting")
                }
                Err(e) => tracing::warn!(error = %e, "renewing the Lease"),
            }
        }
    };
    tokio::select! {
        result = renewing => result,
        _ = async { while controllers.join_next().await.is_some() {} } => {
            tracing::info!("controllers stopped");
            Ok(())
        }
    }
}

fn api<K>(client: &Client, scope: &Option<String>) -> Api<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match scope {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// The controllers of one scope (a namespace, or the whole cluster), until SIGTERM.
/// How often the routers' queues are read for the autoscaler.
const DEMAND_EVERY: Duration = Duration::from_secs(15);

async fn controllers_for(
    client: Client,
    scope: Option<String>,
    options: RenderOptions,
    batch: BatchOptions,
    metrics: Metrics,
    identity: String,
    router: Option<(String, String)>,
) {
    let managed = watcher::Config::default().labels(MANAGED);
    let (deployments, deployments_writer) = reflector::store::<Deployment>();
    let (daemonsets, daemonsets_writer) = reflector::store::<DaemonSet>();
    tokio::spawn(
        reflector::reflector(daemonsets_writer, watcher(api::<DaemonSet>(&client, &scope), managed.clone()))
            .applied_objects()
            .for_each(|_| async {}),
    );
    let (nodes, nodes_writer) = reflector::store::<Node>();
    tokio::spawn(
        reflector::reflector(nodes_writer, watcher(Api::<Node>::all(client.clone()), watcher::Config::default()))
            .applied_objects()
            .for_each(|_| async {}),
    );
    tokio::spawn(
        reflector::reflector(deployments_writer, watcher(api::<Deployment>(&client, &scope), managed.clone()))
            .applied_objects()
            .for_each(|_| async {}),
    );
    let (jobs, jobs_writer) = reflector::store::<Job>();
    tokio::spawn(
        reflector::reflector(jobs_writer, watcher(api::<Job>(&client, &scope), managed.clone()))
            .applied_objects()
            .for_each(|_| async {}),
    );
    let batch_jobs = Controller::new(api::<BatchJob>(&client, &scope), watcher::Config::default());
    let cells = Controller::new(api::<Cell>(&client, &scope), watcher::Config::default());
    let models = Controller::new(api::<FoundationModel>(&client, &scope), watcher::Config::default());
    let provisioned = Controller::new(api::<ProvisionedThroughput>(&client, &scope), watcher::Config::default());
    let ctx = Arc::new(Context {
        client: client.clone(),
        models: models.store(),
        provisioned: provisioned.store(),
        cells: cells.store(),
        deployments,
        daemonsets,
        nodes,
        batch_jobs: batch_jobs.store(),
        jobs,
        options,
        batch,
        recorder: Recorder::new(
            client.clone(),
            Reporter { controller: "mantle-operator".into(), instance: Some(identity) },
        ),
        metrics,
        failures: Default::default(),
        demand: Default::default(),
        autoscaler: Default::default(),
    });
    // Every interval, the routers' queues; while any model has demand, or when it changed, the
    // models are replanned (the autoscaler's stabilisation window needs a look even while it
    // holds).
    let (replan, replans) = tokio::sync::mpsc::unbounded_channel::<()>();
    if let Some((namespace, name)) = router {
        let (ctx, client) = (ctx.clone(), client.clone());
        tokio::spawn(async move {
            loop {
                if let Some(demand) = crate::demand::router_demand(&client, &namespace, &name).await {
                    let busy = demand.values().any(|q| *q > 0.0);
                    let before = ctx.demand.lock().unwrap_or_else(|e| e.into_inner()).replace(demand.clone());
                    if busy || before.as_ref() != Some(&demand) {
                        let _ = replan.send(());
                    }
                }
                tokio::time::sleep(DEMAND_EVERY).await;
            }
        });
    }
    // A runner Deployment's change (its own, or a reservation's for the model: the model's status
    // counts both) and a Cell's change replan a model; a model's or a Cell's change, its
    // reservations.
    let store = ctx.models.clone();
    let of_model = move |d: Deployment| {
        let (ns, model) = (d.namespace(), d.labels().get(crate::render::MODEL_LABEL).cloned());
        store
            .state()
            .into_iter()
            .filter(|m| m.namespace() == ns && Some(m.name_any()) == model)
            .map(|m| ObjectRef::from_obj(&*m))
            .collect::<Vec<_>>()
    };
    let store = ctx.models.clone();
    let models = models
        .reconcile_all_on(tokio_stream::wrappers::UnboundedReceiverStream::new(replans))
        .watches(api::<Deployment>(&client, &scope), managed.clone(), of_model)
        .watches(api::<Cell>(&client, &scope), watcher::Config::default(), move |cell: Cell| {
            let ns = cell.namespace();
            store
                .state()
                .into_iter()
                .filter(|m| m.namespace() == ns)
                .map(|m| ObjectRef::from_obj(&*m))
                .collect::<Vec<_>>()
        })
        .shutdown_on_signal()
        .run(reconcile_model, error_policy, ctx.clone())
        .for_each(|result| async move { log(result.map(|(o, _)| o.name)) });
    let store = ctx.provisioned.clone();
    let in_namespace = move |cell: Cell| {
        let ns = cell.namespace();
        store.state().into_iter().filter(|p| p.namespace() == ns).map(|p| ObjectRef::from_obj(&*p)).collect::<Vec<_>>()
    };
    let store = ctx.provisioned.clone();
    let provisioned = provisioned
        .owns(api::<Deployment>(&client, &scope), managed.clone())
        .watches(api::<Cell>(&client, &scope), watcher::Config::default(), in_namespace)
        .watches(api::<FoundationModel>(&client, &scope), watcher::Config::default(), move |model: FoundationModel| {
            let (ns, id) = (model.namespace(), model.spec.model_id.clone());
            store
                .state()
                .into_iter()
                .filter(|p| p.namespace() == ns && p.spec.model_id == id)
                .map(|p| ObjectRef::from_obj(&*p))
                .collect::<Vec<_>>()
        })
        .shutdown_on_signal()
        .run(reconcile_provisioned, error_policy, ctx.clone())
        .for_each(|result| async move { log(result.map(|(o, _)| o.name)) });
    // A Cell's status follows its nodes and the runner Deployments in it.
    let store = ctx.cells.clone();
    let by_label = move |d: Deployment| {
        let (ns, cell) = (d.namespace(), d.labels().get(crate::render::CELL_LABEL).cloned());
        store
            .state()
            .into_iter()
            .filter(|c| c.namespace() == ns && Some(c.name_any()) == cell)
            .map(|c| ObjectRef::from_obj(&*c))
            .collect::<Vec<_>>()
    };
    let store = ctx.cells.clone();
    let every_cell = move |_: Node| store.state().into_iter().map(|c| ObjectRef::from_obj(&*c)).collect::<Vec<_>>();
    let cells = cells
        .watches(api::<Deployment>(&client, &scope), watcher::Config::default().labels(MANAGED), by_label)
        .watches(Api::<Node>::all(client.clone()), watcher::Config::default(), every_cell)
        .shutdown_on_signal()
        .run(reconcile_cell, error_policy, ctx.clone())
        .for_each(|result| async move { log(result.map(|(o, _)| o.name)) });
    // A BatchJob follows its worker Jobs.
    let batch_jobs = batch_jobs
        .owns(api::<Job>(&client, &scope), managed)
        .shutdown_on_signal()
        .run(reconcile_batch_job, error_policy, ctx)
        .for_each(|result| async move { log(result.map(|(o, _)| o.name)) });
    tokio::join!(models, provisioned, cells, batch_jobs);
}

fn log<E: std::fmt::Display>(result: Result<String, E>) {
    match result {
        Ok(name) => tracing::debug!(%name, "reconciled"),
        Err(e) => tracing::warn!(error = %e, "reconcile"),
    }
}

/// `/metrics`, `/healthz` (the process runs) and `/readyz` (it leads, or waits to).
async fn serve_http(listen: SocketAddr, metrics: Metrics, leading: Arc<AtomicBool>) {
    use axum::routing::get;
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let m = metrics.clone();
                async move { m.render() }
            }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let leading = leading.load(Ordering::Relaxed);
                async move { if leading { "leading" } else { "following" } }
            }),
        );
    match tokio::net::TcpListener::bind(listen).await {
        Ok(listener) => {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(error = %e, "the metrics listener stopped");
            }
        }
        Err(e) => tracing::error!(%listen, error = %e, "cannot listen for /metrics"),
    }
}

/// Whether the cluster serves the Gateway API Inference Extension's InferencePool (v1).
async fn inference_pools_installed(client: &Client) -> bool {
    let gvk = kube::api::GroupVersionKind::gvk("inference.networking.k8s.io", "v1", "InferencePool");
    kube::discovery::pinned_kind(client, &gvk).await.is_ok()
}
