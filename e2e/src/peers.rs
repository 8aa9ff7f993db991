//! Real peers and their files: finding `ssh`, `sshd` and a Python with
//! AsyncSSH; key, known_hosts and sshd_config files; a non-root login user for
//! sshd; starting our server or sshd on a free loopback port.

use std::fs;
use std::io::{self, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use proto_core::{ClientConfig, Config, HostKeyPolicy, PrivateKey, PublicKey, ServerConfig};

use crate::harness::{ChildGuard, Procs};
use crate::server::{Server, serve};

/// The login user the sshd tests create (sshd refuses `signal` for root logins).
pub const SSHD_USER: &str = "tetherssh";

/// `/usr/bin/ssh`, if installed.
pub fn ssh_binary() -> Result<PathBuf, String> {
    executable(
        "/usr/bin/ssh",
        "OpenSSH client (Debian package openssh-client)",
    )
}

/// `/usr/sbin/sshd`, if installed.
pub fn sshd_binary() -> Result<PathBuf, String> {
    executable(
        "/usr/sbin/sshd",
        "OpenSSH server (Debian package openssh-server)",
    )
}

fn executable(path: &str, what: &str) -> Result<PathBuf, String> {
    let p = PathBuf::from(path);
    match fs::metadata(&p) {
        Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => Ok(p),
        _ => Err(format!("{path} is missing: install the {what}")),
    }
}

/// A Python interpreter that can import asyncssh: `$TETHER_PYTHON`, else
/// `.venv/bin/python` at the workspace root, else `python3`.
pub fn python_with_asyncssh() -> Result<PathBuf, String> {
    python_with("asyncssh")
}

/// A Python interpreter (chosen as for asyncssh) that can import `module`.
pub fn python_with(module: &str) -> Result<PathBuf, String> {
    let python = match std::env::var_os("TETHER_PYTHON") {
        Some(p) => PathBuf::from(p),
        None => {
            let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
            if venv.exists() {
                venv
            } else {
                PathBuf::from("python3")
            }
        }
    };
    let out = Command::new(&python)
        .args(["-c", &format!("import {module}")])
        .output()
        .map_err(|e| format!("cannot run {}: {e}", python.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} cannot import {module} (set TETHER_PYTHON, or create .venv with scripts/requirements.txt): {}",
            python.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(python)
}

/// Writes `contents` to `path` with `mode` (created or truncated).
pub fn write_file(path: &Path, contents: &str, mode: u32) -> io::Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)?;
    f.write_all(contents.as_bytes())?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
}

/// Writes an OpenSSH private key file (mode 0600) and `PATH.pub` (0644).
pub fn write_key_pair(path: &Path, key: &PrivateKey) -> io::Result<()> {
    write_file(path, &key.to_openssh("tether-e2e"), 0o600)?;
    write_file(
        &path.with_extension("pub"),
        &format!("{}\n", key.public().to_openssh()),
        0o644,
    )
}

/// A `known_hosts` line for `key` at `addr` (OpenSSH's `[host]:port` form).
pub fn known_hosts_line(addr: SocketAddr, key: &PublicKey) -> String {
    format!("[{}]:{} {}\n", addr.ip(), addr.port(), key.to_openssh())
}

/// A fresh key from the OS RNG.
pub fn new_key() -> PrivateKey {
    PrivateKey::generate(&mut rand_core::OsRng)
}

/// A client config for `user` with `key`, pinning `host`.
pub fn client_config(user: &str, key: &PrivateKey, host: &PublicKey) -> Config {
    Config::client(ClientConfig {
        user: user.into(),
        key: Some(key.clone()),
        host_keys: HostKeyPolicy::Pinned(vec![*host]),
    })
}

/// Our server on a free loopback port, plus the files a real client needs.
pub struct TestServer {
    pub server: Server,
    pub host_key: PrivateKey,
    pub client_key: PrivateKey,
    /// The client's private key file.
    pub client_key_path: PathBuf,
    /// A known_hosts file naming the server.
    pub known_hosts: PathBuf,
}

impl TestServer {
    /// Starts our server with fresh keys; `tweak` may change its config. Files go to `dir`.
    pub fn start(dir: &Path, tweak: impl FnOnce(&mut Config)) -> io::Result<Self> {
        let (host_key, client_key) = (new_key(), new_key());
        let mut config = Config::server(ServerConfig::new(
            host_key.clone(),
            vec![*client_key.public()],
        ));
        tweak(&mut config);
        let server = serve(TcpListener::bind("127.0.0.1:0")?, config)?;
        let client_key_path = dir.join("client_ed25519");
        write_key_pair(&client_key_path, &client_key)?;
        let known_hosts = dir.join("known_hosts");
        write_file(
            &known_hosts,
            &known_hosts_line(server.addr(), host_key.public()),
            0o644,
        )?;
        Ok(Self {
            server,
            host_key,
            client_key,
            client_key_path,
            known_hosts,
        })
    }

