//! An independent appliance against `tether`: tests/peers/tether_client.py, an
//! AsyncSSH client written from docs/PROTOCOL.md alone, drives a guest that
//! listens on a `tcp-listen:` link (no link sync). It lists sessions
//! (`container-ids@tether`), attaches with replay (`attach@tether`), sees an
//! `output-gap@tether` after `drop-oldest` overflow, runs an exec
//! (`exec-id@tether`), signals a session over a control channel, and forks
//! it (`fork@tether`, a child's `forked@tether`).
//!
//! Needs a Python with AsyncSSH (`TETHER_PYTHON`, `.venv` or `python3`):
//! skipped without one, a failure under `TETHER_REQUIRE_ALL=1`. Needs
//! `cargo build --release --bins` first (for the `tether` binary).

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use e2e::fixtures::{self, Guest};
use e2e::harness::Procs;
use e2e::peers;
use e2e::{available, with_timeout};
use serde_json::{Value, json};

const LIMIT: Duration = Duration::from_secs(120);

/// A guest on a free loopback port and what the script needs to reach it.
struct Peer {
    python: PathBuf,
    script: PathBuf,
    port: u16,
    client_key: PathBuf,
    host_key: String,
    guest: Guest,
    _dir: tempfile::TempDir,
}

/// What one run of the script printed.
struct Run {
    ok: bool,
    results: Vec<Value>,
    stderr: String,
}

impl Peer {
    /// Starts a guest for container `id` with `sessions` (the first is the
    /// primary), or returns `None` when no Python with AsyncSSH is available.
    fn start(procs: &Procs, id: &str, sessions: Value) -> Option<Self> {
        Self::start_with(procs, id, sessions, json!({}))
    }

    /// [`Peer::start`] with more configuration (`extra`'s keys are added).
    fn start_with(procs: &Procs, id: &str, sessions: Value, extra: Value) -> Option<Self> {
        let python = available("AsyncSSH tether peer", peers::python_with_asyncssh())?;
        let dir = tempfile::tempdir().unwrap();
        let host = fixtures::key(31);
        let client = fixtures::key(32);
        let client_key = dir.path().join("appliance_ed25519");
        peers::write_key_pair(&client_key, &client).unwrap();
        let port = peers::free_port().unwrap();
        let mut config = json!({
            "id": id,
            "host_key": host.to_openssh(id),
            "authorized_keys": [client.public().to_openssh()],
            "link": format!("tcp-listen:127.0.0.1:{port}"),
            "sessions": sessions,
        });
        if let (Value::Object(config), Value::Object(extra)) = (&mut config, extra) {
            config.extend(extra);
        }
        let guest = Guest::start(procs, dir.path(), &config);
        let peer = Self {
            python,
            script: Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peers/tether_client.py"),
            port,
            client_key,
            host_key: host.public().to_openssh(),
            guest,
            _dir: dir,
        };
        peer.wait_listening();
        Some(peer)
    }

