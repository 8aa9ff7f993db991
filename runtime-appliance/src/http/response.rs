//! Response bodies and the API's error format: `{"error": "...", "reason": "..."}`.

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};
use hyper::header::{ALLOW, CONTENT_TYPE, HeaderValue};
use hyper::{Response, StatusCode};
use serde::Serialize;

use crate::api_types::ApiError;

/// Every response body. Streaming bodies (`logs`) fail with an I/O error
/// when the output ends abnormally, which aborts the chunked response.
pub type Body = UnsyncBoxBody<Bytes, std::io::Error>;

pub const JSON: &str = "application/json";
pub const PROMETHEUS: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A complete body.
pub fn full(data: impl Into<Bytes>) -> Body {
    Full::new(data.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A response with a complete body of the given content type.
pub fn with_body(
    status: StatusCode,
    content_type: &'static str,
    data: impl Into<Bytes>,
) -> Response<Body> {
    let mut resp = Response::new(full(data));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

/// A JSON response.
pub fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    match serde_json::to_vec(value) {
        Ok(mut data) => {
            data.push(b'\n');
            with_body(status, JSON, data)
        }
        Err(e) => HttpError::internal(format!("serializing the response: {e}")).into_response(),
    }
}

/// An API error: the status, a machine-readable reason, and a message that
/// names what was wrong.
#[derive(Debug, Clone)]
pub struct HttpError {
    pub status: StatusCode,
    pub reason: &'static str,
    pub message: String,
    /// For 405: the methods the route allows.
    pub allow: Option<&'static str>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    reason: &'a str,
}

impl HttpError {
    pub fn new(status: StatusCode, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            reason,
            message: message.into(),
            allow: None,
        }
    }

    /// 400, reason `BadRequest`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "BadRequest", message)
    }

    /// 404 for a path that names no route, reason `UnknownRoute`.
    pub fn no_route(method: &str, path: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "UnknownRoute",
            format!("no route for {method} {path} (see docs/API.md for the routes)"),
        )
    }

    /// 405, reason `MethodNotAllowed`, with an `Allow` header.
    pub fn method_not_allowed(method: &str, path: &str, allow: &'static str) -> Self {
        Self {
            allow: Some(allow),
            ..Self::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                format!("method {method} is not allowed for {path} (allowed: {allow})"),
            )
        }
    }

    /// 500, reason `InternalError`.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "InternalError", message)
    }

    pub fn into_response(self) -> Response<Body> {
        let body = ErrorBody {
            error: &self.message,
            reason: self.reason,
        };
        let mut data = serde_json::to_vec(&body).unwrap_or_else(|_| b"{}".to_vec());
        data.push(b'\n');
        let mut resp = with_body(self.status, JSON, data);
        if let Some(allow) = self.allow {
            resp.headers_mut()
                .insert(ALLOW, HeaderValue::from_static(allow));
        }
        resp
    }
}

impl std::convert::From<ApiError> for HttpError {
    fn from(err: ApiError) -> Self {
        let status =
            StatusCode::from_u16(err.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        Self::new(status, err.reason(), err.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_errors_keep_status_and_reason() {
        let e = HttpError::from(ApiError::NotFound("web".into()));
        assert_eq!((e.status.as_u16(), e.reason), (404, "NotFound"));
        assert_eq!(e.message, "no such container: web");
        let e = HttpError::from(ApiError::Refused("no".into()));
        assert_eq!((e.status.as_u16(), e.reason), (409, "Conflict"));
        let resp = HttpError::method_not_allowed("PUT", "/healthz", "GET").into_response();
        assert_eq!(resp.status(), 405);
        assert_eq!(resp.headers()[ALLOW], "GET");
        assert_eq!(resp.headers()[CONTENT_TYPE], JSON);
    }
}
