//! Interop with OpenSSH: the `ssh` client against our server (once per cipher),
//! and our client against an `sshd` this test starts on a free loopback port.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use e2e::peers::{self, Sshd, TestServer};
use e2e::process::{self, Size};
use e2e::{
    Action, ExecRequest, Procs, Trigger, available, pattern, run_exec, sha256_hex, with_timeout,
};
use proto_core::crypto::KexAlg;

const LIMIT: Duration = Duration::from_secs(180);

fn ssh_available() -> bool {
    available("OpenSSH client interop", peers::ssh_binary()).is_some()
}

/// Runs `cmd` with `stdin` fed from a thread, collecting stdout and stderr.
fn run(procs: &Procs, cmd: &mut Command, stdin: Vec<u8>) -> Output {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = procs.spawn(cmd).expect("spawn ssh");
    let mut pipe = child.child().stdin.take().expect("piped");
    let feeder = thread::spawn(move || {
        let _ = pipe.write_all(&stdin); // dropping the pipe is the EOF
    });
    let out = child.wait_with_output().expect("wait for ssh");
    feeder.join().unwrap();
    out
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn start_our_server(dir: &Path) -> TestServer {
    TestServer::start(dir, |_| {}).expect("start our server")
}

/// The server's report of its one connection, once the client has gone.
fn only_report(ts: &TestServer) -> e2e::ConnectionReport {
    let reports = ts.server.wait_reports(1, Duration::from_secs(10));
    assert_eq!(
        reports.len(),
        1,
        "expected one finished connection: {reports:?}"
    );
    reports[0].clone()
}

fn ssh_exec_reports_stdout_stderr_and_exit_status(cipher: &'static str) {
    with_timeout(LIMIT, move |procs| {
        if !ssh_available() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let ts = start_our_server(dir.path());
        let out = run(
            &procs,
            ts.ssh(cipher).arg("echo out; echo err >&2; exit 3"),
            Vec::new(),
        );
        assert_eq!(
            out.status.code(),
            Some(3),
            "ssh stderr: {}",
            text(&out.stderr)
        );
        assert_eq!(text(&out.stdout), "out\n");
        assert_eq!(
            text(&out.stderr),
            "err\n",
            "stderr must arrive as extended data, and alone"
        );
        let report = only_report(&ts);
        assert_eq!(report.kex, Some(KexAlg::Curve25519));
        assert_eq!(report.cipher.map(|c| c.name()), Some(cipher));
        assert_eq!(report.exits, ["status 3"]);
        assert!(report.end.is_clean(), "{:?}", report.end);
    });
}

fn ssh_stdin_reaches_the_command_and_eof_ends_it(cipher: &'static str) {
    with_timeout(LIMIT, move |procs| {
        if !ssh_available() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let ts = start_our_server(dir.path());
        // Small: `cat` exits only because the channel EOF closed its stdin.
        let out = run(
            &procs,
            ts.ssh(cipher).arg("cat"),
            b"hello\nworld\n".to_vec(),
        );
        assert!(out.status.success(), "ssh stderr: {}", text(&out.stderr));
        assert_eq!(text(&out.stdout), "hello\nworld\n");
        // Large: several windows each way (2 MiB windows), echoed back intact.
        let data = pattern(5 * 1024 * 1024 + 123);
        let out = run(&procs, ts.ssh(cipher).arg("cat"), data.clone());
        assert!(out.status.success(), "ssh stderr: {}", text(&out.stderr));
        assert_eq!(out.stdout.len(), data.len());
        assert_eq!(sha256_hex(&out.stdout), sha256_hex(&data));
    });
}

fn ssh_sees_a_command_killed_by_a_signal(cipher: &'static str) {
    with_timeout(LIMIT, move |procs| {
        if !ssh_available() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let ts = start_our_server(dir.path());
        // OpenSSH's client has no exit code for exit-signal: it logs the request
        // (at debug level) and exits 255, exactly as it does against sshd.
        let out = run(
            &procs,
            ts.ssh(cipher).args(["-v", "kill -TERM $$"]),
            Vec::new(),
        );
        let log = text(&out.stderr);
        assert_eq!(out.status.code(), Some(255), "ssh stderr: {log}");
        assert!(
            log.contains("rtype exit-signal"),
            "ssh did not get exit-signal: {log}"
        );
        assert_eq!(only_report(&ts).exits, ["signal TERM"]);
    });
}

/// Reads everything a pty master yields onto a channel, until EIO.
fn pty_reader(master: std::os::fd::OwnedFd) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut f = std::fs::File::from(master);
        let mut buf = [0u8; 4096];
        while let Ok(n) = f.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    rx
}

