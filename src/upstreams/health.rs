//! Backend health: active checks, each backend probed the way it is reached (its own TLS,
//! SNI and CA settings), by a TCP connection or an HTTP request, with the configured
//! rise/fall thresholds; and the health state every other part reads, which this module
//! alone changes.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use http::HeaderValue;
use pingora::connectors::http::v2::{handshake as h2_handshake, H2HandshakeSettings};
use pingora::connectors::TransportConnector;
use pingora::http::RequestHeader;
use pingora::lb::health_check::HealthCheck;
use pingora::lb::Backend;
use pingora::protocols::http::client::HttpSession;
use pingora::protocols::http::v1::client::HttpSession as Http1Session;
use pingora::protocols::{Stream, ALPN};
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorType, Result};
use tokio::sync::watch;

use crate::config::{self, HealthCheckKind, PassiveHealth};
use crate::metrics::HealthMetrics;

/// What a backend's last health probe found.
#[derive(Clone)]
pub struct CheckRecord {
    pub ok: bool,
    pub error: Option<String>,
    pub at: SystemTime,
}

/// The live state of one backend, as the selector, the status endpoint and metrics see
/// it: active health, passive health (ejection), draining, and requests in flight.
pub struct BackendState {
    /// The pool it belongs to.
    pub pool: String,
    /// The address as configured.
    pub name: String,
    pub weight: usize,
    healthy: AtomicBool,
    last_check: Mutex<Option<CheckRecord>>,
    draining: AtomicBool,
    /// Requests sent to it and not finished.
    in_flight: AtomicUsize,
    /// Live requests failed in a row.
    failures: AtomicU32,
    /// Ejections in a row, each twice as long as the one before.
    ejections: AtomicU32,
    /// End of the current ejection, in [clock_ms]; 0 when not ejected.
    ejected_until: AtomicU64,
    metrics: HealthMetrics,
}

/// Milliseconds since the first call: the time base of ejections, kept in atomics.
fn clock_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// Longest a doubling ejection streak may count, so the shift cannot overflow.
const MAX_EJECTION_DOUBLINGS: u32 = 20;

impl BackendState {
    /// A backend starts healthy, as pingora's do.
    pub fn new(pool: &str, name: String, weight: usize, metrics: HealthMetrics) -> BackendState {
        BackendState {
            pool: pool.to_string(),
            name,
            weight,
            healthy: AtomicBool::new(true),
            last_check: Mutex::new(None),
            draining: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            failures: AtomicU32::new(0),
            ejections: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            metrics,
        }
    }

    /// As the active health checks last found it.
    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Taken out by passive health until its ejection ends.
    pub fn ejected(&self) -> bool {
        let until = self.ejected_until.load(Ordering::Relaxed);
        until != 0 && clock_ms() < until
    }

    /// Given no new requests, by the operator.
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Whether new requests may go to it.
    pub fn in_rotation(&self) -> bool {
        self.healthy() && !self.draining() && !self.ejected()
    }

    /// Requests in flight to it.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Starts or ends draining; returns whether that changed anything.
    pub fn set_draining(&self, draining: bool) -> bool {
        let changed = self.draining.swap(draining, Ordering::Relaxed) != draining;
        if changed {
            self.metrics.draining(draining);
            log::info!(
                "backend {} of pool {}: {}",
                self.name,
                self.pool,
                if draining {
                    "draining: no new requests"
                } else {
                    "back in rotation"
                }
            );
        }
        changed
    }

    /// A request was sent to it; it counts as in flight until the guard is dropped.
    pub fn start_request(self: &Arc<Self>) -> InFlightRequest {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlightRequest(self.clone())
    }

    /// A live request got its response.
    pub fn request_succeeded(&self) {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
        if self.ejections.load(Ordering::Relaxed) != 0 && !self.ejected() {
            self.ejections.store(0, Ordering::Relaxed);
        }
    }

    /// A live request failed (no connection, a timeout, or a 5xx if so configured). After
    /// `consecutive_failures` in a row the backend is ejected, unless `last_in_rotation`:
    /// the last backend a pool has is never taken out. Returns the ejection's length.
    pub fn request_failed(
        &self,
        policy: &PassiveHealth,
        last_in_rotation: bool,
    ) -> Option<Duration> {
        let threshold = policy.consecutive_failures;
        let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if threshold == 0 || failures < threshold || last_in_rotation || self.ejected() {
            return None;
        }
        self.failures.store(0, Ordering::Relaxed);
        let streak = self
            .ejections
            .fetch_add(1, Ordering::Relaxed)
            .min(MAX_EJECTION_DOUBLINGS);
        let length = policy
            .ejection_time
            .0
            .saturating_mul(1 << streak)
            .min(policy.max_ejection_time.0);
        let until = clock_ms() + (length.as_millis() as u64).max(1);
        self.ejected_until.store(until, Ordering::Relaxed);
        self.metrics.ejected();
        log::warn!(
            "backend {} of pool {} failed {failures} requests in a row; out of rotation for {}ms",
            self.name,
            self.pool,
            length.as_millis()
        );
        Some(length)
    }

