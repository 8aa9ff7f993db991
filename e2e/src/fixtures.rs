//! Fixtures for tests of `tether` and `tetherd` together: the built binaries, a
//! guest launcher, an in-process appliance, and a TCP proxy that can cut, stall
//! or corrupt a link on command.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use proto_core::{PrivateKey, PublicKey};
use runtime_appliance::Appliance;

use crate::harness::{ChildGuard, Procs};

/// A binary of this workspace (`tether`, `tetherd`), built next to the tests.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target directory");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is not built: run `cargo build --release --bins` first (scripts/test does)",
        path.display()
    );
    path
}

/// The `tether` a VM boots: the guest profile's smaller build
/// (`target/guest/tether`, which scripts/test builds) when it is at least as
/// new as the release build, else the release build.
pub fn guest_binary() -> PathBuf {
    let release = binary("tether");
    let small = release
        .parent()
        .and_then(Path::parent)
        .map(|t| t.join("guest").join("tether"));
    let modified = |p: &Path| p.metadata().and_then(|m| m.modified()).ok();
    match small {
        Some(small) if modified(&small) >= modified(&release) => small,
        _ => release,
    }
}

/// A key from a seed, so tests are reproducible.
pub fn key(seed: u8) -> PrivateKey {
    PrivateKey::from_seed([seed; 32])
}

/// An appliance running in this process, with a guest listener (link sync on).
pub struct Fixture {
    pub appliance: Appliance,
    pub key: PrivateKey,
    /// The listener guests dial (link sync on).
    pub addr: SocketAddr,
}

impl Fixture {
    /// This fixture's appliance keeping container output and records in
    /// `dir/containers` (the default log limits).
    pub fn appliance_with_store(&self, dir: &std::path::Path) -> Appliance {
        let limits = runtime_appliance::store::Limits::default();
        self.appliance
            .clone()
            .with_store(&dir.join("containers"), limits)
            .expect("open the store")
    }

    /// An appliance that trusts any guest host key.
    pub fn new() -> Self {
        Self::with_known(None)
    }

    /// An appliance that pins guest host keys (container id -> key).
    pub fn with_known(known: Option<HashMap<String, PublicKey>>) -> Self {
        let key = key(200);
        let appliance = Appliance::new(key.clone(), known);
        let addr = appliance
            .spawn_listener("127.0.0.1:0".parse().expect("address"), true)
            .expect("bind guest listener");
        Self {
            appliance,
            key,
            addr,
        }
    }

    /// A guest config for container `id` running `cmd`, linked to this appliance
    /// through `link` (default: its sync listener).
    pub fn config(&self, id: &str, cmd: &[&str]) -> serde_json::Value {
        let host = key(id
            .bytes()
            .fold(7u8, |a, b| a.wrapping_mul(31).wrapping_add(b)));
        serde_json::json!({
            "id": id,
            "host_key": host.to_openssh(id),
            "authorized_keys": [self.key.public().to_openssh()],
            "link": format!("tcp:{}", self.addr),
            "exit_linger": "5s",
            "sessions": [{ "id": id, "cmd": cmd }],
        })
    }
}

impl Default for Fixture {
    fn default() -> Self {
        Self::new()
    }
}

/// The guest host key `Fixture::config` gives container `id`.
pub fn host_key_of(id: &str) -> PrivateKey {
    key(id
        .bytes()
        .fold(7u8, |a, b| a.wrapping_mul(31).wrapping_add(b)))
}

/// A running `tether`.
pub struct Guest {
    pub child: ChildGuard,
    pub log: PathBuf,
}

impl Guest {
    /// Starts `tether` with `config` (written under `dir`); its log goes to a file.
    pub fn start(procs: &Procs, dir: &Path, config: &serde_json::Value) -> Self {
        let id = config["id"].as_str().unwrap_or("guest");
        let path = dir.join(format!("{id}.json"));
        std::fs::write(&path, config.to_string()).expect("write config");
        let log = dir.join(format!("{id}.log"));
        let child = procs
            .spawn(
                Command::new(binary("tether"))
                    .arg("--config")
                    .arg(&path)
                    .env("TETHER_LOG", "debug")
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(std::fs::File::create(&log).expect("log file")),
            )
            .expect("start tether");
        Self { child, log }
    }

    /// The guest's process id.
    pub fn child_pid(&mut self) -> u32 {
        self.child.child().id()
    }

