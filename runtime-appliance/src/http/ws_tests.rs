//! In-process tests of the attach and exec WebSockets against the scripted
//! fake backend: channels, status, stdin, resize, close, v4/v5, exec ids.

use async_tungstenite::tungstenite::{self, Message, client::IntoClientRequest};
use bytes::Bytes;
use futures_lite::StreamExt;
use serde_json::Value;

use super::fake::{FakeBackend, FakeContainer, hello_script, run, serve};
use super::k8s::{self, Protocol, ServerFrame};
use super::tests::fake;
use crate::api_types::*;
use crate::client::api::ClientError;
use crate::client::ws::{self, Connected};

/// Reads a session to its end: (stdout, stderr, status, close code).
async fn drain(conn: &mut Connected) -> (Vec<u8>, Vec<u8>, Option<k8s::Status>, Option<u16>) {
    let (mut out, mut err, mut status, mut close) = (vec![], vec![], None, None);
    while let Some(msg) = conn.ws.next().await {
        match msg.unwrap() {
            Message::Binary(b) => match k8s::parse_server(conn.protocol, &b).unwrap() {
                ServerFrame::Stdout(d) => out.extend_from_slice(&d),
                ServerFrame::Stderr(d) => err.extend_from_slice(&d),
                ServerFrame::Status(s) => status = Some(s),
            },
            Message::Close(f) => close = f.map(|f| u16::from(f.code)),
            _ => {}
        }
    }
    (out, err, status, close)
}

async fn send(conn: &mut Connected, msg: Bytes) {
    conn.ws.send(Message::Binary(msg)).await.unwrap();
}

#[test]
fn attach_streams_exact_channels_then_the_status() {
    let (backend, api) = fake();
    run(async {
        let mut conn = ws::connect(&api, "/v1/containers/web/attach?stdout=1&stderr=1")
            .await
            .unwrap();
        assert_eq!(
            (conn.protocol, conn.offset, conn.tty),
            (Protocol::V5, Some(0), Some(false))
        );
        assert_eq!(conn.exec_id, None);
        let (out, err, status, close) = drain(&mut conn).await;
        assert_eq!((&out[..], &err[..]), (&b"hello\nbye\n"[..], &b"oops\n"[..]));
        let status = status.unwrap();
        assert_eq!(status.exit_code(), Ok(3));
        assert_eq!(status.reason.as_deref(), Some("NonZeroExitCode"));
        assert_eq!(close, Some(1000));

        // From an offset, stdout only.
        let mut conn = ws::connect(&api, "/v1/containers/web/attach?stderr=0&from=3")
            .await
            .unwrap();
        assert_eq!(conn.offset, Some(3));
        let (out, err, status, _) = drain(&mut conn).await;
        assert_eq!((&out[..], &err[..]), (&b"lo\nbye\n"[..], &b""[..]));
        assert_eq!(status.unwrap().exit_code(), Ok(3));

        // Live: nothing replayed, just the status.
        let mut conn = ws::connect(&api, "/v1/containers/web/attach?from=live")
            .await
            .unwrap();
        assert_eq!(conn.offset, Some(15));
        let (out, _, status, _) = drain(&mut conn).await;
        assert!(out.is_empty());
        assert_eq!(status.unwrap().exit_code(), Ok(3));

        let err = ws::connect(&api, "/v1/containers/nope/attach?timeout=0s")
            .await
            .err()
            .unwrap();
        assert!(
            matches!(&err, ClientError::Api { status: 404, .. }),
            "{err:?}"
        );
    });
    assert!(
        backend
            .calls()
            .contains(&"attach web from=Offset(3) stdin=false".to_string())
    );
    assert!(
        backend
            .calls()
            .contains(&"attach web from=Live stdin=false".to_string())
    );
}

