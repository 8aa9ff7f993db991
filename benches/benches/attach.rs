//! End-to-end attach throughput: a process's stdout -> `tether` -> loopback TCP
//! (link sync on) -> `tetherd` -> WebSocket reader, beside OpenSSH in the same
//! run: `sshd` -> `ssh host cat` of the same file. Both reuse one connection
//! (tetherd's guest link; ssh's ControlMaster), so every iteration is one new
//! session (an exec) streaming the whole file; both use aes256-gcm.
//!
//! Needs the release binaries (`cargo build --release --bins`) and, for the
//! OpenSSH half, `sshd` and root (the login user is created as in e2e); a
//! missing piece skips that half with a printed reason.

use std::io::Read;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use e2e::harness::{ChildGuard, Procs};
use e2e::peers::free_port;
use tungstenite::client::IntoClientRequest;
use tungstenite::{Message, http::HeaderValue};

/// Bytes streamed per iteration.
const SIZE: usize = 256 << 20;

fn release_binary(name: &str) -> Option<PathBuf> {
    benches::stack::sibling_binary(name).ok()
}

/// `tether` + `tetherd serve` set up as the README's tour does.
struct Tether {
    api: String,
    _children: Vec<ChildGuard>,
}

impl Tether {
    fn start(procs: &Procs, dir: &Path) -> Option<Self> {
        let (tether, tetherd) = (release_binary("tether")?, release_binary("tetherd")?);
        let (guest_port, api_port) = (free_port().ok()?, free_port().ok()?);
        let run = |args: &[&str]| {
            Command::new(&tetherd)
                .args(args)
                .stdout(Stdio::null())
                .status()
                .map(|s| s.success())
        };
        let key = dir.join("appliance.key");
        let (key_s, pub_s, known) = (
            key.to_str()?,
            format!("{}.pub", key.to_str()?),
            dir.join("known"),
        );
        run(&["keygen", "--out", key_s]).ok()?;
        let link = format!("tcp:127.0.0.1:{guest_port}");
        let out = dir.join("guest.json");
        run(&[
            "guest-config",
            "--id",
            "bench",
            "--key",
            &pub_s,
            "--known-guests",
            known.to_str()?,
            "--link",
            &link,
            "--out",
            out.to_str()?,
            "--",
            // Runs until its tether goes (killed at the end, tether leaves
            // its sessions behind).
            "sh",
            "-c",
            "while kill -0 $PPID 2>/dev/null; do sleep 1; done",
        ])
        .ok()?;
        let api = format!("127.0.0.1:{api_port}");
        let serve = procs
            .spawn(
                Command::new(&tetherd)
                    .args([
                        "serve",
                        "--listen",
                        &format!("127.0.0.1:{guest_port}"),
                        "--api",
                        &api,
                        // Loopback, for the length of a bench run.
                        "--api-no-auth",
                        "--key",
                        key_s,
                        "--known-guests",
                        known.to_str()?,
                    ])
                    .env("TETHERD_LOG", "warn")
                    .stdin(Stdio::null()),
            )
            .ok()?;
        let guest = procs
            .spawn(
                Command::new(&tether)
                    .arg("--config")
                    .arg(&out)
                    .env("TETHER_LOG", "warn")
                    .stdin(Stdio::null()),
            )
            .ok()?;
        let end = Instant::now() + Duration::from_secs(20);
        while !running(&api) {
            if Instant::now() > end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(Self {
            api,
            _children: vec![serve, guest],
        })
    }

    /// Streams `file` through an exec over the WebSocket API; returns the bytes read.
    fn cat(&self, file: &Path) -> usize {
        let url = format!(
            "ws://{}/v1/containers/bench/exec?command=cat&command={}&stdout=1&stderr=1",
            self.api,
            file.display()
        );
        let mut request = url.into_client_request().expect("request");
        request.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            HeaderValue::from_static("v5.channel.k8s.io"),
        );
        let (mut ws, _) = tungstenite::connect(request).expect("websocket");
        let mut n = 0;
        loop {
            match ws.read() {
                Ok(Message::Binary(m)) if m.first() == Some(&1) => n += m.len() - 1,
                Ok(Message::Binary(m)) if m.first() == Some(&3) => break,
                Ok(Message::Close(_)) | Err(_) => break,
                Ok(_) => {}
            }
        }
        n
    }
}

fn running(api: &str) -> bool {
    let Ok(mut s) = TcpStream::connect(api) else {
        return false;
    };
    use std::io::Write;
    let _ = write!(
        s,
        "GET /v1/containers/bench HTTP/1.1\r\nHost: {api}\r\nConnection: close\r\n\r\n"
    );
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.contains("\"running\"")
}

/// `sshd` and a ControlMaster `ssh` to it.
struct OpenSsh {
    stack: benches::stack::OpenSsh,
    control: PathBuf,
    _master: ChildGuard,
}

impl OpenSsh {
    fn start(procs: &Procs, dir: &Path) -> Result<Self, String> {
        let stack = benches::stack::OpenSsh::start(procs, dir)?;
        let control = dir.join("cm");
        let master = procs
            .spawn(
                stack
                    .ssh()
                    .arg("-o")
                    .arg(format!("ControlPath={}", control.display()))
                    .args(["-M", "-N"])
                    .stdin(Stdio::null())
                    .stderr(Stdio::null()),
            )
            .map_err(|e| e.to_string())?;
        let end = Instant::now() + Duration::from_secs(10);
        while !control.exists() {
            if Instant::now() > end {
                return Err("the ssh ControlMaster did not start".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Self {
            stack,
            control,
            _master: master,
        })
    }

    fn cat(&self, file: &Path) -> usize {
        let mut child = self
            .stack
            .ssh()
            .arg("-o")
            .arg(format!("ControlPath={}", self.control.display()))
            .arg(format!("cat {}", file.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("ssh");
        let mut out = child.stdout.take().expect("stdout");
        let mut buf = vec![0u8; 256 * 1024];
        let mut n = 0;
        loop {
            match out.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(k) => n += k,
            }
        }
        let _ = child.wait();
        n
    }
}

fn attach(c: &mut Criterion) {
    let procs = Procs::default();
    let dir = tempfile::Builder::new()
        .prefix("tether-bench")
        .tempdir()
        .expect("tempdir");
    let file = dir.path().join("data");
    std::fs::write(&file, e2e::pattern(SIZE)).expect("data file");
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("dir mode");
    let mut group = c.benchmark_group("attach");
    group
        .throughput(Throughput::Bytes(SIZE as u64))
        .sample_size(10)
        .measurement_time(Duration::from_secs(10));
    match Tether::start(&procs, dir.path()) {
        Some(t) => {
            assert_eq!(t.cat(&file), SIZE, "tether delivered every byte");
            group.bench_function("tether_websocket", |b| b.iter(|| t.cat(&file)));
        }
        None => eprintln!(
            "SKIPPED attach/tether_websocket: build the release binaries first (cargo build --release --bins)"
        ),
    }
    match OpenSsh::start(&procs, dir.path()) {
        Ok(s) => {
            assert_eq!(s.cat(&file), SIZE, "ssh delivered every byte");
            group.bench_function("openssh_cat", |b| b.iter(|| s.cat(&file)));
        }
        Err(e) => eprintln!("SKIPPED attach/openssh_cat: {e}"),
    }
    group.finish();
    procs.kill_all();
}

criterion_group!(benches, attach);
criterion_main!(benches);
