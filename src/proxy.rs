//! The HTTP proxy: routes each request to a pool, picks a backend there, fails over on
//! connect errors, applies the route's limits and header rules, feeds passive health, and
//! closes client connections cleanly while the process drains.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use log::{info, warn};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::modules::http::HttpModules;
use pingora::protocols::l4::socket::SocketAddr as PingoraAddr;
use pingora::protocols::tls::SslDigest;
use pingora::proxy::{FailToProxy, ProxyHttp, ProxyWarnLogContext, Session};
use pingora::upstreams::peer::{HttpPeer, Peer};
use pingora::{Error, ErrorSource, ErrorType, Result, RetryType};

use crate::access_log::{AccessLog, Entry, TlsFacts};
use crate::config::{ClientLimits, Forwarding, HashKey};
use crate::header_edits::EditHeaders;
use crate::metrics::Metrics;
use crate::redirect::{self, HttpsRedirect};
use crate::request_rules;
use crate::routing::{self, RequestTarget, Route, RouteId, Router};
use crate::tls::ServerName;
use crate::traffic::{InFlight, Traffic};
use crate::upstreams::health::InFlightRequest;
use crate::upstreams::{BackendId, Destination, Pool, Pools};

/// How many times one request is sent again over a new connection after a kept-alive one
/// turned out closed by the backend.
pub const MAX_STALE_RETRIES: usize = 2;

/// Per-request state.
pub struct RequestContext {
    /// The route the request matched, once its header is parsed.
    route: Option<RouteId>,
    /// Backends of the route's pool tried so far, the current one last.
    tried: Vec<BackendId>,
    /// Counts the request against the current backend, for least connections.
    backend_load: Option<InFlightRequest>,
    started: Instant,
    /// When the current backend was chosen.
    upstream_started: Option<Instant>,
    /// From choosing the backend to its response header.
    upstream_time: Option<Duration>,
    /// The request asks to upgrade its connection (WebSocket): it becomes a tunnel, idle
    /// for at most `client.tunnel_timeout`.
    upgrade: bool,
    /// Whether this request goes to the access log.
    logged: bool,
    /// How many of the tries so far failed to connect and were reported by
    /// [Balancer::fail_to_connect].
    connect_failures_reported: usize,
    /// The next try goes to the backend just tried (its kept-alive connection was stale).
    retry_same_backend: bool,
    stale_retries: usize,
    /// No route took the request: its connection may carry the next request (on the fast
    /// path too, which hands such a request over).
    unrouted: bool,
    /// What to answer when no backend is left: 504 after a timeout, else 502.
    failure_status: u16,
    /// The request came to a listener that answers with a redirect to HTTPS.
    redirect_to_https: bool,
    _in_flight: InFlight,
}

/// Put on a connection before each request; pingora hands it to
/// [ProxyHttp::on_connection_reuse] as soon as the request header is parsed, and the
/// proxy's implementation sets it, which ends the header deadline.
pub struct HeaderParsed(pub Arc<AtomicBool>);

/// pingora counts keep-alive in whole seconds, and 0 means "forever": round up.
pub fn keepalive_seconds(timeout: Duration) -> u64 {
    timeout.as_secs() + u64::from(timeout.subsec_nanos() > 0)
}

/// The load balancer's [ProxyHttp] implementation: pingora-proxy calls it for every
/// request.
#[derive(Clone)]
pub struct Balancer {
    pub pools: Arc<Pools>,
    pub router: Arc<Router>,
    /// The answer to a request no route matches.
    pub no_route_status: u16,
    pub traffic: Arc<Traffic>,
    pub forwarding: Forwarding,
    pub metrics: Arc<Metrics>,
    pub access_log: Option<Arc<AccessLog>>,
    pub client: ClientLimits,
    pub https_redirect: Option<HttpsRedirect>,
}

/// The status for a request whose backend failed: 504 when it timed out, else 502.
fn upstream_failure_status(e: &Error) -> u16 {
    match e.etype() {
        ErrorType::ConnectTimedout
        | ErrorType::TLSHandshakeTimedout
        | ErrorType::ReadTimedout
        | ErrorType::WriteTimedout => 504,
        _ => 502,
    }
}

