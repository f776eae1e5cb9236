//! `mantle-operator`: reconciles the `mantle.dev` resources into runner pools.
//!
//! - `mantle-operator [--leader-election-namespace NS] [--watch-namespace NS]…` runs the
//!   controllers (what the chart's Deployment runs).
//! - `mantle-operator render [PATH...]` prints every object the operator would create for the
//!   manifests, as multi-document YAML (the same as `mantle render`).

use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "mantle-operator",
    version,
    about = "Reconciles the mantle.dev resources into runner pools",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: mantle_operator::run::RunArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Print every object the operator would create for the manifests, as multi-document YAML.
    Render(mantle_operator::cli::RenderArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Render(args)) => mantle_operator::cli::render(&args, &mut std::io::stdout()),
        None => run(cli.run),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(args: mantle_operator::run::RunArgs) -> anyhow::Result<bool> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(mantle_operator::run::run(args))?;
    Ok(true)
}
