//! `tetherd`: see the crate documentation of `runtime_appliance`.

use std::process::ExitCode;

use clap::Parser;
use runtime_appliance::{cli, client};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    // The demo shares the terminal with the attached shell: only problems show.
    let quiet = matches!(cli.command, cli::Command::Demo(_));
    let filter = EnvFilter::try_from_env("TETHERD_LOG")
        .unwrap_or_else(|_| EnvFilter::new(if quiet { "warn" } else { "info" }));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    client::run(cli.command)
}
