//! `mantle-operator`: reconciles the `mantle.dev` resources into runner pools.
//!
//! - `mantle-operator render [PATH...]` prints every object the operator would create for the
//!   manifests, as multi-document YAML (the same as `mantle render`).

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "mantle-operator", version, about = "Reconciles the mantle.dev resources into runner pools")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print every object the operator would create for the manifests, as multi-document YAML.
    Render(mantle_operator::cli::RenderArgs),
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Render(args) => mantle_operator::cli::render(&args, &mut std::io::stdout()),
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
