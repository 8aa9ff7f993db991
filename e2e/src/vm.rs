//! Real VMs in tests: the prerequisites (QEMU, Debian's kernel, an initramfs
//! built by `scripts/build-initramfs`), a `tetherd serve` with its own state
//! directory that boots them, and cleanup of every hypervisor it started.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::api::ApiEndpoint;
use crate::fixtures::{binary, guest_binary};
use crate::harness::{ChildGuard, Procs};
use crate::peers::free_port;

/// What booting a VM needs.
#[derive(Debug, Clone)]
pub struct VmFiles {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

/// The kernel and initramfs, or why VMs cannot run here (built once per test binary).
pub fn prerequisites() -> Result<VmFiles, String> {
    static FILES: OnceLock<Result<VmFiles, String>> = OnceLock::new();
    FILES.get_or_init(find_files).clone()
}

fn find_files() -> Result<VmFiles, String> {
    let qemu = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .map_err(|e| format!("qemu-system-x86_64: {e} (apt-get install qemu-system-x86)"))?;
    if !qemu.status.success() {
        return Err("qemu-system-x86_64 --version failed".into());
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/build-initramfs");
    let mut cmd = Command::new(&script);
    cmd.arg("--no-install").arg("--tether").arg(guest_binary());
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{}: {e}", script.display()))?;
    if !out.status.success() {
        return Err(format!(
            "scripts/build-initramfs failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .map(|p| PathBuf::from(p.trim()))
    };
    match (line("kernel "), line("initramfs ")) {
        (Some(kernel), Some(initrd)) => Ok(VmFiles { kernel, initrd }),
        _ => Err(format!("scripts/build-initramfs printed {text:?}")),
    }
}

/// A `tetherd serve` that boots VMs, with a state directory of its own.
pub struct VmServe {
    pub api: ApiEndpoint,
    pub state: PathBuf,
    /// Where guest RAM files go (`--shm-dir`): a tmpfs directory of this
    /// server's own, so nothing is left in /dev/shm.
    pub shm: PathBuf,
    _shm: tempfile::TempDir,
    _dir: tempfile::TempDir,
    _serve: ChildGuard,
}

impl VmServe {
    /// Starts `tetherd serve` booting `files` on `accel` (`auto`, `tcg`, `kvm`).
    pub fn start(procs: &Procs, files: &VmFiles, accel: &str) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let state = dir.path().join("state");
        let shm_dir = tempfile::Builder::new()
            .prefix("tether-e2e-")
            .tempdir_in("/dev/shm")
            .or_else(|_| tempfile::tempdir())
            .expect("shm dir");
        let shm = shm_dir.path().to_path_buf();
        let api = ApiEndpoint::unix(dir.path());
        let listen = format!("127.0.0.1:{}", free_port().expect("free port"));
        let mut cmd = Command::new(binary("tetherd"));
        cmd.args(["serve", "--listen", &listen, "--accel", accel])
            .args(api.serve_args())
            .arg("--state-dir")
            .arg(&state)
            .arg("--shm-dir")
            .arg(&shm)
            .arg("--kernel")
            .arg(&files.kernel)
            .arg("--initrd")
            .arg(&files.initrd)
            .env("TETHERD_LOG", "info,runtime_appliance=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.path().join("tetherd.log")).expect("log file"));
        let serve = procs.spawn(&mut cmd).expect("start tetherd serve");
        api.wait_ready();
        Self {
            api,
            state,
            shm,
            _shm: shm_dir,
            _dir: dir,
            _serve: serve,
        }
    }

    /// A `tetherd` client command against this server.
    pub fn cli(&self) -> Command {
        let mut c = Command::new(binary("tetherd"));
        self.api.client_env(&mut c).stdin(Stdio::null());
        c
    }

    /// Runs a client command to completion.
    pub fn run_cli(&self, args: &[&str]) -> Output {
        self.cli().args(args).output().expect("run tetherd")
    }

    /// One HTTP request; returns the status and the body parsed as JSON
    /// (`Null` for an empty or non-JSON body).
    pub fn http(&self, method: &str, path: &str, body: Option<&str>) -> (u16, serde_json::Value) {
        let (status, body) = self.api.http(method, path, &[], body.unwrap_or(""));
        (status, serde_json::from_str(&body).unwrap_or_default())
    }

    /// A VM's console log (for failure messages).
    pub fn console(&self, id: &str) -> String {
        fs::read_to_string(self.state.join("vms").join(id).join("console.log")).unwrap_or_default()
    }

    /// tetherd's own log (for failure messages).
    pub fn log(&self) -> String {
        fs::read_to_string(
            self.state
                .parent()
                .unwrap_or(&self.state)
                .join("tetherd.log"),
        )
        .unwrap_or_default()
    }

    /// Waits until `check` holds for `GET /v1/node`, or panics with `what`.
    pub fn wait_node(
        &self,
        what: &str,
        limit: Duration,
        check: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let end = Instant::now() + limit;
        loop {
            let (status, node) = self.http("GET", "/v1/node", None);
            if status == 200 && check(&node) {
                return node;
            }
            assert!(
                Instant::now() < end,
                "{what}: not within {limit:?}; last /v1/node: {node}\ntetherd log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The hypervisor pids this server started (from `STATE/vms/*/qemu.pid`).
    pub fn qemu_pids(&self) -> Vec<u32> {
        let Ok(entries) = fs::read_dir(self.state.join("vms")) else {
            return Vec::new();
        };
        entries
            .filter_map(|e| e.ok())
            .filter_map(|e| fs::read_to_string(e.path().join("qemu.pid")).ok())
            .filter_map(|p| p.trim().parse().ok())
            .collect()
    }
}

impl Drop for VmServe {
    fn drop(&mut self) {
        // QEMU runs in its own process group and outlives tetherd: end it here.
        for pid in self.qemu_pids() {
            let is_qemu = fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains("qemu"));
            if is_qemu {
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
        }
    }
}

/// The VM of `id` in a `/v1/node` answer.
pub fn vm_of<'a>(node: &'a serde_json::Value, id: &str) -> Option<&'a serde_json::Value> {
    node["vms"].as_array()?.iter().find(|v| v["id"] == id)
}

/// A QMP session with a VM that `tetherd serve` started (its socket is in the
/// VM's directory): for tests that press buttons tetherd has no route for,
/// such as hotplugging devices.
pub struct QmpSession {
    reader: std::io::BufReader<std::os::unix::net::UnixStream>,
    writer: std::os::unix::net::UnixStream,
}

impl QmpSession {
    /// Connects to VM `id` (waiting up to `wait` for its socket) and
    /// negotiates capabilities.
    pub fn connect(serve: &VmServe, id: &str, wait: Duration) -> Self {
        let path = serve.state.join("vms").join(id).join("qmp.sock");
        let end = Instant::now() + wait;
        let stream = loop {
            match std::os::unix::net::UnixStream::connect(&path) {
                Ok(s) => break s,
                Err(e) if Instant::now() < end => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!("QMP socket {}: {e}", path.display()),
            }
        };
        let writer = stream.try_clone().expect("clone the QMP socket");
        let mut qmp = Self {
            reader: std::io::BufReader::new(stream),
            writer,
        };
        let greeting = qmp.next_message();
        assert!(
            greeting.get("QMP").is_some(),
            "not a QMP greeting: {greeting}"
        );
        qmp.execute("qmp_capabilities", serde_json::json!({}));
        qmp
    }

    fn next_message(&mut self) -> serde_json::Value {
        use std::io::BufRead;
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("read from QMP");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("QMP said {line:?}: {e}"))
    }

    /// Runs a command; its `return` value (events in between are skipped).
    /// A QMP error fails the test.
    pub fn execute(&mut self, command: &str, arguments: serde_json::Value) -> serde_json::Value {
        let request = serde_json::json!({"execute": command, "arguments": arguments});
        writeln!(self.writer, "{request}").expect("write to QMP");
        loop {
            let reply = self.next_message();
            if let Some(value) = reply.get("return") {
                return value.clone();
            }
            if let Some(error) = reply.get("error") {
                panic!("QMP {command}: {error}");
            }
        }
    }
}

/// An ext4 image of `mib` MiB labelled `label`, holding `files` (name,
/// contents), made with `mkfs.ext4 -d` (e2fsprogs).
pub fn ext4_image(
    dir: &Path,
    name: &str,
    label: &str,
    mib: u64,
    files: &[(&str, &str)],
) -> Result<PathBuf, String> {
    let content = dir.join(format!("{name}.d"));
    fs::create_dir_all(&content).map_err(|e| e.to_string())?;
    for (file, text) in files {
        fs::write(content.join(file), text).map_err(|e| e.to_string())?;
    }
    let image = dir.join(format!("{name}.img"));
    let f = fs::File::create(&image).map_err(|e| e.to_string())?;
    f.set_len(mib << 20).map_err(|e| e.to_string())?;
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", label, "-d"])
        .arg(&content)
        .arg(&image)
        .output()
        .map_err(|e| format!("mkfs.ext4: {e} (apt-get install e2fsprogs)"))?;
    if !out.status.success() {
        return Err(format!(
            "mkfs.ext4: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(image)
}
