//! Active health checks: each backend is probed the way it is reached (its own TLS, SNI and
//! CA settings), by a TCP connection or an HTTP request, with the configured rise/fall
//! thresholds.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use async_trait::async_trait;
use pingora::connectors::TransportConnector;
use pingora::http::RequestHeader;
use pingora::lb::health_check::HealthCheck;
use pingora::lb::Backend;
use pingora::protocols::http::v1::client::HttpSession;
use pingora::upstreams::peer::HttpPeer;
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
    changed: Arc<Notify>,
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
        config: &Config,
        routes: &HashMap<SocketAddr, Route>,
        changed: Arc<Notify>,
    ) -> Option<BackendHealth> {
        let settings = &config.health_check;
        let sends_request = match settings.kind {
            HealthCheckKind::None => return None,
            HealthCheckKind::Tcp => false,
            HealthCheckKind::Http => true,
        };
        let probes = routes
            .iter()
            .map(|(addr, route)| {
                let mut peer = route.peer.clone();
                peer.options.connection_timeout = Some(settings.timeout.0);
                peer.options.total_connection_timeout = Some(settings.timeout.0);
                peer.options.read_timeout = Some(settings.timeout.0);
                peer.options.write_timeout = Some(settings.timeout.0);
                let check = if sends_request {
                    Check::Request {
                        request: Box::new(health_request(config, route)),
                        expected_status: settings.expected_status,
                    }
                } else {
                    Check::Connect
                };
                let state = route.state.clone();
                (*addr, Probe { peer, check, state })
            })
            .collect();
        Some(BackendHealth {
            probes,
            connector: TransportConnector::new(None),
            rise: settings.rise,
            fall: settings.fall,
            changed,
        })
    }
}

/// `GET {path}` with the configured Host, else the backend's Host override, else its address.
fn health_request(config: &Config, route: &Route) -> RequestHeader {
    let settings = &config.health_check;
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
    let mut request = RequestHeader::build("GET", settings.path.as_bytes(), None)
        .expect("the path was validated with the configuration");
    request
        .insert_header(http::header::HOST, host)
        .expect("a host name is a valid header value");
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
