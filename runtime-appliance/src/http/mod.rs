//! tetherd's HTTP API: hyper 1.x on smol (no tokio runtime), JSON routes for
//! containers, a chunked `logs` stream, Prometheus `/metrics`, and
//! WebSocket attach/exec speaking the Kubernetes remote-command protocol
//! (`k8s`). The routes are documented in `docs/API.md`.

pub mod access;
pub mod backend;
pub mod k8s;
pub mod listen;
mod logs_query;
mod metrics;
pub mod query;
pub mod response;
mod routes;
mod ws;
mod ws_io;

#[cfg(test)]
mod access_tests;
#[cfg(test)]
pub(crate) mod fake;
#[cfg(test)]
mod peer_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod ws_tests;

use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_lite::io::{AsyncRead, AsyncWrite};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use smol_hyper::rt::{FuturesIo, SmolTimer};

use crate::appliance::Appliance;
use access::Access;
use backend::Backend;
use listen::{ApiListener, ApiStream};
use metrics::HttpMetrics;

/// Response header on attach, exec and logs: the output offset the stream
/// starts at. A client resumes exactly with `from=<start + bytes received>`.
pub const OFFSET_HEADER: &str = "x-tether-offset";
/// Response header on exec: the exec's own container id (attach to it to resume).
pub const EXEC_ID_HEADER: &str = "x-tether-exec-id";
/// Response header on attach and exec: `1` if the process has a terminal, else `0`.
pub const TTY_HEADER: &str = "x-tether-tty";

/// Serves the HTTP API on `listener` until the process ends, refusing what
/// `access` does not allow. Each connection runs in its own task on smol's
/// global executor; an accept error is logged and retried.
pub async fn serve_api(listener: ApiListener, appliance: Appliance, access: Access) {
    serve_backend(listener, appliance, access).await
}

/// `serve_api` over any `Backend` (the tests use a scripted fake).
pub async fn serve_backend<B: Backend>(listener: ApiListener, backend: B, access: Access) {
    let state = Arc::new(State {
        backend,
        metrics: HttpMetrics::default(),
        access,
    });
    if let Ok(addr) = listener.local_addr() {
        tracing::debug!(%addr, "HTTP API listening");
    }
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                smol::spawn(serve_connection(state.clone(), stream, peer)).detach();
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "HTTP API accept failed");
                smol::Timer::after(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Shared by every connection of one server.
struct State<B> {
    backend: B,
    metrics: HttpMetrics,
    /// Checked on every request before routing.
    access: Access,
}

async fn serve_connection<B: Backend>(state: Arc<State<B>>, stream: ApiStream, peer: String) {
    let service = service_fn(move |req| {
        let state = state.clone();
        async move { Ok::<_, Infallible>(routes::handle(state, req).await) }
    });
    let conn = http1::Builder::new()
        .timer(SmolTimer::new())
        .header_read_timeout(Duration::from_secs(30))
        .serve_connection(FuturesIo::new(stream), service)
        .with_upgrades();
    if let Err(e) = conn.await {
        tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
    }
}

/// futures-io traits over hyper's I/O traits (for an upgraded connection,
/// which async-tungstenite then drives).
pub struct HyperIo<T>(pub T);

impl<T: hyper::rt::Read + Unpin> AsyncRead for HyperIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let mut read_buf = hyper::rt::ReadBuf::new(buf);
        match Pin::new(&mut self.0).poll_read(cx, read_buf.unfilled()) {
            Poll::Ready(Ok(())) => Poll::Ready(Ok(read_buf.filled().len())),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: hyper::rt::Write + Unpin> AsyncWrite for HyperIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}
