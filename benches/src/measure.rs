//! The two measurements of `scripts/bench`, taken the same way for any client
//! command: how fast a command's stdout delivers a stream, and how long one
//! byte typed into a terminal takes to come back as its echo.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use e2e::harness::{ChildGuard, Procs};
use e2e::process::{Size, become_pty_session_leader, open_pty};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::termios::{LocalFlags, tcgetattr};

/// One streamed transfer, timed at the reader.
#[derive(Debug, Clone, Copy)]
pub struct Transfer {
    pub bytes: u64,
    /// From the first byte read to the last.
    pub streaming: Duration,
}

impl Transfer {
    /// MB/s (10^6 bytes) while streaming.
    pub fn mb_per_s(&self) -> f64 {
        self.bytes as f64 / self.streaming.as_secs_f64() / 1e6
    }
}

/// Runs `cmd`, reads its stdout to the end and times the stream from its
/// first byte to its last (so connection setup, which differs between the
/// stacks and is not what moving a gigabyte costs, stays out). Fails unless
/// exactly `expect` bytes arrive and the command succeeds. `started` runs
/// once the command is (e.g. to release a writer the command waits for).
pub fn transfer(
    procs: &Procs,
    cmd: &mut Command,
    expect: u64,
    started: impl FnOnce() -> Result<(), String>,
) -> Result<Transfer, String> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = procs.spawn(cmd).map_err(|e| format!("{cmd:?}: {e}"))?;
    started()?;
    let mut out = child.child().stdout.take().ok_or("no stdout pipe")?;
    let mut buf = vec![0u8; 1 << 20];
    let (mut bytes, mut first, mut last) = (0u64, None, Instant::now());
    loop {
        let n = out.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        last = Instant::now();
        first.get_or_insert(last);
        bytes += n as u64;
    }
    let output = child.wait_with_output().map_err(|e| e.to_string())?;
    if bytes != expect || !output.status.success() {
        return Err(format!(
            "{cmd:?}: {bytes} of {expect} bytes, {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(Transfer {
        bytes,
        streaming: last - first.unwrap_or(last),
    })
}

/// A command running on a pty this process holds the master of.
pub struct Terminal {
    master: File,
    _child: ChildGuard,
}