    /// The outcome of the last probe, if any ran.
    pub fn last_check(&self) -> Option<CheckRecord> {
        self.last_check
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set_healthy(&self, healthy: bool) {
        self.healthy.store(healthy, Ordering::Relaxed);
        self.metrics.transition(healthy);
    }

    fn record_check(&self, error: Option<String>) {
        *self.last_check.lock().unwrap_or_else(|p| p.into_inner()) = Some(CheckRecord {
            ok: error.is_none(),
            error,
            at: SystemTime::now(),
        });
    }
}

/// A request in flight to a backend, counted for least-connections selection until dropped.
pub struct InFlightRequest(Arc<BackendState>);

impl Drop for InFlightRequest {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What the health checks have found so far: readiness waits for the first round, and
/// systemd's status line follows every transition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HealthSummary {
    /// The first round of checks of every pool is done.
    pub checked: bool,
    pub healthy: usize,
    pub total: usize,
}

/// The health state of every backend of every pool, and one channel that says when it
/// changed. A `watch` keeps the latest summary, so a change that happens while no one
/// waits is still seen by the next wait.
pub struct HealthWatch {
    /// In configuration order, pool by pool.
    states: Vec<Arc<BackendState>>,
    /// Pools whose first round of checks is not done yet.
    unchecked_pools: AtomicUsize,
    summary: watch::Sender<HealthSummary>,
}

impl HealthWatch {
    pub fn new(states: Vec<Arc<BackendState>>, pools: usize) -> HealthWatch {
        let summary = HealthSummary {
            checked: pools == 0,
            healthy: states.iter().filter(|s| s.healthy()).count(),
            total: states.len(),
        };
        HealthWatch {
            states,
            unchecked_pools: AtomicUsize::new(pools),
            summary: watch::Sender::new(summary),
        }
    }

    /// Every backend's state, in configuration order.
    pub fn states(&self) -> impl Iterator<Item = &BackendState> {
        self.states.iter().map(|s| &**s)
    }

    /// The summary now, and its later changes.
    pub fn subscribe(&self) -> watch::Receiver<HealthSummary> {
        self.summary.subscribe()
    }

    /// The first round of checks of one pool is done.
    pub fn first_round_done(&self) {
        if self.unchecked_pools.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.update(|summary| summary.checked = true);
        }
    }

    fn backend_changed(&self) {
        let healthy = self.states().filter(|s| s.healthy()).count();
        self.update(|summary| summary.healthy = healthy);
    }

    fn update(&self, change: impl FnOnce(&mut HealthSummary)) {
        self.summary.send_if_modified(|summary| {
            let before = *summary;
            change(summary);
            before != *summary
        });
    }
}

/// A backend as the health checks see it: how requests reach it, and its state.
pub struct Target<'a> {
    pub addr: SocketAddr,
    pub peer: &'a HttpPeer,
    /// The `Host` header requests to it carry, if overridden.
    pub host: Option<&'a HeaderValue>,
    pub state: Arc<BackendState>,
}

/// The health check of the whole pool: each backend probed the way requests reach it,
/// behind the pool-wide thresholds.
pub struct BackendHealth {
    probes: HashMap<SocketAddr, Probe>,
    /// Shared by every probe. Each pingora connector loads the system CA store (about 40 ms
    /// and 0.9 MiB each), so pingora's own checks, which hold a connector each, made
    /// start-up, reloads and memory grow with the number of backends.
    connector: TransportConnector,
    rise: usize,
    fall: usize,
    watch: Arc<HealthWatch>,
}

/// How one backend is checked, and where the result goes.
struct Probe {
    /// The backend's own peer (TLS, SNI, CA) with the check's timeouts.
    peer: HttpPeer,
    check: Check,
    state: Arc<BackendState>,
}

enum Check {
    /// A TCP connection, and the TLS handshake for a TLS backend.
    Connect,
    /// A request whose response must carry the expected status.
    Request {
        request: Box<RequestHeader>,
        expected_status: u16,
    },
}

impl BackendHealth {
    /// `None` when health checks are disabled (`kind: none`).
    pub fn build(
        settings: &config::HealthCheck,
        targets: Vec<Target<'_>>,
        watch: Arc<HealthWatch>,
    ) -> Option<BackendHealth> {
        let sends_request = match settings.kind {
            HealthCheckKind::None => return None,
            HealthCheckKind::Tcp => false,
            HealthCheckKind::Http => true,
        };
        let probes = targets
            .into_iter()
            .map(|target| {
                let mut peer = target.peer.clone();
                let timeout = Some(settings.timeout.0);
                peer.options.connection_timeout = timeout;
                peer.options.total_connection_timeout = timeout;
                peer.options.read_timeout = timeout;
                peer.options.write_timeout = timeout;
                let check = if sends_request {
                    Check::Request {
                        request: Box::new(health_request(settings, &target)),
                        expected_status: settings.expected_status,
                    }
                } else {
                    Check::Connect
                };
                let state = target.state;
                (target.addr, Probe { peer, check, state })
            })
            .collect();
        Some(BackendHealth {
            probes,
            connector: TransportConnector::new(None),
            rise: settings.rise,
            fall: settings.fall,
            watch,
        })
    }
}

