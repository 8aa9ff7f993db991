//! Test plumbing: skipping (or, under `TETHER_REQUIRE_ALL=1`, failing) when a
//! real peer is missing, and a deadline for every test that kills the test's
//! child processes when it passes, so nothing hangs.

use std::io;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::Duration;

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;

/// Reports that `what` cannot run because of `reason`: prints the reason to
/// stderr and returns, so the caller can return early; panics instead when
/// `TETHER_REQUIRE_ALL=1` (CI), so a missing peer never passes silently.
pub fn require_or_skip(what: &str, reason: &str) {
    if std::env::var("TETHER_REQUIRE_ALL").is_ok_and(|v| v == "1") {
        panic!("{what} is required (TETHER_REQUIRE_ALL=1) but {reason}");
    }
    eprintln!("SKIPPED {what}: {reason} (set TETHER_REQUIRE_ALL=1 to make this a failure)");
}

/// The value of a peer check, or `None` after [`require_or_skip`] reported why not.
pub fn available<T>(what: &str, check: Result<T, String>) -> Option<T> {
    match check {
        Ok(v) => Some(v),
        Err(reason) => {
            require_or_skip(what, &reason);
            None
        }
    }
}

/// The child processes a test started; all are killed when its deadline passes.
#[derive(Clone, Default)]
pub struct Procs {
    pids: Arc<Mutex<Vec<u32>>>,
}

impl Procs {
    /// Spawns `cmd` and tracks it; the returned guard kills and reaps it on drop.
    pub fn spawn(&self, cmd: &mut Command) -> io::Result<ChildGuard> {
        let child = cmd.spawn()?;
        self.pids.lock().unwrap().push(child.id());
        Ok(ChildGuard {
            child: Some(child),
            procs: self.clone(),
        })
    }

    fn forget(&self, pid: u32) {
        self.pids.lock().unwrap().retain(|&p| p != pid);
    }

    /// Kills every tracked child and, when it leads one, its process group.
    pub fn kill_all(&self) {
        for &pid in self.pids.lock().unwrap().iter() {
            let pid = Pid::from_raw(pid as i32);
            let _ = killpg(pid, Signal::SIGKILL);
            let _ = kill(pid, Signal::SIGKILL);
        }
    }
}

/// A tracked child: killed and reaped on drop unless it was waited for.
pub struct ChildGuard {
    child: Option<Child>,
    procs: Procs,
}

impl ChildGuard {
    /// The child, for its pipes and its pid.
    pub fn child(&mut self) -> &mut Child {
        self.child.as_mut().expect("present until drop")
    }

    /// The child's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("present until drop").id()
    }

    /// Waits for the child to exit.
    pub fn wait(&mut self) -> io::Result<std::process::ExitStatus> {
        self.child().wait()
    }

    /// Waits for the child, collecting its piped stdout and stderr.
    pub fn wait_with_output(mut self) -> io::Result<std::process::Output> {
        let child = self.child.take().expect("present until drop");
        self.procs.forget(child.id());
        child.wait_with_output()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            self.procs.forget(child.id());
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }
}

/// Runs `body` on its own thread and fails the test if it takes longer than
/// `limit`, after killing the children it registered with the [`Procs`] it is
/// given (which usually unblocks it). A panic in `body` is re-raised here.
pub fn with_timeout<F>(limit: Duration, body: F)
where
    F: FnOnce(Procs) + Send + 'static,
{
    let procs = Procs::default();
    let (tx, rx) = mpsc::channel();
    let theirs = procs.clone();
    let name = thread::current().name().unwrap_or("e2e-test").to_owned();
    let handle = thread::Builder::new()
        .name(name)
        .spawn(move || {
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| body(theirs)));
            let _ = tx.send(result);
        })
        .expect("spawn the test thread");
    match rx.recv_timeout(limit) {
        Ok(Ok(())) => {
            let _ = handle.join();
        }
        Ok(Err(panic)) => std::panic::resume_unwind(panic),
        Err(_) => {
            procs.kill_all();
            panic!("the test did not finish within {limit:?}; its child processes were killed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[should_panic(expected = "did not finish within")]
    fn a_hung_test_fails_at_its_deadline_and_its_children_are_killed() {
        with_timeout(Duration::from_millis(300), |procs| {
            let mut sleeper = procs.spawn(Command::new("sleep").arg("60")).unwrap();
            let _ = sleeper.wait(); // returns early only because the deadline kills it
            thread::sleep(Duration::from_secs(60));
        });
    }
}
