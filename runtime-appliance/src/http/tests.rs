//! In-process tests of the HTTP API over real sockets, against the scripted
//! fake backend and against a real (empty) `Appliance`.

use std::time::Duration;

use async_tungstenite::tungstenite::{self, Message, client::IntoClientRequest};
use bytes::Bytes;
use futures_lite::StreamExt;
use http_body_util::BodyExt;
use hyper::Method;
use serde_json::{Value, json};

use super::fake::{FakeBackend, FakeContainer, hello_script, run, serve};
use super::k8s::{self, Protocol, ServerFrame};
use crate::api_types::*;
use crate::client::api::{Api, ClientError};
use crate::client::ws::{self, Connected};

/// Status, headers of interest, and body of a request.
async fn get(api: &Api, method: Method, path: &str) -> (u16, hyper::HeaderMap, Bytes) {
    let resp = api.request(method, path).await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, headers, body)
}

async fn get_json(api: &Api, method: Method, path: &str) -> (u16, Value) {
    let (status, headers, body) = get(api, method, path).await;
    assert_eq!(headers["content-type"], "application/json", "{path}");
    let value = serde_json::from_slice(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body:?}"));
    (status, value)
}

fn fake() -> (FakeBackend, Api) {
    let backend = FakeBackend::default();
    backend.add("web", FakeContainer::script(hello_script(3)));
    backend.add("cat", FakeContainer::cat(false));
    backend.add("term", FakeContainer::cat(true));
    backend.add("running", FakeContainer::script(vec![Output::Stdout(Bytes::from_static(b"tick\n"))]));
    let lost = FakeContainer { lost: 4, ..FakeContainer::script(hello_script(0)) };
    backend.add("lost", lost);
    let api = serve(backend.clone());
    (backend, api)
}

#[test]
fn healthz_metrics_and_listing() {
    let (_, api) = fake();
    run(async {
        let (status, headers, body) = get(&api, Method::GET, "/healthz").await;
        assert_eq!((status, &body[..]), (200, &b"ok"[..]));
        assert!(headers["content-type"].to_str().unwrap().starts_with("text/plain"));

        let (status, list) = get_json(&api, Method::GET, "/v1/containers").await;
        assert_eq!(status, 200);
        let web = list.as_array().unwrap().iter().find(|c| c["id"] == "web").unwrap();
        assert_eq!(
            web,
            &json!({"id":"web","kind":"primary","state":"exited","exit_code":3,"connection":1,"output_end":15})
        );
        let (status, one) = get_json(&api, Method::GET, "/v1/containers/running").await;
        assert_eq!((status, &one["state"], &one["exit_code"]), (200, &json!("running"), &Value::Null));

        let (status, headers, body) = get(&api, Method::GET, "/metrics").await;
        let text = String::from_utf8(body.to_vec()).unwrap();
        assert_eq!(status, 200);
        assert!(headers["content-type"].to_str().unwrap().starts_with("text/plain; version=0.0.4"));
        assert!(text.starts_with("# TYPE fake_metric gauge\nfake_metric 1\n"), "{text}");
        assert!(text.contains("tetherd_http_requests_total{route=\"healthz\",code=\"200\"} 1"), "{text}");
        assert!(text.contains("tetherd_http_requests_total{route=\"list\",code=\"200\"} 1"), "{text}");
    });
}

