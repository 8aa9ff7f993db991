//! Interop with AsyncSSH: an AsyncSSH client (tests/peers/asyncssh_client.py)
//! against our server, with the post-quantum `mlkem768x25519-sha256` key
//! exchange that OpenSSH 9.2 lacks.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use e2e::peers::{self, TestServer};
use e2e::{available, with_timeout};
use proto_core::crypto::KexAlg;
use serde_json::Value;

#[test]
fn asyncssh_runs_commands_over_mlkem768x25519() {
    with_timeout(Duration::from_secs(120), |procs| {
        let Some(python) = available("AsyncSSH interop", peers::python_with_asyncssh()) else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let ts = TestServer::start(dir.path(), |_| {}).expect("start our server");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peers/asyncssh_client.py");
        let addr = ts.server.addr();
        let mut cmd = Command::new(&python);
        cmd.arg(&script)
            .arg(addr.ip().to_string())
            .arg(addr.port().to_string())
            .arg(&ts.client_key_path)
            .arg(&ts.known_hosts)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let out = procs.spawn(&mut cmd).unwrap().wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "the AsyncSSH client failed: {stderr}");
        let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!("bad report ({e}): {}", String::from_utf8_lossy(&out.stdout))
        });

        let status = &report["status"];
        assert_eq!(status["stdout"], "hello\n");
        assert_eq!(
            status["stderr"], "oops\n",
            "stderr must arrive as extended data"
        );
        assert_eq!(status["exit_status"], 7);
        assert_eq!(
            report["stdin"]["stdout"], "from asyncssh\n",
            "stdin, then EOF, reach `cat`"
        );
        assert_eq!(report["stdin"]["exit_status"], 0);
        assert_eq!(
            report["env"]["stdout"], "yes\n",
            "`env` requests are honoured"
        );
        assert_eq!(report["signal"]["exit_signal"], "TERM", "{report}");

        let reports = ts.server.wait_reports(1, Duration::from_secs(10));
        assert_eq!(reports.len(), 1, "{reports:?}");
        assert_eq!(reports[0].kex, Some(KexAlg::MlKem768X25519));
        assert_eq!(
            reports[0].exits,
            ["status 7", "status 0", "status 0", "signal TERM"]
        );
        assert!(reports[0].end.is_clean(), "{:?}", reports[0].end);
    });
}
