//! Starting a session's process: pipes or a pty, a session and process group of
//! its own (so signals reach the whole group), the controlling terminal, user and
//! groups, cwd and environment. Nothing here waits for a process: the reaper owns
//! `waitpid(-1)`.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use nix::fcntl::{FcntlArg, FdFlag, fcntl};
use nix::pty::{Winsize, openpty};
use nix::unistd::{Gid, Pid, Uid, User};
use proto_core::tether::Signal;

/// Bytes a process's output pipe holds.
const PIPE_SIZE: i32 = 1 << 20;

/// What to run.
pub struct SpawnSpec<'a> {
    pub cmd: &'a [String],
    pub env: &'a BTreeMap<String, String>,
    pub cwd: Option<&'a Path>,
    /// `name`, `uid`, `name:group` or `uid:gid`.
    pub user: Option<&'a str>,
    /// A terminal of this size (cols, rows), or pipes.
    pub tty: Option<(u16, u16)>,
    /// Whether the process gets a stdin pipe (a terminal always has input).
    pub stdin: bool,
}

/// A started process and our ends of its stdio.
pub struct Spawned {
    pub pid: Pid,
    /// Where its input goes (a pipe, or the pty master).
    pub stdin: Option<OwnedFd>,
    /// Its output (a pipe, or the pty master).
    pub stdout: OwnedFd,
    /// Its error output (a pipe; none with a terminal).
    pub stderr: Option<OwnedFd>,
    /// The pty master, for resizing.
    pub pty: Option<OwnedFd>,
}

/// Who the process runs as.
struct Identity {
    uid: Uid,
    gid: Gid,
    groups: Vec<Gid>,
    home: Option<String>,
}

fn resolve_user(spec: &str) -> io::Result<Identity> {
    let not_found =
        |what: &str| io::Error::new(io::ErrorKind::NotFound, format!("no such {what}: {spec:?}"));
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let entry = match user.parse::<u32>() {
        Ok(uid) => User::from_uid(Uid::from_raw(uid)).map_err(io::Error::from)?,
        Err(_) => Some(
            User::from_name(user)
                .map_err(io::Error::from)?
                .ok_or_else(|| not_found("user"))?,
        ),
    };
    let uid = entry
        .as_ref()
        .map(|u| u.uid)
        .unwrap_or_else(|| Uid::from_raw(user.parse().unwrap_or(0)));
    let gid = match group {
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => Gid::from_raw(gid),
            Err(_) => {
                nix::unistd::Group::from_name(g)
                    .map_err(io::Error::from)?
                    .ok_or_else(|| not_found("group"))?
                    .gid
            }
        },
        None => entry
            .as_ref()
            .map(|u| u.gid)
            .unwrap_or(Gid::from_raw(uid.as_raw())),
    };
    let groups = match &entry {
        Some(u) => {
            let name = CString::new(u.name.as_str()).map_err(|_| not_found("user"))?;
            nix::unistd::getgrouplist(&name, gid).unwrap_or_else(|_| vec![gid])
        }
        None => vec![gid],
    };
    Ok(Identity {
        uid,
        gid,
        groups,
        home: entry.map(|u| u.dir.display().to_string()),
    })
}

fn set_cloexec(fd: &impl AsFd) -> io::Result<()> {
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).map_err(io::Error::from)?;
    Ok(())
}

