//! `tether --config PATH [--link SPEC]`, or `tether` as a VM's init (PID 1,
//! where `--config` is optional): see the `runtime_guest` crate docs.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// tether: runs a container's processes and serves their console to tetherd.
#[derive(Debug, Parser)]
#[command(name = "tether", version, about)]
struct Args {
    /// The guest configuration (JSON; see docs/CONFIG.md). Required unless
    /// tether is PID 1, which finds it itself (kernel command line
    /// `tether.config=PATH`, fw_cfg `opt/tether/config`, /etc/tether/config.json).
    #[arg(long)]
    config: Option<PathBuf>,
    /// The link to the appliance, overriding the config's `link`
    /// (e.g. `serial:/dev/ttyS0`, `tcp:HOST:PORT`, `tcp-listen:ADDR:PORT`).
    #[arg(long)]
    link: Option<String>,
}

fn main() -> ExitCode {
    if runtime_guest::init::is_pid1() {
        // The kernel may pass init arguments it did not understand: PID 1
        // must not stop at a usage error.
        let args = Args::try_parse().unwrap_or(Args {
            config: None,
            link: None,
        });
        runtime_guest::init::run(runtime_guest::init::Args {
            config: args.config,
            link: args.link,
        });
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TETHER_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    let Some(config_path) = &args.config else {
        eprintln!("tether: --config PATH is required (unless tether runs as PID 1)");
        return ExitCode::from(2);
    };
    let mut config = match runtime_guest::Config::load(config_path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tether: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(spec) = &args.link {
        match spec.parse() {
            Ok(link) => config.link = Some(link),
            Err(e) => {
                eprintln!("tether: --link: {e}");
                return ExitCode::from(2);
            }
        }
    }
    if config.link.is_none() {
        eprintln!("tether: no link: give --link SPEC or set `link` in the config");
        return ExitCode::from(2);
    }
    let code = runtime_guest::run(config);
    ExitCode::from(code.min(255) as u8)
}
