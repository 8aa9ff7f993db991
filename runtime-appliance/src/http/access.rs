//! Who may use the API, checked on every request before it is routed (so an
//! exec or attach that is refused starts nothing):
//!
//! 1. `Host` (TCP only): the listener's IP address (any IP address when it
//!    listens on all of them), `localhost` for a loopback listener, or a
//!    name given with `--api-host`; the port is not compared. This is what
//!    stops DNS rebinding: a page whose name was re-pointed at the listener
//!    still sends its own name as the Host.
//! 2. `Origin`: a request that carries one (a browser's) is refused unless
//!    the origin was allowed with `--api-allow-origin`. Browsers do not apply
//!    CORS to WebSocket upgrades, so without this any page could exec.
//! 3. The bearer token (`Authorization: Bearer TOKEN`), when one is set;
//!    compared in constant time.
//!
//! On a unix socket the file's mode decides who connects, and Host is not
//! checked (no browser reaches a unix socket by name).

use std::net::IpAddr;

use hyper::header::{AUTHORIZATION, HOST, HeaderValue, ORIGIN, WWW_AUTHENTICATE};
use hyper::{Request, Response, StatusCode};

use super::response::{Body, HttpError};

/// The access rules of one API listener.
#[derive(Debug, Clone, Default)]
pub struct Access {
    /// The bearer token every request must carry (`None`: no token).
    pub token: Option<String>,
    /// Origins allowed to call the API (exact `scheme://host[:port]`).
    pub allowed_origins: Vec<String>,
    /// Host names accepted besides the listener's address.
    pub hosts: Vec<String>,
    /// The TCP listener's IP address, whose Host is checked (`None`: a unix
    /// socket, no Host check).
    pub listener: Option<IpAddr>,
}

impl Access {
    /// Rules for a unix socket: no Host check, and a token only if given.
    pub fn unix() -> Self {
        Self::default()
    }

    /// Checks a request; the error is the response to send instead.
    pub fn check<T>(&self, req: &Request<T>) -> Result<(), HttpError> {
        if let Some(ip) = self.listener {
            self.check_host(ip, req.headers().get(HOST))?;
        }
        if let Some(origin) = req.headers().get(ORIGIN) {
            self.check_origin(origin)?;
        }
        if let Some(token) = &self.token {
            check_token(token, req.headers().get(AUTHORIZATION))?;
        }
        Ok(())
    }

    fn check_host(&self, listener: IpAddr, host: Option<&HeaderValue>) -> Result<(), HttpError> {
        let Some(value) = host else {
            return Err(forbidden("a Host header is required"));
        };
        let text = value.to_str().unwrap_or("");
        let name = host_name(text);
        let ok = match name.parse::<IpAddr>() {
            Ok(ip) => ip == listener || listener.is_unspecified(),
            Err(_) if name.eq_ignore_ascii_case("localhost") => {
                listener.is_loopback() || listener.is_unspecified()
            }
            Err(_) => self.hosts.iter().any(|h| h.eq_ignore_ascii_case(name)),
        };
        if ok {
            Ok(())
        } else {
            Err(forbidden(format!(
                "Host {:?} is not this API's address (allow a name with --api-host)",
                printable(text)
            )))
        }
    }

    fn check_origin(&self, origin: &HeaderValue) -> Result<(), HttpError> {
        let text = origin.to_str().unwrap_or("");
        let text = text.strip_suffix('/').unwrap_or(text);
        if self
            .allowed_origins
            .iter()
            .any(|o| o.trim_end_matches('/').eq_ignore_ascii_case(text))
        {
            return Ok(());
        }
        Err(forbidden(format!(
            "Origin {:?} is not allowed (browsers may not use this API; allow an origin with --api-allow-origin)",
            printable(text)
        )))
    }
}

/// The host part of a Host header value (`[::1]:80` -> `::1`, `a:1` -> `a`).
fn host_name(value: &str) -> &str {
    if let Some(rest) = value.strip_prefix('[') {
        return rest.split(']').next().unwrap_or("");
    }
    match value.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => value,
    }
}

fn check_token(token: &str, header: Option<&HeaderValue>) -> Result<(), HttpError> {
    let given = header
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, rest) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
        })
        .ok_or_else(|| {
            unauthorized("this API needs a bearer token (Authorization: Bearer TOKEN; the CLI reads TETHERD_TOKEN or --token-file)")
        })?;
    if constant_time_eq(given.as_bytes(), token.as_bytes()) {
        Ok(())
    } else {
        Err(unauthorized("the bearer token is wrong"))
    }
}

/// Equality that takes the same time wherever the first difference is.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for (i, x) in a.iter().enumerate() {
        diff |= usize::from(x ^ b.get(i).copied().unwrap_or(!x));
    }
    diff == 0
}

/// A header value shortened and stripped of control characters for a message.
fn printable(text: &str) -> String {
    text.chars().filter(|c| !c.is_control()).take(100).collect()
}

fn forbidden(message: impl Into<String>) -> HttpError {
    HttpError::new(StatusCode::FORBIDDEN, "Forbidden", message)
}

fn unauthorized(message: &str) -> HttpError {
    HttpError::new(StatusCode::UNAUTHORIZED, "Unauthorized", message)
}

