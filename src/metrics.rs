//! The Prometheus metrics of the process: every handle registered once at start, so that a
//! request only touches atomics. This module only holds the handles; what they count is
//! decided by the proxy, the health checks and the access log, and they are served by
//! [metrics_endpoint](crate::metrics_endpoint).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus::core::Collector;
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

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
    backend_states: BackendStates,
    route_requests: IntCounterVec,
    generation: IntGauge,
    access_log_dropped: IntCounter,
    tls_handshakes: IntCounterVec,
    no_backend: [IntCounter; 5],
}

/// How a client's TLS handshake ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeResult {
    Done = 0,
    Failed = 1,
    TimedOut = 2,
}

/// The TLS handshakes of one listener, by result.
pub struct HandshakeMetrics([IntCounter; 3]);

impl HandshakeMetrics {
    pub fn observe(&self, result: HandshakeResult) {
        self.0[result as usize].inc();
    }
}

/// What describes each backend's state, by pool and backend.
struct BackendStates {
    up: IntGaugeVec,
    weight: IntGaugeVec,
    transitions: IntCounterVec,
    ejections: IntCounterVec,
    draining: IntGaugeVec,
}

impl BackendStates {
    fn register(r: &Registrar) -> BackendStates {
        let labels = &["pool", "backend"];
        BackendStates {
            up: r.gauges(
                "pingora_lb_backend_up",
                "1 if the active health checks keep the backend in rotation.",
                labels,
            ),
            weight: r.gauges(
                "pingora_lb_backend_weight",
                "Configured weight of the backend.",
                labels,
            ),
            transitions: r.counters(
                "pingora_lb_health_transitions_total",
                "Health-check transitions, by new state.",
                &["pool", "backend", "state"],
            ),
            ejections: r.counters(
                "pingora_lb_backend_ejections_total",
                "Times passive health took the backend out after failed requests.",
                labels,
            ),
            draining: r.gauges(
                "pingora_lb_backend_draining",
                "1 while the operator drains the backend (no new requests).",
                labels,
            ),
        }
    }
}

/// The request-path metrics of one backend.
pub struct BackendMetrics {
    requests: [IntCounter; 5],
    connect_failures: IntCounter,
    upstream_response: Histogram,
}

/// The health metrics of one backend.
pub struct HealthMetrics {
    up: IntGauge,
    went_down: IntCounter,
    went_up: IntCounter,
    ejections: IntCounter,
    draining: IntGauge,
}

impl HealthMetrics {
    /// A health transition.
    pub fn transition(&self, healthy: bool) {
        self.up.set(i64::from(healthy));
        if healthy {
            self.went_up.inc();
        } else {
            self.went_down.inc();
        }
    }

    /// Passive health took the backend out.
    pub fn ejected(&self) {
        self.ejections.inc();
    }

    /// The operator started or ended draining.
    pub fn draining(&self, draining: bool) {
        self.draining.set(i64::from(draining));
    }
}

fn status_class(status: u16) -> usize {
    usize::from(status / 100).clamp(1, 5) - 1
}

/// One counter per status class, the class label first.
fn by_class(vec: &IntCounterVec, labels: &[&str]) -> [IntCounter; 5] {
    ["1xx", "2xx", "3xx", "4xx", "5xx"].map(|class| {
        let values: Vec<&str> = std::iter::once(class)
            .chain(labels.iter().copied())
            .collect();
        vec.with_label_values(&values)
    })
}

/// The metrics of one route.
pub struct RouteMetrics {
    requests: [IntCounter; 5],
}

impl RouteMetrics {
    /// A response went back to the client.
    pub fn observe(&self, status: u16) {
        self.requests[status_class(status)].inc();
    }
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

/// Creates metrics and registers them; names are constants, so creation cannot fail.
struct Registrar(Registry);

impl Registrar {
    fn add<M: Collector + Clone + 'static>(&self, metric: prometheus::Result<M>) -> M {
        let metric = metric.expect("metric names and labels are valid");
        self.0
            .register(Box::new(metric.clone()))
            .expect("metric names are unique");
        metric
    }

    fn counter(&self, name: &str, help: &str) -> IntCounter {
        self.add(IntCounter::new(name, help))
    }

    fn counters(&self, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
        self.add(IntCounterVec::new(Opts::new(name, help), labels))
    }

    fn gauge(&self, name: &str, help: &str) -> IntGauge {
        self.add(IntGauge::new(name, help))
    }

    fn gauges(&self, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
        self.add(IntGaugeVec::new(Opts::new(name, help), labels))
    }

    fn histograms(&self, name: &str, help: &str, labels: &[&str]) -> HistogramVec {
        let opts = HistogramOpts::new(name, help).buckets(BUCKETS.to_vec());
        self.add(HistogramVec::new(opts, labels))
    }

    fn histogram(&self, name: &str, help: &str) -> Histogram {
        let opts = HistogramOpts::new(name, help).buckets(BUCKETS.to_vec());
        self.add(Histogram::with_opts(opts))
    }
}

