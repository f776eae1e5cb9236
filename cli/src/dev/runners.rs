//! The local executor of the plan: each replica of each planned pool is a `mantle runner serve`
//! process with the arguments the operator puts in a runner pod. A process that dies is started
//! again with backoff (the router stops sending it traffic as soon as its Health stream breaks);
//! a pool that goes, or whose arguments change, has its processes stopped (and started anew);
//! and every process dies with `mantle dev`, even when that is killed with SIGKILL (the kernel
//! sends it SIGKILL when its parent goes: `PR_SET_PDEATHSIG`). The death signal is tied to the
//! thread that started the process, so processes are started from tokio's worker threads (which
//! live as long as `mantle dev`), never from its blocking pool (whose threads retire when idle).

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mantle_operator::{PoolPlan, RunnerPlacement, runner_args};
use mantle_router::RunnerSpec;
use tokio::process::{Child, Command};
use tokio::sync::oneshot;

/// Restarts wait this long at first, doubling up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A runner that stayed up this long starts its backoff afresh when it dies.
const STABLE: Duration = Duration::from_secs(60);

/// One runner process the plan wants: a replica of a pool.
#[derive(Clone, Debug)]
pub struct Want {
    /// `<pool>#<replica>`.
    pub key: String,
    pub model_id: String,
    pub pool: PoolPlan,
    /// The runner's arguments with `{grpc}` and `{http}` for its listen addresses.
    pub args: Vec<String>,
}

impl Want {
    /// Whether a process started for `other` serves this want as it is: the same model, arguments,
    /// Cell and reservation (a pool's size and bounds do not matter to its processes).
    fn same_process(&self, other: &Want) -> bool {
        self.key == other.key
            && self.model_id == other.model_id
            && self.args == other.args
            && self.pool.cell == other.pool.cell
            && self.pool.dedicated == other.pool.dedicated
    }
}

/// What `mantle dev` needs to know to start runners.
#[derive(Clone, Debug)]
pub struct Launch {
    /// The `mantle` binary (`mantle runner serve …`).
    pub exe: PathBuf,
    pub token_file: PathBuf,
    pub threads: usize,
    pub cache_dir: PathBuf,
}

/// The processes the plan's pools make: `models[pool.model]` is a model that runs here, with its
/// local weights (none for an External endpoint whose GGUF is not on this machine).
pub fn wants(
    pools: &[PoolPlan],
    models: &BTreeMap<String, (mantle_crds::FoundationModel, Option<PathBuf>)>,
    launch: &Launch,
) -> Vec<Want> {
    let mut wants = Vec::new();
    for pool in pools {
        let Some((model, weights)) = models.get(&pool.model) else { continue };
        let placement = RunnerPlacement {
            model: weights.as_ref().map(|w| w.display().to_string()).unwrap_or_default(),
            grpc_listen: "{grpc}".into(),
            http_listen: "{http}".into(),
            threads: launch.threads,
            cache_dir: Some(launch.cache_dir.display().to_string()),
            // Local runners use this machine's CPU, whatever GPUs the model asks of a cluster.
            device: None,
            cache_priority: 0,
        };
        let mut args = runner_args(model, &placement);
        // Locking weights in RAM needs a raised memlock limit that a laptop rarely has.
        args.retain(|a| a != "--pin-weights");
        for replica in 0..pool.replicas.max(0) {
            wants.push(Want {
                key: format!("{}#{replica}", pool.name),
                model_id: model.spec.model_id.clone(),
                pool: pool.clone(),
                args: args.clone(),
            });
        }
    }
    wants
}

/// A supervised process's state, shared with its supervisor task.
#[derive(Debug, Default)]
struct State {
    pid: Option<u32>,
    restarts: u32,
}

/// One supervised runner.
struct Supervised {
    want: Want,
    grpc: SocketAddr,
    http: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

/// Every runner process `mantle dev` runs.
#[derive(Default)]
pub struct Runners {
    running: BTreeMap<String, Supervised>,
}

/// Two distinct free ports (both listeners are held until both are known).
fn free_ports() -> std::io::Result<(SocketAddr, SocketAddr)> {
    let (a, b) = (TcpListener::bind("127.0.0.1:0")?, TcpListener::bind("127.0.0.1:0")?);
    Ok((a.local_addr()?, b.local_addr()?))
}

/// Stops processes side by side (each may take its 5 s to stop).
async fn shut_down_all(processes: Vec<Supervised>) {
    let mut stopping = tokio::task::JoinSet::new();
    for s in processes {
        stopping.spawn(s.shut_down());
    }
    while stopping.join_next().await.is_some() {}
}

impl Runners {
    /// Makes the running processes what `wants` says: stops those no longer wanted (or wanted
    /// with other arguments) and starts the new ones. Returns (started, stopped).
    pub async fn apply(&mut self, wants: &[Want], launch: &Launch) -> std::io::Result<(usize, usize)> {
        let stale: Vec<String> = self
            .running
            .iter()
            .filter(|(_, s)| !wants.iter().any(|w| w.same_process(&s.want)))
            .map(|(key, _)| key.clone())
            .collect();
        let gone: Vec<Supervised> = stale.iter().filter_map(|key| self.running.remove(key)).collect();
        for s in &gone {
            tracing::info!(runner = %s.want.key, model = %s.want.model_id, "stopping runner");
        }
        shut_down_all(gone).await;
        let mut started = 0;
        for want in wants {
            if self.running.contains_key(&want.key) {
                continue;
            }
            let (grpc, http) = free_ports()?;
            let args: Vec<String> = want
                .args
                .iter()
                .map(|a| a.replace("{grpc}", &grpc.to_string()).replace("{http}", &http.to_string()))
                .collect();
            tracing::info!(runner = %want.key, model = %want.model_id, args = %args.join(" "), "starting runner");
            let state = Arc::new(Mutex::new(State::default()));
            let (stop, stopped) = oneshot::channel();
            let task = tokio::spawn(supervise(want.key.clone(), args, launch.clone(), state.clone(), stopped));
            self.running
                .insert(want.key.clone(), Supervised { want: want.clone(), grpc, http, state, stop: Some(stop), task });
            started += 1;
        }
        Ok((started, stale.len()))
    }

