//! `mantle-batch run`: runs one BatchJob (a manifest file) through a router, resuming from what
//! an earlier run of it committed. The pipeline `mantle dev` runs in-process, as a process of its
//! own (a worker pod's command).

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Parser;
use mantle_batch::{Job, Outcome, RouterClient, Runtime, Stores};
use mantle_crds::{BatchJob, Manifest};

#[derive(Parser)]
#[command(name = "mantle-batch", about = "Run a Mantle batch inference job")]
enum Command {
    /// Run a BatchJob manifest to its end.
    Run {
        /// The BatchJob manifest (YAML).
        job: PathBuf,
        /// The router's base URL.
        #[arg(long, env = "MANTLE_ROUTER_URL", default_value = "http://127.0.0.1:8080")]
        router: String,
        /// The router's batch credential.
        #[arg(long, env = "MANTLE_BATCH_TOKEN", default_value = "")]
        token: String,
        /// Records in flight at once.
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
        /// An S3-compatible endpoint for s3:// URIs.
        #[arg(long, env = "MANTLE_S3_ENDPOINT")]
        s3_endpoint: Option<String>,
        /// The output folder (`<output uri>/<job id>`) of the job `spec.reuseFrom` names.
        #[arg(long)]
        reuse_from: Option<String>,
        /// Serve a bucket from a local directory (NAME=DIR; repeatable).
        #[arg(long = "bucket", value_parser = Stores::parse_bucket)]
        buckets: Vec<(String, PathBuf)>,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let Command::Run { job, router, token, concurrency, s3_endpoint, reuse_from, buckets } = Command::parse();
    let text = std::fs::read_to_string(&job).with_context(|| format!("reading {}", job.display()))?;
    let manifests = mantle_crds::parse_manifests(&text, &job.display().to_string())?;
    let [Manifest::BatchJob(object)] = <[Manifest; 1]>::try_from(manifests).map_err(|_| anyhow::anyhow!("x"))? else {
        bail!("{} must hold exactly one BatchJob", job.display());
    };
    let object: BatchJob = object;
    object.validate().map_err(|e| anyhow::anyhow!("{}: {e}", job.display()))?;
    if object.spec.reuse_from.is_some() && reuse_from.is_none() {
        bail!("the job reuses another job's outputs: give --reuse-from with that job's output folder");
    }
    let job = Job { id: object.job_id(), spec: object.spec, reuse_from };
    let rt = Runtime {
        stores: Stores { s3_endpoint, buckets: buckets.into_iter().collect(), mapped_only: false },
        router: RouterClient::new(&router, &token),
        concurrency,
        metrics: None,
    };
    let (progress, _) = tokio::sync::watch::channel(Default::default());
    let (_stop, stopped) = tokio::sync::watch::channel(false);
    let outcome = mantle_batch::run(&job, &rt, &progress, stopped).await?;
    let p = progress.borrow();
    println!(
        "{} {}: {} records, {} ok, {} errors, {} skipped; {} input and {} output tokens",
        job.id,
        if outcome == Outcome::Finished { "finished" } else { "stopped" },
        p.total_records,
        p.success,
        p.error,
        p.skipped,
        p.input_tokens,
        p.output_tokens
    );
    Ok(())
}
