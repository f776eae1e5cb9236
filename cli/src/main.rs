//! `mantle`: one command for everything a user runs by hand.
//!
//! - `mantle validate [PATH...]` reads Mantle manifests (files or directories; `examples/` by
//!   default) and checks each against the same invariants the operator enforces.
//! - `mantle crdgen [--check]` writes the CRD YAML generated from the Rust types, or checks that
//!   the checked-in copies are current.

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
        Command::Crdgen { check: false, root } => {
            for path in mantle_crds::write_generated(&root).context("writing CRD manifests")? {
                println!("wrote {}", path.display());
            }
            Ok(true)
        }
    }
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