/// Starts the process. Errors name what failed (user lookup, pty, exec).
pub fn spawn(spec: &SpawnSpec<'_>) -> io::Result<Spawned> {
    let identity = spec.user.map(resolve_user).transpose()?;
    let mut command = Command::new(&spec.cmd[0]);
    command.args(&spec.cmd[1..]).env_clear();
    if let Some(home) = identity.as_ref().and_then(|i| i.home.as_ref()) {
        command.env("HOME", home);
    }
    command.envs(spec.env);
    if !spec.env.contains_key("PATH") {
        command.env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        );
    }
    if let Some(cwd) = spec.cwd {
        command.current_dir(cwd);
    }

    let mut pty_fds = None;
    if let Some((cols, rows)) = spec.tty {
        if !spec.env.contains_key("TERM") {
            command.env("TERM", "xterm");
        }
        let size = Winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        let pty = openpty(Some(&size), None)
            .map_err(|e| io::Error::new(io::Error::from(e).kind(), format!("openpty: {e}")))?;
        set_cloexec(&pty.master)?;
        set_cloexec(&pty.slave)?;
        command.stdin(Stdio::from(pty.slave.try_clone()?));
        command.stdout(Stdio::from(pty.slave.try_clone()?));
        command.stderr(Stdio::from(pty.slave.try_clone()?));
        pty_fds = Some(pty);
    } else {
        command.stdin(if spec.stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        });
        command.stdout(Stdio::piped());
        command.stderr(Stdio::piped());
    }

    let tty = spec.tty.is_some();
    let groups: Vec<nix::libc::gid_t> = identity
        .as_ref()
        .map(|i| i.groups.iter().map(|g| g.as_raw()).collect())
        .unwrap_or_default();
    let ids = identity.as_ref().map(|i| (i.uid, i.gid));
    // SAFETY: the closure runs in the forked child before exec and calls only
    // async-signal-safe system calls (setsid, ioctl, setgroups, setgid, setuid);
    // it allocates nothing (the group list was built before the fork).
    unsafe {
        command.pre_exec(move || {
            nix::unistd::setsid().map_err(io::Error::from)?;
            if tty && nix::libc::ioctl(0, nix::libc::TIOCSCTTY, 0) == -1 {
                return Err(io::Error::last_os_error());
            }
            if let Some((uid, gid)) = ids {
                if nix::libc::setgroups(groups.len(), groups.as_ptr()) == -1 {
                    return Err(io::Error::last_os_error());
                }
                nix::unistd::setgid(gid).map_err(io::Error::from)?;
                nix::unistd::setuid(uid).map_err(io::Error::from)?;
            }
            Ok(())
        });
    }
    let mut child = command
        .spawn()
        .map_err(|e| io::Error::new(e.kind(), format!("cannot run {:?}: {e}", spec.cmd[0])))?;
    let pid = Pid::from_raw(child.id() as i32);
    let spawned = match pty_fds {
        Some(pty) => {
            drop(pty.slave);
            Spawned {
                pid,
                stdin: Some(pty.master.try_clone()?),
                stdout: pty.master.try_clone()?,
                stderr: None,
                pty: Some(pty.master),
            }
        }
        None => {
            let stdout = OwnedFd::from(child.stdout.take().expect("piped"));
            let stderr = OwnedFd::from(child.stderr.take().expect("piped"));
            // A larger pipe means fewer wake-ups and less lock contention with a
            // fast writer; failing to grow it is harmless.
            for fd in [&stdout, &stderr] {
                let _ = fcntl(fd, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE));
            }
            Spawned {
                pid,
                stdin: child.stdin.take().map(OwnedFd::from),
                stdout,
                stderr: Some(stderr),
                pty: None,
            }
        }
    };
    // Dropping `Child` does not wait for it; the reaper collects its status.
    drop(child);
    Ok(spawned)
}

/// Sends `signal` to the process group led by `pid`.
pub fn signal_group(pid: Pid, signal: Signal) -> io::Result<()> {
    // Raw numbers, so real-time signals (`RTMIN+n`) reach the process too.
    // SAFETY: killpg takes two integers and touches no memory of ours.
    match unsafe { nix::libc::killpg(pid.as_raw(), signal.number()) } {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}

/// Sets a terminal's size (the kernel then sends SIGWINCH to its foreground group).
pub fn resize(pty: &OwnedFd, cols: u16, rows: u16) -> io::Result<()> {
    let size = Winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one `winsize` from the pointer, which outlives the call.
    let r = unsafe { nix::libc::ioctl(pty.as_raw_fd(), nix::libc::TIOCSWINSZ, &size) };
    if r == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// The terminal's end-of-file character (usually ^D).
pub fn eof_char(pty: &OwnedFd) -> u8 {
    nix::sys::termios::tcgetattr(pty)
        .map(|t| t.control_chars[nix::libc::VEOF])
        .unwrap_or(4)
}

/// Lets processes this one forks outlive their parents into our care, so the
/// reaper collects them (`PR_SET_CHILD_SUBREAPER`).
pub fn become_subreaper() -> io::Result<()> {
    nix::sys::prctl::set_child_subreaper(true).map_err(io::Error::from)
}
