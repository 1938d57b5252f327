//! Active health checks: each backend is probed the way it is reached (its own TLS, SNI and
//! CA settings), by pingora's TCP or HTTP checks, with the configured rise/fall thresholds.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::lb::health_check::{HealthCheck, HttpHealthCheck, TcpHealthCheck};
use pingora::lb::Backend;
use pingora::upstreams::peer::BasicPeer;
use pingora::{Error, ErrorType, Result};
use tokio::sync::Notify;

use super::Route;
use crate::config::{Config, HealthCheckKind};

/// How many backends are in rotation, for `STATUS=` and logs.
pub struct HealthStatus {
    total: usize,
    healthy: AtomicUsize,
    /// Woken on every transition.
    pub changed: Notify,
}

impl HealthStatus {
    /// pingora starts every backend as healthy.
    pub fn new(total: usize) -> Self {
        HealthStatus {
            total,
            healthy: AtomicUsize::new(total),
            changed: Notify::new(),
        }
    }

    /// Backends currently in rotation.
    pub fn healthy(&self) -> usize {
        self.healthy.load(Ordering::Relaxed)
    }

    /// All configured backends.
    pub fn total(&self) -> usize {
        self.total
    }

    fn record(&self, healthy: bool) {
        if healthy {
            self.healthy.fetch_add(1, Ordering::Relaxed);
        } else {
            self.healthy.fetch_sub(1, Ordering::Relaxed);
        }
        self.changed.notify_waiters();
    }
}

/// The health check of the whole pool: one pingora check per backend, so that each is
/// probed with its own TLS settings, behind the pool-wide thresholds.
pub struct BackendHealth {
    probes: HashMap<SocketAddr, Box<dyn HealthCheck + Send + Sync>>,
    rise: usize,
    fall: usize,
    status: Arc<HealthStatus>,
}

impl BackendHealth {
    /// `None` when health checks are disabled (`kind: none`).
    pub fn build(
        config: &Config,
        routes: &HashMap<SocketAddr, Route>,
        status: Arc<HealthStatus>,
    ) -> Option<BackendHealth> {
        let settings = &config.health_check;
        let probes = routes
            .iter()
            .map(|(addr, route)| {
                let probe: Box<dyn HealthCheck + Send + Sync> = match settings.kind {
                    HealthCheckKind::None => return None,
                    HealthCheckKind::Tcp => {
                        let mut peer = BasicPeer::new(&addr.to_string());
                        if route.tls {
                            peer.sni = route.peer.sni.clone();
                        }
                        peer.options = route.peer.options.clone();
                        peer.options.connection_timeout = Some(settings.timeout.0);
                        peer.options.total_connection_timeout = Some(settings.timeout.0);
                        let mut probe = TcpHealthCheck::default();
                        probe.peer_template = peer;
                        Box::new(probe)
                    }
                    HealthCheckKind::Http => {
                        let host = settings
                            .host
                            .clone()
                            .or_else(|| {
                                route
                                    .host
                                    .as_ref()
                                    .and_then(|h| h.to_str().ok().map(String::from))
                            })
                            .unwrap_or_else(|| route.name.clone());
                        let mut probe = HttpHealthCheck::new(&host, route.tls);
                        let mut peer = route.peer.clone();
                        peer.options.connection_timeout = Some(settings.timeout.0);
                        peer.options.total_connection_timeout = Some(settings.timeout.0);
                        peer.options.read_timeout = Some(settings.timeout.0);
                        probe.peer_template = peer;
                        let mut request =
                            RequestHeader::build("GET", settings.path.as_bytes(), None)
                                .expect("the path was validated with the configuration");
                        request
                            .insert_header(http::header::HOST, host)
                            .expect("a host name is a valid header value");
                        probe.req = request;
                        let expected = settings.expected_status;
                        probe.validator = Some(Box::new(move |response: &ResponseHeader| {
                            if response.status.as_u16() == expected {
                                Ok(())
                            } else {
                                Error::e_explain(
                                    ErrorType::CustomCode(
                                        "unexpected status",
                                        response.status.as_u16(),
                                    ),
                                    format!("health check expected status {expected}"),
                                )
                            }
                        }));
                        Box::new(probe)
                    }
                };
                Some((*addr, probe))
            })
            .collect::<Option<HashMap<_, _>>>()?;
        Some(BackendHealth {
            probes,
            rise: settings.rise,
            fall: settings.fall,
            status,
        })
    }
}

#[async_trait]
impl HealthCheck for BackendHealth {
    async fn check(&self, target: &Backend) -> Result<()> {
        let probe = target
            .addr
            .as_inet()
            .and_then(|addr| self.probes.get(addr))
            .ok_or_else(|| Error::explain(ErrorType::InternalError, "backend without a probe"))?;
        // pingora's error names the whole peer template; the root cause is what matters.
        probe.check(target).await.map_err(|e| {
            let cause = e.root_cause().to_string();
            Error::explain(e.etype().clone(), cause)
        })
    }

    async fn health_status_change(&self, _target: &Backend, healthy: bool) {
        self.status.record(healthy);
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
