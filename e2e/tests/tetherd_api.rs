//! The real `tetherd` binary with real `tether` guests: `serve` with the CLI,
//! the HTTP API with a WebSocket client that is not ours, restarting tetherd
//! mid-attach, API misuse, and the demo in a terminal.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use e2e::api::ApiEndpoint;
use e2e::fixtures::binary;
use e2e::harness::{ChildGuard, Procs};
use e2e::peers::{free_port, python_with};
use e2e::{available, with_timeout};

const LIMIT: Duration = Duration::from_secs(120);

fn tetherd(args: &[&str]) -> Command {
    let mut c = Command::new(binary("tetherd"));
    c.args(args).stdin(Stdio::null());
    c
}

/// A `tetherd serve` and one guest, set up the way the README's tour does it.
struct Setup {
    dir: PathBuf,
    api: ApiEndpoint,
    guest_port: u16,
    serve: Option<ChildGuard>,
    guest: ChildGuard,
}

impl Setup {
    /// With the API on a unix socket (tetherd's default).
    fn new(procs: &Procs, dir: &Path, id: &str, cmd: &[&str]) -> Self {
        Self::with_api(procs, dir, id, cmd, ApiEndpoint::unix(dir))
    }

    /// `new`, once `tetherd ls` shows the container running.
    fn running(procs: &Procs, dir: &Path, id: &str, cmd: &[&str]) -> Self {
        let s = Self::new(procs, dir, id, cmd);
        s.wait_state(id, "running");
        s
    }

    fn with_api(procs: &Procs, dir: &Path, id: &str, cmd: &[&str], api: ApiEndpoint) -> Self {
        let guest_port = free_port().unwrap();
        let key = dir.join("appliance.key");
        assert!(
            tetherd(&["keygen", "--out", key.to_str().unwrap()])
                .status()
                .unwrap()
                .success()
        );
        let mut gc = tetherd(&["guest-config", "--id", id, "--key"]);
        gc.arg(dir.join("appliance.key.pub"))
            .arg("--known-guests")
            .arg(dir.join("known-guests"));
        gc.args(["--link", &format!("tcp:127.0.0.1:{guest_port}")])
            .arg("--out")
            .arg(dir.join("guest.json"));
        gc.arg("--").args(cmd);
        assert!(gc.status().unwrap().success());
        let mut setup = Self {
            dir: dir.to_owned(),
            api,
            guest_port,
            serve: None,
            guest: procs
                .spawn(
                    Command::new(binary("tether"))
                        .arg("--config")
                        .arg(dir.join("guest.json"))
                        .stdin(Stdio::null())
                        .stderr(std::fs::File::create(dir.join("guest.log")).unwrap()),
                )
                .unwrap(),
        };
        setup.start_serve(procs);
        setup
    }

