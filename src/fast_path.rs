//! The fast path: the common HTTP/1.1 request, forwarded as bytes.
//!
//! pingora-proxy spends most of a request's CPU on machinery a load balancer in front of
//! HTTP/1 backends does not need (a header map per message, a task and a lock per pooled
//! backend connection, channels between the two sides). This path serves a client
//! connection's requests itself when their framing leaves nothing to interpret: HTTP/1.1,
//! a common method, an origin-form target, one `Host`, no body or one `Content-Length`,
//! no `Transfer-Encoding`, `Upgrade`, `Expect` or hop-by-hop header beyond
//! `Connection: keep-alive|close`, text-only header values, within the client limits. It
//! forwards each over a backend connection of its own for the exchange, taken from the
//! worker thread's idle ones (`idle_backends`) and put back there after it.
//!
//! Anything else (and a request whose route, pool or listener needs what only the proxy
//! path does: no route, a redirect to HTTPS, a body over the route's limit, backends over
//! TLS, HTTP/2 or with a PROXY header) is handed, with every byte already read, to
//! pingora-proxy, which serves the connection from then on. Decisions both paths take
//! (route, backend, forwarding headers, header rules, passive health, metrics, access log)
//! are made by the same code in [Balancer](crate::proxy::Balancer).
//!
//! Response framing is checked as strictly: a backend response with `Transfer-Encoding`
//! other than a lone `chunked`, both `Transfer-Encoding` and `Content-Length`, or an
//! invalid or repeated `Content-Length`, is a backend failure (502), never forwarded.

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

use bytes::{Buf, BytesMut};
use pingora::protocols::Stream;
use pingora::server::ShutdownWatch;
use pingora::upstreams::peer::Peer;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::access_log::Entry;
use crate::config::ClientLimits;
use crate::header_edits::{visible_ascii, Fields};
use crate::proxy::{tls_facts, Balancer, Done, MAX_STALE_RETRIES};
use crate::request_rules::{self, RequestShape};
use crate::routing::{self, RequestTarget, Route};
use crate::upstreams::{BackendId, Destination, Pool};
use idle_backends::BackendConnection;

/// Most header fields the fast path parses; a request with more goes to pingora.
const MAX_FIELDS: usize = 128;
/// Largest response header accepted from a backend.
const MAX_RESPONSE_HEADER: usize = 64 * 1024;
/// How long an idle backend connection is kept when its pool sets no `timeouts.idle`.
const DEFAULT_IDLE: Duration = Duration::from_secs(60);
/// Read size for headers and bodies.
const READ_SIZE: usize = 8 * 1024;

/// Methods served here; others (CONNECT above all) take the proxy path.
const METHODS: [&str; 7] = ["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"];

/// How a client connection the fast path served ended.
pub enum Outcome {
    Closed,
    /// A request the fast path does not serve: pingora-proxy continues the connection,
    /// parsing `read` first, with the request header due by `header_deadline`, and
    /// `served` requests of the connection's `client.keepalive_requests` already served.
    HandOver {
        stream: Stream,
        read: BytesMut,
        header_deadline: Instant,
        served: u32,
    },
}

/// The fast path of one balancer.
pub struct FastPath {
    balancer: Balancer,
}

/// Where a header field of the request is, in the bytes read.
#[derive(Clone, Copy)]
struct FieldAt {
    name: (usize, usize),
    value: (usize, usize),
}

/// A request header the fast path serves, parsed.
struct Head {
    /// Its size in bytes, request line included.
    len: usize,
    method: (usize, usize),
    target: (usize, usize),
    fields: Vec<FieldAt>,
    /// Index in `fields` of `Host`.
    host: usize,
    content_length: u64,
    /// The client asked to close the connection after this request.
    close: bool,
    head: bool,
}

impl Head {
    /// The value of the first field named `name`.
    fn field<'b>(&self, buf: &'b [u8], name: &[u8]) -> Option<&'b [u8]> {
        self.fields
            .iter()
            .find(|f| at(buf, f.name).eq_ignore_ascii_case(name))
            .map(|f| at(buf, f.value))
    }
}

enum Parse {
    Partial,
    /// Complete, and for the fast path.
    Fast(Head),
    /// Anything else, for pingora-proxy.
    Other,
}

/// The bytes of `range` in `buf`.
fn at(buf: &[u8], (start, end): (usize, usize)) -> &[u8] {
    &buf[start..end]
}

fn offsets(buf: &[u8], part: &[u8]) -> (usize, usize) {
    let start = part.as_ptr() as usize - buf.as_ptr() as usize;
    (start, start + part.len())
}

/// A request-target the fast path forwards as received: origin-form, only characters
/// RFC 3986 allows in a path and query.
fn plain_target(target: &[u8]) -> bool {
    target.first() == Some(&b'/')
        && target
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/?%".contains(&b))
}

/// Whether every comma-separated token of a `Connection` value is `keep-alive` or
/// `close`; the second: whether one is `close`.
fn connection_tokens(value: &[u8]) -> Option<bool> {
    let mut close = false;
    for token in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
        if token.eq_ignore_ascii_case(b"close") {
            close = true;
        } else if !token.eq_ignore_ascii_case(b"keep-alive") {
            return None;
        }
    }
    Some(close)
}

/// A `Content-Length` value: digits only, no sign, no list, no overflow.
fn content_length(value: &[u8]) -> Option<u64> {
    if value.is_empty() || value.len() > 18 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    // 18 digits cannot overflow a u64.
    Some(
        value
            .iter()
            .fold(0, |n, digit| n * 10 + u64::from(digit - b'0')),
    )
}

/// Header fields the fast path does not forward: hop-by-hop, as pingora-proxy strips them.
const HOP_BY_HOP: [&[u8]; 5] = [
    b"connection",
    b"keep-alive",
    b"proxy-connection",
    b"proxy-authenticate",
    b"proxy-authorization",
];

/// Header fields that send a request to the proxy path.
const OTHER_PATH: [&[u8]; 6] = [
    b"transfer-encoding",
    b"te",
    b"trailer",
    b"upgrade",
    b"http2-settings",
    b"expect",
];

