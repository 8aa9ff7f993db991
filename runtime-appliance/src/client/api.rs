//! Talking to tetherd's HTTP API from the CLI: the base URL, plain requests
//! (hyper's HTTP/1 client over smol), and the API's error format.

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Uri};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use smol_hyper::rt::FuturesIo;

use crate::cli::ApiArgs;
use crate::http::access::parse_token;
use crate::http::listen::{ApiAddr, ApiStream};

/// Why a client command failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot reach tetherd's API at {url}: {error} (is `tetherd serve` running? set --api or TETHERD_API)"
    )]
    Connect { url: String, error: std::io::Error },
    #[error("{message}")]
    Api {
        status: u16,
        reason: String,
        message: String,
    },
    #[error("{0}")]
    Protocol(String),
    #[error("bad --api URL {url:?}: {why}")]
    BadUrl { url: String, why: String },
    #[error("bad API token: {0}")]
    BadToken(String),
}

impl ClientError {
    /// Whether retrying later could help (the server is down or restarting).
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Connect { .. } | Self::Protocol(_) => true,
            Self::Api { status, .. } => *status == 503 || *status == 404,
            Self::BadUrl { .. } | Self::BadToken(_) => false,
        }
    }

    /// An error from a non-2xx response's body (`{"error","reason"}`).
    pub fn from_body(status: StatusCode, body: &[u8]) -> Self {
        #[derive(Deserialize)]
        struct ErrorBody {
            error: String,
            #[serde(default)]
            reason: String,
        }
        match serde_json::from_slice::<ErrorBody>(body) {
            Ok(e) => Self::Api {
                status: status.as_u16(),
                reason: e.reason,
                message: e.error,
            },
            Err(_) => Self::Api {
                status: status.as_u16(),
                reason: String::new(),
                message: format!("HTTP {status}: {}", String::from_utf8_lossy(body).trim()),
            },
        }
    }
}

/// Where the API is: `unix:PATH` or `http://HOST[:PORT][/PREFIX]`, and the
/// bearer token to send, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Api {
    /// As given, for messages.
    pub url: String,
    /// Where to connect.
    target: Target,
    /// The Host header and the authority of `ws://` URLs.
    authority: String,
    /// Path prefix without a trailing slash ("" for none).
    prefix: String,
    /// Sent as `Authorization: Bearer TOKEN`.
    token: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    /// Host (no IPv6 brackets) and port.
    Tcp(String, u16),
    Unix(std::path::PathBuf),
}

