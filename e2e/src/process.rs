//! Child processes for the test server: `sh -c CMD` with pipes or with a pty,
//! a blocking thread per pipe and one that waits for the child, each reporting
//! through a callback. Also the pty helpers the tests use to run `ssh -tt`.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::thread;

use bytes::Bytes;
use nix::fcntl::OFlag;
use nix::libc;
use nix::pty::{PtyMaster, Winsize, grantpt, posix_openpt, ptsname_r, unlockpt};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::{Pid, setsid};
use smol::channel::{Receiver, Sender};

nix::ioctl_write_ptr_bad!(ioctl_set_winsize, libc::TIOCSWINSZ, libc::winsize);
nix::ioctl_write_int_bad!(ioctl_set_controlling_tty, libc::TIOCSCTTY);

/// Largest chunk one reader thread passes on at a time.
const CHUNK: usize = 32 * 1024;

/// What a child's helper threads report.
#[derive(Debug)]
pub enum ProcMsg {
    /// Output read from the child: `ext` is `None` for stdout (or the pty),
    /// `Some(1)` for stderr. The reader waits for a credit before reading more.
    Output { ext: Option<u32>, data: Bytes },
    /// The stream ended.
    OutputEnd { ext: Option<u32> },
    /// This many bytes of input were written to the child (or discarded).
    Consumed(usize),
    /// The child exited.
    Exited(ExitStatus),
}

/// Input for a child.
#[derive(Debug)]
pub enum Input {
    /// Bytes for its stdin.
    Data(Bytes),
    /// No more input: closes a pipe, or types the EOF character on a pty.
    Eof,
}

/// A pty size: columns, rows, and pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size {
    pub cols: u32,
    pub rows: u32,
    pub width_px: u32,
    pub height_px: u32,
}

impl Size {
    fn winsize(self) -> Winsize {
        let clamp = |v: u32| v.min(u16::MAX as u32) as u16;
        Winsize {
            ws_row: clamp(self.rows),
            ws_col: clamp(self.cols),
            ws_xpixel: clamp(self.width_px),
            ws_ypixel: clamp(self.height_px),
        }
    }
}

/// How to run a command.
#[derive(Debug, Clone)]
pub struct Spawn {
    /// The `sh -c` command line; `None` starts a shell.
    pub command: Option<String>,
    /// Extra environment.
    pub env: Vec<(String, String)>,
    /// A pty of this size and `TERM`, or pipes when `None`.
    pub pty: Option<(Size, String)>,
}

/// A running child and the handles the session keeps.
pub struct Running {
    /// The child's pid, which is also its process group.
    pub pid: Pid,
    /// Input for the child's stdin.
    pub stdin: Sender<Input>,
    /// One credit sender per output stream (stdout, then stderr if piped):
    /// send one after the last chunk of that stream has been passed on.
    pub credits: Vec<(Option<u32>, Sender<()>)>,
    /// The pty master, for window changes.
    pub master: Option<Arc<OwnedFd>>,
}

/// Opens a pty pair with close-on-exec on both ends (so children started
/// meanwhile by other threads do not inherit the slave and keep it open).
pub fn open_pty(size: Size) -> io::Result<(OwnedFd, OwnedFd)> {
    let master = posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)?;
    grantpt(&master)?;
    unlockpt(&master)?;
    let name = ptsname_r(&master)?;
    let slave = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(name)?;
    let master: OwnedFd = PtyMaster::into(master);
    set_winsize(&master, size)?;
    Ok((master, slave.into()))
}

/// Sets a pty's size (on the master or the slave); the kernel sends SIGWINCH to
/// the terminal's foreground process group.
pub fn set_winsize(fd: &OwnedFd, size: Size) -> io::Result<()> {
    let ws = size.winsize();
    // SAFETY: TIOCSWINSZ reads one `winsize` from the pointer, which is valid.
    unsafe { ioctl_set_winsize(fd.as_raw_fd(), &ws) }?;
    Ok(())
}

/// Makes the child a session leader with `fd 0` (a pty slave) as its
/// controlling terminal. For `Command::pre_exec`, which runs it after the
/// stdio descriptors are in place.
pub fn become_pty_session_leader(cmd: &mut Command) {
    // SAFETY: setsid and ioctl are async-signal-safe and touch only the child.
    unsafe {
        cmd.pre_exec(|| {
            setsid()?;
            ioctl_set_controlling_tty(0, 0)?;
            Ok(())
        });
    }
}

/// Sends `signal` to the process group `pid` leads.
pub fn signal_group(pid: Pid, signal: Signal) -> io::Result<()> {
    killpg(pid, signal)?;
    Ok(())
}

