//! `tether`, the guest runtime: runs a container's processes and serves their
//! console to the appliance as an SSH server over a link (a serial port whose
//! other end connects to `tetherd`, or TCP, vsock, unix).
//!
//! Here `tether` runs as an ordinary process (a child subreaper); PID 1 duties
//! (OS configuration, hotplug, power-off) are separate work.

pub mod config;
pub mod guest;
pub mod init;
pub mod linkspec;
pub mod process;
pub mod reaper;
pub mod serve;

use std::rc::Rc;
use std::time::{Duration, Instant};

use futures_lite::{StreamExt, future};
use smol::{LocalExecutor, Timer};
use tracing::{error, info, warn};

pub use config::{Config, ConfigError};
use guest::Guest;

/// Runs the guest until the primary session has exited and its exit has been
/// reported (or `exit_linger` passed). Returns the primary's exit status.
pub fn run(config: Config) -> u32 {
    if let Err(e) = process::become_subreaper() {
        warn!("cannot become a child subreaper: {e}; orphans will not be reaped");
    }
    if !config.raw_os.is_empty() {
        info!("the config asks for OS configuration; skipped: tether is not PID 1");
    }
    if config.allow_none_auth {
        warn!("allow_none_auth is set: any appliance can connect without a key (development only)");
    }
    let ex = Rc::new(LocalExecutor::new());
    let guest = Guest::new(config, ex.clone());
    let linger = guest.config.exit_linger;
    smol::block_on(ex.run(async {
        let g = guest.clone();
        ex.spawn(async move {
            if let Err(e) = reaper::run(|pid, exit| g.on_exit(pid, exit)).await {
                error!("reaper: {e}");
            }
        })
        .detach();
        ex.spawn(forward_signals(guest.clone())).detach();
        guest.start_configured();
        if let Some(spec) = guest.config.link.clone() {
            ex.spawn(serve::run_links(guest.clone(), spec)).detach();
        }
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
        guest.stop_all(Duration::from_secs(2)).await;
        exit.code()
    }))
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
