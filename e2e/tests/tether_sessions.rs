//! `tether` and the appliance together, over loopback TCP with link sync:
//! attach, replay, resize, detach, stdin, exit codes, execs, signals, start
//! gates and waiting for containers that have not arrived.

use std::time::{Duration, Instant};

use e2e::fixtures::{Fixture, Guest};
use e2e::{sha256_hex, with_timeout};
use runtime_appliance::{
    ApiError, AttachOptions, Attachment, ExecOptions, ExitStatus, From, Output,
};

const LIMIT: Duration = Duration::from_secs(120);
const APPEAR: Duration = Duration::from_secs(20);

/// Collects output until it contains `needle` (for at most 20 s); returns
/// everything read.
async fn read_until(att: &mut Attachment, needle: &str) -> String {
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !String::from_utf8_lossy(&seen).contains(needle) {
        let next = futures_lite::future::or(async { Some(att.next().await) }, async {
            smol::Timer::at(deadline).await;
            None
        });
        match next.await {
            Some(Some(Output::Stdout(b))) | Some(Some(Output::Stderr(b))) => {
                seen.extend_from_slice(&b)
            }
            Some(Some(other)) => panic!(
                "expected {needle:?}, got {other:?} after {:?}",
                String::from_utf8_lossy(&seen)
            ),
            Some(None) => panic!(
                "attachment ended before {needle:?}; got {:?}",
                String::from_utf8_lossy(&seen)
            ),
            None => panic!(
                "no {needle:?} within 20 s; got {:?}",
                String::from_utf8_lossy(&seen)
            ),
        }
    }
    String::from_utf8_lossy(&seen).into_owned()
}

/// Reads to the end: (stdout, stderr, exit).
async fn read_all(att: &mut Attachment) -> (Vec<u8>, Vec<u8>, Option<ExitStatus>) {
    let (mut out, mut err, mut exit) = (Vec::new(), Vec::new(), None);
    while let Some(o) = att.next().await {
        match o {
            Output::Stdout(b) => out.extend_from_slice(&b),
            Output::Stderr(b) => err.extend_from_slice(&b),
            Output::Exit(e) => exit = Some(e),
            Output::Gap(n) => panic!("unexpected gap of {n}"),
        }
    }
    (out, err, exit)
}

fn options(stdin: bool) -> AttachOptions {
    AttachOptions {
        stdin,
        timeout: APPEAR,
        ..Default::default()
    }
}

#[test]
fn attach_type_resize_detach_reattach_and_close_stdin_on_a_shell() {
    with_timeout(LIMIT, |procs| {
        let dir = tempfile::tempdir().unwrap();
        let fx = Fixture::new();
        let mut config = fx.config("shell", &["/bin/sh"]);
        config["sessions"][0]["tty"] = true.into();
        config["sessions"][0]["tty_size"] = serde_json::json!([80, 24]);
        let mut guest = Guest::start(&procs, dir.path(), &config);
        smol::block_on(async {
            let mut att = fx.appliance.attach("shell", options(true)).await.unwrap();
            att.write_stdin("stty size\n".into()).await.unwrap();
            read_until(&mut att, "24 80").await;
            att.resize(100, 40).await.unwrap();
            // The terminal echoes what we type, so markers are computed by the shell.
            att.write_stdin("stty size; echo M$((40+2))\n".into())
                .await
                .unwrap();
            let text = read_until(&mut att, "M42\r\n").await;
            assert!(text.contains("40 100"), "after resize: {text:?}");
            // Detach: drop without closing stdin; the shell keeps running.
            let offset = att.offset();
            drop(att);
            let mut att = fx
                .appliance
                .attach(
                    "shell",
                    AttachOptions {
                        from: From::Offset(offset),
                        ..options(true)
                    },
                )
                .await
                .unwrap();
            att.write_stdin("echo A$((1+1))\n".into()).await.unwrap();
            read_until(&mut att, "A2\r\n").await;
            att.close_stdin().await.unwrap();
            let (_, _, exit) = read_all(&mut att).await;
            assert_eq!(exit, Some(ExitStatus::Code(0)));
            let waited = fx.appliance.wait("shell", APPEAR).await.unwrap();
            assert_eq!(waited.code(), 0);
        });
        assert_eq!(
            guest
                .wait_exit(Duration::from_secs(10))
                .and_then(|s| s.code()),
            Some(0),
            "{}",
            guest.log_text()
        );
    });
}

