//! The one reaper: owns `waitpid(-1)`. On every SIGCHLD it collects every
//! exited child, ours or orphans handed to us as subreaper, and reports the
//! statuses. No other code waits for a process, so no status is ever stolen.

use std::io;

use futures_lite::StreamExt;
use nix::sys::signal::Signal;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

/// How a process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitInfo {
    /// The exit code, or 128+N when killed by signal N.
    pub code: u32,
    /// The signal that killed it (name without "SIG") and whether it dumped core.
    pub signal: Option<(String, bool)>,
}

impl ExitInfo {
    /// A plain exit code.
    pub fn code(code: u32) -> Self {
        Self { code, signal: None }
    }

    fn from_status(status: WaitStatus) -> Option<(Pid, Self)> {
        match status {
            WaitStatus::Exited(pid, code) => Some((pid, Self::code(code as u32))),
            WaitStatus::Signaled(pid, sig, core) => Some((
                pid,
                Self {
                    code: 128 + sig as u32,
                    signal: Some((signal_name(sig), core)),
                },
            )),
            _ => None,
        }
    }
}

/// A signal's name without "SIG", as SSH's exit-signal carries it.
pub fn signal_name(sig: Signal) -> String {
    sig.as_str().trim_start_matches("SIG").to_owned()
}

/// Collects every child that has exited, without blocking.
pub fn reap_all() -> Vec<(Pid, ExitInfo)> {
    let mut out = Vec::new();
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(_) => return out,
            Ok(status) => out.extend(ExitInfo::from_status(status)),
        }
    }
}

/// Runs forever: waits for SIGCHLD and hands each exit to `on_exit`.
pub async fn run(mut on_exit: impl FnMut(Pid, ExitInfo)) -> io::Result<()> {
    let mut signals = async_signal::Signals::new([async_signal::Signal::Child])?;
    loop {
        for (pid, info) in reap_all() {
            on_exit(pid, info);
        }
        if signals.next().await.is_none() {
            return Ok(());
        }
    }
}
