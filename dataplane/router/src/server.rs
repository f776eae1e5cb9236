//! Starting the router: what it serves (the platform's manifests and its runners), how
//! (listeners, limits, authentication, metering), and the running server.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use mantle_crds::{Cell, FoundationModel, Manifest, ProvisionedThroughput};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::api::{self, AppState, Limits};
use crate::auth::Auth;
use crate::batch::BatchJobs;
use crate::error::SetupError;
use crate::inference::{Inference, PathConfig};
use crate::listener::{self, ConnectionLimits, TlsFiles};
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
    /// The admin listener: `/metrics` (never on the public port) and the probes.
    pub admin_listen: Option<SocketAddr>,
    /// HTTPS on the public listener.
    pub tls: Option<TlsFiles>,
    /// What a request may contain, and how long it may take.
    pub limits: Limits,
    /// What a connection may do.
    pub connections: ConnectionLimits,
    pub auth: AuthConfig,
    /// The JSONL metering file; `None` keeps no records.
    pub metering: Option<PathBuf>,
    /// The size at which the metering file is rotated (to `<file>.1`).
    pub metering_max_bytes: u64,
    pub path: PathConfig,
    /// Where batch jobs live (the bedrock batch API); `None` serves none.
    pub batch_jobs: Option<Arc<dyn BatchJobs>>,
    /// The credential batch workers present (`x-mantle-batch-token`).
    pub batch_token: Option<String>,
}

impl RouterConfig {
    pub fn local(listen: SocketAddr) -> Self {
        RouterConfig {
            listen,
            admin_listen: None,
            tls: None,
            limits: Limits::default(),
            connections: ConnectionLimits::default(),
            auth: AuthConfig::Off,
            metering: None,
            metering_max_bytes: 256 << 20,
            path: PathConfig::default(),
            batch_jobs: None,
            batch_token: None,
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
    pub fn from_manifest_dir(dir: &Path) -> Result<Self, SetupError> {
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
    /// The admin listener's address (`/metrics`).
    pub admin_addr: Option<SocketAddr>,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
    admin: Option<JoinHandle<()>>,
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
        if let Some(admin) = self.admin.take() {
            admin.abort();
        }
        self.inference.live().runners.stop();
    }
}

/// The router's HTTP apps (public, admin) and request path, without listeners (tests drive the
/// apps directly).
pub fn build_apps(
    config: &RouterConfig,
    platform: Platform,
) -> Result<(axum::Router, axum::Router, Arc<Inference>), SetupError> {
    let metrics = Metrics::new()?;
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
        AuthConfig::File(path) => Auth::from_file(path.clone())?,
    };
    let inference = Inference::new(platform, metrics, meter, config.path.clone())?;
    let state = Arc::new(AppState {
        inference: inference.clone(),
        auth,
        limits: config.limits.clone(),
        batch_jobs: config.batch_jobs.clone(),
        batch_token: config.batch_token.clone(),
    });
    Ok((api::router(state.clone()), api::admin_router(state), inference))
}

/// The public HTTP app and the request path.
pub fn build(config: &RouterConfig, platform: Platform) -> Result<(axum::Router, Arc<Inference>), SetupError> {
    let (app, _, inference) = build_apps(config, platform)?;
    Ok((app, inference))
}

/// Binds the listeners and serves until shut down.
pub async fn start(config: RouterConfig, platform: Platform) -> Result<RunningRouter, SetupError> {
    let (app, admin_app, inference) = build_apps(&config, platform)?;
    let tls = config.tls.as_ref().map(TlsFiles::acceptor).transpose()?;
    let bind = |addr| move |source| SetupError::Bind { addr, source };
    let listener = TcpListener::bind(config.listen).await.map_err(bind(config.listen))?;
    let addr = listener.local_addr().map_err(bind(config.listen))?;
    let (admin_addr, admin) = match config.admin_listen {
        Some(at) => {
            let l = TcpListener::bind(at).await.map_err(bind(at))?;
            let admin_addr = l.local_addr().map_err(bind(at))?;
            let task = tokio::spawn(async move {
                if let Err(e) = axum::serve(l, admin_app).await {
                    tracing::error!(error = %e, "the admin listener failed");
                }
            });
            tracing::info!(addr = %admin_addr, "admin listener (/metrics) listening");
            (Some(admin_addr), Some(task))
        }
        None => (None, None),
    };
    let (tx, rx) = oneshot::channel::<()>();
    let scheme = if tls.is_some() { "https" } else { "http" };
    let task = tokio::spawn(listener::serve(listener, app, tls, config.connections.clone(), rx));
    tracing::info!(%addr, scheme, "router listening");
    Ok(RunningRouter { addr, admin_addr, shutdown: Some(tx), task, admin, inference })
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