    /// The guest's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for the guest to exit, up to `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let end = Instant::now() + limit;
        while Instant::now() < end {
            if let Ok(Some(status)) = self.child.child().try_wait() {
                return Some(status);
            }
            thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

/// Which way bytes go through a [`Proxy`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// From the guest (the proxy's client) to the appliance (its upstream).
    ToAppliance,
    /// From the appliance to the guest.
    ToGuest,
}

#[derive(Default)]
struct ProxyState {
    conns: Vec<(TcpStream, TcpStream)>,
    stalled: bool,
    inject: HashMap<bool, Vec<u8>>,
    /// Flip bit 0x10 of the byte this many bytes ahead in this direction, once.
    flip: Option<(Dir, u64)>,
    /// Cut every connection after this many more bytes in this direction, once.
    cut_at: Option<(Dir, u64)>,
    /// Cuts done by `cut_at`.
    cuts: u32,
    accepted: u32,
}

/// A TCP proxy between a guest and the appliance that can cut, stall or
/// corrupt what passes. Clones control the same proxy.
#[derive(Clone)]
pub struct Proxy {
    pub addr: SocketAddr,
    state: Arc<Mutex<ProxyState>>,
}

impl Proxy {
    /// A proxy to `upstream`.
    pub fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let state = Arc::new(Mutex::new(ProxyState::default()));
        let st = state.clone();
        thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(upstream) else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                {
                    let mut s = st.lock().unwrap();
                    s.accepted += 1;
                    s.conns
                        .push((client.try_clone().unwrap(), server.try_clone().unwrap()));
                }
                for (from, to, dir) in [
                    (
                        client.try_clone().unwrap(),
                        server.try_clone().unwrap(),
                        Dir::ToAppliance,
                    ),
                    (server, client, Dir::ToGuest),
                ] {
                    let st = st.clone();
                    thread::spawn(move || pump(from, to, dir, st));
                }
            }
        });
        Self { addr, state }
    }

    /// Drops every connection through the proxy (both directions, at once).
    pub fn cut(&self) {
        for (a, b) in self.state.lock().unwrap().conns.drain(..) {
            let _ = a.shutdown(Shutdown::Both);
            let _ = b.shutdown(Shutdown::Both);
        }
    }

    /// Stops (or resumes) forwarding without closing anything: a dead link.
    pub fn stall(&self, stalled: bool) {
        self.state.lock().unwrap().stalled = stalled;
    }

    /// Sends `bytes` in direction `dir` before the next forwarded bytes.
    pub fn inject(&self, dir: Dir, bytes: &[u8]) {
        self.state
            .lock()
            .unwrap()
            .inject
            .entry(dir == Dir::ToGuest)
            .or_default()
            .extend_from_slice(bytes);
    }

    /// Flips a bit of the byte `ahead` bytes from now in direction `dir`.
    pub fn flip_after(&self, dir: Dir, ahead: u64) {
        self.state.lock().unwrap().flip = Some((dir, ahead));
    }

    /// Cuts every connection once `ahead` more bytes went through in
    /// direction `dir` (the bytes before the point are forwarded), unless a
    /// cut is armed already; false then.
    pub fn cut_after(&self, dir: Dir, ahead: u64) -> bool {
        let mut s = self.state.lock().unwrap();
        if s.cut_at.is_some() {
            return false;
        }
        s.cut_at = Some((dir, ahead));
        true
    }

    /// Cuts done by `cut_after` so far.
    pub fn cuts(&self) -> u32 {
        self.state.lock().unwrap().cuts
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u32 {
        self.state.lock().unwrap().accepted
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, dir: Dir, state: Arc<Mutex<ProxyState>>) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        while state.lock().unwrap().stalled {
            thread::sleep(Duration::from_millis(10));
        }
        let mut out = {
            let mut s = state.lock().unwrap();
            s.inject.remove(&(dir == Dir::ToGuest)).unwrap_or_default()
        };
        let mut chunk = buf[..n].to_vec();
        {
            let mut s = state.lock().unwrap();
            if let Some((d, ahead)) = &mut s.flip
                && *d == dir
            {
                if (*ahead as usize) < n {
                    chunk[*ahead as usize] ^= 0x10;
                    s.flip = None;
                } else {
                    *ahead -= n as u64;
                }
            }
        }
        let cut = {
            let mut s = state.lock().unwrap();
            match &mut s.cut_at {
                Some((d, ahead)) if *d == dir && (*ahead as usize) < chunk.len() => {
                    chunk.truncate(*ahead as usize);
                    s.cut_at = None;
                    s.cuts += 1;
                    true
                }
                Some((d, ahead)) if *d == dir => {
                    *ahead -= chunk.len() as u64;
                    false
                }
                _ => false,
            }
        };
        out.extend_from_slice(&chunk);
        if to.write_all(&out).is_err() {
            break;
        }
        if cut {
            for (a, b) in state.lock().unwrap().conns.drain(..) {
                let _ = a.shutdown(Shutdown::Both);
                let _ = b.shutdown(Shutdown::Both);
            }
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}