#[test]
fn output_written_before_any_attach_is_replayed_from_offset_zero() {
    with_timeout(LIMIT, |procs| {
        let dir = tempfile::tempdir().unwrap();
        let fx = Fixture::new();
        let config = fx.config(
            "early",
            &[
                "/bin/sh",
                "-c",
                "echo one; echo two >&2; echo three; sleep 1; exit 7",
            ],
        );
        let _guest = Guest::start(&procs, dir.path(), &config);
        // Let the process write everything before anyone attaches.
        std::thread::sleep(Duration::from_millis(600));
        smol::block_on(async {
            let mut att = fx.appliance.attach("early", options(false)).await.unwrap();
            assert_eq!(att.start, 0);
            let (out, err, exit) = read_all(&mut att).await;
            assert_eq!(out, b"one\nthree\n");
            assert_eq!(err, b"two\n");
            assert_eq!(exit, Some(ExitStatus::Code(7)));
        });
    });
}

#[test]
fn block_policy_delivers_100_mib_written_before_the_attach_byte_exact() {
    with_timeout(LIMIT, |procs| {
        let dir = tempfile::tempdir().unwrap();
        let fx = Fixture::new();
        // A deterministic 100 MiB stream, produced before the attach arrives.
        let script = "seq 1 20000000 | head -c 104857600";
        let mut config = fx.config("bulk", &["/bin/sh", "-c", script]);
        config["sessions"][0]["overflow"] = "block".into();
        config["sessions"][0]["output_buffer"] = (1 << 20).into();
        let _guest = Guest::start(&procs, dir.path(), &config);
        std::thread::sleep(Duration::from_secs(1));
        let mut expect = Vec::with_capacity(110 << 20);
        for i in 1..20_000_000u32 {
            if expect.len() >= 100 << 20 {
                break;
            }
            expect.extend_from_slice(format!("{i}\n").as_bytes());
        }
        expect.truncate(100 << 20);
        smol::block_on(async {
            let mut att = fx.appliance.attach("bulk", options(false)).await.unwrap();
            let (out, err, exit) = read_all(&mut att).await;
            assert!(err.is_empty(), "{}", String::from_utf8_lossy(&err));
            assert_eq!(out.len(), 100 << 20);
            assert_eq!(sha256_hex(&out), sha256_hex(&expect));
            assert_eq!(exit, Some(ExitStatus::Code(0)));
        });
    });
}

#[test]
fn an_exec_is_its_own_container_and_can_be_attached_and_signalled() {
    with_timeout(LIMIT, |procs| {
        let dir = tempfile::tempdir().unwrap();
        let fx = Fixture::new();
        let _guest = Guest::start(
            &procs,
            dir.path(),
            &fx.config("host", &["/bin/sh", "-c", "sleep 60"]),
        );
        smol::block_on(async {
            let exec = ExecOptions {
                command: vec![
                    "sh".into(),
                    "-c".into(),
                    "echo started; exec sleep 60".into(),
                ],
                timeout: APPEAR,
                ..Default::default()
            };
            let mut first = fx.appliance.exec("host", exec).await.unwrap();
            let exec_id = first.id.clone();
            assert_ne!(exec_id, "host");
            read_until(&mut first, "started").await;
            // It is listed as its own container, and a second attachment replays it.
            let listed = fx.appliance.get(&exec_id).await.unwrap();
            assert_eq!((listed.kind, listed.state), ("exec", "running"));
            let mut second = fx.appliance.attach(&exec_id, options(false)).await.unwrap();
            read_until(&mut second, "started").await;
            fx.appliance.signal(&exec_id, "KILL").await.unwrap();
            let (_, _, exit) = read_all(&mut first).await;
            assert_eq!(exit.map(|e| e.code()), Some(137));
            let (_, _, exit2) = read_all(&mut second).await;
            assert_eq!(exit2.map(|e| e.code()), Some(137));
            assert_eq!(
                fx.appliance.wait(&exec_id, APPEAR).await.unwrap().code(),
                137
            );
            // A plain exit code comes back too, and unknown signals are refused.
            let exec = ExecOptions {
                command: vec!["sh".into(), "-c".into(), "exit 42".into()],
                timeout: APPEAR,
                ..Default::default()
            };
            let mut att = fx.appliance.exec("host", exec).await.unwrap();
            assert_eq!(read_all(&mut att).await.2, Some(ExitStatus::Code(42)));
            assert!(matches!(
                fx.appliance.signal("host", "NOPE").await,
                Err(ApiError::BadRequest(_))
            ));
            fx.appliance.signal("host", "TERM").await.unwrap();
            assert_eq!(
                fx.appliance.wait("host", APPEAR).await.unwrap().code(),
                128 + 15
            );
        });
    });
}

