//! The local terminal: raw mode, window size, a stdin reader, and the
//! ctrl-p ctrl-q detach sequence.

use std::io::{IsTerminal, Read, Write};
use std::os::fd::{AsFd, OwnedFd};

use bytes::Bytes;
use nix::sys::termios::{SetArg, Termios, cfmakeraw, tcgetattr, tcsetattr};

/// ctrl-p, the first byte of the detach sequence.
pub const CTRL_P: u8 = 0x10;
/// ctrl-q, the second.
pub const CTRL_Q: u8 = 0x11;

/// Whether stdin is a terminal.
pub fn stdin_is_tty() -> bool {
    std::io::stdin().is_terminal()
}

/// Puts stdin's terminal in raw mode until dropped.
pub struct RawMode {
    saved: Termios,
}

impl RawMode {
    pub fn enable() -> nix::Result<Self> {
        let stdin = std::io::stdin();
        let saved = tcgetattr(stdin.as_fd())?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw)?;
        Ok(Self { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = tcsetattr(std::io::stdin().as_fd(), SetArg::TCSANOW, &self.saved);
    }
}

nix::ioctl_read_bad!(tiocgwinsz, nix::libc::TIOCGWINSZ, nix::libc::winsize);

/// The terminal's size as (columns, rows), from stdout or else stdin.
pub fn window_size() -> Option<(u16, u16)> {
    for fd in [1, 0] {
        let mut ws = nix::libc::winsize {
            ws_row: 0,
            ws_col: 0,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCGWINSZ writes a `winsize` into the pointer we pass,
        // which points to a live, properly aligned `winsize`.
        if unsafe { tiocgwinsz(fd, &mut ws) }.is_ok() && ws.ws_col > 0 && ws.ws_row > 0 {
            return Some((ws.ws_col, ws.ws_row));
        }
    }
    None
}

/// This process's stdout without std's line buffering: output comes in
/// chunks that are each written at once with one `write` (the caller
/// flushes per chunk anyway), where a `LineWriter` would first search every
/// chunk for its last newline. Falls back to std's stdout if fd 1 cannot be
/// duplicated. A pipe is grown to [`STDOUT_PIPE`] bytes first.
pub fn raw_stdout() -> Box<dyn Write + Send> {
    match std::io::stdout().as_fd().try_clone_to_owned() {
        Ok(fd) => {
            grow_pipe(&fd);
            Box::new(std::fs::File::from(fd))
        }
        Err(_) => Box::new(std::io::stdout()),
    }
}

/// The pipe size asked for on stdout (Linux's default limit for an
/// unprivileged process): output arrives in messages of up to a MiB, and with
/// the default 64 KiB pipe each one is written in 16 turns with the reader
/// (a context switch each) while the WebSocket goes unread.
const STDOUT_PIPE: i32 = 1 << 20;

/// Grows `fd`'s pipe to [`STDOUT_PIPE`] if it is a pipe that is smaller;
/// anything else, or a refusal, leaves it as it is.
fn grow_pipe(fd: &OwnedFd) {
    use nix::fcntl::{FcntlArg, fcntl};
    let is_fifo = nix::sys::stat::fstat(fd)
        .is_ok_and(|st| st.st_mode & nix::libc::S_IFMT == nix::libc::S_IFIFO);
    if is_fifo && fcntl(fd, FcntlArg::F_GETPIPE_SZ).is_ok_and(|n| n < STDOUT_PIPE) {
        let _ = fcntl(fd, FcntlArg::F_SETPIPE_SZ(STDOUT_PIPE));
    }
}

/// Local stdin as the session loop reads it.
pub enum Input {
    /// A descriptor that can be polled (a terminal, a pipe, a socket), read
    /// by the session loop itself once it is readable: a keystroke goes on
    /// to the WebSocket without a hand-over from another thread. Its file
    /// status flags are left alone (a terminal is shared with the shell), so
    /// it is read only after readiness.
    Polled(async_io::Async<std::fs::File>),
    /// Chunks read by a thread of their own (a regular file or `/dev/null`,
    /// which cannot be polled); the channel closes at EOF.
    Chunks(async_channel::Receiver<Bytes>),
}

/// How much of stdin one read takes.
const STDIN_READ: usize = 16 * 1024;

impl Input {
    /// This process's stdin: polled if it can be, else read on a thread.
    pub fn stdin() -> Self {
        let polled = std::io::stdin()
            .as_fd()
            .try_clone_to_owned()
            .and_then(|fd| async_io::Async::new_nonblocking(std::fs::File::from(fd)));
        match polled {
            Ok(fd) => Self::Polled(fd),
            Err(_) => Self::Chunks(spawn_stdin_reader()),
        }
    }

    /// The next chunk; `None` at EOF (or when reading failed).
    pub async fn next(&mut self) -> Option<Bytes> {
        match self {
            Self::Chunks(rx) => rx.recv().await.ok(),
            Self::Polled(fd) => loop {
                if let Err(e) = fd.readable().await {
                    tracing::debug!(error = %e, "waiting for stdin failed");
                    return None;
                }
                let mut buf = [0u8; STDIN_READ];
                match rustix::io::read(fd.get_ref(), &mut buf) {
                    Ok(0) => return None,
                    // A keystroke is a byte or a few: no 16 KiB block each.
                    Ok(n) => return Some(Bytes::copy_from_slice(&buf[..n])),
                    // Someone else's non-blocking flag, or a spurious wake.
                    Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => {}
                    Err(e) => {
                        tracing::debug!(error = %e, "reading stdin failed");
                        return None;
                    }
                }
            },
        }
    }
}

/// Reads stdin on a thread; the channel yields chunks and closes at EOF.
fn spawn_stdin_reader() -> async_channel::Receiver<Bytes> {
    let (tx, rx) = async_channel::bounded(64);
    let spawned = std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || {
            let mut stdin = std::io::stdin().lock();
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        if tx.send_blocking(Bytes::copy_from_slice(&buf[..n])).is_err() {
                            break;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        tracing::debug!(error = %e, "reading stdin failed");
                        break;
                    }
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the stdin reader; stdin is not forwarded");
    }
    rx
}

/// The ctrl-p ctrl-q detach sequence, as `docker attach` has it. A ctrl-p
/// is held back until the next byte: ctrl-q detaches, anything else sends
/// both. `flush` releases a held ctrl-p (after a timeout).
#[derive(Debug, Default)]
pub struct DetachKeys {
    held: bool,
}

impl DetachKeys {
    /// Feeds input; returns the bytes to send and whether to detach (the
    /// bytes after the sequence are dropped then).
    pub fn feed(&mut self, input: &[u8]) -> (Vec<u8>, bool) {
        let mut out = Vec::with_capacity(input.len() + 1);
        for &b in input {
            if self.held {
                self.held = false;
                if b == CTRL_Q {
                    return (out, true);
                }
                out.push(CTRL_P);
            }
            if b == CTRL_P {
                self.held = true;
            } else {
                out.push(b);
            }
        }
        (out, false)
    }

    /// Whether a ctrl-p is held back.
    pub fn holding(&self) -> bool {
        self.held
    }

    /// Releases a held ctrl-p.
    pub fn flush(&mut self) -> Option<u8> {
        std::mem::take(&mut self.held).then_some(CTRL_P)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detach_sequence() {
        let mut k = DetachKeys::default();
        assert_eq!(k.feed(b"ls\r"), (b"ls\r".to_vec(), false));
        assert_eq!(k.feed(&[b'a', CTRL_P, CTRL_Q, b'z']), (b"a".to_vec(), true));
        let mut k = DetachKeys::default();
        // ctrl-p then another key: both go through.
        assert_eq!(k.feed(&[CTRL_P]), (vec![], false));
        assert!(k.holding());
        assert_eq!(k.feed(b"x"), (vec![CTRL_P, b'x'], false));
        // ctrl-p ctrl-p: the first goes through, the second is held.
        assert_eq!(k.feed(&[CTRL_P, CTRL_P]), (vec![CTRL_P], false));
        assert_eq!(k.flush(), Some(CTRL_P));
        assert_eq!(k.flush(), None);
        // Split across reads.
        assert_eq!(k.feed(&[CTRL_P]), (vec![], false));
        assert_eq!(k.feed(&[CTRL_Q]), (vec![], true));
        // ctrl-q alone is just a byte.
        let mut k = DetachKeys::default();
        assert_eq!(k.feed(&[CTRL_Q]), (vec![CTRL_Q], false));
    }

    #[test]
    fn a_pipe_on_stdout_is_grown_and_a_file_is_left_alone() {
        use nix::fcntl::{FcntlArg, fcntl};
        let (read, write) = nix::unistd::pipe().unwrap();
        grow_pipe(&write);
        // The system's limit may be lower for an unprivileged user.
        let max: i32 = std::fs::read_to_string("/proc/sys/fs/pipe-max-size")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(STDOUT_PIPE);
        let want = if nix::unistd::geteuid().is_root() {
            STDOUT_PIPE
        } else {
            STDOUT_PIPE.min(max)
        };
        assert!(fcntl(&read, FcntlArg::F_GETPIPE_SZ).unwrap() >= want);
        let file = tempfile::tempfile().unwrap();
        grow_pipe(&OwnedFd::from(file));
    }

    #[test]
    fn polled_input_yields_what_was_written_then_ends_at_eof() {
        let (read, write) = nix::unistd::pipe().unwrap();
        let mut input =
            Input::Polled(async_io::Async::new_nonblocking(std::fs::File::from(read)).unwrap());
        let mut write = std::fs::File::from(write);
        write.write_all(b"typed").unwrap();
        let first = async_io::block_on(input.next());
        assert_eq!(first.as_deref(), Some(&b"typed"[..]));
        drop(write);
        assert_eq!(async_io::block_on(input.next()), None);
    }
}