/// Collects from `rx` into `seen` until it contains `needle`.
fn wait_for(rx: &mpsc::Receiver<Vec<u8>>, seen: &mut Vec<u8>, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !text(seen).contains(needle) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(chunk) => seen.extend_from_slice(&chunk),
            Err(_) => panic!("no {needle:?} in the terminal output: {:?}", text(seen)),
        }
    }
}

fn ssh_tty_follows_window_changes(cipher: &'static str) {
    with_timeout(LIMIT, move |procs| {
        if !ssh_available() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let ts = start_our_server(dir.path());
        // ssh runs on a terminal we own: it sends pty-req with that terminal's
        // size, and window-change when we resize it (the kernel sends SIGWINCH).
        let size = |cols, rows| Size {
            cols,
            rows,
            width_px: 0,
            height_px: 0,
        };
        let (master, slave) = process::open_pty(size(80, 24)).unwrap();
        let script =
            r#"stty size; while [ "$(stty size)" = "24 80" ]; do sleep 0.05; done; stty size"#;
        let mut cmd = ts.ssh(cipher);
        cmd.args(["-tt", script]);
        cmd.stdin(Stdio::from(slave.try_clone().unwrap()));
        cmd.stdout(Stdio::from(slave.try_clone().unwrap()));
        cmd.stderr(Stdio::from(slave));
        process::become_pty_session_leader(&mut cmd);
        let mut ssh = procs.spawn(&mut cmd).unwrap();
        drop(cmd); // our copies of the slave
        let rx = pty_reader(master.try_clone().unwrap());
        let mut seen = Vec::new();
        wait_for(&rx, &mut seen, "24 80");
        process::set_winsize(&master, size(132, 43)).unwrap();
        wait_for(&rx, &mut seen, "43 132");
        let status = ssh.wait().unwrap();
        assert!(
            status.success(),
            "ssh failed: {status:?}; terminal: {:?}",
            text(&seen)
        );
        assert_eq!(only_report(&ts).exits, ["status 0"]);
    });
}

fn ssh_rekeys_every_mebibyte_during_a_32_mib_download(cipher: &'static str) {
    with_timeout(LIMIT, move |procs| {
        if !ssh_available() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let ts = start_our_server(dir.path());
        let data = pattern(32 * 1024 * 1024);
        let file = dir.path().join("data.bin");
        std::fs::write(&file, &data).unwrap();
        let mut cmd = ts.ssh(cipher);
        cmd.args(["-o", "RekeyLimit=1M", &format!("cat {}", file.display())]);
        let out = run(&procs, &mut cmd, Vec::new());
        assert!(out.status.success(), "ssh stderr: {}", text(&out.stderr));
        assert_eq!(out.stdout.len(), data.len());
        assert_eq!(sha256_hex(&out.stdout), sha256_hex(&data));
        let report = only_report(&ts);
        assert!(
            report.kex_count >= 16,
            "expected many rekeys at 1 MiB over 32 MiB, got {} key exchanges",
            report.kex_count
        );
        assert!(report.end.is_clean(), "{:?}", report.end);
    });
}

macro_rules! ssh_client_tests {
    ($($module:ident => $cipher:literal),* $(,)?) => {$(
        mod $module {
            #[test]
            fn ssh_exec_reports_stdout_stderr_and_exit_status() {
                super::ssh_exec_reports_stdout_stderr_and_exit_status($cipher);
            }
            #[test]
            fn ssh_stdin_reaches_the_command_and_eof_ends_it() {
                super::ssh_stdin_reaches_the_command_and_eof_ends_it($cipher);
            }
            #[test]
            fn ssh_sees_a_command_killed_by_a_signal() {
                super::ssh_sees_a_command_killed_by_a_signal($cipher);
            }
            #[test]
            fn ssh_tty_follows_window_changes() {
                super::ssh_tty_follows_window_changes($cipher);
            }
            #[test]
            fn ssh_rekeys_every_mebibyte_during_a_32_mib_download() {
                super::ssh_rekeys_every_mebibyte_during_a_32_mib_download($cipher);
            }
        }
    )*};
}

ssh_client_tests! {
    aes256_gcm => "aes256-gcm@openssh.com",
    aes128_gcm => "aes128-gcm@openssh.com",
    chacha20_poly1305 => "chacha20-poly1305@openssh.com",
}

// ---- our client against OpenSSH sshd ----

/// Starts sshd with a fresh user key; `None` (after reporting why) when sshd
/// cannot run here.
fn start_sshd(procs: &Procs, dir: &Path) -> Option<(Sshd, proto_core::PrivateKey)> {
    let key = peers::new_key();
    let sshd = available(
        "OpenSSH sshd interop",
        Sshd::start(procs, dir, key.public()),
    )?;
    Some((sshd, key))
}

