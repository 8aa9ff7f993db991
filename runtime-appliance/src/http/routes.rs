//! Routing and the request handlers.

use std::sync::Arc;
use std::time::Duration;

use futures_lite::stream;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use serde::Serialize;

use super::backend::{Backend, Session};
use super::query::{Query, parse_signal, percent_decode};
use super::response::{Body, HttpError, PROMETHEUS, json, with_body};
use super::{OFFSET_HEADER, State, ws};
use crate::api_types::{AttachOptions, ExecOptions, ExitStatus, From, Output};
use crate::node::fork::ForkRequest;
use crate::node::request::CreateRequest;

/// How long attach, exec and wait wait for a container to appear by default.
pub const DEFAULT_APPEAR_TIMEOUT: Duration = Duration::from_secs(50);
/// How long `stop` gives a guest to power off before killing its VM.
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(10);

/// A matched route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    Healthz,
    Metrics,
    List,
    Get(String),
    Wait(String),
    Signal(String),
    Start(String),
    Attach(String),
    Exec(String),
    Logs(String),
    Create,
    Stop(String),
    Delete(String),
    Node,
    Fork(String),
}

impl Route {
    /// The label used in `tetherd_http_requests_total`.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Healthz => "healthz",
            Self::Metrics => "metrics",
            Self::List => "list",
            Self::Get(_) => "get",
            Self::Wait(_) => "wait",
            Self::Signal(_) => "signal",
            Self::Start(_) => "start",
            Self::Attach(_) => "attach",
            Self::Exec(_) => "exec",
            Self::Logs(_) => "logs",
            Self::Create => "create",
            Self::Stop(_) => "stop",
            Self::Delete(_) => "delete",
            Self::Node => "node",
            Self::Fork(_) => "fork",
        }
    }

    /// The method this route takes.
    fn method(&self) -> &'static str {
        match self {
            Self::Signal(_) | Self::Start(_) | Self::Create | Self::Stop(_) | Self::Fork(_) => {
                "POST"
            }
            Self::Delete(_) => "DELETE",
            _ => "GET",
        }
    }

    /// The methods its path takes (the `Allow` header of a 405).
    fn allowed(&self) -> &'static str {
        match self {
            Self::List | Self::Create => "GET, POST",
            Self::Get(_) | Self::Delete(_) => "GET, DELETE",
            other => other.method(),
        }
    }
}

/// Matches a method and path to a route (404 for no route, 405 for a wrong
/// method, 400 for an undecodable container id).
pub fn route(method: &Method, path: &str) -> Result<Route, HttpError> {
    let trimmed = path
        .strip_suffix('/')
        .filter(|p| !p.is_empty())
        .unwrap_or(path);
    let segments: Vec<&str> = trimmed
        .strip_prefix('/')
        .unwrap_or(trimmed)
        .split('/')
        .collect();
    let id = |raw: &str| -> Result<String, HttpError> {
        let id = percent_decode(raw, false)
            .map_err(|e| HttpError::bad_request(format!("bad container id: {e}")))?;
        if id.is_empty() {
            return Err(HttpError::no_route(method.as_str(), path));
        }
        if !crate::claims::valid_id(&id) {
            return Err(HttpError::bad_request(format!(
                "bad container id {}: 1 to {} of A-Z a-z 0-9 _ . -",
                crate::claims::loggable(&id),
                crate::claims::MAX_ID_LEN
            )));
        }
        Ok(id)
    };
    let route = match segments.as_slice() {
        ["healthz"] => Route::Healthz,
        ["metrics"] => Route::Metrics,
        ["v1", "node"] => Route::Node,
        ["v1", "containers"] if method == Method::POST => Route::Create,
        ["v1", "containers"] => Route::List,
        ["v1", "containers", raw] if method == Method::DELETE => Route::Delete(id(raw)?),
        ["v1", "containers", raw] => Route::Get(id(raw)?),
        ["v1", "containers", raw, action] => {
            let id = id(raw)?;
            match *action {
                "wait" => Route::Wait(id),
                "signal" => Route::Signal(id),
                "start" => Route::Start(id),
                "attach" => Route::Attach(id),
                "exec" => Route::Exec(id),
                "logs" => Route::Logs(id),
                "stop" => Route::Stop(id),
                "fork" => Route::Fork(id),
                _ => return Err(HttpError::no_route(method.as_str(), path)),
            }
        }
        _ => return Err(HttpError::no_route(method.as_str(), path)),
    };
    if method.as_str() != route.method() {
        return Err(HttpError::method_not_allowed(
            method.as_str(),
            path,
            route.allowed(),
        ));
    }
    Ok(route)
}

