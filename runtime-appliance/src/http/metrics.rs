//! The HTTP server's own counters, appended to the appliance's metrics on
//! `GET /metrics` (Prometheus text format).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Counters for one server.
#[derive(Debug, Default)]
pub struct HttpMetrics {
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    streams_active: AtomicU64,
    streams_total: AtomicU64,
    gap_bytes: AtomicU64,
}

impl HttpMetrics {
    /// Counts a finished request (for upgrades: the 101 response).
    pub fn request(&self, route: &'static str, status: u16) {
        if let Ok(mut map) = self.requests.lock() {
            *map.entry((route, status)).or_default() += 1;
        }
    }

    /// Counts a WebSocket session; the guard counts it as ended when dropped.
    pub fn stream_started(&self) -> StreamGuard<'_> {
        self.streams_active.fetch_add(1, Ordering::Relaxed);
        self.streams_total.fetch_add(1, Ordering::Relaxed);
        StreamGuard(self)
    }

    /// Counts output bytes lost before a replay point.
    pub fn gap(&self, bytes: u64) {
        self.gap_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// The Prometheus text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str(
            "# HELP tetherd_http_requests_total HTTP API requests by route and status code.\n",
        );
        out.push_str("# TYPE tetherd_http_requests_total counter\n");
        if let Ok(map) = self.requests.lock() {
            for ((route, code), n) in map.iter() {
                let _ = writeln!(
                    out,
                    "tetherd_http_requests_total{{route=\"{route}\",code=\"{code}\"}} {n}"
                );
            }
        }
        let gauges = [
            (
                "tetherd_http_streams_active",
                "gauge",
                "Attach and exec WebSocket sessions in progress.",
                self.streams_active.load(Ordering::Relaxed),
            ),
            (
                "tetherd_http_streams_total",
                "counter",
                "Attach and exec WebSocket sessions started.",
                self.streams_total.load(Ordering::Relaxed),
            ),
            (
                "tetherd_http_output_gap_bytes_total",
                "counter",
                "Output bytes lost (overflow) before a replay point, as reported to HTTP clients.",
                self.gap_bytes.load(Ordering::Relaxed),
            ),
        ];
        for (name, kind, help, value) in gauges {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        }
        out
    }
}

/// Ends a WebSocket session's count when dropped.
pub struct StreamGuard<'a>(&'a HttpMetrics);

impl Drop for StreamGuard<'_> {
    fn drop(&mut self) {
        self.0.streams_active.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters() {
        let m = HttpMetrics::default();
        m.request("list", 200);
        m.request("list", 200);
        m.request("get", 404);
        let guard = m.stream_started();
        m.gap(5);
        let text = m.render();
        assert!(
            text.contains("tetherd_http_requests_total{route=\"list\",code=\"200\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("tetherd_http_requests_total{route=\"get\",code=\"404\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("tetherd_http_streams_active 1\n"), "{text}");
        assert!(
            text.contains("tetherd_http_output_gap_bytes_total 5\n"),
            "{text}"
        );
        drop(guard);
        assert!(m.render().contains("tetherd_http_streams_active 0\n"));
    }
}