    /// What the router routes to: one runner per process.
    pub fn specs(&self) -> Vec<RunnerSpec> {
        self.running
            .values()
            .map(|s| RunnerSpec {
                model: s.want.model_id.clone(),
                address: format!("http://{}", s.grpc),
                pool: s.want.pool.dedicated.as_ref().map(|d| d.tenant.clone()),
                cell: s.want.pool.cell.clone(),
            })
            .collect()
    }

    /// Each process's HTTP address (for `/readyz`), with its key and model id.
    pub fn probes(&self) -> Vec<(String, String, SocketAddr)> {
        self.running.iter().map(|(k, s)| (k.clone(), s.want.model_id.clone(), s.http)).collect()
    }

    /// The pool of a process.
    pub fn pool_of(&self, key: &str) -> Option<&str> {
        self.running.get(key).map(|s| s.want.pool.name.as_str())
    }

    /// Each process's pid (while it runs) and restarts, by key.
    pub fn processes(&self) -> Vec<(String, Option<u32>, u32)> {
        self.running
            .iter()
            .map(|(k, s)| {
                let state = s.state.lock().unwrap_or_else(|e| e.into_inner());
                (k.clone(), state.pid, state.restarts)
            })
            .collect()
    }

    pub fn len(&self) -> usize {
        self.running.len()
    }

    /// Stops every process.
    pub async fn stop_all(&mut self) {
        shut_down_all(std::mem::take(&mut self.running).into_values().collect()).await;
    }
}

impl Supervised {
    async fn shut_down(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), &mut self.task).await;
        self.task.abort();
    }
}

/// Starts the runner; if it dies, starts it again after a backoff, until told to stop.
async fn supervise(
    key: String,
    args: Vec<String>,
    launch: Launch,
    state: Arc<Mutex<State>>,
    mut stop: oneshot::Receiver<()>,
) {
    let mut backoff = FIRST_BACKOFF;
    loop {
        match spawn(&launch, &args) {
            Ok(mut child) => {
                state.lock().unwrap_or_else(|e| e.into_inner()).pid = child.id();
                let up = Instant::now();
                tokio::select! {
                    status = child.wait() => {
                        state.lock().unwrap_or_else(|e| e.into_inner()).pid = None;
                        if up.elapsed() >= STABLE {
                            backoff = FIRST_BACKOFF;
                        }
                        let status = status.map_or_else(|e| e.to_string(), |s| s.to_string());
                        tracing::warn!(runner = %key, %status, "runner exited; starting it again in {}s", backoff.as_secs());
                    }
                    _ = &mut stop => {
                        terminate(&mut child).await;
                        return;
                    }
                }
            }
            Err(e) => {
                tracing::error!(runner = %key, error = %e, "cannot start the runner; trying again in {}s", backoff.as_secs())
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = &mut stop => return,
        }
        state.lock().unwrap_or_else(|e| e.into_inner()).restarts += 1;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

fn spawn(launch: &Launch, args: &[String]) -> std::io::Result<Child> {
    let mut command = Command::new(&launch.exe);
    command.arg("runner").args(args).env("MANTLE_RUNNER_TOKEN_FILE", &launch.token_file).kill_on_drop(true);
    #[cfg(target_os = "linux")]
    {
        let parent = std::process::id();
        // SAFETY: between fork and exec only async-signal-safe calls are made (prctl, getppid,
        // _exit).
        unsafe {
            command.pre_exec(move || {
                // The kernel kills the runner when the thread that started it (a tokio worker,
                // which lives as long as `mantle dev`) goes, however `mantle dev` dies.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // `mantle dev` died before the line above took effect.
                if libc::getppid() as u32 != parent {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
    }
    command.spawn()
}

/// SIGTERM, so the runner shuts down cleanly; SIGKILL after 5 s.
async fn terminate(child: &mut Child) {
    if let Some(pid) = child.id() {
        // SAFETY: a plain kill(2) on our own child's pid.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGTERM);
        }
    }
    if tokio::time::timeout(Duration::from_secs(5), child.wait()).await.is_err() {
        let _ = child.kill().await;
    }
}
