//! `tetherd`: see the crate documentation of `runtime_appliance`.

use std::process::ExitCode;

use clap::Parser;
use runtime_appliance::{cli, client};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let filter = EnvFilter::try_from_env("TETHERD_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    client::run(cli.command)
}
