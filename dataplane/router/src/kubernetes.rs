//! The platform from Kubernetes: FoundationModels, ProvisionedThroughputs and Cells, and the
//! runners behind each model from its Service's EndpointSlices, all watched with kube-runtime
//! reflectors. Any change rebuilds the [`Platform`] (a pure function of the caches, [`platform_from`])
//! and hands it to the request path, which keeps known runners' connections.
//!
//! A runner Service is found by its EndpointSlices' labels:
//!
//! | label | meaning |
//! |---|---|
//! | `mantle.dev/foundation-model` | the FoundationModel (by name, same namespace) the runners serve |
//! | `mantle.dev/pool` | the tenant whose provisioned throughput the runners are dedicated to |
//! | `mantle.dev/cell` | the Cell the runners run in (by name; a Disabled Cell's runners get no traffic, and its `shuffleShardSize` spreads each tenant over that many of its runners) |
//!
//! The gRPC port is the slice's port named `grpc` (else its first port); endpoints that are
//! not ready are left out.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use mantle_crds::{Cell, FoundationModel, ProvisionedThroughput};
use tokio::sync::Notify;
use tokio_stream::StreamExt;

use crate::inference::Inference;
use crate::runners::RunnerSpec;
use crate::server::Platform;

pub const MODEL_LABEL: &str = "mantle.dev/foundation-model";
pub const POOL_LABEL: &str = "mantle.dev/pool";
pub const CELL_LABEL: &str = "mantle.dev/cell";

/// How long changes are gathered before the platform is rebuilt.
const DEBOUNCE: Duration = Duration::from_millis(200);

/// The platform the caches describe.
pub fn platform_from(
    models: &[Arc<FoundationModel>],
    provisioned: &[Arc<ProvisionedThroughput>],
    cells: &[Arc<Cell>],
    slices: &[Arc<EndpointSlice>],
) -> Platform {
    let mut runners = Vec::new();
    for slice in slices {
        let labels = slice.labels();
        let Some(name) = labels.get(MODEL_LABEL) else { continue };
        let namespace = slice.namespace();
        let Some(model) = models.iter().find(|m| &m.name_any() == name && m.namespace() == namespace) else {
            continue;
        };
        let ports = slice.ports.as_deref().unwrap_or_default();
        let port =
            ports.iter().find(|p| p.name.as_deref() == Some("grpc")).or_else(|| ports.first()).and_then(|p| p.port);
        let Some(port) = port else { continue };
        for endpoint in &slice.endpoints {
            let ready = endpoint.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
            if !ready {
                continue;
            }
            for address in &endpoint.addresses {
                let host = if address.contains(':') { format!("[{address}]") } else { address.clone() };
                runners.push(RunnerSpec {
                    model: model.spec.model_id.clone(),
                    address: format!("http://{host}:{port}"),
                    pool: labels.get(POOL_LABEL).cloned(),
                    cell: labels.get(CELL_LABEL).cloned().or_else(|| endpoint.zone.clone()),
                });
            }
        }
    }
    runners.sort_by(|a, b| (&a.model, &a.address).cmp(&(&b.model, &b.address)));
    Platform {
        models: models.iter().map(|m| (**m).clone()).collect(),
        provisioned: provisioned.iter().map(|p| (**p).clone()).collect(),
        runners,
        cells: cells.iter().map(|c| (**c).clone()).collect(),
    }
}

/// Why following the cluster stopped.
#[derive(Debug, thiserror::Error)]
pub enum FollowError {
    #[error(
        "the {kind} CRD ({plural}.mantle.dev) is not installed in this cluster: install Mantle's CRDs \
         (`helm install mantle charts/mantle`, or `kubectl apply -f crds/manifests/`) and restart the router"
    )]
    CrdMissing { kind: &'static str, plural: &'static str },
    #[error("listing {kind}: {source}")]
    List { kind: &'static str, source: kube::Error },
    #[error("the Kubernetes caches never filled")]
    CachesNeverFilled,
}

/// Fails clearly when a CRD the router watches is not installed (a watch would retry its 404s
/// forever, and the router would serve nothing without saying why).
async fn check_crds_installed(client: &Client, namespace: &Option<String>) -> Result<(), FollowError> {
    async fn probe<K>(api: Api<K>, kind: &'static str, plural: &'static str) -> Result<(), FollowError>
    where
        K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned,
    {
        match api.list_metadata(&kube::api::ListParams::default().limit(1)).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 404 => Err(FollowError::CrdMissing { kind, plural }),
            Err(source) => Err(FollowError::List { kind, source }),
        }
    }
    probe(namespaced::<FoundationModel>(client, namespace), "FoundationModel", "foundationmodels").await?;
    probe(namespaced::<ProvisionedThroughput>(client, namespace), "ProvisionedThroughput", "provisionedthroughputs")
        .await?;
    probe(namespaced::<Cell>(client, namespace), "Cell", "cells").await
}

fn namespaced<K>(client: &Client, namespace: &Option<String>) -> Api<K>
where
    K: kube::Resource<Scope = kube::core::NamespaceResourceScope>,
    <K as kube::Resource>::DynamicType: Default,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Starts the reflectors (in `namespace`, or all namespaces) and keeps `inference` current until
