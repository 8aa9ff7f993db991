//! `tether --config PATH [--link SPEC]`, or `tether` as a VM's init (PID 1,
//! where `--config` is optional): see the `runtime_guest` crate docs.

use std::process::ExitCode;

use runtime_guest::cli::{self, Command};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

fn main() -> ExitCode {
    if runtime_guest::init::is_pid1() {
        // The kernel may pass init arguments it did not understand: PID 1
        // must not stop at a usage error.
        let args = match cli::parse(std::env::args_os().skip(1)) {
            Ok(Command::Run(args)) => args,
            _ => cli::Args::default(),
        };
        runtime_guest::init::run(runtime_guest::init::Args {
            config: args.config,
            link: args.link,
        });
    }
    let args = match cli::parse(std::env::args_os().skip(1)) {
        Ok(Command::Run(args)) => args,
        Ok(Command::Help) => {
            print!("{}", cli::HELP);
            return ExitCode::SUCCESS;
        }
        Ok(Command::Version) => {
            println!("tether {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .finish()
        .with(runtime_guest::log_filter())
        .init();
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
