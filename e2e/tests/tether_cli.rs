//! `tether` as a command: config errors exit 2 naming the field, and a plain
//! OpenSSH `ssh` runs commands through a `tcp-listen` link.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use e2e::fixtures::{Guest, binary, key};
use e2e::peers::{free_port, known_hosts_line, ssh_base, ssh_binary, write_file, write_key_pair};
use e2e::{available, with_timeout};

const LIMIT: Duration = Duration::from_secs(60);

fn run_tether(config: &str) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.json");
    std::fs::write(&path, config).unwrap();
    let out = Command::new(binary("tether"))
        .arg("--config")
        .arg(&path)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn valid() -> serde_json::Value {
    serde_json::json!({
        "id": "c1",
        "host_key": key(1).to_openssh("c1"),
        "authorized_keys": [key(2).public().to_openssh()],
        "link": "tcp-listen:127.0.0.1:0",
        "sessions": [{"id": "c1", "cmd": ["/bin/true"]}],
    })
}

#[test]
fn an_invalid_config_exits_2_naming_the_field() {
    let cases = [
        (serde_json::json!({"colour": "red"}), "colour"),
        (
            serde_json::json!({"sessions": [{"id": "c1", "cmd": ["x"], "overflow": "sideways"}]}),
            "sessions[0].overflow",
        ),
        (
            serde_json::json!({"sessions": [{"id": "c1", "cmd": []}]}),
            "sessions[0].cmd",
        ),
        (serde_json::json!({"link": "carrier-pigeon:1"}), "link"),
        (
            serde_json::json!({"authorized_keys": ["ssh-ed25519 notakey"]}),
            "authorized_keys[0]",
        ),
    ];
    for (patch, field) in cases {
        let mut config = valid();
        for (k, v) in patch.as_object().unwrap() {
            config[k] = v.clone();
        }
        let (code, stderr) = run_tether(&config.to_string());
        assert_eq!(code, Some(2), "{field}: {stderr}");
        assert!(stderr.contains(field), "the error names {field}: {stderr}");
    }
    let (code, stderr) = run_tether("{ not json");
    assert_eq!(code, Some(2));
    assert!(stderr.contains("config"), "{stderr}");
}

#[test]
fn openssh_runs_commands_through_a_tcp_listen_link() {
    with_timeout(LIMIT, |procs| {
        if available("OpenSSH client", ssh_binary()).is_none() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let port = free_port().unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let (host, user) = (key(11), key(12));
        let mut config = valid();
        config["host_key"] = host.to_openssh("guest").into();
        config["authorized_keys"] = serde_json::json!([user.public().to_openssh()]);
        config["link"] = format!("tcp-listen:{addr}").into();
        config["sessions"][0]["cmd"] = serde_json::json!(["/bin/sh", "-c", "sleep 60"]);
        let guest = Guest::start(&procs, dir.path(), &config);
        let key_path = dir.path().join("user");
        write_key_pair(&key_path, &user).unwrap();
        let known = dir.path().join("known_hosts");
        write_file(&known, &known_hosts_line(addr, host.public()), 0o600).unwrap();
        let ssh = |command: &str| {
            let mut c = ssh_base(&key_path, &known, addr, "anyone");
            c.arg(command).stdin(Stdio::null());
            c.output().unwrap()
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        let out = loop {
            let out = ssh("echo out; echo err >&2; exit 3");
            if out.status.code() != Some(255) || Instant::now() > deadline {
                break out;
            }
            std::thread::sleep(Duration::from_millis(100)); // the guest may still be starting
        };
        assert_eq!(String::from_utf8_lossy(&out.stdout), "out\n");
        assert!(String::from_utf8_lossy(&out.stderr).contains("err\n"));
        assert_eq!(out.status.code(), Some(3));
        // Stdin reaches the command and EOF ends it.
        let mut c = ssh_base(&key_path, &known, addr, "anyone");
        let child = c
            .arg("wc -c")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        {
            use std::io::Write;
            let mut stdin = child.stdin.as_ref().unwrap();
            stdin.write_all(&[b'x'; 100_000]).unwrap();
        }
        let mut child = child;
        drop(child.stdin.take());
        let out = child.wait_with_output().unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "100000");
        // An unknown key is refused, and the refusal is logged with its fingerprint.
        let stranger = key(13);
        let stranger_path = dir.path().join("stranger");
        write_key_pair(&stranger_path, &stranger).unwrap();
        let out = ssh_base(&stranger_path, &known, addr, "anyone")
            .arg("true")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(255));
        std::thread::sleep(Duration::from_millis(200));
        let log = guest.log_text();
        assert!(
            log.contains("refused authentication")
                && log.contains(&stranger.public().fingerprint()),
            "{log}"
        );
    });
}