/// The bytes consistent hashing hashes for a request from `client` for `path`;
/// `header` looks up a request header's value.
pub fn hash_input<'a>(
    key: &HashKey,
    client: Option<SocketAddr>,
    path: &'a [u8],
    header: impl Fn(&str) -> Option<&'a [u8]>,
    client_ip: &'a mut [u8; 16],
) -> &'a [u8] {
    match key {
        HashKey::ClientIp => match client {
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
        HashKey::Path => path,
        HashKey::Header(name) => header(name.as_str()).unwrap_or(&[]),
    }
}

/// A request that ended, on either path, for metrics and the access log.
pub struct Done<'a> {
    /// 0: the client went away before any response.
    pub status: u16,
    pub total: Duration,
    pub upstream_time: Option<Duration>,
    pub route: Option<&'a Route>,
    /// The backend tried last.
    pub destination: Option<&'a Destination>,
    /// Its access log line, when it is logged.
    pub entry: Option<Entry>,
}

impl Balancer {
    /// Whether a rule looks at the address a request arrived at (a route's `listeners`, a
    /// listener's `redirect_to_https`): reading it costs a system call per connection.
    pub fn compares_listeners(&self) -> bool {
        self.https_redirect.is_some() || self.router.compares_listeners()
    }

    /// The edits of a request on its way to `destination`, on either path: forwarding
    /// headers naming `client` (`tls`: it came over HTTPS; `host`: the host it asked
    /// for), the backend's `Host`, the route's header rules.
    pub fn edit_upstream_request(
        &self,
        client: Option<IpAddr>,
        tls: bool,
        host: Option<&str>,
        destination: &Destination,
        route: &Route,
        request: &mut impl EditHeaders,
    ) -> Result<()> {
        if self.forwarding.enabled() {
            self.forwarding.apply(client, tls, host, request)?;
        }
        if let Some(host) = &destination.host {
            request.set(http::header::HOST, host.clone())?;
        }
        routing::apply(&route.request_headers, request)
    }

    /// Counts a request that ended, and logs it.
    pub fn request_done(&self, done: Done<'_>) {
        if done.status != 0 {
            let metrics = done.destination.map(|d| &d.metrics);
            self.metrics
                .request_done(metrics, done.status, done.total, done.upstream_time);
            if let Some(route) = done.route {
                route.metrics.observe(done.status);
            }
        }
        if let (Some(access_log), Some(entry)) = (&self.access_log, done.entry) {
            access_log.record(entry);
        }
    }

    /// The route the request matched.
    fn route(&self, ctx: &RequestContext) -> Option<&Route> {
        ctx.route.map(|id| self.router.get(id))
    }

    /// The pool of the request's route.
    fn pool(&self, ctx: &RequestContext) -> Option<&Pool> {
        self.route(ctx).map(|route| self.pools.get(route.pool))
    }

    /// The backend the request went to last, and its pool.
    fn chosen(&self, ctx: &RequestContext) -> Option<(&Pool, BackendId)> {
        Some((self.pool(ctx)?, *ctx.tried.last()?))
    }

    /// How the backend the request went to last is reached.
    fn destination(&self, ctx: &RequestContext) -> Option<&Destination> {
        self.chosen(ctx).map(|(pool, id)| pool.destination(id))
    }

    /// Picks the request's route, and refuses a body its route does not accept.
    fn route_request(&self, session: &Session, ctx: &mut RequestContext) -> Result<()> {
        let request = session.req_header();
        let host = host_of(request);
        let target = RequestTarget {
            host: host.as_deref(),
            path: request.uri.path(),
            local: match self.router.compares_listeners() {
                true => listener_address(session),
                false => None,
            },
        };
        let Some(id) = self.router.route(&target) else {
            ctx.unrouted = true;
            return Error::e_explain(
                ErrorType::HTTPStatus(self.no_route_status),
                "no route matches the request",
            );
        };
        ctx.route = Some(id);
        let declared = request
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        match (self.router.get(id).max_body_size, declared) {
            (Some(max), Some(length)) if length > max => body_too_large(max),
            _ => Ok(()),
        }
    }
}

/// The client's address of a session over TCP, after any PROXY header.
fn client_address(session: &Session) -> Option<SocketAddr> {
    session
        .client_addr()
        .and_then(PingoraAddr::as_inet)
        .copied()
}

/// The listener's address of a session over TCP: a system call the first time it is read
/// on a connection, so read only where a rule compares it.
fn listener_address(session: &Session) -> Option<SocketAddr> {
    session
        .server_addr()
        .and_then(PingoraAddr::as_inet)
        .copied()
}