    fn wait_listening(&self) {
        let end = Instant::now() + Duration::from_secs(10);
        // A bare TCP connection that closes at once is just a link that opened
        // and closed for the guest.
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < end,
                "the guest is not listening on {}; its log:\n{}",
                self.port,
                self.guest.log_text()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs the script with `commands` (one connection) and parses its output.
    fn run(&self, procs: &Procs, commands: &[&str]) -> Run {
        let mut cmd = Command::new(&self.python);
        cmd.arg(&self.script)
            .args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
            .arg("--key")
            .arg(&self.client_key)
            .args(["--known-host-key", &self.host_key, "--timeout", "40"])
            .args(commands)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let out = procs.spawn(&mut cmd).unwrap().wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let results = stdout
            .lines()
            .map(|l| {
                serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}\nall output: {stdout}"))
            })
            .collect();
        Run {
            ok: out.status.success(),
            results,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Runs `commands`, which must succeed; returns one result per command.
    fn ok(&self, procs: &Procs, commands: &[&str]) -> Vec<Value> {
        let run = self.run(procs, commands);
        assert!(
            run.ok,
            "tether_client.py {commands:?} failed: {}\nresults: {:?}\nguest log:\n{}",
            run.stderr,
            run.results,
            self.guest.log_text()
        );
        run.results
    }

    /// `list`, then the entry for session `id`.
    fn entry(&self, procs: &Procs, id: &str) -> Value {
        let list = self.ok(procs, &["list"]);
        list[0]["containers"]
            .as_array()
            .expect("containers")
            .iter()
            .find(|c| c["id"] == id)
            .unwrap_or_else(|| panic!("{id} is not listed: {}", list[0]))
            .clone()
    }

    /// Polls `list` until session `id` satisfies `pred`; returns its entry.
    fn wait_entry(&self, procs: &Procs, id: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let end = Instant::now() + Duration::from_secs(20);
        loop {
            let e = self.entry(procs, id);
            if pred(&e) {
                return e;
            }
            assert!(Instant::now() < end, "{id} never got there: {e}");
            thread::sleep(Duration::from_millis(100));
        }
    }
}

#[test]
fn list_and_attach_with_replay_from_zero() {
    with_timeout(LIMIT, |procs| {
        let Some(peer) = Peer::start(
            &procs,
            "c1",
            json!([{ "id": "c1", "cmd": ["/bin/sh", "-c", "echo hello; echo err >&2; sleep 30"] }]),
        ) else {
            return;
        };
        // Both lines written before anyone attached: output-end 10.
        let entry = peer.wait_entry(&procs, "c1", |e| e["output_end"] == 10);
        assert_eq!(
            entry,
            json!({"id": "c1", "kind": "primary", "state": "running", "exit_status": 0, "output_end": 10, "tty": false})
        );

        let r = peer.ok(&procs, &["list", "attach", "c1", "--from", "0"]);
        assert_eq!(r[0]["containers"].as_array().unwrap().len(), 1, "{}", r[0]);
        let att = &r[1];
        assert_eq!(att["stdout"], "hello\n", "{att}");
        assert_eq!(att["stderr"], "err\n", "stderr is extended data 1: {att}");
        assert_eq!(att["gaps"], json!([]));
        assert_eq!(att["exit_status"], Value::Null);
        assert_eq!(att["next_offset"], 10);

        // Replay from the middle: the offset counts stdout and stderr together.
        let r = peer.ok(&procs, &["attach", "c1", "--from", "6"]);
        assert_eq!(
            (r[0]["stdout"].as_str(), r[0]["stderr"].as_str()),
            (Some(""), Some("err\n"))
        );

        // Refusals carry the descriptions of section 4.2.
        let run = peer.run(&procs, &["attach", "nosuch", "--from", "0"]);
        assert!(!run.ok);
        assert_eq!(
            run.results,
            [json!({"error": {"code": 2, "reason": "unknown session nosuch"}})]
        );
        let run = peer.run(&procs, &["attach", "c1", "--from", "11"]);
        assert!(!run.ok);
        assert_eq!(
            run.results,
            [json!({"error": {"code": 2, "reason": "offset 11 is beyond the end of output (10)"}})]
        );
    });
}

#[test]
fn attaching_before_the_retained_start_reports_an_output_gap() {
    with_timeout(LIMIT, |procs| {
        // 40 lines of 8 bytes (320) into a 64-byte drop-oldest log.
        let Some(peer) = Peer::start(
            &procs,
            "n1",
            json!([{
                "id": "n1",
                "cmd": ["/bin/sh", "-c", "seq 100 139 | sed s/^/line/; sleep 30"],
                "output_buffer": 64,
                "overflow": "drop-oldest",
            }]),
        ) else {
            return;
        };
        let full: String = (100..140).map(|n| format!("line{n}\n")).collect();
        let entry = peer.wait_entry(&procs, "n1", |e| e["output_end"] == 320);
        assert_eq!(entry["state"], "running");

        for from in [0u64, 100] {
            let r = peer.ok(&procs, &["attach", "n1", "--from", &from.to_string()]);
            let att = &r[0];
            let gaps: Vec<u64> = serde_json::from_value(att["gaps"].clone()).unwrap();
            let got = att["stdout"].as_str().unwrap();
            assert_eq!(
                gaps.len(),
                1,
                "one output-gap@tether before the replay: {att}"
            );
            assert!(gaps[0] > 0 && got.len() <= 64, "{att}");
            assert!(
                full.ends_with(got),
                "the replay is the tail of the output: {got:?}"
            );
            // Section 4.2: from + gaps + bytes received is the output offset.
            assert_eq!(from + gaps[0] + got.len() as u64, 320, "{att}");
            assert_eq!(att["next_offset"], 320);
        }

        // Within the retained output: no gap.
        let r = peer.ok(&procs, &["attach", "n1", "--from", "312"]);
        assert_eq!(r[0]["gaps"], json!([]));
        assert_eq!(r[0]["stdout"], "line139\n");
    });
}

#[test]
fn exec_reports_its_id_and_exit_status_and_is_listed_as_an_exec() {
    with_timeout(LIMIT, |procs| {
        let Some(peer) = Peer::start(
            &procs,
            "c1",
            json!([{ "id": "c1", "cmd": ["/bin/sh", "-c", "sleep 30"] }]),
        ) else {
            return;
        };
        let r = peer.ok(&procs, &["exec", "echo out; echo err >&2; exit 3", "list"]);
        let exec = &r[0];
        let exec_id = exec["exec_id"].as_str().expect("exec-id@tether").to_owned();
        assert!(exec_id.starts_with("c1-exec"), "{exec}");
        assert_eq!(exec["stdout"], "out\n");
        assert_eq!(exec["stderr"], "err\n");
        assert_eq!(exec["exit_status"], 3);

        let listed = r[1]["containers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["id"] == exec_id.as_str())
            .unwrap_or_else(|| panic!("{exec_id} is not listed: {}", r[1]))
            .clone();
        assert_eq!(
            listed,
            json!({"id": exec_id, "kind": "exec", "state": "exited", "exit_status": 3, "output_end": 8, "tty": false})
        );

        // An exited exec can still be attached: replay, then its exit status.
        let r = peer.ok(&procs, &["attach", &exec_id, "--from", "0", "--until-exit"]);
        assert_eq!(r[0]["stdout"], "out\n");
        assert_eq!(r[0]["stderr"], "err\n");
        assert_eq!(r[0]["exit_status"], 3);
        assert_eq!(r[0]["closed"], true);
    });
}

#[test]
fn signal_over_a_control_channel_ends_an_attached_session_with_exit_signal_term() {
    with_timeout(LIMIT, |procs| {
        let Some(peer) = Peer::start(
            &procs,
            "c1",
            json!([
                { "id": "c1", "cmd": ["/bin/sh", "-c", "sleep 30"] },
                { "id": "victim", "cmd": ["/bin/sh", "-c", "echo ready; sleep 30"] },
            ]),
        ) else {
            return;
        };
        peer.wait_entry(&procs, "victim", |e| e["output_end"] == 6);
        // The guest serves one SSH connection at a time, so the attach that
        // waits for the exit and the signal share one connection.
        let r = peer.ok(
            &procs,
            &[
                "attach",
                "victim",
                "--from",
                "0",
                "--until-exit",
                "--background",
                "signal",
                "victim",
                "TERM",
            ],
        );
        let (att, signal) = (&r[0], &r[1]);
        assert_eq!(signal["ok"], true, "{signal}");
        assert_eq!(att["stdout"], "ready\n");
        assert_eq!(att["exit_signal"], "TERM", "{att}");
        assert_eq!(att["exit_status"], Value::Null);
        assert_eq!(att["closed"], true);

        // Listed as exited with 128 + SIGTERM; signalling it again fails.
        let entry = peer.wait_entry(&procs, "victim", |e| e["state"] == "exited");
        assert_eq!(entry["exit_status"], 143);
        let r = peer.ok(&procs, &["signal", "victim", "TERM"]);
        assert_eq!(r[0]["ok"], false);
    });
}

#[test]
fn stdin_then_eof_reach_the_process_and_a_start_gate_opens_on_request() {
    with_timeout(LIMIT, |procs| {
        let Some(peer) = Peer::start(
            &procs,
            "c1",
            json!([
                // Not the primary: when the primary exits, the guest shuts down.
                { "id": "c1", "cmd": ["/bin/sh", "-c", "sleep 30"] },
                { "id": "typist", "cmd": ["/bin/sh", "-c", "cat; echo done"] },
                { "id": "gated", "cmd": ["/bin/sh", "-c", "echo started"],
                  "start_gated": true, "start_gate_timeout": "60s" },
            ]),
        ) else {
            return;
        };
        let r = peer.ok(
            &procs,
            &[
                "attach",
                "typist",
                "--from",
                "0",
                "--stdin",
                "typed\n",
                "--eof",
                "--until-exit",
            ],
        );
        assert_eq!(r[0]["stdout"], "typed\ndone\n");
        assert_eq!(r[0]["exit_status"], 0);

        assert_eq!(peer.entry(&procs, "gated")["state"], "created");
        let r = peer.ok(
            &procs,
            &[
                "attach",
                "gated",
                "--from",
                "0",
                "--until-exit",
                "--background",
                "start",
                "gated",
                "start",
                "gated",
            ],
        );
        assert_eq!(
            r[0]["stdout"], "started\n",
            "attached before the start: nothing missed"
        );
        assert_eq!(r[0]["exit_status"], 0);
        assert_eq!(
            (r[1]["ok"].as_bool(), r[2]["ok"].as_bool()),
            (Some(true), Some(false))
        );
    });
}

/// Section 5 (`block`) with section 3.3's 2 MiB window, against a receiver
/// that returns window only once *more* than half of it arrived (AsyncSSH).
/// This deadlocked when sent-but-unacknowledged output counted against the log
/// (found by this peer); now sent output stays outside the capacity.
#[test]
fn block_overflow_with_the_default_buffer_and_window_delivers_everything() {
    with_timeout(LIMIT, |procs| {
        let Some(peer) = Peer::start(
            &procs,
            "c1",
            json!([
                { "id": "c1", "cmd": ["/bin/sh", "-c", "sleep 30"] },
                { "id": "big", "overflow": "block",
                  "cmd": ["/bin/sh", "-c", "head -c 3000000 /dev/zero | tr '\\0' x"] },
            ]),
        ) else {
            return;
        };
        peer.wait_entry(&procs, "big", |e| e["output_end"] == 1 << 20);
        let r = peer.ok(&procs, &["attach", "big", "--from", "0", "--until-exit"]);
        assert_eq!(r[0]["stdout"].as_str().map(str::len), Some(3_000_000));
        assert_eq!(r[0]["gaps"], json!([]));
    });
}

/// A fork identity as the hypervisor hands it over: one JSON object padded
/// with spaces to 1024 bytes (PROTOCOL.md 4.5).
fn write_identity(path: &Path, identity: Value) {
    let mut text = identity.to_string().into_bytes();
    assert!(text.len() <= 1024);
    text.resize(1024, b' ');
    std::fs::write(path, text).unwrap();
}

/// `fork@tether` and `forked@tether` with an independent appliance: a quiesce
/// answers the identity's generation and ends the connection with DISCONNECT
/// 11; a `resume` continues the sessions; after a second quiesce the identity
/// changes (the guest is now a child), and the next connection gets the
/// child's `forked@tether` before anything else, then lists the renamed
/// primary. (tether runs as an ordinary process: its OS steps are skipped.)
#[test]
fn fork_quiesce_resume_and_a_childs_announcement() {
    with_timeout(LIMIT, |procs| {
        let ids = tempfile::tempdir().unwrap();
        let identity = ids.path().join("identity");
        write_identity(&identity, json!({"generation": 7}));
        let Some(peer) = Peer::start_with(
            &procs,
            "web",
            // Runs until tether goes (killed, it leaves its sessions behind).
            json!([{"id": "web", "cmd": ["sh", "-c", "while kill -0 $PPID; do sleep 0.05; done"]}]),
            json!({"fork": {"backend": "qemu", "identity": identity}}),
        ) else {
            return;
        };
        peer.wait_entry(&procs, "web", |e| e["state"] == "running");

        let quiesced = peer.ok(&procs, &["fork", "quiesce"]);
        assert_eq!(quiesced[0]["ok"], true, "{quiesced:?}");
        assert_eq!(quiesced[0]["generation"], 7, "{quiesced:?}");
        assert_eq!(quiesced[0]["disconnect"]["code"], 11, "{quiesced:?}");
        assert_eq!(
            quiesced[0]["disconnect"]["reason"], "tether: quiesced for fork",
            "{quiesced:?}"
        );
        // Quiesced: a new connection is served, new sessions are refused.
        let refused = peer.run(&procs, &["exec", "true"]);
        assert!(!refused.ok, "an exec while quiesced: {:?}", refused.results);
        let resumed = peer.ok(&procs, &["fork", "resume", "list"]);
        assert_eq!(resumed[0]["ok"], true, "{resumed:?}");
        assert_eq!(resumed[1]["containers"][0]["id"], "web", "{resumed:?}");
        assert_eq!(resumed[1]["containers"][0]["state"], "running");

        let quiesced = peer.ok(&procs, &["fork", "quiesce"]);
        assert_eq!(quiesced[0]["generation"], 7, "{quiesced:?}");
        // The hypervisor made a child of this VM: it has a new identity.
        write_identity(
            &identity,
            json!({"generation": 8, "parent": "web", "id": "web-1", "child": 1,
                   "hostname": "web-1", "nonce": "ab".repeat(32)}),
        );
        let child = peer.ok(&procs, &["forked", "list"]);
        let forked = &child[0];
        assert_eq!(forked["parent_id"], "web", "{forked}");
        assert_eq!(forked["new_id"], "web-1", "{forked}");
        assert_eq!(forked["generation"], 8, "{forked}");
        assert_eq!(forked["failure"], "", "{forked}");
        assert!(forked["recovery_us"].as_u64().unwrap() > 0, "{forked}");
        assert_eq!(forked["pushes_before"], 0, "not first: {forked}");
        let list = child[1]["containers"].as_array().unwrap();
        assert_eq!(list.len(), 1, "{list:?}");
        assert_eq!(list[0]["id"], "web-1");
        assert_eq!(list[0]["kind"], "primary");
        assert_eq!(list[0]["state"], "running");
        // Answered: the next connection is an ordinary one.
        let again = peer.ok(&procs, &["list"]);
        assert_eq!(again[0]["containers"][0]["id"], "web-1");
    });
}