/// The signal named as SSH names signals (`TERM`, `KILL`, without `SIG`).
pub fn signal_from_name(name: &str) -> Option<Signal> {
    format!("SIG{name}").parse().ok()
}

/// The SSH name of the signal that ended a child, if one did.
pub fn exit_signal_name(status: &ExitStatus) -> Option<String> {
    let raw = status.signal()?;
    let name = Signal::try_from(raw).map(|s| s.as_str().trim_start_matches("SIG").to_owned());
    Some(name.unwrap_or_else(|_| format!("{raw}")))
}

/// Starts `spec` and the helper threads that report through `notify`.
pub fn spawn<N>(spec: &Spawn, notify: N) -> io::Result<Running>
where
    N: Fn(ProcMsg) + Send + Clone + 'static,
{
    let mut cmd = Command::new("sh");
    match &spec.command {
        Some(c) => cmd.arg("-c").arg(c),
        None => &mut cmd,
    };
    cmd.envs(spec.env.iter().map(|(k, v)| (k, v)));
    let (stdin_tx, stdin_rx) = smol::channel::unbounded();
    let mut credits = Vec::new();
    let (child, master) = if let Some((size, term)) = &spec.pty {
        let (master, slave) = open_pty(*size)?;
        cmd.env("TERM", term);
        cmd.stdin(Stdio::from(slave.try_clone()?));
        cmd.stdout(Stdio::from(slave.try_clone()?));
        cmd.stderr(Stdio::from(slave));
        become_pty_session_leader(&mut cmd);
        let child = cmd.spawn()?;
        // Our copies of the slave must close, or the master never reports the end.
        drop(cmd);
        let master = Arc::new(master);
        credits.push((
            None,
            start_reader(File::from(master.try_clone()?), None, notify.clone()),
        ));
        start_writer(
            File::from(master.try_clone()?),
            true,
            stdin_rx,
            notify.clone(),
        );
        (child, Some(master))
    } else {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd.process_group(0);
        let mut child = cmd.spawn()?;
        drop(cmd);
        let stdout = child.stdout.take().expect("piped");
        let stderr = child.stderr.take().expect("piped");
        let stdin = child.stdin.take().expect("piped");
        credits.push((None, start_reader(stdout, None, notify.clone())));
        credits.push((
            Some(proto_core::EXTENDED_STDERR),
            start_reader(stderr, Some(proto_core::EXTENDED_STDERR), notify.clone()),
        ));
        start_writer(stdin, false, stdin_rx, notify.clone());
        (child, None)
    };
    let pid = Pid::from_raw(child.id() as i32);
    let mut child = child;
    thread::spawn(move || {
        let status = child
            .wait()
            .unwrap_or_else(|_| ExitStatus::from_raw(255 << 8));
        notify(ProcMsg::Exited(status));
    });
    Ok(Running {
        pid,
        stdin: stdin_tx,
        credits,
        master,
    })
}

/// Reads `source` in chunks, waiting for a credit after each, so at most one
/// chunk per stream waits for the peer's window.
fn start_reader<R, N>(mut source: R, ext: Option<u32>, notify: N) -> Sender<()>
where
    R: Read + Send + 'static,
    N: Fn(ProcMsg) + Send + 'static,
{
    let (credit_tx, credit_rx) = smol::channel::bounded::<()>(1);
    thread::spawn(move || {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = match source.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // EIO: a pty master whose slave side has closed.
                Err(_) => break,
            };
            notify(ProcMsg::Output {
                ext,
                data: Bytes::copy_from_slice(&buf[..n]),
            });
            if credit_rx.recv_blocking().is_err() {
                return; // the session is gone
            }
        }
        notify(ProcMsg::OutputEnd { ext });
    });
    credit_tx
}

/// Writes input to the child. Input the child no longer takes is discarded but
/// still reported consumed, so the channel's window keeps moving.
fn start_writer<W, N>(mut sink: W, pty: bool, input: Receiver<Input>, notify: N)
where
    W: Write + Send + 'static,
    N: Fn(ProcMsg) + Send + 'static,
{
    thread::spawn(move || {
        let mut broken = false;
        while let Ok(msg) = input.recv_blocking() {
            match msg {
                Input::Data(data) => {
                    if !broken && sink.write_all(&data).is_err() {
                        broken = true;
                    }
                    notify(ProcMsg::Consumed(data.len()));
                }
                // ^D, the default VEOF: a tty has no other way to say "end of input".
                Input::Eof if pty => {
                    let _ = sink.write_all(b"\x04");
                }
                Input::Eof => return, // dropping the pipe closes the child's stdin
            }
        }
    });
}