/// Handles one request; never fails (errors become JSON error responses).
pub async fn handle<B: Backend>(state: Arc<State<B>>, req: Request<Incoming>) -> Response<Body> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    if let Err(e) = state.access.check(&req) {
        tracing::warn!(%method, %path, status = e.status.as_u16(), error = %e.message, "API request refused");
        state.metrics.request("refused", e.status.as_u16());
        return super::access::refusal(e);
    }
    let (label, result) = match route(&method, &path) {
        Ok(r) => (r.label(), dispatch(&state, r, req).await),
        Err(e) => ("unknown", Err(e)),
    };
    let resp = result.unwrap_or_else(|e| {
        if e.status.is_server_error() {
            tracing::warn!(%method, %path, status = e.status.as_u16(), error = %e.message, "API request failed");
        } else {
            tracing::debug!(%method, %path, status = e.status.as_u16(), error = %e.message, "API request refused");
        }
        e.into_response()
    });
    state.metrics.request(label, resp.status().as_u16());
    resp
}

async fn dispatch<B: Backend>(
    state: &Arc<State<B>>,
    route: Route,
    req: Request<Incoming>,
) -> Result<Response<Body>, HttpError> {
    let query = Query::parse(req.uri().query())?;
    let backend = &state.backend;
    match route {
        Route::Healthz => {
            query.check("/healthz", &[], &[])?;
            Ok(with_body(StatusCode::OK, "text/plain; charset=utf-8", "ok"))
        }
        Route::Metrics => {
            query.check("/metrics", &[], &[])?;
            let mut text = backend.metrics();
            if !text.is_empty() && !text.ends_with('\n') {
                text.push('\n');
            }
            text.push_str(&state.metrics.render());
            Ok(with_body(StatusCode::OK, PROMETHEUS, text))
        }
        Route::List => {
            query.check("list", &[], &[])?;
            Ok(json(StatusCode::OK, &backend.list().await))
        }
        Route::Get(id) => {
            query.check("get", &[], &[])?;
            Ok(json(StatusCode::OK, &backend.get(&id).await?))
        }
        Route::Wait(id) => {
            query.check("wait", &["timeout"], &[])?;
            let timeout = query.duration("timeout", DEFAULT_APPEAR_TIMEOUT)?;
            let exit = backend.wait(&id, timeout).await?;
            Ok(json(StatusCode::OK, &WaitBody::new(&exit)))
        }
        Route::Signal(id) => {
            query.check("signal", &["signal"], &[])?;
            let raw = query.get("signal").ok_or_else(|| {
                HttpError::bad_request("missing query parameter \"signal\" (e.g. signal=TERM)")
            })?;
            let signal = parse_signal(raw)?;
            backend.signal(&id, &signal).await?;
            Ok(json(
                StatusCode::OK,
                &serde_json::json!({ "id": id, "signal": signal }),
            ))
        }
        Route::Start(id) => {
            query.check("start", &[], &[])?;
            backend.start(&id).await?;
            Ok(json(
                StatusCode::OK,
                &serde_json::json!({ "id": id, "started": true }),
            ))
        }
        Route::Attach(id) => attach(state, id, &query, req).await,
        Route::Exec(id) => exec(state, id, &query, req).await,
        Route::Logs(id) => logs(state, id, &query).await,
        Route::Create => {
            query.check("create", &[], &[])?;
            let body = read_body(req).await?;
            let request = CreateRequest::parse(&body)?;
            Ok(json(StatusCode::CREATED, &backend.create(request).await?))
        }
        Route::Stop(id) => {
            query.check("stop", &["grace"], &[])?;
            let grace = query.duration("grace", DEFAULT_STOP_GRACE)?;
            Ok(json(StatusCode::OK, &backend.stop(&id, grace).await?))
        }
        Route::Delete(id) => {
            query.check("delete", &["force"], &[])?;
            let force = query.bool("force", false)?;
            Ok(json(StatusCode::OK, &backend.remove(&id, force).await?))
        }
        Route::Node => {
            query.check("node", &[], &[])?;
            Ok(json(StatusCode::OK, &backend.node().await?))
        }
        Route::Fork(id) => {
            query.check("fork", &["timeout"], &[])?;
            let timeout = query.duration("timeout", crate::node::fork::DEFAULT_TIMEOUT)?;
            let body = read_body(req).await?;
            let request = ForkRequest::parse(&body)?;
            let events = backend.fork(&id, request, timeout).await?;
            Ok(ndjson(events))
        }
    }
}

