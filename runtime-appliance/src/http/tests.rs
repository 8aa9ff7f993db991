//! In-process tests of the HTTP API over real sockets, against the scripted
//! fake backend and against a real (empty) `Appliance`.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::Method;
use serde_json::{Value, json};

use super::fake::{FakeBackend, FakeContainer, hello_script, run, serve};
use crate::api_types::*;
use crate::client::api::{Api, ClientError};
use crate::client::ws;

/// Status, headers of interest, and body of a request.
pub(super) async fn get(api: &Api, method: Method, path: &str) -> (u16, hyper::HeaderMap, Bytes) {
    let resp = api.request(method, path).await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, headers, body)
}

pub(super) async fn get_json(api: &Api, method: Method, path: &str) -> (u16, Value) {
    let (status, headers, body) = get(api, method, path).await;
    assert_eq!(headers["content-type"], "application/json", "{path}");
    let value = serde_json::from_slice(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body:?}"));
    (status, value)
}

pub(super) fn fake() -> (FakeBackend, Api) {
    let backend = FakeBackend::default();
    backend.add("web", FakeContainer::script(hello_script(3)));
    backend.add("cat", FakeContainer::cat(false));
    backend.add("term", FakeContainer::cat(true));
    backend.add(
        "running",
        FakeContainer::script(vec![Output::Stdout(Bytes::from_static(b"tick\n"))]),
    );
    let lost = FakeContainer {
        lost: 4,
        ..FakeContainer::script(hello_script(0))
    };
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
        assert!(
            headers["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/plain")
        );

        let (status, list) = get_json(&api, Method::GET, "/v1/containers").await;
        assert_eq!(status, 200);
        let web = list
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["id"] == "web")
            .unwrap();
        assert_eq!(
            web,
            &json!({"id":"web","kind":"primary","state":"exited","exit_code":3,"connection":1,"output_end":15,"tty":false})
        );
        let (status, one) = get_json(&api, Method::GET, "/v1/containers/running").await;
        assert_eq!(
            (status, &one["state"], &one["exit_code"]),
            (200, &json!("running"), &Value::Null)
        );

        let (status, headers, body) = get(&api, Method::GET, "/metrics").await;
        let text = String::from_utf8(body.to_vec()).unwrap();
        assert_eq!(status, 200);
        assert!(
            headers["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/plain; version=0.0.4")
        );
        assert!(
            text.starts_with("# TYPE fake_metric gauge\nfake_metric 1\n"),
            "{text}"
        );
        assert!(
            text.contains("tetherd_http_requests_total{route=\"healthz\",code=\"200\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("tetherd_http_requests_total{route=\"list\",code=\"200\"} 1"),
            "{text}"
        );
    });
}

#[test]
fn misuse_gets_4xx_json_naming_the_problem() {
    let (_, api) = fake();
    run(async {
        // METHOD PATH STATUS REASON, then text the error message must contain.
        let cases = [
            "GET /v1/containers/nope 404 NotFound no such container: nope",
            "GET /nope 404 UnknownRoute no route for GET /nope",
            "GET /v1/containers/web/frob 404 UnknownRoute /v1/containers/web/frob",
            "PUT /v1/containers/web 405 MethodNotAllowed allowed: GET, DELETE",
            "PATCH /v1/containers 405 MethodNotAllowed allowed: GET, POST",
            "POST /v1/containers 400 BadRequest request body",
            "DELETE /v1/containers/web 501 NotImplemented does not boot VMs",
            "DELETE /v1/containers/web?force=perhaps 400 BadRequest force=\"perhaps\"",
            "POST /v1/containers/web/stop?grace=x 400 BadRequest grace=\"x\"",
            "POST /v1/containers/web/stop 501 NotImplemented does not boot VMs",
            "GET /v1/node 501 NotImplemented does not boot VMs",
            "GET /v1/containers/web/signal?signal=TERM 405 MethodNotAllowed allowed: POST",
            "GET /v1/containers/web/logs?from=abc 400 BadRequest from=\"abc\"",
            "GET /v1/containers/web/logs?follow=maybe 400 BadRequest follow=\"maybe\"",
            "GET /v1/containers/web/logs?lines=5 400 BadRequest unknown query parameter \"lines\"",
            "GET /v1/containers/web/logs?tail=some 400 BadRequest tail=\"some\"",
            "GET /v1/containers/web/logs?since=yesterday 400 BadRequest since=\"yesterday\"",
            "GET /v1/containers/web/attach?stdin=maybe 400 BadRequest stdin=\"maybe\"",
            "GET /v1/containers/web/attach?from=soon 400 BadRequest from=\"soon\"",
            "GET /v1/containers/web/attach?timeout=forever 400 BadRequest timeout=\"forever\"",
            "GET /v1/containers/web/attach?stdin=0&stdout=0&stderr=0 400 BadRequest at least one",
            "GET /v1/containers/web/attach 400 WebSocketRequired WebSocket upgrade",
            "GET /v1/containers/web/exec 400 BadRequest needs a command",
            "GET /v1/containers/web/exec?command=sh 400 WebSocketRequired WebSocket upgrade",
            "GET /v1/containers/web/exec?command=sh&width=80 400 BadRequest both width and height",
            "GET /v1/containers/web/exec?command=sh&env=NOEQUALS 400 BadRequest NAME=VALUE",
            "POST /v1/containers/web/signal 400 BadRequest missing query parameter \"signal\"",
            "POST /v1/containers/web/signal?signal=NOPE 400 BadRequest unknown signal \"NOPE\"",
            "POST /v1/containers/nope/signal?signal=TERM 404 NotFound nope",
            "POST /v1/containers/nope/start 404 NotFound nope",
            "GET /v1/containers/web/wait?timeout=x 400 BadRequest timeout=\"x\"",
            "GET /v1/containers/%zz 400 BadRequest bad container id",
            "GET /healthz?x=1 400 BadRequest unknown query parameter \"x\"",
        ];
        for case in cases {
            let mut parts = case.splitn(5, ' ');
            let mut next = || parts.next().unwrap();
            let (method, path) = (next().parse::<Method>().unwrap(), next());
            let (status, reason, needle) = (next().parse::<u16>().unwrap(), next(), next());
            let (got, body) = get_json(&api, method.clone(), path).await;
            assert_eq!(got, status, "{case}: {body}");
            assert_eq!(body["reason"], reason, "{case}: {body}");
            let error = body["error"].as_str().unwrap();
            assert!(error.contains(needle), "{case}: {error:?} lacks {needle:?}");
        }
        let (_, headers, _) = get(&api, Method::PUT, "/healthz").await;
        assert_eq!(headers["allow"], "GET");
    });
}