    fn start_serve(&mut self, procs: &Procs) {
        let mut c = tetherd(&[
            "serve",
            "--listen",
            &format!("127.0.0.1:{}", self.guest_port),
        ]);
        c.args(self.api.serve_args())
            .arg("--key")
            .arg(self.dir.join("appliance.key"))
            .arg("--known-guests")
            .arg(self.dir.join("known-guests"))
            .arg("--state-dir")
            .arg(self.dir.join("state"));
        c.stderr(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.dir.join("tetherd.log"))
                .unwrap(),
        );
        self.serve = Some(procs.spawn(&mut c).unwrap());
        self.api.wait_ready();
    }

    fn cli(&self, args: &[&str]) -> std::process::Output {
        let mut c = tetherd(args);
        self.api.client_env(&mut c);
        c.output().unwrap()
    }

    /// Waits until `tetherd ls` shows `id` in `state`.
    fn wait_state(&self, id: &str, state: &str) {
        let end = Instant::now() + Duration::from_secs(20);
        loop {
            let out = self.cli(&["ls"]);
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            if text.lines().any(|l| l.starts_with(id) && l.contains(state)) {
                return;
            }
            assert!(Instant::now() < end, "{id} never {state}: {text}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `tetherd_guest_output_bytes_total`.
    fn guest_output_bytes(&self) -> u64 {
        let (code, metrics) = self.http("GET", "/metrics");
        assert_eq!(code, 200, "{metrics}");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix("tetherd_guest_output_bytes_total "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no output byte counter: {metrics}"))
    }

    /// One HTTP/1.1 request; returns (status, body).
    fn http(&self, method: &str, path: &str) -> (u16, String) {
        self.api.http(method, path, &[], "")
    }
}

#[test]
fn serve_and_the_cli_list_log_exec_kill_and_wait() {
    with_timeout(LIMIT, |procs| {
        let dir = tempfile::tempdir().unwrap();
        let cmd = ["/bin/sh", "-c", "echo served; exec sleep 60"];
        let s = Setup::running(&procs, dir.path(), "web", &cmd);
        let logs = s.cli(&["logs", "web"]);
        assert_eq!(String::from_utf8_lossy(&logs.stdout), "served\n");
        let exec = s.cli(&["exec", "web", "--", "sh", "-c", "echo in exec; exit 4"]);
        assert_eq!(String::from_utf8_lossy(&exec.stdout), "in exec\n");
        assert_eq!(exec.status.code(), Some(4));
        assert!(s.cli(&["kill", "-s", "TERM", "web"]).status.success());
        let wait = s.cli(&["wait", "web"]);
        assert_eq!(String::from_utf8_lossy(&wait.stdout).trim(), "143");
        let ls = String::from_utf8_lossy(&s.cli(&["ls"]).stdout).into_owned();
        assert!(
            ls.contains("web-exec1"),
            "the exec is listed as its own container: {ls}"
        );
    });
}

/// With a state directory, an exec's output crosses the link once: the
/// follower stores it from the exec's own channel and the client reads it
/// from the store (as an attach does), while the client's input goes the
/// other way on that same channel.
#[test]
fn an_exec_with_a_store_takes_input_and_its_output_crosses_the_link_once() {
    with_timeout(LIMIT, |procs| {
        let dir = tempfile::tempdir().unwrap();
        let cmd = ["/bin/sh", "-c", "exec sleep 60"];
        let s = Setup::running(&procs, dir.path(), "web", &cmd);
        let before = s.guest_output_bytes();
        let input: Vec<u8> = (0..400_000u32).map(|i| (i % 251) as u8).collect();
        let script = "cat; echo done >&2; exit 3";
        let mut c = tetherd(&["exec", "-i", "web", "--", "sh", "-c", script]);
        s.api.client_env(&mut c);
        c.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let feed = {
            let input = input.clone();
            std::thread::spawn(move || stdin.write_all(&input))
        };
        let out = child.wait_with_output().unwrap();
        feed.join().unwrap().unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(3), "{err}");
        assert!(out.stdout == input, "stdout: {} bytes", out.stdout.len());
        assert!(err.contains("done\n"), "{err}");
        let output = input.len() as u64 + 5;
        let crossed = s.guest_output_bytes() - before;
        assert!(
            (output..output + output / 2).contains(&crossed),
            "{crossed} bytes crossed the link for {output} bytes of output"
        );
        // `logs` writes both streams to stdout, in the order they came.
        let logs = s.cli(&["logs", "web-exec1"]);
        let stored = [&input[..], b"done\n"].concat();
        assert!(logs.stdout == stored, "stored: {} bytes", logs.stdout.len());
    });
}

#[test]
fn a_websocket_client_that_is_not_ours_attaches_through_the_api() {
    with_timeout(LIMIT, |procs| {
        let Some(python) = available("Python with websockets", python_with("websockets")) else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        // Over TCP, with the token (the script sends TETHERD_TOKEN).
        let api = ApiEndpoint::tcp(dir.path());
        let s = Setup::with_api(
            &procs,
            dir.path(),
            "cat",
            &["/bin/sh", "-c", "echo before-attach; exec cat"],
            api,
        );
        s.wait_state("cat", "running");
        let script = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../runtime-appliance/tests/peers/ws_attach.py");
        let url = format!(
            "{}/v1/containers/cat/attach?stdin=1&stdout=1&stderr=1&from=0",
            s.api.url().replace("http://", "ws://")
        );
        // A browser's WebSocket (an Origin) is refused even with the token.
        let out = Command::new(&python)
            .arg(&script)
            .arg(&url)
            .args(["--origin", "http://evil.example"])
            .env("TETHERD_TOKEN", s.api.token().unwrap())
            .output()
            .unwrap();
        let refused: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
        assert_eq!(refused["http_status"], 403, "{refused}");
        let out = Command::new(python)
            .env("TETHERD_TOKEN", s.api.token().unwrap())
            .arg(script)
            .arg(&url)
            .args([
                "--wait-for",
                "before-attach",
                "--stdin",
                "typed\\n",
                "--close-stdin",
            ])
            .output()
            .unwrap();
        let result: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
        assert_eq!(result["ok"], true, "{result}");
        assert_eq!(result["subprotocol"], "v5.channel.k8s.io");
        assert_eq!(result["stdout"], "before-attach\ntyped\n");
        assert_eq!(result["exit_code"], 0);
        assert_eq!(result["status"]["status"], "Success");
    });
}

#[test]
fn restarting_tetherd_mid_attach_resumes_the_stream_byte_exact() {
    with_timeout(LIMIT, |procs| {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Setup::new(
            &procs,
            dir.path(),
            "counter",
            &[
                "/bin/sh",
                "-c",
                "i=0; while [ $i -lt 300 ]; do echo line-$i; i=$((i+1)); sleep 0.01; done; exit 6",
            ],
        );
        s.wait_state("counter", "running");
        let mut attach = tetherd(&["attach", "counter", "--no-stdin"]);
        s.api
            .client_env(&mut attach)
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut attach = procs.spawn(&mut attach).unwrap();
        std::thread::sleep(Duration::from_millis(800));
        // Kill tetherd outright and start it again on the same ports.
        drop(s.serve.take());
        std::thread::sleep(Duration::from_millis(300));
        s.start_serve(&procs);
        let status = attach.wait().unwrap();
        let mut out = String::new();
        attach
            .child()
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        let expect: String = (0..300).map(|i| format!("line-{i}\n")).collect();
        assert_eq!(out, expect, "lost or duplicated lines across the restart");
        assert_eq!(status.code(), Some(6));
    });
}

#[test]
fn logs_outlive_the_guest_and_a_kill_9_of_tetherd() {
    with_timeout(LIMIT, |procs| {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Setup::new(
            &procs,
            dir.path(),
            "gone",
            &[
                "/bin/sh",
                "-c",
                "echo one; sleep 0.1; echo two >&2; sleep 0.1; echo three; exit 3",
            ],
        );
        s.wait_state("gone", "exited");
        // The guest stops serving once tetherd holds all the output (well
        // within its 30 s exit_linger), and goes.
        let started = Instant::now();
        let status = s.guest.wait().unwrap();
        assert_eq!(status.code(), Some(3));
        assert!(started.elapsed() < Duration::from_secs(20));
        let text = |out: std::process::Output| {
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        assert_eq!(text(s.cli(&["logs", "gone"])), "one\ntwo\nthree\n");
        let stamped = text(s.cli(&["logs", "--timestamps", "gone"]));
        let lines: Vec<&str> = stamped.lines().collect();
        assert_eq!(lines.len(), 3, "{stamped}");
        for (line, word) in lines.iter().zip(["one", "two", "three"]) {
            let (time, rest) = line.split_once(' ').unwrap();
            assert!(time.ends_with('Z') && time.contains('T'), "{line}");
            assert_eq!(rest, word);
        }
        // The record names the guest that served it, by its pinned host key.
        let record: serde_json::Value = serde_json::from_slice(
            &std::fs::read(dir.path().join("state/containers/gone/record.json")).unwrap(),
        )
        .unwrap();
        let known = std::fs::read_to_string(dir.path().join("known-guests")).unwrap();
        let pinned = known
            .lines()
            .find_map(|l| l.strip_prefix("gone "))
            .and_then(|k| k.split_whitespace().nth(1))
            .unwrap_or_else(|| panic!("{known}"));
        let stored = record["guest_key"]
            .as_str()
            .unwrap_or_else(|| panic!("{record}"));
        assert_eq!(stored.split_whitespace().nth(1), Some(pinned), "{record}");
        // kill -9 tetherd, start it again: the exited container is still
        // listed with its exit code, and its logs are still there.
        drop(s.serve.take());
        s.start_serve(&procs);
        let ls = text(s.cli(&["ls"]));
        let row = ls
            .lines()
            .find(|l| l.starts_with("gone "))
            .unwrap_or_else(|| panic!("{ls}"));
        let cols: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(&cols[1..4], ["primary", "exited", "3"], "{ls}");
        assert_eq!(text(s.cli(&["logs", "gone"])), "one\ntwo\nthree\n");
        assert_eq!(text(s.cli(&["logs", "--tail", "1", "gone"])), "three\n");
        assert_eq!(text(s.cli(&["logs", "-f", "gone"])), "one\ntwo\nthree\n");
        // An attach replays it from disk and ends with the exit code.
        let attach = s.cli(&["attach", "--no-stdin", "gone"]);
        assert_eq!(String::from_utf8_lossy(&attach.stdout), "one\nthree\n");
        assert_eq!(String::from_utf8_lossy(&attach.stderr), "two\n");
        assert_eq!(attach.status.code(), Some(3));
        // rm removes the container and its files.
        assert_eq!(text(s.cli(&["rm", "gone"])).trim(), "gone");
        assert!(!text(s.cli(&["ls"])).contains("gone"));
        assert!(!dir.path().join("state/containers/gone").exists());
        assert!(!s.cli(&["logs", "gone"]).status.success());
    });
}

#[test]
fn api_misuse_gets_4xx_json_errors() {
    with_timeout(LIMIT, |procs| {
        let dir = tempfile::tempdir().unwrap();
        let s = Setup::new(
            &procs,
            dir.path(),
            "api",
            &["/bin/sh", "-c", "exec sleep 60"],
        );
        s.wait_state("api", "running");
        for (method, path, status, needle) in [
            ("GET", "/v1/nope", 404, "/v1/nope"),
            ("GET", "/v1/containers/ghost", 404, "ghost"),
            ("DELETE", "/v1/containers", 405, "method"),
            ("POST", "/v1/containers/api/signal?signal=NOPE", 400, "NOPE"),
            ("GET", "/v1/containers/api/attach?from=abc", 400, "from"),
            ("GET", "/v1/containers/api/attach?stdin=maybe", 400, "stdin"),
            ("GET", "/v1/containers/api/attach", 400, "upgrade"),
        ] {
            let (got, body) = s.http(method, path);
            assert_eq!(got, status, "{method} {path}: {body}");
            let json: serde_json::Value = serde_json::from_str(&body)
                .unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e}): {body}"));
            let error = json["error"].as_str().unwrap_or_default().to_lowercase();
            assert!(
                error.contains(&needle.to_lowercase()),
                "{method} {path}: {body}"
            );
        }
        let (ok, body) = s.http("GET", "/healthz");
        assert_eq!((ok, body.trim()), (200, "ok"));
        let (ok, metrics) = s.http("GET", "/metrics");
        assert_eq!(ok, 200);
        assert!(metrics.contains("tetherd_links 1"), "{metrics}");
    });
}

#[test]
fn the_demo_attaches_a_terminal_with_its_size_and_exits_with_the_shells_code() {
    with_timeout(LIMIT, |procs| {
        use e2e::process::{Size, open_pty, set_winsize};
        let (master, slave) = open_pty(Size {
            cols: 100,
            rows: 30,
            width_px: 0,
            height_px: 0,
        })
        .unwrap();
        let mut demo = tetherd(&["demo"]);
        demo.env("SHELL", "/bin/sh")
            .stdin(Stdio::from(slave.try_clone().unwrap()))
            .stdout(Stdio::from(slave.try_clone().unwrap()))
            .stderr(Stdio::from(slave));
        e2e::process::become_pty_session_leader(&mut demo);
        let mut demo = procs.spawn(&mut demo).unwrap();
        let mut term = std::fs::File::from(master.try_clone().unwrap());
        let fd = master.as_raw_fd();
        let mut seen = Vec::new();
        let mut expect = |needle: &str| {
            let end = Instant::now() + Duration::from_secs(20);
            while !String::from_utf8_lossy(&seen).contains(needle) {
                assert!(
                    Instant::now() < end,
                    "no {needle:?} in {:?}",
                    String::from_utf8_lossy(&seen)
                );
                let mut fds = [nix::poll::PollFd::new(
                    unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) },
                    nix::poll::PollFlags::POLLIN,
                )];
                if nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(100u16)).unwrap_or(0) > 0
                {
                    let mut buf = [0u8; 4096];
                    let n = nix::unistd::read(
                        unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) },
                        &mut buf,
                    )
                    .unwrap_or(0);
                    seen.extend_from_slice(&buf[..n]);
                }
            }
        };
        expect("Detach with ctrl-p ctrl-q");
        term.write_all(b"echo demo-$((6*7))\r").unwrap();
        expect("demo-42");
        term.write_all(b"stty size\r").unwrap();
        expect("30 100");
        set_winsize(
            &master,
            Size {
                cols: 120,
                rows: 40,
                width_px: 0,
                height_px: 0,
            },
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(300));
        term.write_all(b"stty size\r").unwrap();
        expect("40 120");
        term.write_all(b"exit 5\r").unwrap();
        assert_eq!(demo.wait().unwrap().code(), Some(5));
    });
}

