//! Starting the router: what it serves (the platform's manifests and its runners), how
//! (listeners, limits, authentication, metering), and the running server.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use mantle_crds::{Cell, FoundationModel, Manifest, ProvisionedThroughput};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::api::{self, AppState};
use crate::auth::Auth;
use crate::inference::{Inference, PathConfig};
use crate::metering::Meter;
use crate::metrics::Metrics;
use crate::runners::RunnerSpec;

/// Who may call.
#[derive(Clone, Debug)]
pub enum AuthConfig {
    /// Everyone (local mode; logged loudly).
    Off,
    /// The keys file (a local file or a mounted Secret's `keys.yaml`).
    File(PathBuf),
}

#[derive(Clone, Debug)]
pub struct RouterConfig {
    pub listen: SocketAddr,
    /// A second listener for `/metrics` only (the main one serves it too).
    pub metrics_listen: Option<SocketAddr>,
    pub max_request_bytes: usize,
    pub auth: AuthConfig,
    /// The JSONL metering file; `None` keeps no records.
    pub metering: Option<PathBuf>,
    /// The size at which the metering file is rotated (to `<file>.1`).
    pub metering_max_bytes: u64,
    pub path: PathConfig,
}

impl RouterConfig {
    pub fn local(listen: SocketAddr) -> Self {
        RouterConfig {
            listen,
            metrics_listen: None,
            max_request_bytes: 10 << 20,
            auth: AuthConfig::Off,
            metering: None,
            metering_max_bytes: 256 << 20,
            path: PathConfig::default(),
        }
    }
}

/// What the router serves: models, provisioned throughput and runners, and the Cells the
/// runners run in (matched by name to a runner's `cell`).
#[derive(Clone, Debug, Default)]
pub struct Platform {
    pub models: Vec<FoundationModel>,
    pub provisioned: Vec<ProvisionedThroughput>,
    pub runners: Vec<RunnerSpec>,
    pub cells: Vec<Cell>,
}

impl Platform {
    /// The FoundationModels, ProvisionedThroughputs and Cells of a manifest directory.
    pub fn from_manifest_dir(dir: &Path) -> anyhow::Result<Self> {
        let mut platform = Platform::default();
        for (_, manifest) in mantle_crds::read_manifest_dir(dir)? {
            match manifest {
                Manifest::FoundationModel(m) => platform.models.push(m),
                Manifest::ProvisionedThroughput(p) => platform.provisioned.push(p),
                Manifest::Cell(c) => platform.cells.push(c),
                _ => {}
            }
        }
        Ok(platform)
    }
}

/// A started router.
pub struct RunningRouter {
    pub addr: SocketAddr,
    pub metrics_addr: Option<SocketAddr>,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
    inference: Arc<Inference>,
}

/// How long in-flight requests get to finish when the router stops.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

impl RunningRouter {
    /// The request path, to update what it serves.
    pub fn inference(&self) -> Arc<Inference> {
        self.inference.clone()
    }

    /// Stops accepting, lets in-flight requests finish (up to [`SHUTDOWN_GRACE`]), and stops
    /// following the runners.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if tokio::time::timeout(SHUTDOWN_GRACE, &mut self.task).await.is_err() {
            tracing::warn!("requests still open after {}s; stopping anyway", SHUTDOWN_GRACE.as_secs());
            self.task.abort();
        }
        self.inference.live().runners.stop();
    }
}

/// The router's HTTP app and request path, without listeners (tests drive the app directly).
pub fn build(config: &RouterConfig, platform: Platform) -> anyhow::Result<(axum::Router, Arc<Inference>)> {
    let metrics = Metrics::new().context("registering metrics")?;
    let meter = match &config.metering {
        Some(path) => Meter::jsonl(path.clone(), config.metering_max_bytes, metrics.metering_dropped.clone()),
        None => Meter::disabled(metrics.metering_dropped.clone()),
    };
    let auth = match &config.auth {
        AuthConfig::Off => {
            tracing::warn!(
                "AUTHENTICATION IS OFF: every request is accepted (local mode only; give a keys file to turn it on)"
            );
            Auth::Off
        }
        AuthConfig::File(path) => {
            Auth::from_file(path.clone()).with_context(|| format!("loading keys from {}", path.display()))?
        }
    };
    let inference = Inference::new(platform, metrics, meter, config.path.clone())?;
    let state = Arc::new(AppState { inference: inference.clone(), auth, max_request_bytes: config.max_request_bytes });
    Ok((api::router(state), inference))
}

/// Binds the listeners and serves until shut down.
pub async fn start(config: RouterConfig, platform: Platform) -> anyhow::Result<RunningRouter> {
    let (app, inference) = build(&config, platform)?;
    let metrics = inference.metrics.clone();
    let listener = TcpListener::bind(config.listen).await.with_context(|| format!("binding {}", config.listen))?;
    let addr = listener.local_addr()?;
    let mut metrics_addr = None;
    let metrics_task = match config.metrics_listen {
        Some(at) => {
            let l = TcpListener::bind(at).await.with_context(|| format!("binding {at}"))?;
            metrics_addr = Some(l.local_addr()?);
            let m = metrics.clone();
            let app = axum::Router::new().route("/metrics", axum::routing::get(move || async move { m.render() }));
            Some(tokio::spawn(async move {
                let _ = axum::serve(l, app).await;
            }))
        }
        None => None,
    };
    let (tx, rx) = oneshot::channel::<()>();
    // Streamed events are written one by one: send each at once.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let task = tokio::spawn(async move {
        let serve = axum::serve(listener, app).with_graceful_shutdown(async {
            let _ = rx.await;
        });
        if let Err(e) = serve.await {
            tracing::error!(error = %e, "the router's listener failed");
        }
        if let Some(t) = metrics_task {
            t.abort();
        }
    });
    tracing::info!(%addr, "router listening");
    Ok(RunningRouter { addr, metrics_addr, shutdown: Some(tx), task, inference })
}

/// Ctrl-C, or SIGTERM (what Kubernetes and `mantle dev` send).
pub async fn shutdown_signal() {
    #[cfg(unix)]
    if let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        return;
    }
    let _ = tokio::signal::ctrl_c().await;
}