/// The host a request names, as routes compare it.
fn host_of(request: &RequestHeader) -> Option<String> {
    routing::request_host(
        request
            .headers
            .get(http::header::HOST)
            .map(|v| v.as_bytes()),
        request.uri.authority().map(|a| a.as_str()),
    )
    .map(|host| host.into_owned())
}

/// 413, as nginx answers a body over `client_max_body_size`.
fn body_too_large<T>(max: u64) -> Result<T> {
    Err(Error::explain(
        ErrorType::HTTPStatus(413),
        format!("the request body is larger than the route's max_body_size ({max} bytes)"),
    )
    .into_down())
}

#[async_trait]
impl ProxyHttp for Balancer {
    type CTX = RequestContext;

    /// No downstream modules: pingora's default adds a (disabled) compression module that
    /// still runs on every request.
    fn init_downstream_modules(&self, _modules: &mut HttpModules) {}

    fn new_ctx(&self) -> RequestContext {
        RequestContext {
            route: None,
            tried: Vec::new(),
            backend_load: None,
            upgrade: false,
            started: Instant::now(),
            upstream_started: None,
            upstream_time: None,
            logged: self.access_log.as_ref().is_some_and(|log| log.sample()),
            connect_failures_reported: 0,
            retry_same_backend: false,
            stale_retries: 0,
            failure_status: 502,
            unrouted: false,
            redirect_to_https: false,
            _in_flight: InFlight::new(&self.traffic),
        }
    }

    /// Ends the header deadline of [ClientConnections](crate::client_connections).
    fn on_connection_reuse(
        &self,
        _session: &mut Session,
        _ctx: &mut RequestContext,
        previous: Box<dyn std::any::Any + Send + Sync>,
    ) {
        if let Ok(parsed) = previous.downcast::<HeaderParsed>() {
            parsed.0.store(true, Ordering::Release);
        }
    }

    /// Runs once the request header is parsed, before anything is forwarded: the client
    /// limits of this request and of the connection's next one, and the rules of
    /// [request_rules].
    async fn early_request_filter(
        &self,
        session: &mut Session,
        ctx: &mut RequestContext,
    ) -> Result<()> {
        // Requests sent before the previous response are answered in order instead of
        // closing the connection (pingora's default) and losing them.
        session.set_pipelining_enabled(true);
        // pingora sets "keep alive forever" after each parsed header; `None` (the client
        // or pingora asked to close) must stay.
        if session.get_keepalive().is_some() {
            session.set_keepalive(Some(keepalive_seconds(self.client.keepalive_timeout.0)));
        }
        ctx.upgrade = session.is_upgrade_req();
        let (read, write) = match ctx.upgrade {
            true => (self.client.tunnel_timeout.0, self.client.tunnel_timeout.0),
            false => (self.client.body_timeout.0, self.client.send_timeout.0),
        };
        session.set_read_timeout(Some(read));
        session.set_write_timeout(Some(write));
        let header_bytes = session
            .as_http1()
            .map_or(0, |h1| h1.get_headers_raw_bytes().len());
        request_rules::check(session.req_header(), header_bytes, &self.client).map_err(
            |rejection| {
                Error::explain(
                    ErrorType::HTTPStatus(rejection.status.as_u16()),
                    rejection.reason,
                )
                .into_down()
            },
        )?;
        if let Some(redirect) = &self.https_redirect {
            if redirect.applies(listener_address(session), session.req_header().uri.path()) {
                ctx.redirect_to_https = true;
                return Ok(());
            }
        }
        self.route_request(session, ctx)
    }

    /// Answers the requests of a listener with `redirect_to_https`.
    async fn request_filter(
        &self,
        session: &mut Session,
        ctx: &mut RequestContext,
    ) -> Result<bool> {
        let Some(redirect) = self
            .https_redirect
            .as_ref()
            .filter(|_| ctx.redirect_to_https)
        else {
            return Ok(false);
        };
        let request = session.req_header();
        let host = host_of(request);
        let path = request.uri.path_and_query().map_or("/", |p| p.as_str());
        let Some(location) = redirect.location(host.as_deref(), path) else {
            return Error::e_explain(
                ErrorType::HTTPStatus(400),
                "a redirect to HTTPS needs a host name and a path",
            );
        };
        let mut response = ResponseHeader::build(redirect::status(&request.method), Some(3))?;
        response.insert_header(http::header::LOCATION, location)?;
        response.insert_header(http::header::CONTENT_LENGTH, "0")?;
        session
            .write_response_header(Box::new(response), true)
            .await?;
        Ok(true)
    }

