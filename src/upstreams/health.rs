//! Backend health: active checks, each backend probed the way it is reached (its own TLS,
//! SNI and CA settings), by a TCP connection or an HTTP request, with the configured
//! rise/fall thresholds; and the health state every other part reads, which this module
//! alone changes.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use async_trait::async_trait;
use http::HeaderValue;
use pingora::connectors::TransportConnector;
use pingora::http::RequestHeader;
use pingora::lb::health_check::HealthCheck;
use pingora::lb::Backend;
use pingora::protocols::http::v1::client::HttpSession;
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorType, Result};
use tokio::sync::watch;

use crate::config::{self, HealthCheckKind};
use crate::metrics::HealthMetrics;

/// What a backend's last health probe found.
#[derive(Clone)]
pub struct CheckRecord {
    pub ok: bool,
    pub error: Option<String>,
    pub at: SystemTime,
}

/// The health of one backend, as the selector, the status endpoint and metrics see it.
pub struct BackendState {
    /// The address as configured.
    pub name: String,
    pub weight: usize,
    healthy: AtomicBool,
    last_check: Mutex<Option<CheckRecord>>,
    metrics: HealthMetrics,
}

impl BackendState {
    /// A backend starts healthy, as pingora's do.
    pub fn new(name: String, weight: usize, metrics: HealthMetrics) -> BackendState {
        BackendState {
            name,
            weight,
            healthy: AtomicBool::new(true),
            last_check: Mutex::new(None),
            metrics,
        }
    }

    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
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

/// What the health checks have found so far: readiness waits for the first round, and
/// systemd's status line follows every transition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HealthSummary {
    /// The first round of checks is done.
    pub checked: bool,
    pub healthy: usize,
    pub total: usize,
}

/// The health state of every backend of the pool, and one channel that says when it
/// changed. A `watch` keeps the latest summary, so a change that happens while no one
/// waits is still seen by the next wait.
pub struct HealthWatch {
    /// In configuration order.
    states: Vec<Arc<BackendState>>,
    summary: watch::Sender<HealthSummary>,
}

impl HealthWatch {
    pub fn new(states: Vec<Arc<BackendState>>) -> HealthWatch {
        let summary = HealthSummary {
            checked: false,
            healthy: states.iter().filter(|s| s.healthy()).count(),
            total: states.len(),
        };
        HealthWatch {
            states,
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

    /// A round of checks is done.
    pub fn round_done(&self) {
        self.update(|summary| summary.checked = true);
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
        let mut session = HttpSession::new_with_options(stream, &self.peer);
        session.read_timeout = self.peer.options.read_timeout;
        session.write_timeout = self.peer.options.write_timeout;
        session.write_request_header(request.clone()).await?;
        session.finish_body().await?;
        session.read_response().await?;
        // The status is the verdict: the connection closes without reading the body.
        let status = session.resp_header().map_or(0, |r| r.status.as_u16());
        if status == *expected_status {
            Ok(())
        } else {
            Error::e_explain(
                ErrorType::CustomCode("unexpected status", status),
                format!("health check expected status {expected_status}"),
            )
        }
    }
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