#[test]
fn misuse_gets_4xx_json_naming_the_problem() {
    let (_, api) = fake();
    run(async {
        let cases: &[(Method, &str, u16, &str, &str)] = &[
            (Method::GET, "/v1/containers/nope", 404, "NotFound", "no such container: nope"),
            (Method::GET, "/nope", 404, "UnknownRoute", "no route for GET /nope"),
            (Method::GET, "/v1/containers/web/frob", 404, "UnknownRoute", "/v1/containers/web/frob"),
            (Method::DELETE, "/v1/containers/web", 405, "MethodNotAllowed", "DELETE"),
            (Method::POST, "/v1/containers", 405, "MethodNotAllowed", "allowed: GET"),
            (Method::GET, "/v1/containers/web/signal?signal=TERM", 405, "MethodNotAllowed", "allowed: POST"),
            (Method::GET, "/v1/containers/web/logs?from=abc", 400, "BadRequest", "from=\"abc\""),
            (Method::GET, "/v1/containers/web/logs?follow=maybe", 400, "BadRequest", "follow=\"maybe\""),
            (Method::GET, "/v1/containers/web/logs?tail=5", 400, "BadRequest", "unknown query parameter \"tail\""),
            (Method::GET, "/v1/containers/web/attach?stdin=maybe", 400, "BadRequest", "stdin=\"maybe\""),
            (Method::GET, "/v1/containers/web/attach?from=soon", 400, "BadRequest", "from=\"soon\""),
            (Method::GET, "/v1/containers/web/attach?timeout=forever", 400, "BadRequest", "timeout=\"forever\""),
            (Method::GET, "/v1/containers/web/attach?stdin=0&stdout=0&stderr=0", 400, "BadRequest", "at least one"),
            (Method::GET, "/v1/containers/web/attach", 400, "WebSocketRequired", "WebSocket upgrade"),
            (Method::GET, "/v1/containers/web/exec", 400, "BadRequest", "needs a command"),
            (Method::GET, "/v1/containers/web/exec?command=sh", 400, "WebSocketRequired", "WebSocket upgrade"),
            (Method::GET, "/v1/containers/web/exec?command=sh&width=80", 400, "BadRequest", "both width and height"),
            (Method::GET, "/v1/containers/web/exec?command=sh&env=NOEQUALS", 400, "BadRequest", "NAME=VALUE"),
            (Method::POST, "/v1/containers/web/signal", 400, "BadRequest", "missing query parameter \"signal\""),
            (Method::POST, "/v1/containers/web/signal?signal=NOPE", 400, "BadRequest", "unknown signal \"NOPE\""),
            (Method::POST, "/v1/containers/nope/signal?signal=TERM", 404, "NotFound", "nope"),
            (Method::POST, "/v1/containers/nope/start", 404, "NotFound", "nope"),
            (Method::GET, "/v1/containers/web/wait?timeout=x", 400, "BadRequest", "timeout=\"x\""),
            (Method::GET, "/v1/containers/%zz", 400, "BadRequest", "bad container id"),
            (Method::GET, "/healthz?x=1", 400, "BadRequest", "unknown query parameter \"x\""),
        ];
        for (method, path, status, reason, needle) in cases {
            let (got, body) = get_json(&api, method.clone(), path).await;
            assert_eq!(got, *status, "{method} {path}: {body}");
            assert_eq!(body["reason"], *reason, "{method} {path}: {body}");
            let error = body["error"].as_str().unwrap();
            assert!(error.contains(needle), "{method} {path}: {error:?} lacks {needle:?}");
        }
        let (_, headers, _) = get(&api, Method::PUT, "/healthz").await;
        assert_eq!(headers["allow"], "GET");
    });
}

#[test]
fn wait_signal_and_start() {
    let (backend, api) = fake();
    run(async {
        let (status, body) = get_json(&api, Method::GET, "/v1/containers/web/wait?timeout=2s").await;
        assert_eq!((status, body), (200, json!({"exit_code": 3})));
        for (given, canonical) in [("TERM", "TERM"), ("SIGKILL", "KILL"), ("hup", "HUP"), ("10", "USR1")] {
            let (status, body) =
                get_json(&api, Method::POST, &format!("/v1/containers/web/signal?signal={given}")).await;
            assert_eq!((status, body), (200, json!({"id": "web", "signal": canonical})));
        }
        let (status, body) = get_json(&api, Method::POST, "/v1/containers/web/start").await;
        assert_eq!((status, body), (200, json!({"id": "web", "started": true})));
    });
    let calls = backend.calls();
    assert!(calls.contains(&"wait web 2s".to_string()), "{calls:?}");
    for c in ["signal web TERM", "signal web KILL", "signal web HUP", "signal web USR1", "start web"] {
        assert!(calls.contains(&c.to_string()), "{c}: {calls:?}");
    }
}