/// Parses a request header and tells whether the fast path serves it.
fn parse_request(buf: &[u8], limits: &ClientLimits, fields: Vec<FieldAt>) -> Parse {
    let mut headers = [httparse::EMPTY_HEADER; MAX_FIELDS];
    let mut request = httparse::Request::new(&mut headers);
    let len = match request.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Parse::Partial,
        Err(_) => return Parse::Other,
    };
    let (Some(method), Some(target), Some(1)) = (request.method, request.path, request.version)
    else {
        return Parse::Other;
    };
    if !METHODS.contains(&method) || !plain_target(target.as_bytes()) {
        return Parse::Other;
    }
    let mut head = Head {
        len,
        method: offsets(buf, method.as_bytes()),
        target: offsets(buf, target.as_bytes()),
        fields,
        host: usize::MAX,
        content_length: 0,
        close: false,
        head: method == "HEAD",
    };
    head.fields.clear();
    let mut lengths = 0;
    for field in request.headers.iter() {
        let name = field.name.as_bytes();
        if visible_ascii(field.value).is_none()
            || OTHER_PATH.iter().any(|n| name.eq_ignore_ascii_case(n))
        {
            return Parse::Other;
        }
        if name.eq_ignore_ascii_case(b"host") {
            if head.host != usize::MAX || field.value.is_empty() {
                return Parse::Other;
            }
            head.host = head.fields.len();
        } else if name.eq_ignore_ascii_case(b"content-length") {
            lengths += 1;
            match content_length(field.value) {
                Some(length) => head.content_length = length,
                None => return Parse::Other,
            }
        } else if name.eq_ignore_ascii_case(b"connection") {
            match connection_tokens(field.value) {
                Some(close) => head.close |= close,
                None => return Parse::Other,
            }
        }
        head.fields.push(FieldAt {
            name: offsets(buf, name),
            value: offsets(buf, field.value),
        });
    }
    let shape = RequestShape {
        target_length: target.len(),
        header_bytes: len,
        header_count: head.fields.len(),
        without_host: head.host == usize::MAX,
        content_lengths: lengths,
        content_length_list: false,
    };
    match request_rules::check_shape(&shape, limits) {
        Ok(()) => Parse::Fast(head),
        Err(_) => Parse::Other,
    }
}

/// One client connection on the fast path.
struct Connection {
    client: Stream,
    /// Read from the client and not yet forwarded.
    read: BytesMut,
    /// The backend connection of the request being served; between requests it waits
    /// with the worker thread's idle ones, for any client connection.
    upstream: Option<Box<BackendConnection>>,
    peer: Option<SocketAddr>,
    /// `None` too when no rule compares it ([FastPath::compares_listeners]).
    local: Option<SocketAddr>,
    /// Fields of the request being served (kept for their allocation while requests
    /// follow each other without a wait).
    fields: Vec<FieldAt>,
}

/// How a request on the fast path ended, for the connection.
enum Next {
    /// The keep-alive timeout counts from `finished`, when the response ended.
    KeepAlive {
        finished: Instant,
    },
    Close,
}

/// A response's body framing.
#[derive(Debug, PartialEq, Eq)]
enum Framing {
    None,
    Length(u64),
    Chunked,
    UntilClose,
}

/// A failure talking to the backend, and whether the response to the client had begun.
struct BackendFailure {
    status: u16,
    responded: bool,
}

/// Runs `io` within `limit`, which counts from when it first has to wait: `TimedOut`
/// past it.
///
/// Most reads and writes of a kept-alive exchange finish at their first poll, and then
/// this reads no clock and arms no timer. pingora's fast timeout reads the clock on
/// every call and, for a wait, allocates a timer and takes a lock; a tokio timer sits
/// inside this future and costs one clock read when armed.
async fn within<T>(
    limit: Duration,
    io: impl Future<Output = std::io::Result<T>>,
) -> std::io::Result<T> {
    let mut io = std::pin::pin!(io);
    if let std::task::Poll::Ready(done) = futures::poll!(io.as_mut()) {
        return done;
    }
    tokio::time::timeout(limit, io)
        .await
        .unwrap_or_else(timed_out)
}

/// Reads from `stream` into `buf` within `limit`; `Ok(0)` at end of stream.
async fn read_some(
    stream: &mut (impl AsyncRead + Unpin),
    buf: &mut BytesMut,
    limit: Option<Duration>,
) -> std::io::Result<usize> {
    buf.reserve(READ_SIZE);
    match limit {
        Some(limit) => within(limit, stream.read_buf(buf)).await,
        None => stream.read_buf(buf).await,
    }
}

/// Reads from a backend into its read buffer within `limit`; `Ok(0)` at end of stream.
/// As with [`within`], a read that is ready at once arms no timer; one that waits moves
/// the connection's own timer (see [`BackendConnection::read_timer`]).
async fn read_backend(
    upstream: &mut BackendConnection,
    limit: Option<Duration>,
) -> std::io::Result<usize> {
    let BackendConnection {
        stream,
        read,
        read_timer,
        ..
    } = upstream;
    read.reserve(READ_SIZE);
    let mut io = std::pin::pin!(stream.read_buf(read));
    let Some(limit) = limit else {
        return io.await;
    };
    if let std::task::Poll::Ready(done) = futures::poll!(io.as_mut()) {
        return done;
    }
    read_timer
        .as_mut()
        .reset(tokio::time::Instant::now() + limit);
    tokio::select! {
        biased;
        done = io => done,
        () = read_timer.as_mut() => Err(std::io::ErrorKind::TimedOut.into()),
    }
}

/// Reads what arrived of a request (its start, or more of it) into the connection's read
/// buffer by `deadline`: `Ok(0)` at end of stream, `Elapsed` past the deadline.
///
/// An idle kept-alive connection waits here, so the wait holds neither a buffer nor a
/// heap-allocated timer: each poll reads into a buffer on the stack, and only bytes that
/// arrived are copied into the read buffer, which grows to fit them rather than to a whole
/// read's size (a request usually arrives whole). A read that is not ready leaves that
/// buffer untouched, so nothing is lost between polls. The timer is tokio's, kept inside
/// the future, and its deadline is the connection's own, so waiting reads no clock. Not an
/// `async fn`, which would keep its arguments in its state beside the timer holding them.
fn read_request(
    conn: &mut Connection,
    deadline: Instant,
) -> impl Future<Output = Result<std::io::Result<usize>, tokio::time::error::Elapsed>> + Send + '_ {
    let read = std::future::poll_fn(move |cx| {
        let mut arrived = [std::mem::MaybeUninit::<u8>::uninit(); READ_SIZE];
        let mut arrived = tokio::io::ReadBuf::uninit(&mut arrived);
        std::task::ready!(std::pin::Pin::new(&mut conn.client).poll_read(cx, &mut arrived))?;
        conn.read.extend_from_slice(arrived.filled());
        std::task::Poll::Ready(Ok(arrived.filled().len()))
    });
    tokio::time::timeout_at(tokio::time::Instant::from_std(deadline), read)
}