    /// A client config that trusts this server and holds its authorized key.
    pub fn client_config(&self) -> Config {
        client_config("tester", &self.client_key, self.host_key.public())
    }

    /// An `ssh` command for this server, with `cipher` and curve25519-sha256;
    /// append options and the remote command.
    pub fn ssh(&self, cipher: &str) -> Command {
        let mut cmd = ssh_base(
            &self.client_key_path,
            &self.known_hosts,
            self.server.addr(),
            "tester",
        );
        cmd.args(["-o", "KexAlgorithms=curve25519-sha256", "-c", cipher]);
        cmd
    }
}

/// `ssh` with no config files, agent or prompts, our key and known_hosts only.
/// Options for the connection may still be appended before the destination is
/// used: OpenSSH takes options anywhere before the remote command.
pub fn ssh_base(key: &Path, known_hosts: &Path, addr: SocketAddr, user: &str) -> Command {
    let mut cmd = Command::new("/usr/bin/ssh");
    cmd.arg("-F").arg("/dev/null").arg("-i").arg(key);
    for opt in [
        "IdentitiesOnly=yes",
        "IdentityAgent=none",
        "BatchMode=yes",
        "StrictHostKeyChecking=yes",
        "GlobalKnownHostsFile=/dev/null",
        "HostKeyAlgorithms=ssh-ed25519",
        "ConnectTimeout=10",
    ] {
        cmd.arg("-o").arg(opt);
    }
    cmd.arg("-o")
        .arg(format!("UserKnownHostsFile={}", known_hosts.display()));
    cmd.arg("-p")
        .arg(addr.port().to_string())
        .arg("-l")
        .arg(user)
        .arg(addr.ip().to_string());
    cmd
}

/// Creates [`SSHD_USER`] if missing (root only): unlocked (password `*`, so
/// sshd with `UsePAM no` lets keys in) and in group `tty` (for ptys).
pub fn ensure_login_user() -> Result<(), String> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        if !nix::unistd::Uid::effective().is_root() {
            return Err("creating the sshd login user needs root".into());
        }
        let exists = nix::unistd::User::from_name(SSHD_USER)
            .ok()
            .flatten()
            .is_some();
        if !exists {
            run(Command::new("useradd").args(["-m", "-s", "/bin/sh", SSHD_USER]))?;
        }
        run(Command::new("usermod").args(["-p", "*", "-aG", "tty", SSHD_USER]))
    })
    .clone()
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A free loopback port (bound, then released for a child to take).
pub fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// An OpenSSH sshd started by the test, with its own config and keys in a directory.
pub struct Sshd {
    pub addr: SocketAddr,
    pub host_key: PrivateKey,
    /// Where sshd's log (`-e`) goes.
    pub log: PathBuf,
    child: ChildGuard,
}

impl Sshd {
    /// The listening sshd's pid (its sessions are its children).
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// Starts sshd on a free port, authorizing `user_key` for [`SSHD_USER`].
    /// `dir` must be readable by that user (sshd reads the authorized keys as it).
    pub fn start(procs: &Procs, dir: &Path, user_key: &PublicKey) -> Result<Self, String> {
        let sshd = sshd_binary()?;
        ensure_login_user()?;
        let io = |e: io::Error| format!("sshd setup: {e}");
        fs::create_dir_all("/run/sshd").map_err(io)?; // privilege separation directory
        fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).map_err(io)?;
        let host_key = new_key();
        let host_key_path = dir.join("ssh_host_ed25519_key");
        write_key_pair(&host_key_path, &host_key).map_err(io)?;
        let authorized = dir.join("authorized_keys");
        write_file(&authorized, &format!("{}\n", user_key.to_openssh()), 0o644).map_err(io)?;
        let config = dir.join("sshd_config");
        let text = format!(
            "ListenAddress 127.0.0.1\nHostKey {}\nAuthorizedKeysFile {}\nPubkeyAuthentication yes\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n\
             PidFile none\nLogLevel VERBOSE\n",
            host_key_path.display(),
            authorized.display()
        );
        write_file(&config, &text, 0o644).map_err(io)?;
        let log = dir.join("sshd.log");
        let port = free_port().map_err(io)?;
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let mut cmd = Command::new(sshd);
        cmd.arg("-D")
            .arg("-e")
            .arg("-f")
            .arg(&config)
            .arg("-p")
            .arg(port.to_string());
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).map_err(io)?);
        let mut child = procs
            .spawn(&mut cmd)
            .map_err(|e| format!("start sshd: {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if TcpStream::connect(addr).is_ok() {
                break;
            }
            let exited = child.child().try_wait().ok().flatten();
            if exited.is_some() || Instant::now() > deadline {
                let text = fs::read_to_string(&log).unwrap_or_default();
                return Err(format!(
                    "sshd did not start listening on {addr} ({exited:?}); its log:\n{text}"
                ));
            }
            thread::sleep(Duration::from_millis(20));
        }
        Ok(Self {
            addr,
            host_key,
            log,
            child,
        })
    }

    /// sshd's log so far (for failure messages).
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}
