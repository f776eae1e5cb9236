//! Plan and render at fleet scale: 500 FoundationModels on every one of 3 Cells, with 100
//! ProvisionedThroughputs — the CPU time of one full plan, and of rendering every pool's objects
//! (what each reconcile and `mantle render` do). Five timed rounds after a warm-up; the median
//! and the range are printed. Then the reconcile throughput: every model of the fleet reconciled
//! (plan, apply of its pools' objects, status, Event) against a mocked API server that answers
//! in-process, so what is measured is the operator's own cost per reconcile, not a network.
//!
//! `cargo bench -p mantle-operator --bench plan`

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use http_body_util::BodyExt;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher;
use mantle_operator::controller::{Context, reconcile_model};
use mantle_operator::metrics::Metrics;

use mantle_crds::{Cell, FoundationModel, ProvisionedThroughput};
use mantle_operator::render::RenderOptions;
use mantle_operator::{Desired, Observed, plan, render};

fn fleet(models: usize, cells: usize, reservations: usize) -> Desired {
    let cell = |i: usize| -> Cell {
        serde_norway::from_str(&format!(
            "apiVersion: mantle.dev/v1alpha1\nkind: Cell\nmetadata: {{name: cell-{i}, namespace: models}}\nspec:\n  region: r\n  nodeSelector: {{mantle.dev/cell: cell-{i}}}\n  capacity: {{gpus: 64}}\n"
        ))
        .unwrap()
    };
    let model = |i: usize| -> FoundationModel {
        serde_norway::from_str(&format!(
            "apiVersion: mantle.dev/v1alpha1\nkind: FoundationModel\nmetadata: {{name: model-{i}, namespace: models, uid: u-{i}}}\nspec:\n  modelId: acme.model-{i}-v1:0\n  provider: Acme\n  modality: TEXT\n  source: {{uri: 's3://models/m{i}.gguf', format: gguf, sha256: {:064x}}}\n  contextLength: 8192\n  resources: {{gpus: 1, memory: 32Gi}}\n  replicas: {{min: 2, max: 8}}\n  provisioning: {{tokensPerMinutePerUnit: 100000}}\n",
            i
        ))
        .unwrap()
    };
    let reservation = |i: usize| -> ProvisionedThroughput {
        serde_norway::from_str(&format!(
            "apiVersion: mantle.dev/v1alpha1\nkind: ProvisionedThroughput\nmetadata: {{name: pt-{i}, namespace: models}}\nspec:\n  modelId: acme.model-{}-v1:0\n  modelUnits: 3\n  commitment: ONE_MONTH\n  tenant: tenant-{i}\n",
            i * 5
        ))
        .unwrap()
    };
    Desired {
        models: (0..models).map(model).collect(),
        provisioned: (0..reservations).map(reservation).collect(),
        cells: (0..cells).map(cell).collect(),
    }
}

fn median_and_range(mut samples: Vec<f64>) -> (f64, f64, f64) {
    samples.sort_by(f64::total_cmp);
    (samples[samples.len() / 2], samples[0], samples[samples.len() - 1])
}

fn main() {
    let desired = fleet(500, 3, 100);
    let options = RenderOptions::default();
    let observed = Observed::default();
    // Warm-up.
    let p = plan(&desired, &observed);
    let objects = render(&desired, &p, &options);
    let (mut planning, mut rendering) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        let t = Instant::now();
        let p = plan(&desired, &observed);
        planning.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        let o = render(&desired, &p, &options);
        rendering.push(t.elapsed().as_secs_f64() * 1e3);
        assert_eq!(o.len(), objects.len());
    }
    let yaml = mantle_operator::render::to_yaml(&objects).unwrap();
    let (pm, plo, phi) = median_and_range(planning);
    let (rm, rlo, rhi) = median_and_range(rendering);
    println!(
        "fleet: 500 models × 3 Cells, 100 reservations → {} pools, {} objects ({:.1} MiB of YAML)",
        p.pools.len(),
        objects.len(),
        yaml.len() as f64 / (1 << 20) as f64
    );
    println!("plan:   median {pm:.2} ms (range {plo:.2}–{phi:.2}) over 5 rounds");
    println!("render: median {rm:.2} ms (range {rlo:.2}–{rhi:.2}) over 5 rounds");
    reconcile_throughput(desired);
}

fn store<K: kube::Resource<DynamicType = ()> + Clone>(items: Vec<K>) -> Store<K> {
    let (store, mut writer) = reflector::store();
    writer.apply_watcher_event(&watcher::Event::Init);
    for item in items {
        writer.apply_watcher_event(&watcher::Event::InitApply(item));
    }
    writer.apply_watcher_event(&watcher::Event::InitDone);
    store
}

/// An API server in memory: an apply echoes its body; a status apply answers the resource with
/// that status (as the real one does); anything else (Events) echoes.
fn mocked_api(
    models: Arc<std::collections::HashMap<String, serde_json::Value>>,
) -> impl tower::Service<
    axum::http::Request<kube::client::Body>,
    Response = axum::http::Response<axum::body::Body>,
    Error = Infallible,
    Future = impl Send,
> + Send
+ Clone {
    tower::service_fn(move |request: axum::http::Request<kube::client::Body>| {
        let models = models.clone();
        async move {
            let path = request.uri().path().to_string();
            let bytes = request.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            let body: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
            let answer = match path.strip_suffix("/status") {
                Some(object) => {
                    let name = object.rsplit('/').next().unwrap_or_default();
                    let mut model = models.get(name).cloned().unwrap_or_default();
                    model["status"] = body["status"].clone();
                    model
                }
                None => body,
            };
            Ok(axum::http::Response::new(axum::body::Body::from(answer.to_string())))
        }
    })
}

/// Reconciles every model of the fleet, 5 rounds after a warm-up, on one thread at a time (the
/// controller runs reconciles concurrently; this is the cost of each).
fn reconcile_throughput(desired: Desired) {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async move {
        let by_name = desired
            .models
            .iter()
            .map(|m| (m.metadata.name.clone().unwrap(), serde_json::to_value(m).unwrap()))
            .collect();
        let client = kube::Client::new(mocked_api(Arc::new(by_name)), "models");
        let recorder = Recorder::new(client.clone(), Reporter { controller: "mantle-operator".into(), instance: None });
        let ctx = Arc::new(Context {
            client,
            models: store(desired.models.clone()),
            provisioned: store(desired.provisioned.clone()),
            cells: store(desired.cells.clone()),
            deployments: store(Vec::new()),
            daemonsets: store(Vec::new()),
            nodes: store(Vec::new()),
            batch_jobs: store(Vec::new()),
            jobs: store(Vec::new()),
            options: RenderOptions::default(),
            batch: Default::default(),
            recorder,
            metrics: Metrics::new(),
            failures: Default::default(),
            demand: Default::default(),
            autoscaler: Default::default(),
        });
        let models: Vec<Arc<FoundationModel>> = desired.models.into_iter().map(Arc::new).collect();
        let mut rates = Vec::new();
        for round in 0..6 {
            let t = Instant::now();
            for model in &models {
                reconcile_model(model.clone(), ctx.clone()).await.expect("reconcile against the mocked API");
            }
            // Round 0 warms up.
            if round > 0 {
                rates.push(models.len() as f64 / t.elapsed().as_secs_f64());
            }
        }
        let (m, lo, hi) = median_and_range(rates);
        println!(
            "reconcile (FoundationModel, mocked API): median {m:.0} reconciles/s (range {lo:.0}–{hi:.0}) over 5 rounds of {}",
            models.len()
        );
    });
}