/// A wait past its limit, as an I/O error.
fn timed_out<T>(_: tokio::time::error::Elapsed) -> std::io::Result<T> {
    Err(std::io::ErrorKind::TimedOut.into())
}

async fn write_all(
    stream: &mut (impl AsyncWrite + Unpin),
    bytes: &[u8],
    limit: Duration,
) -> std::io::Result<()> {
    within(limit, async {
        stream.write_all(bytes).await?;
        stream.flush().await
    })
    .await
}

/// 504 for a backend that timed out, else 502.
fn failure_status(e: &std::io::Error) -> u16 {
    match e.kind() {
        std::io::ErrorKind::TimedOut => 504,
        _ => 502,
    }
}

impl FastPath {
    pub fn new(balancer: Balancer) -> FastPath {
        FastPath { balancer }
    }

    /// Whether [FastPath::serve] needs the connection's local address, which otherwise
    /// may be `None`.
    pub fn compares_listeners(&self) -> bool {
        self.balancer.compares_listeners()
    }

    /// Serves the connection's requests from its first, handing it to pingora-proxy at
    /// the first request the fast path does not serve.
    ///
    /// Not an `async fn`: one would keep its arguments in its state beside the
    /// `Connection` they are moved into, and an idle connection's task holds that state
    /// for as long as the connection lives.
    pub fn serve<'a>(
        &'a self,
        client: Stream,
        peer: Option<SocketAddr>,
        local: Option<SocketAddr>,
        shutdown: &'a mut ShutdownWatch,
    ) -> impl Future<Output = Outcome> + Send + 'a {
        let mut conn = Connection {
            client,
            read: BytesMut::new(),
            upstream: None,
            peer,
            local,
            fields: Vec::new(),
        };
        // `self.balancer.client` is read where it is used: a reference to it kept in a
        // local would be one more field of the state an idle connection waits in.
        async move {
            let mut header_deadline = Instant::now() + self.balancer.client.header_timeout.0;
            let mut served = 0u32;
            loop {
                let kept_alive = served > 0;
                let head = match self
                    .next_head(&mut conn, header_deadline, kept_alive, shutdown)
                    .await
                {
                    NextHead::Fast(head) => head,
                    NextHead::HandOver => return conn.hand_over(header_deadline, served),
                    NextHead::Closed => return Outcome::Closed,
                };
                let last = head.close
                    || self.balancer.client.requests_after(served) == 0
                    || *shutdown.borrow()
                    || self.balancer.traffic.draining();
                let next = match self.route(&conn, &head) {
                    // Boxed: an idle connection's future then holds only what waiting for
                    // the next request needs, not the deepest state of an exchange.
                    Some((route, pool)) => {
                        Box::pin(self.forward(&mut conn, &head, route, pool, last)).await
                    }
                    None => {
                        conn.fields = head.fields;
                        return conn.hand_over(header_deadline, served);
                    }
                };
                served += 1;
                conn.fields = head.fields;
                let finished = match next {
                    Next::KeepAlive { finished } => finished,
                    Next::Close => return Outcome::Closed,
                };
                conn.release_buffers();
                // The next request must start within the keep-alive timeout, and its header
                // end within the header timeout after that.
                let limits = &self.balancer.client;
                header_deadline = finished + limits.keepalive_timeout.0 + limits.header_timeout.0;
            }
        }
    }

    /// Reads until a whole request header is there, by `header_deadline`. A kept-alive
    /// connection waiting for its next request (`kept_alive`) must start it a header
    /// timeout before that (the keep-alive timeout after its previous response), and is
    /// closed when the process shuts down, as pingora-proxy closes its own.
    ///
    /// Not an `async fn`, for the reason given at [`FastPath::serve`]: an idle connection
    /// waits in this future.
    #[expect(
        clippy::manual_async_fn,
        reason = "an async fn keeps its arguments beside their copies"
    )]
    fn next_head<'a>(
        &'a self,
        conn: &'a mut Connection,
        header_deadline: Instant,
        kept_alive: bool,
        shutdown: &'a mut ShutdownWatch,
    ) -> impl Future<Output = NextHead> + Send + 'a {
        async move {
            loop {
                if !conn.read.is_empty() {
                    let limits = &self.balancer.client;
                    let fields = std::mem::take(&mut conn.fields);
                    match parse_request(&conn.read, limits, fields) {
                        Parse::Fast(head) => return NextHead::Fast(head),
                        Parse::Partial if conn.read.len() <= limits.max_header_size => {}
                        Parse::Partial | Parse::Other => return NextHead::HandOver,
                    }
                }
                let idle = conn.read.is_empty() && kept_alive;
                let deadline = match idle {
                    true => header_deadline - self.balancer.client.header_timeout.0,
                    false => header_deadline,
                };
                if idle && *shutdown.borrow() {
                    return NextHead::Closed;
                }
                // One select for both cases: a read future built in several places takes a
                // slot of its own in this future's state for each, and an idle connection
                // holds this state for as long as it is idle.
                let read = tokio::select! {
                    biased;
                    read = read_request(conn, deadline) => read,
                    _ = shutdown.changed(), if idle => return NextHead::Closed,
                };
                match read {
                    Ok(Ok(0)) => return NextHead::Closed,
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => {
                        log::debug!("closing a client connection: {e}");
                        return NextHead::Closed;
                    }
                    Err(_) => {
                        log::debug!("closing a client connection: no complete request in time");
                        return NextHead::Closed;
                    }
                }
            }
        }
    }

    /// The route and pool of a request, if the fast path serves it.
    fn route(&self, conn: &Connection, head: &Head) -> Option<(&Route, &Pool)> {
        let buf = &conn.read[..];
        let target = at(buf, head.target);
        let path = target.split(|&b| b == b'?').next().unwrap_or(target);
        let path = std::str::from_utf8(path).ok()?;
        let balancer = &self.balancer;
        if let Some(redirect) = &balancer.https_redirect {
            if redirect.applies(conn.local, path) {
                return None;
            }
        }
        let host = routing::request_host(Some(at(buf, head.fields[head.host].value)), None);
        let id = balancer.router.route(&RequestTarget {
            host: host.as_deref(),
            path,
            local: conn.local,
        })?;
        let route = balancer.router.get(id);
        let pool = balancer.pools.get(route.pool);
        let too_large = route
            .max_body_size
            .is_some_and(|max| head.content_length > max);
        (!too_large && pool.plain_http1()).then_some((route, pool))
    }

    /// The request line and header sent to `destination`.
    fn upstream_header(
        &self,
        conn: &Connection,
        head: &Head,
        route: &Route,
        destination: &Destination,
    ) -> pingora::Result<Vec<u8>> {
        let buf = &conn.read[..];
        let mut fields = Fields::with_capacity(head.fields.len() + 4);
        for field in &head.fields {
            let name = at(buf, field.name);
            if !HOP_BY_HOP.iter().any(|n| name.eq_ignore_ascii_case(n)) {
                fields.push(name, at(buf, field.value));
            }
        }
        let host = visible_ascii(at(buf, head.fields[head.host].value));
        self.balancer.edit_upstream_request(
            conn.peer.map(|p| p.ip()),
            conn.client.get_ssl().is_some(),
            host,
            destination,
            route,
            &mut fields,
        )?;
        let mut out = Vec::with_capacity(head.len + 256);
        out.extend_from_slice(at(buf, head.method));
        out.push(b' ');
        out.extend_from_slice(at(buf, head.target));
        out.extend_from_slice(b" HTTP/1.1\r\n");
        fields.write_to(&mut out);
        out.extend_from_slice(b"\r\n");
        Ok(out)
    }

    /// Forwards one request and its response.
    async fn forward(
        &self,
        conn: &mut Connection,
        head: &Head,
        route: &Route,
        pool: &Pool,
        last: bool,
    ) -> Next {
        let balancer = &self.balancer;
        let started = Instant::now();
        let _in_flight = crate::traffic::InFlight::new(&balancer.traffic);
        // Taken before the request is consumed from the buffer.
        let logged = balancer.access_log.as_ref().is_some_and(|log| log.sample());
        let request = logged.then(|| LoggedRequest::of(&conn.read, head));
        let key = hash_key(pool, conn, head);
        let mut tries = Tries::default();
        let outcome = self
            .try_backends(conn, head, route, pool, &key, last, &mut tries)
            .await;
        // A backend connection left in the middle of an exchange carries nothing more.
        conn.upstream = None;
        let (status, keep_alive) = match outcome {
            Ok(status) => (status, !tries.closed),
            Err(failure) => (self.answer_failure(conn, &failure).await, false),
        };
        let finished = Instant::now();
        let destination = tries.tried.last().map(|&id| pool.destination(id));
        let total = finished - started;
        let entry = request.map(|request| Entry {
            time: SystemTime::now() - total,
            client: conn.peer,
            method: request.method,
            target: request.target,
            version: http::Version::HTTP_11,
            status,
            bytes: tries.bytes_sent,
            referer: request.referer,
            user_agent: request.user_agent,
            upstream: destination.map(|d| d.name().to_string()),
            total,
            upstream_time: tries.upstream_time,
            retries: tries.tried.len().saturating_sub(1),
            tls: conn.client.get_ssl_digest().as_deref().map(tls_facts),
        });
        balancer.request_done(Done {
            status,
            total,
            upstream_time: tries.upstream_time,
            route: Some(route),
            destination,
            entry,
        });
        match keep_alive {
            true => Next::KeepAlive { finished },
            false => Next::Close,
        }
    }

    /// Sends the request to the pool's backends in turn (another one after a connect
    /// failure, within the pool's `retries`) until one answers.
    #[allow(clippy::too_many_arguments)]
    async fn try_backends(
        &self,
        conn: &mut Connection,
        head: &Head,
        route: &Route,
        pool: &Pool,
        key: &[u8],
        last: bool,
        tries: &mut Tries,
    ) -> Result<u16, BackendFailure> {
        let mut failure = 502;
        loop {
            let Some(id) = pool.select(key, &tries.tried) else {
                // As the proxy path: 503 when no backend is in rotation.
                let status = if tries.tried.is_empty() { 503 } else { failure };
                return Err(BackendFailure::before_response(status));
            };
            tries.tried.push(id);
            let destination = pool.destination(id);
            let _load = destination.state.start_request();
            tries.try_started = Some(Instant::now());
            let out = self
                .upstream_header(conn, head, route, destination)
                .map_err(|e| {
                    log::info!("client request failed: {e}");
                    BackendFailure::before_response(400)
                })?;
            let to = Backend { route, pool, id };
            match self.exchange(conn, head, &to, &out, last, tries).await {
                Exchange::Done(status) => return Ok(status),
                Exchange::ConnectFailed(e) => {
                    destination.metrics.connect_failed();
                    pool.request_failed(id);
                    failure = failure_status(&e);
                    if tries.tried.len() > pool.retries {
                        log::error!("cannot connect to backend {}: {e}", destination.name());
                        return Err(BackendFailure::before_response(failure));
                    }
                    log::warn!(
                        "cannot connect to backend {}: {e}; trying another backend",
                        destination.name()
                    );
                    self.balancer.metrics.retried();
                }
                Exchange::Failed(failed) => {
                    if failed.status >= 500 {
                        pool.request_failed(id);
                    }
                    return Err(failed);
                }
            }
        }
    }

    /// Tells the client a request failed, if no response had begun; the status logged.
    async fn answer_failure(&self, conn: &mut Connection, failure: &BackendFailure) -> u16 {
        if failure.responded || failure.status == 0 {
            return 0;
        }
        let response = error_response(failure.status);
        let sent = write_all(
            &mut conn.client,
            &response,
            self.balancer.client.send_timeout.0,
        );
        if sent.await.is_err() {
            log::info!("cannot send the error response to the client");
        }
        failure.status
    }

    /// An idle connection to the backend (if `idle_allowed`), or a new one; whether it
    /// was idle (then the backend may have closed it meanwhile).
    async fn upstream_for(
        &self,
        conn: &mut Connection,
        to: &Backend<'_>,
        idle_allowed: bool,
    ) -> Result<bool, std::io::Error> {
        let pool_id = to.route.pool;
        let peer = &to.pool.destination(to.id).peer;
        let max_idle = peer.options.idle_timeout.unwrap_or(DEFAULT_IDLE);
        let idle = idle_allowed
            .then(|| idle_backends::take(pool_id, to.id, max_idle))
            .flatten();
        if idle.is_some() {
            conn.upstream = idle;
            return Ok(true);
        }
        let connect_timeout = to
            .route
            .connect_timeout
            .or(peer.options.connection_timeout)
            .unwrap_or(Duration::from_secs(60));
        let address = peer
            .address()
            .as_inet()
            .copied()
            .ok_or(std::io::ErrorKind::Unsupported)?;
        let stream = within(connect_timeout, TcpStream::connect(address)).await?;
        stream.set_nodelay(true)?;
        conn.upstream = Some(BackendConnection::new(pool_id, to.id, stream));
        Ok(false)
    }

    /// Sends the request to a backend and its response to the client. A kept-alive
    /// connection the backend had closed (it fails before any byte of response) gets the
    /// request again over a new one, if the whole request was read before it was sent.
    async fn exchange(
        &self,
        conn: &mut Connection,
        head: &Head,
        to: &Backend<'_>,
        out: &[u8],
        last: bool,
        tries: &mut Tries,
    ) -> Exchange {
        let destination = to.pool.destination(to.id);
        let read_timeout = to
            .route
            .read_timeout
            .or(destination.peer.options.read_timeout);
        let body_buffered = (conn.read.len() - head.len) as u64 >= head.content_length;
        let mut stale_retries = 0;
        loop {
            // After a stale one, a new connection: the other idle ones to this backend
            // may be just as closed (a restarted backend closes them all).
            let kept = match self.upstream_for(conn, to, stale_retries == 0).await {
                Ok(kept) => kept,
                Err(e) => return Exchange::ConnectFailed(e),
            };
            let can_retry = |e: &std::io::Error| {
                kept && body_buffered
                    && stale_retries < MAX_STALE_RETRIES
                    && e.kind() != std::io::ErrorKind::TimedOut
            };
            let response = match self.send(conn, head, out, read_timeout).await {
                Ok(response) => response,
                Err(SendError::Stale(e)) if can_retry(&e) => {
                    log::info!(
                        "backend {} had closed a kept-alive connection; sending the request again",
                        destination.name()
                    );
                    stale_retries += 1;
                    conn.upstream = None;
                    continue;
                }
                Err(SendError::Stale(e)) | Err(SendError::Backend(e)) => {
                    log::error!("backend {} failed: {e}", destination.name());
                    conn.upstream = None;
                    return Exchange::Failed(BackendFailure::before_response(failure_status(&e)));
                }
                Err(SendError::Client(failure)) => {
                    conn.upstream = None;
                    return Exchange::Failed(failure);
                }
            };
            if body_buffered {
                conn.read.advance(head.len + head.content_length as usize);
            }
            return self
                .respond(conn, head, to, response, last, read_timeout, tries)
                .await;
        }
    }

    /// Writes the request (header, and body as it is read) to the kept backend
    /// connection, and reads the response header.
    async fn send(
        &self,
        conn: &mut Connection,
        head: &Head,
        out: &[u8],
        read_timeout: Option<Duration>,
    ) -> Result<ResponseHead, SendError> {
        let body_now = (conn.read.len() - head.len).min(head.content_length as usize);
        let upstream = conn.upstream.as_deref_mut().expect("connected");
        let body = &conn.read[head.len..head.len + body_now];
        send_request(upstream, out, body, read_timeout)
            .await
            .map_err(SendError::Stale)?;
        let rest = head.content_length - body_now as u64;
        if rest > 0 {
            // The rest of the body comes from the client, forwarded as it arrives.
            conn.read.advance(head.len + body_now);
            self.forward_body(conn, rest)
                .await
                .map_err(SendError::Client)?;
        }
        let upstream = conn.upstream.as_deref_mut().expect("connected");
        // The client is watched meanwhile: one that goes away abandons the request, as
        // on the proxy path (and with nginx and HAProxy). Bytes it pipelines are kept.
        // The response is polled first, so that the wake-up it brings does not also poll
        // the client: on TLS, an `SSL_read` that finds nothing costs about 2,800
        // instructions (its 16 KiB record buffer allocated and freed, the error queue read).
        let response = loop {
            let watch_client = conn.read.len() < self.balancer.client.max_header_size;
            tokio::select! {
                biased;
                response = read_response_head(upstream, read_timeout) => break response,
                read = read_some(&mut conn.client, &mut conn.read, None), if watch_client => {
                    if !matches!(read, Ok(n) if n > 0) {
                        log::info!("client request failed: the client closed the connection before the response");
                        return Err(SendError::Client(BackendFailure::before_response(0)));
                    }
                }
            }
        };
        match response {
            Ok(response) => Ok(response),
            Err(e) if upstream.read.is_empty() => Err(SendError::Stale(e)),
            Err(e) => Err(SendError::Backend(e)),
        }
    }

    /// Copies `rest` bytes of request body from the client to the backend.
    async fn forward_body(
        &self,
        conn: &mut Connection,
        mut rest: u64,
    ) -> Result<(), BackendFailure> {
        let limits = &self.balancer.client;
        let upstream = conn.upstream.as_deref_mut().expect("connected");
        while rest > 0 {
            conn.read.clear();
            match read_some(
                &mut conn.client,
                &mut conn.read,
                Some(limits.body_timeout.0),
            )
            .await
            {
                Ok(0) => {
                    return Err(BackendFailure {
                        status: 0,
                        responded: false,
                    })
                }
                Err(e) => {
                    // A client too slow to send its body: 408, as the proxy path says.
                    let timed_out = e.kind() == std::io::ErrorKind::TimedOut;
                    return Err(BackendFailure {
                        status: if timed_out { 408 } else { 0 },
                        responded: false,
                    });
                }
                Ok(_) => {}
            }
            let take = (conn.read.len() as u64).min(rest) as usize;
            if let Err(e) = write_all(
                &mut upstream.stream,
                &conn.read[..take],
                limits.body_timeout.0,
            )
            .await
            {
                return Err(BackendFailure {
                    status: failure_status(&e),
                    responded: false,
                });
            }
            conn.read.advance(take);
            rest -= take as u64;
        }
        Ok(())
    }
}

