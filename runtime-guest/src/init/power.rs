//! Power-off, the only way PID 1 ends: TERM to every process (orphans that
//! started their own sessions included), a grace period while they are
//! reaped, KILL to what is left, sync, every filesystem unmounted in reverse
//! order (lazily if busy), the root made read-only, then the machine off. The
//! order lives in [`shut_down`] over a [`Machine`], so a test can check it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::Signal;

use super::mount;

/// How long processes have after TERM before KILL, when the primary exited.
pub const TERM_GRACE: Duration = Duration::from_secs(5);
/// How long to wait for killed processes to be reaped.
const KILL_WAIT: Duration = Duration::from_secs(2);
/// How often to look for exited children while waiting.
const REAP_EVERY: Duration = Duration::from_millis(20);

/// What power-off does to the machine, one step at a time.
pub trait Machine {
    /// Sends `signal` to every process but PID 1.
    fn signal_all(&mut self, signal: Signal);
    /// Collects exited children; true when none is left.
    fn reap(&mut self) -> bool;
    fn now(&self) -> Instant;
    fn pause(&mut self, time: Duration);
    /// Writes every dirty buffer to its device.
    fn sync(&mut self);
    /// Mount points, in the order they were mounted.
    fn mount_points(&mut self) -> Vec<PathBuf>;
    fn unmount(&mut self, target: &Path) -> Result<(), Errno>;
    fn unmount_lazily(&mut self, target: &Path);
    fn remount_root_read_only(&mut self);
    fn power_off(&mut self);
}

/// Stops every process and powers off. `grace` is how long processes have
/// between TERM and KILL.
pub fn shut_down(m: &mut impl Machine, grace: Duration) {
    m.signal_all(Signal::SIGTERM);
    wait_for_children(m, grace);
    m.signal_all(Signal::SIGKILL);
    wait_for_children(m, KILL_WAIT);
    m.sync();
    for target in m.mount_points().into_iter().rev() {
        if target == Path::new("/") {
            continue;
        }
        match m.unmount(&target) {
            Ok(()) | Err(Errno::EINVAL | Errno::ENOENT) => {}
            Err(_) => m.unmount_lazily(&target),
        }
    }
    m.remount_root_read_only();
    m.sync();
    m.power_off();
}

/// Reaps until no child is left or `limit` passed; true if none is left.
fn wait_for_children(m: &mut impl Machine, limit: Duration) -> bool {
    let deadline = m.now() + limit;
    loop {
        if m.reap() {
            return true;
        }
        if m.now() >= deadline {
            return false;
        }
        m.pause(REAP_EVERY);
    }
}

/// This machine.
pub struct ThisMachine;

impl Machine for ThisMachine {
    fn signal_all(&mut self, signal: Signal) {
        // As PID 1, -1 is every process but ourselves (and kernel threads).
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(-1), signal);
    }

    fn reap(&mut self) -> bool {
        use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
        loop {
            match waitpid(nix::unistd::Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => return false,
                Ok(_) => continue,
                Err(Errno::EINTR) => continue,
                Err(_) => return true, // ECHILD: nobody left
            }
        }
    }

    fn now(&self) -> Instant {
        Instant::now()
    }

    fn pause(&mut self, time: Duration) {
        std::thread::sleep(time);
    }

    fn sync(&mut self) {
        nix::unistd::sync();
    }

    fn mount_points(&mut self) -> Vec<PathBuf> {
        mount::mount_points()
            .unwrap_or_default()
            .into_iter()
            .map(|m| m.target)
            .collect()
    }

    fn unmount(&mut self, target: &Path) -> Result<(), Errno> {
        mount::unmount(target)
    }

    fn unmount_lazily(&mut self, target: &Path) {
        let _ = mount::unmount_lazily(target);
    }

    fn remount_root_read_only(&mut self) {
        let _ = mount::remount_root_read_only();
    }

    fn power_off(&mut self) {
        let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    }
}

/// Shuts this machine down and never returns (if the kernel refuses to power
/// off, PID 1 waits: returning would panic the kernel).
pub fn power_off(grace: Duration) -> ! {
    shut_down(&mut ThisMachine, grace);
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_HALT_SYSTEM);
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records what power-off did; children exit `exits_after` reaps after TERM
    /// (never, if `None`), and `/run` is busy.
    struct Recorder {
        log: Vec<String>,
        now: Instant,
        exits_after: Option<u32>,
        reaps: u32,
    }

    impl Machine for Recorder {
        fn signal_all(&mut self, signal: Signal) {
            self.log.push(format!("signal {signal}"));
            self.reaps = 0;
        }
        fn reap(&mut self) -> bool {
            self.reaps += 1;
            let done = self.exits_after.is_some_and(|n| self.reaps >= n)
                || self.log.last().is_some_and(|l| l == "signal SIGKILL");
            if done && self.log.last().is_none_or(|l| l != "all reaped") {
                self.log.push("all reaped".into());
            }
            done
        }
        fn now(&self) -> Instant {
            self.now
        }
        fn pause(&mut self, time: Duration) {
            self.now += time;
        }
        fn sync(&mut self) {
            self.log.push("sync".into());
        }
        fn mount_points(&mut self) -> Vec<PathBuf> {
            ["/", "/proc", "/dev", "/run", "/data", "/data/cache"]
                .map(PathBuf::from)
                .into()
        }
        fn unmount(&mut self, target: &Path) -> Result<(), Errno> {
            if target == Path::new("/run") {
                self.log.push("unmount /run: busy".into());
                return Err(Errno::EBUSY);
            }
            self.log.push(format!("unmount {}", target.display()));
            Ok(())
        }
        fn unmount_lazily(&mut self, target: &Path) {
            self.log.push(format!("detach {}", target.display()));
        }
        fn remount_root_read_only(&mut self) {
            self.log.push("root read-only".into());
        }
        fn power_off(&mut self) {
            self.log.push("power off".into());
        }
    }

    fn run(exits_after: Option<u32>) -> (Vec<String>, Duration) {
        let start = Instant::now();
        let mut m = Recorder {
            log: Vec::new(),
            now: start,
            exits_after,
            reaps: 0,
        };
        shut_down(&mut m, TERM_GRACE);
        (m.log, m.now - start)
    }

    #[test]
    fn processes_stop_before_filesystems_unmount_children_first_then_power_off() {
        let (log, _) = run(Some(3));
        assert_eq!(
            log,
            [
                "signal SIGTERM",
                "all reaped",
                "signal SIGKILL",
                "all reaped",
                "sync",
                "unmount /data/cache",
                "unmount /data",
                "unmount /run: busy",
                "detach /run",
                "unmount /dev",
                "unmount /proc",
                "root read-only",
                "sync",
                "power off"
            ]
        );
    }

    #[test]
    fn processes_that_ignore_term_get_kill_after_the_grace_period() {
        let (log, waited) = run(None);
        assert_eq!(
            &log[..3],
            ["signal SIGTERM", "signal SIGKILL", "all reaped"]
        );
        assert!(waited >= TERM_GRACE && waited < TERM_GRACE + Duration::from_millis(100));
        assert_eq!(log.last().map(String::as_str), Some("power off"));
    }
}