impl Terminal {
    /// Starts `cmd` as a session leader on a new pty and waits until it has
    /// put the terminal in raw mode (echo off), so an echo can only come from
    /// the far end.
    pub fn start(procs: &Procs, cmd: &mut Command) -> Result<Self, String> {
        let (master, slave) = open_pty(Size {
            cols: 80,
            rows: 24,
            width_px: 0,
            height_px: 0,
        })
        .map_err(|e| e.to_string())?;
        let dup = |fd: &OwnedFd| fd.try_clone().map_err(|e| e.to_string());
        cmd.stdin(Stdio::from(dup(&slave)?))
            .stdout(Stdio::from(dup(&slave)?))
            .stderr(Stdio::from(slave));
        become_pty_session_leader(cmd);
        let child = procs.spawn(cmd).map_err(|e| format!("{cmd:?}: {e}"))?;
        let end = Instant::now() + Duration::from_secs(20);
        while tcgetattr(master.as_fd())
            .map_err(|e| e.to_string())?
            .local_flags
            .contains(LocalFlags::ECHO)
        {
            if Instant::now() > end {
                return Err(format!("{cmd:?} never put its terminal in raw mode"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(Self {
            master: File::from(master),
            _child: child,
        })
    }

    /// Reads whatever arrives until the terminal has been quiet for `quiet`.
    fn drain(&mut self, quiet: Duration) -> Result<(), String> {
        let mut buf = [0u8; 4096];
        while self.readable(quiet)? {
            self.master.read(&mut buf).map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    fn readable(&self, within: Duration) -> Result<bool, String> {
        let mut fds = [PollFd::new(self.master.as_fd(), PollFlags::POLLIN)];
        let ms = PollTimeout::try_from(within.as_millis().min(60_000) as i32)
            .map_err(|e| e.to_string())?;
        Ok(poll(&mut fds, ms).map_err(|e| e.to_string())? > 0)
    }

    /// Types one byte and waits for it to come back; returns the round trip.
    fn keystroke(&mut self, byte: u8) -> Result<Duration, String> {
        let start = Instant::now();
        self.master.write_all(&[byte]).map_err(|e| e.to_string())?;
        let mut buf = [0u8; 256];
        loop {
            if !self.readable(Duration::from_secs(10))? {
                return Err("no echo within 10 s".into());
            }
            let n = self.master.read(&mut buf).map_err(|e| e.to_string())?;
            if buf[..n].contains(&byte) {
                return Ok(start.elapsed());
            }
        }
    }

    /// `count` keystrokes into a terminal whose far end echoes (a pty running
    /// `cat`), after `warmup` unmeasured ones; every line of 64 is ended with
    /// a return (and its output drained, unmeasured) so the far end's line
    /// buffer never fills.
    pub fn keystrokes(&mut self, warmup: usize, count: usize) -> Result<Vec<Duration>, String> {
        let mut all = interleaved_keystrokes(&mut [self], warmup, count)?;
        Ok(all.pop().unwrap_or_default())
    }
}

/// [`Terminal::keystrokes`] for several terminals at once, taking turns key by
/// key: a busy moment of a shared machine then falls on all of them alike,
/// which is what makes their ratio mean something. One list of round trips
/// per terminal, in order.
pub fn interleaved_keystrokes(
    terms: &mut [&mut Terminal],
    warmup: usize,
    count: usize,
) -> Result<Vec<Vec<Duration>>, String> {
    let mut times = vec![Vec::with_capacity(count); terms.len()];
    for i in 0..warmup + count {
        for (t, times) in terms.iter_mut().zip(&mut times) {
            if i % 64 == 63 {
                t.master.write_all(b"\r").map_err(|e| e.to_string())?;
                t.drain(Duration::from_millis(30))?;
            }
            let rtt = t.keystroke(b'a' + (i % 26) as u8)?;
            if i >= warmup {
                times.push(rtt);
            }
            // Like a typist: the next key comes after the echo has settled.
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    Ok(times)
}

/// CPU time from `/proc/PID/stat`: the process's own (all its threads) and
/// that of its children it has reaped (and theirs, recursively).
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcCpu {
    pub own: Duration,
    pub reaped: Duration,
}

impl ProcCpu {
    pub fn of(pid: u32) -> Result<Self, String> {
        // utime and stime are fields 14 and 15, cutime and cstime 16 and 17.
        let f: Vec<u64> = stat_fields(pid)?
            .iter()
            .skip(11)
            .take(4)
            .map(|v| v.parse().unwrap_or(0))
            .collect();
        if f.len() < 4 {
            return Err(format!("/proc/{pid}/stat: too few fields"));
        }
        let tick = |t: u64| Duration::from_secs_f64(t as f64 / clock_ticks());
        Ok(Self {
            own: tick(f[0] + f[1]),
            reaped: tick(f[2] + f[3]),
        })
    }

    /// Both together.
    pub fn total(&self) -> Duration {
        self.own + self.reaped
    }
}

fn clock_ticks() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64
}

/// Watches the processes below `root` (not `root` itself) while they run and
/// adds up the CPU time each used, as last seen: for a server whose sessions'
/// time never reaches its own counters (sshd's do not, here). A process that
/// ends between two looks loses its last [`DESCENDANT_LOOK`] at most.
pub struct DescendantCpu {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Duration>,
}

/// How often [`DescendantCpu`] looks.
pub const DESCENDANT_LOOK: Duration = Duration::from_millis(20);

impl DescendantCpu {
    pub fn watch(root: u32) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut seen: std::collections::HashMap<u32, Duration> = Default::default();
            loop {
                let done = flag.load(std::sync::atomic::Ordering::Relaxed);
                for pid in descendants(root) {
                    if let Ok(cpu) = ProcCpu::of(pid) {
                        seen.insert(pid, cpu.own);
                    }
                }
                if done {
                    return seen.values().sum();
                }
                std::thread::sleep(DESCENDANT_LOOK);
            }
        });
        Self { stop, thread }
    }

    /// The CPU time the descendants used while watched.
    pub fn stop(self) -> Duration {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

/// The fields of `/proc/PID/stat` after the command name (which may hold
/// spaces and parentheses): the first is field 3, the state.
fn stat_fields(pid: u32) -> Result<Vec<String>, String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| format!("/proc/{pid}/stat: {e}"))?;
    let (_, rest) = text
        .rsplit_once(')')
        .ok_or_else(|| format!("/proc/{pid}/stat without a command name"))?;
    Ok(rest.split_whitespace().map(str::to_owned).collect())
}

/// Every process below `root`, from the parent pids in `/proc`.
fn descendants(root: u32) -> Vec<u32> {
    let mut parent = std::collections::HashMap::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        // The parent pid is field 4.
        if let Some(ppid) = stat_fields(pid)
            .ok()
            .and_then(|f| f.get(1).and_then(|p| p.parse::<u32>().ok()))
        {
            parent.insert(pid, ppid);
        }
    }
    let mut found = Vec::new();
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for (&child, _) in parent.iter().filter(|&(_, &pp)| pp == p) {
            found.push(child);
            frontier.push(child);
        }
    }
    found
}

/// The CPU time of this process's children it has reaped.
pub fn reaped_children_cpu() -> Duration {
    match nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN) {
        Ok(u) => {
            let tv = |t: nix::sys::time::TimeVal| {
                Duration::new(t.tv_sec() as u64, t.tv_usec() as u32 * 1000)
            };
            tv(u.user_time()) + tv(u.system_time())
        }
        Err(_) => Duration::ZERO,
    }
}

/// The `q`-quantile (0..=1) of `samples`.
pub fn quantile(samples: &mut [Duration], q: f64) -> Duration {
    samples.sort();
    let i = ((samples.len() as f64 - 1.0) * q).round() as usize;
    samples.get(i).copied().unwrap_or_default()
}
