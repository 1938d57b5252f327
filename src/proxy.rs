//! The HTTP proxy: picks a backend per request, fails over on connect errors, rewrites the
//! Host header, and closes client connections cleanly while the process drains.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use log::{info, warn};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::modules::http::HttpModules;
use pingora::protocols::l4::socket::SocketAddr as PingoraAddr;
use pingora::proxy::{ProxyHttp, ProxyWarnLogContext, Session};
use pingora::upstreams::peer::{HttpPeer, Peer};
use pingora::{Error, ErrorSource, ErrorType, Result};

use crate::access_log::{AccessLog, Entry};
use crate::config::{Forwarding, HashKey};
use crate::metrics::Metrics;
use crate::upstreams::Upstreams;

/// Requests in flight and whether the process is draining; shared with the shutdown path.
#[derive(Default)]
pub struct Traffic {
    in_flight: AtomicUsize,
    started: AtomicUsize,
    draining: AtomicBool,
}

impl Traffic {
    /// Requests that have started and not finished.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Requests started since the process started (wrapping).
    pub fn started(&self) -> usize {
        self.started.load(Ordering::Acquire)
    }

    /// From now on every response closes its connection, so clients reconnect (to the
    /// new process, after a handoff) instead of finding their idle connection closed.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }
}

/// Counts a request as in flight for as long as its context lives.
pub struct InFlight(Arc<Traffic>);

