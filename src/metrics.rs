//! Prometheus metrics and the backend status endpoint, served on their own listener
//! (`metrics.listen`), which is bound and handed over on reload like the proxy's.
//!
//! Counters on the request path are resolved per backend once at start, so a request only
//! touches atomics; gauges describing state (health, weights, requests in flight) are read
//! when scraped.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use http::Response;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::proxy::Traffic;
use crate::upstreams::Upstreams;

/// Buckets of the duration histograms, in seconds.
const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Label value for requests that reached no backend.
const NO_BACKEND: &str = "none";

/// Every metric of the process.
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    connect_failures: IntCounterVec,
    retries: IntCounter,
    upstream_response: HistogramVec,
    request_duration: Histogram,
    in_flight: IntGauge,
    downstream_connections: IntGaugeVec,
    backend_up: IntGaugeVec,
    backend_weight: IntGaugeVec,
    health_transitions: IntCounterVec,
    generation: IntGauge,
    access_log_dropped: IntCounter,
    no_backend: [IntCounter; 5],
}

/// The request-path metrics of one backend.
pub struct BackendMetrics {
    requests: [IntCounter; 5],
    connect_failures: IntCounter,
    upstream_response: Histogram,
}

/// What a backend's last health probe found.
#[derive(Clone)]
pub struct CheckRecord {
    pub ok: bool,
    pub error: Option<String>,
    pub at: SystemTime,
}

/// The health of one backend as the status endpoint and metrics show it.
pub struct BackendState {
    pub name: String,
    pub weight: usize,
    healthy: AtomicBool,
    last_check: Mutex<Option<CheckRecord>>,
    up: IntGauge,
    went_down: IntCounter,
    went_up: IntCounter,
}

impl BackendState {
    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// A health transition, as pingora reports it.
    pub fn set_healthy(&self, healthy: bool) {
        self.healthy.store(healthy, Ordering::Relaxed);
        self.up.set(i64::from(healthy));
        if healthy {
            self.went_up.inc();
        } else {
            self.went_down.inc();
        }
    }

    /// The outcome of every probe.
    pub fn record_check(&self, error: Option<String>) {
        *self.last_check.lock().unwrap_or_else(|p| p.into_inner()) = Some(CheckRecord {
            ok: error.is_none(),
            error,
            at: SystemTime::now(),
        });
    }