/// What came next on a client connection.
enum NextHead {
    Fast(Head),
    HandOver,
    Closed,
}

/// A backend of a route's pool.
struct Backend<'a> {
    route: &'a Route,
    pool: &'a Pool,
    id: BackendId,
}

/// The backends a request went to, and what it got.
#[derive(Default)]
struct Tries {
    tried: Vec<BackendId>,
    /// When the current try chose its backend.
    try_started: Option<Instant>,
    /// From choosing the backend that answered to its final (not 1xx) response header,
    /// as the proxy path measures it.
    upstream_time: Option<Duration>,
    /// Response body bytes sent to the client.
    bytes_sent: usize,
    /// The response told the client the connection closes.
    closed: bool,
}

/// What the access log says of a request, taken from its header before it is forwarded.
struct LoggedRequest {
    method: http::Method,
    target: String,
    referer: Option<String>,
    user_agent: Option<String>,
}

impl LoggedRequest {
    fn of(buf: &[u8], head: &Head) -> LoggedRequest {
        let field = |name: &[u8]| {
            head.field(buf, name)
                .and_then(visible_ascii)
                .map(String::from)
        };
        LoggedRequest {
            method: http::Method::from_bytes(at(buf, head.method)).unwrap_or(http::Method::GET),
            target: String::from_utf8_lossy(at(buf, head.target)).into_owned(),
            referer: field(b"referer"),
            user_agent: field(b"user-agent"),
        }
    }
}

