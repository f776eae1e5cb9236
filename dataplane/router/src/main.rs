//! `mantle-router`: the inference API in front of the model runners.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use mantle_router::inference::PathConfig;
use mantle_router::{AuthConfig, ConnectionLimits, Limits, Platform, RouterConfig, TlsFiles};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "mantle-router", version, about = "Mantle's Bedrock- and OpenAI-compatible inference API")]
struct Args {
    /// HTTP listen address of the API.
    #[arg(long, default_value = "0.0.0.0:8080")]
    listen: SocketAddr,
    /// The admin listener: /metrics (never served on the public port), /healthz, /readyz.
    #[arg(long, alias = "metrics-listen", default_value = "127.0.0.1:9091")]
    admin_listen: SocketAddr,
    /// Serve HTTPS with this PEM certificate chain (a kubernetes.io/tls Secret's tls.crt);
    /// reloaded when it changes.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The certificate's PEM private key (tls.key).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// The most bytes a request body may have.
    #[arg(long, default_value_t = 10 << 20)]
    max_request_bytes: usize,
    /// The most bytes a request's headers may have together.
    #[arg(long, default_value_t = 64 << 10)]
    max_header_bytes: usize,
    /// Seconds a request's body may take to arrive.
    #[arg(long, default_value_t = 30)]
    body_timeout_s: u64,
    /// Seconds a response may take to start (streams then run on).
    #[arg(long, default_value_t = 600)]
    request_timeout_s: u64,
    /// Seconds a connection may take to send a request's headers; also how long an idle
    /// keep-alive connection stays open.
    #[arg(long, default_value_t = 30)]
    header_read_timeout_s: u64,
    /// A file holding the token sent to every runner (`authorization: Bearer <token>`), the
    /// same Secret the runners read with --auth-token-file.
    #[arg(long, env = "MANTLE_RUNNER_TOKEN_FILE")]
    runner_token_file: Option<PathBuf>,
    /// A file holding the batch workers' credential (`x-mantle-batch-token`): requests that
    /// present it are batch work (lowest priority, no tenant token buckets).
    #[arg(long, env = "MANTLE_BATCH_TOKEN_FILE")]
    batch_token_file: Option<PathBuf>,
    /// Open client connections at once.
    #[arg(long, default_value_t = 4096)]
    max_connections: usize,
    /// The keys file mapping SigV4 access keys and API keys to tenants (in a cluster: the
    /// mounted `keys.yaml` of the router's Secret).
    #[arg(long, conflicts_with = "no_auth", required_unless_present = "no_auth")]
    auth_file: Option<PathBuf>,
    /// Accept every request without authentication (trusted networks only).
    #[arg(long)]
    no_auth: bool,
    /// Serve the FoundationModels and ProvisionedThroughputs in the cluster, with runners found
    /// through their Services' EndpointSlices (in a pod: the in-cluster config).
    #[arg(long, conflicts_with_all = ["manifests", "runners"])]
    kubernetes: bool,
    /// With --kubernetes: watch this namespace only (default: all namespaces).
    #[arg(long, requires = "kubernetes")]
    namespace: Option<String>,
    /// With --kubernetes: the namespace of BatchJobs created through CreateModelInvocationJob
    /// (default: --namespace, else the namespace of the FoundationModel the job names).
    #[arg(long, requires = "kubernetes")]
    batch_namespace: Option<String>,
    /// A directory of Mantle manifests: the FoundationModels served and ProvisionedThroughputs.
    #[arg(long, required_unless_present = "kubernetes", requires = "runners")]
    manifests: Option<PathBuf>,
    /// The runners: `runners: [{model, address, pool?, cell?}]`.
    #[arg(long, required_unless_present = "kubernetes", requires = "manifests")]
    runners: Option<PathBuf>,
    /// Append one JSON line per request here.
    #[arg(long)]
    metering: Option<PathBuf>,
    /// Rotate the metering file (to `<file>.1`) when it reaches this size.
    #[arg(long, default_value_t = 256)]
    metering_max_mib: u64,
    /// The region in ARNs.
    #[arg(long, default_value = "us-east-1")]
    region: String,
    /// Concurrent requests sent to one healthy runner.
    #[arg(long, default_value_t = 16)]
    slots_per_runner: usize,
    /// Refuse (429) a request whose estimated queue wait is longer than this, so accepted
    /// requests keep their latency under overload (0: bound the queue by length only).
    #[arg(long, default_value_t = 0)]
    max_queue_wait_ms: u64,
    /// Let a standing queue grow to its length bound under overload instead of refusing (429)
    /// the requests that would only wait in it.
    #[arg(long)]
    no_overload_control: bool,
    /// How long a request to a model with `replicas.min: 0` and no ready runner waits for one to
    /// start before ModelNotReadyException (429; the AWS SDKs retry it).
    #[arg(long, default_value_t = 120)]
    cold_start_hold_s: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let args = Args::parse();
    let platform = match (&args.manifests, &args.runners) {
        (Some(manifests), Some(runners)) => {
            let mut platform = Platform::from_manifest_dir(manifests)?;
            platform.runners = mantle_router::runners::read_runners_file(runners)?;
            platform
        }
        // Filled from the cluster once the caches are warm.
        _ => Platform::default(),
    };
    let batch_token = match &args.batch_token_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("reading the batch token {}: {e}", path.display()))?
                .trim()
                .to_string(),
        ),
        None => None,
    };
    // In a cluster the jobs are BatchJob objects, run by the operator.
    let client = match args.kubernetes {
        true => Some(kube::Client::try_default().await.context("connecting to the Kubernetes API")?),
        false => None,
    };
    let batch_jobs = client.clone().map(|c| {
        Arc::new(mantle_router::batch::KubernetesBatchJobs::new(
            c,
            args.batch_namespace.clone().or(args.namespace.clone()),
        )) as Arc<dyn mantle_router::batch::BatchJobs>
    });
    let config = RouterConfig {
        batch_jobs,
        batch_token,
        listen: args.listen,
        admin_listen: Some(args.admin_listen),
        tls: match (args.tls_cert, args.tls_key) {
            (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
            _ => None,
        },
        limits: Limits {
            max_request_bytes: args.max_request_bytes,
            max_header_bytes: args.max_header_bytes,
            body_timeout: Duration::from_secs(args.body_timeout_s),
            request_timeout: Duration::from_secs(args.request_timeout_s),
        },
        connections: ConnectionLimits {
            max_connections: args.max_connections,
            header_read_timeout: Duration::from_secs(args.header_read_timeout_s),
            ..ConnectionLimits::default()
        },
        auth: match args.auth_file {
            Some(path) => AuthConfig::File(path),
            None => AuthConfig::Off,
        },
        metering: args.metering,
        metering_max_bytes: args.metering_max_mib << 20,
        path: {
            let mut path =
                PathConfig { region: args.region, slots_per_runner: args.slots_per_runner, ..PathConfig::default() };
            path.queue.max_queue_wait =
                (args.max_queue_wait_ms > 0).then(|| std::time::Duration::from_millis(args.max_queue_wait_ms));
            if args.no_overload_control {
                path.queue.overload = None;
            }
            path.cold_start_hold = std::time::Duration::from_secs(args.cold_start_hold_s);
            path.runner_token = args
                .runner_token_file
                .as_deref()
                .map(mantle_proto::auth::Token::from_file)
                .transpose()
                .context("loading the runner token")?;
            path
        },
    };
    let router = mantle_router::start(config, platform).await.context("starting the router")?;
    let discovery = if let Some(client) = client {
        let inference = router.inference();
        Some(tokio::spawn(mantle_router::kubernetes::follow(client, args.namespace, inference)))
    } else {
        None
    };
    // Serve until told to stop — or until following the cluster fails, which ends the process
    // with the reason (a missing CRD, say) so that it shows in the pod's status and logs.
    let followed = async {
        match discovery {
            Some(task) => task.await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = mantle_router::server::shutdown_signal() => {}
        result = followed => {
            router.shutdown().await;
            return match result {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(anyhow::Error::new(e).context("following the cluster")),
                Err(e) => Err(anyhow::anyhow!("following the cluster: {e}")),
            };
        }
    }
    tracing::info!("shutting down");
    router.shutdown().await;
    Ok(())
}
