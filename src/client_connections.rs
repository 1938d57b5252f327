//! Client connections: pingora's HTTP/1 connection loop with the limits pingora lacks.
//!
//! pingora bounds each read of a request header by itself (60 s), not the whole header,
//! and waits for the next request on a kept-alive connection without any bound: a client
//! sending a byte every few seconds, or simply staying idle, holds a connection (and its
//! buffers) forever. This loop gives the whole request header a deadline, from the
//! connection's accept or from the end of the previous response plus the keep-alive
//! timeout, and sets the keep-alive limits from the configuration.
//!
//! A connection from a load balancer trusted to send a PROXY protocol header starts with
//! one: it is read here, before any HTTP, and the client it names becomes the connection's
//! client address (for forwarding headers, hashing and logs).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::BytesMut;
use pingora::apps::{HttpServerApp, ServerApp};
use pingora::protocols::http::ServerSession;
use pingora::protocols::l4::socket::SocketAddr as PingoraAddr;
use pingora::protocols::{SocketDigest, Stream, ALPN};
use pingora::proxy::{HttpProxy, ProxyHttp};
use pingora::server::ShutdownWatch;

use crate::config::{ClientLimits, ProxyProtocolIn};
use crate::fast_path::{FastPath, Outcome};
use crate::proxy::{keepalive_seconds, HeaderParsed};
use crate::proxy_protocol::{self, ProxyHeader};
use crate::tls::TlsListeners;

/// The proxy's [ServerApp]: HTTP/1 connections here, anything else to pingora's own loop.
pub struct ClientConnections<P> {
    proxy: Arc<HttpProxy<P>>,
    limits: ClientLimits,
    proxy_protocol: Option<ProxyProtocolIn>,
    tls: TlsListeners,
    /// Serves the common HTTP/1.1 requests, when on.
    fast_path: Option<FastPath>,
}

impl<P> ClientConnections<P> {
    pub fn new(
        proxy: HttpProxy<P>,
        limits: &ClientLimits,
        proxy_protocol: Option<ProxyProtocolIn>,
        tls: TlsListeners,
        fast_path: Option<FastPath>,
    ) -> Self {
        ClientConnections {
            proxy: Arc::new(proxy),
            limits: limits.clone(),
            proxy_protocol,
            tls,
            fast_path,
        }
    }

    /// Whether a connection from `peer` to `local` must start with a PROXY header.
    fn expects_proxy_header(&self, peer: SocketAddr, local: SocketAddr) -> bool {
        self.proxy_protocol.as_ref().is_some_and(|accepted| {
            accepted.from.iter().any(|net| net.contains(peer.ip()))
                && (accepted.listeners.is_empty()
                    || accepted.listeners.iter().any(|l| l.accepted(local)))
        })
    }

    /// Reads the PROXY header a trusted load balancer starts its connection with, and makes
    /// the client it names the connection's client. `None`: the connection is closed (no
    /// valid header in time).
    async fn take_proxy_header(&self, mut stream: Stream) -> Option<Stream> {
        let (Some(peer), Some(local)) = (peer_address(&stream), local_address(&stream)) else {
            return Some(stream);
        };
        if !self.expects_proxy_header(peer, local) {
            return Some(stream);
        }
        let header = tokio::time::timeout(
            self.limits.header_timeout.0,
            proxy_protocol::read_header(&mut stream),
        )
        .await;
        match header {
            Ok(Ok(ProxyHeader::Local)) => Some(stream),
            Ok(Ok(ProxyHeader::Proxied { source, .. })) => {
                // pingora read the peer address at accept: the digest is replaced whole.
                // The local address stays the listener's, which routes compare.
                let digest = SocketDigest::from_raw_fd(stream.id());
                let _ = digest.peer_addr.set(Some(PingoraAddr::Inet(source)));
                let _ = digest.local_addr.set(Some(PingoraAddr::Inet(local)));
                stream.set_socket_digest(digest);
                Some(stream)
            }
            Ok(Err(e)) => {
                log::info!("closing a connection from {peer}: {e}");
                None
            }
            Err(_) => {
                log::info!("closing a connection from {peer}: no PROXY protocol header in time");
                None
            }
        }
    }

    /// What comes before HTTP on a connection: the PROXY header, then the TLS handshake.
    /// The connection, and the listener's address if TLS needed it; `None`: it is closed.
    async fn handshakes(&self, stream: Stream) -> Option<(Stream, Option<SocketAddr>)> {
        let stream = match &self.proxy_protocol {
            Some(_) => self.take_proxy_header(stream).await?,
            None => stream,
        };
        let local = match self.tls.is_empty() {
            true => None,
            false => local_address(&stream),
        };
        let Some(local) = local else {
            return Some((stream, None));
        };
        let terminated = self
            .tls
            .terminate(stream, local, self.limits.header_timeout.0);
        Some((terminated.await?, Some(local)))
    }
}

/// The client's address of a TCP connection (`None` for others), known since the accept.
fn peer_address(stream: &Stream) -> Option<SocketAddr> {
    let digest = stream.get_socket_digest()?;
    digest.peer_addr().and_then(PingoraAddr::as_inet).copied()
}

/// The listener's address of a TCP connection (`None` for others): a `getsockname` the
/// first time, so read only when something compares it.
fn local_address(stream: &Stream) -> Option<SocketAddr> {
    let digest = stream.get_socket_digest()?;
    digest.local_addr().and_then(PingoraAddr::as_inet).copied()
}