#[test]
fn attach_forwards_stdin_resize_and_close() {
    let (backend, api) = fake();
    run(async {
        let mut conn = ws::connect(&api, "/v1/containers/term/attach?stdin=1")
            .await
            .unwrap();
        assert_eq!(conn.tty, Some(true));
        send(&mut conn, k8s::frame(k8s::STDIN, b"echo hi\r")).await;
        send(&mut conn, k8s::resize_frame(120, 40)).await;
        // Bad messages are ignored, the session stays up.
        send(&mut conn, k8s::frame(k8s::RESIZE, b"{\"Width\":\"wide\"}")).await;
        send(&mut conn, Bytes::from_static(&[9, 9])).await;
        send(&mut conn, Bytes::new()).await;
        conn.ws.send(Message::Text("hello".into())).await.unwrap();
        send(&mut conn, Bytes::from_static(&[k8s::CLOSE, k8s::STDIN])).await;
        let (out, _, status, close) = drain(&mut conn).await;
        assert_eq!(String::from_utf8(out).unwrap(), "echo hi\rsize 120x40\n");
        assert_eq!(
            status.unwrap(),
            k8s::Status::from_exit(&ExitStatus::Code(0))
        );
        assert_eq!(close, Some(1000));
    });
    let calls = backend.calls();
    assert_eq!(
        calls[calls.len() - 3..],
        ["stdin echo hi\r", "resize 120x40", "close_stdin"],
        "{calls:?}"
    );
}

#[test]
fn attach_ignores_stdin_it_did_not_ask_for_and_v4_has_no_close() {
    let (backend, api) = fake();
    run(async {
        let mut conn = ws::connect(&api, "/v1/containers/cat/attach?stdin=0")
            .await
            .unwrap();
        send(&mut conn, k8s::frame(k8s::STDIN, b"ignored")).await;
        send(&mut conn, Bytes::from_static(&[k8s::CLOSE, k8s::STDIN])).await;
        conn.ws.close(None).await.unwrap();
        while conn.ws.next().await.is_some() {}

        // Only v4 offered: v4 is chosen, and 255 is not a channel there.
        let mut req = api
            .ws_url("/v1/containers/cat/attach?stdin=1")
            .into_client_request()
            .unwrap();
        req.headers_mut()
            .insert("Sec-WebSocket-Protocol", k8s::V4.parse().unwrap());
        let (mut raw, resp) = async_tungstenite::client_async(req, api.connect().await.unwrap())
            .await
            .unwrap();
        assert_eq!(resp.headers()["sec-websocket-protocol"], k8s::V4);
        raw.send(Message::Binary(Bytes::from_static(&[
            k8s::CLOSE,
            k8s::STDIN,
        ])))
        .await
        .unwrap();
        raw.send(Message::Binary(k8s::frame(k8s::STDIN, b"x")))
            .await
            .unwrap();
        match raw.next().await.unwrap().unwrap() {
            Message::Binary(b) => assert_eq!(&b[..], b"\x01x"),
            other => panic!("{other:?}"),
        }
        raw.close(None).await.unwrap();

        // No supported subprotocol: 400 naming the ones to offer.
        let mut req = api
            .ws_url("/v1/containers/cat/attach")
            .into_client_request()
            .unwrap();
        req.headers_mut()
            .insert("Sec-WebSocket-Protocol", "channel.k8s.io".parse().unwrap());
        match async_tungstenite::client_async(req, api.connect().await.unwrap()).await {
            Err(tungstenite::Error::Http(resp)) => {
                assert_eq!(resp.status(), 400);
                let body: Value = serde_json::from_slice(resp.body().as_deref().unwrap()).unwrap();
                assert_eq!(body["reason"], "UnsupportedSubprotocol");
                assert!(body["error"].as_str().unwrap().contains(k8s::V5));
            }
            other => panic!("{:?}", other.map(|_| ())),
        }
    });
    let calls = backend.calls();
    assert!(
        !calls
            .iter()
            .any(|c| c == "stdin ignored" || c == "close_stdin"),
        "{calls:?}"
    );
    assert!(calls.contains(&"stdin x".to_string()), "{calls:?}");
}