/// What consistent hashing hashes for this request, if the pool uses it.
fn hash_key(pool: &Pool, conn: &Connection, head: &Head) -> Vec<u8> {
    let Some(key) = pool.hash_key() else {
        return Vec::new();
    };
    let buf = &conn.read[..];
    let target = at(buf, head.target);
    let path = target.split(|&b| b == b'?').next().unwrap_or(target);
    let header = |name: &str| head.field(buf, name.as_bytes());
    let mut client_ip = [0u8; 16];
    crate::proxy::hash_input(key, conn.peer, path, header, &mut client_ip).to_vec()
}

/// Why sending a request failed.
enum SendError {
    /// Before any byte of response: the connection may have been a stale kept-alive one.
    Stale(std::io::Error),
    Backend(std::io::Error),
    /// Reading the body from the client failed.
    Client(BackendFailure),
}

impl BackendFailure {
    fn before_response(status: u16) -> BackendFailure {
        BackendFailure {
            status,
            responded: false,
        }
    }
}

enum Exchange {
    /// The response was forwarded; its status.
    Done(u16),
    ConnectFailed(std::io::Error),
    Failed(BackendFailure),
}

impl Connection {
    /// Frees the read buffer if it holds nothing, and the request's fields, so that an
    /// idle kept-alive connection costs little memory.
    fn release_buffers(&mut self) {
        if self.read.is_empty() {
            self.read = BytesMut::new();
            self.fields = Vec::new();
        }
    }