impl<P> ClientConnections<P>
where
    P: ProxyHttp + Send + Sync + 'static,
    P::CTX: Send + Sync,
{
    /// pingora-proxy's HTTP/1 loop over the connection, from the bytes `read` already and
    /// with the request header due within `header_deadline`, after `served` requests of
    /// the connection served by the fast path.
    async fn proxy_http1(
        &self,
        stream: Stream,
        read: Option<BytesMut>,
        mut header_deadline: Duration,
        served: u32,
        shutdown: &ShutdownWatch,
    ) {
        let mut session = ServerSession::new_http1(stream);
        if let Some(read) = read.filter(|read| !read.is_empty()) {
            session.set_pipelined_prefix(read);
        }
        let keepalive =
            (!*shutdown.borrow()).then(|| keepalive_seconds(self.limits.keepalive_timeout.0));
        session.set_keepalive(keepalive);
        // pingora allows one request more than the number of reuses it is given. The fast
        // path hands a connection over only before its last request.
        let reuses = self.limits.requests_after(served);
        session.set_keepalive_reuses_remaining(Some(reuses));
        loop {
            let parsed = Arc::new(AtomicBool::new(false));
            session.set_connection_user_context(Some(Box::new(HeaderParsed(parsed.clone()))));
            let request = self.proxy.process_new_http(session, shutdown);
            let header_timeout = async {
                tokio::time::sleep(header_deadline).await;
                if parsed.load(Ordering::Acquire) {
                    std::future::pending::<()>().await;
                }
            };
            let reusable = tokio::select! {
                reusable = request => match reusable {
                    Some(reusable) => reusable,
                    None => return,
                },
                () = header_timeout => {
                    log::debug!("closing a client connection: no complete request header in time");
                    return;
                }
            };
            let (stream, settings) = reusable.consume();
            session = ServerSession::new_http1(stream);
            if let Some(settings) = settings {
                settings.apply_to_session(&mut session);
            }
            header_deadline = self.limits.keepalive_timeout.0 + self.limits.header_timeout.0;
        }
    }

    /// Serves one client connection from its accept to its close.
    ///
    /// Not an `async fn`, for the reason given at [`FastPath::serve`]: the arguments
    /// would stay in the connection task's state beside what they are moved into.
    #[expect(
        clippy::manual_async_fn,
        reason = "an async fn keeps its arguments in the task"
    )]
    fn serve(
        self: Arc<Self>,
        stream: Stream,
        mut shutdown: ShutdownWatch,
    ) -> impl Future<Output = ()> + Send + 'static {
        async move {
            // The stages before the fast path in a block of their own: a local borrowed in
            // a stage stays in the task's state until its block ends, and an idle
            // kept-alive connection waits in the fast path.
            let (stream, peer, local) = {
                let (stream, local) = match self.proxy_protocol.is_none() && self.tls.is_empty() {
                    true => (stream, None),
                    // Boxed, as the later stages: a connection's task then holds only the
                    // state of the stage it is in (an idle kept-alive connection: the wait
                    // for its next request).
                    false => match Box::pin(self.handshakes(stream)).await {
                        Some(opened) => opened,
                        None => return,
                    },
                };
                if !matches!(stream.selected_alpn_proto(), None | Some(ALPN::H1)) {
                    // HTTP/2: pingora's loop serves every request of the connection, which
                    // it never hands back.
                    Box::pin(ServerApp::process_new(&self.proxy, stream, &shutdown)).await;
                    return;
                }
                let local = match local {
                    None if self
                        .fast_path
                        .as_ref()
                        .is_some_and(FastPath::compares_listeners) =>
                    {
                        local_address(&stream)
                    }
                    local => local,
                };
                let peer = peer_address(&stream);
                (stream, peer, local)
            };
            let (stream, read, header_deadline, served) = match &self.fast_path {
                Some(fast_path) => {
                    match fast_path.serve(stream, peer, local, &mut shutdown).await {
                        Outcome::Closed => return,
                        Outcome::HandOver {
                            stream,
                            read,
                            header_deadline,
                            served,
                        } => (
                            stream,
                            Some(read),
                            header_deadline.saturating_duration_since(std::time::Instant::now()),
                            served,
                        ),
                    }
                }
                None => (stream, None, self.limits.header_timeout.0, 0),
            };
            let http1 = self.proxy_http1(stream, read, header_deadline, served, &shutdown);
            Box::pin(http1).await;
        }
    }
}

#[async_trait]
impl<P> ServerApp for ClientConnections<P>
where
    P: ProxyHttp + Send + Sync + 'static,
    P::CTX: Send + Sync,
{
    /// Serves the connection in a task of its own, and hands pingora nothing back.
    ///
    /// pingora's task for the connection (its accept handshake, with a 60 s timer, and a
    /// loop over this call) is then done: it would hold about 3 KiB for the connection's
    /// whole life, more than everything else an idle kept-alive connection holds. Nothing
    /// waits for that task: shutting down, pingora stops accepting and then drops the
    /// runtime, which ends this task as it would have ended pingora's.
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        tokio::spawn(self.clone().serve(stream, shutdown.clone()));
        None
    }

    async fn cleanup(&self) {
        self.proxy.http_cleanup().await;
    }
}
