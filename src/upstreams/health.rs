//! Active health checks: each backend is probed the way it is reached (its own TLS, SNI and
//! CA settings), by pingora's TCP or HTTP checks, with the configured rise/fall thresholds.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use async_trait::async_trait;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::lb::health_check::{HealthCheck, HttpHealthCheck, TcpHealthCheck};
use pingora::lb::Backend;
use pingora::upstreams::peer::BasicPeer;
use pingora::{Error, ErrorType, Result};
use tokio::sync::Notify;

use super::{Route, Upstreams};
use crate::config::{Config, HealthCheckKind};
use crate::metrics::BackendState;

/// The background service that runs the health-check rounds, one at a time, every interval.
pub struct HealthChecks {
    pub upstreams: Arc<Upstreams>,
    pub interval: std::time::Duration,
}

#[async_trait]
impl pingora::services::background::BackgroundService for HealthChecks {
    async fn start(&self, mut shutdown: pingora::server::ShutdownWatch) {
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = self.upstreams.check_health_once() => {}
            }
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(self.interval) => {}
            }
        }
    }
}

/// The health check of the whole pool: one pingora check per backend, so that each is
/// probed with its own TLS settings, behind the pool-wide thresholds.
pub struct BackendHealth {
    probes: HashMap<SocketAddr, Probe>,
    rise: usize,
    fall: usize,
    changed: Arc<Notify>,
}

/// How one backend is checked, and where the result goes.
struct Probe {
    check: Box<dyn HealthCheck + Send + Sync>,
    state: Arc<BackendState>,
}

impl BackendHealth {
    /// `None` when health checks are disabled (`kind: none`).
    pub fn build(
        config: &Config,
        routes: &HashMap<SocketAddr, Route>,
        changed: Arc<Notify>,
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
                let state = route.state.clone();
                Some((
                    *addr,
                    Probe {
                        check: probe,
                        state,
                    },
                ))
            })
            .collect::<Option<HashMap<_, _>>>()?;
        Some(BackendHealth {
            probes,
            rise: settings.rise,
            fall: settings.fall,
            changed,
        })
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
        // pingora's error names the whole peer template; the root cause is what matters.
        let result = probe.check.check(target).await.map_err(|e| {
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
        self.changed.notify_waiters();
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