impl Api {
    /// The API the client commands' `--api` and `--token-file` (or
    /// `TETHERD_API`, `TETHERD_TOKEN`) name; by default tetherd's unix socket.
    pub fn from_args(args: &ApiArgs) -> Result<Self, ClientError> {
        let url = match &args.api {
            Some(url) => url.clone(),
            None => format!("unix:{}", crate::http::listen::default_socket().display()),
        };
        let api = Self::parse(&url)?;
        let token = match &args.token_file {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .map_err(|e| e.to_string())
                    .and_then(|t| parse_token(&t))
                    .map_err(|why| {
                        ClientError::BadToken(format!("--token-file {}: {why}", path.display()))
                    })?,
            ),
            None => match std::env::var("TETHERD_TOKEN") {
                Ok(t) if !t.is_empty() => Some(
                    parse_token(&t)
                        .map_err(|why| ClientError::BadToken(format!("TETHERD_TOKEN: {why}")))?,
                ),
                _ => None,
            },
        };
        Ok(api.with_token(token))
    }

    pub fn parse(url: &str) -> Result<Self, ClientError> {
        let bad = |why: &str| ClientError::BadUrl {
            url: url.into(),
            why: why.into(),
        };
        if let Some(path) = url.strip_prefix("unix:") {
            let path = path.strip_prefix("//").unwrap_or(path);
            if path.is_empty() {
                return Err(bad(
                    "unix: needs a socket path (unix:/run/tetherd/api.sock)",
                ));
            }
            return Ok(Self {
                url: url.into(),
                target: Target::Unix(path.into()),
                authority: "localhost".into(),
                prefix: String::new(),
                token: None,
            });
        }
        let uri: Uri = url
            .parse()
            .map_err(|e: hyper::http::uri::InvalidUri| bad(&e.to_string()))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some(other) => {
                return Err(bad(&format!(
                    "scheme {other:?} is not supported (use unix:PATH or http://)"
                )));
            }
            None => return Err(bad("missing scheme (use unix:PATH or http://HOST:PORT)")),
        }
        let authority = uri.authority().ok_or_else(|| bad("missing host"))?;
        if authority.as_str().contains('@') {
            return Err(bad("user info is not supported"));
        }
        let host = authority.host();
        let port = authority.port_u16().unwrap_or(80);
        if uri.query().is_some() {
            return Err(bad("a query string is not allowed"));
        }
        Ok(Self {
            url: url.into(),
            target: Target::Tcp(
                host.trim_start_matches('[').trim_end_matches(']').into(),
                port,
            ),
            authority: format!("{host}:{port}"),
            prefix: uri.path().trim_end_matches('/').into(),
            token: None,
        })
    }

    /// This API with `token` sent on every request.
    pub fn with_token(mut self, token: Option<String>) -> Self {
        self.token = token;
        self
    }

    /// The `Authorization` header value, if a token is set.
    pub fn authorization(&self) -> Option<HeaderValue> {
        let token = self.token.as_ref()?;
        HeaderValue::from_str(&format!("Bearer {token}")).ok()
    }

    /// The origin-form target for `path_and_query` (which starts with `/`).
    pub fn target(&self, path_and_query: &str) -> String {
        format!("{}{path_and_query}", self.prefix)
    }

    /// The `ws://` URL for `path_and_query`.
    pub fn ws_url(&self, path_and_query: &str) -> String {
        format!("ws://{}{}", self.authority, self.target(path_and_query))
    }

    /// A connection to the API.
    pub async fn connect(&self) -> Result<ApiStream, ClientError> {
        let error = |error| ClientError::Connect {
            url: self.url.clone(),
            error,
        };
        match &self.target {
            Target::Unix(path) => ApiStream::connect(&ApiAddr::Unix(path.clone()))
                .await
                .map_err(error),
            Target::Tcp(host, port) => {
                let addrs = smol::net::resolve((host.as_str(), *port))
                    .await
                    .map_err(error)?;
                let mut last = std::io::Error::other("the name has no address");
                for addr in addrs {
                    match ApiStream::connect(&ApiAddr::Tcp(addr)).await {
                        Ok(stream) => return Ok(stream),
                        Err(e) => last = e,
                    }
                }
                Err(error(last))
            }
        }
    }

    /// Sends one request on a fresh connection and returns the response
    /// (any status), its body still streaming.
    pub async fn request(
        &self,
        method: Method,
        path_and_query: &str,
    ) -> Result<Response<Incoming>, ClientError> {
        self.send(method, path_and_query, Empty::<Bytes>::new(), None)
            .await
    }

    /// `request` with a body of `content_type`.
    pub async fn send<B>(
        &self,
        method: Method,
        path_and_query: &str,
        body: B,
        content_type: Option<&'static str>,
    ) -> Result<Response<Incoming>, ClientError>
    where
        B: hyper::body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let stream = self.connect().await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(FuturesIo::new(stream))
            .await
            .map_err(|e| ClientError::Protocol(format!("HTTP handshake with {}: {e}", self.url)))?;
        smol::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "API connection ended with an error");
            }
        })
        .detach();
        let mut req = Request::new(body);
        *req.method_mut() = method.clone();
        let target = self.target(path_and_query);
        *req.uri_mut() = target
            .parse()
            .map_err(|e| ClientError::Protocol(format!("bad request target {target:?}: {e}")))?;
        if let Ok(host) = HeaderValue::from_str(&self.authority) {
            req.headers_mut().insert(HOST, host);
        }
        if let Some(auth) = self.authorization() {
            req.headers_mut().insert(AUTHORIZATION, auth);
        }
        if let Some(content_type) = content_type {
            req.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
        }
        sender
            .send_request(req)
            .await
            .map_err(|e| ClientError::Protocol(format!("{method} {target} on {}: {e}", self.url)))
    }

    /// Sends `body` as JSON and parses a JSON reply; a non-2xx status is an
    /// error carrying the API's message.
    pub async fn send_json<T: DeserializeOwned>(
        &self,
        method: Method,
        path_and_query: &str,
        body: &impl serde::Serialize,
    ) -> Result<T, ClientError> {
        let data = serde_json::to_vec(body)
            .map_err(|e| ClientError::Protocol(format!("encoding the request: {e}")))?;
        let resp = self
            .send(
                method,
                path_and_query,
                Full::new(Bytes::from(data)),
                Some("application/json"),
            )
            .await?;
        let body = read_success(resp, path_and_query).await?;
        serde_json::from_slice(&body).map_err(|e| {
            ClientError::Protocol(format!("unexpected response to {path_and_query}: {e}"))
        })
    }

    /// Sends a request and reads the whole body; a non-2xx status is an error
    /// carrying the API's message.
    pub async fn call(&self, method: Method, path_and_query: &str) -> Result<Bytes, ClientError> {
        let resp = self.request(method, path_and_query).await?;
        read_success(resp, path_and_query).await
    }

    /// `call`, parsing the body as JSON.
    pub async fn json<T: DeserializeOwned>(
        &self,
        method: Method,
        path_and_query: &str,
    ) -> Result<T, ClientError> {
        let body = self.call(method, path_and_query).await?;
        serde_json::from_slice(&body).map_err(|e| {
            ClientError::Protocol(format!("unexpected response to {path_and_query}: {e}"))
        })
    }
}

