//! TLS termination on a listener: the protocol settings (Mozilla "intermediate", a
//! minimum version, ALPN), and the certificate of each handshake, chosen by the name the
//! client asks for (SNI).

use std::any::Any;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::listeners::TlsAccept;
use pingora::protocols::l4::stream::Stream as TcpStream;
use pingora::protocols::tls::server::handshake_with_callback;
use pingora::protocols::Stream;
use pingora::tls::error::ErrorStack;
use pingora::tls::ext::{ssl_add_chain_cert, ssl_use_certificate, ssl_use_private_key};
use pingora::tls::ssl::{
    select_next_proto, AlpnError, NameType, SslAcceptor, SslMethod, SslRef, SslVersion,
};

use crate::config::{Certificate, ListenAddress, TlsListener, TlsVersion};
use crate::metrics::{HandshakeMetrics, HandshakeResult, Metrics};

/// The certificates of a listener, by the names they serve.
pub struct CertificateChooser {
    certificates: Vec<Certificate>,
    /// `example.com` and `*.example.com` alike; a name given by two certificates is the
    /// first's.
    by_name: HashMap<String, usize>,
}

impl CertificateChooser {
    pub fn new(certificates: &[Certificate]) -> CertificateChooser {
        let mut by_name = HashMap::new();
        for (i, certificate) in certificates.iter().enumerate() {
            for name in &certificate.names {
                by_name.entry(name.clone()).or_insert(i);
            }
        }
        CertificateChooser {
            certificates: certificates.to_vec(),
            by_name,
        }
    }

    /// The certificate for `server_name`: one issued for it, else one whose wildcard
    /// covers it (one label, as TLS wildcards do), else the first.
    pub fn choose(&self, server_name: Option<&str>) -> &Certificate {
        let index = server_name.map(str::to_ascii_lowercase).and_then(|name| {
            self.by_name.get(&name).copied().or_else(|| {
                let (_, parent) = name.split_once('.')?;
                self.by_name.get(&format!("*.{parent}")).copied()
            })
        });
        &self.certificates[index.unwrap_or(0)]
    }
}

#[async_trait]
impl TlsAccept for CertificateChooser {
    async fn certificate_callback(&self, ssl: &mut SslRef) {
        let name = ssl.servername(NameType::HOST_NAME).map(str::to_string);
        let certificate = self.choose(name.as_deref());
        if let Err(e) = present(ssl, certificate) {
            log::error!(
                "cannot use the certificate in {}: {e}",
                certificate.cert_file.display()
            );
        }
    }

    async fn handshake_complete_callback(
        &self,
        ssl: &SslRef,
    ) -> Option<Arc<dyn Any + Send + Sync>> {
        let name = ssl.servername(NameType::HOST_NAME).map(str::to_string);
        Some(Arc::new(ServerName(name)))
    }
}

fn present(ssl: &mut SslRef, certificate: &Certificate) -> Result<(), ErrorStack> {
    ssl_use_certificate(ssl, &certificate.chain[0])?;
    for intermediate in &certificate.chain[1..] {
        ssl_add_chain_cert(ssl, intermediate)?;
    }
    ssl_use_private_key(ssl, &certificate.key)
}

/// The name a client asked for (SNI), kept with the connection's TLS digest for the
/// access log.
#[derive(Debug)]
pub struct ServerName(pub Option<String>);

/// TLS termination on one listener, run by the client connection loop (not by pingora's
/// listener) so that a PROXY protocol header can come first, the handshake shares the
/// request header's deadline, and failures are counted rather than logged as errors.
pub struct TlsTerminator {
    acceptor: SslAcceptor,
    chooser: CertificateChooser,
}

impl TlsTerminator {
    /// Mozilla "intermediate" (TLS 1.2 and 1.3 with its ciphers), the minimum version, and
    /// HTTP/2 by ALPN if enabled.
    pub fn new(tls: &TlsListener) -> Result<TlsTerminator, ErrorStack> {
        let mut builder = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls())?;
        // The connection has no read buffer of its own (an idle client would pay for it):
        // without read-ahead, OpenSSL reads each record's 5-byte header and its body in two
        // system calls; with it, whatever has arrived in one, into the buffer it has anyway.
        builder.set_read_ahead(true);
        if tls.min_version == TlsVersion::Tls13 {
            builder.set_min_proto_version(Some(SslVersion::TLS1_3))?;
        }
        let offered: &'static [u8] = if tls.http2 {
            b"\x02h2\x08http/1.1"
        } else {
            b"\x08http/1.1"
        };
        builder.set_alpn_select_callback(move |_, client| {
            select_next_proto(offered, client).ok_or(AlpnError::NOACK)
        });
        Ok(TlsTerminator {
            acceptor: builder.build(),
            chooser: CertificateChooser::new(&tls.certificates),
        })
    }

    /// The handshake on a new connection, within `deadline`.
    pub async fn handshake(
        &self,
        stream: Stream,
        deadline: Duration,
    ) -> Result<Stream, (HandshakeResult, String)> {
        // Listeners accept plain TCP streams; TLS is layered on the stream itself.
        let tcp = match stream.into_any().downcast::<TcpStream>() {
            Ok(tcp) => *tcp,
            Err(_) => return Err((HandshakeResult::Failed, "not a TCP connection".into())),
        };
        let handshake = handshake_with_callback(&self.acceptor, tcp, &self.chooser);
        match tokio::time::timeout(deadline, handshake).await {
            Ok(Ok(tls)) => Ok(Box::new(tls)),
            Ok(Err(e)) => Err((HandshakeResult::Failed, e.to_string())),
            Err(_) => Err((HandshakeResult::TimedOut, "no handshake in time".into())),
        }
    }
}

/// The proxy's TLS listeners, found by the address a connection came in on.
pub struct TlsListeners(Vec<TlsListenerState>);

struct TlsListenerState {
    address: ListenAddress,
    terminator: TlsTerminator,
    handshakes: HandshakeMetrics,
}

impl TlsListeners {
    pub fn new(terminators: Vec<(ListenAddress, TlsTerminator)>, metrics: &Metrics) -> Self {
        TlsListeners(
            terminators
                .into_iter()
                .map(|(address, terminator)| TlsListenerState {
                    handshakes: metrics.tls_handshakes(&address.to_string()),
                    address,
                    terminator,
                })
                .collect(),
        )
    }

    /// Whether no listener has TLS.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Terminates TLS on a connection accepted at `local`, if that is a TLS listener,
    /// within `deadline`. `None`: the handshake failed and the connection is closed.
    pub async fn terminate(
        &self,
        stream: Stream,
        local: SocketAddr,
        deadline: Duration,
    ) -> Option<Stream> {
        let Some(listener) = self.0.iter().find(|l| l.address.accepted(local)) else {
            return Some(stream);
        };
        match listener.terminator.handshake(stream, deadline).await {
            Ok(tls) => {
                listener.handshakes.observe(HandshakeResult::Done);
                Some(tls)
            }
            Err((result, reason)) => {
                listener.handshakes.observe(result);
                // Scanners and old clients fail handshakes all day: the counter is the
                // signal, the reason is for debugging one client.
                log::debug!("TLS handshake on {local} failed: {reason}");
                None
            }
        }
    }
}
