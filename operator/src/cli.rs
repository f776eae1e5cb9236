//! The operator's command line, shared by `mantle-operator` and `mantle render`.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;

use crate::plan::{Desired, Observed, plan};
use crate::render::{RenderOptions, render as render_objects, to_yaml};

#[derive(clap::Args, Debug)]
pub struct RenderArgs {
    /// Manifest files or directories of *.yaml.
    #[arg(default_value = "examples")]
    pub paths: Vec<PathBuf>,
    #[command(flatten)]
    pub pods: PodArgs,
    #[command(flatten)]
    pub batch: BatchArgs,
}

/// How runner pods are built: the operator's own settings (the same for `render` and `run`).
#[derive(clap::Args, Debug, Clone)]
pub struct PodArgs {
    /// The `mantle-runner` image the runner pods use.
    #[arg(long, env = "MANTLE_RUNNER_IMAGE")]
    pub runner_image: Option<String>,
    /// The `mantle-runner` image built with CUDA, for builtin-engine models with GPUs.
    #[arg(long, env = "MANTLE_RUNNER_CUDA_IMAGE")]
    pub runner_cuda_image: Option<String>,
    /// The node directory of the weight cache.
    #[arg(long, default_value = "/var/cache/mantle/weights")]
    pub cache_root: String,
    /// The weight cache's budget on each node, in GiB.
    #[arg(long, default_value_t = 100)]
    pub cache_budget_gib: u64,
    /// The Secret (key `token`) the router's runner token is in, in each namespace with runner
    /// pools; `none` when runners do not authenticate the router.
    #[arg(long, default_value = "mantle-runner-token")]
    pub runner_token_secret: String,
    /// The inference gateway's endpoint picker Service, `SERVICE:PORT`: External-engine models run
    /// from an image then get an InferencePool (inference.networking.k8s.io/v1) of their runner pods, when that
    /// CRD is installed.
    #[arg(long)]
    pub inference_pool_endpoint_picker: Option<crate::render::EndpointPicker>,
}

impl PodArgs {
    pub fn options(&self) -> RenderOptions {
        let defaults = RenderOptions::default();
        RenderOptions {
            runner_image: self.runner_image.clone().unwrap_or(defaults.runner_image),
            runner_cuda_image: self.runner_cuda_image.clone().unwrap_or(defaults.runner_cuda_image),
            cache_root: self.cache_root.clone(),
            cache_budget_gib: self.cache_budget_gib,
            runner_token_secret: (self.runner_token_secret != "none").then(|| self.runner_token_secret.clone()),
            endpoint_picker: self.inference_pool_endpoint_picker.clone(),
        }
    }
}

/// How BatchJobs' worker pods are built.
#[derive(clap::Args, Debug, Clone)]
pub struct BatchArgs {
    /// The image with `mantle-batch`.
    #[arg(long, env = "MANTLE_BATCH_IMAGE")]
    pub batch_image: Option<String>,
    /// The router's URL as worker pods reach it.
    #[arg(long, default_value = "http://mantle-router:8080")]
    pub batch_router_url: String,
    /// The Secret (key `token`) with the router's batch credential, in each BatchJob's namespace.
    #[arg(long, default_value = "mantle-batch-token")]
    pub batch_token_secret: String,
    /// The ServiceAccount worker pods run as, in each BatchJob's namespace.
    #[arg(long, default_value = "mantle-batch")]
    pub batch_service_account: String,
    /// An S3-compatible endpoint for the workers' s3:// URIs (MinIO, Ceph); none for AWS S3.
    #[arg(long)]
    pub batch_s3_endpoint: Option<String>,
    /// The most workers one job gets.
    #[arg(long, default_value_t = 16)]
    pub batch_max_workers: i32,
    /// The region in job ARNs (the router's `--region`).
    #[arg(long, env = "AWS_REGION", default_value = "us-east-1")]
    pub region: String,
}

impl BatchArgs {
    pub fn options(&self) -> crate::batch::BatchOptions {
        let defaults = crate::batch::BatchOptions::default();
        crate::batch::BatchOptions {
            image: self.batch_image.clone().unwrap_or(defaults.image),
            router_url: self.batch_router_url.clone(),
            token_secret: self.batch_token_secret.clone(),
            service_account: self.batch_service_account.clone(),
            s3_endpoint: self.batch_s3_endpoint.clone(),
            max_workers: self.batch_max_workers,
            concurrency: defaults.concurrency,
            region: self.region.clone(),
        }
    }
}

/// Reads the manifests, checks each (the operator acts on none that breaks an invariant), plans
/// and writes every object as YAML to `out`. `Ok(false)`: something could not be planned (each
/// problem goes to stderr; the rest is still rendered).
pub fn render(args: &RenderArgs, out: &mut impl Write) -> anyhow::Result<bool> {
    let mut manifests = Vec::new();
    for path in &args.paths {
        let read = if path.is_dir() {
            mantle_crds::read_manifest_dir(path)?.into_iter().map(|(_, m)| m).collect()
        } else {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            mantle_crds::parse_manifests(&text, &path.display().to_string())?
        };
        for manifest in read {
            manifest.validate().map_err(|invalid| {
                anyhow::anyhow!("{} {} is invalid: {}", manifest.kind(), manifest.name(), invalid)
            })?;
            manifests.push(manifest);
        }
    }
    let batch_jobs: Vec<mantle_crds::BatchJob> = manifests
        .iter()
        .filter_map(|m| match m {
            mantle_crds::Manifest::BatchJob(j) => Some(j.clone()),
            _ => None,
        })
        .collect();
    let desired = Desired::from_manifests(manifests);
    let plan = plan(&desired, &Observed::default());
    let mut objects = render_objects(&desired, &plan, &args.pods.options());
    // Each BatchJob's workers, as the operator starts them (once the job it reuses completed).
    let batch = args.batch.options();
    for job in &batch_jobs {
        let workers = crate::batch::workers(job, &plan, &batch);
        objects.push(crate::render::Object::Job(Box::new(crate::batch::render_batch_job(job, workers, &batch))));
    }
    out.write_all(to_yaml(&objects)?.as_bytes())?;
    for p in &plan.problems {
        eprintln!("{} {}: {} — {}", p.kind, p.name, p.reason, p.message);
    }
    Ok(plan.problems.is_empty())
}
