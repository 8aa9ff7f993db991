//! `tether`, the guest runtime: runs a container's processes and serves their
//! console to the appliance as an SSH server over a link (a serial port whose
//! other end connects to `tetherd`, or TCP, vsock, unix).
//!
//! Two modes share one core ([`serve_guest`]: the reaper, signal forwarding,
//! the configured sessions and the links, until the primary session exits):
//! - ordinary ([`run`], `tether --config PATH`): a child subreaper among other
//!   processes; OS configuration in the config is skipped with a log line.
//! - PID 1 ([`init::run`], when `getpid() == 1`): the VM's init. It mounts
//!   the kernel filesystems, listens for device events, loads modules, finds
//!   its config (`--config`, `tether.config=` on the kernel command line,
//!   fw_cfg `opt/tether/config`, `/etc/tether/config.json`), configures the
//!   OS (modules, limits, names, network, sysctls, root filesystem, mounts,
//!   secrets, /etc/hosts, resolv.conf), serves, and powers off when the
//!   primary exits. It never returns: a fatal error goes to the console and
//!   the link, then the VM powers off.

pub mod cli;
pub mod config;
pub mod fork;
pub mod guest;
pub mod init;
pub mod linkspec;
pub mod process;
pub mod reaper;
pub mod serve;
pub mod trim;

use std::rc::Rc;
use std::time::{Duration, Instant};

use futures_lite::{StreamExt, future};
use smol::{LocalExecutor, Timer};
use tracing::{error, info, warn};

pub use config::{Config, ConfigError};
use guest::Guest;

/// How long a link has to deliver a fatal error as an SSH DISCONNECT.
const FATAL_DELIVERY: Duration = Duration::from_secs(2);

/// Which logs are written: `TETHER_LOG` as a comma-separated list of `LEVEL`
/// and `TARGET=LEVEL` (e.g. `debug` or `info,runtime_guest::serve=trace`);
/// `info` when unset or not understood. (No span or field filters: that
/// needs tracing-subscriber's regex-based `EnvFilter`, too big for the guest.)
pub fn log_filter() -> tracing_subscriber::filter::Targets {
    parse_log_filter(std::env::var("TETHER_LOG").ok().as_deref())
}

fn parse_log_filter(spec: Option<&str>) -> tracing_subscriber::filter::Targets {
    use tracing_subscriber::filter::{LevelFilter, Targets};
    spec.and_then(|s| s.parse::<Targets>().ok())
        .unwrap_or_else(|| Targets::new().with_default(LevelFilter::INFO))
}

/// Runs the guest as an ordinary process until the primary session has exited
/// and its exit has been reported (or `exit_linger` passed). Returns the
/// primary's exit status.
pub fn run(config: Config) -> u32 {
    if let Err(e) = process::become_subreaper() {
        warn!("cannot become a child subreaper: {e}; orphans will not be reaped");
    }
    if !config.raw_os.is_empty() {
        info!("the config asks for OS configuration; skipped: tether is not PID 1");
    }
    let ex = Rc::new(LocalExecutor::new());
    let guest = Guest::new(config, ex.clone());
    smol::block_on(ex.run(serve_guest(&ex, guest, false))).unwrap_or_else(|e| {
        error!("{e}");
        70 // EX_SOFTWARE; unreachable: unwatched tasks end nothing
    })
}

/// Serves `guest` until the primary session exited and its exit was reported
/// (or `exit_linger` passed), then stops every session; returns the primary's
/// exit status. With `watched` (PID 1), the end of the reaper or the link task
/// is an error (after the links were told, see `init::fatal::FatalNotice`);
/// otherwise they run detached as they always did.
pub async fn serve_guest(
    ex: &Rc<LocalExecutor<'static>>,
    guest: Rc<Guest>,
    watched: bool,
) -> Result<u32, String> {
    if guest.config.allow_none_auth {
        warn!("allow_none_auth is set: any appliance can connect without a key (development only)");
    }
    let linger = guest.config.exit_linger;
    let g = guest.clone();
    let reaper = ex.spawn(async move {
        let why = match reaper::run(|pid, exit| g.on_exit(pid, exit)).await {
            Err(e) => format!("reaper: {e}"),
            Ok(()) => "reaper: the SIGCHLD stream ended".to_owned(),
        };
        error!("{why}");
        why
    });
    ex.spawn(forward_signals(guest.clone())).detach();
    ex.spawn(trim::when_idle()).detach();
    guest.start_configured();
    let link = guest.config.link.clone().map(|spec| {
        let g = guest.clone();
        ex.spawn(async move {
            serve::run_links(g, spec.clone()).await;
            format!("the link task for {spec} ended")
        })
    });
    let primary = async {
        let exit = loop {
            let listener = guest.changed.listen();
            if let Some(exit) = guest.primary_exit() {
                break exit;
            }
            listener.await;
        };
        info!(
            code = exit.code(),
            "primary session exited; waiting up to {linger:?} for the appliance to hear of it"
        );
        let deadline = Instant::now() + linger;
        while !guest.exit_reported() && Instant::now() < deadline {
            let listener = guest.changed.listen();
            future::or(listener, async {
                Timer::at(deadline).await;
            })
            .await;
        }
        // Reported, and written out: a slow serial line may still hold the
        // tail of the output queued before the exit.
        guest.link_backlog.drained(deadline).await;
        Ok::<u32, String>(exit.code())
    };
    let code = if watched {
        let tasks = async {
            let why = match link {
                Some(link) => future::or(reaper, link).await,
                None => reaper.await,
            };
            Err(why)
        };
        match future::or(primary, tasks).await {
            Ok(code) => code,
            Err(why) => {
                guest.fatal.raise(&why);
                guest.changed.notify(usize::MAX);
                guest.fatal.wait_delivered(FATAL_DELIVERY).await;
                return Err(why);
            }
        }
    } else {
        reaper.detach();
        if let Some(link) = link {
            link.detach();
        }
        primary.await?
    };
    guest.stop_all(Duration::from_secs(2)).await;
    Ok(code)
}

/// Forwards the signals a container runtime sends to its init to the primary.
async fn forward_signals(guest: Rc<Guest>) {
    use async_signal::Signal as S;
    let Ok(mut signals) =
        async_signal::Signals::new([S::Term, S::Int, S::Hup, S::Quit, S::Usr1, S::Usr2])
    else {
        warn!("cannot handle signals; they will not be forwarded");
        return;
    };
    while let Some(Ok(sig)) = signals.next().await {
        if let Some(sig) = proto_core::tether::Signal::from_number(sig as i32) {
            info!("forwarding SIG{sig} to the primary session");
            guest.forward_to_primary(sig);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_log_filter;
    use tracing::Level;

    #[test]
    fn log_filter_takes_levels_and_targets_and_defaults_to_info() {
        let f = parse_log_filter(None);
        assert!(f.would_enable("runtime_guest", &Level::INFO));
        assert!(!f.would_enable("runtime_guest", &Level::DEBUG));
        let f = parse_log_filter(Some("debug"));
        assert!(f.would_enable("neli", &Level::DEBUG));
        let f = parse_log_filter(Some("warn,runtime_guest::serve=trace"));
        assert!(f.would_enable("runtime_guest::serve::link", &Level::TRACE));
        assert!(!f.would_enable("runtime_guest::guest", &Level::INFO));
        let f = parse_log_filter(Some("runtime_guest=nonsense"));
        assert!(f.would_enable("runtime_guest", &Level::INFO));
        assert!(!f.would_enable("runtime_guest", &Level::DEBUG));
    }
}
