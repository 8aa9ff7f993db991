//! The client side of the attach/exec WebSocket: connecting with the k8s
//! subprotocols and reading tether's response headers.

use super::api::{Api, ClientError};
use crate::http::k8s::{self, Protocol};
use crate::http::listen::ApiStream;
use crate::http::{EXEC_ID_HEADER, OFFSET_HEADER, TTY_HEADER};
use async_tungstenite::WebSocketStream;
use async_tungstenite::tungstenite::client::IntoClientRequest;
use async_tungstenite::tungstenite::protocol::WebSocketConfig;
use async_tungstenite::tungstenite::{self, http::HeaderValue};

/// A connected attach or exec stream.
pub struct Connected {
    pub ws: WebSocketStream<ApiStream>,
    pub protocol: Protocol,
    /// `X-Tether-Offset`: where the output starts.
    pub offset: Option<u64>,
    /// `X-Tether-Tty`.
    pub tty: Option<bool>,
    /// `X-Tether-Exec-Id`.
    pub exec_id: Option<String>,
}

/// Opens the WebSocket for `path_and_query` (an attach or exec route).
pub async fn connect(api: &Api, path_and_query: &str) -> Result<Connected, ClientError> {
    let url = api.ws_url(path_and_query);
    let mut req = url
        .as_str()
        .into_client_request()
        .map_err(|e| ClientError::Protocol(format!("bad WebSocket URL {url}: {e}")))?;
    let offer = format!("{}, {}", k8s::V5, k8s::V4);
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_str(&offer).map_err(|e| ClientError::Protocol(e.to_string()))?,
    );
    if let Some(auth) = api.authorization() {
        req.headers_mut().insert("Authorization", auth);
    }
    let stream = api.connect().await?;
    let config = WebSocketConfig::default().max_message_size(Some(64 << 20));
    let (ws, resp) =
        match async_tungstenite::client_async_with_config(req, stream, Some(config)).await {
            Ok(ok) => ok,
            Err(tungstenite::Error::Http(resp)) => {
                let status = resp.status();
                let body = resp.body().as_deref().unwrap_or_default();
                return Err(ClientError::from_body(status, body));
            }
            Err(e) => {
                return Err(ClientError::Protocol(format!(
                    "WebSocket handshake with {url}: {e}"
                )));
            }
        };
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let protocol = header("sec-websocket-protocol")
        .and_then(|p| Protocol::from_name(&p))
        .ok_or_else(|| {
            ClientError::Protocol(format!(
                "{url}: the server chose no k8s channel subprotocol"
            ))
        })?;
    Ok(Connected {
        ws,
        protocol,
        offset: header(OFFSET_HEADER).and_then(|v| v.parse().ok()),
        tty: header(TTY_HEADER).map(|v| v == "1"),
        exec_id: header(EXEC_ID_HEADER),
    })
}
