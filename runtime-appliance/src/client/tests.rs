//! The client against the scripted fake server: sessions, exit codes,
//! detaching, and resuming without duplicates after the stream drops.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;

use super::session::{self, Outcome, Resume, Terminal};
use super::term::{CTRL_P, CTRL_Q, Input};
use super::{ContainerRow, LogsQuery, format_table, stream_logs, ws};
use crate::api_types::*;
use crate::http::fake::{FakeBackend, FakeContainer, hello_script, run, serve};

/// A `Write` whose bytes the test can read.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Capture {
    fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

fn terminal(stdin: Option<async_channel::Receiver<Bytes>>) -> (Terminal, Capture, Capture) {
    let (out, err) = (Capture::default(), Capture::default());
    let term = Terminal {
        stdin: stdin.map(Input::Chunks),
        stdout: Box::new(out.clone()),
        stderr: Box::new(err.clone()),
        resize: None,
        size: None,
        detach_keys: false,
        close_stdin_at_eof: true,
    };
    (term, out, err)
}

fn resume(id: &str) -> Resume {
    Resume {
        id: Some(id.into()),
        window: Duration::from_secs(5),
        first_delay: Duration::from_millis(10),
    }
}

/// A long script: 200 numbered lines on stdout, every tenth also on stderr.
fn long_script() -> (Vec<Output>, String, String) {
    let (mut script, mut out, mut err) = (vec![], String::new(), String::new());
    for i in 0..200 {
        let line = format!("line {i}\n");
        out.push_str(&line);
        script.push(Output::Stdout(Bytes::from(line.clone())));
        if i % 10 == 0 {
            err.push_str(&line);
            script.push(Output::Stderr(Bytes::from(line)));
        }
    }
    script.push(Output::Exit(ExitStatus::Code(7)));
    (script, out, err)
}

#[test]
fn attach_survives_a_dropped_stream_without_duplicates() {
    let backend = FakeBackend::default();
    let (script, want_out, want_err) = long_script();
    backend.add(
        "flaky",
        FakeContainer {
            drop_first_at: Some(1001),
            ..FakeContainer::script(script)
        },
    );
    let api = serve(backend.clone());
    let (mut term, out, err) = terminal(None);
    let outcome = run(async {
        let conn = ws::connect(&api, "/v1/containers/flaky/attach")
            .await
            .unwrap();
        session::run(&api, conn, resume("flaky"), &mut term).await
    });
    assert_eq!(outcome.unwrap(), Outcome::Exited(7));
    assert_eq!(out.text(), want_out);
    assert_eq!(err.text(), want_err);
    let calls = backend.calls();
    assert_eq!(
        calls,
        [
            "attach flaky from=Offset(0) stdin=false",
            "attach flaky from=Offset(1001) stdin=false"
        ]
    );
}

#[test]
fn attach_gives_up_when_resuming_is_impossible() {
    let backend = FakeBackend::default();
    backend.add(
        "flaky",
        FakeContainer {
            drop_first_at: Some(3),
            ..FakeContainer::script(hello_script(0))
        },
    );
    let api = serve(backend);
    let (mut term, out, _) = terminal(None);
    let err = run(async {
        let conn = ws::connect(&api, "/v1/containers/flaky/attach")
            .await
            .unwrap();
        let no_resume = Resume {
            id: None,
            ..resume("flaky")
        };
        session::run(&api, conn, no_resume, &mut term).await
    })
    .unwrap_err();
    assert!(err.to_string().contains("without an exit status"), "{err}");
    assert_eq!(out.text(), "hel");
}

#[test]
fn exec_session_forwards_stdin_and_eof_then_exits() {
    let backend = FakeBackend::default();
    backend.add("box", FakeContainer::default());
    let api = serve(backend.clone());
    let (tx, rx) = async_channel::unbounded();
    let (mut term, out, _) = terminal(Some(rx));
    let outcome = run(async {
        let conn = ws::connect(&api, "/v1/containers/box/exec?command=cat&stdin=1")
            .await
            .unwrap();
        tx.send(Bytes::from_static(b"abc")).await.unwrap();
        drop(tx); // EOF: [255, 0] closes the exec's stdin; the fake exits 0.
        session::run(&api, conn, resume("box.exec1"), &mut term).await
    });
    assert_eq!(outcome.unwrap(), Outcome::Exited(0));
    assert_eq!(out.text(), "argv: cat\nabc");
    assert!(backend.calls().contains(&"close_stdin".to_string()));
}