#[test]
fn logs_are_exact_bytes_from_an_offset() {
    let (backend, api) = fake();
    run(async {
        let (status, headers, body) = get(&api, Method::GET, "/v1/containers/web/logs").await;
        assert_eq!((status, &body[..]), (200, &b"hello\noops\nbye\n"[..]));
        assert_eq!(headers["content-type"], "application/octet-stream");
        assert_eq!(headers["x-tether-offset"], "0");
        let (_, headers, body) = get(&api, Method::GET, "/v1/containers/web/logs?from=8&follow=1").await;
        assert_eq!(&body[..], b"ps\nbye\n");
        assert_eq!(headers["x-tether-offset"], "8");
        // Lost output: the stream starts later, and the header says where.
        let (_, headers, body) = get(&api, Method::GET, "/v1/containers/lost/logs?from=1").await;
        assert_eq!(&body[..], b"o\noops\nbye\n");
        assert_eq!(headers["x-tether-offset"], "4");
        let (status, _) = get_json(&api, Method::GET, "/v1/containers/nope/logs").await;
        assert_eq!(status, 404);
        // A running container without follow: what exists now, then the end.
        let (_, _, body) = get(&api, Method::GET, "/v1/containers/running/logs").await;
        assert_eq!(&body[..], b"tick\n");
    });
    assert!(backend.calls().contains(&"logs web from=8 follow=true".to_string()));
}

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
        let mut conn = ws::connect(&api, "/v1/containers/web/attach?stdout=1&stderr=1").await.unwrap();
        assert_eq!((conn.protocol, conn.offset, conn.tty), (Protocol::V5, Some(0), Some(false)));
        assert_eq!(conn.exec_id, None);
        let (out, err, status, close) = drain(&mut conn).await;
        assert_eq!((&out[..], &err[..]), (&b"hello\nbye\n"[..], &b"oops\n"[..]));
        let status = status.unwrap();
        assert_eq!(status.exit_code(), Ok(3));
        assert_eq!(status.reason.as_deref(), Some("NonZeroExitCode"));
        assert_eq!(close, Some(1000));

        // From an offset, stdout only.
        let mut conn = ws::connect(&api, "/v1/containers/web/attach?stderr=0&from=3").await.unwrap();
        assert_eq!(conn.offset, Some(3));
        let (out, err, status, _) = drain(&mut conn).await;
        assert_eq!((&out[..], &err[..]), (&b"lo\nbye\n"[..], &b""[..]));
        assert_eq!(status.unwrap().exit_code(), Ok(3));

        // Live: nothing replayed, just the status.
        let mut conn = ws::connect(&api, "/v1/containers/web/attach?from=live").await.unwrap();
        assert_eq!(conn.offset, Some(15));
        let (out, _, status, _) = drain(&mut conn).await;
        assert!(out.is_empty());
        assert_eq!(status.unwrap().exit_code(), Ok(3));

        let err = ws::connect(&api, "/v1/containers/nope/attach?timeout=0s").await.err().unwrap();
        assert!(matches!(&err, ClientError::Api { status: 404, .. }), "{err:?}");
    });
    assert!(backend.calls().contains(&"attach web from=Offset(3) stdin=false".to_string()));
    assert!(backend.calls().contains(&"attach web from=Live stdin=false".to_string()));
}

#[test]
fn attach_forwards_stdin_resize_and_close() {
    let (backend, api) = fake();
    run(async {
        let mut conn = ws::connect(&api, "/v1/containers/term/attach?stdin=1").await.unwrap();
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
        assert_eq!(status.unwrap(), k8s::Status::from_exit(&ExitStatus::Code(0)));
        assert_eq!(close, Some(1000));
    });
    let calls = backend.calls();
    assert_eq!(calls[calls.len() - 3..], ["stdin echo hi\r", "resize 120x40", "close_stdin"], "{calls:?}");
}

#[test]
fn attach_ignores_stdin_it_did_not_ask_for_and_v4_has_no_close() {
    let (backend, api) = fake();
    run(async {
        let mut conn = ws::connect(&api, "/v1/containers/cat/attach?stdin=0").await.unwrap();
        send(&mut conn, k8s::frame(k8s::STDIN, b"ignored")).await;
        send(&mut conn, Bytes::from_static(&[k8s::CLOSE, k8s::STDIN])).await;
        conn.ws.close(None).await.unwrap();
        while conn.ws.next().await.is_some() {}

        // Only v4 offered: v4 is chosen, and 255 is not a channel there.
        let mut req = api.ws_url("/v1/containers/cat/attach?stdin=1").into_client_request().unwrap();
        req.headers_mut().insert("Sec-WebSocket-Protocol", k8s::V4.parse().unwrap());
        let (mut raw, resp) = async_tungstenite::client_async(req, api.connect().await.unwrap()).await.unwrap();
        assert_eq!(resp.headers()["sec-websocket-protocol"], k8s::V4);
        raw.send(Message::Binary(Bytes::from_static(&[k8s::CLOSE, k8s::STDIN]))).await.unwrap();
        raw.send(Message::Binary(k8s::frame(k8s::STDIN, b"x"))).await.unwrap();
        match raw.next().await.unwrap().unwrap() {
            Message::Binary(b) => assert_eq!(&b[..], b"\x01x"),
            other => panic!("{other:?}"),
        }
        raw.close(None).await.unwrap();

        // No supported subprotocol: 400 naming the ones to offer.
        let mut req = api.ws_url("/v1/containers/cat/attach").into_client_request().unwrap();
        req.headers_mut().insert("Sec-WebSocket-Protocol", "channel.k8s.io".parse().unwrap());
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
    assert!(!calls.iter().any(|c| c == "stdin ignored" || c == "close_stdin"), "{calls:?}");
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
        assert_eq!(String::from_utf8(out).unwrap(), "argv: sh -c echo \"a b\"\nin");
        assert_eq!(status.unwrap().exit_code(), Ok(0));
        let err = ws::connect(&api, "/v1/containers/nope/exec?command=true").await.err().unwrap();
        assert!(matches!(&err, ClientError::Api { status: 404, .. }), "{err:?}");
    });
    let exec = backend.calls().into_iter().find(|c| c.starts_with("exec web")).unwrap();
    assert_eq!(
        exec,
        r#"exec web ["sh", "-c", "echo \"a b\""] tty=true stdin=true size=Some((100, 30)) env=[("A", "1"), ("B", "x=y")]"#
    );
}

