//! The runners behind each model: a gRPC client per runner and a task per runner that follows its
//! Health stream, so placement and admission always see live load, and knows what the runner
//! serves (its Info: context length, embedding width).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mantle_proto::auth::SendToken;
use mantle_proto::runner_client::RunnerClient;
use mantle_proto::{HealthRequest, HealthSignal, InfoRequest, InfoResponse, LoadState};
use serde::Deserialize;
use tokio_stream::StreamExt;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::error::SetupError;
use crate::placement::RunnerView;

/// A runner is ready while its Health stream has spoken within this long.
const HEALTH_FRESH: Duration = Duration::from_secs(1);

/// Where a runner is and what it serves.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RunnerSpec {
    /// The model id it serves.
    pub model: String,
    /// Its gRPC address, `http://host:port`.
    pub address: String,
    /// The tenant whose provisioned throughput it is dedicated to.
    #[serde(default)]
    pub pool: Option<String>,
    /// The Cell it runs in.
    #[serde(default)]
    pub cell: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RunnersFile {
    runners: Vec<RunnerSpec>,
}

/// Reads a static runners file (local mode): `runners: [{model, address, pool?, cell?}]`.
pub fn read_runners_file(path: &Path) -> Result<Vec<RunnerSpec>, SetupError> {
    let fail = |message: String| SetupError::RunnersFile { path: path.display().to_string(), message };
    let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
    let file: RunnersFile = serde_norway::from_str(&text).map_err(|e| fail(e.to_string()))?;
    Ok(file.runners)
}

#[derive(Default)]
struct Live {
    /// What the runner said it serves, asked each time its Health stream (re)connects.
    info: Option<InfoResponse>,
    signal: Option<HealthSignal>,
    at: Option<Instant>,
    error: Option<String>,
}

/// A runner client: every call carries the router's token.
pub type Client = RunnerClient<InterceptedService<Channel, SendToken>>;