#[test]
fn a_start_gated_session_starts_on_start_and_on_timeout() {
    with_timeout(LIMIT, |procs| {
        let dir = tempfile::tempdir().unwrap();
        let fx = Fixture::new();
        let mut config = fx.config(
            "gated",
            &["/bin/sh", "-c", "echo first-byte; exec sleep 60"],
        );
        config["sessions"][0]["start_gated"] = true.into();
        config["sessions"][0]["start_gate_timeout"] = "60s".into();
        config["sessions"].as_array_mut().unwrap().push(serde_json::json!({
            "id": "late", "cmd": ["/bin/sh", "-c", "echo timed-out-start"], "start_gated": true, "start_gate_timeout": "1s"
        }));
        let _guest = Guest::start(&procs, dir.path(), &config);
        smol::block_on(async {
            let mut att = fx.appliance.attach("gated", options(false)).await.unwrap();
            assert_eq!(fx.appliance.get("gated").await.unwrap().state, "created");
            fx.appliance.start("gated").await.unwrap();
            read_until(&mut att, "first-byte\n").await;
            assert!(
                matches!(fx.appliance.start("gated").await, Err(ApiError::Refused(_))),
                "a second start is refused"
            );
            // Nobody releases "late": its gate times out and it starts anyway.
            let mut late = fx.appliance.attach("late", options(false)).await.unwrap();
            let started = Instant::now();
            let (out, _, _) = read_all(&mut late).await;
            assert_eq!(out, b"timed-out-start\n");
            assert!(started.elapsed() < Duration::from_secs(10));
            fx.appliance.signal("gated", "KILL").await.unwrap();
            assert_eq!(read_all(&mut att).await.2.map(|e| e.code()), Some(137));
        });
    });
}

#[test]
fn an_id_that_never_appears_times_out_and_a_late_one_wakes_its_waiter() {
    with_timeout(LIMIT, |procs| {
        let dir = tempfile::tempdir().unwrap();
        let fx = Fixture::new();
        smol::block_on(async {
            let started = Instant::now();
            let err = fx
                .appliance
                .attach(
                    "ghost",
                    AttachOptions {
                        timeout: Duration::from_millis(500),
                        ..Default::default()
                    },
                )
                .await
                .err()
                .unwrap();
            assert!(
                matches!(&err, ApiError::Timeout { id, .. } if id == "ghost"),
                "{err:?}"
            );
            assert!(
                err.to_string().contains("ghost") && err.to_string().contains("did not appear")
            );
            assert!(
                started.elapsed() >= Duration::from_millis(500)
                    && started.elapsed() < Duration::from_secs(5)
            );
            // Wait for an id first, then start the guest that serves it.
            let waiter = smol::spawn({
                let appliance = fx.appliance.clone();
                async move {
                    appliance
                        .attach("late", options(false))
                        .await
                        .map(|a| a.id.clone())
                }
            });
            smol::Timer::after(Duration::from_millis(300)).await;
            let _guest = Guest::start(
                &procs,
                dir.path(),
                &fx.config("late", &["/bin/sh", "-c", "sleep 5"]),
            );
            assert_eq!(waiter.await.unwrap(), "late");
        });
    });
}

