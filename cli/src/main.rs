//! `mantle`: one command for everything a user runs by hand.
//!
//! - `mantle validate [PATH...]` reads Mantle manifests (files or directories; `examples/` by
//!   default) and checks each against the same invariants the operator enforces.
//! - `mantle crdgen [--check]` writes the CRD YAML generated from the Rust types, or checks that
//!   the checked-in copies are current.
//! - `mantle render [PATH...]` prints, as multi-document YAML, every object the operator would
//!   create for the manifests (`examples/` by default), for review and GitOps diffs.
//! - `mantle dev` runs the platform on this machine: a runner per FoundationModel in `examples/`
//!   and the router on 127.0.0.1:8080.
//! - `mantle runner serve|fetch …` is the model runner (what `mantle dev` starts per model).

mod dev;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use mantle_crds::{Manifest, parse_manifests, read_manifest_dir};

#[derive(Parser)]
#[command(name = "mantle", version, about = "Mantle: a self-hosted foundation-model platform for Kubernetes")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Parse and validate Mantle manifests (files or directories of *.yaml).
    Validate {
        #[arg(default_value = "examples")]
        paths: Vec<PathBuf>,
    },
    /// Write the CRD manifests generated from the types (crds/manifests, charts/mantle/crds).
    Crdgen {
        /// Only check that the checked-in files are current; exit 1 if not.
        #[arg(long)]
        check: bool,
        /// The repository root.
        #[arg(long, default_value = ".")]
        root: PathBuf,
    },
    /// Print every object the operator would create for the manifests, as multi-document YAML.
    Render(mantle_operator::cli::RenderArgs),
    /// Run the platform on this machine: one runner per FoundationModel and the router.
    Dev(dev::DevArgs),
    /// The model runner (the same as the `mantle-runner` binary).
    Runner {
        #[command(subcommand)]
        command: mantle_runner::cli::Command,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Runs one command; `Ok(false)` means it ran and found problems.
fn run(cli: Cli) -> anyhow::Result<bool> {
    match cli.command {
        Command::Validate { paths } => validate(&paths),
        Command::Crdgen { check: true, root } => {
            let stale = mantle_crds::check_generated(&root);
            for path in &stale {
                println!("stale: {}", path.display());
            }
            if !stale.is_empty() {
                println!("run `mantle crdgen` and commit the result");
            }
            Ok(stale.is_empty())
        }
        Command::Render(args) => mantle_operator::cli::render(&args, &mut std::io::stdout()),
        Command::Dev(args) => serve(dev::run(args)),
        Command::Runner { command } => serve(mantle_runner::cli::run(command)),
        Command::Crdgen { check: false, root } => {
            for path in mantle_crds::write_generated(&root).context("writing CRD manifests")? {
                println!("wrote {}", path.display());
            }
            Ok(true)
        }
    }
}

/// Runs a long-running command on a tokio runtime, with logging.
fn serve(command: impl Future<Output = anyhow::Result<()>>) -> anyhow::Result<bool> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    tokio::runtime::Runtime::new().context("starting the async runtime")?.block_on(command)?;
    Ok(true)
}

fn validate(paths: &[PathBuf]) -> anyhow::Result<bool> {
    let mut all_valid = true;
    let mut count = 0;
    for path in paths {
        let manifests = match read(path) {
            Ok(m) => m,
            Err(e) => {
                println!("INVALID {e}");
                all_valid = false;
                continue;
            }
        };
        for (file, manifest) in manifests {
            count += 1;
            let what = format!("{} {} ({})", manifest.kind(), manifest.name(), file.display());
            match manifest.validate() {
                Ok(()) => println!("ok      {what}"),
                Err(invalid) => {
                    all_valid = false;
                    println!("INVALID {what}");
                    for error in invalid.0 {
                        println!("        {error}");
                    }
                }
            }
        }
    }
    println!("{count} manifests checked, {}", if all_valid { "all valid" } else { "some invalid" });
    Ok(all_valid)
}

fn read(path: &Path) -> Result<Vec<(PathBuf, Manifest)>, mantle_crds::ManifestError> {
    if path.is_dir() {
        return read_manifest_dir(path);
    }
    let text = std::fs::read_to_string(path)
        .map_err(|source| mantle_crds::ManifestError::Io { path: path.to_path_buf(), source })?;
    Ok(parse_manifests(&text, &path.display().to_string())?.into_iter().map(|m| (path.to_path_buf(), m)).collect())
}
