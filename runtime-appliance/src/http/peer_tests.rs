//! The attach/exec WebSocket against an independent client: the Python
//! `websockets` peer in `tests/peers/ws_attach.py`, run on the fake backend.
//! Skipped with a printed reason when Python or `websockets` is missing,
//! unless `TETHER_REQUIRE_ALL=1`.

use std::path::PathBuf;
use std::process::Command;

use serde_json::{Value, json};

use super::fake::{FakeBackend, FakeContainer, hello_script, serve};
use crate::client::api::Api;

fn python() -> Option<PathBuf> {
    let workspace = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let candidates = [
        std::env::var_os("TETHER_PYTHON").map(PathBuf::from),
        Some(workspace.join(".venv/bin/python")),
    ];
    let found = candidates.into_iter().flatten().find(|p| {
        Command::new(p)
            .args(["-c", "import websockets"])
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if found.is_none() {
        let why = "no Python with the `websockets` package (set TETHER_PYTHON or create .venv from scripts/requirements.txt)";
        if std::env::var("TETHER_REQUIRE_ALL").is_ok_and(|v| v == "1") {
            panic!("{why}");
        }
        eprintln!("SKIPPED: {why}");
    }
    found
}

fn peer(python: &PathBuf, api: &Api, path: &str, args: &[&str]) -> (i32, Value) {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/peers/ws_attach.py");
    let out = Command::new(python)
        .arg(script)
        .arg(api.ws_url(path))
        .args(args)
        .args(["--timeout", "20"])
        .output()
        .expect("running ws_attach.py");
    let text = String::from_utf8_lossy(&out.stdout);
    let value = serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!(
            "ws_attach.py printed no JSON ({e}): {text}\nstderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), value)
}

#[test]
fn python_websockets_peer_attaches_and_execs() {
    let Some(python) = python() else { return };
    let backend = FakeBackend::default();
    backend.add("web", FakeContainer::script(hello_script(3)));
    backend.add("cat", FakeContainer::cat(false));
    let api = serve(backend.clone());

    let (code, r) = peer(
        &python,
        &api,
        "/v1/containers/cat/attach?stdin=1",
        &["--stdin", "hello\\n", "--close-stdin"],
    );
    assert_eq!(code, 0, "{r}");
    assert_eq!(r["subprotocol"], "v5.channel.k8s.io", "{r}");
    assert_eq!(
        r["headers"],
        json!({"x-tether-offset": "0", "x-tether-tty": "0", "x-tether-exec-id": null})
    );
    assert_eq!(r["stdout"], "hello\n", "{r}");
    assert_eq!(r["status"], json!({"metadata": {}, "status": "Success"}));
    assert_eq!(
        (&r["exit_code"], &r["close_code"]),
        (&json!(0), &json!(1000)),
        "{r}"
    );

    let (code, r) = peer(
        &python,
        &api,
        "/v1/containers/web/attach",
        &["--protocol", "v4"],
    );
    assert_eq!(code, 0, "{r}");
    assert_eq!(r["subprotocol"], "v4.channel.k8s.io", "{r}");
    assert_eq!(
        (&r["stdout"], &r["stderr"]),
        (&json!("hello\nbye\n"), &json!("oops\n")),
        "{r}"
    );
    assert_eq!(r["exit_code"], 3, "{r}");
    assert_eq!(r["status"]["reason"], "NonZeroExitCode", "{r}");
    assert_eq!(r["channels"], json!([1, 2, 1, 3]), "{r}");

    let path = "/v1/containers/web/exec?command=sh&command=-c&command=read+x&stdin=1&tty=1";
    let (code, r) = peer(
        &python,
        &api,
        path,
        &["--resize", "80x24", "--stdin", "x", "--close-stdin"],
    );
    assert_eq!(code, 0, "{r}");
    assert_eq!(r["headers"]["x-tether-exec-id"], "web.exec1", "{r}");
    assert_eq!(r["headers"]["x-tether-tty"], "1", "{r}");
    assert_eq!(r["stdout"], "argv: sh -c read x\nsize 80x24\nx", "{r}");

    let (code, r) = peer(&python, &api, "/v1/containers/ghost/attach?timeout=0s", &[]);
    assert_eq!(code, 2, "{r}");
    assert_eq!(
        (&r["http_status"], &r["body"]["reason"]),
        (&json!(404), &json!("NotFound")),
        "{r}"
    );
}