    fn hand_over(self, header_deadline: Instant, served: u32) -> Outcome {
        Outcome::HandOver {
            stream: self.client,
            read: self.read,
            header_deadline,
            served,
        }
    }
}

/// An error answer, as pingora-proxy words it, closing the connection.
fn error_response(status: u16) -> Vec<u8> {
    let reason = http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("");
    let date = pingora::protocols::http::date::get_cached_date();
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nServer: Pingora\r\nDate: {}\r\nContent-Length: 0\r\n\
         Cache-Control: private, no-store\r\nConnection: close\r\n\r\n",
        date.to_str().unwrap_or_default()
    )
    .into_bytes();
    out.shrink_to_fit();
    out
}

/// Writes the request header, and the part of the body already read, to the backend.
async fn send_request(
    upstream: &mut BackendConnection,
    header: &[u8],
    body: &[u8],
    limit: Option<Duration>,
) -> std::io::Result<()> {
    let limit = limit.unwrap_or(Duration::from_secs(60));
    if body.is_empty() {
        write_all(&mut upstream.stream, header, limit).await
    } else {
        let mut both = Vec::with_capacity(header.len() + body.len());
        both.extend_from_slice(header);
        both.extend_from_slice(body);
        write_all(&mut upstream.stream, &both, limit).await
    }
}

/// A backend's response header, parsed; offsets are into the upstream's read buffer.
struct ResponseHead {
    len: usize,
    status: u16,
    reason: (usize, usize),
    fields: Vec<FieldAt>,
    /// HTTP/1.1 and no `Connection: close`: the backend connection can carry another
    /// request.
    reusable: bool,
}

enum ResponseParse {
    Partial,
    Complete(ResponseHead),
    Invalid(&'static str),
}

fn parse_response(buf: &[u8]) -> ResponseParse {
    let mut headers = [httparse::EMPTY_HEADER; MAX_FIELDS];
    let mut response = httparse::Response::new(&mut headers);
    let len = match response.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return ResponseParse::Partial,
        Err(_) => return ResponseParse::Invalid("an invalid response header"),
    };
    let (Some(version), Some(status)) = (response.version, response.code) else {
        return ResponseParse::Invalid("an invalid status line");
    };
    let mut reusable = version == 1;
    let mut fields = Vec::with_capacity(response.headers.len());
    for field in response.headers.iter() {
        if field.name.eq_ignore_ascii_case("connection")
            && field
                .value
                .split(|&b| b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"))
        {
            reusable = false;
        }
        fields.push(FieldAt {
            name: offsets(buf, field.name.as_bytes()),
            value: offsets(buf, field.value),
        });
    }
    ResponseParse::Complete(ResponseHead {
        len,
        status,
        reason: offsets(buf, response.reason.unwrap_or("").as_bytes()),
        fields,
        reusable,
    })
}

/// A status code's three digits (httparse reads exactly three).
fn status_digits(status: u16) -> [u8; 3] {
    let digit = |n: u16| b'0' + (n % 10) as u8;
    [digit(status / 100), digit(status / 10), digit(status)]
}

/// Reads a response header from the backend.
async fn read_response_head(
    upstream: &mut BackendConnection,
    limit: Option<Duration>,
) -> std::io::Result<ResponseHead> {
    loop {
        if !upstream.read.is_empty() {
            match parse_response(&upstream.read) {
                ResponseParse::Complete(head) => return Ok(head),
                ResponseParse::Invalid(what) => {
                    return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, what))
                }
                ResponseParse::Partial if upstream.read.len() > MAX_RESPONSE_HEADER => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "a response header over 64 KiB",
                    ))
                }
                ResponseParse::Partial => {}
            }
        }
        if read_backend(upstream, limit).await? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the backend closed the connection before a complete response header",
            ));
        }
    }
}