fn sshd_config(sshd: &Sshd, key: &proto_core::PrivateKey) -> proto_core::Config {
    peers::client_config(peers::SSHD_USER, key, sshd.host_key.public())
}

fn exec_on(sshd: &Sshd, config: proto_core::Config, request: ExecRequest) -> e2e::ExecOutcome {
    run_exec(sshd.addr, config, request)
        .unwrap_or_else(|e| panic!("{e}\nsshd log:\n{}", sshd.log_text()))
}

#[test]
fn our_client_runs_a_command_on_sshd() {
    with_timeout(LIMIT, |procs| {
        let dir = tempfile::tempdir().unwrap();
        let Some((sshd, key)) = start_sshd(&procs, dir.path()) else {
            return;
        };
        let request = ExecRequest {
            command: "echo hello; echo oops >&2; exit 3".into(),
            ..Default::default()
        };
        let out = exec_on(&sshd, sshd_config(&sshd, &key), request);
        assert_eq!(text(&out.stdout), "hello\n");
        assert_eq!(text(&out.stderr), "oops\n");
        assert_eq!(out.exit_status, Some(3));
        assert!(out.eof);
        // OpenSSH 9.2 has no ML-KEM, so curve25519-sha256 is the common method.
        assert_eq!(out.kex, Some(KexAlg::Curve25519));
    });
}

#[test]
fn our_client_uploads_stdin_to_sshd() {
    with_timeout(LIMIT, |procs| {
        let dir = tempfile::tempdir().unwrap();
        let Some((sshd, key)) = start_sshd(&procs, dir.path()) else {
            return;
        };
        let data = pattern(8 * 1024 * 1024 + 7);
        let request = ExecRequest {
            command: "sha256sum".into(),
            stdin: data.clone(),
            close_stdin: true,
            ..Default::default()
        };
        let out = exec_on(&sshd, sshd_config(&sshd, &key), request);
        assert_eq!(text(&out.stdout), format!("{}  -\n", sha256_hex(&data)));
        assert_eq!(out.exit_status, Some(0));
    });
}

#[test]
fn our_client_signal_term_gets_exit_signal_from_sshd() {
    with_timeout(LIMIT, |procs| {
        let dir = tempfile::tempdir().unwrap();
        let Some((sshd, key)) = start_sshd(&procs, dir.path()) else {
            return;
        };
        let request = ExecRequest {
            command: "echo ready; exec sleep 30".into(),
            triggers: vec![Trigger {
                when: b"ready".to_vec(),
                action: Action::Signal("TERM".into()),
            }],
            ..Default::default()
        };
        let started = Instant::now();
        let out = exec_on(&sshd, sshd_config(&sshd, &key), request);
        assert_eq!(out.exit_signal.as_deref(), Some("TERM"), "{out:?}");
        assert_eq!(out.exit_status, None);
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the signal did not end the command"
        );
    });
}

#[test]
fn our_client_pty_and_window_change_on_sshd() {
    with_timeout(LIMIT, |procs| {
        let dir = tempfile::tempdir().unwrap();
        let Some((sshd, key)) = start_sshd(&procs, dir.path()) else {
            return;
        };
        let request = ExecRequest {
            command:
                r#"stty size; while [ "$(stty size)" = "24 80" ]; do sleep 0.05; done; stty size"#
                    .into(),
            pty: Some(("xterm".into(), 80, 24)),
            triggers: vec![Trigger {
                when: b"24 80".to_vec(),
                action: Action::WindowChange {
                    cols: 132,
                    rows: 43,
                },
            }],
            ..Default::default()
        };
        let out = exec_on(&sshd, sshd_config(&sshd, &key), request);
        assert_eq!(text(&out.stdout), "24 80\r\n43 132\r\n");
        assert_eq!(out.exit_status, Some(0));
    });
}

#[test]
fn our_client_downloads_64_mib_from_sshd_rekeying_every_mebibyte() {
    with_timeout(LIMIT, |procs| {
        let dir = tempfile::tempdir().unwrap();
        let Some((sshd, key)) = start_sshd(&procs, dir.path()) else {
            return;
        };
        let data = pattern(64 * 1024 * 1024);
        let file = dir.path().join("data.bin");
        std::fs::write(&file, &data).unwrap();
        let mut config = sshd_config(&sshd, &key);
        config.rekey_bytes = 1024 * 1024;
        let request = ExecRequest {
            command: format!("cat {}", file.display()),
            ..Default::default()
        };
        let out = exec_on(&sshd, config, request);
        assert_eq!(out.stdout.len(), data.len());
        assert_eq!(sha256_hex(&out.stdout), sha256_hex(&data));
        assert_eq!(out.exit_status, Some(0));
        assert!(
            out.kex_count >= 32,
            "expected a rekey per MiB, got {} key exchanges",
            out.kex_count
        );
    });
}