#[test]
fn exec_passes_the_command_and_reports_its_id() {
    let (backend, api) = fake();
    run(async {
        let path = "/v1/containers/web/exec?command=sh&command=-c&command=echo+%22a+b%22&stdin=1&tty=1\
                    &width=100&height=30&env=A%3D1&env=B%3Dx%3Dy";
        let mut conn = ws::connect(&api, path).await.unwrap();
        assert_eq!(conn.exec_id.as_deref(), Some("web.exec1"));
        assert_eq!((conn.tty, conn.offset), (Some(true), Some(0)));
        send(&mut conn, k8s::frame(k8s::STDIN, b"in")).await;
        send(&mut conn, Bytes::from_static(&[k8s::CLOSE, k8s::STDIN])).await;
        let (out, _, status, _) = drain(&mut conn).await;
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "argv: sh -c echo \"a b\"\nin"
        );
        assert_eq!(status.unwrap().exit_code(), Ok(0));
        let err = ws::connect(&api, "/v1/containers/nope/exec?command=true")
            .await
            .err()
            .unwrap();
        assert!(
            matches!(&err, ClientError::Api { status: 404, .. }),
            "{err:?}"
        );
    });
    let exec = backend
        .calls()
        .into_iter()
        .find(|c| c.starts_with("exec web"))
        .unwrap();
    assert_eq!(
        exec,
        r#"exec web ["sh", "-c", "echo \"a b\""] tty=true stdin=true size=Some((100, 30)) env=[("A", "1"), ("B", "x=y")]"#
    );
}

#[test]
fn a_session_without_an_exit_status_closes_abnormally() {
    let backend = FakeBackend::default();
    let flaky = FakeContainer {
        drop_first_at: Some(7),
        ..FakeContainer::script(hello_script(0))
    };
    backend.add("flaky", flaky);
    let api = serve(backend);
    run(async {
        let mut conn = ws::connect(&api, "/v1/containers/flaky/attach")
            .await
            .unwrap();
        let (out, err, status, close) = drain(&mut conn).await;
        assert_eq!((&out[..], &err[..]), (&b"hello\n"[..], &b"o"[..]));
        assert_eq!((status, close), (None, Some(1011)));
        // The next attach resumes where the first stopped.
        let mut conn = ws::connect(&api, "/v1/containers/flaky/attach?from=7")
            .await
            .unwrap();
        let (out, err, status, _) = drain(&mut conn).await;
        assert_eq!((&out[..], &err[..]), (&b"bye\n"[..], &b"ops\n"[..]));
        assert_eq!(status.unwrap().exit_code(), Ok(0));
    });
}

#[test]
fn a_gap_mid_stream_closes_the_websocket_naming_where_to_resume() {
    let (backend, api) = fake();
    backend.add(
        "holey",
        FakeContainer::script(vec![
            Output::Stdout(Bytes::from_static(b"ab")),
            Output::Gap(5),
            Output::Stdout(Bytes::from_static(b"cd")),
            Output::Exit(ExitStatus::Code(0)),
        ]),
    );
    run(async {
        let mut conn = ws::connect(&api, "/v1/containers/holey/attach")
            .await
            .unwrap();
        let mut out = Vec::new();
        let mut reason = None;
        while let Some(msg) = conn.ws.next().await {
            match msg.unwrap() {
                Message::Binary(b) => match k8s::parse_server(conn.protocol, &b).unwrap() {
                    ServerFrame::Stdout(d) => out.extend_from_slice(&d),
                    other => panic!("{other:?}"),
                },
                Message::Close(f) => reason = f.map(|f| (u16::from(f.code), f.reason.to_string())),
                _ => {}
            }
        }
        assert_eq!(out, b"ab", "nothing after the gap");
        assert_eq!(
            reason,
            Some((
                1011,
                "5 bytes of output lost at offset 2; resume from=7".into()
            ))
        );
        // Resuming there goes on with the bytes after the gap.
        let mut conn = ws::connect(&api, "/v1/containers/holey/attach?from=7")
            .await
            .unwrap();
        assert_eq!(conn.offset, Some(7));
        let (out, _, status, close) = drain(&mut conn).await;
        assert_eq!((&out[..], close), (&b"cd"[..], Some(1000)));
        assert!(status.is_some());
        // logs aborts its body at the gap.
        let resp = api
            .request(hyper::Method::GET, "/v1/containers/holey/logs")
            .await
            .unwrap();
        assert_eq!(resp.headers()["x-tether-offset"], "0");
        let mut body = resp.into_body();
        let mut got = Vec::new();
        let broke = loop {
            match http_body_util::BodyExt::frame(&mut body).await {
                Some(Ok(f)) => got.extend_from_slice(f.data_ref().map(|d| &d[..]).unwrap_or(b"")),
                Some(Err(_)) => break true,
                None => break false,
            }
        };
        assert!(broke, "the body must not end cleanly");
        assert_eq!(got, b"ab");
    });
}