/// A stream of JSON lines (`application/x-ndjson`), one per event, ending
/// when the sender does.
fn ndjson<T: Serialize + Send + 'static>(events: async_channel::Receiver<T>) -> Response<Body> {
    let lines = stream::unfold(events, |events| async move {
        let event = events.recv().await.ok()?;
        let mut line = serde_json::to_vec(&event).unwrap_or_default();
        line.push(b'\n');
        Some((Ok(Frame::data(bytes::Bytes::from(line))), events))
    });
    let mut resp = Response::new(BodyExt::boxed_unsync(StreamBody::new(lines)));
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    resp
}

/// The largest request body accepted (a create request is small).
const MAX_BODY: usize = 1 << 20;

/// The whole request body, up to `MAX_BODY`.
async fn read_body(req: Request<Incoming>) -> Result<bytes::Bytes, HttpError> {
    let limited = http_body_util::Limited::new(req.into_body(), MAX_BODY);
    limited.collect().await.map(|b| b.to_bytes()).map_err(|e| {
        HttpError::bad_request(format!("request body: {e} (at most {MAX_BODY} bytes)"))
    })
}

/// `{"exit_code": N}`, plus `signal` and `core_dumped` when killed by a signal.
#[derive(Debug, Serialize)]
struct WaitBody<'a> {
    exit_code: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    signal: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    core_dumped: Option<bool>,
}

impl<'a> WaitBody<'a> {
    fn new(exit: &'a ExitStatus) -> Self {
        let (signal, core_dumped) = match exit {
            ExitStatus::Code(_) => (None, None),
            ExitStatus::Signal { name, core_dumped } => (Some(name.as_str()), Some(*core_dumped)),
        };
        Self {
            exit_code: exit.code(),
            signal,
            core_dumped,
        }
    }
}

const ATTACH_PARAMS: &[&str] = &[
    "stdin",
    "stdout",
    "stderr",
    "from",
    "timeout",
    "tty",
    "container",
];