#[test]
fn sessions_run_as_their_user_in_their_cwd_with_their_env() {
    with_timeout(LIMIT, |procs| {
        if !nix::unistd::Uid::effective().is_root() {
            e2e::require_or_skip(
                "running a session as another user",
                "the test is not running as root",
            );
            return;
        }
        let nobody = nix::unistd::User::from_name("nobody")
            .unwrap()
            .expect("a `nobody` user");
        let dir = tempfile::tempdir().unwrap();
        let fx = Fixture::new();
        let mut config = fx.config(
            "who",
            &["/bin/sh", "-c", "id -u; id -g; pwd; echo \"$GREETING\""],
        );
        config["sessions"][0]["user"] = "nobody".into();
        config["sessions"][0]["cwd"] = "/tmp".into();
        config["sessions"][0]["env"] = serde_json::json!({"GREETING": "hello there"});
        let _guest = Guest::start(&procs, dir.path(), &config);
        smol::block_on(async {
            let mut att = fx.appliance.attach("who", options(false)).await.unwrap();
            let (out, err, exit) = read_all(&mut att).await;
            let expect = format!("{}\n{}\n/tmp\nhello there\n", nobody.uid, nobody.gid);
            assert_eq!(
                String::from_utf8_lossy(&out),
                expect,
                "{}",
                String::from_utf8_lossy(&err)
            );
            assert_eq!(exit, Some(ExitStatus::Code(0)));
        });
    });
}

#[test]
fn a_guest_on_a_clean_link_uses_the_direct_listener_without_link_sync() {
    with_timeout(LIMIT, |procs| {
        let dir = tempfile::tempdir().unwrap();
        let fx = Fixture::new();
        let direct = fx
            .appliance
            .spawn_listener("127.0.0.1:0".parse().unwrap(), false)
            .unwrap();
        let mut config = fx.config("direct", &["/bin/sh", "-c", "echo no sync needed"]);
        config["link"] = format!("tcp:{direct},sync=off").into();
        let _guest = Guest::start(&procs, dir.path(), &config);
        smol::block_on(async {
            let mut att = fx.appliance.attach("direct", options(false)).await.unwrap();
            assert_eq!(read_all(&mut att).await.0, b"no sync needed\n");
        });
    });
}

#[test]
fn a_program_that_cannot_start_exits_127_with_the_reason_on_stderr() {
    with_timeout(LIMIT, |procs| {
        let dir = tempfile::tempdir().unwrap();
        let fx = Fixture::new();
        let config = fx.config("missing", &["/no/such/program"]);
        let _guest = Guest::start(&procs, dir.path(), &config);
        smol::block_on(async {
            let mut att = fx
                .appliance
                .attach("missing", options(false))
                .await
                .unwrap();
            let (_, err, exit) = read_all(&mut att).await;
            assert!(
                String::from_utf8_lossy(&err).contains("/no/such/program"),
                "{}",
                String::from_utf8_lossy(&err)
            );
            assert_eq!(exit, Some(ExitStatus::Code(127)));
        });
    });
}

#[test]
fn detaching_from_a_block_session_does_not_wedge_it() {
    // A detached attachment must close its channel: a channel left open kept
    // its reader pinned, and a `block` session then stopped for good.
    with_timeout(LIMIT, |procs| {
        let dir = tempfile::tempdir().unwrap();
        let fx = Fixture::new();
        let mut config = fx.config("wedge", &["/bin/sh", "-c", "seq 1 1000000"]);
        config["sessions"][0]["overflow"] = "block".into();
        config["sessions"][0]["output_buffer"] = (64 * 1024).into();
        let _guest = Guest::start(&procs, dir.path(), &config);
        let expect: Vec<u8> = (1..=1_000_000)
            .flat_map(|i: u32| format!("{i}\n").into_bytes())
            .collect();
        smol::block_on(async {
            let mut first = fx.appliance.attach("wedge", options(false)).await.unwrap();
            let mut got = Vec::new();
            while got.len() < 100_000 {
                if let Some(Output::Stdout(b)) = first.next().await {
                    got.extend_from_slice(&b);
                }
            }
            let offset = first.offset();
            drop(first);
            smol::Timer::after(Duration::from_millis(300)).await;
            let mut second = fx
                .appliance
                .attach(
                    "wedge",
                    AttachOptions {
                        from: From::Offset(offset),
                        ..options(false)
                    },
                )
                .await
                .unwrap();
            let (out, _, exit) = read_all(&mut second).await;
            got.extend_from_slice(&out);
            assert_eq!(got.len(), expect.len());
            assert!(got == expect, "output lost or duplicated across the detach");
            assert_eq!(exit, Some(ExitStatus::Code(0)));
        });
    });
}

