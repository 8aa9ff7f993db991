//! The API's access rules over real sockets: a token on TCP, Origin and Host
//! refused before routing (an exec that is refused reaches no backend), and
//! the unix socket.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;

use hyper::Method;

use super::access::Access;
use super::fake::{FakeBackend, FakeContainer, run, serve_on};
use super::tests::get;
use crate::client::api::Api;

const TOKEN: &str = "0123456789abcdef0123";

fn tcp_with_token() -> (FakeBackend, Api) {
    let backend = FakeBackend::default();
    backend.add("cat", FakeContainer::cat(false));
    let access = Access {
        token: Some(TOKEN.into()),
        listener: Some([127, 0, 0, 1].into()),
        ..Default::default()
    };
    let api = serve_on(backend.clone(), "127.0.0.1:0", access);
    (backend, api)
}

/// Sends `head` (request line and headers, no blank line) on a fresh
/// connection to `api`; returns the status code and the response.
fn raw(api: &Api, head: &str) -> (u16, String) {
    let addr = api.url.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "{head}\r\nConnection: close\r\n\r\n").unwrap();
    // Up to the end, or (after a 101, when the connection stays open) the
    // end of the head.
    let mut resp = String::new();
    let mut buf = [0u8; 4096];
    while !(resp.starts_with("HTTP/1.1 101") && resp.contains("\r\n\r\n")) {
        match s.read(&mut buf).unwrap() {
            0 => break,
            n => resp.push_str(&String::from_utf8_lossy(&buf[..n])),
        }
    }
    let status = resp
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, resp)
}

#[test]
fn a_tcp_api_wants_the_token() {
    let (_, api) = tcp_with_token();
    run(async {
        let (status, headers, body) = get(&api, Method::GET, "/v1/containers").await;
        assert_eq!(status, 401, "{body:?}");
        assert_eq!(headers["www-authenticate"], "Bearer");
        assert!(String::from_utf8_lossy(&body).contains("Unauthorized"));
        let authed = api.clone().with_token(Some(TOKEN.into()));
        let (status, _, _) = get(&authed, Method::GET, "/v1/containers").await;
        assert_eq!(status, 200);
        let wrong = api.clone().with_token(Some("x".repeat(20)));
        let (status, _, _) = get(&wrong, Method::GET, "/v1/containers").await;
        assert_eq!(status, 401);
        // The refusals are counted.
        let (_, _, metrics) = get(&authed, Method::GET, "/metrics").await;
        let metrics = String::from_utf8_lossy(&metrics);
        assert!(
            metrics.contains("tetherd_http_requests_total{route=\"refused\",code=\"401\"} 2"),
            "{metrics}"
        );
    });
}

#[test]
fn a_browser_origin_or_a_foreign_host_is_refused_before_an_exec_starts() {
    let (backend, api) = tcp_with_token();
    let addr = api.url.trim_start_matches("http://").to_owned();
    let exec = format!(
        "GET /v1/containers/cat/exec?command=touch&command=/tmp/x HTTP/1.1\r\n\
         Authorization: Bearer {TOKEN}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Protocol: v5.channel.k8s.io"
    );
    let (status, resp) = raw(
        &api,
        &format!("{exec}\r\nHost: {addr}\r\nOrigin: http://evil.example"),
    );
    assert_eq!(status, 403, "{resp}");
    assert!(resp.contains("evil.example"), "{resp}");
    let (status, resp) = raw(&api, &format!("{exec}\r\nHost: evil.example:80"));
    assert_eq!(status, 403, "{resp}");
    assert!(
        backend.calls().iter().all(|c| !c.starts_with("exec")),
        "{:?}",
        backend.calls()
    );
    // The same request from the right Host and no Origin runs.
    let (status, resp) = raw(&api, &format!("{exec}\r\nHost: {addr}"));
    assert_eq!(status, 101, "{resp}");
    assert!(backend.calls().iter().any(|c| c.starts_with("exec")));
}

#[test]
fn a_unix_socket_api_is_0660_and_needs_no_token() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sub/api.sock");
    let backend = FakeBackend::default();
    backend.add("cat", FakeContainer::cat(false));
    let api = serve_on(backend, &format!("unix:{}", path.display()), Access::unix());
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);
    run(async {
        let (status, _, body) = get(&api, Method::GET, "/v1/containers/cat").await;
        assert_eq!(status, 200, "{body:?}");
        let conn = crate::client::ws::connect(&api, "/v1/containers/cat/attach?stdin=1")
            .await
            .unwrap();
        assert_eq!(conn.tty, Some(false));
    });
}