async fn attach<B: Backend>(
    state: &Arc<State<B>>,
    id: String,
    query: &Query,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, HttpError> {
    query.check("attach", ATTACH_PARAMS, &[])?;
    // `tty` and `container` are accepted for kubectl compatibility and ignored:
    // the container decides whether it has a terminal.
    query.bool("tty", false)?;
    let options = AttachOptions {
        stdin: query.bool("stdin", false)?,
        stdout: query.bool("stdout", true)?,
        stderr: query.bool("stderr", true)?,
        from: query.from("from", From::Offset(0))?,
        timeout: query.duration("timeout", DEFAULT_APPEAR_TIMEOUT)?,
    };
    if !(options.stdin || options.stdout || options.stderr) {
        return Err(HttpError::bad_request(
            "attach needs at least one of stdin, stdout and stderr",
        ));
    }
    let upgrade = ws::check_upgrade(&req)?;
    let streams = ws::Streams {
        stdin: options.stdin,
        stdout: options.stdout,
        stderr: options.stderr,
    };
    let session = state.backend.attach(&id, options).await?;
    let on_upgrade = hyper::upgrade::on(&mut req);
    let resp = ws::switching_protocols(&upgrade, &session, false);
    smol::spawn(ws::run(
        state.clone(),
        on_upgrade,
        upgrade.protocol,
        session,
        streams,
    ))
    .detach();
    Ok(resp)
}

const EXEC_PARAMS: &[&str] = &[
    "command",
    "stdin",
    "stdout",
    "stderr",
    "tty",
    "timeout",
    "env",
    "width",
    "height",
    "container",
];

async fn exec<B: Backend>(
    state: &Arc<State<B>>,
    id: String,
    query: &Query,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, HttpError> {
    query.check("exec", EXEC_PARAMS, &["command", "env"])?;
    let command: Vec<String> = query.all("command").into_iter().map(String::from).collect();
    if command.is_empty() {
        return Err(HttpError::bad_request(
            "exec needs a command: command=ARG0&command=ARG1...",
        ));
    }
    let tty = query.bool("tty", false)?;
    let env = query
        .all("env")
        .into_iter()
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => Err(HttpError::bad_request(format!(
                "query parameter env={kv:?} is not NAME=VALUE"
            ))),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let size = match (query.opt_u32("width")?, query.opt_u32("height")?) {
        (Some(w), Some(h)) => Some((w, h)),
        (None, None) => None,
        _ => {
            return Err(HttpError::bad_request(
                "give both width and height, or neither",
            ));
        }
    };
    let streams = ws::Streams {
        stdin: query.bool("stdin", false)?,
        stdout: query.bool("stdout", true)?,
        stderr: query.bool("stderr", true)?,
    };
    let options = ExecOptions {
        command,
        tty,
        stdin: streams.stdin,
        size: size.filter(|_| tty),
        env,
        timeout: query.duration("timeout", DEFAULT_APPEAR_TIMEOUT)?,
    };
    let upgrade = ws::check_upgrade(&req)?;
    let session = state.backend.exec(&id, options).await?;
    let on_upgrade = hyper::upgrade::on(&mut req);
    let resp = ws::switching_protocols(&upgrade, &session, true);
    smol::spawn(ws::run(
        state.clone(),
        on_upgrade,
        upgrade.protocol,
        session,
        streams,
    ))
    .detach();
    Ok(resp)
}

async fn logs<B: Backend>(
    state: &Arc<State<B>>,
    id: String,
    query: &Query,
) -> Result<Response<Body>, HttpError> {
    let options = super::logs_query::options(query)?;
    let follow = options.follow;
    let session = state.backend.logs(&id, options).await?;
    let start = session.start();
    let st = state.clone();
    let chunks = stream::unfold(Some(session), move |session| {
        let st = st.clone();
        async move {
            let mut session = session?;
            loop {
                match session.next().await {
                    Some(Output::Stdout(b) | Output::Stderr(b)) if b.is_empty() => continue,
                    Some(Output::Stdout(b) | Output::Stderr(b)) => {
                        return Some((Ok(Frame::data(b)), Some(session)));
                    }
                    Some(Output::Gap(n)) => {
                        // Mid-stream: abort, so the client sees it and can
                        // resume past the gap (`X-Tether-Offset` says).
                        st.metrics.gap(n);
                        // As below: let hyper flush what came before.
                        smol::Timer::after(Duration::from_millis(20)).await;
                        return Some((Err(super::logs_query::gap_error(&session, n)), None));
                    }
                    Some(Output::Exit(_)) => return None,
                    None if follow => {
                        // Let hyper flush what it buffered before the abort
                        // (it flushes while the body is pending); a client
                        // resumes from what it received either way.
                        smol::Timer::after(Duration::from_millis(20)).await;
                        let offset = session.offset();
                        let err = std::io::Error::other(format!(
                            "output of {} ended without an exit status at offset {offset}",
                            session.id()
                        ));
                        return Some((Err(err), None));
                    }
                    None => return None,
                }
            }
        }
    });
    let body: Body = BodyExt::boxed_unsync(StreamBody::new(chunks));
    let mut resp = Response::new(body);
    let headers = resp.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert(OFFSET_HEADER, HeaderValue::from(start));
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_match() {
        let get = Method::GET;
        let post = Method::POST;
        assert_eq!(route(&get, "/healthz").unwrap(), Route::Healthz);
        assert_eq!(route(&get, "/v1/containers").unwrap(), Route::List);
        assert_eq!(route(&get, "/v1/containers/").unwrap(), Route::List);
        assert_eq!(
            route(&get, "/v1/containers/web").unwrap(),
            Route::Get("web".into())
        );
        assert_eq!(
            route(&get, "/v1/containers/a%2Db.1_x/logs").unwrap(),
            Route::Logs("a-b.1_x".into())
        );
        assert_eq!(
            route(&post, "/v1/containers/x/signal").unwrap(),
            Route::Signal("x".into())
        );
        assert_eq!(
            route(&post, "/v1/containers/x/start").unwrap(),
            Route::Start("x".into())
        );
        assert_eq!(
            route(&get, "/v1/containers/x/attach").unwrap(),
            Route::Attach("x".into())
        );
        assert_eq!(
            route(&get, "/v1/containers/x/exec").unwrap(),
            Route::Exec("x".into())
        );
        assert_eq!(
            route(&get, "/v1/containers/x/wait").unwrap(),
            Route::Wait("x".into())
        );
        assert_eq!(route(&post, "/v1/containers").unwrap(), Route::Create);
        assert_eq!(
            route(&post, "/v1/containers/x/stop").unwrap(),
            Route::Stop("x".into())
        );
        assert_eq!(
            route(&Method::DELETE, "/v1/containers/x").unwrap(),
            Route::Delete("x".into())
        );
        assert_eq!(route(&get, "/v1/node").unwrap(), Route::Node);
        assert_eq!(
            route(&post, "/v1/containers/x/fork").unwrap(),
            Route::Fork("x".into())
        );
        assert_eq!(
            route(&get, "/v1/containers/x/fork").unwrap_err().status,
            405
        );
    }

    #[test]
    fn bad_routes_say_why() {
        let e = route(&Method::GET, "/v2/containers").unwrap_err();
        assert_eq!((e.status.as_u16(), e.reason), (404, "UnknownRoute"));
        let e = route(&Method::GET, "/v1/containers/x/frobnicate").unwrap_err();
        assert_eq!(e.status.as_u16(), 404);
        let e = route(&Method::GET, "/v1/containers//logs").unwrap_err();
        assert_eq!(e.status.as_u16(), 404);
        let e = route(&Method::PUT, "/v1/containers/x").unwrap_err();
        assert_eq!((e.status.as_u16(), e.allow), (405, Some("GET, DELETE")));
        let e = route(&Method::DELETE, "/v1/containers").unwrap_err();
        assert_eq!((e.status.as_u16(), e.allow), (405, Some("GET, POST")));
        let e = route(&Method::GET, "/v1/containers/x/stop").unwrap_err();
        assert_eq!((e.status.as_u16(), e.allow), (405, Some("POST")));
        let e = route(&Method::GET, "/v1/containers/x/signal").unwrap_err();
        assert_eq!((e.status.as_u16(), e.allow), (405, Some("POST")));
        let e = route(&Method::GET, "/v1/containers/%ff/logs").unwrap_err();
        assert_eq!(e.status.as_u16(), 400);
        // Ids that could not be a container's, and would carry escape
        // sequences into a log or a terminal.
        for bad in ["a%2Fb", "%1B%5B2J", "a%20b", &"x".repeat(129)] {
            let e = route(&Method::GET, &format!("/v1/containers/{bad}/logs")).unwrap_err();
            assert_eq!(e.status.as_u16(), 400, "{bad}");
            assert!(!e.message.contains('\x1b'), "{}", e.message);
        }
    }

    #[test]
    fn wait_body() {
        let code = serde_json::to_string(&WaitBody::new(&ExitStatus::Code(3))).unwrap();
        assert_eq!(code, r#"{"exit_code":3}"#);
        let sig = ExitStatus::Signal {
            name: "KILL".into(),
            core_dumped: false,
        };
        let sig = serde_json::to_string(&WaitBody::new(&sig)).unwrap();
        assert_eq!(
            sig,
            r#"{"exit_code":137,"signal":"KILL","core_dumped":false}"#
        );
    }
}