#[test]
fn a_guest_cannot_claim_a_container_pinned_to_another_guest() {
    with_timeout(LIMIT, |procs| {
        use e2e::fixtures::host_key_of;
        let dir = tempfile::tempdir().unwrap();
        let known = std::collections::HashMap::from([
            ("a".to_string(), *host_key_of("a").public()),
            ("b".to_string(), *host_key_of("b").public()),
        ]);
        let fx = Fixture::with_known(Some(known));
        let _a = Guest::start(
            &procs,
            dir.path(),
            &fx.config("a", &["/bin/sh", "-c", "echo from-a; exec sleep 60"]),
        );
        std::thread::sleep(Duration::from_millis(300));
        // Guest b also names sessions "a" and "a-exec9": not its to claim. Its
        // own "b-extra" is fine.
        let mut b = fx.config("b", &["/bin/sh", "-c", "exec sleep 60"]);
        for (id, text) in [("a", "from-b"), ("a-exec9", "from-b"), ("b-extra", "extra")] {
            b["sessions"].as_array_mut().unwrap().push(serde_json::json!({"id": id, "cmd": ["/bin/sh", "-c", format!("echo {text}; exec sleep 60")]}));
        }
        let _b = Guest::start(&procs, dir.path(), &b);
        smol::block_on(async {
            let mut extra = fx
                .appliance
                .attach("b-extra", options(false))
                .await
                .unwrap();
            read_until(&mut extra, "extra").await;
            let mut att = fx.appliance.attach("a", options(false)).await.unwrap();
            assert_eq!(
                read_until(&mut att, "\n").await,
                "from-a\n",
                "attach a reaches guest a"
            );
            assert!(fx.appliance.get("a-exec9").await.is_err());
        });
    });
}

#[test]
fn stdin_for_a_process_that_does_not_read_is_bounded() {
    with_timeout(LIMIT, |procs| {
        let dir = tempfile::tempdir().unwrap();
        let fx = Fixture::new();
        let _guest = Guest::start(
            &procs,
            dir.path(),
            &fx.config("deaf", &["/bin/sh", "-c", "exec sleep 60"]),
        );
        smol::block_on(async {
            let att = fx.appliance.attach("deaf", options(true)).await.unwrap();
            let chunk = bytes::Bytes::from(vec![b'x'; 64 * 1024]);
            let mut written = 0usize;
            let writing = async {
                loop {
                    att.write_stdin(chunk.clone()).await.unwrap();
                    written += chunk.len();
                }
            };
            futures_lite::future::or(writing, async {
                smol::Timer::after(Duration::from_secs(2)).await;
            })
            .await;
            // The guest's window (2 MiB), tetherd's queue (1 MiB) and a pipe:
            // then writers wait instead of tetherd buffering without bound.
            assert!(
                written < 5 << 20,
                "tetherd accepted {written} bytes for a process that reads nothing"
            );
            assert!(written >= 2 << 20, "only {written} bytes accepted");
        });
    });
}

#[test]
fn exited_execs_are_forgotten_beyond_a_bound() {
    // Every exec ever run stayed listed: the container list eventually outgrew
    // a packet and the link could never come up again.
    with_timeout(LIMIT, |procs| {
        let dir = tempfile::tempdir().unwrap();
        let fx = Fixture::new();
        let _guest = Guest::start(
            &procs,
            dir.path(),
            &fx.config("busy", &["/bin/sh", "-c", "exec sleep 60"]),
        );
        smol::block_on(async {
            for _ in 0..80 {
                let exec = ExecOptions {
                    command: vec!["true".into()],
                    timeout: APPEAR,
                    ..Default::default()
                };
                let mut att = fx.appliance.exec("busy", exec).await.unwrap();
                assert_eq!(read_all(&mut att).await.2, Some(ExitStatus::Code(0)));
            }
            let execs = fx
                .appliance
                .list()
                .await
                .into_iter()
                .filter(|c| c.kind == "exec")
                .count();
            assert!((60..=65).contains(&execs), "{execs} execs still listed");
            assert!(
                fx.appliance.get("busy-exec80").await.is_ok(),
                "the newest stays"
            );
        });
    });
}