#[test]
fn a_tcp_api_wants_the_token_and_a_browser_origin_starts_nothing() {
    with_timeout(LIMIT, |procs| {
        let dir = tempfile::tempdir().unwrap();
        let api = ApiEndpoint::tcp(dir.path());
        let s = Setup::with_api(
            &procs,
            dir.path(),
            "web",
            &["/bin/sh", "-c", "exec sleep 60"],
            api,
        );
        s.wait_state("web", "running");
        let host = format!("Host: {}\r\n", s.api.host());
        // No token: 401, and the CLI says what it needs.
        let (status, body) = s
            .api
            .raw(&format!("GET /v1/containers HTTP/1.1\r\n{host}"), "");
        assert_eq!(status, 401, "{body}");
        let mut ls = tetherd(&["ls"]);
        ls.env("TETHERD_API", s.api.url())
            .env_remove("TETHERD_TOKEN");
        let out = ls.output().unwrap();
        assert_eq!(out.status.code(), Some(1));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("TETHERD_TOKEN"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // A browser-style exec: the token is right, the Origin is foreign.
        let marker = dir.path().join("touched");
        let exec = format!(
            "GET /v1/containers/web/exec?command=touch&command={} HTTP/1.1\r\n{host}\
             Authorization: Bearer {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Protocol: v5.channel.k8s.io\r\n",
            marker.display(),
            s.api.token().unwrap()
        );
        let (status, body) = s
            .api
            .raw(&format!("{exec}Origin: http://evil.example\r\n"), "");
        assert_eq!(status, 403, "{body}");
        assert!(body.contains("Origin"), "{body}");
        // A DNS-rebound name as Host is refused the same way.
        let rebound = exec.replace(&host, "Host: evil.example:2378\r\n");
        let (status, body) = s.api.raw(&rebound, "");
        assert_eq!(status, 403, "{body}");
        std::thread::sleep(Duration::from_millis(500));
        assert!(!marker.exists(), "the refused exec ran");
        // The same command through the CLI, with the token, does run: the
        // test would see it.
        let out = s.cli(&["exec", "web", "--", "touch", marker.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(marker.exists());
        let (_, metrics) = s.http("GET", "/metrics");
        assert!(
            metrics.contains("tetherd_http_requests_total{route=\"refused\",code=\"403\"} 2"),
            "{metrics}"
        );
    });
}

#[test]
fn the_socket_is_0660_and_a_tcp_api_without_a_token_needs_no_auth_said_out_loud() {
    use std::os::unix::fs::PermissionsExt;
    with_timeout(LIMIT, |procs| {
        let dir = tempfile::tempdir().unwrap();
        let s = Setup::new(
            &procs,
            dir.path(),
            "web",
            &["/bin/sh", "-c", "exec sleep 60"],
        );
        let ApiEndpoint::Unix(path) = &s.api else {
            panic!("Setup::new uses the unix socket");
        };
        let mode = std::fs::metadata(path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o660, "{mode:o}");
        s.wait_state("web", "running");
        // TCP without a token is refused at start, naming the way out.
        let out = tetherd(&["serve", "--listen", "127.0.0.1:0", "--api", "127.0.0.1:0"])
            .arg("--state-dir")
            .arg(dir.path().join("state2"))
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--api-token-file"), "{err}");
        // --api-no-auth serves, with a warning.
        let port = free_port().unwrap();
        let log = dir.path().join("no-auth.log");
        let mut open = tetherd(&["serve", "--listen", "127.0.0.1:0", "--api-no-auth"]);
        open.args(["--api", &format!("127.0.0.1:{port}")])
            .arg("--state-dir")
            .arg(dir.path().join("state3"))
            .stderr(std::fs::File::create(&log).unwrap());
        let _open = procs.spawn(&mut open).unwrap();
        let end = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < end,
                "tetherd serve --api-no-auth did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(
            text.contains("WARN") && text.contains("--api-no-auth"),
            "{text}"
        );
        let mut ls = tetherd(&["ls", "--api", &format!("http://127.0.0.1:{port}")]);
        assert!(
            ls.env_remove("TETHERD_TOKEN")
                .output()
                .unwrap()
                .status
                .success()
        );
    });
}