impl Registrar {
    /// Metrics set once: when the process started, and its version.
    fn process_info(&self) {
        let start = SystemTime::now().duration_since(UNIX_EPOCH);
        self.add(Gauge::new(
            "process_start_time_seconds",
            "Start time of the process since the Unix epoch.",
        ))
        .set(start.unwrap_or_default().as_secs_f64());
        self.gauges(
            "pingora_lb_build_info",
            "Always 1; labelled with the version.",
            &["version"],
        )
        .with_label_values(&[env!("CARGO_PKG_VERSION")])
        .set(1);
    }
}

impl Metrics {
    /// Registers every metric; `generation` counts this process among its reload chain.
    pub fn new(generation: u64) -> Metrics {
        let r = Registrar(Registry::new());
        let requests = r.counters(
            "pingora_lb_requests_total",
            "Responses sent to clients, by status class, pool and backend.",
            &["status_class", "pool", "backend"],
        );
        let metrics = Metrics {
            connect_failures: r.counters(
                "pingora_lb_upstream_connect_failures_total",
                "Failed connection attempts to backends.",
                &["pool", "backend"],
            ),
            retries: r.counter(
                "pingora_lb_retries_total",
                "Requests sent to another backend after a connect failure.",
            ),
            upstream_response: r.histograms(
                "pingora_lb_upstream_response_seconds",
                "Time from connecting to a backend to its response header.",
                &["pool", "backend"],
            ),
            request_duration: r.histogram(
                "pingora_lb_request_duration_seconds",
                "Time from request header to the end of the response.",
            ),
            in_flight: r.gauge(
                "pingora_lb_requests_in_flight",
                "Client requests being served now.",
            ),
            downstream_connections: r.gauges(
                "pingora_lb_downstream_connections",
                "Established client connections, by listener (from the kernel's socket table).",
                &["listener"],
            ),
            backend_states: BackendStates::register(&r),
            route_requests: r.counters(
                "pingora_lb_route_requests_total",
                "Responses sent to clients, by status class and route.",
                &["status_class", "route"],
            ),
            generation: r.gauge(
                "pingora_lb_reload_generation",
                "1 for a process started afresh, plus one for each reload since.",
            ),
            access_log_dropped: r.counter(
                "pingora_lb_access_log_dropped_total",
                "Access log lines dropped because the log sink was too slow.",
            ),
            tls_handshakes: r.counters(
                "pingora_lb_tls_handshakes_total",
                "TLS handshakes with clients, by listener and result (done, failed, timeout).",
                &["listener", "result"],
            ),
            no_backend: by_class(&requests, &[NO_BACKEND, NO_BACKEND]),
            requests,
            registry: r.0.clone(),
        };
        metrics.generation.set(generation as i64);
        r.process_info();
        metrics
    }

    /// The reload generation of this process.
    pub fn generation(&self) -> u64 {
        self.generation.get() as u64
    }

    /// Handshake counters of one TLS listener.
    pub fn tls_handshakes(&self, listener: &str) -> HandshakeMetrics {
        HandshakeMetrics(
            ["done", "failed", "timeout"]
                .map(|result| self.tls_handshakes.with_label_values(&[listener, result])),
        )
    }

    /// Request-path handles for one backend of a pool.
    pub fn backend(&self, pool: &str, name: &str) -> BackendMetrics {
        let labels = [pool, name];
        BackendMetrics {
            requests: by_class(&self.requests, &labels),
            connect_failures: self.connect_failures.with_label_values(&labels),
            upstream_response: self.upstream_response.with_label_values(&labels),
        }
    }

    /// Health handles for one backend of a pool, which starts in rotation as pingora's do.
    pub fn backend_health(&self, pool: &str, name: &str, weight: usize) -> HealthMetrics {
        let labels = [pool, name];
        let states = &self.backend_states;
        let up = states.up.with_label_values(&labels);
        up.set(1);
        states.weight.with_label_values(&labels).set(weight as i64);
        let draining = states.draining.with_label_values(&labels);
        draining.set(0);
        HealthMetrics {
            up,
            went_down: states.transitions.with_label_values(&[pool, name, "down"]),
            went_up: states.transitions.with_label_values(&[pool, name, "up"]),
            ejections: states.ejections.with_label_values(&labels),
            draining,
        }
    }

    /// Handles for one route.
    pub fn route(&self, name: &str) -> RouteMetrics {
        RouteMetrics {
            requests: by_class(&self.route_requests, &[name]),
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

    /// The Prometheus text format, with the gauges read at scrape time set first:
    /// requests in flight, and established connections by listener.
    pub fn render(&self, in_flight: usize, connections: &[(String, usize)]) -> Vec<u8> {
        self.in_flight.set(in_flight as i64);
        for (listener, count) in connections {
            self.downstream_connections
                .with_label_values(&[listener])
                .set(*count as i64);
        }
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding into memory does not fail");
        out
    }
}
