//! The `backhaul-cloud` command line (SPEC.md, "Cloud command line and configuration").

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "backhaul-cloud", version, about = "Cloud ingest for backhaul: stores every batch exactly once")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve MQTT and HTTP ingest.
    Serve {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// A newcomer's first command: the cloud, a private Mosquitto and a few simulated Pis.
    Demo,
}

fn main() -> ExitCode {
    backhaul_shared::logging::init("info");
    let cli = Cli::parse();
    let (what, issue) = match cli.command {
        Command::Serve { .. } => ("serve", 4),
        Command::Demo => ("demo", 5),
    };
    eprintln!("backhaul-cloud {what}: not implemented yet (tracked in issue #{issue})");
    ExitCode::from(2)
}