/// The response for a refused request (a 401 names the scheme it wants).
pub fn refusal(error: HttpError) -> Response<Body> {
    let unauthorized = error.status == StatusCode::UNAUTHORIZED;
    let mut resp = error.into_response();
    if unauthorized {
        resp.headers_mut()
            .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    resp
}

/// Reads a token file: its first line, trimmed; at least 16 characters.
pub fn read_token(path: &std::path::Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("--api-token-file {}: {e}", path.display()))?;
    parse_token(&text).map_err(|e| format!("--api-token-file {}: {e}", path.display()))
}

/// A token from a file's or variable's text: the first line, trimmed.
pub fn parse_token(text: &str) -> Result<String, String> {
    let token = text.lines().next().unwrap_or("").trim();
    if token.len() < 16 {
        return Err("the token must be at least 16 characters".into());
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("the token must be printable ASCII without spaces".into());
    }
    Ok(token.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder().uri("/v1/containers");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    fn tcp() -> Access {
        Access {
            token: Some("0123456789abcdef".into()),
            allowed_origins: vec!["https://console.example".into()],
            hosts: vec!["tetherd.internal".into()],
            listener: Some([127, 0, 0, 1].into()),
        }
    }

    fn status(access: &Access, headers: &[(&str, &str)]) -> u16 {
        match access.check(&request(headers)) {
            Ok(()) => 200,
            Err(e) => e.status.as_u16(),
        }
    }

    const AUTH: (&str, &str) = ("authorization", "Bearer 0123456789abcdef");

    #[test]
    fn the_token_is_required_and_compared() {
        let a = tcp();
        assert_eq!(status(&a, &[("host", "127.0.0.1:2378"), AUTH]), 200);
        assert_eq!(status(&a, &[("host", "127.0.0.1:2378")]), 401);
        let wrong = ("authorization", "Bearer 0123456789abcdeX");
        assert_eq!(status(&a, &[("host", "127.0.0.1:2378"), wrong]), 401);
        let basic = ("authorization", "Basic 0123456789abcdef");
        assert_eq!(status(&a, &[("host", "127.0.0.1:2378"), basic]), 401);
        let e = a.check(&request(&[("host", "127.0.0.1")])).unwrap_err();
        let resp = refusal(e);
        assert_eq!(resp.headers()[WWW_AUTHENTICATE], "Bearer");
        // Without a token (--api-no-auth) nothing is asked.
        let open = Access {
            token: None,
            ..tcp()
        };
        assert_eq!(status(&open, &[("host", "127.0.0.1:2378")]), 200);
    }

    #[test]
    fn hosts_other_than_addresses_and_configured_names_are_refused() {
        let a = tcp();
        for ok in [
            "127.0.0.1:2378",
            "127.0.0.1",
            "localhost:2378",
            "LOCALHOST",
            "tetherd.internal:80",
        ] {
            assert_eq!(status(&a, &[("host", ok), AUTH]), 200, "{ok}");
        }
        for bad in [
            "evil.example:2378",
            "evil.example",
            "127.0.0.1.evil.example",
            "10.0.0.7:2378",
            "[::1]:2378",
            "",
        ] {
            assert_eq!(status(&a, &[("host", bad), AUTH]), 403, "{bad:?}");
        }
        assert_eq!(status(&a, &[AUTH]), 403, "no Host");
        // Listening on every address: any IP address, still no foreign name.
        let any = Access {
            listener: Some([0, 0, 0, 0].into()),
            ..tcp()
        };
        assert_eq!(status(&any, &[("host", "10.0.0.7:2378"), AUTH]), 200);
        assert_eq!(status(&any, &[("host", "[::1]:2378"), AUTH]), 200);
        assert_eq!(status(&any, &[("host", "evil.example"), AUTH]), 403);
        // A non-loopback listener is not `localhost`.
        let lan = Access {
            listener: Some([10, 0, 0, 7].into()),
            ..tcp()
        };
        assert_eq!(status(&lan, &[("host", "localhost:2378"), AUTH]), 403);
        assert_eq!(status(&lan, &[("host", "10.0.0.7"), AUTH]), 200);
        // A unix socket does not look at Host.
        assert_eq!(status(&Access::unix(), &[("host", "evil.example")]), 200);
    }

    #[test]
    fn origins_not_allowed_are_refused_before_the_token_is_looked_at() {
        let a = tcp();
        let host = ("host", "127.0.0.1:2378");
        let evil = ("origin", "http://evil.example");
        assert_eq!(status(&a, &[host, evil, AUTH]), 403);
        assert_eq!(status(&a, &[host, evil]), 403);
        assert_eq!(status(&a, &[host, ("origin", "null"), AUTH]), 403);
        assert_eq!(
            status(&a, &[host, ("origin", "https://console.example"), AUTH]),
            200
        );
        assert_eq!(status(&Access::unix(), &[evil]), 403);
    }

    #[test]
    fn tokens_are_read_strictly() {
        assert_eq!(
            parse_token("0123456789abcdef\n").unwrap(),
            "0123456789abcdef"
        );
        assert!(parse_token("short\n").unwrap_err().contains("16"));
        assert!(parse_token("").is_err());
        assert!(parse_token("0123456789 abcdef").is_err());
    }

    #[test]
    fn constant_time_equality() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(!constant_time_eq(b"abcd", b"abc"));
        assert!(!constant_time_eq(b"", b"a"));
        assert!(constant_time_eq(b"", b""));
    }
}