#[test]
fn wait_signal_and_start() {
    let (backend, api) = fake();
    run(async {
        let (status, body) =
            get_json(&api, Method::GET, "/v1/containers/web/wait?timeout=2s").await;
        assert_eq!((status, body), (200, json!({"exit_code": 3})));
        for (given, canonical) in [
            ("TERM", "TERM"),
            ("SIGKILL", "KILL"),
            ("hup", "HUP"),
            ("10", "USR1"),
        ] {
            let (status, body) = get_json(
                &api,
                Method::POST,
                &format!("/v1/containers/web/signal?signal={given}"),
            )
            .await;
            assert_eq!(
                (status, body),
                (200, json!({"id": "web", "signal": canonical}))
            );
        }
        let (status, body) = get_json(&api, Method::POST, "/v1/containers/web/start").await;
        assert_eq!((status, body), (200, json!({"id": "web", "started": true})));
    });
    let calls = backend.calls();
    assert!(calls.contains(&"wait web 2s".to_string()), "{calls:?}");
    for c in [
        "signal web TERM",
        "signal web KILL",
        "signal web HUP",
        "signal web USR1",
        "start web",
    ] {
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
        let (_, headers, body) =
            get(&api, Method::GET, "/v1/containers/web/logs?from=8&follow=1").await;
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
    assert!(
        backend
            .calls()
            .contains(&"logs web from=8 follow=true".to_string())
    );
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
        assert_eq!(
            (status, &body["reason"]),
            (404, &json!("NotFound")),
            "{body}"
        );
        let (status, body) =
            get_json(&api, Method::GET, "/v1/containers/ghost/logs?from=abc").await;
        assert_eq!(
            (status, &body["reason"]),
            (400, &json!("BadRequest")),
            "{body}"
        );
        let (status, _) = get_json(&api, Method::PATCH, "/v1/containers/ghost").await;
        assert_eq!(status, 405);
        let err = ws::connect(&api, "/v1/containers/ghost/attach?timeout=0s")
            .await
            .err()
            .unwrap();
        assert!(
            matches!(&err, ClientError::Api { status: 404, .. }),
            "{err:?}"
        );
        let (status, _, body) = get(&api, Method::GET, "/metrics").await;
        let text = String::from_utf8(body.to_vec()).unwrap();
        assert_eq!(status, 200);
        assert!(
            text.contains("tetherd_http_requests_total{route=\"get\",code=\"404\"} 1"),
            "{text}"
        );
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
                    // Until the end of the response head (some keep the connection).
                    let mut buf = [0u8; 1024];
                    while let Ok(n @ 1..) = s.read(&mut buf).await {
                        resp.extend_from_slice(&buf[..n]);
                        if resp.windows(4).any(|w| w == b"\r\n\r\n") {
                            break;
                        }
                    }
                },
                async {
                    smol::Timer::after(Duration::from_secs(2)).await;
                },
            )
            .await;
            let text = String::from_utf8_lossy(&resp);
            assert!(
                text.starts_with("HTTP/1.1 "),
                "{:?} -> {text:?}",
                String::from_utf8_lossy(req)
            );
            assert!(
                !text.starts_with("HTTP/1.1 5"),
                "{:?} -> {text:?}",
                String::from_utf8_lossy(req)
            );
        }
        // The server is still up.
        let (status, _, _) = get(&api, Method::GET, "/healthz").await;
        assert_eq!(status, 200);
    });
}

#[test]
fn a_wait_ends_when_its_client_leaves() {
    use futures_lite::AsyncWriteExt;
    let (backend, api) = fake();
    let addr = api.url.trim_start_matches("http://").to_owned();
    run(async {
        let mut s = smol::Async::<std::net::TcpStream>::connect(
            addr.parse::<std::net::SocketAddr>().unwrap(),
        )
        .await
        .unwrap();
        let request = format!(
            "GET /v1/containers/running/wait?timeout=1000000h HTTP/1.1\r\nHost: {addr}\r\n\r\n"
        );
        s.write_all(request.as_bytes()).await.unwrap();
        while !backend
            .calls()
            .iter()
            .any(|c| c.starts_with("wait running"))
        {
            smol::Timer::after(Duration::from_millis(10)).await;
        }
        // The huge timeout was clamped to 24 h before it reached the backend.
        assert!(
            backend.calls().contains(&"wait running 86400s".to_string()),
            "{:?}",
            backend.calls()
        );
        drop(s);
        let gone = "wait running dropped".to_string();
        for _ in 0..200 {
            if backend.calls().contains(&gone) {
                return;
            }
            smol::Timer::after(Duration::from_millis(10)).await;
        }
        panic!("the wait outlived its client: {:?}", backend.calls());
    });
}