/// The body framing of a response to `head_request`, strictly: anything ambiguous is
/// an error.
fn response_framing(
    buf: &[u8],
    response: &ResponseHead,
    head_request: bool,
) -> Result<Framing, &'static str> {
    let mut chunked = 0;
    let mut length = None;
    for field in &response.fields {
        let name = at(buf, field.name);
        let value = at(buf, field.value);
        if name.eq_ignore_ascii_case(b"transfer-encoding") {
            if !value.eq_ignore_ascii_case(b"chunked") {
                return Err("a Transfer-Encoding other than chunked");
            }
            chunked += 1;
        } else if name.eq_ignore_ascii_case(b"content-length") {
            if length.is_some() {
                return Err("more than one Content-Length");
            }
            length = Some(content_length(value).ok_or("an invalid Content-Length")?);
        }
    }
    if chunked > 1 || (chunked == 1 && length.is_some()) {
        return Err("ambiguous body framing");
    }
    Ok(
        if head_request || matches!(response.status, 204 | 304) || response.status < 200 {
            Framing::None
        } else if chunked == 1 {
            Framing::Chunked
        } else {
            length.map_or(Framing::UntilClose, Framing::Length)
        },
    )
}

/// Where a chunked body is, as [Chunks::advance] consumes it.
#[derive(Debug, PartialEq, Eq)]
enum Chunks {
    Size,
    Data(u64),
    DataEnd,
    Trailer,
    Done,
}

/// Longest chunk-size line (with extensions) or trailer field accepted.
const MAX_CHUNK_LINE: usize = 4096;

impl Chunks {
    /// Consumes what can be of `buf`; returns how many bytes are valid chunked framing.
    fn advance(&mut self, buf: &[u8]) -> Result<usize, &'static str> {
        let mut at = 0;
        loop {
            let rest = &buf[at..];
            match self {
                Chunks::Done => return Ok(at),
                Chunks::Data(left) => {
                    if rest.is_empty() {
                        return Ok(at);
                    }
                    let take = (*left).min(rest.len() as u64) as usize;
                    at += take;
                    *left -= take as u64;
                    if *left == 0 {
                        *self = Chunks::DataEnd;
                    }
                }
                Chunks::DataEnd => {
                    if rest.len() < 2 {
                        return Ok(at);
                    }
                    if &rest[..2] != b"\r\n" {
                        return Err("chunk data not followed by CRLF");
                    }
                    at += 2;
                    *self = Chunks::Size;
                }
                Chunks::Size | Chunks::Trailer => {
                    let Some(end) = rest.iter().position(|&b| b == b'\n') else {
                        if rest.len() > MAX_CHUNK_LINE {
                            return Err("a chunk line too long");
                        }
                        return Ok(at);
                    };
                    if end == 0 || rest[end - 1] != b'\r' {
                        return Err("a bare LF in chunked framing");
                    }
                    let line = &rest[..end - 1];
                    if line.iter().any(|&b| b == b'\r' || b == 0) {
                        return Err("a control character in chunked framing");
                    }
                    at += end + 1;
                    *self = match self {
                        Chunks::Size => {
                            let digits = line.split(|&b| b == b';').next().unwrap_or(line);
                            if digits.is_empty()
                                || digits.len() > 15
                                || !digits.iter().all(u8::is_ascii_hexdigit)
                            {
                                return Err("an invalid chunk size");
                            }
                            let text = std::str::from_utf8(digits).map_err(|_| "chunk size")?;
                            match u64::from_str_radix(text, 16).map_err(|_| "chunk size")? {
                                0 => Chunks::Trailer,
                                size => Chunks::Data(size),
                            }
                        }
                        _ if line.is_empty() => Chunks::Done,
                        _ => Chunks::Trailer,
                    };
                }
            }
        }
    }
}

impl FastPath {
    /// Forwards the backend's response (its header parsed) to the client.
    #[allow(clippy::too_many_arguments)]
    async fn respond(
        &self,
        conn: &mut Connection,
        head: &Head,
        to: &Backend<'_>,
        response: ResponseHead,
        last: bool,
        read_timeout: Option<Duration>,
        tries: &mut Tries,
    ) -> Exchange {
        let send_timeout = self.balancer.client.send_timeout.0;
        let destination = to.pool.destination(to.id);
        let response = match self
            .informational(conn, response, to.route, read_timeout)
            .await
        {
            Ok(response) => response,
            Err(failure) => {
                conn.upstream = None;
                return Exchange::Failed(failure);
            }
        };
        tries.upstream_time = tries.try_started.map(|started| started.elapsed());
        let upstream = conn.upstream.as_deref_mut().expect("connected");
        // Decided when the response goes out, not when the request came: a process that
        // started draining meanwhile must close the connection with it (LIFECYCLE.md).
        let last = last || self.balancer.traffic.draining();
        tries.closed = last;
        let framing = response_framing(&upstream.read, &response, head.head);
        let header = framing.and_then(|framing| {
            let header = self.response_header(&upstream.read, &response, to.route, &framing, last);
            Ok((
                framing,
                header.map_err(|_| "a header the route's rules cannot edit")?,
            ))
        });
        let (framing, mut out) = match header {
            Ok(framing_and_header) => framing_and_header,
            Err(what) => {
                log::error!("backend {} sent {what}", destination.name());
                conn.upstream = None;
                return Exchange::Failed(BackendFailure::before_response(502));
            }
        };
        to.pool.response_received(to.id, response.status);
        upstream.read.advance(response.len);
        let reusable = response.reusable && framing != Framing::UntilClose;
        let copied = copy_body(
            &mut conn.client,
            upstream,
            &mut out,
            framing,
            (read_timeout, send_timeout),
            &mut tries.bytes_sent,
        )
        .await;
        // Only a connection between exchanges (its whole response read, nothing after it)
        // may carry another request, of any client.
        if let Some(upstream) = conn.upstream.take() {
            if copied.is_ok() && reusable && upstream.read.is_empty() {
                idle_backends::put(upstream);
            }
        }
        body_outcome(copied, response.status, to)
    }