impl InFlight {
    fn new(traffic: &Arc<Traffic>) -> Self {
        traffic.in_flight.fetch_add(1, Ordering::AcqRel);
        traffic.started.fetch_add(1, Ordering::Release);
        InFlight(traffic.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Per-request state.
pub struct RequestContext {
    /// Backends tried so far, the current one last.
    tried: Vec<SocketAddr>,
    started: Instant,
    /// When the current backend was chosen.
    upstream_started: Option<Instant>,
    /// From choosing the backend to its response header.
    upstream_time: Option<Duration>,
    /// Whether this request goes to the access log.
    logged: bool,
    /// How many of the tries so far failed to connect and were reported by
    /// [LoadBalancer::fail_to_connect].
    connect_failures_reported: usize,
    _in_flight: InFlight,
}

/// The load balancer's [ProxyHttp] implementation.
pub struct LoadBalancer {
    pub upstreams: Arc<Upstreams>,
    pub retries: usize,
    pub traffic: Arc<Traffic>,
    pub forwarding: Forwarding,
    pub metrics: Arc<Metrics>,
    pub access_log: Option<Arc<AccessLog>>,
}

/// The bytes consistent hashing hashes for this request.
fn hash_input<'a>(key: &HashKey, session: &'a Session, client_ip: &'a mut [u8; 16]) -> &'a [u8] {
    match key {
        HashKey::ClientIp => match session.client_addr().and_then(PingoraAddr::as_inet) {
            Some(SocketAddr::V4(v4)) => {
                client_ip[..4].copy_from_slice(&v4.ip().octets());
                &client_ip[..4]
            }
            Some(SocketAddr::V6(v6)) => {
                client_ip.copy_from_slice(&v6.ip().octets());
                &client_ip[..]
            }
            None => &[],
        },
        HashKey::Path => session.req_header().uri.path().as_bytes(),
        HashKey::Header(name) => session
            .req_header()
            .headers
            .get(name.as_str())
            .map_or(&[][..], |v| v.as_bytes()),
    }
}

#[async_trait]
impl ProxyHttp for LoadBalancer {
    type CTX = RequestContext;

    /// No downstream modules: pingora's default adds a (disabled) compression module that
    /// still runs on every request.
    fn init_downstream_modules(&self, _modules: &mut HttpModules) {}

    fn new_ctx(&self) -> RequestContext {
        RequestContext {
            tried: Vec::new(),
            started: Instant::now(),
            upstream_started: None,
            upstream_time: None,
            logged: self.access_log.as_ref().is_some_and(|log| log.sample()),
            connect_failures_reported: 0,
            _in_flight: InFlight::new(&self.traffic),
        }
    }

    async fn upstream_peer(
        &self,
        session: &mut Session,
        ctx: &mut RequestContext,
    ) -> Result<Box<HttpPeer>> {
        let mut client_ip = [0u8; 16];
        let key = match self.upstreams.hash_key() {
            Some(key) => hash_input(key, session, &mut client_ip),
            None => &[],
        };
        let Some(addr) = self.upstreams.select(key, &ctx.tried) else {
            // Like nginx: 503 when no backend is in rotation, 502 when those tried failed.
            return if ctx.tried.is_empty() {
                Error::e_explain(ErrorType::HTTPStatus(503), "no healthy backend")
            } else {
                Error::e_explain(ErrorType::HTTPStatus(502), "every backend tried failed")
            };
        };
        ctx.tried.push(addr);
        ctx.upstream_started = Some(Instant::now());
        let route = self.upstreams.route(&addr).ok_or_else(|| {
            Error::explain(ErrorType::InternalError, "selected an unknown backend")
        })?;
        Ok(Box::new(route.peer.clone()))
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut RequestContext,
    ) -> Result<()> {
        if self.forwarding.enabled() {
            let client = session
                .client_addr()
                .and_then(PingoraAddr::as_inet)
                .map(|a| a.ip());
            self.forwarding.apply(client, upstream_request)?;
        }
        let host = ctx
            .tried
            .last()
            .and_then(|addr| self.upstreams.route(addr))
            .and_then(|route| route.host.clone());
        if let Some(host) = host {
            upstream_request.insert_header(http::header::HOST, host)?;
        }
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        _upstream_response: &mut ResponseHeader,
        ctx: &mut RequestContext,
    ) -> Result<()> {
        ctx.upstream_time = ctx.upstream_started.map(|t| t.elapsed());
        Ok(())
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        _ctx: &mut RequestContext,
    ) -> Result<()> {
        if self.traffic.draining() {
            session.set_keepalive(None);
            upstream_response.insert_header(http::header::CONNECTION, "close")?;
        }
        Ok(())
    }

    /// Nothing has been sent to a backend that refused or timed out on connect, so any
    /// request, idempotent or not, can go to another one (bounded by `retries`).
    fn fail_to_connect(
        &self,
        _session: &mut Session,
        peer: &HttpPeer,
        ctx: &mut RequestContext,
        mut e: Box<Error>,
    ) -> Box<Error> {
        if let Some(route) = ctx.tried.last().and_then(|addr| self.upstreams.route(addr)) {
            route.metrics.connect_failed();
        }
        if ctx.tried.len() <= self.retries {
            warn!(
                "cannot connect to backend {}: {e}; trying another backend",
                peer.address()
            );
            ctx.connect_failures_reported = ctx.tried.len();
            self.metrics.retried();
            e.set_retry(true);
        }
        e
    }

    /// pingora warns about every retried try; a connect failure was already reported, in
    /// operator's words, by [Self::fail_to_connect]. Other retried failures (such as a
    /// pooled connection the backend had closed) keep pingora's warning.
    fn suppress_proxy_warn_log(
        &self,
        _session: &Session,
        ctx: &RequestContext,
        _error: &Error,
        context: ProxyWarnLogContext,
    ) -> bool {
        matches!(context, ProxyWarnLogContext::UpstreamRetry)
            && ctx.connect_failures_reported == ctx.tried.len()
    }

    /// A client that goes away or sends a bad request is routine, not an error of the
    /// load balancer: like nginx, it is logged at `info`, so that the error log at its
    /// default level shows what the operator must look at.
    fn suppress_error_log(&self, session: &Session, ctx: &RequestContext, error: &Error) -> bool {
        if *error.esource() != ErrorSource::Downstream {
            return false;
        }
        info!(
            "client request failed: {error}, {}",
            self.request_summary(session, ctx)
        );
        true
    }

    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut RequestContext) {
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let total = ctx.started.elapsed();
        let route = ctx.tried.last().and_then(|addr| self.upstreams.route(addr));
        // 0: the client went away before any response.
        if status != 0 {
            self.metrics
                .request_done(route.map(|r| &r.metrics), status, total, ctx.upstream_time);
        }
        if !ctx.logged {
            return;
        }
        let Some(access_log) = &self.access_log else {
            return;
        };
        let request = session.req_header();
        let header = |name: http::header::HeaderName| {
            request
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(String::from)
        };
        access_log.record(Entry {
            time: SystemTime::now() - total,
            client: session
                .client_addr()
                .and_then(PingoraAddr::as_inet)
                .copied(),
            method: request.method.clone(),
            target: request
                .uri
                .path_and_query()
                .map_or_else(|| request.uri.path().to_string(), |p| p.to_string()),
            version: request.version,
            status,
            bytes: session.body_bytes_sent(),
            referer: header(http::header::REFERER),
            user_agent: header(http::header::USER_AGENT),
            upstream: route.map(|r| r.name.clone()),
            total,
            upstream_time: ctx.upstream_time,
            retries: ctx.tried.len().saturating_sub(1),
        });
    }
}
