//! The console (`/dev/console`, the VM's log port; the link has its own):
//! PID 1's standard streams when the kernel could not give it any, the
//! writer its logs go to, and last words written straight to it.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::sync::OnceLock;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

const CONSOLE: &str = "/dev/console";

fn open_console() -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .read(true)
        .custom_flags(nix::libc::O_NOCTTY | nix::libc::O_CLOEXEC)
        .open(CONSOLE)
}

/// Gives PID 1 the console as stdin, stdout and stderr where those are not
/// open (an initramfs without `/dev/console` starts init without them).
pub fn attach_stdio() {
    for fd in 0..=2 {
        if is_open(fd) {
            continue;
        }
        if let Ok(console) = open_console() {
            let _ = duplicate_onto(&console, fd);
        }
    }
}

fn is_open(fd: i32) -> bool {
    // SAFETY: F_GETFD reads a descriptor's flags and touches no memory; on a
    // number that is not open it fails with EBADF.
    unsafe { nix::libc::fcntl(fd, nix::libc::F_GETFD) >= 0 }
}

/// Makes descriptor `fd` a copy of `file` (no close-on-exec).
fn duplicate_onto(file: &File, fd: i32) -> io::Result<()> {
    // SAFETY: dup2 onto a standard descriptor number that is not open; the
    // new descriptor is owned by the process's standard streams from now on.
    let r = unsafe { nix::libc::dup2(file.as_raw_fd(), fd) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

static WRITER: OnceLock<Option<File>> = OnceLock::new();

fn console_file() -> Option<&'static File> {
    WRITER.get_or_init(|| open_console().ok()).as_ref()
}

/// The tracing writer: the console, or stderr when it cannot be opened.
pub struct ConsoleWriter;

impl Write for ConsoleWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match console_file() {
            Some(mut f) => f.write(buf),
            None => io::stderr().write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Sends logs to the console, at the level `TETHER_LOG` asks for (`info` by
/// default; the kernel passes `TETHER_LOG=debug` from its command line to init
/// as an environment variable).
pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_writer(|| ConsoleWriter)
        .with_ansi(false)
        .finish()
        .with(crate::log_filter())
        .try_init();
}

/// Writes a line straight to the console (last words: no logger involved).
pub fn write_line(text: &str) {
    let line = format!("{text}\r\n");
    match console_file() {
        Some(mut f) => {
            let _ = f.write_all(line.as_bytes());
        }
        None => {
            let _ = io::stderr().write_all(line.as_bytes());
        }
    }
}
