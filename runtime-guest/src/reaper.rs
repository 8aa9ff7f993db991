//! The one reaper: owns `waitpid(-1)`. On every SIGCHLD it collects every
//! exited child, ours or orphans handed to us as subreaper, and reports the
//! statuses. No other code waits for a process, so no status is ever stolen.

use std::io;

use futures_lite::StreamExt;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use proto_core::tether::{ExitStatus, Signal};

/// How a process ended, from its wait status.
fn exit_of(status: WaitStatus) -> Option<(Pid, ExitStatus)> {
    match status {
        WaitStatus::Exited(pid, code) => Some((pid, ExitStatus::Code(code as u32))),
        WaitStatus::Signaled(pid, sig, core) => {
            let signal = Signal::from_number(sig as i32)?;
            Some((pid, ExitStatus::signal(signal, core)))
        }
        _ => None,
    }
}

/// Collects every child that has exited, without blocking.
pub fn reap_all() -> Vec<(Pid, ExitStatus)> {
    let mut out = Vec::new();
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(_) => return out,
            Ok(status) => out.extend(exit_of(status)),
        }
    }
}

/// Runs forever: waits for SIGCHLD and hands each exit to `on_exit`.
pub async fn run(mut on_exit: impl FnMut(Pid, ExitStatus)) -> io::Result<()> {
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