#[test]
fn a_session_without_an_exit_status_closes_abnormally() {
    let backend = FakeBackend::default();
    let flaky = FakeContainer { drop_first_at: Some(7), ..FakeContainer::script(hello_script(0)) };
    backend.add("flaky", flaky);
    let api = serve(backend);
    run(async {
        let mut conn = ws::connect(&api, "/v1/containers/flaky/attach").await.unwrap();
        let (out, err, status, close) = drain(&mut conn).await;
        assert_eq!((&out[..], &err[..]), (&b"hello\n"[..], &b"o"[..]));
        assert_eq!((status, close), (None, Some(1011)));
        // The next attach resumes where the first stopped.
        let mut conn = ws::connect(&api, "/v1/containers/flaky/attach?from=7").await.unwrap();
        let (out, err, status, _) = drain(&mut conn).await;
        assert_eq!((&out[..], &err[..]), (&b"bye\n"[..], &b"ops\n"[..]));
        assert_eq!(status.unwrap().exit_code(), Ok(0));
    });
}

#[test]
fn real_appliance_error_paths() {
    let key = proto_core::PrivateKey::from_seed([7; 32]);
    let appliance = crate::appliance::Appliance::new(key, None);
    let api = serve(appliance);
    run(async {
        let (status, _, body) = get(&api, Method::GET, "/healthz").await;
        assert_eq!((status, &body[..]), (200, &b"ok"[..]));
        let (status, list) = get_json(&api, Method::GET, "/v1/containers").await;
        assert_eq!((status, list), (200, json!([])));
        let (status, body) = get_json(&api, Method::GET, "/v1/containers/ghost").await;
        assert_eq!((status, &body["reason"]), (404, &json!("NotFound")), "{body}");
        let (status, body) = get_json(&api, Method::GET, "/v1/containers/ghost/logs?from=abc").await;
        assert_eq!((status, &body["reason"]), (400, &json!("BadRequest")), "{body}");
        let (status, _) = get_json(&api, Method::PATCH, "/v1/containers/ghost").await;
        assert_eq!(status, 405);
        let err = ws::connect(&api, "/v1/containers/ghost/attach?timeout=0s").await.err().unwrap();
        assert!(matches!(&err, ClientError::Api { status: 404, .. }), "{err:?}");
        let (status, _, body) = get(&api, Method::GET, "/metrics").await;
        let text = String::from_utf8(body.to_vec()).unwrap();
        assert_eq!(status, 200);
        assert!(text.contains("tetherd_http_requests_total{route=\"get\",code=\"404\"} 1"), "{text}");
    });
}

#[test]
fn nothing_panics_on_odd_requests() {
    use futures_lite::{AsyncReadExt, AsyncWriteExt};
    let (_, api) = fake();
    run(async {
        let odd: &[&[u8]] = &[
            b"GET /v1/containers/%00%ff HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            b"GET /v1/containers/web/attach?stdin=1 HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 12\r\n\r\n",
            b"GET /v1/containers/web/attach HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\r\n",
            b"GET /v1/containers/web/logs?from=99999999999999999999999 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            b"GET /v1/containers/web/logs?from=%FF HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            b"GET /v1/containers/web/logs?from=1000 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            b"GARBAGE\r\n\r\n",
        ];
        for req in odd {
            let mut s = api.connect().await.unwrap();
            s.write_all(req).await.unwrap();
            let mut resp = Vec::new();
            let _ = futures_lite::future::or(
                async {
                    let _ = s.read_to_end(&mut resp).await;
                },
                async {
                    smol::Timer::after(Duration::from_secs(2)).await;
                },
            )
            .await;
            let text = String::from_utf8_lossy(&resp);
            assert!(text.starts_with("HTTP/1.1 "), "{:?} -> {text:?}", String::from_utf8_lossy(req));
            assert!(!text.starts_with("HTTP/1.1 5"), "{:?} -> {text:?}", String::from_utf8_lossy(req));
        }
        // The server is still up.
        let (status, _, _) = get(&api, Method::GET, "/healthz").await;
        assert_eq!(status, 200);
    });
}