    /// Passes informational (1xx) responses through to the client, with the route's rules
    /// as pingora-proxy applies them to every response; the final response.
    async fn informational(
        &self,
        conn: &mut Connection,
        mut response: ResponseHead,
        route: &Route,
        read_timeout: Option<Duration>,
    ) -> Result<ResponseHead, BackendFailure> {
        let upstream = conn.upstream.as_deref_mut().expect("connected");
        while response.status < 200 {
            if response.status == 101 {
                // Never asked for: the fast path sends no Upgrade.
                return Err(BackendFailure::before_response(502));
            }
            let Ok(mut informational) =
                header_lines(&upstream.read, &response, route, |_| true, None)
            else {
                return Err(BackendFailure::before_response(502));
            };
            informational.extend_from_slice(b"\r\n");
            upstream.read.advance(response.len);
            let send_timeout = self.balancer.client.send_timeout.0;
            if write_all(&mut conn.client, &informational, send_timeout)
                .await
                .is_err()
            {
                return Err(BackendFailure {
                    status: 0,
                    responded: true,
                });
            }
            response = read_response_head(upstream, read_timeout)
                .await
                .map_err(|e| BackendFailure::before_response(failure_status(&e)))?;
        }
        Ok(response)
    }

    /// The response header for the client: the backend's, without its hop-by-hop fields
    /// and `Date`, with the route's rules, and this balancer's `Date` and `Connection`.
    fn response_header(
        &self,
        buf: &[u8],
        response: &ResponseHead,
        route: &Route,
        framing: &Framing,
        last: bool,
    ) -> pingora::Result<Vec<u8>> {
        let hop_by_hop = |name: &[u8]| {
            name.eq_ignore_ascii_case(b"connection")
                || name.eq_ignore_ascii_case(b"keep-alive")
                || name.eq_ignore_ascii_case(b"date")
        };
        // A body the backend ends by closing goes to a client that keeps its connection.
        let chunked = (*framing == Framing::UntilClose).then_some(CHUNKED);
        let mut out = header_lines(buf, response, route, |name| !hop_by_hop(name), chunked)?;
        out.extend_from_slice(b"Date: ");
        out.extend_from_slice(pingora::protocols::http::date::get_cached_date().as_bytes());
        out.extend_from_slice(if last {
            &b"\r\nConnection: close\r\n\r\n"[..]
        } else {
            &b"\r\nConnection: keep-alive\r\n\r\n"[..]
        });
        Ok(out)
    }
}

/// `Transfer-Encoding: chunked`.
const CHUNKED: (&[u8], &[u8]) = (b"Transfer-Encoding", b"chunked");

/// A response's status line and fields for the client, each line ended: the backend's
/// fields that `keep` accepts, then `extra`, then the route's rules.
fn header_lines(
    buf: &[u8],
    response: &ResponseHead,
    route: &Route,
    keep: impl Fn(&[u8]) -> bool,
    extra: Option<(&'static [u8], &'static [u8])>,
) -> pingora::Result<Vec<u8>> {
    let mut fields = Fields::with_capacity(response.fields.len() + 3);
    for field in &response.fields {
        let name = at(buf, field.name);
        if keep(name) {
            fields.push(name, at(buf, field.value));
        }
    }
    if let Some((name, value)) = extra {
        fields.push(name, value);
    }
    routing::apply(&route.response_headers, &mut fields)?;
    let mut out = Vec::with_capacity(response.len + 128);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(&status_digits(response.status));
    out.push(b' ');
    out.extend_from_slice(at(buf, response.reason));
    out.extend_from_slice(b"\r\n");
    fields.write_to(&mut out);
    Ok(out)
}

/// How a response whose header went to the client ended.
fn body_outcome(copied: Result<(), BodyError>, status: u16, to: &Backend<'_>) -> Exchange {
    match copied {
        Ok(()) => return Exchange::Done(status),
        Err(BodyError::Backend(e)) => {
            let name = to.pool.destination(to.id).name();
            log::error!("backend {name} failed during the response body: {e}");
            to.pool.request_failed(to.id);
        }
        Err(BodyError::Client(e)) => log::info!("client request failed: {e}, during the response"),
    }
    Exchange::Failed(BackendFailure {
        status: 0,
        responded: true,
    })
}

enum BodyError {
    Backend(std::io::Error),
    Client(std::io::Error),
}

/// Copies a response body from the backend to the client, after the header in `out`.
async fn copy_body(
    client: &mut Stream,
    upstream: &mut BackendConnection,
    out: &mut Vec<u8>,
    framing: Framing,
    (read_timeout, send_timeout): (Option<Duration>, Duration),
    bytes_sent: &mut usize,
) -> Result<(), BodyError> {
    let invalid = |what: &'static str| {
        BodyError::Backend(std::io::Error::new(std::io::ErrorKind::InvalidData, what))
    };
    let mut left = match framing {
        Framing::Length(length) => length,
        _ => 0,
    };
    let mut chunks = Chunks::Size;
    loop {
        // What of the bytes read belongs to the body.
        let take = match framing {
            Framing::None => 0,
            Framing::Length(_) => (upstream.read.len() as u64).min(left) as usize,
            Framing::Chunked => chunks.advance(&upstream.read).map_err(invalid)?,
            Framing::UntilClose => upstream.read.len(),
        };
        if take > 0 {
            if framing == Framing::UntilClose {
                out.extend_from_slice(format!("{take:x}\r\n").as_bytes());
                out.extend_from_slice(&upstream.read[..take]);
                out.extend_from_slice(b"\r\n");
            } else {
                out.extend_from_slice(&upstream.read[..take]);
            }
            upstream.read.advance(take);
            *bytes_sent += take;
            left -= take.min(left as usize) as u64;
        }
        let done = match framing {
            Framing::None => true,
            Framing::Length(_) => left == 0,
            Framing::Chunked => chunks == Chunks::Done,
            Framing::UntilClose => false,
        };
        if !out.is_empty() && (done || out.len() >= READ_SIZE || upstream.read.is_empty()) {
            write_all(client, out, send_timeout)
                .await
                .map_err(BodyError::Client)?;
            out.clear();
        }
        if done {
            return Ok(());
        }
        match read_backend(upstream, read_timeout).await {
            Ok(0) if framing == Framing::UntilClose => {
                write_all(client, b"0\r\n\r\n", send_timeout)
                    .await
                    .map_err(BodyError::Client)?;
                return Ok(());
            }
            Ok(0) => {
                return Err(invalid(
                    "the backend closed the connection before the end of the body",
                ))
            }
            Ok(_) => {}
            Err(e) => return Err(BodyError::Backend(e)),
        }
    }
}

mod idle_backends;
#[cfg(test)]
mod tests;
