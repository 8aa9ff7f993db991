//! The two stacks the end-to-end benches compare, started as a user would:
//! `tetherd serve` with a `tether` guest on loopback TCP (link sync on), and an
//! OpenSSH `sshd` on a high loopback port with a temporary host key and
//! authorized key. Both use aes256-gcm@openssh.com.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::measure::ProcCpu;
use e2e::api::ApiEndpoint;
use e2e::harness::{ChildGuard, Procs};
use e2e::peers::{Sshd, free_port, known_hosts_line, ssh_base, write_key_pair};

/// The cipher both stacks use (tether's default; OpenSSH is told to).
pub const CIPHER: &str = "aes256-gcm@openssh.com";

/// A binary of this workspace built in the same profile as the running one:
/// next to it (a `[[bin]]`) or one directory up (a bench or test in `deps/`).
pub fn sibling_binary(name: &str) -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let dir = exe.parent().ok_or("no executable directory")?;
    [dir.join(name), dir.join("..").join(name)]
        .into_iter()
        .find(|p| p.exists())
        .ok_or_else(|| format!("{name} is not built: run `cargo build --release --bins` first"))
}

/// `tetherd serve` and one `tether` guest serving `sessions` (config
/// `sessions` entries) over a loopback TCP link.
pub struct Tether {
    pub tetherd: PathBuf,
    pub api: ApiEndpoint,
    serve: ChildGuard,
    guest: ChildGuard,
}

impl Tether {
    /// Starts both and waits until the guest's sessions are listed.
    pub fn start(
        procs: &Procs,
        dir: &Path,
        api: ApiEndpoint,
        sessions: serde_json::Value,
    ) -> Result<Self, String> {
        let (tether, tetherd) = (sibling_binary("tether")?, sibling_binary("tetherd")?);
        let guest_port = free_port().map_err(|e| e.to_string())?;
        let run = |args: &[&str]| -> Result<(), String> {
            let out = Command::new(&tetherd)
                .args(args)
                .stdin(Stdio::null())
                .output()
                .map_err(|e| e.to_string())?;
            out.status.success().then_some(()).ok_or_else(|| {
                format!("tetherd {args:?}: {}", String::from_utf8_lossy(&out.stderr))
            })
        };
        let path = |p: PathBuf| p.to_string_lossy().into_owned();
        let key = path(dir.join("appliance.key"));
        let config = dir.join("guest.json");
        run(&["keygen", "--out", &key])?;
        // A ready config (host key, appliance key, link); the sessions are ours.
        run(&[
            "guest-config",
            "--id",
            "bench",
            "--key",
            &format!("{key}.pub"),
            "--link",
            &format!("tcp:127.0.0.1:{guest_port}"),
            "--out",
            &path(config.clone()),
            "--",
            "true",
        ])?;
        let text = std::fs::read_to_string(&config).map_err(|e| e.to_string())?;
        let mut json: serde_json::Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
        let ids: Vec<String> = sessions
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s["id"].as_str().map(String::from))
            .collect();
        json["sessions"] = sessions;
        std::fs::write(&config, json.to_string()).map_err(|e| e.to_string())?;
        let log = |name: &str| std::fs::File::create(dir.join(name)).map_err(|e| e.to_string());
        let serve = procs
            .spawn(
                Command::new(&tetherd)
                    .args(["serve", "--listen", &format!("127.0.0.1:{guest_port}")])
                    .args(api.serve_args())
                    .args(["--key", &key, "--accept-any-host-key", "--state-dir"])
                    .arg(dir.join("state"))
                    .env("TETHERD_LOG", "warn")
                    .stdin(Stdio::null())
                    .stderr(log("tetherd.log")?),
            )
            .map_err(|e| e.to_string())?;
        let guest = procs
            .spawn(
                Command::new(&tether)
                    .arg("--config")
                    .arg(&config)
                    .env("TETHER_LOG", "warn")
                    .stdin(Stdio::null())
                    .stderr(log("tether.log")?),
            )
            .map_err(|e| e.to_string())?;
        let this = Self {
            tetherd,
            api,
            serve,
            guest,
        };
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            let listed = this.cli(&["ls"]).output().map_err(|e| e.to_string())?;
            let text = String::from_utf8_lossy(&listed.stdout);
            if ids
                .iter()
                .all(|id| text.lines().any(|l| l.starts_with(id.as_str())))
            {
                return Ok(this);
            }
            if Instant::now() > end {
                return Err(format!("the guest's sessions never appeared: {text}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The CPU time used so far by `tetherd serve` and by the guest (with
    /// the processes it ran and reaped).
    pub fn cpu(&self) -> Result<(Duration, Duration), String> {
        Ok((
            ProcCpu::of(self.serve.pid())?.own,
            ProcCpu::of(self.guest.pid())?.total(),
        ))
    }

    /// A `tetherd` client command pointed at this appliance.
    pub fn cli(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.tetherd);
        c.args(args).env("TETHERD_LOG", "warn");
        self.api.client_env(&mut c);
        c
    }
}

/// An `sshd` of its own and the `ssh` command line that reaches it.
pub struct OpenSsh {
    key: PathBuf,
    known: PathBuf,
    sshd: Sshd,
}

impl OpenSsh {
    /// Starts sshd (needs root: it logs in as e2e's user, created if missing).
    pub fn start(procs: &Procs, dir: &Path) -> Result<Self, String> {
        let user = e2e::peers::new_key();
        let sshd = Sshd::start(procs, dir, user.public())?;
        let key = dir.join("user_key");
        write_key_pair(&key, &user).map_err(|e| e.to_string())?;
        let known = dir.join("known_hosts");
        std::fs::write(&known, known_hosts_line(sshd.addr, sshd.host_key.public()))
            .map_err(|e| e.to_string())?;
        Ok(Self { key, known, sshd })
    }

    /// The listening sshd's pid: its sessions are the processes below it.
    pub fn pid(&self) -> u32 {
        self.sshd.pid()
    }

    /// `ssh` with the bench's cipher, before the remote command.
    pub fn ssh(&self) -> Command {
        let mut c = ssh_base(
            &self.key,
            &self.known,
            self.sshd.addr,
            e2e::peers::SSHD_USER,
        );
        c.arg("-o").arg(format!("Ciphers={CIPHER}"));
        c
    }
}