    /// Counts what pingora has read of the body (not what this filter saw: it runs again
    /// when a request is retried), against the route's limit.
    async fn request_body_filter(
        &self,
        session: &mut Session,
        _body: &mut Option<bytes::Bytes>,
        _end_of_stream: bool,
        ctx: &mut RequestContext,
    ) -> Result<()> {
        match self.route(ctx).and_then(|r| r.max_body_size) {
            Some(max) if session.body_bytes_read() as u64 > max => body_too_large(max),
            _ => Ok(()),
        }
    }

    async fn upstream_peer(
        &self,
        session: &mut Session,
        ctx: &mut RequestContext,
    ) -> Result<Box<HttpPeer>> {
        let route = self
            .route(ctx)
            .ok_or_else(|| Error::explain(ErrorType::InternalError, "a request without a route"))?;
        let pool = self.pools.get(route.pool);
        let mut client_ip = [0u8; 16];
        let key = match pool.hash_key() {
            Some(key) => {
                let request = session.req_header();
                hash_input(
                    key,
                    client_address(session),
                    request.uri.path().as_bytes(),
                    |name| request.headers.get(name).map(|v| v.as_bytes()),
                    &mut client_ip,
                )
            }
            None => &[],
        };
        let same_again = std::mem::take(&mut ctx.retry_same_backend);
        let selected = match ctx.tried.last() {
            Some(&last) if same_again => Some(last),
            _ => pool.select(key, &ctx.tried),
        };
        let Some(id) = selected else {
            // Like nginx: 503 when no backend is in rotation, 502 (or 504 after a timeout)
            // when those tried failed.
            return if ctx.tried.is_empty() {
                Error::e_explain(ErrorType::HTTPStatus(503), "no healthy backend")
            } else {
                Error::e_explain(
                    ErrorType::HTTPStatus(ctx.failure_status),
                    "every backend tried failed",
                )
            };
        };
        if !same_again {
            ctx.tried.push(id);
        }
        ctx.upstream_started = Some(Instant::now());
        ctx.backend_load = Some(pool.destination(id).state.start_request());
        let mut peer = pool.peer(id, client_address(session), || listener_address(session));
        if let Some(timeout) = route.connect_timeout {
            peer.options.connection_timeout = Some(timeout);
            peer.options.total_connection_timeout = Some(timeout);
        }
        let read_timeout = match ctx.upgrade {
            true => Some(self.client.tunnel_timeout.0),
            false => route.read_timeout,
        };
        if let Some(timeout) = read_timeout {
            peer.options.read_timeout = Some(timeout);
            peer.options.write_timeout = Some(timeout);
        }
        Ok(peer)
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut RequestContext,
    ) -> Result<()> {
        let (Some(route), Some(destination)) = (self.route(ctx), self.destination(ctx)) else {
            return Ok(());
        };
        let client = client_address(session).map(|a| a.ip());
        let tls = session
            .digest()
            .is_some_and(|digest| digest.ssl_digest.is_some());
        let host = upstream_request
            .headers
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| upstream_request.uri.host())
            .map(str::to_owned);
        self.edit_upstream_request(
            client,
            tls,
            host.as_deref(),
            destination,
            route,
            upstream_request,
        )
    }

    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestContext,
    ) -> Result<()> {
        let status = upstream_response.status;
        // An informational response comes before the one the upstream time and passive
        // health are about, as on the fast path; a 101 is the last the backend sends.
        if status.is_informational() && status != http::StatusCode::SWITCHING_PROTOCOLS {
            return Ok(());
        }
        ctx.upstream_time = ctx.upstream_started.map(|t| t.elapsed());
        if let Some((pool, id)) = self.chosen(ctx) {
            pool.response_received(id, status.as_u16());
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestContext,
    ) -> Result<()> {
        if let Some(route) = self.route(ctx) {
            routing::apply(&route.response_headers, upstream_response)?;
        }
        // An informational response neither keeps nor closes the connection: the final one does.
        if self.traffic.draining() && !upstream_response.status.is_informational() {
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
        let retries = match self.chosen(ctx) {
            Some((pool, id)) => {
                pool.destination(id).metrics.connect_failed();
                pool.request_failed(id);
                pool.retries
            }
            None => 0,
        };
        ctx.failure_status = upstream_failure_status(&e);
        if ctx.tried.len() <= retries {
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

    /// A kept-alive connection the backend had already closed (it closes idle connections
    /// on its own clock) fails before any byte of the response: the request is sent again,
    /// over a new connection, to the same backend, whatever its method, as nginx and HAProxy
    /// do. Any other failure after the request went out is not replayed: the backend may
    /// have acted on it.
    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        mut e: Box<Error>,
        ctx: &mut RequestContext,
        client_reused: bool,
    ) -> Box<Error> {
        ctx.failure_status = upstream_failure_status(&e);
        let closed_before_answering = match e.retry {
            RetryType::ReusedOnly => e
                .context
                .as_ref()
                .is_some_and(|c| c.as_str().ends_with("bytes already read: 0")),
            RetryType::Decided(_) => e.etype == ErrorType::WriteError,
        };
        let stale = client_reused
            && closed_before_answering
            && e.esource == ErrorSource::Upstream
            && !session.as_ref().retry_buffer_truncated()
            && ctx.stale_retries < MAX_STALE_RETRIES;
        e.set_retry(stale);
        if e.esource == ErrorSource::Upstream && !stale {
            if let Some((pool, id)) = self.chosen(ctx) {
                pool.request_failed(id);
            }
        }
        if stale {
            info!(
                "backend {} had closed a kept-alive connection; sending the request again",
                peer.address()
            );
            ctx.stale_retries += 1;
            ctx.retry_same_backend = true;
        }
        e.more_context(format!("Peer: {peer}"))
    }

    /// pingora's answer to a failed request, except that a backend timeout is 504 (pingora
    /// says 502 for every backend failure) and a client too slow to send its body is 408.
    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestContext,
    ) -> FailToProxy {
        let code = match (e.etype(), e.esource()) {
            (ErrorType::HTTPStatus(code), _) => *code,
            (_, ErrorSource::Upstream) => upstream_failure_status(e),
            (
                ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed,
                ErrorSource::Downstream,
            ) => 0,
            (ErrorType::ReadTimedout, ErrorSource::Downstream) => 408,
            (_, ErrorSource::Downstream) => 400,
            (_, ErrorSource::Internal | ErrorSource::Unset) => 500,
        };
        // As nginx and HAProxy do after a 404, a connection whose request no route took,
        // and had no body left unread, stays open. Every other failure closes it (pingora's
        // `respond_error` says so).
        let keep = code > 0 && ctx.unrouted && session.is_body_done() && !self.traffic.draining();
        let answered = match (code, keep) {
            (0, _) => Ok(()),
            (_, true) => {
                let response = pingora::protocols::http::ServerSession::generate_error(code);
                session
                    .write_response_header(Box::new(response), true)
                    .await
            }
            (_, false) => session.respond_error(code).await,
        };
        if let Err(error) = &answered {
            info!("cannot send the error response to the client: {error}");
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: keep && answered.is_ok(),
        }
    }

    /// pingora warns about every retried try; a connect failure or a stale kept-alive
    /// connection was already reported, in operator's words, by [Self::fail_to_connect] or
    /// [Self::error_while_proxy].
    fn suppress_proxy_warn_log(
        &self,
        _session: &Session,
        ctx: &RequestContext,
        _error: &Error,
        context: ProxyWarnLogContext,
    ) -> bool {
        matches!(context, ProxyWarnLogContext::UpstreamRetry)
            && (ctx.connect_failures_reported == ctx.tried.len() || ctx.retry_same_backend)
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
        let destination = self.destination(ctx);
        let entry = ctx.logged.then(|| {
            let request = session.req_header();
            let header = |name: http::header::HeaderName| {
                request
                    .headers
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(String::from)
            };
            Entry {
                time: SystemTime::now() - total,
                client: client_address(session),
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
                upstream: destination.map(|d| d.name().to_string()),
                total,
                upstream_time: ctx.upstream_time,
                retries: ctx.tried.len().saturating_sub(1),
                tls: session
                    .digest()
                    .and_then(|d| d.ssl_digest.as_deref())
                    .map(tls_facts),
            }
        });
        self.request_done(Done {
            status,
            total,
            upstream_time: ctx.upstream_time,
            route: self.route(ctx),
            destination,
            entry,
        });
    }
}

/// The TLS of a client connection, for the access log.
pub fn tls_facts(ssl: &SslDigest) -> TlsFacts {
    let server_name = ssl
        .extension
        .get::<ServerName>()
        .and_then(|name| name.0.clone());
    TlsFacts {
        version: ssl.version.clone(),
        cipher: ssl.cipher.clone(),
        server_name,
    }
}