/// A response's whole body; a non-2xx status is an error with the API's message.
async fn read_success(
    resp: Response<Incoming>,
    path_and_query: &str,
) -> Result<Bytes, ClientError> {
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| {
            ClientError::Protocol(format!("reading the response to {path_and_query}: {e}"))
        })?
        .to_bytes();
    if !status.is_success() {
        return Err(ClientError::from_body(status, &body));
    }
    Ok(body)
}

/// Percent-encodes a path segment or query value (everything but RFC 3986
/// unreserved characters).
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::query::percent_decode;

    #[test]
    fn parses_api_urls() {
        let api = Api::parse("http://127.0.0.1:2378").unwrap();
        assert_eq!(api.target, Target::Tcp("127.0.0.1".into(), 2378));
        assert_eq!(api.prefix, "");
        assert_eq!(
            api.ws_url("/v1/containers/x/attach?stdin=1"),
            "ws://127.0.0.1:2378/v1/containers/x/attach?stdin=1"
        );
        let api = Api::parse("http://[::1]:9/tether/").unwrap();
        assert_eq!(api.target, Target::Tcp("::1".into(), 9));
        assert_eq!(api.prefix, "/tether");
        assert_eq!(api.target("/healthz"), "/tether/healthz");
        assert_eq!(api.ws_url("/x"), "ws://[::1]:9/tether/x");
        assert_eq!(
            Api::parse("http://localhost").unwrap().target,
            Target::Tcp("localhost".into(), 80)
        );
        for unix in ["unix:/run/tetherd/api.sock", "unix:///run/tetherd/api.sock"] {
            let api = Api::parse(unix).unwrap();
            assert_eq!(api.target, Target::Unix("/run/tetherd/api.sock".into()));
            assert_eq!(api.ws_url("/x"), "ws://localhost/x");
        }
        for bad in [
            "unix:",
            "https://x",
            "127.0.0.1:2378",
            "http://",
            "http://a:1/?q=1",
            "not a url",
        ] {
            assert!(Api::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_token_is_sent_as_a_bearer_header() {
        let api = Api::parse("http://127.0.0.1:1").unwrap();
        assert_eq!(api.authorization(), None);
        let api = api.with_token(Some("0123456789abcdef".into()));
        assert_eq!(api.authorization().unwrap(), "Bearer 0123456789abcdef");
    }

    #[test]
    fn encodes_components() {
        let s = "sh -c 'echo a&b=c/d?%' ✓";
        assert_eq!(percent_decode(&encode(s), true).unwrap(), s);
        assert_eq!(encode("web-1.x_y~"), "web-1.x_y~");
        assert_eq!(encode("a b"), "a%20b");
    }

    #[test]
    fn error_bodies() {
        let e = ClientError::from_body(
            StatusCode::NOT_FOUND,
            br#"{"error":"no such container: x","reason":"NotFound"}"#,
        );
        assert_eq!(e.to_string(), "no such container: x");
        let e = ClientError::from_body(StatusCode::BAD_GATEWAY, b"oops");
        assert_eq!(e.to_string(), "HTTP 502 Bad Gateway: oops");
    }
}
