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
use crate::upstreams::health::BackendState;
use crate::upstreams::Pools;

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

/// `/metrics` (Prometheus text format), `/status` (JSON, or an HTML page for a browser)
/// and draining on the metrics listener.
pub struct MetricsEndpoint {
    pub metrics: Arc<Metrics>,
    pub pools: Arc<Pools>,
    pub traffic: Arc<Traffic>,
    /// The proxy's listening addresses.
    pub listeners: Vec<SocketAddr>,
}

/// An answer of the endpoint.
struct Answer {
    status: u16,
    content_type: &'static str,
    body: Vec<u8>,
}

impl Answer {
    fn text(status: u16, body: String) -> Answer {
        Answer {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into_bytes(),
        }
    }
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
            .pools
            .health()
            .states()
            .map(|state| {
                let last = state.last_check();
                serde_json::json!({
                    "pool": state.pool,
                    "address": state.name,
                    "healthy": state.healthy(),
                    "ejected": state.ejected(),
                    "draining": state.draining(),
                    "in_rotation": state.in_rotation(),
                    "in_flight": state.in_flight(),
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
            "stopping": self.traffic.stopping(),
            "requests_in_flight": self.traffic.in_flight(),
            "pools": self.pools.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(),
            "backends": backends,
        });
        serde_json::to_vec_pretty(&status).expect("JSON values serialize")
    }

    /// The status as a page, in the spirit of HAProxy's stats page: one table per pool.
    fn status_html(&self) -> Vec<u8> {
        let mut page = format!(
            "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>pingora-lb status</title>\
             <style>{STYLE}</style></head><body>\n<h1>pingora-lb</h1>\n\
             <p>process {} &middot; reload generation {} &middot; {} requests in flight</p>\n",
            std::process::id(),
            self.metrics.generation(),
            self.traffic.in_flight()
        );
        for pool in self.pools.iter() {
            page.push_str(&format!(
                "<h2>pool {}</h2>\n<table>\n<tr><th>backend</th><th>state</th><th>weight</th>\
                 <th>in flight</th><th>last check</th></tr>\n",
                escape(&pool.name)
            ));
            for destination in pool.destinations() {
                page.push_str(&backend_row(&destination.state));
            }
            page.push_str("</table>\n");
        }
        page.push_str("</body></html>\n");
        page.into_bytes()
    }

    /// `POST /pools/POOL/backends/ADDRESS/drain` (or `/ready`): stops (or resumes) sending
    /// new requests to a backend, until the next reload.
    fn set_draining(&self, method: &http::Method, path: &str) -> Option<Answer> {
        let rest = path.strip_prefix("/pools/")?;
        let (pool, rest) = rest.split_once("/backends/")?;
        let (backend, action) = rest.rsplit_once('/')?;
        let draining = match action {
            "drain" => true,
            "ready" => false,
            _ => return None,
        };
        if method != http::Method::POST {
            return Some(Answer::text(
                405,
                format!("use POST to {action} a backend\n"),
            ));
        }
        let found = self
            .pools
            .iter()
            .find(|p| p.name == pool)
            .and_then(|p| p.find(backend));
        Some(match found {
            None => Answer::text(404, format!("no backend {backend} in a pool {pool}\n")),
            Some(destination) => {
                destination.state.set_draining(draining);
                let now = if draining { "draining" } else { "in rotation" };
                Answer::text(200, format!("backend {backend} of pool {pool}: {now}\n"))
            }
        })
    }

    fn answer(&self, session: &ServerSession) -> Answer {
        let request = session.req_header();
        let wants_html = request
            .headers
            .get(http::header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|accept| accept.contains("text/html"));
        match request.uri.path() {
            "/metrics" => Answer {
                status: 200,
                content_type: "text/plain; version=0.0.4",
                body: self
                    .metrics
                    .render(self.traffic.in_flight(), &self.connections()),
            },
            "/status" if wants_html => Answer {
                status: 200,
                content_type: "text/html; charset=utf-8",
                body: self.status_html(),
            },
            "/status" => Answer {
                status: 200,
                content_type: "application/json",
                body: self.status_json(),
            },
            path => self
                .set_draining(&request.method, path)
                .unwrap_or_else(|| Answer::text(404, "see /metrics and /status\n".to_string())),
        }
    }
}

const STYLE: &str = "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}\
    th,td{border:1px solid #999;padding:.3em .8em;text-align:left}th{background:#eee}\
    .up{background:#cfc}.down{background:#fcc}.out{background:#ffc}";

/// One backend as a table row.
fn backend_row(state: &BackendState) -> String {
    let (class, word) = match (state.healthy(), state.ejected(), state.draining()) {
        (false, _, _) => ("down", "down"),
        (true, true, _) => ("out", "ejected"),
        (true, false, true) => ("out", "draining"),
        (true, false, false) => ("up", "up"),
    };
    let last = state.last_check().map_or("never".to_string(), |check| {
        let time = chrono::DateTime::<chrono::Utc>::from(check.at).format("%H:%M:%S");
        match check.error {
            None => format!("{time} ok"),
            Some(error) => format!("{time} {}", escape(&error)),
        }
    });
    format!(
        "<tr class=\"{class}\"><td>{}</td><td>{word}</td><td>{}</td><td>{}</td><td>{last}</td></tr>\n",
        escape(&state.name),
        state.weight,
        state.in_flight()
    )
}

/// Text as HTML, so that no backend name or error message can inject markup.
fn escape(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            '&' => "&amp;".to_string(),
            '<' => "&lt;".to_string(),
            '>' => "&gt;".to_string(),
            '"' => "&quot;".to_string(),
            '\'' => "&#39;".to_string(),
            c => c.to_string(),
        })
        .collect()
}

#[async_trait]
impl ServeHttp for MetricsEndpoint {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let answer = self.answer(session);
        Response::builder()
            .status(answer.status)
            .header(http::header::CONTENT_TYPE, answer.content_type)
            .header(http::header::CONTENT_LENGTH, answer.body.len())
            .body(answer.body)
            .expect("a static response is valid")
    }
}

#[cfg(test)]
mod tests {
    use super::{escape, parse_proc_address};

    #[test]
    fn markup_is_escaped() {
        assert_eq!(
            escape("<a href='x'>&\"</a>"),
            "&lt;a href=&#39;x&#39;&gt;&amp;&quot;&lt;/a&gt;"
        );
    }

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