/// `GET {path}` with the configured Host, else the backend's Host override, else its address.
fn health_request(settings: &config::HealthCheck, target: &Target<'_>) -> RequestHeader {
    let host = settings
        .host
        .as_ref()
        .or(target.host)
        .cloned()
        .unwrap_or_else(|| {
            HeaderValue::from_str(&target.state.name).expect("an address is a valid header value")
        });
    let mut request = RequestHeader::build("GET", settings.path.as_bytes(), None)
        .expect("the path was validated with the configuration");
    request
        .insert_header(http::header::HOST, host)
        .expect("a header value is valid");
    request
}

impl Probe {
    async fn run(&self, connector: &TransportConnector) -> Result<()> {
        let stream = connector.new_stream(&self.peer).await?;
        let Check::Request {
            request,
            expected_status,
        } = &self.check
        else {
            return Ok(());
        };
        let mut session = self.session(stream).await?;
        session.set_read_timeout(self.peer.options.read_timeout);
        session.set_write_timeout(self.peer.options.write_timeout);
        let request = match session {
            HttpSession::H2(_) => Box::new(h2_request(request, self.peer.is_tls())?),
            _ => request.clone(),
        };
        session.write_request_header(request).await?;
        session.finish_request_body().await?;
        session.read_response_header().await?;
        // The status is the verdict: the connection closes without reading the body.
        let status = session.response_header().map_or(0, |r| r.status.as_u16());
        if status == *expected_status {
            Ok(())
        } else {
            Error::e_explain(
                ErrorType::CustomCode("unexpected status", status),
                format!("health check expected status {expected_status}, got {status}"),
            )
        }
    }

    /// HTTP/2 where requests speak it (ALPN `h2`, or h2c by configuration), as a gRPC
    /// backend may know nothing else; HTTP/1.1 otherwise.
    async fn session(&self, stream: Stream) -> Result<HttpSession> {
        let h2 = match stream.selected_alpn_proto() {
            Some(alpn) => matches!(alpn, ALPN::H2),
            None => !self.peer.is_tls() && self.peer.options.alpn.get_min_http_version() == 2,
        };
        if !h2 {
            return Ok(HttpSession::H1(Http1Session::new_with_options(
                stream, &self.peer,
            )));
        }
        let mut settings = H2HandshakeSettings::new();
        settings.max_streams = 1;
        let connection = h2_handshake(stream, settings).await?;
        let stream = connection.spawn_stream().await?.ok_or_else(|| {
            Error::explain(ErrorType::H2Error, "the backend allows no HTTP/2 stream")
        })?;
        Ok(HttpSession::H2(stream))
    }
}

/// The check's request in HTTP/2's shape: the host in `:authority` (with the scheme), and
/// no `Host` header, which some servers (nginx) refuse next to it.
fn h2_request(request: &RequestHeader, tls: bool) -> Result<RequestHeader> {
    let mut request = request.clone();
    let host = request
        .remove_header(&http::header::HOST)
        .ok_or_else(|| Error::explain(ErrorType::InternalError, "a check without Host"))?;
    let uri = http::Uri::builder()
        .scheme(if tls { "https" } else { "http" })
        .authority(host.as_bytes())
        .path_and_query(request.uri.path_and_query().map_or("/", |p| p.as_str()))
        .build()
        .map_err(|e| Error::because(ErrorType::InvalidHTTPHeader, "the check's Host", e))?;
    request.set_uri(uri);
    Ok(request)
}

impl BackendHealth {
    fn probe(&self, target: &Backend) -> Result<&Probe> {
        target
            .addr
            .as_inet()
            .and_then(|addr| self.probes.get(addr))
            .ok_or_else(|| Error::explain(ErrorType::InternalError, "backend without a probe"))
    }
}

#[async_trait]
impl HealthCheck for BackendHealth {
    async fn check(&self, target: &Backend) -> Result<()> {
        let probe = self.probe(target)?;
        // pingora's error names the whole peer; the root cause is what matters.
        let result = probe.run(&self.connector).await.map_err(|e| {
            let cause = e.root_cause().to_string();
            Error::explain(e.etype().clone(), cause)
        });
        probe
            .state
            .record_check(result.as_ref().err().map(|e| e.to_string()));
        result
    }

    async fn health_status_change(&self, target: &Backend, healthy: bool) {
        if let Ok(probe) = self.probe(target) {
            probe.state.set_healthy(healthy);
        }
        self.watch.backend_changed();
    }

    /// pingora logs each transition once, as "{summary} becomes (un)healthy".
    fn backend_summary(&self, target: &Backend) -> String {
        format!("backend {}", target.addr)
    }

    fn health_threshold(&self, success: bool) -> usize {
        if success {
            self.rise
        } else {
            self.fall
        }
    }
}
