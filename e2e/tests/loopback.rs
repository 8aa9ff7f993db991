//! Our client against our server over real TCP, with real child processes:
//! what OpenSSH's client cannot drive (signals), and both sides rekeying at once.

use std::time::{Duration, Instant};

use e2e::peers::TestServer;
use e2e::{Action, ExecRequest, Trigger, pattern, run_exec, sha256_hex, with_timeout};

const LIMIT: Duration = Duration::from_secs(120);

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn signal_term_kills_the_whole_command_and_comes_back_as_exit_signal() {
    with_timeout(LIMIT, |_| {
        let dir = tempfile::tempdir().unwrap();
        let ts = TestServer::start(dir.path(), |_| {}).unwrap();
        // `sleep` is a child of the shell: the signal goes to the process group.
        let request = ExecRequest {
            command: "echo ready; sleep 30; echo not reached".into(),
            triggers: vec![Trigger {
                when: b"ready".to_vec(),
                action: Action::Signal("TERM".into()),
            }],
            ..Default::default()
        };
        let started = Instant::now();
        let out = run_exec(ts.server.addr(), ts.client_config(), request).unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the signal did not end the command"
        );
        assert_eq!(text(&out.stdout), "ready\n");
        assert_eq!(out.exit_signal.as_deref(), Some("TERM"));
        assert_eq!(out.exit_status, None);
        assert!(out.eof, "EOF comes before CLOSE");
        let reports = ts.server.wait_reports(1, Duration::from_secs(10));
        assert_eq!(reports[0].exits, ["signal TERM"]);
    });
}

#[test]
fn env_stdin_and_eof_reach_a_piped_command() {
    with_timeout(LIMIT, |_| {
        let dir = tempfile::tempdir().unwrap();
        let ts = TestServer::start(dir.path(), |_| {}).unwrap();
        let request = ExecRequest {
            command: r#"echo "$TETHER_E2E"; cat; echo done >&2; exit 4"#.into(),
            env: vec![("TETHER_E2E".into(), "yes".into())],
            stdin: b"abc\n".to_vec(),
            close_stdin: true,
            ..Default::default()
        };
        let out = run_exec(ts.server.addr(), ts.client_config(), request).unwrap();
        assert_eq!(text(&out.stdout), "yes\nabc\n");
        assert_eq!(text(&out.stderr), "done\n");
        assert_eq!(out.exit_status, Some(4));
        assert_eq!(out.env_refused, 0);
    });
}

#[test]
fn pty_sizes_follow_pty_req_and_window_change_and_eof_ends_input() {
    with_timeout(LIMIT, |_| {
        let dir = tempfile::tempdir().unwrap();
        let ts = TestServer::start(dir.path(), |_| {}).unwrap();
        let request = ExecRequest {
            command: r#"stty size; while [ "$(stty size)" = "24 80" ]; do sleep 0.05; done; stty size; cat; echo "TERM=$TERM""#.into(),
            pty: Some(("xterm-256color".into(), 80, 24)),
            triggers: vec![
                Trigger { when: b"24 80".to_vec(), action: Action::WindowChange { cols: 132, rows: 43 } },
                Trigger { when: b"43 132".to_vec(), action: Action::Send(b"typed\n".to_vec()) },
                // On a tty, EOF is the VEOF character typed at the start of a line.
                Trigger { when: b"typed\r\ntyped\r\n".to_vec(), action: Action::Eof },
            ],
            ..Default::default()
        };
        let out = run_exec(ts.server.addr(), ts.client_config(), request).unwrap();
        // The tty echoes the input line, then `cat` prints it.
        assert_eq!(
            text(&out.stdout),
            "24 80\r\n43 132\r\ntyped\r\ntyped\r\nTERM=xterm-256color\r\n"
        );
        assert_eq!(out.exit_status, Some(0));
    });
}

#[test]
fn both_sides_rekeying_every_mebibyte_lose_nothing_in_a_16_mib_echo() {
    with_timeout(LIMIT, |_| {
        let dir = tempfile::tempdir().unwrap();
        let ts = TestServer::start(dir.path(), |c| c.rekey_bytes = 1024 * 1024).unwrap();
        let mut config = ts.client_config();
        config.rekey_bytes = 1024 * 1024;
        let data = pattern(16 * 1024 * 1024 + 5);
        let request = ExecRequest {
            command: "cat".into(),
            stdin: data.clone(),
            close_stdin: true,
            ..Default::default()
        };
        let out = run_exec(ts.server.addr(), config, request).unwrap();
        assert_eq!(out.stdout.len(), data.len());
        assert_eq!(sha256_hex(&out.stdout), sha256_hex(&data));
        assert_eq!(out.exit_status, Some(0));
        assert!(
            out.kex_count >= 16,
            "expected many rekeys, got {} key exchanges",
            out.kex_count
        );
        let reports = ts.server.wait_reports(1, Duration::from_secs(10));
        assert!(reports[0].end.is_clean(), "{:?}", reports[0].end);
    });
}