    fn last_check(&self) -> Option<CheckRecord> {
        self.last_check
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

fn status_class(status: u16) -> usize {
    usize::from(status / 100).clamp(1, 5) - 1
}

fn by_class(vec: &IntCounterVec, backend: &str) -> [IntCounter; 5] {
    ["1xx", "2xx", "3xx", "4xx", "5xx"].map(|class| vec.with_label_values(&[class, backend]))
}

impl BackendMetrics {
    /// A response went back to the client; `upstream` is the time to the backend's header.
    pub fn observe(&self, status: u16, upstream: Option<Duration>) {
        self.requests[status_class(status)].inc();
        if let Some(upstream) = upstream {
            self.upstream_response.observe(upstream.as_secs_f64());
        }
    }

    pub fn connect_failed(&self) {
        self.connect_failures.inc();
    }
}

impl Metrics {
    /// Registers every metric; `generation` counts this process among its reload chain.
    pub fn new(generation: u64) -> Metrics {
        let registry = Registry::new();
        fn register<M: prometheus::core::Collector + Clone + 'static>(r: &Registry, m: M) -> M {
            r.register(Box::new(m.clone()))
                .expect("metric names are unique");
            m
        }
        let requests = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "pingora_lb_requests_total",
                    "Responses sent to clients, by status class and backend.",
                ),
                &["status_class", "backend"],
            )
            .unwrap(),
        );
        let metrics = Metrics {
            connect_failures: register(
                &registry,
                IntCounterVec::new(
                    Opts::new(
                        "pingora_lb_upstream_connect_failures_total",
                        "Failed connection attempts to backends.",
                    ),
                    &["backend"],
                )
                .unwrap(),
            ),
            retries: register(
                &registry,
                IntCounter::new(
                    "pingora_lb_retries_total",
                    "Requests sent to another backend after a connect failure.",
                )
                .unwrap(),
            ),
            upstream_response: register(
                &registry,
                HistogramVec::new(
                    HistogramOpts::new(
                        "pingora_lb_upstream_response_seconds",
                        "Time from connecting to a backend to its response header.",
                    )
                    .buckets(BUCKETS.to_vec()),
                    &["backend"],
                )
                .unwrap(),
            ),
            request_duration: register(
                &registry,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "pingora_lb_request_duration_seconds",
                        "Time from request header to the end of the response.",
                    )
                    .buckets(BUCKETS.to_vec()),
                )
                .unwrap(),
            ),
            in_flight: register(
                &registry,
                IntGauge::new(
                    "pingora_lb_requests_in_flight",
                    "Client requests being served now.",
                )
                .unwrap(),
            ),
            downstream_connections: register(
                &registry,
                IntGaugeVec::new(
                    Opts::new(
                        "pingora_lb_downstream_connections",
                        "Established client connections, by listener (from the kernel's socket table).",
                    ),
                    &["listener"],
                )
                .unwrap(),
            ),
            backend_up: register(
                &registry,
                IntGaugeVec::new(
                    Opts::new("pingora_lb_backend_up", "1 if the backend is in rotation."),
                    &["backend"],
                )
                .unwrap(),
            ),
            backend_weight: register(
                &registry,
                IntGaugeVec::new(
                    Opts::new(
                        "pingora_lb_backend_weight",
                        "Configured weight of the backend.",
                    ),
                    &["backend"],
                )
                .unwrap(),
            ),
            health_transitions: register(
                &registry,
                IntCounterVec::new(
                    Opts::new(
                        "pingora_lb_health_transitions_total",
                        "Health-check transitions, by new state.",
                    ),
                    &["backend", "state"],
                )
                .unwrap(),
            ),
            generation: register(
                &registry,
                IntGauge::new(
                    "pingora_lb_reload_generation",
                    "1 for a process started afresh, plus one for each reload since.",
                )
                .unwrap(),
            ),
            access_log_dropped: register(
                &registry,
                IntCounter::new(
                    "pingora_lb_access_log_dropped_total",
                    "Access log lines dropped because the log sink was too slow.",
                )
                .unwrap(),
            ),
            no_backend: by_class(&requests, NO_BACKEND),
            requests,
            registry,
        };
        metrics.generation.set(generation as i64);
        let start = register(
            &metrics.registry,
            prometheus::Gauge::new(
                "process_start_time_seconds",
                "Start time of the process since the Unix epoch.",
            )
            .unwrap(),
        );
        start.set(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64(),
        );
        let build = register(
            &metrics.registry,
            IntGaugeVec::new(
                Opts::new(
                    "pingora_lb_build_info",
                    "Always 1; labelled with the version.",
                ),
                &["version"],
            )
            .unwrap(),
        );
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        metrics
    }

    /// The reload generation of this process.
    pub fn generation(&self) -> u64 {
        self.generation.get() as u64
    }

    /// Request-path handles for one backend.
    pub fn backend(&self, name: &str) -> BackendMetrics {
        BackendMetrics {
            requests: by_class(&self.requests, name),
            connect_failures: self.connect_failures.with_label_values(&[name]),
            upstream_response: self.upstream_response.with_label_values(&[name]),
        }
    }

    /// Health state of one backend, starting healthy as pingora does.
    pub fn backend_state(&self, name: &str, weight: usize) -> BackendState {
        let up = self.backend_up.with_label_values(&[name]);
        up.set(1);
        self.backend_weight
            .with_label_values(&[name])
            .set(weight as i64);
        BackendState {
            name: name.to_string(),
            weight,
            healthy: AtomicBool::new(true),
            last_check: Mutex::new(None),
            up,
            went_down: self.health_transitions.with_label_values(&[name, "down"]),
            went_up: self.health_transitions.with_label_values(&[name, "up"]),
        }
    }

    /// A request ended; `backend` is absent when none was reached.
    pub fn request_done(
        &self,
        backend: Option<&BackendMetrics>,
        status: u16,
        total: Duration,
        upstream: Option<Duration>,
    ) {
        match backend {
            Some(backend) => backend.observe(status, upstream),
            None => self.no_backend[status_class(status)].inc(),
        }
        self.request_duration.observe(total.as_secs_f64());
    }

    pub fn retried(&self) {
        self.retries.inc();
    }

    pub fn access_log_dropped(&self) {
        self.access_log_dropped.inc();
    }

    fn render(&self, traffic: &Traffic, listeners: &[SocketAddr]) -> Vec<u8> {
        self.in_flight.set(traffic.in_flight() as i64);
        for (listener, count) in listeners.iter().zip(established_connections(listeners)) {
            self.downstream_connections
                .with_label_values(&[&listener.to_string()])
                .set(count as i64);
        }
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding into memory does not fail");
        out
    }
}

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
    fn status_json(&self) -> Vec<u8> {
        let rfc3339 = |t: SystemTime| chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339();
        let backends: Vec<serde_json::Value> = self
            .upstreams
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
                self.metrics.render(&self.traffic, &self.listeners),
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