/// One runner: its client, the router's in-flight count on it, and its latest Health signal.
pub struct RunnerHandle {
    pub spec: RunnerSpec,
    pub client: Client,
    in_flight: AtomicU32,
    live: Mutex<Live>,
    watcher: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl RunnerHandle {
    pub fn connect(spec: RunnerSpec, token: SendToken) -> Result<Arc<Self>, SetupError> {
        let endpoint = Endpoint::from_shared(spec.address.clone())
            .map_err(|source| SetupError::RunnerAddress { address: spec.address.clone(), source })?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10));
        let client = RunnerClient::with_interceptor(endpoint.connect_lazy(), token);
        let handle = Arc::new(RunnerHandle {
            spec,
            client,
            in_flight: AtomicU32::new(0),
            live: Mutex::new(Live::default()),
            watcher: Mutex::new(None),
        });
        let task = tokio::spawn(handle.clone().watch_health());
        *handle.watcher.lock().unwrap_or_else(|e| e.into_inner()) = Some(task);
        Ok(handle)
    }

    /// Stops following the runner's Health stream.
    pub fn stop(&self) {
        if let Some(task) = self.watcher.lock().unwrap_or_else(|e| e.into_inner()).take() {
            task.abort();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Live> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The latest health state and whether it is fresh enough to route to.
    pub fn state(&self) -> (LoadState, bool) {
        let live = self.lock();
        let fresh = live.at.is_some_and(|at| at.elapsed() <= HEALTH_FRESH);
        let state = live.signal.as_ref().map_or(LoadState::Unspecified, |s| s.state());
        (state, fresh && !matches!(state, LoadState::Critical | LoadState::Unspecified))
    }

    pub fn signal(&self) -> Option<HealthSignal> {
        self.lock().signal.clone()
    }

    /// What the runner serves, once it has said.
    pub fn info(&self) -> Option<InfoResponse> {
        self.lock().info.clone()
    }

    pub fn last_error(&self) -> Option<String> {
        self.lock().error.clone()
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Counts a request on this runner until the guard drops.
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// Placement's view: load = in-flight + the runner's queue, doubled under THROTTLE.
    pub fn view(&self) -> RunnerView<'_> {
        let (state, ready) = self.state();
        let queued = self.lock().signal.as_ref().map_or(0, |s| s.queue_depth) as f64;
        let mut load = self.in_flight() as f64 + queued;
        if state == LoadState::Throttle {
            load *= 2.0;
        }
        RunnerView {
            id: &self.spec.address,
            ready,
            pool: self.spec.pool.as_deref(),
            cell: self.spec.cell.as_deref(),
            // The Cell's shard size is the request path's to fill in from the Cells it knows.
            cell_shard: 0,
            load,
        }
    }

    /// Follows the runner's Health stream for as long as the task runs, reconnecting with backoff.
    async fn watch_health(self: Arc<Self>) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let mut client = self.client.clone();
            match client.health(HealthRequest {}).await {
                Ok(response) => {
                    // A runner that restarted may serve another build of the model: ask again.
                    match client.info(InfoRequest {}).await {
                        Ok(info) => self.lock().info = Some(info.into_inner()),
                        Err(status) => {
                            tracing::warn!(runner = %self.spec.address, error = %status.message(), "the runner did not say what it serves")
                        }
                    }
                    let mut stream = response.into_inner();
                    while let Some(item) = stream.next().await {
                        match item {
                            Ok(signal) => {
                                let mut live = self.lock();
                                live.signal = Some(signal);
                                live.at = Some(Instant::now());
                                live.error = None;
                                backoff = Duration::from_millis(100);
                            }
                            Err(status) => {
                                self.lock().error = Some(status.message().to_string());
                                break;
                            }
                        }
                    }
                }
                Err(status) => self.lock().error = Some(status.message().to_string()),
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }
}

/// Decrements a runner's in-flight count when dropped.
pub struct InFlight(Arc<RunnerHandle>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Every runner, by model id.
#[derive(Default, Clone)]
pub struct Runners {
    by_model: BTreeMap<String, Vec<Arc<RunnerHandle>>>,
    /// What the router presents to every runner.
    token: SendToken,
}

impl Runners {
    /// No runners yet; those added later are called with `token`.
    pub fn new(token: SendToken) -> Self {
        Runners { by_model: BTreeMap::new(), token }
    }

    /// Connects to every runner (lazily) and starts following its health.
    pub fn start(specs: Vec<RunnerSpec>) -> Result<Self, SetupError> {
        Runners::default().update(specs)
    }

    /// The runners `specs` describe: the ones already known keep their connection, health and
    /// in-flight count; new ones are connected; the rest stop being watched.
    pub fn update(&self, specs: Vec<RunnerSpec>) -> Result<Self, SetupError> {
        let mut old: Vec<Arc<RunnerHandle>> = self.by_model.values().flatten().cloned().collect();
        let mut by_model: BTreeMap<String, Vec<Arc<RunnerHandle>>> = BTreeMap::new();
        for spec in specs {
            let handle = match old.iter().position(|h| h.spec == spec) {
                Some(i) => old.swap_remove(i),
                None => RunnerHandle::connect(spec, self.token.clone())?,
            };
            by_model.entry(handle.spec.model.clone()).or_default().push(handle);
        }
        for gone in old {
            gone.stop();
        }
        Ok(Runners { by_model, token: self.token.clone() })
    }

    pub fn for_model(&self, model_id: &str) -> &[Arc<RunnerHandle>] {
        self.by_model.get(model_id).map_or(&[], Vec::as_slice)
    }

    /// The width of the model's embeddings, as its runners report it (none until one has said).
    pub fn embedding_dimensions(&self, model_id: &str) -> Option<u32> {
        self.for_model(model_id).iter().filter_map(|r| r.info()).map(|i| i.embedding_dimensions).find(|&d| d > 0)
    }

    /// Whether the model has at least one ready runner.
    pub fn ready(&self, model_id: &str) -> bool {
        self.for_model(model_id).iter().any(|r| r.state().1)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &Vec<Arc<RunnerHandle>>)> {
        self.by_model.iter()
    }

    /// Stops following every runner's health (the router is shutting down).
    pub fn stop(&self) {
        for handle in self.by_model.values().flatten() {
            handle.stop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn updates_keep_known_runners_and_drop_the_rest() {
        let spec = |port: u16| RunnerSpec {
            model: "a.b-v1:0".into(),
            address: format!("http://127.0.0.1:{port}"),
            pool: None,
            cell: None,
        };
        let first = Runners::start(vec![spec(1), spec(2)]).unwrap();
        let kept = first.for_model("a.b-v1:0")[1].clone();
        let _guard = kept.begin();
        let second = first.update(vec![spec(2), spec(3)]).unwrap();
        let now: Vec<&str> = second.for_model("a.b-v1:0").iter().map(|h| h.spec.address.as_str()).collect();
        assert_eq!(now, ["http://127.0.0.1:2", "http://127.0.0.1:3"]);
        assert!(Arc::ptr_eq(&second.for_model("a.b-v1:0")[0], &kept), "a known runner keeps its handle");
        assert_eq!(second.for_model("a.b-v1:0")[0].in_flight(), 1);
        let removed = &first.for_model("a.b-v1:0")[0];
        assert!(removed.watcher.lock().unwrap().is_none(), "a removed runner is no longer watched");
        second.stop();
    }

    #[test]
    fn runners_files_parse_and_reject_unknown_fields() {
        let dir = std::env::temp_dir().join(format!("mantle-runners-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("runners.yaml");
        std::fs::write(&path, "runners:\n  - {model: a.b-v1:0, address: 'http://127.0.0.1:1', cell: cell-a}\n")
            .unwrap();
        let specs = read_runners_file(&path).unwrap();
        assert_eq!(specs[0].cell.as_deref(), Some("cell-a"));
        std::fs::write(&path, "runners:\n  - {model: a, address: b, port: 3}\n").unwrap();
        assert!(read_runners_file(&path).unwrap_err().to_string().contains("unknown field"));
        std::fs::remove_dir_all(dir).ok();
    }
}
