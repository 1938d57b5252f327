//! The metrics listener's HTTP endpoint (`metrics.listen`): `/metrics` in the Prometheus
//! text format and `/status` in JSON. It is bound and handed over on reload like the
//! proxy's listeners.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use http::Response;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;

use crate::metrics::Metrics;
use crate::traffic::Traffic;
use crate::upstreams::Upstreams;

/// Established TCP connections accepted on each listener. pingora has no hook for a
/// connection's end, so they are counted where the kernel keeps them, when scraped
/// (`/proc/self/net/tcp*` is this network namespace's table; a listener shared with a
/// process that is draining counts the connections of both).
fn established_connections(listeners: &[SocketAddr]) -> Vec<usize> {
    const ESTABLISHED: &str = "01";
    let mut counts = vec![0; listeners.len()];
    for table in ["/proc/self/net/tcp", "/proc/self/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 4 || fields[3] != ESTABLISHED {
                continue;
            }
            let Some(local) = parse_proc_address(fields[1]) else {
                continue;
            };
            for (listener, count) in listeners.iter().zip(counts.iter_mut()) {
                let ip_matches = listener.ip().is_unspecified()
                    || listener.ip() == local.ip()
                    || local.ip().to_canonical() == listener.ip();
                if listener.port() == local.port() && ip_matches {
                    *count += 1;
                }
            }
        }
    }
    counts
}

/// Parses `0100007F:1F90` (IPv4) or 32 hex digits and a port (IPv6) as the kernel prints
/// them: each 32-bit word in the host's byte order.
fn parse_proc_address(text: &str) -> Option<SocketAddr> {
    let (ip, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let mut bytes = Vec::with_capacity(16);
    for word in ip.as_bytes().chunks(8) {
        let word = u32::from_str_radix(std::str::from_utf8(word).ok()?, 16).ok()?;
        bytes.extend_from_slice(&word.to_ne_bytes());
    }
    let ip = match bytes.len() {
        4 => std::net::IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?),
        16 => std::net::IpAddr::from(<[u8; 16]>::try_from(bytes).ok()?),
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// `/metrics` (Prometheus text format) and `/status` (JSON) on the metrics listener.
pub struct MetricsEndpoint {
    pub metrics: Arc<Metrics>,
    pub upstreams: Arc<Upstreams>,
    pub traffic: Arc<Traffic>,
    /// The proxy's listening addresses.
    pub listeners: Vec<SocketAddr>,
}

impl MetricsEndpoint {
    /// Established connections by listener, as the kernel counts them now.
    fn connections(&self) -> Vec<(String, usize)> {
        let counts = established_connections(&self.listeners);
        self.listeners
            .iter()
            .map(ToString::to_string)
            .zip(counts)
            .collect()
    }

    fn status_json(&self) -> Vec<u8> {
        let rfc3339 = |t: SystemTime| chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339();
        let backends: Vec<serde_json::Value> = self
            .upstreams
            .health()
            .states()
            .map(|state| {
                let last = state.last_check();
                serde_json::json!({
                    "address": state.name,
                    "healthy": state.healthy(),
                    "weight": state.weight,
                    "last_check": last.map(|c| serde_json::json!({
                        "ok": c.ok,
                        "error": c.error,
                        "time": rfc3339(c.at),
                    })),
                })
            })
            .collect();
        let status = serde_json::json!({
            "pid": std::process::id(),
            "generation": self.metrics.generation(),
            "requests_in_flight": self.traffic.in_flight(),
            "backends": backends,
        });
        serde_json::to_vec_pretty(&status).expect("JSON values serialize")
    }
}

#[async_trait]
impl ServeHttp for MetricsEndpoint {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let (content_type, body, status) = match session.req_header().uri.path() {
            "/metrics" => (
                "text/plain; version=0.0.4",
                self.metrics
                    .render(self.traffic.in_flight(), &self.connections()),
                200,
            ),
            "/status" => ("application/json", self.status_json(), 200),
            _ => ("text/plain", b"see /metrics and /status\n".to_vec(), 404),
        };
        Response::builder()
            .status(status)
            .header(http::header::CONTENT_TYPE, content_type)
            .header(http::header::CONTENT_LENGTH, body.len())
            .body(body)
            .expect("a static response is valid")
    }
}

#[cfg(test)]
mod tests {
    use super::parse_proc_address;

    #[test]
    fn kernel_socket_addresses() {
        assert_eq!(
            parse_proc_address("0100007F:1F90"),
            Some("127.0.0.1:8080".parse().unwrap())
        );
        assert_eq!(
            parse_proc_address("00000000000000000000000001000000:0050"),
            Some("[::1]:80".parse().unwrap())
        );
        assert_eq!(parse_proc_address("zz:1"), None);
    }
}