#[test]
fn ctrl_p_ctrl_q_detaches_and_a_lone_ctrl_p_passes_after_a_pause() {
    let backend = FakeBackend::default();
    backend.add("sh", FakeContainer::cat(true));
    let api = serve(backend.clone());
    let (tx, rx) = async_channel::unbounded();
    let (mut term, out, _) = terminal(Some(rx));
    term.detach_keys = true;
    term.size = Some((90, 20));
    let outcome = run(async {
        let conn = ws::connect(&api, "/v1/containers/sh/attach?stdin=1")
            .await
            .unwrap();
        tx.send(Bytes::from_static(&[b'a', CTRL_P])).await.unwrap();
        smol::Timer::after(session::DETACH_WAIT * 3).await;
        tx.send(Bytes::from_static(&[CTRL_P, b'b', CTRL_P]))
            .await
            .unwrap();
        tx.send(Bytes::from_static(&[CTRL_Q, b'z'])).await.unwrap();
        session::run(&api, conn, resume("sh"), &mut term).await
    });
    assert_eq!(outcome.unwrap(), Outcome::Detached);
    // The server applies input asynchronously: wait for the last of it.
    let calls = run(async {
        loop {
            let calls = backend.calls();
            if calls.iter().any(|c| c.ends_with('b')) {
                break calls;
            }

            smol::Timer::after(Duration::from_millis(10)).await;
        }
    });
    // Detaching leaves stdin open; the size was sent at connect.
    assert!(!calls.contains(&"close_stdin".to_string()), "{calls:?}");
    assert!(calls.contains(&"resize 90x20".to_string()), "{calls:?}");
    let sent: String = calls
        .iter()
        .filter_map(|c| c.strip_prefix("stdin "))
        .collect();
    assert_eq!(sent, "a\x10\x10b");
    // Output may still be in flight when detaching; what arrived is a prefix.
    assert!(
        "size 90x20\na\x10\x10b".starts_with(&out.text()),
        "{:?}",
        out.text()
    );
}

#[test]
fn logs_follow_resumes_at_the_offset_received() {
    let backend = FakeBackend::default();
    let (script, want_out, want_err) = long_script();
    backend.add(
        "flaky",
        FakeContainer {
            drop_first_at: Some(555),
            ..FakeContainer::script(script.clone())
        },
    );
    backend.add("steady", FakeContainer::script(script));
    let api = serve(backend.clone());
    let mut got = Vec::new();
    let end = run(stream_logs(
        &api,
        "flaky",
        &LogsQuery {
            follow: true,
            ..Default::default()
        },
        &mut got,
        Duration::from_secs(5),
    ))
    .unwrap();
    assert_eq!(end, (want_out.len() + want_err.len()) as u64);
    // The second request resumes at what arrived: normally all 555 bytes
    // (the server lets hyper flush before aborting), never more.
    let calls = backend.calls();
    assert_eq!(calls.len(), 2, "{calls:?}");
    let resumed: u64 = calls[1]
        .strip_prefix("logs flaky from=")
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(resumed <= 555, "{calls:?}");
    let mut plain = Vec::new();
    run(stream_logs(
        &api,
        "steady",
        &LogsQuery {
            follow: false,
            ..Default::default()
        },
        &mut plain,
        Duration::from_secs(5),
    ))
    .unwrap();
    assert_eq!(got, plain);
    // No such container: reported at once, with or without follow.
    for follow in [false, true] {
        let started = std::time::Instant::now();
        let err = run(stream_logs(
            &api,
            "ghost",
            &LogsQuery {
                follow,
                ..Default::default()
            },
            &mut plain,
            Duration::from_secs(5),
        ))
        .unwrap_err();
        assert_eq!(err.to_string(), "no such container: ghost");
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}

#[test]
fn ls_table() {
    let rows = vec![
        ContainerRow {
            id: "web".into(),
            kind: "primary".into(),
            state: "running".into(),
            exit_code: None,
            connection: Some(3),
            output_end: 1234,
            forked_from: None,
            fork_failure: None,
        },
        ContainerRow {
            id: "web.exec-1".into(),
            kind: "exec".into(),
            state: "exited".into(),
            exit_code: Some(0),
            connection: None,
            output_end: 0,
            forked_from: None,
            fork_failure: None,
        },
    ];
    assert_eq!(
        format_table(&rows),
        "ID          KIND     STATE    EXIT  LINK  OUTPUT\n\
         web         primary  running  -     3     1234\n\
         web.exec-1  exec     exited   0     -     0\n"
    );
    let mut rows = rows;
    rows[0].forked_from = Some("db".into());
    rows[1].forked_from = Some("db".into());
    rows[1].fork_failure = Some("clock: no RTC".into());
    assert_eq!(
        format_table(&rows),
        "ID          KIND     STATE    EXIT  LINK  OUTPUT  NOTE\n\
         web         primary  running  -     3     1234    forked from db\n\
         web.exec-1  exec     exited   0     -     0       fork of db failed: clock: no RTC\n"
    );
}

#[test]
fn attach_leaves_the_container_stdin_open_at_local_eof() {
    let backend = FakeBackend::default();
    backend.add("web", FakeContainer::script(hello_script(2)));
    let api = serve(backend.clone());
    let (tx, rx) = async_channel::unbounded::<Bytes>();
    drop(tx);
    let (mut term, out, _) = terminal(Some(rx));
    term.close_stdin_at_eof = false;
    let outcome = run(async {
        let conn = ws::connect(&api, "/v1/containers/web/attach?stdin=1")
            .await
            .unwrap();
        session::run(&api, conn, resume("web"), &mut term).await
    });
    assert_eq!(outcome.unwrap(), Outcome::Exited(2));
    assert_eq!(out.text(), "hello\nbye\n");
    assert!(!backend.calls().contains(&"close_stdin".to_string()));
}