/// the task is dropped; the reflectors stop with it.
pub async fn follow(client: Client, namespace: Option<String>, inference: Arc<Inference>) -> Result<(), FollowError> {
    check_crds_installed(&client, &namespace).await?;
    let changed = Arc::new(Notify::new());
    let models =
        reflect(namespaced::<FoundationModel>(&client, &namespace), watcher::Config::default(), changed.clone());
    let provisioned =
        reflect(namespaced::<ProvisionedThroughput>(&client, &namespace), watcher::Config::default(), changed.clone());
    let cells = reflect(namespaced::<Cell>(&client, &namespace), watcher::Config::default(), changed.clone());
    let slices = reflect(
        namespaced::<EndpointSlice>(&client, &namespace),
        watcher::Config::default().labels(MODEL_LABEL),
        changed.clone(),
    );
    for store in [
        models.0.clone().wait_until_ready().await.is_ok(),
        provisioned.0.clone().wait_until_ready().await.is_ok(),
        cells.0.clone().wait_until_ready().await.is_ok(),
        slices.0.clone().wait_until_ready().await.is_ok(),
    ] {
        if !store {
            return Err(FollowError::CachesNeverFilled);
        }
    }
    loop {
        let platform = platform_from(&models.0.state(), &provisioned.0.state(), &cells.0.state(), &slices.0.state());
        if let Err(e) = inference.update(platform) {
            tracing::error!(error = %e, "applying the platform from Kubernetes");
        }
        changed.notified().await;
        tokio::time::sleep(DEBOUNCE).await;
    }
}

/// A task that is aborted when its handle is dropped, so the reflectors stop with `follow`.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A reflector whose store stays current for as long as the returned task runs; each change
/// wakes `changed`.
fn reflect<K>(api: Api<K>, config: watcher::Config, changed: Arc<Notify>) -> (Store<K>, AbortOnDrop)
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
    <K as kube::Resource>::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
{
    let (reader, writer) = reflector::store();
    let stream = reflector::reflector(writer, watcher(api, config)).default_backoff().touched_objects();
    let task = tokio::spawn(async move {
        tokio::pin!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(_) => changed.notify_one(),
                Err(e) => {
                    tracing::warn!(error = %e, kind = K::kind(&Default::default()).as_ref(), "watch error; retrying")
                }
            }
        }
    });
    (reader, AbortOnDrop(task))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort};
    use kube::api::ObjectMeta;

    fn model(name: &str, id: &str) -> Arc<FoundationModel> {
        let mut fm: FoundationModel = serde_norway::from_str(&format!(
            "apiVersion: mantle.dev/v1alpha1\nkind: FoundationModel\nmetadata: {{name: {name}, namespace: models}}\nspec:\n  modelId: {id}\n  provider: p\n  modality: TEXT\n  source: {{uri: 's3://b/m.gguf', format: gguf}}\n  contextLength: 2048\n"
        ))
        .unwrap();
        fm.metadata.namespace = Some("models".into());
        Arc::new(fm)
    }

    fn slice(model: &str, labels: &[(&str, &str)], endpoints: Vec<Endpoint>) -> Arc<EndpointSlice> {
        let mut all: std::collections::BTreeMap<String, String> =
            labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        all.insert(MODEL_LABEL.into(), model.into());
        Arc::new(EndpointSlice {
            metadata: ObjectMeta {
                name: Some(format!("{model}-x")),
                namespace: Some("models".into()),
                labels: Some(all),
                ..Default::default()
            },
            address_type: "IPv4".into(),
            endpoints,
            ports: Some(vec![
                EndpointPort { name: Some("http".into()), port: Some(9090), ..Default::default() },
                EndpointPort { name: Some("grpc".into()), port: Some(50051), ..Default::default() },
            ]),
        })
    }

    fn endpoint(ip: &str, ready: Option<bool>) -> Endpoint {
        Endpoint {
            addresses: vec![ip.into()],
            conditions: Some(EndpointConditions { ready, ..Default::default() }),
            zone: Some("zone-a".into()),
            ..Default::default()
        }
    }

    #[test]
    fn ready_endpoints_of_labelled_slices_become_runners() {
        let models = [model("smollm2", "huggingfacetb.smollm2-135m-instruct-v1:0")];
        let slices = [
            slice(
                "smollm2",
                &[(CELL_LABEL, "cell-a")],
                vec![endpoint("10.0.0.2", Some(true)), endpoint("10.0.0.3", Some(false))],
            ),
            slice("smollm2", &[(POOL_LABEL, "analytics")], vec![endpoint("fd00::7", None)]),
            slice("unknown-model", &[], vec![endpoint("10.0.0.9", Some(true))]),
        ];
        let platform = platform_from(&models, &[], &[], &slices);
        let runners: Vec<(&str, Option<&str>, Option<&str>)> =
            platform.runners.iter().map(|r| (r.address.as_str(), r.pool.as_deref(), r.cell.as_deref())).collect();
        assert_eq!(
            runners,
            [
                ("http://10.0.0.2:50051", None, Some("cell-a")),
                ("http://[fd00::7]:50051", Some("analytics"), Some("zone-a"))
            ]
        );
        assert!(platform.runners.iter().all(|r| r.model == "huggingfacetb.smollm2-135m-instruct-v1:0"));
        assert_eq!(platform.models.len(), 1);
    }
}
